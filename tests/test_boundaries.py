"""The import graph runs one way: service -> contract <- export <- train.

The serving image holds service/ and contract/ only, and no torch: if service imported train or
export (or anything that pulls torch), it would break there and nowhere else. Two checks: what
importing each package really loads (in a fresh interpreter), and what each module's source
says it imports (so an import inside a function is caught too).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# package -> top-level packages its modules may never import
FORBIDDEN = {
    "service": {"train", "export", "torch"},
    "contract": {"train", "export", "service", "torch"},
}


def modules_of(package: str) -> list[str]:
    """Dotted names of every module in the package folder (optional-runtime ones included)."""
    root = REPO / package
    return sorted(
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for p in root.rglob("*.py")
    )


def loaded_after_importing(modules: list[str]) -> set[str]:
    """Top-level packages in sys.modules after a fresh interpreter imports `modules`."""
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return set(json.loads(r.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_importing_the_package_loads_nothing_forbidden(package: str) -> None:
    loaded = loaded_after_importing(modules_of(package))
    assert package in loaded
    assert not loaded & FORBIDDEN[package], f"{package} pulled in {loaded & FORBIDDEN[package]}"


def imports_of(path: Path) -> set[str]:
    """Top-level packages a module's source imports (absolute imports, anywhere in the file)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_module_source_imports_across_the_boundary(package: str) -> None:
    bad = {
        str(p.relative_to(REPO)): sorted(imports_of(p) & FORBIDDEN[package])
        for p in sorted((REPO / package).rglob("*.py"))
    }
    assert not {k: v for k, v in bad.items() if v}


def test_nothing_imports_a_command_line_entry_point() -> None:
    """`__main__` modules are entry points, not libraries: importing one is how export's
    __main__ and verify_cli came to import each other."""
    offenders = []
    for package in ("contract", "train", "export", "service"):
        for p in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(p.read_text(), str(p))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("__main__"):
                    offenders.append(f"{p.relative_to(REPO)}:{node.lineno}")
    assert not offenders


def test_the_checks_see_a_forbidden_import(tmp_path: Path) -> None:
    """The AST check is not vacuous: a function-level `from train...` import is found."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from train.data import select\n    import torch.nn\n")
    assert imports_of(module) == {"train", "torch"}
