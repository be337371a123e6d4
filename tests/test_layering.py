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


STAGES = ("tasks.precompute", "tasks.train", "tasks.evaluate", "tasks.inrun_eval")


def test_the_experiment_config_is_composed_below_the_stages():
    """tasks.config composes the experiment from tasks.schema's sections: loading a config
    imports no stage (nor Ray, MLflow or Prefect), so any stage can name the experiment type."""
    code = (
        "import sys\nfrom tasks.config import load_config\nload_config('smoke')\n"
        f"print(sorted(m for m in sys.modules if m in {STAGES!r} "
        "or m.split('.')[0] in ('ray', 'mlflow', 'prefect')))"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    assert out.stdout.strip() == "[]", out.stdout
