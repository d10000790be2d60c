"""The house's layering, read from the source with `ast` (no module is imported): utils/ imports nothing above
it, no two project modules import each other (directly or round a loop, a package's `__init__` counted), and
no module uses another package's private (`_name`) functions. Imports inside functions count too: a lazy import
hides a dependency from the reader, not from the graph."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INFRASTRUCTURE = "utils"  # the bottom layer: general infrastructure, imports only itself


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _project_files() -> dict[str, Path]:
    files = {}
    for path in sorted(REPO.rglob("*.py")):
        rel = path.relative_to(REPO).parts
        if any(p.startswith(".") or p == "__pycache__" or p.endswith(".egg-info") for p in rel):
            continue
        files[_module_name(path)] = path
    return files


FILES = _project_files()
MODULES = set(FILES)
PACKAGES = {name for name, path in FILES.items() if path.name == "__init__.py"}


def _package_of(module: str) -> str:
    """The package a module lives in ('' for a top-level module)."""
    return module if module in PACKAGES else module.rpartition(".")[0]


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module name of a `from ... import` (relative ones resolved against `module`'s package)."""
    if not node.level:
        return node.module or ""
    base = _package_of(module).split(".")
    base = base[:len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _with_packages(importer: str, target: str) -> set[str]:
    """`target` and the packages whose `__init__` importing it runs: every enclosing package that is not also
    an enclosing package of the importer (those are loaded before the importer runs)."""
    own = set()
    parts = importer.split(".")
    for i in range(1, len(parts) + 1):
        own.add(".".join(parts[:i]))
    found = {target}
    parts = target.split(".")
    for i in range(1, len(parts)):
        found.add(".".join(parts[:i]))
    return {m for m in found if m in MODULES and (m == target or m not in own)}


def _parse(name: str) -> ast.Module:
    return ast.parse(FILES[name].read_text(encoding="utf-8"), filename=str(FILES[name]))


def project_imports(name: str) -> dict[str, int]:
    """{project module: first line} of every project module `name` imports (at any depth of its code)."""
    found: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        for module in _with_packages(name, target):
            if module != name:
                found.setdefault(module, line)

    for node in ast.walk(_parse(name)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, node)
            submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES]
            for module in submodules:  # `from pkg import sub` imports the module pkg.sub (and pkg/__init__)
                add(module, node.lineno)
            if len(submodules) < len(node.names):  # a name defined in `base` itself
                add(base, node.lineno)
    return {m: line for m, line in found.items() if m in MODULES}


GRAPH = {name: project_imports(name) for name in sorted(MODULES)}


def test_the_scan_sees_the_house():
    # a scan that found nothing would pass every check below
    assert {"run", "train", "tasks", "argparser", "utils.errors", "utils.reporting.logger", "dataset.layout", "methods",
            "scripts.campaign"} <= MODULES
    assert "utils.errors" in GRAPH["run"] and "tasks" in GRAPH["dataset.step_datasets"]
    assert "methods" in GRAPH["scripts.campaign"]  # `from methods import ...` runs methods/__init__
    assert "process_data.splits" in GRAPH["dataset.step_datasets"]  # a lazy import inside a function counts


def test_utils_imports_nothing_above_it():
    upward = [f"{FILES[name].relative_to(REPO)}:{line} imports {target}"
              for name, targets in GRAPH.items() if name.split(".")[0] == INFRASTRUCTURE
              for target, line in targets.items() if target.split(".")[0] != INFRASTRUCTURE]
    assert not upward, "utils/ is the bottom layer; move the code or pass what it needs in:\n" + "\n".join(upward)


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def test_cycle_finder_finds_a_loop_through_a_package_init():
    graph = {"tasks": {"dataset.layout": 1}, "dataset.layout": {}, "dataset": {"tasks": 1}, "utils": {}}
    graph["tasks"].update({m: 1 for m in ("dataset",)})  # importing dataset.layout runs dataset/__init__
    assert _cycles(graph) == [["dataset", "tasks"]]
    assert _cycles({"a": {"b": 1}, "b": {}, "c": {"a": 1}}) == []


def test_a_module_importing_pkg_sub_imports_the_package_init():
    assert _with_packages("tasks", "dataset.isprs") == {"dataset", "dataset.isprs"}
    assert _with_packages("dataset.incremental", "dataset.isprs") == {"dataset.isprs"}  # its own package is loaded


def test_no_import_cycle():
    cycles = _cycles(GRAPH)
    described = []
    for component in cycles:
        members = set(component)
        described.append(" <-> ".join(component) + ": " + "; ".join(
            f"{FILES[a].relative_to(REPO)}:{line} imports {b}"
            for a in component for b, line in GRAPH[a].items() if b in members))
    assert not cycles, "import cycles:\n" + "\n".join(described)


def _private_uses(name: str) -> list[str]:
    """`from X import _y` and `X._y` where X is a project module of another package than `name`'s."""
    tree = _parse(name)
    top = name.split(".")[0]
    aliases = {}  # local name -> project module, of `import X` / `import X as Y` / `from pkg import module`
    uses = []

    def foreign(module: str) -> bool:
        return module in MODULES and module.split(".")[0] != top

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:  # `import a.b` binds a; `import a.b as c` binds c to a.b
                if alias.asname:
                    aliases[alias.asname] = alias.name
                else:
                    aliases[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, node)
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:
                    aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
                elif alias.name.startswith("_") and not alias.name.startswith("__") and foreign(base):
                    uses.append(f"{FILES[name].relative_to(REPO)}:{node.lineno} imports {base}.{alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_") \
                and not node.attr.startswith("__"):
            module = aliases.get(node.value.id)
            if module is not None and foreign(module):
                uses.append(f"{FILES[name].relative_to(REPO)}:{node.lineno} uses {module}.{node.attr}")
    return uses


@pytest.mark.parametrize("folder", ["scripts", "benchmarks", "process_data", "dataset", "methods", "models",
                                    "modules", "pretrained", "utils", "top-level"])
def test_no_private_name_of_another_package(folder):
    names = [n for n in MODULES if (n.split(".")[0] == folder if folder != "top-level" else "." not in n
                                    and n not in PACKAGES)]
    assert names
    uses = [use for name in sorted(names) for use in _private_uses(name)]
    assert not uses, "private names are their module's own; give the function a public name:\n" + "\n".join(uses)
