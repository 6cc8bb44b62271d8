"""Slicer 5.6 and 5.8 run the extension on Python 3.9: the code that runs inside Slicer (the core, RadiomicGANLib,
the modules) must not use what only 3.10+ understands. ``make test-py39`` runs the tests themselves under a real
CPython 3.9; this check is the quick guard of the main suite, and keeps pyproject, README and code in agreement."""

from __future__ import annotations

import ast
import re

import pytest
from helpers import REPO

SLICER_SIDE = sorted([*REPO.glob("radiomicgan/*.py"), *REPO.glob("RadiomicGANLib/*.py"),
                      *REPO.glob("RadiomicGANHarmonize/*.py"), *REPO.glob("RadiomicGANTrain/*.py")])
# names of the standard library that appeared in 3.10 or later (attribute, keyword or import)
NEWER_ATTRIBUTES = {"pairwise", "batched", "StrEnum", "TaskGroup", "ExceptionGroup", "file_digest", "bit_count",
                    "hardlink_to", "TypeAlias", "ParamSpec", "Self", "LiteralString", "assert_never", "UTC"}
NEWER_MODULES = {"tomllib"}
NEWER_KEYWORDS = {("zip", "strict"), ("dataclass", "slots"), ("dataclass", "kw_only"), ("field", "kw_only")}


def _bitor_inside(node) -> bool:
    return any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(node))


def python310_constructs(source: str) -> list[str]:
    """What in ``source`` fails at run time (or does not parse) on Python 3.9."""
    found = []
    try:
        ast.parse(source, feature_version=(3, 9))  # match statements, parenthesised context managers, ...
    except SyntaxError as exc:
        return [f"line {exc.lineno}: 3.10+ syntax ({exc.msg})"]  # (an interpreter older than 3.10 cannot parse on)
    tree = ast.parse(source)
    postponed = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and any(a.name == "annotations" for a in n.names)
                    for n in tree.body)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            if name in ("isinstance", "issubclass") and len(node.args) == 2 and _bitor_inside(node.args[1]):
                found.append(f"line {node.lineno}: {name}(x, A | B)")
            found += [f"line {node.lineno}: {name}({k.arg}=...)" for k in node.keywords if (name, k.arg) in NEWER_KEYWORDS]
        elif isinstance(node, ast.Attribute) and node.attr in NEWER_ATTRIBUTES:
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and (node.module in NEWER_MODULES or any(a.name in NEWER_ATTRIBUTES for a in node.names)):
            found.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Import) and any(a.name in NEWER_MODULES for a in node.names):
            found.append(f"line {node.lineno}: import {node.names[0].name}")
        elif not postponed and isinstance(node, (ast.arg, ast.AnnAssign)) and node.annotation is not None and _bitor_inside(node.annotation):
            found.append(f"line {node.lineno}: annotation with | evaluated at run time")
        elif not postponed and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None and _bitor_inside(node.returns):
            found.append(f"line {node.lineno}: return annotation with | evaluated at run time")
    for node in tree.body:  # module-level type aliases: Alias = int | None
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.BinOp) and isinstance(node.value.op, ast.BitOr) \
                and any(isinstance(side, ast.Constant) and side.value is None for side in (node.value.left, node.value.right)):
            found.append(f"line {node.lineno}: type alias with |")
    return found


def test_the_check_finds_what_python39_rejects():
    assert python310_constructs("isinstance(x, list | tuple)")
    assert python310_constructs("def f(a: int | None): pass")
    assert not python310_constructs("from __future__ import annotations\ndef f(a: int | None): pass")
    assert python310_constructs("match x:\n    case 1:\n        pass\n")
    assert python310_constructs("for a, b in zip(x, y, strict=True): pass")
    assert not python310_constructs("isinstance(x, (list, tuple))\nflags = a | b\n")


@pytest.mark.parametrize("path", SLICER_SIDE, ids=lambda p: str(p.relative_to(REPO)))
def test_code_that_runs_inside_slicer_is_python39(path):
    assert python310_constructs(path.read_text()) == []


def test_pyproject_readme_and_makefile_agree_on_python39():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'requires-python = ">=3\.9"', pyproject)
    readme = (REPO / "README.md").read_text()
    assert "Python 3.9" in readme and "make test-py39" in readme
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^test:.*\n(\t.*\n)*\t\$\(MAKE\).*test-py39", makefile, re.M), "make test runs the 3.9 stage"
