"""The tree is the architecture (docs/design.md, "The layers"): guards that fail on a change
that breaks it. Each reads the source as text (ast), so it runs in a second.

Every check is shown to fail on a variant that breaks it (the ``..._catches_...`` tests
feed the same function a small made-up tree)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import ROOT

SRC = ROOT / "src"
PACKAGE = SRC / "mixmask"

# Bottom to top. A module may import its own layer and the layers below it, never above.
# eval holds two layers: the evaluators (features, kNN, linear probe, collapse, labelled
# data, results) that pretraining's monitors run, below train; and the commands on a run
# folder (protocols, finetune), above train, whose Fabric set-up and step they share.
LAYERS = ("errors", "ops", "models", "data", "methods", "config", "runs", "eval",
          "train", "eval.commands", "pictures", "cli")
EVAL_COMMANDS = {"mixmask.eval.protocols", "mixmask.eval.finetune", "mixmask.eval.dense_training",
                 "mixmask.eval.detect", "mixmask.eval.segment", "mixmask.eval.frozen_run",
                 "mixmask.eval.fewshot", "mixmask.eval.longtail", "mixmask.eval.robustness"}
MAX_TOP_LEVEL, MAX_MODULE_LINES, MAX_FUNCTION_LINES = 13, 500, 80


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def python_modules(package: Path = PACKAGE) -> dict[str, Path]:
    # config/recipes/ is data (the recipes and the script that writes their matrix).
    return {module_name(path, package.parent): path for path in package.rglob("*.py")
            if "recipes" not in path.relative_to(package).parts}


def layer(module: str) -> str:
    if module == "mixmask":  # the package's face: __version__ only
        return "errors"
    if module in EVAL_COMMANDS:
        return "eval.commands"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "cli"


def imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, bool]]:
    """(imported mixmask module, imported inside a function) for each runtime import;
    ``if TYPE_CHECKING:`` blocks are annotations, not imports."""
    tree = ast.parse(path.read_text())
    skipped, local = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(sub) for sub in ast.walk(node))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local.update(id(sub) for sub in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        targets = set()
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name.startswith("mixmask"):
                targets.add(name)
        found.extend((target, id(node) in local) for target in sorted(targets))
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {module: {target for target, _ in imports(path, modules) if target != module}
            for module, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def upward_imports(modules: dict[str, Path]) -> list[str]:
    return [f"{module} -> {target}"
            for module, targets in import_graph(modules).items()
            for target in targets
            if LAYERS.index(layer(target)) > LAYERS.index(layer(module))]


def code_lines(lines: list[str], function: ast.AST) -> int:
    """Lines of a function that hold code: not blank, not a comment, not its docstring."""
    body = function.body
    docstring = set()
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        docstring = set(range(body[0].lineno, body[0].end_lineno + 1))
    return sum(1 for number in range(function.lineno, function.end_lineno + 1)
               if number not in docstring and lines[number - 1].strip()
               and not lines[number - 1].strip().startswith("#"))


def oversized(modules: dict[str, Path]) -> list[str]:
    found = []
    for module, path in modules.items():
        text = path.read_text()
        lines = text.splitlines()
        if len(lines) > MAX_MODULE_LINES:
            found.append(f"{module}: {len(lines)} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                count = code_lines(lines, node)
                if count > MAX_FUNCTION_LINES:
                    found.append(f"{module}.{node.name}: {count} code lines")
    return found


def local_imports(modules: dict[str, Path]) -> list[str]:
    """Function-local imports of mixmask modules. Only the CLI has them: it imports a
    command's modules when that command runs, so ``mixmask --help`` starts at once."""
    return [f"{module} -> {target}" for module, path in modules.items() if module != "mixmask.cli"
            for target, is_local in imports(path, modules) if is_local]


def backbone_name_lists(modules: dict[str, Path]) -> list[str]:
    """Collections of two or more backbone names outside the backbone registry: a method
    asks a backbone for a capability (models.backbones.BackboneTraits), never for its
    name."""
    from mixmask.models.backbones import backbone_names

    names = set(backbone_names())
    found = []
    for module, path in modules.items():
        if module.startswith("mixmask.models"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
                items = node.keys if isinstance(node, ast.Dict) else node.elts
                listed = {item.value for item in items
                          if isinstance(item, ast.Constant) and item.value in names}
                if len(listed) >= 2:
                    found.append(f"{module}:{node.lineno} {sorted(listed)}")
    return found


# --------------------------------------------------------------------------- the package


def test_the_package_has_at_most_13_entries_at_its_top_level():
    entries = sorted(path.name for path in PACKAGE.iterdir()
                     if path.name != "__pycache__" and not path.name.endswith(".egg-info"))
    assert len(entries) <= MAX_TOP_LEVEL, entries


def test_no_import_cycle_and_no_function_local_import_outside_the_cli():
    modules = python_modules()
    assert cycles(import_graph(modules)) == []
    assert local_imports(modules) == []


def test_the_layers_import_downwards_only():
    assert upward_imports(python_modules()) == []


def test_no_module_over_500_lines_and_no_function_over_80_code_lines():
    assert oversized(python_modules()) == []


def test_a_method_family_never_imports_another_familys_modules():
    modules = python_modules()
    crossing = [f"{module} -> {target}" for module, targets in import_graph(modules).items()
                for target in targets
                for own, other in (("siamese", "mim"), ("mim", "siamese"))
                if module.startswith(f"mixmask.methods.{own}")
                and target.startswith(f"mixmask.methods.{other}")]
    assert crossing == []


def test_no_list_of_backbone_names_outside_the_registry():
    assert backbone_name_lists(python_modules()) == []


# --------------------------------------------------------------------------- the guards bite


@pytest.fixture
def broken_tree(tmp_path: Path) -> dict[str, Path]:
    """A made-up mixmask: ops imports train (upward), train and eval import each other at
    module level, runs imports ops inside a function, one function is 81 lines long, and
    methods lists two backbone names."""
    package = tmp_path / "mixmask"
    files = {
        "__init__.py": "",
        "ops/__init__.py": "",
        "ops/tensors.py": "from mixmask.train.loop import fit\n",
        "train/__init__.py": "",
        "train/loop.py": "from mixmask.eval.knn import knn\n\n\ndef fit():\n    pass\n",
        "eval/__init__.py": "",
        "eval/knn.py": "from mixmask.train.loop import fit\n\n\ndef knn():\n    pass\n",
        "runs/__init__.py": "",
        "runs/folder.py": "def load():\n    from mixmask.ops.tensors import x\n",
        "models/__init__.py": "",
        "models/long.py": "def long():\n" + "    x = 1\n" * 80,  # 81 with the def
        "methods/__init__.py": "",
        "methods/pick.py": "KNOWN = ('resnet18', 'vit_tiny')\n",
    }
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    return {module_name(path, tmp_path): path for path in package.rglob("*.py")}


def test_the_guards_catch_a_tree_that_breaks_each_rule(broken_tree):
    assert cycles(import_graph(broken_tree)) == [["mixmask.eval.knn", "mixmask.train.loop"]]
    assert "mixmask.ops.tensors -> mixmask.train.loop" in upward_imports(broken_tree)
    assert local_imports(broken_tree) == ["mixmask.runs.folder -> mixmask.ops.tensors"]
    assert oversized(broken_tree) == ["mixmask.models.long.long: 81 code lines"]
    assert backbone_name_lists(broken_tree) == ["mixmask.methods.pick:1 ['resnet18', 'vit_tiny']"]
