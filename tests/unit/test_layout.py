"""The layout's rules, read from the code: no import circle, a domain that imports no I/O.

- The domain (`operators/fanout`, `delivery`, `acks`, `notify`, `outbox`) imports only
  `schemas`, `operators.events`, `operators.metrics` (the funnel's counters: a process-wide
  registry, no I/O), `operators.worker_local` (per-worker state that survives Bytewax's worker
  threads, which a `threading.local` does not: standard library only, and kept so) and its own
  package, whose `ports.py` the adapters implement.
- `operators` never imports `flows` or `scripts`; production code never imports the dev stack,
  the harness or the benchmarks (`scripts/dev`, `scripts/harness`, `scripts/bench`), except the
  command line, which registers their commands only when they are there.
- No import circle, counting imports inside functions too; and every module under `operators/`
  imports on its own in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("flows", "operators", "schemas", "scripts")
DOMAIN = (
    "operators.fanout",
    "operators.delivery",
    "operators.acks",
    "operators.notify",
    "operators.outbox",
)
DOMAIN_MAY_IMPORT = (
    "schemas",
    "operators.events",
    "operators.metrics",
    "operators.worker_local",
    "operators.probe_demand",
)
# What the domain may import that is not the contract itself: these import no project module.
LEAVES = ("operators.worker_local", "operators.probe_demand")
NOT_SHIPPED = ("scripts.dev", "scripts.harness", "scripts.bench")
# The command line is shipped but offers `fanfare dev`, `demo` and `chaos` in a source checkout.
MAY_IMPORT_NOT_SHIPPED = ("scripts.cli",)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def imports_of(path: Path, modules: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """Project modules the file imports (anywhere in it), with the line."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                yield (full if full in modules else node.module), node.lineno


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {
        name: {m for m, _ in imports_of(path, modules) if m in modules and m != name}
        for name, path in modules.items()
    }


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle() -> None:
    assert circles(graph()) == []


def test_circle_finder_finds_one() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_domain_imports_only_schemas_events_metrics_and_itself() -> None:
    modules = project_modules()
    wrong = []
    for name, path in modules.items():
        if not within(name, DOMAIN):
            continue
        own = ".".join(name.split(".")[:2])
        for imported, line in imports_of(path, modules):
            if not within(imported, (own, *DOMAIN_MAY_IMPORT)):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {imported}")
    assert wrong == []


def test_the_domain_s_helpers_import_no_project_module() -> None:
    modules = project_modules()
    wrong = [
        f"{modules[name].relative_to(ROOT)}:{line} imports {imported}"
        for name in LEAVES
        for imported, line in imports_of(modules[name], modules)
    ]
    assert wrong == []


def test_operators_never_import_flows_or_scripts() -> None:
    modules = project_modules()
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {imported}"
        for name, path in modules.items()
        if within(name, ("operators", "schemas"))
        for imported, line in imports_of(path, modules)
        if within(imported, ("flows", "scripts"))
    ]
    assert wrong == []


def test_shipped_code_never_imports_the_dev_stack_harness_or_benchmarks() -> None:
    modules = project_modules()
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {imported}"
        for name, path in modules.items()
        if not within(name, NOT_SHIPPED + MAY_IMPORT_NOT_SHIPPED)
        for imported, line in imports_of(path, modules)
        if within(imported, NOT_SHIPPED)
    ]
    assert wrong == []


def test_every_operators_module_imports_on_its_own() -> None:
    names = sorted(n for n in project_modules() if within(n, ("operators",)))
    # One interpreter, the project's modules dropped from sys.modules before each import:
    # each module is imported first, as a fresh interpreter would (third-party ones stay).
    program = f"""
import importlib, sys
from prometheus_client import REGISTRY
failed = []
for name in {names!r}:
    for loaded in [m for m in sys.modules if m.split(".")[0] in {PACKAGES!r}]:
        del sys.modules[loaded]
    for collector in list(REGISTRY._collector_to_names):  # metrics register once per process
        if any(n.startswith("fanfare_") for n in REGISTRY._collector_to_names[collector]):
            REGISTRY.unregister(collector)
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{{name}}: {{type(exc).__name__}}: {{exc}}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""
    done = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
