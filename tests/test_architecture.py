"""The import graph of tasks/ and flows/ keeps its shape. Read from the source with ast (no
imports run, no network): every import statement counts, function-local ones included.

Layers, lowest first; a module may import its own layer or lower ones, never a higher one:

  0  tasks.errors, tasks.runlog, tasks.progress     one-line errors, the run logger, progress events
  1  tasks.storage                                  store, publish, retrieve, the content cache
  2  tasks.importers, tasks.precision, tasks.tuning,
     tasks.build, tasks.devices                     the domain: peers that may use each other
                                                    (one model format's import needs the QDQ
                                                    lowering, tuning needs int8 intrinsics of
                                                    build, build needs the tuning database ...),
                                                    so only the module-level no-cycle rule binds them
  3  tasks.records                                  typed records between stages (compose the domain's)
  4  tasks.report, tasks.tuning_curve               report.json / report.md / tuning_curve.png / UI artifacts
  5  tasks.pipeline, tasks.retune                   the stages' plain logic and retune's decisions
  6  flows.fanout, flows.progress                   Prefect task runners, terminal display
  7  flows.stages                                   the stages as Prefect tasks
  8  flows.compile, flows.retune, flows.retrieve, flows.serve   the flows
  9  flows.cli                                      the `tvmflow` command

Also: no import cycle between modules (KNOWN_CYCLES is the explicit allow-list, empty now),
nothing in tasks/ imports flows/, and no private name (`_x`) is taken from another module
(a package's own submodules may use its private helpers).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tasks", "flows")

LAYERS: dict[str, int] = {
    "tasks": 0,
    "tasks.errors": 0,
    "tasks.runlog": 0,
    "tasks.progress": 0,
    "tasks.storage": 1,
    "tasks.importers": 2,
    "tasks.precision": 2,
    "tasks.tuning": 2,
    "tasks.build": 2,
    "tasks.devices": 2,
    "tasks.records": 3,
    "tasks.report": 4,
    "tasks.tuning_curve": 4,
    "tasks.pipeline": 5,
    "tasks.retune": 5,
    "flows": 6,
    "flows.fanout": 6,
    "flows.progress": 6,
    "flows.stages": 7,
    "flows.compile": 8,
    "flows.retune": 8,
    "flows.retrieve": 8,
    "flows.serve": 8,
    "flows.cli": 9,
}

# Import cycles tolerated for now, each as a sorted tuple of module names, with the reason.
KNOWN_CYCLES: dict[tuple[str, ...], str] = {}


def modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = modules()


def resolve(name: str) -> str | None:
    """The project module an import of `name` loads (its longest known prefix), or None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def absolute(node: ast.ImportFrom, module: str) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".")
    if not str(MODULES[module]).endswith("__init__.py"):
        package = package[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported project module, imported name or None, line) for every import in `module`."""
    out = []
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            out += [(t, None, node.lineno) for a in node.names if (t := resolve(a.name))]
        elif isinstance(node, ast.ImportFrom):
            base = absolute(node, module)
            for alias in node.names:
                target = resolve(f"{base}.{alias.name}")
                if target == f"{base}.{alias.name}":  # a submodule
                    out.append((target, None, node.lineno))
                elif (owner := resolve(base)) is not None:
                    out.append((owner, alias.name, node.lineno))
    return [(t, n, line) for t, n, line in out if t != module]


GRAPH = {m: imports(m) for m in MODULES}


def layer(module: str) -> int:
    prefix = module
    while prefix not in LAYERS:
        if "." not in prefix:
            raise AssertionError(f"{module} has no layer: add it (or its package) to LAYERS in {__file__}")
        prefix = prefix.rpartition(".")[0]
    return LAYERS[prefix]


def cycles() -> list[tuple[str, ...]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in {t for t, _, _ in GRAPH[v]}:
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
                found.append(tuple(sorted(component)))

    for module in sorted(MODULES):
        if module not in index:
            visit(module)
    return found


def test_every_module_has_a_layer():
    for module in MODULES:
        layer(module)


def test_no_import_cycles():
    new = [c for c in cycles() if c not in KNOWN_CYCLES]
    assert not new, "import cycles: " + "; ".join(" <-> ".join(c) for c in new)


def test_tasks_never_import_flows():
    bad = [
        f"{m}:{line} imports {t}"
        for m, edges in GRAPH.items()
        if m.startswith("tasks")
        for t, _, line in edges
        if t.split(".")[0] == "flows"
    ]
    assert not bad, bad


def test_no_import_points_up_the_layers():
    bad = [
        f"{m} (layer {layer(m)}):{line} imports {t} (layer {layer(t)})"
        for m, edges in GRAPH.items()
        for t, _, line in edges
        if layer(t) > layer(m)
    ]
    assert not bad, "\n".join(bad)


def test_no_private_name_from_another_module():
    bad = []
    for module, edges in GRAPH.items():
        for target, name, line in edges:
            own_package = module.startswith(target + ".")
            if name and name.startswith("_") and not name.startswith("__") and not own_package:
                bad.append(f"{module}:{line} imports {target}.{name}")
        tree = ast.parse(MODULES[module].read_text())
        aliases = {}
        for node in ast.walk(tree):  # names bound to project modules: `from tasks import pipeline as p`
            if isinstance(node, ast.ImportFrom):
                base = absolute(node, module)
                for alias in node.names:
                    if resolve(f"{base}.{alias.name}") == f"{base}.{alias.name}":
                        aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname and resolve(alias.name) == alias.name:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and not module.startswith(aliases[node.value.id] + ".")
            ):
                bad.append(f"{module}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, bad


def test_the_checks_can_fail():
    """The rules above catch what they are for, on a made-up graph."""
    global GRAPH
    saved = GRAPH
    try:
        GRAPH = {
            **saved,
            "tasks.errors": [*saved["tasks.errors"], ("tasks.pipeline", None, 1)],
            "tasks.pipeline": [*saved["tasks.pipeline"], ("tasks.errors", None, 1)],
        }
        assert any({"tasks.errors", "tasks.pipeline"} <= set(c) for c in cycles())
        assert any(layer(t) > layer(m) for m, edges in GRAPH.items() for t, _, _ in edges)
    finally:
        GRAPH = saved
