"""The three layers import in one direction: core (math) <- methods <- common (harness).

Read from the import statements of every module (lazy imports inside functions included), so a shortcut
upward fails here before a reader has to find it."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("core", "methods", "common")  # each may import only the layers before it
ALLOWED = {"core": {"core"}, "methods": {"core", "methods"}, "common": {"core", "methods", "common"}}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_packages(path: Path) -> set[str]:
    """Top-level packages of this project that `path` imports, relative imports resolved."""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                found.add(base[0] if base else "")
            elif node.module:
                found.add(node.module.split(".")[0])
    return found & set(LAYERS)


def _modules(layer: str) -> list[Path]:
    return sorted((ROOT / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", LAYERS)
def test_no_module_imports_upward(layer):
    assert _modules(layer), f"{layer}/ has no modules"
    upward = {str(p.relative_to(ROOT)): sorted(_imported_packages(p) - ALLOWED[layer]) for p in _modules(layer)}
    assert not {k: v for k, v in upward.items() if v}, upward


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """A wrong checker would pass everything: a core module importing the harness must be caught, relative too."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "core" / "sub").mkdir(parents=True)
    absolute = tmp_path / "core" / "a.py"
    absolute.write_text("def f():\n    from common.config import load_config\n")
    relative = tmp_path / "core" / "sub" / "b.py"
    relative.write_text("from .. import conventions\nimport methods.cm\n")
    assert _imported_packages(absolute) == {"common"}
    assert _imported_packages(relative) == {"core", "methods"}
