"""The converted model's runtime: compiled on first inference call for CNNs (quant.compile),
one graph per input shape and model, eager fallback, saved with the folder; non-finite inputs
refused; ``auto`` keeps the faster of the compiled graph and the onnxruntime session."""

from __future__ import annotations

import copy
import time
import warnings

import pytest
import torch
from quant_helpers import int8_small_cnn, logits_of, runtime_paths

import slimkit
from slimkit.errors import NonFiniteError
from slimkit.quant import runtime_report, set_compile


def _int8_cnn(seed: int, compile_mode: str = "always") -> torch.nn.Module:
    return int8_small_cnn(seed, compile_mode)  # "always": compiled, without auto's onnxruntime race


def test_a_converted_cnn_compiles_itself_per_shape_and_matches_eager():
    model = _int8_cnn(0)
    x = torch.randn(16, 1, 12, 12)
    with torch.no_grad():
        eager = model.forward.eager(x)
    assert runtime_report(model)["compiles"] and not runtime_report(model)["signatures"]
    out = logits_of(model, x)
    assert runtime_paths(model) == ["compiled"]
    assert runtime_report(model)["signatures"][0]["int8_kernels"] == {"conv2d": 3, "linear": 1}
    assert runtime_report(model)["signatures"][0]["wrapper"] == "cpp"  # no Python frame per kernel
    assert torch.allclose(out, eager, atol=1e-4)
    logits_of(model, x[:3])  # another shape: its own graph, no recompilation of the first
    assert runtime_paths(model) == ["compiled", "compiled"]
    model.train()
    model(x)  # training mode: the eager kernels, nothing compiled
    assert len(runtime_report(model)["signatures"]) == 2


def _slowed(call, seconds: float = 0.05):
    def slow(*args, **kwargs):
        time.sleep(seconds)
        return call(*args, **kwargs)

    return slow


def test_auto_keeps_whichever_of_the_compiled_graph_and_the_onnxruntime_session_runs_faster(monkeypatch):
    pytest.importorskip("onnxruntime")
    from slimkit.quant import onnx_export, ort_runtime
    from slimkit.quant.runtime import Int8Runtime, forget_auto_choices

    x = torch.randn(4, 1, 12, 12)
    forget_auto_choices()
    model = _int8_cnn(0, "auto")
    with torch.no_grad():
        eager = model.forward.eager(x)
    out = logits_of(model, x)
    (signature,) = runtime_report(model)["signatures"]
    times = signature["measured_ms"]
    assert set(times) == {"compiled", "onnxruntime"} and all(t > 0 for t in times.values())
    assert signature["path"] == min(times, key=times.get)  # the faster one, as measured
    assert signature["int8_kernels"] == {"conv2d": 3, "linear": 1}  # compiled first, whichever is kept
    assert torch.allclose(out, eager, atol=1e-4)
    assert torch.equal(logits_of(model, x), out)  # the first call returned the kept path's values

    # a copy (or a reload) takes the same path without racing again: the same values
    races = []
    monkeypatch.setattr(Int8Runtime, "_race", lambda self, *a: races.append(1))
    twin = copy.deepcopy(model)
    assert torch.equal(logits_of(twin, x), out) and not races
    assert runtime_report(twin)["signatures"][0]["path"] == signature["path"]
    assert runtime_report(twin)["signatures"][0]["measured_ms"] == times
    monkeypatch.undo()
    forget_auto_choices()

    # a slow session loses the race, a slow graph loses it the other way
    session_call = ort_runtime.OrtSignature.__call__
    monkeypatch.setattr(ort_runtime.OrtSignature, "__call__", _slowed(session_call))
    slow_session = _int8_cnn(1, "auto")
    assert torch.allclose(logits_of(slow_session, x), slow_session.forward.eager(x), atol=1e-4)
    assert runtime_paths(slow_session) == ["compiled"]
    monkeypatch.setattr(ort_runtime.OrtSignature, "__call__", session_call)
    forget_auto_choices()
    compile_graph = Int8Runtime._compile
    monkeypatch.setattr(
        Int8Runtime, "_compile", lambda self, cpp_wrapper=True: _slowed(compile_graph(self, cpp_wrapper))
    )
    slow_graph = _int8_cnn(1, "auto")
    assert torch.allclose(logits_of(slow_graph, x), slow_graph.forward.eager(x), atol=1e-4)
    (signature,) = runtime_report(slow_graph)["signatures"]
    assert signature["path"] == "onnxruntime" and signature["measured_ms"]["compiled"] >= 50

    # a graph that cannot compile: the session serves; a model that cannot export: the graph does
    def breaks(self, cpp_wrapper=True):
        def fails(*args, **kwargs):
            raise RuntimeError("no C++ compiler")

        return fails

    monkeypatch.setattr(Int8Runtime, "_compile", breaks)
    forget_auto_choices()
    no_graph = _int8_cnn(2, "auto")
    assert torch.allclose(logits_of(no_graph, x), no_graph.forward.eager(x), atol=1e-4)
    (signature,) = runtime_report(no_graph)["signatures"]
    assert signature["path"] == "onnxruntime" and "no C++ compiler" in signature["reason"]
    assert "measured_ms" not in signature
    monkeypatch.setattr(Int8Runtime, "_compile", compile_graph)
    monkeypatch.setattr(onnx_export, "export_onnx", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no export")))
    forget_auto_choices()
    no_session = _int8_cnn(2, "auto")
    assert torch.allclose(logits_of(no_session, x), no_session.forward.eager(x), atol=1e-4)
    assert (
        runtime_paths(no_session) == ["compiled"] and "measured_ms" not in runtime_report(no_session)["signatures"][0]
    )


def test_many_compiled_models_of_one_class_stay_compiled_and_correct():
    # dynamo keeps one cache and one recompile limit (8 by default) per code object, shared by
    # every model of a class; with the limit at 2, three models of one class would exhaust it
    x = torch.randn(4, 1, 12, 12)
    with torch._dynamo.config.patch(recompile_limit=2):
        for seed in range(3):
            model = _int8_cnn(seed)
            with torch.no_grad():
                eager = model.forward.eager(x)
            assert torch.allclose(logits_of(model, x), eager, atol=1e-4), seed
            assert runtime_paths(model) == ["compiled"], seed
            # a graph of its own, with its own weights lowered to int8 kernels (not dynamo's
            # silent eager fallback once the limit is spent)
            assert runtime_report(model)["signatures"][0]["int8_kernels"] == {"conv2d": 3, "linear": 1}, seed


def test_a_failing_cpp_wrapper_falls_back_to_the_python_wrapper_and_user_options_are_kept(monkeypatch):
    from slimkit.quant.runtime import Int8Runtime

    compile_graph = Int8Runtime._compile

    def cpp_wrapper_breaks(self, cpp_wrapper: bool = True):
        if not cpp_wrapper:
            return compile_graph(self, cpp_wrapper=False)

        def fails(*args, **kwargs):  # what a missing or broken C++ toolchain raises on first call
            raise RuntimeError("C++ compile error: the wrapper failed to build")

        return fails

    x = torch.randn(4, 1, 12, 12)
    model = _int8_cnn(0)
    with torch.no_grad():
        eager = model.forward.eager(x)
    monkeypatch.setattr(Int8Runtime, "_compile", cpp_wrapper_breaks)
    out = logits_of(model, x)
    (signature,) = runtime_report(model)["signatures"]
    assert signature["path"] == "compiled" and signature["wrapper"] == "python"
    assert signature["int8_kernels"] == {"conv2d": 3, "linear": 1}  # counted once, by the graph that ran
    assert torch.allclose(out, eager, atol=1e-4)
    monkeypatch.undo()

    chosen = slimkit.quant.compile_int8(_int8_cnn(1), options={"cpp_wrapper": False})
    logits_of(chosen, x)
    assert runtime_report(chosen)["signatures"][0]["wrapper"] == "python"  # the user's options, untouched


def _int8_resnet(compile_mode: str) -> torch.nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10, channels=(8, 8, 8, 8)).eval()
    x = torch.randn(4, 3, 32, 32)
    slimkit.prepare(model, {"quant": {"mode": "ptq", "compile": compile_mode}}, example_inputs=x)
    slimkit.calibrate(model, [x])
    return slimkit.convert(model).eval()


def test_never_and_set_compile_run_eagerly_and_survive_save_and_copy(tmp_path):
    model = _int8_resnet("never")
    x = torch.randn(4, 3, 32, 32)
    logits_of(model, x)
    assert runtime_report(model)["compile"] == "never" and not runtime_report(model)["signatures"]
    folder = slimkit.save_pretrained(model, tmp_path / "m", model_card=True)
    again = slimkit.from_pretrained(folder)
    assert runtime_report(again)["compile"] == "never"
    assert "eager oneDNN kernels (quant.compile: never)" in (folder / "README.md").read_text()
    assert torch.equal(logits_of(again, x), logits_of(model, x))
    set_compile(again, "always")
    assert runtime_report(again)["compile"] == "always"


def test_a_copy_of_a_compiled_model_runs_its_own_weights():
    model = _int8_cnn(3)
    x = torch.randn(4, 1, 12, 12)
    expected = logits_of(model, x)  # compiled, with model's weights frozen into the graph
    twin = copy.deepcopy(model)
    assert twin.forward.model is twin and not runtime_report(twin)["signatures"]
    with torch.no_grad():
        twin.fc.weight.zero_()
    assert torch.allclose(logits_of(twin, x), twin.fc.bias.expand(4, -1))
    assert torch.equal(logits_of(model, x), expected)
    with pytest.raises(slimkit.SlimkitError, match="quant.compile"):
        set_compile(model, "sometimes")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_int8_models_refuse_non_finite_inputs_instead_of_hiding_them(value):
    model = _int8_cnn(2, compile_mode="never")
    x = torch.randn(4, 1, 12, 12)
    x[1, 0, 3, 3] = value
    with pytest.raises(NonFiniteError, match="1 NaN / inf"):
        logits_of(model, x)


def test_transformers_keep_their_forward_signature_and_run_eagerly():
    import inspect

    from tests.families import hf_model, token_batch

    model = hf_model("gpt2").eval()
    slimkit.prepare(model, {"quant": {"mode": "ptq"}})
    batch = token_batch(batch=16, seed=0)
    slimkit.calibrate(model, [batch])
    int8 = slimkit.convert(model).eval()
    # transformers' Trainer and generate read the parameters of model.forward
    assert list(inspect.signature(int8.forward).parameters)[:1] == ["input_ids"]
    assert int8.generate(batch["input_ids"][:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)
    assert not runtime_report(int8)["compiles"] and not runtime_report(int8)["signatures"]


def test_compile_int8_compiles_in_place_and_the_old_name_warns_once(monkeypatch):
    import slimkit.quant.compiled as compiled

    model = _int8_cnn(3, compile_mode="never")
    assert slimkit.quant.compile_int8(model) is model and runtime_report(model)["compile"] == "always"
    assert "compile" not in slimkit.quant.__all__  # the alias shadows the builtin: never star-imported
    monkeypatch.setattr(compiled, "_warned_compile", False)
    set_compile(model, "never")
    with pytest.warns(DeprecationWarning, match="use slimkit.quant.compile_int8"):
        assert slimkit.quant.compile(model) is model
    assert runtime_report(model)["compile"] == "always"  # the alias does what compile_int8 does
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call: no warning
        slimkit.quant.compile(model)
