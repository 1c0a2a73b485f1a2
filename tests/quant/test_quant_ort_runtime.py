"""quant.compile "onnxruntime": inference calls of a converted model on an onnxruntime session of
slimkit's QDQ export, one per input signature, with the eager forward's output structure; every
other call, and every signature that cannot be exported or checked, on the eager INT8 kernels."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from quant_helpers import SmallCNN, agreement, int8_small_cnn, logits_of, runtime_paths

import slimkit
import slimkit.quant.onnx_export as onnx_export
from slimkit.quant import ort_runtime, runtime_report, set_compile
from tests.families import hf_model, token_batch

pytest.importorskip("onnxruntime")


def _int8_cnn(seed: int, compile_mode: str = "onnxruntime", model: torch.nn.Module | None = None) -> torch.nn.Module:
    return int8_small_cnn(seed, compile_mode, model)


def _relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    return ((reference - candidate).norm() / reference.norm()).item()


@pytest.fixture
def session_runs(monkeypatch):
    """How many calls ran on an onnxruntime session (the first call of a signature included)."""
    calls = []
    run = ort_runtime.OrtSignature.run

    def counted(self, args, kwargs):
        calls.append(self)
        return run(self, args, kwargs)

    monkeypatch.setattr(ort_runtime.OrtSignature, "run", counted)
    return calls


def test_a_cnn_runs_one_session_per_shape_matching_the_eager_kernels(session_runs):
    model = _int8_cnn(0)
    x = torch.randn(16, 1, 12, 12)
    with torch.no_grad():
        eager = model.forward.eager(x)
    assert runtime_report(model)["compile"] == "onnxruntime" and not runtime_report(model)["compiles"]
    assert torch.equal(logits_of(model, x), eager)  # the first call returns the eager output it checked
    assert runtime_paths(model) == ["onnxruntime"] and len(session_runs) == 1
    with torch.inference_mode():
        out = model(x)
    assert len(session_runs) == 2 and isinstance(out, torch.Tensor) and out.device.type == "cpu"
    assert out.shape == eager.shape and out.dtype == eager.dtype
    # session vs eager INT8 measured 0.013-0.019 relative L2 error on this model (one uint8 step
    # here and there, slimkit/quant/ort_runtime.py); argmaxes all equal
    same, _ = agreement(eager, out)
    assert _relative_error(eager, out) < 0.05 and same >= 0.9
    assert not torch.equal(out, eager)  # onnxruntime's own kernels ran, not the eager ones

    logits_of(model, x[:2])  # another batch size: a session of its own
    logits_of(model, x[:2])
    assert runtime_paths(model) == ["onnxruntime", "onnxruntime"]
    assert len({id(signature) for signature in session_runs}) == 2

    ran = len(session_runs)
    with torch.enable_grad():
        model(x)  # gradients: the eager kernels
    model.train()
    with torch.no_grad():
        model(x)  # training mode: the eager kernels
    assert len(session_runs) == ran and len(runtime_report(model)["signatures"]) == 2


def test_a_tiny_bert_returns_its_model_output_from_the_session(session_runs):
    model = hf_model("bert-base").eval()
    slimkit.prepare(model, {"quant": {"mode": "ptq", "compile": "onnxruntime"}})
    slimkit.calibrate(model, [token_batch(batch=8, seed=i) for i in range(3)])
    int8 = slimkit.convert(model).eval()
    batch = token_batch(batch=4, seed=7)
    with torch.no_grad():
        eager = int8.forward.eager(**batch)
        int8(**batch)
        out = int8(**batch)
        int8(batch["input_ids"], attention_mask=batch["attention_mask"])  # args and kwargs: exported by name
        mixed = int8(batch["input_ids"], attention_mask=batch["attention_mask"])
    assert runtime_paths(int8) == ["onnxruntime", "onnxruntime"] and len(session_runs) == 4
    assert type(out) is type(eager) and list(out.keys()) == list(eager.keys())
    # measured: 1.2e-3 (last_hidden_state), 7e-3 (pooler_output) relative L2 error
    for output in (out, mixed):
        assert _relative_error(eager.last_hidden_state, output.last_hidden_state) < 0.01
        assert _relative_error(eager.pooler_output, output.pooler_output) < 0.05
    assert torch.allclose(out.last_hidden_state, mixed.last_hidden_state, atol=1e-6)


def test_save_load_and_copy_keep_the_mode_and_the_outputs(tmp_path, session_runs, monkeypatch):
    model = _int8_cnn(1)
    x = torch.randn(4, 1, 12, 12)
    logits_of(model, x)
    expected = logits_of(model, x)  # from the session
    folder = slimkit.save_pretrained(model, tmp_path / "m", model_card=True)
    card = (folder / "README.md").read_text()
    assert "onnxruntime session of slimkit's QDQ export" in card and "(quant.compile: onnxruntime)" in card
    assert "ran on 1 input shape(s) before saving: onnxruntime" in card

    again = slimkit.from_pretrained(folder, model=SmallCNN())
    assert runtime_report(again)["compile"] == "onnxruntime"
    logits_of(again, x)
    ran = len(session_runs)
    assert torch.allclose(logits_of(again, x), expected, atol=1e-6) and len(session_runs) == ran + 1

    twin = copy.deepcopy(model)
    assert twin.forward.model is twin and runtime_report(twin)["compile"] == "onnxruntime"
    assert not runtime_report(twin)["signatures"]  # sessions hold the original's weights: built afresh
    logits_of(twin, x)
    assert torch.allclose(logits_of(twin, x), expected, atol=1e-6) and runtime_paths(twin) == ["onnxruntime"]

    # a folder saved in this mode still loads where onnxruntime is missing; its calls run eagerly
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    bare = slimkit.from_pretrained(folder, model=SmallCNN())
    with torch.no_grad():
        assert torch.equal(logits_of(bare, x), bare.forward.eager(x))
    (signature,) = runtime_report(bare)["signatures"]
    assert signature["path"] == "eager" and "pip install 'slimkit[quant]'" in signature["reason"]


class BranchyCNN(SmallCNN):
    """Control flow on a tensor's value: torch.export (and so export_onnx) cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        if x.mean() > 10:
            x = x * 0.5
        x = torch.relu(self.bn2(self.conv2(x)) + x)
        return self.fc(self.pool(torch.relu(self.bn3(self.conv3(x)))).flatten(1))


def test_a_model_the_exporter_cannot_trace_runs_eagerly_with_the_reason(session_runs, monkeypatch):
    model = _int8_cnn(2, model=BranchyCNN())
    x = torch.randn(4, 1, 12, 12)
    with torch.no_grad():
        eager = model.forward.eager(x)
    exports = []
    export = onnx_export.export_onnx
    monkeypatch.setattr(onnx_export, "export_onnx", lambda *a, **k: exports.append(1) or export(*a, **k))
    assert torch.equal(logits_of(model, x), eager)
    assert torch.equal(logits_of(model, x), eager)
    (signature,) = runtime_report(model)["signatures"]
    assert signature["path"] == "eager" and signature["reason"].startswith("onnxruntime: ")
    assert "data-dependent" in signature["reason"].lower() or "guard" in signature["reason"].lower()
    assert len(exports) == 1 and not session_runs  # tried once per signature, never retried

    def broken(*args, **kwargs):
        raise RuntimeError("the exporter broke")

    monkeypatch.setattr(onnx_export, "export_onnx", broken)
    plain = _int8_cnn(3)
    logits_of(plain, x)
    (signature,) = runtime_report(plain)["signatures"]
    assert signature == {
        "inputs": signature["inputs"],
        "path": "eager",
        "int8_kernels": {},
        "reason": "onnxruntime: RuntimeError: the exporter broke",
    }


def test_set_compile_refuses_unconverted_models_unknown_modes_and_missing_packages(monkeypatch):
    with pytest.raises(slimkit.SlimkitError, match="not a converted INT8 model; call slimkit.convert"):
        set_compile(SmallCNN(), "onnxruntime")
    model = _int8_cnn(4, compile_mode="never")
    with pytest.raises(slimkit.SlimkitError, match="expected one of auto, always, never, onnxruntime, got 'ort'"):
        set_compile(model, "ort")
    assert set_compile(model, "onnxruntime") is model and runtime_report(model)["compile"] == "onnxruntime"

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(slimkit.SlimkitError, match=r"set_compile: .*pip install 'slimkit\[quant\]'"):
        set_compile(model, "onnxruntime")
    with pytest.raises(slimkit.SlimkitError, match=r"prepare: .*pip install 'slimkit\[quant\]'"):
        _int8_cnn(4)  # chosen in a recipe: refused at prepare, before any training


def test_models_or_inputs_off_the_cpu_are_refused():
    model = _int8_cnn(5)
    with pytest.raises(slimkit.SlimkitError, match="runs on the CPU.*model.cpu()"):
        ort_runtime.build(model, model.forward.eager, (torch.empty(2, 1, 12, 12, device="meta"),), {})
