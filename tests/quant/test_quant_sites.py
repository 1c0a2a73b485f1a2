"""Activation sites between layers (``quant.conv_outputs``): where they go on a timm resnet18,
and that the converted model, its ONNX export and a saved folder all keep them (parity of the
fake-quant model with the INT8 and ONNX models is in test_quant_parity.py)."""

from __future__ import annotations

import collections
import json

import pytest
import torch
from quant_helpers import SmallCNN, logits_of

import slimkit
from slimkit.quant import is_int8_layer, onnx_session, run_onnx
from slimkit.quant.sites import read_by_layers_only, site_of
from slimkit.quant.state import state_of

BLOCKS = [f"layer{stage}.{block}" for stage in range(1, 5) for block in range(2)]


def _resnet18():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=10).eval()


def _ptq(model, x, **quant):
    slimkit.prepare(model, {"quant": {"mode": "ptq", **quant}}, example_inputs=x)
    slimkit.calibrate(model, [x])
    return model


def test_resnet18_sites_cover_conv_outputs_and_residual_adds():
    model = _ptq(_resnet18(), torch.randn(4, 3, 32, 32))
    quantizer = slimkit.methods_of(model)["quant"]
    plan = quantizer.plan
    # stem ReLU, per block: ReLU after conv1, conv2 output (an add operand), ReLU after the add;
    # the three downsample convs (the other add operand); max-pool passes the stem's qparams on
    assert len(plan.sites) == 1 + 3 * len(BLOCKS) + 3 + 1
    assert plan.sites["act1"].share is None and plan.sites["maxpool"].share == "act1"
    for block in BLOCKS:
        assert plan.sites[f"{block}.act2"].where == "output", f"{block}: the residual add is not quantized"
        assert f"{block}.bn2" in plan.sites and f"{block}.act1" in plan.sites
    assert {f"layer{s}.0.downsample.1" for s in (2, 3, 4)} <= set(plan.sites)
    # every conv but the stem reads a site's uint8 tensor; the stem conv and fc quantize their own input
    assert len(plan.inputs) == 19 and set(plan.inputs.values()) <= {("site", n) for n in plan.sites}
    assert plan.inputs["layer2.0.conv1"] == plan.inputs["layer2.0.downsample.0"] == ("site", "layer1.1.act2")
    assert "input_quantizer" in model.conv1._modules and "input_quantizer" in model.fc._modules
    assert "input_quantizer" not in model.layer1[0].conv1._modules
    assert len(quantizer.quantizers) == 2 + len(plan.sites) - 1  # the pass-through site has none

    int8 = slimkit.convert(model)
    assert site_of(int8.layer1[0].act2) == "output" and site_of(int8.layer1[0].bn2) == "output"
    assert float(int8.layer1[0].act1.output_zero_point) == 0, "a ReLU output's range starts at 0"
    assert int8.maxpool.output_scale == int8.act1.output_scale
    assert int8.layer1[0].conv1.input_scale == int8.maxpool.output_scale


def test_conv_outputs_false_quantizes_layer_inputs_only():
    model = _ptq(_resnet18(), torch.randn(4, 3, 32, 32), conv_outputs=False)
    quantizer = slimkit.methods_of(model)["quant"]
    assert not quantizer.plan.sites and len(quantizer.quantizers) == 21
    int8 = slimkit.convert(model)
    assert not any(site_of(m) for m in int8.modules())


def test_small_cnn_residual_add_is_a_site():
    x = torch.randn(8, 1, 12, 12)
    model = _ptq(SmallCNN(), x)
    plan = slimkit.methods_of(model)["quant"].plan
    # conv1 -> bn1 -> relu feeds conv2 and the add: its site is on bn1 (the functional ReLU keeps
    # values on its grid); the add (functional) is read by relu -> conv3, whose input quantizer
    # covers it; conv3 -> bn3 -> relu is quantized where it enters the pool
    assert plan.sites.keys() == {"bn1", "bn2", "pool"}
    assert plan.sites["pool"].where == "input" and plan.sites["bn2"].where == "output"
    assert plan.inputs == {"conv2": ("grid", "bn1")}
    assert "input_quantizer" in model.conv3._modules and "input_quantizer" not in model.conv2._modules
    int8 = slimkit.convert(model)
    assert site_of(int8.pool) == "input" and int8.conv2.input_scale == int8.bn1.output_scale


def test_onnx_export_keeps_uint8_between_layers(tmp_path):
    onnx = pytest.importorskip("onnx")
    x = torch.randn(4, 3, 32, 32)
    int8 = slimkit.convert(_ptq(_resnet18(), x))
    path = slimkit.export_onnx(int8, tmp_path / "model.onnx", x)
    session = onnx_session(path, threads=2)
    expected = logits_of(int8, x)
    same = (torch.from_numpy(run_onnx(session, x)[0]).argmax(-1) == expected.argmax(-1)).float().mean()
    assert same == 1.0
    ops = _optimized_ops(onnx, path, tmp_path)
    # onnxruntime fuses every conv (ReLU included) and every residual add into uint8 kernels, and
    # the classifier (its bias exported as int32) into QGemm
    assert ops["QLinearConv"] == 20 and ops["QLinearAdd"] == 8 and ops["QGemm"] == 1, ops
    assert not {"Conv", "FusedConv", "Add", "Relu", "Gemm"} & set(ops), ops
    onnx_logits = torch.from_numpy(run_onnx(session, x)[0])
    error = (onnx_logits - expected).abs().max()
    assert error <= 1e-3 * expected.abs().max(), error


def _optimized_ops(onnx, path, tmp_path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def test_a_bias_too_large_for_int32_is_exported_in_float(tmp_path):
    onnx = pytest.importorskip("onnx")
    x = torch.randn(4, 3, 32, 32)
    int8 = slimkit.convert(_ptq(_resnet18(), x))
    int8.fc.bias[0] = 1e9  # 1e9 / (input_scale * weight_scale) is far past 2**31
    path = slimkit.export_onnx(int8, tmp_path / "model.onnx", x)
    ops = _optimized_ops(onnx, path, tmp_path)
    assert ops["Gemm"] == 1 and "QGemm" not in ops, ops
    assert torch.equal(torch.from_numpy(run_onnx(onnx_session(path), x)[0])[:, 0], torch.full((4,), 1e9))


def test_int8_folder_with_sites_round_trip(tmp_path):
    x = torch.randn(4, 3, 32, 32)
    int8 = slimkit.convert(_ptq(_resnet18(), x))
    expected = logits_of(int8, x)
    folder = slimkit.save_pretrained(int8, tmp_path / "int8")
    block = json.loads((folder / "config.json").read_text())["slimkit"]["quantization"]
    assert block["format"] == 2 and len(block["sites"]) == 29 and block["sites"]["layer1.0.act2"] == "output"
    assert block["layers"]["layer1.0.conv2"] == {"kind": "conv2d", "activations": "static", "input": "site"}
    assert block["layers"]["conv1"] == {"kind": "conv2d", "activations": "static"}

    again = slimkit.from_pretrained(folder)
    assert is_int8_layer(again.layer1[0].conv2) and site_of(again.layer4[1].act2) == "output"
    assert again.layer4[1].act2.output_scale == int8.layer4[1].act2.output_scale
    assert torch.equal(logits_of(again, x), expected)


def test_a_site_that_never_ran_is_reported():
    x = torch.randn(4, 3, 32, 32)
    model = _resnet18()
    slimkit.prepare(model, {"quant": {"mode": "ptq"}}, example_inputs=x)
    quantizer = slimkit.methods_of(model)["quant"]
    slimkit.calibrate(model, [x])
    # an add operand (read by no layer) that never saw data
    quantizer.quantizers["layer1.0.bn2.output_quantizer"].observer.observed.zero_()
    with pytest.raises(slimkit.SlimkitError, match="conv_outputs"):
        slimkit.convert(model)


def test_compiled_resnet18_runs_every_conv_with_a_uint8_output():
    from torch._dynamo.utils import counters

    x = torch.randn(4, 3, 32, 32)
    int8 = slimkit.convert(_ptq(_resnet18(), x))
    eager = logits_of(int8, x)
    slimkit.quant.compile_int8(int8)
    counters.clear()
    with torch.inference_mode():
        out = int8(x)
    assert torch.equal(out.argmax(-1), eager.argmax(-1))
    # every conv prepacked and lowered with its ReLU and the requantization of its output fused
    assert counters["inductor"]["qconv_weight_prepack_matcher_count"] == 20
    assert counters["inductor"]["qconv_unary_lower_count"] == 20
    assert counters["inductor"]["qmaxpool2d_matcher_count"] == 1


def test_eager_int8_skips_sites_that_only_int8_layers_read():
    x = torch.randn(4, 3, 32, 32)
    model = _ptq(_resnet18(), x)
    plan = slimkit.methods_of(model)["quant"].plan
    only_layers = {name for name, site in plan.sites.items() if site.read_by_layers_only}
    # a block's inner ReLU feeds only its conv2, and a stage's last output only the next stage's
    # conv1 and downsample conv; every other add output also feeds an add (identity shortcut) or
    # the head, the stem's ReLU feeds the max-pool: those are rounded where they are made
    assert only_layers == {f"{block}.act1" for block in BLOCKS} | {f"layer{s}.1.act2" for s in (1, 2, 3)}
    int8 = slimkit.quant.set_compile(slimkit.convert(model), "never")  # the eager kernels are under test
    assert sorted(n for n, m in int8.named_modules() if read_by_layers_only(m)) == sorted(only_layers)

    def rounding_passes(run):
        with torch.inference_mode(), torch.profiler.profile() as profile:
            out = run()
        return out, sum(e.name == "aten::fake_quantize_per_tensor_affine" for e in profile.events())

    skipped, passes = rounding_passes(lambda: int8(x))
    assert passes == len(plan.sites) - len(only_layers)  # only the other sites round in eager
    for name in only_layers:  # round those tensors in a separate pass again
        state_of(int8.get_submodule(name)).site.read_by_layers_only = False
    rounded, passes = rounding_passes(lambda: int8(x))
    assert passes == len(plan.sites)
    # the reading layers quantize with the site's qparams: the same integers either way
    torch.testing.assert_close(skipped, rounded, rtol=0, atol=1e-5)
    assert torch.equal(skipped.argmax(-1), rounded.argmax(-1))


class _SqueezeExcite(torch.nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        nn = torch.nn
        self.reduce, self.act, self.expand = nn.Conv2d(channels, 4, 1), nn.SiLU(), nn.Conv2d(4, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        return x * self.gate(self.expand(self.act(self.reduce(x.mean((2, 3), keepdim=True)))))


class _GatedCNN(torch.nn.Module):
    """SiLU activations and a squeeze-excite block, as in EfficientNet, at toy size."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.SiLU()
        self.conv2, self.bn2, self.act2 = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.SiLU()
        self.se = _SqueezeExcite(16)
        self.conv3, self.fc = nn.Conv2d(16, 8, 1), nn.Linear(8, 10)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.se(self.act2(self.bn2(self.conv2(x))))
        return self.fc(self.conv3(x).mean((2, 3)))


def _smooth_images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=(16, 16), mode="bilinear")


def test_silu_and_squeeze_excite_gates_run_as_int8_sigmoids_and_products(tmp_path):
    """The sigmoid inside each SiLU, the gate's sigmoid and every product of quantized tensors are
    quantized like onnxruntime's quantize_static does, so that onnxruntime runs QLinearSigmoid and
    QLinearMul (float Sigmoid / Mul between Q / DQ nodes made EfficientNet-B0 1.2-1.7x slower);
    the fake-quant, INT8 and ONNX models compute the same roundings, and a folder keeps them."""
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    calibration = [_smooth_images(16, seed) for seed in range(4)]
    model = _GatedCNN().eval()
    _ptq(model, calibration[0])
    slimkit.calibrate(model, calibration)
    plan = slimkit.methods_of(model)["quant"].plan
    assert {n: plan.sites[n].where for n in ("act1", "act2", "se.act")} == dict.fromkeys(
        ("act1", "act2", "se.act"), "gate"
    )
    assert plan.sites["se.gate"].where == "output"  # the squeeze-excite gate's sigmoid
    assert plan.sites["se"].where == "input"  # act2's product, an operand of the gate's product
    assert type(model.act1).__name__ == "GatedSiLU" and "gate_quantizer" in model.act1._modules
    x = _smooth_images(8, 99)
    fake_quant = logits_of(model, x)

    int8 = slimkit.convert(model)
    assert site_of(int8.act1) == "gate" and 0 < float(int8.act1.gate_scale) <= 1 / 255 + 1e-6
    expected = logits_of(int8, x)
    assert (expected - fake_quant).abs().max() <= 1e-4 * fake_quant.abs().max()
    path = slimkit.export_onnx(int8, tmp_path / "model.onnx", x)
    ops = _optimized_ops(onnx, path, tmp_path)
    assert ops["QLinearSigmoid"] == 4 and ops["QLinearMul"] == 4, ops  # 3 SiLUs, the gate; their products
    assert not {"Sigmoid", "Mul", "Conv", "FusedConv"} & set(ops), ops
    onnx_logits = torch.from_numpy(run_onnx(onnx_session(path, threads=2), x)[0])
    assert (onnx_logits - expected).abs().max() <= 2e-2 * expected.abs().max()
    assert (onnx_logits.argmax(-1) == expected.argmax(-1)).all()

    folder = slimkit.save_pretrained(int8, tmp_path / "int8")
    assert json.loads((folder / "config.json").read_text())["slimkit"]["quantization"]["sites"]["act2"] == "gate"
    again = slimkit.from_pretrained(folder, model=_GatedCNN())
    assert type(again.act2).__name__ == "GatedSiLU" and again.act2.gate_scale == int8.act2.gate_scale
    assert torch.equal(logits_of(again, x), expected)


def test_gates_false_keeps_sigmoids_and_products_in_float():
    model = _ptq(_GatedCNN().eval(), _smooth_images(16, 0), gates=False)
    plan = slimkit.methods_of(model)["quant"].plan
    assert not {"act1", "act2", "se.act", "se.gate", "se"} & set(plan.sites), plan.sites
    assert type(model.act1) is torch.nn.SiLU
    assert {"bn1", "bn2"} <= set(plan.sites)  # the conv outputs still are sites
