"""Imports go one way: kernels import no comfy; nodes import no kernels; __init__ defines no V1 mappings."""
import ast
from pathlib import Path

PACK = Path(__file__).resolve().parents[1]


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, 0
        elif isinstance(node, ast.ImportFrom):
            yield node.module or "", node.level


def test_kernels_import_no_comfy():
    for path in (PACK / "kernels").glob("*.py"):
        for name, level in _imports(path):
            assert not (level == 0 and name.split(".")[0] in {"comfy", "comfy_api", "comfy_extras", "nodes",
                                                                "folder_paths"}), f"{path.name} imports {name}"
            assert not (level >= 2), f"{path.name} reaches outside kernels/ ({name})"


def test_nodes_import_no_kernels():
    for path in (PACK / "nodes").glob("*.py"):
        for name, level in _imports(path):
            assert not (level >= 2 and name.startswith("kernels")), f"{path.name} imports kernels directly"


def test_no_v1_mappings_in_entry_point():
    src = (PACK / "__init__.py").read_text()
    assert "NODE_CLASS_MAPPINGS" not in src and "comfy_entrypoint" in src


def test_no_eval_or_exec_anywhere():
    for path in PACK.rglob("*.py"):
        if ".venv" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in {"eval", "exec"}, f"{path} calls {node.func.id}"
