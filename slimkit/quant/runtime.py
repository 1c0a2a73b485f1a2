"""How a converted INT8 model runs: eager oneDNN kernels, or compiled on first use.

``slimkit.convert`` gives every INT8 model an :class:`Int8Runtime` as its ``forward`` (an
instance attribute, so the model keeps its class). Each call:

1. refuses non-finite floating inputs (:class:`slimkit.errors.NonFiniteError`): uint8
   quantization would turn NaN / inf into plausible finite numbers;
2. picks the path. ``compile="auto"`` (the default, ``quant.compile``) compiles models with
   INT8 convolutions and, where onnxruntime is installed, also builds that signature's
   onnxruntime session and keeps whichever of the two its first calls measure faster
   (:meth:`Int8Runtime._race`; a model of the same structure at the same inputs, such as a
   copy or a reload, reuses that choice within the process, so copies return the same values);
   Linear-only models (transformers) run eagerly. ``"always"``
   compiles every model, and only compiles; ``"never"`` runs eagerly; ``"onnxruntime"`` runs
   inference calls on an onnxruntime session of slimkit's own QDQ export
   (:mod:`slimkit.quant.ort_runtime`: one per input signature, checked against the eager forward
   on its first call). Only inference calls compile or leave for onnxruntime (no gradients, eval
   mode, outside another trace); anything else runs the eager INT8 kernels.

Why ``auto`` measures: which path is faster depends on the model, the batch and the CPU. On a
2-core Zen 3 without VNNI, onnxruntime ran the tutorial's SmallCNN at batch 1 in 0.39 ms against
the compiled graph's 1.66 ms (FP32 eager 2.20 ms), while at batch 32 the compiled graph was
slightly ahead (5.24 against 5.62 ms; ``benchmarks/int8_speed.py``). Timing both once per input
signature costs a few calls; the choice and the times are in :func:`runtime_report`.

Compiling: one ``torch.compile(dynamic=False)`` graph per input signature (shapes, dtypes),
each from its *own copy* of the model class's ``forward`` code object. Dynamo keys its cache
(and its recompile limit, 8 by default) on the code object, so every model of one class and
every batch size used to share one budget and fell back to eager silently once it was spent;
a copy per (model, signature) never recompiles. Static shapes also avoid the dynamic-batch
graphs whose int8 convolutions fail at run time in torch 2.14 (a channels-last stride check).
At most ``MAX_SIGNATURES`` signatures are compiled per model; further ones run eagerly, with
one warning. A signature whose compilation fails runs eagerly, with the reason logged.

After the first compiled call of a signature, Inductor's pattern-matcher counters say how
many INT8 layers were lowered to oneDNN int8 kernels; fewer than the model has is a warning
naming the counts. :func:`runtime_report` returns all of it (path per signature, kernels, why
not), and the model card records it.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import math
import time
import types
from typing import Any, Literal

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ..errors import NonFiniteError, SlimkitError

logger = logging.getLogger("slimkit")

CompileMode = Literal["auto", "always", "never", "onnxruntime"]
COMPILE_MODES = ("auto", "always", "never", "onnxruntime")
MAX_SIGNATURES = 8
# compile="auto": the path measured faster per (model structure, input signature), this process
_AUTO_CHOICES: dict[tuple, tuple[str, dict[str, float]]] = {}
_MAX_CHOICES = 512
_COUNTERS = {"conv2d": "qconv_weight_prepack_matcher_count", "linear": "qlinear_weight_prepack_matcher_count"}


@dataclasses.dataclass
class SignatureState:
    """One input signature: its compiled callable or onnxruntime session (None: eager) and what
    building it gave."""

    compiled: Any = None
    path: str = "pending"  # pending | compiled | onnxruntime | eager
    reason: str | None = None  # why eager
    int8_kernels: dict[str, int] = dataclasses.field(default_factory=dict)
    wrapper: str | None = None  # Inductor's "cpp" or "python" wrapper, once compiled
    measured_ms: dict[str, float] | None = None  # compile "auto": each path's fastest call, when both ran


def _signature(args: tuple, kwargs: dict) -> tuple:
    leaves, spec = tree_flatten((args, kwargs))
    parts = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            parts.append((tuple(leaf.shape), leaf.dtype, leaf.device.type))
        elif isinstance(leaf, (int, float, bool, str, type(None))):
            parts.append(leaf)
        else:
            parts.append(type(leaf).__name__)
    return (str(spec), tuple(parts))


def _choice_key(model: nn.Module, signature: tuple) -> tuple:
    """What ``auto``'s measured choice depends on: the class, every tensor's name, shape and
    dtype (not its values: a copy with other weights runs at the same speed), the inputs."""
    structure = tuple((name, tuple(t.shape), t.dtype) for name, t in model.state_dict().items())
    return type(model).__module__, type(model).__qualname__, hash(structure), signature


def forget_auto_choices() -> None:
    """Forget the paths ``compile="auto"`` measured in this process (models converted or set
    to ``auto`` afterwards measure again on their first call of each shape)."""
    _AUTO_CHOICES.clear()


def check_finite_inputs(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Raise :class:`NonFiniteError` when a floating input holds NaN or inf."""
    leaves, _ = tree_flatten((args, kwargs))
    for index, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and not bool(torch.isfinite(leaf).all()):
            bad = int((~torch.isfinite(leaf)).sum())
            raise NonFiniteError(
                f"{type(model).__name__} (INT8): input {index} holds {bad} NaN / inf value(s) of {leaf.numel()}. "
                "INT8 layers quantize their inputs to uint8, which would turn them into ordinary finite numbers "
                "and hide the problem; clean the inputs (torch.nan_to_num) or find where they became non-finite."
            )


def int8_layer_kinds(model: nn.Module) -> dict[str, int]:
    """How many static INT8 convolutions and Linear-like layers the model has."""
    from .int8 import int8_state

    kinds = {"conv2d": 0, "linear": 0, "dynamic": 0}
    for module in model.modules():
        state = int8_state(module)
        if state is None:
            continue
        if state.dynamic:
            kinds["dynamic"] += 1
        else:
            kinds["conv2d" if state.kind == "conv2d" else "linear"] += 1
    return kinds


class Int8Runtime:
    """A converted model's ``forward``: input check, then eager or compiled (see the module doc)."""

    def __init__(self, model: nn.Module, mode: CompileMode = "auto", compile_kwargs: dict | None = None) -> None:
        if mode not in COMPILE_MODES:
            raise SlimkitError(f"quant.compile: expected one of {', '.join(COMPILE_MODES)}, got {mode!r}")
        self.model = model
        self.mode = mode
        self.compile_kwargs = dict(compile_kwargs or {})
        self.signatures: dict[tuple, SignatureState] = {}
        self._warned_full = False
        self._checked_cpu = False  # int8_hardware: whether this CPU's kernels compute these weights exactly
        self.exact_eager: str | None = None  # why every call runs eagerly (int8_hardware), if so
        # computed on first use: copy.deepcopy builds this object before the model copy is filled
        self._has_int8_convs: bool | None = None

    @property
    def __signature__(self) -> inspect.Signature:
        """What ``inspect.signature(model.forward)`` reports (transformers' Trainer and generate
        read it): the model's own forward's."""
        return inspect.signature(type(self.model).forward.__get__(self.model))

    # copy.deepcopy(model) copies this object with it: bind the copy to the copied model, and
    # compile afresh (compiled graphs hold the original's frozen weights)
    def __deepcopy__(self, memo: dict) -> Int8Runtime:
        return Int8Runtime(copy.deepcopy(self.model, memo), self.mode, copy.deepcopy(self.compile_kwargs, memo))

    def __getstate__(self) -> dict:
        return {"model": self.model, "mode": self.mode, "compile_kwargs": self.compile_kwargs}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model"], state["mode"], state["compile_kwargs"])

    @property
    def compiles(self) -> bool:
        """Whether inference calls run a torch.compile graph."""
        if self.mode in ("never", "onnxruntime"):
            return False
        if self._has_int8_convs is None:
            self._has_int8_convs = int8_layer_kinds(self.model)["conv2d"] > 0  # once, not per call
        return self.mode == "always" or self._has_int8_convs

    def eager(self, *args, **kwargs):
        return type(self.model).forward(self.model, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return self.eager(*args, **kwargs)  # traced from outside: the reference pattern
        if not self._checked_cpu:  # on the first call, after a load has filled the weights
            from .int8_hardware import warn_if_saturating

            self._checked_cpu = True
            if warn_if_saturating(self.model):  # exact only as the eager split kernels (int8_hardware)
                self.exact_eager = (
                    "8-bit weights on a CPU without VNNI: exact only as the eager two-call kernels "
                    "(slimkit.quant.int8_hardware)"
                )
        if self.exact_eager is not None:
            return self.eager(*args, **kwargs)
        single = not kwargs and len(args) == 1 and isinstance(args[0], torch.Tensor)
        if single and args[0].is_floating_point():  # the common case, without pytree walks
            # a sum is NaN / inf when any element is (5x cheaper than isfinite().all() on small
            # inputs); a finite input whose sum overflows takes the exact check, which passes it
            if not math.isfinite(args[0].sum().item()):
                check_finite_inputs(self.model, args, kwargs)
        elif not single:
            check_finite_inputs(self.model, args, kwargs)
        if torch.is_grad_enabled() or self.model.training or not (self.mode == "onnxruntime" or self.compiles):
            return self.eager(*args, **kwargs)
        key = (tuple(args[0].shape), args[0].dtype, args[0].device.type) if single else _signature(args, kwargs)
        state = self.signatures.get(key)
        if state is None:
            if len(self.signatures) >= MAX_SIGNATURES:
                if not self._warned_full:
                    self._warned_full = True
                    logger.warning(
                        "slimkit: %s has %s for %d input shapes; new shapes run eagerly "
                        "(pad or bucket the inputs to a few shapes for their speed)",
                        type(self.model).__name__,
                        "onnxruntime sessions" if self.mode == "onnxruntime" else "compiled INT8 graphs",
                        MAX_SIGNATURES,
                    )
                return self.eager(*args, **kwargs)
            compiled = None if self.mode == "onnxruntime" else self._compile()
            state = self.signatures[key] = SignatureState(compiled=compiled)
        if state.path == "eager":
            return self.eager(*args, **kwargs)
        if state.path != "pending":  # compiled, or onnxruntime
            return state.compiled(*args, **kwargs)
        if self.mode == "onnxruntime":
            return self._first_session(state, args, kwargs)
        if self.mode == "auto":
            return self._first_auto(state, key, args, kwargs)
        return self._first_call(state, args, kwargs)

    def _first_auto(self, state: SignatureState, key: tuple, args: tuple, kwargs: dict):
        """``compile="auto"``, a signature's first call: the path measured faster for a model of
        the same structure at these inputs earlier in this process (a copy, a reload), else
        compile and :meth:`_race`. Reusing the choice keeps copies on one path, so that they
        return the same values (the two paths differ by float rounding), and saves the race."""
        choice_key = _choice_key(self.model, key)
        known = _AUTO_CHOICES.get(choice_key)
        if known is not None and known[0] == "onnxruntime":
            session = self._session_or_none(args, kwargs)
            if session is not None:  # else compile instead
                state.compiled, state.path, state.measured_ms = session, "onnxruntime", dict(known[1])
                return session(*args, **kwargs)  # the session's values, as every later call's
        out = self._first_call(state, args, kwargs)
        if known is None:
            out = self._race(state, args, kwargs, out)
            if state.measured_ms is not None:
                if len(_AUTO_CHOICES) >= _MAX_CHOICES:
                    _AUTO_CHOICES.pop(next(iter(_AUTO_CHOICES)))
                _AUTO_CHOICES[choice_key] = (state.path, dict(state.measured_ms))
        elif known[0] == "compiled" and state.path == "compiled":
            state.measured_ms = dict(known[1])
        return out

    def _first_session(self, state: SignatureState, args: tuple, kwargs: dict):
        """Export and open this signature's session (slimkit.quant.ort_runtime); eager if that fails."""
        from .ort_runtime import SessionFailed, build

        try:
            state.compiled, out = build(self.model, self.eager, args, kwargs)
        except SessionFailed as exc:
            state.path, state.reason = "eager", f"onnxruntime: {exc}"
            logger.warning("slimkit: %s runs its INT8 layers eagerly: %s", type(self.model).__name__, state.reason)
            return exc.output[0] if exc.output else self.eager(*args, **kwargs)
        state.path = "onnxruntime"
        return out

    def _session_or_none(self, args: tuple, kwargs: dict):
        """``auto``: this signature's onnxruntime session, or None where onnxruntime is not installed
        (an optional extra) or cannot run it (the compiled graph, or eager, serves; logged at info)."""
        from .ort_runtime import SessionFailed, build, missing_onnxruntime

        if missing_onnxruntime() is not None:
            return None
        try:
            return build(self.model, self.eager, args, kwargs)[0]
        except SessionFailed as exc:
            logger.info("slimkit: %s does not run on onnxruntime: %s", type(self.model).__name__, exc)
            return None

    def _race(self, state: SignatureState, args: tuple, kwargs: dict, out: Any) -> Any:
        """``compile="auto"``, after a signature's first compiled call: build its onnxruntime session
        too (where onnxruntime is installed and can run it) and keep the faster of the two on these
        inputs. Each path is timed in runs of consecutive calls, as it would be served (the other
        path's threads idle meanwhile), alternating two or three times; the fastest call of each counts.
        Returns the kept path's output of these inputs (``out``: the compiled call's), so that the
        first call returns what the later ones will."""
        session = self._session_or_none(args, kwargs)
        if session is None:
            return out
        if state.path != "compiled":  # compiling failed or lowered nothing: the session is the fast path
            state.compiled, state.path = session, "onnxruntime"
            state.reason = f"{state.reason}; runs on onnxruntime instead" if state.reason else None
            return session(*args, **kwargs)
        paths = {"compiled": state.compiled, "onnxruntime": session}
        first = time.perf_counter()
        last = {"onnxruntime": session(*args, **kwargs)}  # its first run allocates
        calls = 3 if time.perf_counter() - first < 0.1 else 1  # big inputs: a few seconds at most
        # one call per run on big inputs: three alternations, so that one slow call of a path (a
        # hiccup of the machine) does not decide; one benchmark run timed EfficientNet-B0's
        # compiled graph at 441 ms in two such calls, and 227 ms over the next minutes
        alternations = 2 if calls > 1 else 3
        best = {name: math.inf for name in paths}
        for _ in range(alternations):
            for name, run in paths.items():
                for _ in range(calls):
                    start = time.perf_counter()
                    last[name] = run(*args, **kwargs)
                    best[name] = min(best[name], time.perf_counter() - start)
        state.measured_ms = {name: round(seconds * 1e3, 3) for name, seconds in best.items()}
        if best["onnxruntime"] < best["compiled"]:
            state.compiled, state.path = session, "onnxruntime"
        ms, name = state.measured_ms, type(self.model).__name__
        logger.info("slimkit: %s runs this input shape on %s (fastest call, ms: %s)", name, state.path, ms)
        return last[state.path]

    @property
    def _picks_wrapper(self) -> bool:
        """Whether slimkit chooses Inductor's wrapper (the caller passed neither options nor mode)."""
        return "options" not in self.compile_kwargs and "mode" not in self.compile_kwargs

    def _compile(self, cpp_wrapper: bool = True):
        from .compiled import prepare_compilation

        prepare_compilation(self.model)
        forward = type(self.model).forward
        # a fresh code object: dynamo's cache and recompile limit are per code object
        code = forward.__code__.replace()
        function = types.FunctionType(
            code, forward.__globals__, forward.__name__, forward.__defaults__, forward.__closure__
        )
        function.__kwdefaults__ = forward.__kwdefaults__
        kwargs = {"dynamic": False, **self.compile_kwargs}
        if cpp_wrapper and self._picks_wrapper:
            # Inductor's C++ wrapper calls the kernels without a Python frame per op: 1.04-1.43x
            # faster, most on small CNNs at batch 1 (benchmarks/int8_wrapper.py)
            kwargs["options"] = {"cpp_wrapper": True}
        return torch.compile(types.MethodType(function, self.model), **kwargs)

    def _first_call(self, state: SignatureState, args: tuple, kwargs: dict):
        from torch._dynamo.utils import counters

        before = {kind: counters["inductor"][name] for kind, name in _COUNTERS.items()}
        try:
            out = self._run_compiled(state, args, kwargs, counters, before)
        except Exception as exc:  # compile failures of any kind: the eager kernels still work
            state.compiled, state.path = None, "eager"
            state.reason = f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            logger.warning("slimkit: %s runs its INT8 layers eagerly: %s", type(self.model).__name__, state.reason)
            return self.eager(*args, **kwargs)
        state.path = "compiled"
        state.int8_kernels = {kind: counters["inductor"][name] - before[kind] for kind, name in _COUNTERS.items()}
        expected = int8_layer_kinds(self.model)
        if not any(state.int8_kernels.values()) and (expected["conv2d"] or expected["linear"]):
            # nothing was lowered: dynamo ran the frame eagerly (recompile limit, an unsupported
            # construct) or reused another graph; say so and take the eager kernels directly
            state.compiled, state.path = None, "eager"
            state.reason = "torch.compile produced no INT8 kernels for these inputs (dynamo ran them eagerly)"
            logger.warning("slimkit: %s runs its INT8 layers eagerly: %s", type(self.model).__name__, state.reason)
            return out
        missing = {k: expected[k] - state.int8_kernels[k] for k in _COUNTERS if state.int8_kernels[k] < expected[k]}
        if missing:
            state.reason = (
                "Inductor lowered "
                + ", ".join(f"{state.int8_kernels[k]} of {expected[k]} INT8 {k} layers" for k in missing)
                + " to oneDNN int8 kernels; the others run as dequantize + float ops (layers that did not run "
                "for these inputs count as missing)"
            )
            logger.warning("slimkit: compiled %s: %s", type(self.model).__name__, state.reason)
        return out

    def _run_compiled(self, state: SignatureState, args: tuple, kwargs: dict, counters, before: dict):
        """The first compiled call; the default C++ wrapper is a speed-up, not a requirement:
        if it fails, compile once more with Inductor's Python wrapper."""
        options = self.compile_kwargs.get("options") or {}
        state.wrapper = "cpp" if self._picks_wrapper or options.get("cpp_wrapper") else "python"
        try:
            return state.compiled(*args, **kwargs)
        except Exception as exc:
            if not self._picks_wrapper:
                raise
            logger.info(
                "slimkit: Inductor's C++ wrapper failed (%s: %s); using its Python wrapper", type(exc).__name__, exc
            )
            before.update({kind: counters["inductor"][name] for kind, name in _COUNTERS.items()})
            state.compiled, state.wrapper = self._compile(cpp_wrapper=False), "python"
            return state.compiled(*args, **kwargs)

    def report(self) -> dict:
        return {
            "compile": self.mode,
            "compiles": self.compiles,
            **({"eager": self.exact_eager} if self.exact_eager else {}),
            "signatures": [
                {
                    "inputs": repr(key)[:200],
                    "path": state.path,
                    "int8_kernels": dict(state.int8_kernels),
                    **({"wrapper": state.wrapper} if state.path == "compiled" else {}),
                    **({"reason": state.reason} if state.reason else {}),
                    **({"measured_ms": dict(state.measured_ms)} if state.measured_ms else {}),
                }
                for key, state in self.signatures.items()
            ],
        }


def runtime_of(model: nn.Module) -> Int8Runtime | None:
    forward = model.__dict__.get("forward")
    return forward if isinstance(forward, Int8Runtime) else None


def install(model: nn.Module, mode: CompileMode = "auto", compile_kwargs: dict | None = None) -> Int8Runtime:
    """Give a converted model its runtime (replacing an earlier one)."""
    runtime = Int8Runtime(model, mode, compile_kwargs)
    model.forward = runtime  # an instance attribute: the model keeps its class and its hooks
    return runtime


def set_compile(model: nn.Module, mode: CompileMode) -> nn.Module:
    """Choose how a converted INT8 model runs: ``"auto"`` (models with INT8 convolutions: compiled
    or onnxruntime, whichever the first call of each input shape measures faster), ``"always"``
    (compiled), ``"never"`` (eager oneDNN kernels) or ``"onnxruntime"``
    (an onnxruntime session of the QDQ export per input shape). Compiled graphs and sessions hold
    the weights they were built with: call it again after changing weights. Returns the model."""
    runtime = runtime_of(model)
    if runtime is None:
        raise SlimkitError(
            f"set_compile: {type(model).__name__} is not a converted INT8 model; call slimkit.convert(model) first"
        )
    check_mode(mode, "set_compile")
    install(model, mode, runtime.compile_kwargs)
    return model


def check_mode(mode: str, what: str) -> None:
    """Refuse an unknown mode, or ``"onnxruntime"`` without its packages (where a user chooses one;
    a saved folder still loads without them, and its calls run eagerly with the reason reported)."""
    if mode not in COMPILE_MODES:
        raise SlimkitError(f"{what}: quant.compile expected one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if mode == "onnxruntime":
        from .ort_runtime import require_onnxruntime

        require_onnxruntime(what)


def runtime_report(model: nn.Module) -> dict | None:
    """How a converted model runs: the compile mode, and per input signature seen so far the path
    (compiled / onnxruntime / eager), the INT8 layers Inductor lowered to oneDNN int8 kernels, and why not."""
    runtime = runtime_of(model)
    return None if runtime is None else runtime.report()


__all__ = [
    "COMPILE_MODES",
    "Int8Runtime",
    "check_mode",
    "forget_auto_choices",
    "install",
    "runtime_of",
    "runtime_report",
    "set_compile",
]
