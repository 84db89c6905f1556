"""docs/design.md: the dependency is one-way (mla -> kernels -> triton): no file under kernels/ imports mla."""

from __future__ import annotations

import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[1] / "kernels"


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """Every absolute module an ``import`` / ``from ... import`` names, function-local ones included."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append((node.lineno, node.module or ""))
    return found


def test_kernels_never_import_mla():
    files = sorted(KERNELS.rglob("*.py"))
    assert len(files) >= 6, files
    offenders = [f"{f.relative_to(KERNELS.parent)}:{line}: {mod}"
                 for f in files for line, mod in _imported_modules(ast.parse(f.read_text(), filename=str(f)))
                 if mod == "mla" or mod.startswith("mla.")]
    assert not offenders, "kernels/ must not import mla:\n" + "\n".join(offenders)


def test_the_check_sees_function_local_imports():
    tree = ast.parse("def f():\n    from mla.functional import x\n    import mla.reference as r\n")
    assert [m for _, m in _imported_modules(tree)] == ["mla.functional", "mla.reference"]
