"""``quant.compile: onnxruntime``: a converted model's inference calls on an onnxruntime session.

Why: on small CNNs at batch 1 every eager oneDNN int8 call (``onednn::qconv_pointwise``,
``qlinear_pointwise``) spends 60-100 us outside its 13-50 us kernel, and a compiled graph still
pays part of it; onnxruntime runs slimkit's QDQ export (fused to QLinearConv / QGemm /
DynamicQuantizeMatMul) without that overhead: 0.33 ms against 1.36 ms FP32 eager on the
tutorial's SmallCNN at batch 1 (2 threads), where the compiled graph takes 0.97 ms.

:class:`Int8Runtime` calls :func:`build` on the first inference call of each input signature:

1. export the model at exactly those inputs (:func:`slimkit.quant.onnx_export.export_onnx`,
   static shapes) into a temporary folder and open a CPU session on it;
2. run the eager forward once: its output is what this call returns, its pytree structure is
   how later session outputs are returned (a tensor, tuple, dict or ``ModelOutput``), and its
   values check the session (:func:`_check_outputs`).

Anything that fails raises :class:`SessionFailed` with the reason; that signature then runs
eagerly. Like a compiled graph, a session holds the weights of the moment it was built: change
the weights, then ``slimkit.quant.set_compile(model, "onnxruntime")`` again to rebuild.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from ..errors import SlimkitError

logger = logging.getLogger("slimkit")

# Output leaves that may be returned as the eager call returned them (they are not computed)
_CONSTANT_LEAVES = (int, float, bool, str, type(None))


class SessionFailed(Exception):
    """This input signature cannot run on onnxruntime; ``str(exc)`` says why, and ``output`` holds
    the eager output of the call when it was computed before the failure (``(value,)``)."""

    output: tuple = ()


def missing_onnxruntime() -> str | None:
    """Why the onnxruntime mode cannot run here (a missing package), or None."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as exc:
        return f"{exc}; install them with pip install 'slimkit[quant]'"
    return None


def require_onnxruntime(what: str) -> None:
    problem = missing_onnxruntime()
    if problem is not None:
        raise SlimkitError(
            f"{what}: quant.compile 'onnxruntime' needs onnx, onnxscript and onnxruntime ({problem}), "
            "or choose another mode (auto, always, never)"
        )


def _numpy(tensor: torch.Tensor):
    return tensor.detach().contiguous().numpy()


def _tensor_leaves(tree: Any) -> list[torch.Tensor]:
    return [leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, torch.Tensor)]


@dataclasses.dataclass
class OrtSignature:
    """One input signature's session, its input names and the structure of its outputs."""

    session: Any
    positional: list[str]  # graph inputs fed by the tensors of args, in pytree order
    keywords: list[str]  # graph inputs fed by keyword tensors of the same name
    spec: TreeSpec  # the eager output's structure
    template: list  # the eager output's leaves, tensors as None: constants are returned as they were
    slots: list[int]  # where in template the session's outputs go, in order
    arg_names: list[str] | None = None  # calls mixing args and kwargs: the parameter names of args

    def feed(self, args: tuple, kwargs: dict) -> dict:
        if self.arg_names is not None:
            args, kwargs = (), {**dict(zip(self.arg_names, args)), **kwargs}
        if len(args) == 1 and isinstance(args[0], torch.Tensor):  # the common case, without a pytree walk
            feed = {self.positional[0]: _numpy(args[0])}
        else:
            feed = dict(zip(self.positional, map(_numpy, _tensor_leaves(args))))
        for name in self.keywords:
            feed[name] = _numpy(kwargs[name])
        return feed

    def run(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        return [torch.from_numpy(value) for value in self.session.run(None, self.feed(args, kwargs))]

    def __call__(self, *args, **kwargs):
        leaves = list(self.template)
        for slot, value in zip(self.slots, self.run(args, kwargs)):
            leaves[slot] = value
        return tree_unflatten(leaves, self.spec)


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()  # what the torch model would use
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # idle onnxruntime threads spin by default, taking the cores from the torch code that runs
    # between calls (and from other processes); waiting passively costs a few us per call
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: its notices (unused initializers) are not the user's
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _input_names(session, args: tuple, kwargs: dict) -> tuple[list[str], list[str]]:
    """Which graph input each tensor feeds: keyword tensors by name, the tensors of args in order
    (torch.export names them after the forward's parameters, flattened in pytree order)."""
    names = [i.name for i in session.get_inputs()]
    for key, value in kwargs.items():
        if not isinstance(value, torch.Tensor) and _tensor_leaves(value):
            raise SessionFailed(f"keyword input {key!r} nests tensors in a {type(value).__name__}")
    keywords = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and k in names]
    positional = [n for n in names if n not in keywords]
    if len(positional) != len(_tensor_leaves(args)):
        raise SessionFailed(
            f"the exported graph's inputs {names} do not match the {len(_tensor_leaves(args))} positional and "
            f"{len(keywords)} keyword input tensors of the call"
        )
    return positional, keywords


def _check_outputs(expected: list[torch.Tensor], got: list[torch.Tensor]) -> None:
    """The session against the eager INT8 kernels on the same inputs.

    Both compute in int8 / int32, but onnxruntime requantizes with one fused multiplier and sums
    in another order, so a value next to a uint8 rounding boundary lands one step away between
    layers and carries that step on. Measured, session vs eager INT8 (relative L2 error
    ``|a - b| / |a|`` of each output; largest difference over the largest value), PTQ with 2
    calibration batches, random weights, batches 1, 2 and 16: the tests' SmallCNN <= 0.019
    (0.025), tiny BERT PTQ and dynamic <= 0.016 (0.013), the demo's digits CNN <= 0.115 (0.28),
    the tutorial's SmallCNN <= 0.041 (0.063), timm mobilenetv2_050 at 96x96 <= 0.109 (0.12).
    Argmax agreement is no test here: random logits nearly tie, and it measured 0.5 on two
    samples of the tutorial's CNN. A wrong input mapping, output order or graph gives errors of
    the order of the values (about 1.4 between unrelated outputs of one scale), so: relative
    L2 error <= 0.25, equal shapes and dtypes, integer outputs exactly equal.
    """
    if len(expected) != len(got):
        raise SessionFailed(f"the session returns {len(got)} tensors, the eager forward {len(expected)}")
    for index, (ref, out) in enumerate(zip(expected, got)):
        if ref.shape != out.shape or ref.dtype != out.dtype:
            raise SessionFailed(
                f"output {index}: the session gives {out.dtype} {tuple(out.shape)}, the eager forward "
                f"{ref.dtype} {tuple(ref.shape)}"
            )
        if not ref.is_floating_point():
            if not torch.equal(ref, out):
                raise SessionFailed(f"output {index} ({ref.dtype}) differs from the eager forward's")
            continue
        error, size = (ref - out).float().norm().item(), ref.float().norm().item()
        if not error <= 0.25 * size + 1e-6:  # not: NaN fails too
            raise SessionFailed(
                f"output {index} differs from the eager INT8 forward's by a relative L2 error of "
                f"{error / max(size, 1e-12):.3g} (at most 0.25 expected)"
            )


def _refuse_other_devices(model: nn.Module, args: tuple, kwargs: dict) -> None:
    devices = {t.device.type for t in _tensor_leaves((args, kwargs))}
    devices |= {t.device.type for t in (*model.parameters(), *model.buffers())}
    if devices - {"cpu"}:
        raise SlimkitError(
            f"{type(model).__name__}: quant.compile 'onnxruntime' runs on the CPU, but the model or its inputs "
            f"are on {', '.join(sorted(devices - {'cpu'}))}; move both to the CPU (model.cpu()) or choose another "
            "mode with slimkit.quant.set_compile(model, 'auto')"
        )


def _describe(exc: BaseException) -> str:
    """The error's first line, and its root cause's: torch.onnx wraps what torch.export said
    ("Failed to export the model with torch.export ...") around the reason that matters."""

    def line(error: BaseException) -> str:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()  # the exporter colours its messages
        return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:200]

    root = exc
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    return line(exc) if root is exc else f"{line(exc)} (caused by {line(root)})"


def _parameter_names(model: nn.Module, count: int) -> list[str]:
    """The names of the forward's first ``count`` parameters (calls mixing args and kwargs are
    exported, and fed, all by keyword)."""
    parameters = list(inspect.signature(type(model).forward).parameters.values())[1:]  # after self
    plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.POSITIONAL_ONLY)
    if len(parameters) < count or any(p.kind not in plain for p in parameters[:count]):
        raise SessionFailed(
            "the call mixes positional and keyword inputs that cannot all be named; pass them by keyword"
        )
    return [p.name for p in parameters[:count]]


def build(model: nn.Module, eager, args: tuple, kwargs: dict) -> tuple[OrtSignature, Any]:
    """The session of one input signature, and the eager output of this call (see the module doc).
    Raises :class:`SessionFailed` when this signature cannot run on onnxruntime."""
    _refuse_other_devices(model, args, kwargs)
    problem = missing_onnxruntime()
    if problem is not None:
        raise SessionFailed(f"onnxruntime is not installed ({problem})")
    output = eager(*args, **kwargs)
    try:
        return _build(model, output, args, kwargs), output
    except SessionFailed as exc:
        exc.output = (output,)
        raise


def _build(model: nn.Module, output: Any, args: tuple, kwargs: dict) -> OrtSignature:
    from .onnx_export import export_onnx

    leaves, spec = tree_flatten(output)
    odd = {type(leaf).__name__ for leaf in leaves if not isinstance(leaf, (torch.Tensor, *_CONSTANT_LEAVES))}
    if odd:  # a KV cache object, say: the session could not give the next call's
        raise SessionFailed(f"the forward returns {', '.join(sorted(odd))}, which an ONNX graph cannot return")
    arg_names = _parameter_names(model, len(args)) if args and kwargs else None
    if arg_names is not None:
        args, kwargs = (), {**dict(zip(arg_names, args)), **kwargs}
    # The exporter prints as it goes (its optimizer's "Evaluation failed: ...", whole graphs when
    # torch.export fails); none of it is the caller's, whose model runs either way and whose
    # runtime_report says why a signature runs eagerly: kept in slimkit's debug log instead.
    printed = io.StringIO()
    try:
        with (
            tempfile.TemporaryDirectory(prefix="slimkit-ort-") as folder,
            contextlib.redirect_stdout(printed),
            contextlib.redirect_stderr(printed),
        ):
            path = export_onnx(model, Path(folder) / "model.onnx", kwargs or args, dynamic_batch=False)
            session = _session(path)
    except Exception as exc:  # any exporter or session failure: the eager kernels still work
        raise SessionFailed(_describe(exc)) from exc
    finally:
        if printed.getvalue().strip():
            logger.debug("slimkit: the ONNX exporter printed:\n%s", printed.getvalue())
    positional, keywords = _input_names(session, args, kwargs)
    slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    template = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
    signature = OrtSignature(session, positional, keywords, spec, template, slots)
    try:
        got = signature.run(args, kwargs)
    except Exception as exc:
        raise SessionFailed(f"the session failed on these inputs: {type(exc).__name__}: {exc}"[:400]) from exc
    _check_outputs([leaves[i] for i in slots], got)
    signature.arg_names = arg_names
    return signature


__all__ = ["OrtSignature", "SessionFailed", "build", "missing_onnxruntime", "require_onnxruntime"]
