"""The package layout: plugins/ ships as slimkit.plugins; the core imports no host library."""

import subprocess
import sys
import zipfile

from tests.models import ROOT

HOSTS = ("transformers", "timm", "accelerate", "datasets", "torch_pruning", "torchao", "onnx", "onnxruntime")


def run_python(code: str, **kw) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, **kw).stdout


def test_import_slimkit_imports_no_host_library():
    code = f"import sys, slimkit; print(sorted(m for m in {HOSTS!r} if m in sys.modules))"
    assert run_python(code, cwd="/").strip() == "[]"


def test_editable_install_maps_plugins_into_the_package():
    out = run_python(
        "import importlib.util, slimkit.plugins.hf, slimkit.plugins.timm, slimkit.plugins.accelerate\n"
        "print(slimkit.plugins.hf.__file__); print(importlib.util.find_spec('plugins'))",
        cwd="/",
    ).split()
    assert out[0] == str(ROOT / "plugins" / "hf.py")
    assert out[1] == "None"  # never a bare top-level `plugins`


def test_wheel_ships_plugins_as_slimkit_plugins(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("slimkit-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "slimkit/plugins/hf.py" in names and "slimkit/plugins/timm.py" in names
    assert not any(n.startswith("plugins/") for n in names)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    out = run_python("import slimkit.plugins.hf as m; print(m.__file__)", cwd="/", env={"PYTHONPATH": str(target)})
    assert out.strip() == str(target / "slimkit" / "plugins" / "hf.py")
