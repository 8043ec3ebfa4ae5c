"""The layout a newcomer relies on (issue 20): small modules and classes, no import cycle, a
light ledger, and SQL only where the ledger and the sandbox keep it."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "runner"
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 300


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(RUNNER.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports_at_load(name: str, path: Path, known: set[str]) -> set[str]:
    """The runner modules `name` imports when it is loaded: module level, outside
    `if TYPE_CHECKING:` (imports inside functions run later, and cannot make a cycle at load)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.If | ast.Try):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found.add(target)

    visit(tree.body)
    return found


def test_no_module_or_class_is_too_long_to_read() -> None:
    """Every module of runner/ (the sandbox included) is at most ~500 lines, a class ~300."""
    long = []
    for name, path in modules().items():
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MAX_MODULE_LINES:
            long.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    long.append(f"{name}.{node.name}: {size} lines")
    assert long == []


def test_no_import_cycle_among_runner_modules() -> None:
    """Loading any runner module never comes back to itself through its imports."""
    found = modules()
    graph = {name: imports_at_load(name, path, set(found)) for name, path in found.items()}
    cycles = []
    state: dict[str, int] = {}

    def walk(name: str, trail: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*trail[trail.index(target) :], target]))
            elif target not in state:
                walk(target, [*trail, target])
        state[name] = 2

    for name in graph:
        if name not in state:
            walk(name, [name])
    # A package importing its own submodules in __init__ is how a package's face is built.
    real = [
        c
        for c in cycles
        if not all(part.startswith(c.split(" -> ")[0]) for part in c.split(" -> "))
    ]
    assert real == []


def test_importing_the_ledger_loads_no_pandas_aiohttp_or_provider() -> None:
    """`import runner.ledger` is light: status, report and resume need nothing else."""
    code = (
        "import sys, runner.ledger\n"
        "heavy = ('pandas', 'aiohttp', 'runner.providers', 'runner.jobs', 'runner.run')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert found.stdout.strip() == "[]"


def test_sql_lives_in_the_ledger_package_and_the_sandbox() -> None:
    """No SQL statement text anywhere else in runner/."""
    statement = re.compile(
        r"""["'](?:SELECT|INSERT|UPDATE|DELETE|CREATE|ALTER|BEGIN|COMMIT|PRAGMA)\s"""
    )
    outside = [
        name
        for name, path in modules().items()
        if not name.startswith(("runner.ledger", "runner.sandbox"))
        and statement.search(path.read_text(encoding="utf-8"))
    ]
    assert outside == []
