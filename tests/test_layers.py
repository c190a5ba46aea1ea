"""The layers of the package only look down.

`kvpress/` (the core) is checked by import-linter's contracts in pyproject.toml (TYPE_CHECKING imports
included). The three folders mapped into the namespace (`policies/` -> `kvpress.policies`,
`triton_kernels/`, `longbench/`) lie outside `kvpress/`, where import-linter's graph does not reach,
so their rules are checked here from each module's imports: the kernels import nothing of the
library but their references, policies import the core but never the spec parser, the command or the
harness, and the harness never imports the command."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# folder -> (its package, the kvpress modules it may not import: a name or a package prefix)
MAPPED = {
    "policies": ("kvpress.policies", ("kvpress.spec", "kvpress.cli", "kvpress.longbench")),
    "longbench": ("kvpress.longbench", ("kvpress.cli",)),
}
# the kernels import nothing of the library but themselves and the KIVI references they must match
KERNELS_MAY_IMPORT = ("kvpress.triton_kernels", "kvpress.kivi")


def imported_names(path: Path, package: str) -> list[str]:
    """Every module `path` imports (relative imports resolved against `package`), at any depth."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base_parts = (parts[: len(parts) - node.level + 1] if node.level else []) + (
                [node.module] if node.module else [])
            base = ".".join(base_parts)
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return names


def forbidden_imports(folder: str) -> list[str]:
    if folder == "triton_kernels":
        package = "kvpress.triton_kernels"

        def forbidden(name):
            return name.startswith("kvpress.") and not any(
                name == allowed or name.startswith(allowed + ".") for allowed in KERNELS_MAY_IMPORT)
    else:
        package, banned = MAPPED[folder]

        def forbidden(name):
            return any(name == bad or name.startswith(bad + ".") for bad in banned)
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for name in imported_names(path, package):
            if forbidden(name):
                found.append(f"{path.relative_to(ROOT)} imports {name}")
    return found


@pytest.mark.parametrize("folder", [*sorted(MAPPED), "triton_kernels"])
def test_mapped_packages_import_only_downward(folder):
    assert forbidden_imports(folder) == []


def test_the_rule_sees_an_upward_import(tmp_path, monkeypatch):
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "bad.py").write_text("from kvpress.spec import parse_value\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert forbidden_imports("policies") == ["policies/bad.py imports kvpress.spec",
                                             "policies/bad.py imports kvpress.spec.parse_value"]


def test_core_layers_contract_is_kept():
    command = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert command, "import-linter is a dev dependency: pip install -e '.[dev]'"
    result = subprocess.run([command, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout
