"""What slimkit knows of transformers' attention layers: capturing their probabilities for
attention KD, and the layout of their heads for head pruning.

* **Capture**: slimkit registers an attention function with transformers'
  ``AttentionInterface`` that computes eager attention (and keeps the pre-dropout
  probabilities) only for the layers a recipe maps, and hands every other layer to the model's
  original implementation (SDPA by default), so KD on two layers does not slow down the other
  ten. What a layer is doing is one typed :class:`AttentionCapture` on it (and the model's
  original implementation one :class:`ModelCapture` on the model), never loose attributes.
* **Heads**: :func:`attention_heads` finds each self-attention module's query / key / value and
  output projections (separate Linears, GPT-2's fused Conv1D, DeBERTa-v2's position
  projections) and says why a layer's heads cannot be removed exactly, when they cannot.

``HFAdapter`` (``plugins/hf_adapters.py``) exposes these as its adapter methods.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimkit.adapters import HeadLayout
from slimkit.errors import UnsupportedModelError
from slimkit.modules import get_module, user_named_modules
from slimkit.quiet import quiet_imports

with quiet_imports():  # transformers' modeling code imports torchao, which logs deprecation notices
    from transformers import AttentionInterface, PreTrainedModel
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.pytorch_utils import Conv1D

CAPTURE_IMPL = "slimkit_capture"
_CAPTURE_ATTR = "_slimkit_capture"  # the one key: an AttentionCapture on a layer, a ModelCapture on the model


@dataclass
class AttentionCapture:
    """An attention layer's part in attention KD: where its probabilities go (``store[name]``;
    None: not captured) and the implementation it runs when not captured (``fallback``)."""

    fallback: str = "sdpa"
    store: dict[str, torch.Tensor] | None = None
    name: str = ""


@dataclass
class ModelCapture:
    """The model's attention implementation before capture began (restored on release)."""

    original: str | None


def capture_state(module: nn.Module) -> AttentionCapture | None:
    """The :class:`AttentionCapture` of an attention layer (None when capture is off)."""
    state = module.__dict__.get(_CAPTURE_ATTR)
    return state if isinstance(state, AttentionCapture) else None


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _eager_of(module: nn.Module):
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)


def capture_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eager attention that records the probabilities of marked modules; others fall back."""
    state = capture_state(module)
    if state is None or state.store is None:
        fallback = state.fallback if state is not None else "sdpa"
        fn = _eager_of(module) if fallback == "eager" else ALL_ATTENTION_FUNCTIONS[fallback]
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    store, name = state.store, state.name
    n_rep = query.shape[1] // key.shape[1]  # grouped-query attention shares K/V across query heads
    key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if kwargs.get("softcap") is not None:
        scores = torch.tanh(scores / kwargs["softcap"]) * kwargs["softcap"]
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            attention_mask = torch.zeros_like(attention_mask, dtype=scores.dtype).masked_fill(
                ~attention_mask, torch.finfo(scores.dtype).min
            )
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    store[name] = probs
    weights = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, probs


AttentionInterface.register(CAPTURE_IMPL, capture_attention_forward)
AttentionMaskInterface.register(CAPTURE_IMPL, eager_mask)


def _attention_classes(model: PreTrainedModel) -> tuple[type, ...]:
    record = getattr(model, "_can_record_outputs", None) or {}
    spec = record.get("attentions")
    classes = []
    for item in spec if isinstance(spec, (list, tuple)) else [spec]:
        cls = getattr(item, "target_class", item)
        if isinstance(cls, type):
            classes.append(cls)
    return tuple(classes)


def _head_classes(model: PreTrainedModel) -> tuple[type, ...]:
    """The self-attention classes whose heads can be pruned: those the model declares, else
    (families that predate ``_can_record_outputs``: DeBERTa-v2, MPNet) every ``...SelfAttention``
    module with query / key / value projections slimkit knows."""
    declared = _attention_classes(model)
    if declared:
        return declared
    found = {
        type(m)
        for _, m in user_named_modules(model)
        if type(m).__name__.endswith("SelfAttention") and any(all(hasattr(m, c) for c in n) for n in _QKV_NAMES)
    }
    return tuple(sorted(found, key=lambda c: c.__name__))


def attention_modules(model: nn.Module) -> list[str]:
    """The names of the attention layers the model declares (``_can_record_outputs``)."""
    classes = _attention_classes(model)
    return [n for n, m in user_named_modules(model) if classes and isinstance(m, classes)]


# Head pruning: the projection names transformers' attention modules use (DeBERTa-v2:
# query_proj...; DistilBERT: q_lin...; MPNet: q, k, v, o).
_QKV_NAMES = (
    ("q_proj", "k_proj", "v_proj"),
    ("query_proj", "key_proj", "value_proj"),
    ("query", "key", "value"),
    ("q_lin", "k_lin", "v_lin"),
    ("q", "k", "v"),
)
_FUSED_QKV = "c_attn"  # GPT-2 family: one Conv1D producing [q; k; v]
_OUT_NAMES = ("o_proj", "out_proj", "out_lin", "c_proj", "o", "dense")
# DeBERTa-v2 without share_att_key: relative-position projections laid out like the queries / keys.
_POSITION_PROJECTIONS = (("pos_query_proj", "query"), ("pos_key_proj", "key"))
# Norms inside an attention module that run after its output projection, on the residual
# stream (ALBERT's AlbertAttention ends in LayerNorm(x + dense(heads))): they see no head.
_POST_OUTPUT_NORMS = {"AlbertAttention": ("LayerNorm",)}
# Per-head tensors outside the attention modules, read by every layer: MPNet's relative position
# bias (an Embedding of num_heads columns). Its layers' heads are pruned together, the same everywhere.
_SHARED_HEAD_TENSORS = {"mpnet": ("encoder.relative_attention_bias",)}


def layer_width(module: nn.Module | None, side: str) -> int | None:
    """Output / input features of a Linear or a Conv1D (stored [in, out])."""
    if isinstance(module, Conv1D):
        return module.weight.shape[1 if side == "out" else 0]
    if isinstance(module, nn.Linear):
        return module.out_features if side == "out" else module.in_features
    return None


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return bool(name)


def _shared_head_modules(model: nn.Module) -> list[tuple[str, int]]:
    """The family's per-head modules shared by every layer (``_SHARED_HEAD_TENSORS``), by name."""
    found = []
    for tensor in _SHARED_HEAD_TENSORS.get(getattr(model.config, "model_type", ""), ()):
        prefix = getattr(model, "base_model_prefix", "")
        name = next((c for c in (f"{prefix}.{tensor}", tensor) if _has_module(model, c)), None)
        if name is not None:
            found.append((name, 0))
    return found


def attention_target(model: nn.Module, name: str) -> nn.Module:
    """The module under ``name`` (or ``name`` itself) that calls the attention function."""
    module = get_module(model, name)
    classes = _attention_classes(model)
    if not classes:
        raise UnsupportedModelError(
            f"attention KD: {type(model).__name__} does not declare its attention layers "
            "(_can_record_outputs['attentions']); slimkit cannot reach its attention probabilities"
        )
    for sub in module.modules():
        if isinstance(sub, classes) and not getattr(sub, "is_cross_attention", False):
            return sub
    raise UnsupportedModelError(
        f"attention KD: {name!r} in {type(model).__name__} contains no {classes[0].__name__}; "
        f"attention layers are e.g. {attention_modules(model)[:3]}"
    )


def capture_attention(model: nn.Module, name: str, store: dict[str, torch.Tensor]) -> list[Any]:
    """Record the attention probabilities of the layer ``name`` into ``store[name]`` on every
    forward: the model switches to slimkit's attention function, which runs eager attention for
    captured layers and each other layer's original implementation (its ``fallback``)."""
    target = attention_target(model, name)
    current = model.config._attn_implementation
    if current != CAPTURE_IMPL:
        classes = _attention_classes(model)
        for m in model.modules():
            if isinstance(m, classes):
                m.__dict__[_CAPTURE_ATTR] = AttentionCapture(fallback=current or "sdpa")
        model.__dict__[_CAPTURE_ATTR] = ModelCapture(original=current)
        model.set_attn_implementation(CAPTURE_IMPL)
    state = target.__dict__.setdefault(_CAPTURE_ATTR, AttentionCapture())
    state.store, state.name = store, name
    return []


def release_attention(model: nn.Module) -> None:
    """Undo :func:`capture_attention`: every layer back to the model's original implementation."""
    model_state = model.__dict__.pop(_CAPTURE_ATTR, None)
    for m in model.modules():
        m.__dict__.pop(_CAPTURE_ATTR, None)
    if isinstance(model_state, ModelCapture):
        model.set_attn_implementation(model_state.original)


def _output_projection(model: nn.Module, name: str, attn: nn.Module, width: int) -> str | None:
    for child in _OUT_NAMES:
        if layer_width(getattr(attn, child, None), "in") == width:
            return f"{name}.{child}"
    parent = name.rpartition(".")[0]  # BERT-style: attention.self + attention.output.dense
    dense = getattr(getattr(get_module(model, parent), "output", None), "dense", None) if parent else None
    return f"{parent}.output.dense" if layer_width(dense, "in") == width else None


def head_layout(model: nn.Module, name: str, attn: nn.Module) -> HeadLayout:
    """The head layout of one self-attention module (``unsupported`` says why its heads cannot
    be removed exactly, if so)."""
    head_dim = getattr(attn, "head_dim", None) or getattr(attn, "attention_head_size", None)
    problem = None
    if isinstance(getattr(attn, _FUSED_QKV, None), Conv1D):
        fused = f"{name}.{_FUSED_QKV}"
        width = getattr(attn, "split_size", 0)
        query, key_value = [(fused, 0)], [(fused, width), (fused, 2 * width)]
        kv_width = width
        if layer_width(attn.c_attn, "out") != 3 * width:
            problem = "its fused c_attn is not [q; k; v]"
    else:
        names = next((n for n in _QKV_NAMES if all(hasattr(attn, c) for c in n)), None)
        if names is None:
            raise UnsupportedModelError(f"{name}: no q/k/v projections slimkit recognises")
        q, k, v = (getattr(attn, c) for c in names)
        width, kv_width = layer_width(q, "out"), layer_width(k, "out")
        query = [(f"{name}.{names[0]}", 0)]
        key_value = [(f"{name}.{names[1]}", 0), (f"{name}.{names[2]}", 0)]
        for child, like in _POSITION_PROJECTIONS:
            if layer_width(getattr(attn, child, None), "out") is not None:
                (query if like == "query" else key_value).append((f"{name}.{child}", 0))
        if width is None or kv_width is None or kv_width != layer_width(v, "out"):
            problem = "its q / k / v projections are not linear layers of matching widths"
    output = _output_projection(model, name, attn, width or 0)
    if not head_dim or not width or width % head_dim or (kv_width or 0) % head_dim:
        problem = problem or f"its widths are not multiples of head_dim={head_dim}"
        head_dim = head_dim or 1
    elif output is None:
        problem = "slimkit finds no output projection over its heads"
    own = [n for n, _ in attn.named_parameters(recurse=False)]
    if own:
        problem = problem or f"it has per-head parameters ({', '.join(own)}) slimkit does not slice"
    post_output = _POST_OUTPUT_NORMS.get(type(attn).__name__, ())
    for child_name, child in attn.named_children():
        shape = getattr(child, "normalized_shape", None) or getattr(getattr(child, "weight", None), "shape", None)
        last = tuple(shape)[-1] if shape else None
        over_heads = last != head_dim and last in (width, kv_width) and child_name not in post_output
        if "norm" in child_name.lower() and over_heads:
            problem = problem or f"{child_name} normalises over all heads"
    return HeadLayout(
        name=name,
        num_heads=(width or 0) // head_dim,
        num_kv_heads=(kv_width or 0) // head_dim,
        head_dim=head_dim,
        query=query,
        key_value=key_value,
        output=[(output, 0)] if output else [],
        unsupported=problem,
        shared=_shared_head_modules(model),
    )


def attention_heads(model: nn.Module) -> list[HeadLayout]:
    """Self-attention modules the model declares (``_can_record_outputs``), with separate
    q/k/v projections (BERT, ViT, Llama/Mistral grouped-query attention) or GPT-2's fused
    Conv1D ``c_attn``, and the output projection over the heads (``o_proj``, ``c_proj`` or
    BERT's ``attention.output.dense``)."""
    classes = _head_classes(model)
    return [
        head_layout(model, name, m)
        for name, m in user_named_modules(model)
        if classes and isinstance(m, classes) and not getattr(m, "is_cross_attention", False)
    ]


def set_attention_heads(model: nn.Module, layout: HeadLayout, num_heads: int, num_kv_heads: int) -> None:
    """Set the head counts an attention module reads in forward after its heads were sliced."""
    attn = get_module(model, layout.name)
    for attr, value in (
        ("num_attention_heads", num_heads),
        ("num_heads", num_heads),
        ("n_heads", num_heads),
        ("num_key_value_heads", num_kv_heads),
        ("all_head_size", num_heads * layout.head_dim),
        ("split_size", num_heads * layout.head_dim),
    ):
        if isinstance(getattr(attn, attr, None), int):
            setattr(attn, attr, value)
