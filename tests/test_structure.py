"""The code's structure, checked on every change (fast tier, no imports of the project):

* no import circle among the modules of ``curation/`` or ``benchmarks/`` (module-level and
  function-level imports alike: a function-level import hides a circle, it does not remove it);
* every resource number a Ray task or actor asks for (``num_cpus=``, ``num_gpus=``, ``memory=``,
  a ``Request(...)``) is written in ``curation/sizing.py`` and nowhere else;
* one thread constant for training steps (``TRAIN_THREADS``), defined once;
* no module over ``MAX_LINES`` lines (a module has one job).
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("curation", "benchmarks")
SIZING = os.path.join("curation", "sizing.py")
RESOURCE_KEYS = {"num_cpus", "num_gpus", "memory"}
MAX_LINES = 500


def _modules(package: str) -> dict[str, str]:
    """``{dotted name: path}`` of every Python file under ``package``."""
    out = {}
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: str, name: str, known: set[str]) -> set[str]:
    """The project modules ``path`` imports anywhere (the longest known prefix of each name)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(p for p in [*parts, base] if p)
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for dotted in names:
            while dotted and dotted not in known:
                dotted = dotted.rpartition(".")[0]
            if dotted and dotted != name:
                targets.add(dotted)
                break
    return targets


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
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
                        found.append(sorted(component))
    return found


def test_the_circle_finder_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_curation_or_benchmarks():
    for package in PACKAGES:
        modules = _modules(package)
        known = set(modules) | set(_modules("curation"))
        graph = {name: {t for t in _imports(path, name, known) if t in modules} for name, path in modules.items()}
        assert _circles(graph) == [], f"import circles in {package}/"


def _resource_numbers(path: str) -> list[str]:
    """Where ``path`` writes a resource number: a keyword or dict key in RESOURCE_KEYS with a
    number, or ``Request(...)`` / ``Resources(...)`` / ``NodeShape(...)`` called with one."""
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    found = []

    def number(value) -> bool:
        return isinstance(value, ast.Constant) and isinstance(value.value, (int, float)) \
            and not isinstance(value.value, bool)

    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg in RESOURCE_KEYS and number(node.value):
            found.append(f"{node.arg}={node.value.value} at line {node.value.lineno}")
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value in RESOURCE_KEYS and number(value):
                    found.append(f"{key.value!r}: {value.value} at line {value.lineno}")
        elif isinstance(node, ast.Call):
            callee = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if callee in ("Request", "Resources", "NodeShape") and any(map(number, node.args)):
                found.append(f"{callee}(...) at line {node.lineno}")
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                name = target.id if isinstance(target, ast.Name) else getattr(target, "attr", "")
                if name in RESOURCE_KEYS and node.value is not None and number(node.value):
                    found.append(f"{name} = {node.value.value} at line {node.lineno}")
    return found


def test_the_resource_finder_sees_each_form(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("ray.remote(num_cpus=1)(f)\nx = {'memory': 2**30, 'num_gpus': 1}\nRequest(4)\n"
                    "class A:\n    num_cpus = 1\nray.remote(**ONE_CPU.options())(f)\n")
    assert len(_resource_numbers(str(path))) == 4


def test_resource_numbers_are_written_only_in_the_sizing_module():
    offenders = {}
    for package in ("curation", "jobs"):
        for path in _modules(package).values():
            if os.path.relpath(path, ROOT) != SIZING and (found := _resource_numbers(path)):
                offenders[os.path.relpath(path, ROOT)] = found
    assert offenders == {}, "size requests in curation/sizing.py"


def test_one_training_thread_constant():
    defined = []
    for package in ("curation", "jobs"):
        for path in _modules(package).values():
            tree = ast.parse(open(path, encoding="utf-8").read())
            for node in tree.body:
                if isinstance(node, ast.Assign) and any(getattr(t, "id", "").endswith("_THREADS") for t in node.targets):
                    defined.append(os.path.relpath(path, ROOT))
    assert defined == [SIZING]


def test_no_module_over_the_line_limit():
    long = {}
    for package in PACKAGES:
        for path in _modules(package).values():
            with open(path, encoding="utf-8") as fh:
                if (lines := sum(1 for _ in fh)) > MAX_LINES:
                    long[os.path.relpath(path, ROOT)] = lines
    assert long == {}


def test_the_installed_package_holds_no_test_helpers():
    """Test servers and fault proxies live in ``testkit/`` (outside the package the wheel ships),
    and the job never imports them."""
    assert not os.path.exists(os.path.join(ROOT, "curation", "testing"))
    for path in _modules("curation").values():
        assert "testkit" not in _imports(path, "x", {"testkit"}), path


# Imports inside functions keep heavy or optional libraries off the processes that do not need
# them (the driver, a CLI command, the reaper): Ray and Ray Data, torch and the project modules
# that import it, FAISS, scikit-learn, scipy, Bokeh, UMAP / numba, cuML, botocore, threadpoolctl.
# Everything else is imported at the top of its module.
LAZY_LIBRARIES = {"ray", "torch", "torchvision", "faiss", "sklearn", "scipy", "bokeh", "umap", "numba", "cuml",
                  "botocore", "threadpoolctl", "importlib"}
LAZY_PROJECT_MODULES = {"curation.embedders", "curation.stages.decode", "curation.stages.embed", "curation.pipeline",
                        "curation.reaper"}
CLI_MODULES = {"curation/cli.py", "curation/__main__.py"}  # a command loads only what it runs


def lazy_imports(source: str) -> list[tuple[int, str]]:
    """``(line, module)`` of every import inside a function (``from curation import x`` as ``curation.x``)."""
    found = []
    for fn in ast.walk(ast.parse(source)):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    found += [(node.lineno, a.name) for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    found += ([(node.lineno, f"curation.{a.name}") for a in node.names] if node.module == "curation"
                              else [(node.lineno, node.module)])
    return sorted(found)


def test_the_lazy_import_finder_sees_nested_and_package_imports():
    found = lazy_imports("def f():\n    if x:\n        import json\n    from curation import pipeline\n")
    assert found == [(3, "json"), (4, "curation.pipeline")]


def test_imports_inside_functions_only_keep_heavy_libraries_off_a_process():
    wrong = []
    for folder, _, files in os.walk(os.path.join(ROOT, "curation")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, ROOT)
            for line, module in lazy_imports(open(path).read()):
                if module.split(".")[0] in LAZY_LIBRARIES or module in LAZY_PROJECT_MODULES:
                    continue
                if module.startswith("curation") and rel in CLI_MODULES:
                    continue
                wrong.append(f"{rel}:{line} {module}")
    assert wrong == [], "import these at the top of their modules: " + ", ".join(wrong)
