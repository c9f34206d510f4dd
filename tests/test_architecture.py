"""The package's shape, checked from its source with ast (nothing is imported): small modules and functions, MLflow
only where registration and search live, folders that import only downwards, self-explaining names.

Each check is a function from a source tree to its violations; the tests run them on src/finetune (no violation
allowed) and on a small broken tree (each check must catch its breach), so a check cannot silently pass.
"""

from __future__ import annotations

import ast
import re
import sys
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "finetune"

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80

# The layers, top to bottom: a module imports only from its own folder or from a lower layer. registry and
# reporting share a layer and must not import each other (the card and the report are rendered without MLflow; the
# registry uploads what reporting rendered, handed over by the register stage).
LAYERS = [("cli",), ("cluster",), ("tuning",), ("stages",), ("monitoring",), ("serving",), ("registry", "reporting"),
          ("training",),
          ("tasks",),
          ("common",)]
RANK = {folder: len(LAYERS) - i for i, names in enumerate(LAYERS) for folder in names}

# Only these folders may import mlflow: registry/ is the only code that registers (its two pyfunc model files are
# self-contained: MLflow loads them without this package), tuning/ logs the search's trials.
MLFLOW_FOLDERS = {"registry", "tuning"}

# stages/tokenize.py shares its name with the standard library's tokenize: kept on purpose, as the verb `tokenize`
# is the module, the CLI subcommand, the dvc.yaml stage and the KFP component name all at once. The package is
# never on sys.path as a flat folder, so it cannot shadow the standard module.
# tasks/token.py likewise: the module of `task: token` (tasks/__init__.py imports it as finetune.tasks.token).
STDLIB_NAME_ALLOWED = {"stages/tokenize.py", "tasks/token.py"}

MODULE_PATH = re.compile(r"^[a-z_]+(\.[a-z_]+)+$")


class Module:
    def __init__(self, root: Path, path: Path):
        self.rel = path.relative_to(root).as_posix()  # "stages/train.py"
        parts = path.relative_to(root).with_suffix("").parts
        self.folder = parts[0]  # "stages"; cli.py is the layer "cli"
        self.package = [root.name, *parts[:-1]]  # what a relative import starts from
        self.source = path.read_text(encoding="utf-8")
        self.tree = ast.parse(self.source, filename=str(path))

    def imports(self, package: str = "finetune") -> list[str]:
        """Every module name this module imports, at the top or inside a function, absolute or relative, and the
        dotted module paths it names in strings (cli.py's table of modules imported when their command runs)."""
        names = []
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_PATH.match(node.value):
                if node.value.split(".")[0] == package:
                    names.append(node.value)
            elif isinstance(node, ast.Import):
                names += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = self.package[:len(self.package) - node.level + 1]
                    base = ".".join([*up, *([base] if base else [])])
                names += [base] + [f"{base}.{a.name}" for a in node.names]
        return names


def modules(root: Path) -> list[Module]:
    return [Module(root, p) for p in sorted(root.rglob("*.py"))]


def folder_of(name: str, package: str) -> str | None:
    """The folder (layer) of an imported name inside the package, or None for anything else."""
    parts = name.split(".")
    if parts[0] != package or len(parts) < 2:
        return None
    return parts[1]


def long_modules(root: Path) -> list[str]:
    return [f"{m.rel}: {len(m.source.splitlines())} lines" for m in modules(root)
            if len(m.source.splitlines()) > MAX_MODULE_LINES]


def long_functions(root: Path) -> list[str]:
    out = []
    for m in modules(root):
        for node in ast.walk(m.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    out.append(f"{m.rel}:{node.lineno} {node.name}: {lines} lines")
    return out


def mlflow_outside_its_folders(root: Path) -> list[str]:
    return [f"{m.rel} imports mlflow" for m in modules(root)
            if m.folder not in MLFLOW_FOLDERS and any(n.split(".")[0] == "mlflow" for n in m.imports())]


def folder_edges(root: Path) -> dict[tuple[str, str], set[str]]:
    """(importer folder, imported folder) -> the importing files, for imports between different folders."""
    edges: dict[tuple[str, str], set[str]] = defaultdict(set)
    for m in modules(root):
        for name in m.imports(root.name):
            target = folder_of(name, root.name)
            if target is not None and target in RANK and target != m.folder:
                edges[(m.folder, target)].add(m.rel)
    return edges


def upward_imports(root: Path) -> list[str]:
    """Imports that do not point down: to a higher layer, or sideways within a layer (registry <-> reporting)."""
    out = [f"{m.rel}: its folder {m.folder!r} is not a layer" for m in modules(root) if m.folder not in RANK]
    for (src, dst), files in sorted(folder_edges(root).items()):
        if src in RANK and RANK[dst] >= RANK[src]:
            out.append(f"{src} -> {dst} ({', '.join(sorted(files))})")
    return out


def folder_cycles(root: Path) -> list[str]:
    graph: dict[str, set[str]] = defaultdict(set)
    for src, dst in folder_edges(root):
        graph[src].add(dst)
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def duplicate_public_functions(root: Path) -> list[str]:
    """Public function names used twice. The task modules (tasks/*.py but __init__) share theirs on purpose: they
    are the seam's contract (tasks/__init__.py), the same functions in every task module."""
    where: dict[str, list[str]] = defaultdict(list)
    for m in modules(root):
        if m.folder == "tasks" and not m.rel.endswith("__init__.py"):
            continue
        for node in m.tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                where[node.name].append(m.rel)
    return [f"{name}: {', '.join(files)}" for name, files in sorted(where.items()) if len(files) > 1]


def stdlib_names(root: Path) -> list[str]:
    return [m.rel for m in modules(root) if Path(m.rel).stem in sys.stdlib_module_names
            and m.rel not in STDLIB_NAME_ALLOWED]


CHECKS = [long_modules, long_functions, mlflow_outside_its_folders, upward_imports, folder_cycles,
          duplicate_public_functions, stdlib_names]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_the_package_keeps_its_shape(check):
    assert check(SRC) == []


def test_the_layers_are_the_package_folders():
    folders = {p.name for p in SRC.iterdir() if p.is_dir() and p.name != "__pycache__"}
    modules_at_top = {p.stem for p in SRC.glob("*.py")}
    assert folders | modules_at_top == set(RANK)


def _broken_tree(tmp_path: Path) -> Path:
    """A package with one breach of every rule."""
    root = tmp_path / "finetune"
    files = {
        "cli.py": "COMMANDS = {'go': 'finetune.stages.run'}\n",
        "common/io.py": "from finetune.training.loop import step\n",  # stdlib name; common -> training: up
        "common/big.py": "x = 1\n" * (MAX_MODULE_LINES + 1),
        "training/loop.py": "from finetune.common import io\n\ndef step():\n" + "    pass\n" * MAX_FUNCTION_LINES,
        "registry/store.py": "import mlflow\nfrom finetune.reporting.card import card\n",  # sideways
        "reporting/card.py": "def card():\n    from mlflow import MlflowClient\n",  # mlflow outside registry/
        "stages/run.py": "from ..training.loop import step\n\ndef go():\n    pass\n\ndef card():\n    pass\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    return root


def test_each_check_catches_its_breach(tmp_path):
    root = _broken_tree(tmp_path)
    assert long_modules(root) == [f"common/big.py: {MAX_MODULE_LINES + 1} lines"]
    assert long_functions(root) == [f"training/loop.py:3 step: {MAX_FUNCTION_LINES + 1} lines"]
    assert mlflow_outside_its_folders(root) == ["reporting/card.py imports mlflow"]
    assert upward_imports(root) == ["common -> training (common/io.py)", "registry -> reporting (registry/store.py)"]
    assert folder_cycles(root) == ["training -> common -> training"]
    assert duplicate_public_functions(root) == ["card: reporting/card.py, stages/run.py"]
    assert stdlib_names(root) == ["common/io.py"]


def test_relative_imports_resolve_to_their_folder(tmp_path):
    root = _broken_tree(tmp_path)
    assert ("stages", "training") in folder_edges(root)
