"""The package layout: the core needs torch only, imports form a stack, and importing changes no other library."""
import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI_MODULES = {"revcol_vit.train", "revcol_vit.validate", "revcol_vit.sweep"}


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_core_imports_neither_timm_nor_fairseq():
    loaded = run_python("import sys, revcol; print(sorted({m.split('.')[0] for m in sys.modules}))")
    assert "timm" not in loaded and "fairseq" not in loaded and "revcol_vit" not in loaded


def imported_modules(path: Path, package: str):
    """Absolute names of the modules a file imports, relative imports resolved against ``package``."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = f"{package}.{node.module}" if node.level else node.module
            yield base.rstrip(".") if node.module else package


def test_no_library_module_imports_a_cli_module():
    for package in ("revcol", "revcol_fairseq", "revcol_vit"):
        for path in (REPO / package).glob("*.py"):
            module = f"{package}.{path.stem}"
            if module in CLI_MODULES:
                continue
            assert not CLI_MODULES & set(imported_modules(path, package)), module
    assert not {"revcol_vit", "revcol_fairseq"} & {m.split(".")[0] for path in (REPO / "revcol").glob("*.py")
                                                  for m in imported_modules(path, "revcol")}


def test_importing_the_clis_leaves_timm_and_matplotlib_as_they_were():
    code = ("import matplotlib, timm.data.auto_augment as aa; op, backend = aa.NAME_TO_OP['PosterizeIncreasing'], "
            "matplotlib.get_backend(); import revcol_vit.train, revcol_vit.validate, revcol_vit.sweep; "
            "print(aa.NAME_TO_OP['PosterizeIncreasing'] is op, matplotlib.get_backend() == backend)")
    assert run_python(code) == "True True"
