"""BatchNorm folding, all of it: which BatchNorms fold, the folded arithmetic, the folding
BatchNorm during QAT, and the folded-away BatchNorm of a converted or loaded model.

*Which*: a conv and a BatchNorm fold when the BatchNorm's input is the conv's output and nothing
else reads that output. Module structure cannot tell this (timm, Hugging Face and torchvision
wire their blocks in ``forward``), so it is read from one watched forward pass
(:func:`slimkit.quant.dataflow.record`): no tracer is needed, and models that ``torch.fx``
cannot trace work too.

*QAT*: the conv fake-quantizes the folded weight ``w * s`` (``s = gamma / sqrt(running_var +
eps)``, :func:`bn_factor`; :mod:`.qat`) and divides it by ``s`` again, so the BatchNorm that
follows (a :class:`FreezableBatchNorm` now) still sees unfolded outputs and trains on batch
statistics; from ``freeze_bn_step`` on it uses its running statistics, and once the pair
computes the folded conv (:func:`folds_now`) the BatchNorm runs only its *remainder*: what it
does besides normalizing (nothing for ``nn.BatchNorm2d``; an activation for subclasses that an
adapter declares with :func:`register_norm_remainder`).

*Converted*: an exact ``nn.BatchNorm2d`` becomes ``nn.Identity``; a subclass with more behaviour
keeps that behaviour with identity statistics (:func:`neutralize`). The model records which
(``folded_batchnorms``, in the ``quantization`` block) so that loading redoes it (:func:`rebuild`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import FormatError
from .dataflow import Recording, record
from .hub_checks import saved_module
from .state import BatchNormState, LayerState, QuantMixin, attach_state, clear, restore_class, state_of, swap_class

Remainder = Callable[[nn.Module, torch.Tensor], torch.Tensor]

# BatchNorm subclasses that do more than normalize, and what is left of their forward once the
# normalization is folded into the conv before them (by class path: no model library is imported
# here; the adapters register theirs, e.g. slimkit/plugins/timm.py for BatchNormAct2d)
_REMAINDERS: dict[str, Remainder] = {}


def register_norm_remainder(cls: type | str, remainder: Remainder) -> type | str:
    """Declare what a BatchNorm2d subclass ``cls`` (a class or its path) computes besides
    normalizing (e.g. ``lambda bn, x: bn.act(x)``), so that a folded one runs only that
    remainder; without it a folded one runs its own forward with identity statistics (exact,
    one elementwise pass slower)."""
    _REMAINDERS[cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"] = remainder
    return cls


def _keep(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x


def norm_remainder(bn: nn.Module) -> Remainder | None:
    """What ``bn`` computes besides normalizing: nothing for ``nn.BatchNorm2d``, a registered
    remainder for known subclasses, None (unknown: it must run its own forward) otherwise."""
    cls = next(c for c in type(bn).__mro__ if not issubclass(c, QuantMixin))
    if cls is nn.BatchNorm2d:
        return _keep
    return _REMAINDERS.get(f"{cls.__module__}.{cls.__qualname__}")


def batchnorms_with_statistics(model: nn.Module) -> dict[str, nn.Module]:
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d) and m.track_running_stats and m.running_var is not None
    }


def fold_pairs(
    recording: Recording, convs: dict[str, nn.Module], norms: dict[str, nn.Module]
) -> dict[str, tuple[str, nn.Module]]:
    """conv name -> (BatchNorm name, BatchNorm) for every conv whose only reader is a
    BatchNorm2d with running statistics, both run exactly once."""
    pairs: dict[str, tuple[str, nn.Module]] = {}
    for bn_name, bn in norms.items():
        call = recording.single_call(bn_name)
        if call is None or call.input is None:
            continue
        conv_name = next(iter(recording.returned_by.get(call.input, [])), None)
        if conv_name not in convs or recording.single_call(conv_name) is None:
            continue  # a layer run twice (shared weights) cannot be folded for both uses
        if len(recording.readers.get(call.input, [])) != 1:
            continue
        if bn.num_features == convs[conv_name].out_channels and conv_name not in pairs:
            pairs[conv_name] = (bn_name, bn)
    return pairs


def foldable_batchnorms(
    model: nn.Module, convs: dict[str, nn.Module], example_inputs: Any
) -> dict[str, tuple[str, nn.Module]]:
    """:func:`fold_pairs` from one forward pass on ``example_inputs``."""
    norms = batchnorms_with_statistics(model)
    if not norms or not convs:
        return {}
    return fold_pairs(record(model, example_inputs), convs, norms)


# -- the folded arithmetic ----------------------------------------------------------------------


def bn_factor(bn: nn.Module) -> torch.Tensor:
    """Per-channel ``gamma / sqrt(running_var + eps)`` of a BatchNorm."""
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    return bn.weight * inv_std if bn.weight is not None else inv_std


def folded_bias(bias: torch.Tensor | None, bn: nn.Module, s: torch.Tensor) -> torch.Tensor:
    """The bias of ``conv + BatchNorm`` folded into one conv: ``(b - mean) * s + beta``."""
    shift = bn.bias if bn.bias is not None else torch.zeros_like(s)
    return ((bias if bias is not None else 0.0) - bn.running_mean) * s + shift


def channel_shape(weight: torch.Tensor, axis: int) -> list[int]:
    """The shape that broadcasts a per-channel vector along ``axis`` of ``weight``."""
    shape = [1] * weight.dim()
    shape[axis] = -1
    return shape


def unfold(quantized: torch.Tensor, s: torch.Tensor, axis: int) -> torch.Tensor:
    """Divide the folded weight by ``s`` again. A channel with ``gamma == 0`` (timm and
    torchvision zero-init the last BN of residual blocks) folds to all-zero weights; dividing
    by 1 there keeps them zero, and the BatchNorm still outputs ``beta`` for it."""
    safe = torch.where(s == 0, torch.ones_like(s), s)
    return quantized / safe.reshape(channel_shape(quantized, axis))


def folds_now(layer: LayerState) -> bool:
    """True when the conv computes ``conv + BatchNorm`` as one folded conv (fake-quant on and
    the BatchNorm on its running statistics: eval mode or frozen); the BatchNorm then passes
    its input through (keeping any activation it runs)."""
    bn = layer.bn
    return (
        bn is not None
        and layer.weight_fake_quant
        and (not bn.training or state_of(bn).batchnorm.frozen)
        and norm_remainder(bn) is not None
    )


# -- the BatchNorm of a fake-quant conv (QAT), and of a converted model -----------------------------


class FreezableBatchNorm(QuantMixin):
    """Mixin for a folded BatchNorm: after ``freeze_bn_step`` it uses (and no longer updates)
    its running statistics, also in training mode; while its conv computes the folded conv, or
    once converted (neutral), it runs only its remainder."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        state: BatchNormState = state_of(self).batchnorm
        conv = state.folded_into
        folded = state.neutral or (conv is not None and folds_now(conv))
        remainder = norm_remainder(self) if folded else None
        if remainder is not None:  # the conv before it computed the normalization
            return remainder(self, input)
        if self.training and state.frozen:
            self.training = False
            try:
                return super().forward(input)
            finally:
                self.training = True
        return super().forward(input)


def attach(bn: nn.Module, conv: LayerState) -> None:
    """Fold ``bn`` into the fake-quant conv whose state is ``conv`` (in place)."""
    swap_class(bn, FreezableBatchNorm, "Folding")
    attach_state(bn).batchnorm = BatchNormState(folded_into=conv)


def detach(bn: nn.Module) -> None:
    """Undo :func:`attach`: a plain BatchNorm again."""
    restore_class(bn)
    clear(bn, "batchnorm")


def set_frozen(bn: nn.Module, frozen: bool) -> None:
    state_of(bn).batchnorm.frozen = frozen


def neutralize(bn: nn.Module) -> None:
    """Identity statistics (mean 0, var 1, eps 0, gamma 1, beta 0), running stats always used:
    the BatchNorm runs only what it does besides normalizing, if known."""
    if bn.weight is not None:
        bn.weight.data.fill_(1.0)
        bn.bias.data.zero_()
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0)
    bn.eps = 0.0
    _mark_neutral(bn)


def _mark_neutral(bn: nn.Module) -> None:
    """A converted folded BatchNorm: it runs only its remainder (or identity statistics)."""
    swap_class(bn, FreezableBatchNorm, "Folded")
    attach_state(bn).batchnorm = BatchNormState(frozen=True, neutral=True)


def _replace_by_identity(model: nn.Module, name: str) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, nn.Identity())


def strip(bn: nn.Module) -> None:
    """A folded BatchNorm whose remainder is known (timm's BatchNormAct2d: dropout and
    activation) never reads its statistics or affine tensors again: drop them, so the INT8
    folder does not carry four float vectors per channel that only encode the identity (7% of
    MobileNetV2-0.5's INT8 file)."""
    for name in ("weight", "bias"):
        if bn._parameters.get(name) is not None:
            bn._parameters[name] = None
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        if bn._buffers.get(name) is not None:
            bn._buffers[name] = None
    _mark_neutral(bn)


def fold_away(model: nn.Module, name: str, bn: nn.Module) -> str:
    """Take a folded BatchNorm out of the converted computation (its conv now holds the folded
    weights): ``"identity"`` for an exact ``nn.BatchNorm2d`` (replaced by ``nn.Identity``),
    ``"remainder"`` for a subclass whose remainder is registered (:func:`strip`: it runs only
    that, with no tensors left), ``"frozen"`` for any other subclass (:func:`neutralize`: it
    runs its own forward with identity statistics). Recorded on the model. Folders saved
    before ``"remainder"`` existed say ``"frozen"`` and still load as they were saved."""
    detach(bn)
    if type(bn) is nn.BatchNorm2d:
        _replace_by_identity(model, name)
        how = "identity"
    elif norm_remainder(bn) is not None:
        strip(bn)
        how = "remainder"
    else:
        neutralize(bn)
        how = "frozen"
    state = attach_state(model)
    state.folded_batchnorms = {**(state.folded_batchnorms or {}), name: how}
    return how


def folded_batchnorms(model: nn.Module) -> dict[str, str]:
    """BatchNorm name -> ``"identity"`` | ``"remainder"`` | ``"frozen"`` of every BatchNorm folded away in ``model``."""
    state = state_of(model)
    return dict(state.folded_batchnorms or {}) if state is not None else {}


def rebuild(model: nn.Module, folded: dict[str, str]) -> None:
    """Redo :func:`fold_away` on a freshly built model, from a saved folder's record."""
    for name, how in folded.items():
        bn = saved_module(model, name, "BatchNorm")
        if how == "identity":
            _replace_by_identity(model, name)
        elif how == "frozen":
            neutralize(bn)
        elif how == "remainder":
            if norm_remainder(bn) is None:
                raise FormatError(
                    f"config.json: the folded BatchNorm {name!r} ({type(bn).__qualname__}) was saved running only "
                    "its registered remainder, but none is registered for its class here; import the model "
                    "family's slimkit plugin (slimkit.plugins.timm for timm) before loading"
                )
            strip(bn)
        else:
            raise FormatError(f"config.json: unknown folded BatchNorm form {how!r} for {name!r}")
    attach_state(model).folded_batchnorms = dict(folded)
