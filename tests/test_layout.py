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


DEPLOY = ROOT / "deploy"
UNIT_SUFFIXES = (".service", ".timer")


def unit_files() -> list[Path]:
    return sorted(p for p in DEPLOY.iterdir() if p.suffix in UNIT_SUFFIXES)


def trailing_comments(text: str) -> list[str]:
    """Value lines of a unit that carry a comment: systemd reads the comment as the value."""
    comment = re.compile(r"\s[#;]")
    return [
        line
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith(("#", ";")) and comment.search(line)
    ]


def test_systemd_units_live_in_deploy_and_the_readme_points_at_them() -> None:
    """deploy/ holds a service and its timer; the README names both files."""
    names = {p.name for p in unit_files()}
    assert {"topup-daily.service", "topup-daily.timer"} <= names
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in names:
        assert f"deploy/{name}" in readme


def test_no_unit_line_has_a_comment_after_its_value() -> None:
    """No unit, in deploy/ or shown in the README, puts a comment after a value."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    shown = re.findall(r"```ini\n(.*?)```", readme, flags=re.DOTALL)
    found = [line for text in shown for line in trailing_comments(text)]
    for path in unit_files():
        found += [f"{path.name}: {line}" for line in trailing_comments(path.read_text())]
    assert found == []


def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the units (ExecStart pointed at this topup-runner)."""
    import shutil

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        import pytest

        pytest.skip("systemd-analyze is not installed")
    program = Path(sys.executable).parent / "topup-runner"
    if not program.exists():
        program = Path(sys.executable)  # any executable file: verify checks only that
    copies = []
    for path in unit_files():
        text = path.read_text(encoding="utf-8")
        text = re.sub(r"(ExecStart=)\S+/topup-runner", rf"\g<1>{program}", text)
        (tmp_path / path.name).write_text(text, encoding="utf-8")
        copies.append(str(tmp_path / path.name))
    done = subprocess.run(
        [analyze, "verify", *copies], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == ""


README_FIRST_COMMANDS = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install . && topup-runner run "
    "jobs/payroll-2026-11.csv --output payroll-2026-11.xlsx",
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]' && pytest",
)


def test_the_readme_starts_with_its_two_commands_and_says_what_the_first_leaves() -> None:
    """The README opens with the two commands, and says where the first run's report and
    ledger are and how `status` and `report` find them."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```sh\n(.*?)\n```", readme, flags=re.DOTALL)
    assert tuple(blocks[:2]) == README_FIRST_COMMANDS
    first_section = readme.split("\n## ", 1)[0]
    for said in (".topup-sandbox/ledger.sqlite", "topup-runner status", "topup-runner report"):
        assert said in first_section


def test_the_readme_keeps_to_what_a_user_needs() -> None:
    """Performance internals live in benchmarks/README.md; the user's sections stay."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    headings = re.findall(r"^## (.+)$", readme, flags=re.MULTILINE)
    for kept in ("Exit codes", "Options", "Job files", "The report", "Exactly once",
                 "Architecture", "Layout", "Development"):  # fmt: skip
        assert any(h.startswith(kept) for h in headings) or f"### {kept}" in readme, kept
    assert "Performance" not in headings
    assert "callgrind" not in readme
    benchmarks = (ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")
    assert "## Performance" in benchmarks
    assert "callgrind" in benchmarks
    assert readme.count("\n") < 800  # 864 before the internals moved out, features since
