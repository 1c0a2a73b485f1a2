"""Fake-quant = INT8 on the depthwise families (depthwise convs, squeeze-excite, hard-swish):
timm MobileNetV2, MobileNetV3 and EfficientNet, after QAT and after PTQ, eager and ONNX."""

from __future__ import annotations

import pytest
import torch
from quant_helpers import cnn_loss, logits_of
from test_quant_parity import _check, _onnx_logits

import slimkit
from slimkit.quant import is_int8_layer, run_onnx
from tests.families import train_steps

FAMILIES = {
    "mobilenetv2": ("mobilenetv2_050", {}),
    "mobilenetv3": ("mobilenetv3_small_050", {}),
    "efficientnet": ("efficientnet_b0", {"drop_path_rate": 0.0}),
}


@pytest.mark.parametrize("mode", ["qat", "ptq"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_depthwise_families_int8_and_onnx_agree_with_fake_quant(family, mode, tmp_path):
    timm = pytest.importorskip("timm")
    name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(4)]
    # a few float steps first: random weights give nearly tied logits, whose argmax any rounding flips
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(12):
        x, y = batches[step % 4]
        cnn_loss(model, (x, y)).backward()
        optimizer.step()
        optimizer.zero_grad()
    recipe = {"quant": {"mode": mode, "compile": "never", "freeze_observers_step": 2, "freeze_bn_step": 2}}
    if mode == "ptq":
        recipe["quant"] = {"mode": "ptq", "compile": "never"}
    slimkit.prepare(model, recipe, example_inputs=batches[0][0])
    slimkit.calibrate(model, [x for x, _ in batches])
    if mode == "qat":
        train_steps(model, batches, 3, loss=cnn_loss, lr=0.001)
    model.eval()
    held_out = torch.cat([x for x, _ in batches])  # the images the model learned: separated logits
    fake = logits_of(model, held_out)
    int8 = slimkit.convert(model)
    depthwise = [n for n, m in int8.named_modules() if is_int8_layer(m) and getattr(m, "groups", 1) > 1]
    assert depthwise, "the depthwise convs run in INT8"
    _check(f"{name} {mode} fake-quant vs INT8", fake, logits_of(int8, held_out), bound=None)
    onnx = _onnx_logits(int8, held_out, tmp_path)
    try:
        _check(f"{name} {mode} fake-quant vs ONNX", fake, onnx, bound=None)
    except AssertionError as fused_miss:
        # onnxruntime fuses the QDQ pairs into int8 kernels it picks per CPU (on an AMX-INT8 Xeon
        # the PTQ MobileNetV2 misses the mean bound 3.5x, on an AMD EPYC it passed). Run unfused,
        # the graph computes what the export wrote: it must agree, or the export is wrong
        unfused = _unfused_onnx_logits(tmp_path / "model.onnx", held_out)
        top, mean = fake.abs().max().item(), (fake - unfused).abs().mean().item()
        assert mean < 1e-3 * top, f"{name} {mode}: the unfused ONNX graph differs too (mean {mean:.3g}): {fused_miss}"
        pytest.xfail(f"onnxruntime's fused int8 kernels on this CPU ({fused_miss}); unfused, mean {mean:.3g}")


def _unfused_onnx_logits(path, inputs: torch.Tensor) -> torch.Tensor:
    """The exported graph run with onnxruntime's graph optimizations off: every QDQ pair as written."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(run_onnx(session, inputs)[0])
