"""A YAML job's text into a table of string columns: repeated keys noted, numbers kept as
written, and depth and alias expansion bounded before anything walks the document.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import pandas as pd
import yaml

from runner.errors import ConfigError
from runner.jobs.columns import Columns, parse_columns, require_headers
from runner.jobs.currency import parse_currency
from runner.jobs.table import KNOWN_COLUMNS, REQUIRED_COLUMNS, Problems, Table
from runner.money import parse_amount

YAML_KEYS = ("run_key", "provider", "settings", "topups")
_PLAIN_INT = re.compile(r"0|[1-9][0-9]*", re.ASCII)
# YAML nesting allowed (a job needs four or five levels: document, topups, row, value).
MAX_YAML_DEPTH = 50
# YAML aliases may expand a file to at most 10 values per value written, plus 100,000. The
# usual use, `<<: *defaults` on every row, adds the defaults' few keys per row of about
# five written values: two or three times the written size. A factor of 10 leaves room for
# larger defaults while keeping the work linear in the file's size, which the parser has
# already paid for; the allowance lets a small file share a sizeable block freely. A
# "billion laughs" of a few lines expands past this at its seventh level of ten.
_ALIAS_FACTOR = 10
_ALIAS_ALLOWANCE = 100_000


@dataclass(frozen=True, slots=True)
class _Typed:
    """A scalar YAML typed on its own, kept with the text it was written as."""

    value: int | float | bool
    source: str


class _TooDeep(Exception):
    """Composing met a node nested deeper than MAX_YAML_DEPTH (at `line`, 1-based)."""

    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.line = line


class _JobLoader(yaml.SafeLoader):
    """SafeLoader that notes repeated keys (plain PyYAML keeps the last one silently), keeps the
    written text of numbers and booleans, and leaves dates as text. It also counts the nodes
    written and the aliases met, and stops composing past MAX_YAML_DEPTH (PyYAML's composer
    recurses, so a deep file would otherwise end in a RecursionError)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        # id() of a constructed mapping -> its repeated keys and their 1-based lines.
        self.repeated: dict[int, list[tuple[str, int]]] = {}
        self.nodes = 0
        self.aliases = 0
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            return super().compose_node(parent, index)
        self.nodes += 1
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                event = self.peek_event()  # type: ignore[no-untyped-call]
                raise _TooDeep(event.start_mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _expansion_problem(root: yaml.Node, written: int) -> str | None:
    """Why the composed graph at `root` may not be constructed, or None.

    PyYAML composes an alias as a reference to its anchor's node, so the graph stays as
    small as the text; what costs is everything after that walks it as a tree (merge keys
    copy, settings are copied, checks descend), where each alias counts as a full copy of
    its target. That expanded size and depth are computed here, once per distinct node.
    """
    bound = _ALIAS_FACTOR * written + _ALIAS_ALLOWANCE
    size: dict[int, int] = {}
    height: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        children = _children(node)
        if children_done:
            on_path.discard(key)
            total, tallest = 1, 0
            for child in children:
                if isinstance(child, yaml.ScalarNode):
                    total, tallest = total + 1, max(tallest, 1)
                else:
                    total, tallest = total + size[id(child)], max(tallest, height[id(child)])
            if total > bound:
                return (
                    f"its YAML aliases expand to more than {bound:,} values from "
                    f'{written:,} written (a "billion laughs"?): an alias may repeat '
                    "a value, not multiply the file; write the values out"
                )
            if tallest + 1 > MAX_YAML_DEPTH:
                return (
                    f"is nested more than {MAX_YAML_DEPTH} levels deep once its YAML aliases "
                    "are expanded: a job needs only a few"
                )
            size[key], height[key] = total, tallest + 1
            continue
        if key in size:
            continue
        on_path.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) in on_path:
                line = child.start_mark.line + 1
                return f"has a YAML alias that refers to itself (anchor on line {line})"
            if not isinstance(child, yaml.ScalarNode) and id(child) not in size:
                stack.append((child, False))
    return None


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _construct_map(loader: _JobLoader, node: yaml.MappingNode) -> Iterator[dict[Hashable, Any]]:
    data: dict[Hashable, Any] = {}
    yield data
    # Checked before construct_mapping, which folds merge keys (`<<`) into node.value.
    seen: set[tuple[str, str]] = set()
    repeated: list[tuple[str, int]] = []
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode) and not key_node.tag.endswith(":merge"):
            key = (key_node.tag, key_node.value)
            if key in seen:
                repeated.append((key_node.value, key_node.start_mark.line + 1))
            seen.add(key)
    data.update(loader.construct_mapping(node))
    if repeated:
        loader.repeated[id(data)] = repeated


def _construct_typed(loader: yaml.SafeLoader, node: yaml.Node) -> _Typed:
    assert isinstance(node, yaml.ScalarNode)
    tag = node.tag.rsplit(":", 1)[-1]
    constructors = {
        "int": yaml.SafeLoader.construct_yaml_int,
        "float": yaml.SafeLoader.construct_yaml_float,
        "bool": yaml.SafeLoader.construct_yaml_bool,
    }
    value: int | float | bool = constructors[tag](loader, node)
    return _Typed(value=value, source=node.value)


for _tag in ("int", "float", "bool"):
    _JobLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _construct_typed)
_JobLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_JobLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def read_yaml(
    text: str, problems: Problems, columns: Columns | None = None
) -> tuple[Table | None, str | None, str | None, Mapping[str, object]]:
    loader = _JobLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None and loader.aliases:
            problem = _expansion_problem(node, loader.nodes)
            if problem is not None:
                problems.fail(problem)
        document = None if node is None else loader.construct_document(node)
    except _TooDeep as exc:
        problems.fail(
            f"is nested more than {MAX_YAML_DEPTH} levels deep on line {exc.line}: "
            "a job needs only a few"
        )
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" on line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problems.fail(f"is not valid YAML{where}: {exc.problem or exc.context}")
    except yaml.YAMLError as exc:
        problems.fail(f"is not valid YAML: {exc}")
    finally:
        loader.dispose()
    if document is None:
        problems.fail("holds no YAML document: expected a mapping with a topups: list")
    if not isinstance(document, dict):
        problems.fail(f"expected a mapping with a topups: list, found {_kind(document)}")

    for key, line in loader.repeated.pop(id(document), []):
        problems.add(f'"{key}" is given twice (line {line}): keep one')
    for key in document:
        if key not in YAML_KEYS:
            problems.add(f"unknown top-level key {_show_key(key)}: expected {', '.join(YAML_KEYS)}")
    run_key = _optional_text(document, "run_key", problems)
    provider = _optional_text(document, "provider", problems)
    raw_settings = document.get("settings")
    currency = None
    if isinstance(raw_settings, dict) and "currency" in raw_settings:
        # A declaration about the job's cards, not a run setting: checked here, kept apart.
        raw_settings = dict(raw_settings)
        currency = _currency_setting(raw_settings.pop("currency"), problems)
    if isinstance(raw_settings, dict) and "columns" in raw_settings:
        # How this file's rows are read, not a run setting; the operator's mapping wins.
        raw_settings = dict(raw_settings)
        mapped = _plain(raw_settings.pop("columns"))
        columns = columns or _columns_setting(mapped, problems)
    settings = _settings(raw_settings, problems)

    topups = document.get("topups")
    table = None
    if "topups" not in document:
        problems.add("has no topups: list (one mapping per card, with card_id and amount)")
    elif topups is None or topups == []:
        problems.add("the job has no rows")
    elif not isinstance(topups, list):
        problems.add(f"topups must be a list of mappings, found {_kind(topups)}")
    else:
        if columns is not None:
            keys = (k for item in topups if isinstance(item, dict) for k in item)
            folded = (k.strip().lower() for k in keys if isinstance(k, str))
            require_headers(folded, columns, problems, "any row of topups:")
        table = _yaml_table(topups, loader.repeated, columns.by_header() if columns else {})
        table.currency_setting = currency
    # Whatever is left is repeated inside settings or deeper: still a mistake worth stopping for.
    for repeated in loader.repeated.values():
        for key, line in repeated:
            problems.add(f'the key "{key}" is given twice on line {line}: keep one')
    return table, run_key, provider, settings


def _optional_text(document: dict[Any, Any], key: str, problems: Problems) -> str | None:
    value = document.get(key)
    if value is None:
        return None
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, str):
        problems.add(f"{key} is empty: leave it out or give a value")
    elif isinstance(value, _Typed):
        problems.add(f'{key} must be text: quote it as "{value.source}"')
    else:
        problems.add(f"{key} must be text, found {_kind(value)}")
    return None


def _currency_setting(value: object, problems: Problems) -> str | None:
    """The code `settings.currency` declares, or None with the problem added."""
    if value is None:
        problems.add("settings.currency is empty: leave it out or give a code such as USD")
        return None
    if isinstance(value, str | _Typed):
        text = value if isinstance(value, str) else value.source
        try:
            code = parse_currency(text)
        except ValueError as exc:
            problems.add(f"settings.currency: {exc}")
            return None
        if isinstance(value, str):
            return code
        problems.add(f"settings.currency: {text} is read by YAML as {_kind(value)}: quote it")
        return None
    problems.add(f"settings.currency must be one code such as USD, not {_kind(value)}")
    return None


def _settings(value: object, problems: Problems) -> Mapping[str, object]:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        problems.add("settings must be a mapping of names to values")
        return MappingProxyType({})
    return MappingProxyType({key: _plain(item) for key, item in value.items()})


def _plain(value: object) -> object:
    """`value` with our YAML wrappers replaced by the plain Python values they carry."""
    if isinstance(value, _Typed):
        return value.value
    if isinstance(value, dict):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _columns_setting(value: object, problems: Problems) -> Columns | None:
    try:
        return parse_columns(value, "settings.columns")
    except ConfigError as exc:
        problems.add(str(exc))
        return None


def _yaml_table(
    topups: list[Any], repeated: dict[int, list[tuple[str, int]]], mapped: dict[str, str]
) -> Table:
    columns: dict[str, list[str]] = {key: [] for key in KNOWN_COLUMNS}
    extra_names: dict[str, str] = {}  # lower-cased key -> the spelling first seen
    extra_cells: list[dict[str, str]] = []
    noted: dict[int, list[tuple[str | None, str]]] = {}
    judged: set[tuple[int, str]] = set()

    for position, item in enumerate(topups):
        notes = noted.setdefault(position, [])
        cells: dict[str, str] = {}
        if not isinstance(item, dict):
            notes.append((None, f"expected a mapping with card_id and amount, found {_kind(item)}"))
            item = {}
        for key, line in repeated.pop(id(item), []):
            notes.append((key.strip().lower(), f'"{key}" is given twice (line {line}): keep one'))
            judged.add((position, key.strip().lower()))
        for key, value in item.items():
            if not isinstance(key, str):
                hint = (
                    ' (an unquoted "," in an amount? quote it)' if isinstance(key, _Typed) else ""
                )
                notes.append((None, f"has a key {_show_key(key)} that is not text{hint}"))
                continue
            name = key.strip().lower()
            name = mapped.get(name, name)
            if name in cells:
                notes.append((name, f'"{key}" is given twice (keys ignore case and spaces)'))
                judged.add((position, name))
                continue
            text, message = _yaml_cell(value, name)
            cells[name] = text
            if message is not None:
                notes.append((name, message))
                judged.add((position, name))
            if name not in KNOWN_COLUMNS:
                extra_names.setdefault(name, key.strip())
        for name in REQUIRED_COLUMNS:
            if name not in cells and isinstance(topups[position], dict):
                notes.append((name, "is missing"))
                judged.add((position, name))
        for name in KNOWN_COLUMNS:
            columns[name].append(cells.pop(name, ""))
        extra_cells.append(cells)
        if not notes:
            del noted[position]

    def series(values: Iterable[str]) -> pd.Series[str]:
        return pd.Series(list(values), dtype=str)

    return Table(
        card_id=series(columns["card_id"]),
        amount=series(columns["amount"]),
        reference=series(columns["reference"]),
        currency=series(columns["currency"]),
        extras=[
            (spelling, series(cells.get(name, "") for cells in extra_cells))
            for name, spelling in extra_names.items()
        ],
        noted=noted,
        judged=judged,
    )


def _yaml_cell(value: object, column: str) -> tuple[str, str | None]:
    """The text of one YAML value for `column`, or "" and why it cannot be used."""
    if value is None:
        return "", None
    if isinstance(value, str):
        return value, None
    if isinstance(value, _Typed):
        source = value.source
        if isinstance(value.value, bool):
            return "", f"{source} is read by YAML as {str(value.value).lower()}: quote it"
        if column == "card_id":
            return "", f'{source} is a YAML number: quote it as "{source}" to keep it exact'
        if column != "amount":
            return source, None  # carried as written: the number is only ever shown
        if isinstance(value.value, int):
            if _PLAIN_INT.fullmatch(source):
                return source, None
            # No example figure in these messages: it could be taken for the amount to write.
            return "", f"{source} is read by YAML as {value.value}: quote it"
        if not math.isfinite(value.value):
            return "", f"{source} is not a number: write the amount in digits, quoted"
        why = "YAML float, which cannot hold cents exactly"
        try:
            parse_amount(source)
        except ValueError as exc:
            return "", f"{source} is a {why}; quoted, it would still be refused: {exc}"
        return "", f'{source} is a {why}: quote it as "{source}"'
    return "", f"must be a single value, not {_kind(value)}"


def _kind(value: object) -> str:
    if isinstance(value, _Typed):
        return f"the {type(value.value).__name__} {value.source}"
    kinds = {dict: "a mapping", list: "a list", str: "text", type(None): "nothing"}
    return kinds.get(type(value), f"a {type(value).__name__}")


def _show_key(key: object) -> str:
    if isinstance(key, _Typed):
        return key.source
    return json.dumps(key, ensure_ascii=False) if isinstance(key, str) else repr(key)


# ---------------------------------------------------------------------------------------------
# Judging the cells
