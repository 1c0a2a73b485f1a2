"""Parity: the fake-quant model, the converted INT8 model (oneDNN kernels) and its ONNX export
on onnxruntime agree on >= 99% of argmaxes on held-out inputs (with activation sites, swaps of
near-tied logits excepted: see ``near_tie_flips``); the largest logit difference is reported in
every assertion message (and printed with ``pytest -s``)."""

from __future__ import annotations

import copy

import pytest
import torch
from quant_helpers import agreement, cnn_loss, convert_copy, logits_of, near_tie_flips
from torch import nn
from torch._dynamo.utils import counters

import slimkit
from slimkit.quant import int8_hardware, is_int8_layer, onnx_session, run_onnx
from slimkit.quant.state import state_of
from tests.families import hf_model, token_batch, train_steps


def _check(name: str, reference: torch.Tensor, candidate, bound: float | None = 1e-3) -> None:
    """``bound``: on the largest logit difference; None for models with activation sites, where
    the bound is relative (see below)."""
    same, diff = agreement(reference, candidate)
    # with activation sites a rare one-step rounding flip (below) moves logits by a few hundredths,
    # and can swap two logits closer than that: a near-tie (PTQ MobileNetV3's ONNX run: gap 0.023,
    # another sample moved 0.038; the graph bit-equal on 61 of 64 samples, unfused = fused to
    # 4e-6) is no disagreement on what the model decides
    ties = near_tie_flips(reference, candidate) if bound is None else 0.0
    print(f"\n{name}: argmax agreement {same:.4f} (+{ties:.4f} near-ties), largest logit difference {diff:.3g}")
    assert same + ties >= 0.99, (
        f"{name}: argmax agreement {same:.4f} (+{ties:.4f} near-ties) < 0.99 (largest logit difference {diff:.3g})"
    )
    if bound is not None:
        assert diff < bound, f"{name}: largest logit difference {diff:.3g} >= {bound}"
        return
    # With sites between layers every conv output is rounded to uint8 again. Kernels sum in a
    # different order (int32 in oneDNN / onnxruntime, fp32 in the fake-quant model) and
    # onnxruntime requantizes with one fused multiplier, so a value within float error of a
    # rounding boundary can land one uint8 step away and carry that step to the logits of its
    # sample: rare, one step large. So: a few percent of the logit range at most, and on
    # average (every other logit exact) far less. With 7-bit weights (quant.weights.bits: auto on
    # a CPU without VNNI) twice that: each weight step is twice as large, and deep nets amplify a
    # flip (PTQ MobileNetV2-0.5 on an AVX2 EPYC: bit-equal through the first four convs, then
    # 5e-5 growing about 1.3x per layer, to 8% of the largest logit on one sample and 0.12% on
    # average). A broken kernel is far outside either: 8-bit weights saturating that CPU's
    # kernels gave 65% of the largest logit.
    reference, candidate = torch.as_tensor(reference), torch.as_tensor(candidate)
    top = reference.abs().max().item()
    mean = (reference - candidate).abs().mean().item()
    wide = 2.0 if int8_hardware.auto_weight_bits() == 7 else 1.0
    assert diff < 0.05 * wide * top, (
        f"{name}: largest logit difference {diff:.3g} >= {5 * wide:g}% of the largest logit {top:.3g}"
    )
    assert mean < 1e-3 * wide * top, (
        f"{name}: mean logit difference {mean:.3g} >= {0.1 * wide:g}% of the largest logit {top:.3g}"
    )


def _onnx_logits(model, inputs, tmp_path):
    path = slimkit.export_onnx(model, tmp_path / "model.onnx", inputs)
    return torch.from_numpy(run_onnx(onnx_session(path, threads=2), inputs)[0])


def test_only_a_flip_within_its_own_rounding_counts_as_a_near_tie():
    """The parity check excuses a swapped argmax only where the reference's top two logits are
    closer than the swap's own logit change could bridge; a flip of a decided sample fails."""
    reference = torch.tensor([[1.00, 0.98, 0.0]] + [[3.0, 0.0, 0.0]] * 63)
    candidate = reference.clone()
    candidate[2, 1] = 0.03  # rounding noise on a sample that keeps its argmax
    tie = candidate.clone()
    tie[0, :2] = torch.tensor([0.985, 0.995])  # a 0.02 gap closed: within that noise
    assert near_tie_flips(reference, tie) == pytest.approx(1 / 64)
    _check("near tie", reference, tie, bound=None)
    decided = candidate.clone()
    decided[1, :2] = torch.tensor([2.9, 3.1])  # a gap of 3.0 swapped: no rounding does that
    assert near_tie_flips(reference, decided) == 0.0
    with pytest.raises(AssertionError, match="argmax agreement 0.9844"):
        _check("decided", reference, decided, bound=None)


def test_small_cnn_qat_int8_and_onnx_agree_with_fake_quant(qat_cnn, cnn_data, tmp_path):
    _, held_out = cnn_data
    fake = logits_of(qat_cnn, held_out)
    int8 = convert_copy(qat_cnn)
    assert type(int8).__name__ == "SmallCNN"
    assert all(is_int8_layer(getattr(int8, n)) for n in ("conv1", "conv2", "conv3", "fc"))
    _check("SmallCNN fake-quant vs INT8", fake, logits_of(int8, held_out), bound=None)
    _check("SmallCNN fake-quant vs ONNX", fake, _onnx_logits(int8, held_out, tmp_path), bound=None)


def test_timm_resnet18_qat_int8_and_onnx(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    recipe = {"quant": {"freeze_observers_step": 2, "freeze_bn_step": 2, "compile": "never"}}  # eager kernels
    slimkit.prepare(model, recipe, example_inputs=batches[0][0])
    assert len(slimkit.methods_of(model)["quant"].folded) == 20  # every conv of resnet18 has its BN
    train_steps(model, batches, 3, loss=cnn_loss, lr=0.01)
    held_out = torch.randn(64, 3, 32, 32, generator=g)
    fake = logits_of(model, held_out)
    int8 = slimkit.convert(model)
    assert type(int8).__name__ == "ResNet"
    _check("resnet18 fake-quant vs INT8", fake, logits_of(int8, held_out), bound=None)
    _check("resnet18 fake-quant vs ONNX", fake, _onnx_logits(int8, held_out, tmp_path), bound=None)


def _lm_loss(model, batch):
    return model(**batch, labels=batch["input_ids"]).loss


def _cls_loss(model, batch):
    labels = batch["input_ids"][:, 0] % 3
    return model(**batch, labels=labels).loss


@pytest.mark.parametrize(
    ("factory", "loss", "mode"),
    [("bert", _cls_loss, "qat"), ("gpt2", _lm_loss, "qat"), ("bert", _cls_loss, "dynamic")],
    ids=["bert-qat", "gpt2-qat", "bert-dynamic"],
)
def test_hf_models_int8_and_onnx(factory, loss, mode, tmp_path):
    model = hf_model(factory).eval()
    slimkit.prepare(model, {"quant": {"mode": mode, "freeze_observers_step": 3}})
    batches = [token_batch(batch=4, seed=i) for i in range(3)]
    train_steps(model, batches, 4, loss=loss, lr=1e-3)
    held_out = token_batch(batch=16, length=10, seed=99)
    fake = logits_of(model, held_out)
    int8 = slimkit.convert(model)
    layers = [n for n, m in int8.named_modules() if is_int8_layer(m)]
    assert layers and all(int8.get_submodule(n).weight.dtype == torch.int8 for n in layers)
    name = f"{type(int8).__name__} ({mode})"
    _check(f"{name} fake-quant vs INT8", fake, logits_of(int8, held_out))
    _check(f"{name} fake-quant vs ONNX", fake, _onnx_logits(int8, held_out, tmp_path))


def test_gpt2_keeps_the_tied_lm_head_in_float():
    model = hf_model("gpt2").eval()
    slimkit.prepare(model, {"quant": {}})
    quantizer = slimkit.methods_of(model)["quant"]
    assert quantizer.skipped_tied == ["transformer.wte", "lm_head"]  # embeddings on by default: wte is tied too
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "QATConv1D"
    assert isinstance(model.lm_head, nn.Linear) and not hasattr(model.lm_head, "input_quantizer")


def test_compiled_int8_model_equals_eager(qat_cnn, cnn_data):
    _, held_out = cnn_data
    int8 = convert_copy(qat_cnn)
    eager = logits_of(int8, held_out)
    compiled = slimkit.quant.compile_int8(int8)
    assert compiled is int8 and type(compiled).__name__ == "SmallCNN"
    counters.clear()
    with torch.inference_mode():
        out = compiled(held_out)
    _check("SmallCNN INT8 eager vs compiled", eager, out, bound=None)
    # every conv and the Linear were lowered to oneDNN int8 kernels, ReLUs fused into two convs
    assert counters["inductor"]["qconv_weight_prepack_matcher_count"] == 3
    assert counters["inductor"]["qlinear_weight_prepack_matcher_count"] == 1
    assert counters["inductor"]["qconv_unary_matcher_count"] >= 2
    report = slimkit.quant.runtime_report(compiled)
    assert [s["path"] for s in report["signatures"]] == ["compiled"]
    assert report["signatures"][0]["int8_kernels"] == {"conv2d": 3, "linear": 1}
    # with gradients on, the eager INT8 kernels run (frozen graphs are for inference only)
    assert torch.allclose(compiled(held_out[:3]), eager[:3], atol=1e-4)
    assert len(slimkit.quant.runtime_report(compiled)["signatures"]) == 1


def test_int8_layers_run_onednn_int8_kernels_not_float_convolutions(qat_cnn, cnn_data):
    _, held_out = cnn_data
    int8 = slimkit.quant.set_compile(convert_copy(qat_cnn), "never")
    with torch.no_grad(), torch.profiler.profile() as profile:
        int8(held_out[:8])
    ops = {event.name for event in profile.events()}
    assert "onednn::qconv2d_pointwise" in ops and "onednn::qlinear_pointwise" in ops
    assert not ops & {"aten::conv2d", "aten::convolution", "aten::linear", "aten::addmm", "aten::mm"}


def test_an_int8_model_that_has_run_can_be_copied(qat_cnn, cnn_data):
    _, held_out = cnn_data
    int8 = convert_copy(qat_cnn)
    before = logits_of(int8, held_out)  # prepacks the oneDNN weights (opaque tensors, not copyable)
    twin = copy.deepcopy(int8)
    assert state_of(twin.conv1).int8.cache.packed is None and state_of(int8.conv1).int8.cache.packed is not None
    assert torch.equal(logits_of(twin, held_out), before)
    with torch.no_grad():
        twin.conv1.weight.zero_()  # the copy owns its weights: the original is untouched
    assert torch.equal(logits_of(int8, held_out), before)
