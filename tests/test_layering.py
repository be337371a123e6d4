"""imf_core is the science: importable with torch alone, no orchestration (docs/architecture.md)."""

import subprocess
import sys
from pathlib import Path

import imf_core

FORBIDDEN = ("prefect", "ray", "mlflow", "pyarrow", "diffusers", "torch_fidelity")


def test_imf_core_imports_no_orchestration():
    modules = sorted(
        "imf_core." + ".".join(p.relative_to(Path(imf_core.__file__).parent).with_suffix("").parts)
        for p in Path(imf_core.__file__).parent.rglob("*.py")
        if p.name != "__init__.py"
    )
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
