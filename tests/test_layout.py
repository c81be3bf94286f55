"""The layout of modules/: no import cycle between its modules (function-level imports included), every
module imports, and every dotted path the yamls name (or that old inference folders name) resolves."""

import ast
import importlib
import pathlib
import re

import pytest

from modules.inference.folders import MOVED_PATHS

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "modules"
DOTTED_PATH = r"(?<![\w.])modules(?:\.\w+)+"


def module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name, path):
    """The modules of this package that ``name`` imports, anywhere in its file (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]  # `from package import module`
        else:
            continue
        found |= {target for target in targets if target in MODULES and target != name}
    return found


def test_no_import_cycle_between_the_modules():
    graph = {name: imported_modules(name, path) for name, path in MODULES.items()}
    assert graph["modules.units.features"] >= {"modules.inference.folders"}  # the graph sees imports at all
    state, cycles = {}, []

    def visit(name, stack):
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name):
    importlib.import_module(name)


def resolves(dotted):
    """Whether ``dotted`` names a module or an attribute of one."""
    module, _, attribute = dotted.rpartition(".")
    try:
        return hasattr(importlib.import_module(module), attribute)
    except ImportError:
        try:
            importlib.import_module(dotted)
            return True
        except ImportError:
            return False


def test_every_dotted_path_of_the_yamls_resolves():
    paths = {
        (str(path.relative_to(ROOT)), dotted)
        for path in sorted((ROOT / "hparams").rglob("*.yaml"))
        for dotted in re.findall(DOTTED_PATH, path.read_text(encoding="utf-8"))
    }
    assert len(paths) > 50
    assert not [(path, dotted) for path, dotted in sorted(paths) if not resolves(dotted)]


def test_the_new_place_of_every_moved_path_resolves():
    assert not [old for old, new in MOVED_PATHS.items() if not resolves(new)]
    assert not [old for old in MOVED_PATHS if resolves(old)]  # nothing is left at an old place


def test_every_package_says_what_lives_there():
    for init in PACKAGE.rglob("__init__.py"):
        if init.parent.name != "mamba":  # modules/mamba/ is left as it was
            assert ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))), f"{init} has no docstring"
