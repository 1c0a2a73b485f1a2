"""``import slimkit`` / ``slimkit.quant`` stay light: torch and safetensors only."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("timm", "transformers", "accelerate", "torchao", "onnx", "onnxruntime", "onnxscript")


def test_importing_slimkit_and_its_quant_package_imports_no_heavy_library():
    code = f"import sys, slimkit, slimkit.quant; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported at import time: {out.stdout.strip()}"


def test_public_names():
    import slimkit
    import slimkit.quant

    # slimkit.calibrate hands the batches to every method that uses them (quant's ranges included)
    assert slimkit.calibrate is slimkit.calibration.calibrate is slimkit.quant.calibrate
    assert slimkit.export_onnx is slimkit.quant.export_onnx
    assert {"Quantizer", "calibrate", "compile_int8", "export_onnx"} <= set(slimkit.quant.__all__)
