"""What slimkit knows of Hugging Face transformers models.

* the task comes from the class (``...ForCausalLM`` shifts logits, token-level heads mask
  padding), the classifier is every head outside the base model, the stem is the input
  embedding;
* attention probabilities are exposed through transformers' ``AttentionInterface``: slimkit
  registers an attention function that computes eager attention (and keeps the
  pre-dropout probabilities) only for the layers a recipe maps, and hands every other layer
  to the model's original implementation (SDPA by default), so KD on two layers does not
  slow down the other ten;
* folders are the model's own ``config.json`` + ``model.safetensors``: a dense model also
  loads with ``AutoModel...from_pretrained``. Loading never uses remote code.
"""

from __future__ import annotations

import copy
import inspect
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.adapters import BlockStack, HeadLayout, ModelAdapter, Task, register_adapter
from slimkit.errors import FormatError, UnsupportedModelError
from slimkit.modules import get_module, user_named_modules
from slimkit.quant.layers import register_transposed_linear
from slimkit.quiet import quiet_imports

from .hf_folders import check_hf_config, copy_sentence_transformers_files

with quiet_imports():  # transformers' modeling code imports torchao, which logs deprecation notices
    import transformers
    from transformers import AttentionInterface, PreTrainedModel
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.pytorch_utils import Conv1D

from . import hf_depth

register_transposed_linear(Conv1D)  # GPT-2's Conv1D: a Linear with an [in, out] weight (slimkit.quant)

CAPTURE_IMPL = "slimkit_capture"
_STORE_ATTR = "_slimkit_attention_store"
_FALLBACK_ATTR = "_slimkit_attention_fallback"


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
    target = getattr(module, _STORE_ATTR, None)
    if target is None:
        fallback = getattr(module, _FALLBACK_ATTR, "sdpa")
        fn = _eager_of(module) if fallback == "eager" else ALL_ATTENTION_FUNCTIONS[fallback]
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    store, name = target
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


def _name_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, module in user_named_modules(model):
        if module is target:
            return name
    return None


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
# MLP hidden layers per family, and the config fields that size them.
_FFN_LAYERS = ("intermediate.dense", "mlp.up_proj", "mlp.fc1", "mlp.c_fc", "ffn.lin1", ".ffn")
_FFN_FIELDS = ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "hidden_dim")


def _width(module: nn.Module | None, side: str) -> int | None:
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


def _tensor_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {
        k: tuple(v.shape)
        for named in (model.named_parameters(), model.named_buffers())
        for k, v in named
        if not k.startswith("slimkit.")
    }


@register_adapter
class HFAdapter(ModelAdapter):
    library = "transformers"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, PreTrainedModel)

    # -- structure ------------------------------------------------------------------------------
    def task(self, model: nn.Module) -> Task:
        name = type(model).__name__
        if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
            return "causal_lm"
        if name.endswith(("ForTokenClassification", "ForMaskedLM")):
            return "token_classification"
        if name.endswith("Model"):
            return "embedding"
        return "classification"

    def loss_is_token_cross_entropy(self, model: nn.Module) -> bool:
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

        # model.loss_function, without its warning for models whose loss_type is unset (GPT-2)
        loss = model.__dict__.get("_loss_function") or LOSS_MAPPING.get(getattr(model, "loss_type", None) or "")
        config = getattr(model, "config", None)
        return (
            self.task(model) == "causal_lm"
            and loss in (None, ForCausalLMLoss)
            # MoE models add a router loss to the token loss when they return router logits
            and not getattr(config, "output_router_logits", False)
        )

    def classifier_names(self, model: nn.Module) -> list[str]:
        """Every Linear head outside the base model (classifier, score, lm_head, ...)."""
        prefix = getattr(model, "base_model_prefix", "")
        if not prefix or not hasattr(model, prefix):
            return []
        return [
            n
            for n, m in user_named_modules(model)
            if n and not (n == prefix or n.startswith(prefix + ".")) and isinstance(m, nn.Linear)
        ]

    def stem_names(self, model: nn.Module) -> list[str]:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        name = _name_of(model, emb)
        if name is None:
            return []
        # ViT-style patch embeddings wrap a conv: name that conv (the layer that sees pixels).
        convs = [f"{name}.{n}" for n, m in emb.named_modules() if isinstance(m, nn.Conv2d)]
        return convs[:1] or [name]

    def attention_modules(self, model: nn.Module) -> list[str]:
        classes = _attention_classes(model)
        return [n for n, m in user_named_modules(model) if classes and isinstance(m, classes)]

    def _attention_target(self, model: nn.Module, name: str) -> nn.Module:
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
            f"attention layers are e.g. {self.attention_modules(model)[:3]}"
        )

    def capture_attention(self, model: nn.Module, name: str, store: dict[str, torch.Tensor]) -> list[Any]:
        target = self._attention_target(model, name)
        current = model.config._attn_implementation
        if current != CAPTURE_IMPL:
            classes = _attention_classes(model)
            for m in model.modules():
                if isinstance(m, classes):
                    setattr(m, _FALLBACK_ATTR, current or "sdpa")
            model.__dict__["_slimkit_original_attention"] = current
            model.set_attn_implementation(CAPTURE_IMPL)
        setattr(target, _STORE_ATTR, (store, name))
        return []

    def release_attention(self, model: nn.Module) -> None:
        original = model.__dict__.pop("_slimkit_original_attention", None)
        for m in model.modules():
            for attr in (_STORE_ATTR, _FALLBACK_ATTR):
                if attr in m.__dict__:
                    delattr(m, attr)
        if original is not None:
            model.set_attn_implementation(original)

    # -- pruning ---------------------------------------------------------------------------------
    def prune_exclusions(self, model: nn.Module) -> list[str]:
        """Classifier heads, the input embedding and the pooler: the pooler's width cannot be
        expressed in the config, and keeping it lets a uniformly pruned model load natively."""
        poolers = [n for n, _ in user_named_modules(model) if n.rsplit(".", 1)[-1] == "pooler"]
        return [*super().prune_exclusions(model), *poolers]

    def _output_projection(self, model: nn.Module, name: str, attn: nn.Module, width: int) -> str | None:
        for child in _OUT_NAMES:
            if _width(getattr(attn, child, None), "in") == width:
                return f"{name}.{child}"
        parent = name.rpartition(".")[0]  # BERT-style: attention.self + attention.output.dense
        dense = getattr(getattr(get_module(model, parent), "output", None), "dense", None) if parent else None
        return f"{parent}.output.dense" if _width(dense, "in") == width else None

    def _layout(self, model: nn.Module, name: str, attn: nn.Module) -> HeadLayout:
        head_dim = getattr(attn, "head_dim", None) or getattr(attn, "attention_head_size", None)
        problem = None
        if isinstance(getattr(attn, _FUSED_QKV, None), Conv1D):
            fused = f"{name}.{_FUSED_QKV}"
            width = getattr(attn, "split_size", 0)
            query, key_value = [(fused, 0)], [(fused, width), (fused, 2 * width)]
            kv_width = width
            if _width(attn.c_attn, "out") != 3 * width:
                problem = "its fused c_attn is not [q; k; v]"
        else:
            names = next((n for n in _QKV_NAMES if all(hasattr(attn, c) for c in n)), None)
            if names is None:
                raise UnsupportedModelError(f"{name}: no q/k/v projections slimkit recognises")
            q, k, v = (getattr(attn, c) for c in names)
            width, kv_width = _width(q, "out"), _width(k, "out")
            query = [(f"{name}.{names[0]}", 0)]
            key_value = [(f"{name}.{names[1]}", 0), (f"{name}.{names[2]}", 0)]
            for child, like in _POSITION_PROJECTIONS:
                if _width(getattr(attn, child, None), "out") is not None:
                    (query if like == "query" else key_value).append((f"{name}.{child}", 0))
            if width is None or kv_width is None or kv_width != _width(v, "out"):
                problem = "its q / k / v projections are not linear layers of matching widths"
        output = self._output_projection(model, name, attn, width or 0)
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

    def attention_heads(self, model: nn.Module) -> list[HeadLayout]:
        """Self-attention modules the model declares (``_can_record_outputs``), with separate
        q/k/v projections (BERT, ViT, Llama/Mistral grouped-query attention) or GPT-2's fused
        Conv1D ``c_attn``, and the output projection over the heads (``o_proj``, ``c_proj`` or
        BERT's ``attention.output.dense``)."""
        classes = _head_classes(model)
        return [
            self._layout(model, name, m)
            for name, m in user_named_modules(model)
            if classes and isinstance(m, classes) and not getattr(m, "is_cross_attention", False)
        ]

    def set_attention_heads(self, model: nn.Module, layout: HeadLayout, num_heads: int, num_kv_heads: int) -> None:
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

    def transposed_linear_types(self) -> dict[type, tuple[str, str]]:
        return {Conv1D: ("nf", "nx")}

    # -- depth pruning (plugins/hf_depth.py) -------------------------------------------------------
    def block_stacks(self, model: nn.Module) -> list[BlockStack]:
        return hf_depth.block_stacks(model)

    def after_depth_pruning(self, model: nn.Module, kept: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return hf_depth.after_depth_pruning(model, kept)

    def trace_kwargs(self, model: nn.Module) -> dict[str, Any]:
        accepts_cache = "use_cache" in inspect.signature(model.forward).parameters
        return {"use_cache": False} if accepts_cache else {}

    def after_pruning(self, model: nn.Module) -> dict[str, Any]:
        """Rewrite the config fields that size what was pruned uniformly (MLP width in every
        layer; heads, key/value heads and head_dim where the family reads ``head_dim``), but only
        when a model built from the rewritten config has exactly the pruned model's shapes, so
        that plain ``AutoModel...from_pretrained`` loads it. Otherwise the config keeps what it
        can express truthfully and the saved manifest carries the rest."""
        config = model.config
        ffn = {}
        widths = {_width(m, "out") for n, m in user_named_modules(model) if n.endswith(_FFN_LAYERS)}
        widths.discard(None)  # containers named like a layer (DistilBERT's ffn holds lin1 / lin2)
        field = next((f for f in _FFN_FIELDS if hasattr(config, f)), None)
        if len(widths) == 1 and field is not None:
            width = widths.pop()
            if getattr(config, field) != width:
                ffn[field] = width
        heads = {}
        layouts = [lay for lay in self.attention_heads(model) if lay.unsupported is None]
        counts = {(lay.num_heads, lay.num_kv_heads, lay.head_dim) for lay in layouts}
        if len(counts) == 1:
            num_heads, num_kv, head_dim = counts.pop()
            kv_field = getattr(config, "num_key_value_heads", num_kv)
            if (num_heads, num_kv) != (getattr(config, "num_attention_heads", None), kv_field):
                heads = {"num_attention_heads": num_heads, "head_dim": head_dim}
                if hasattr(config, "num_key_value_heads"):
                    heads["num_key_value_heads"] = num_kv
        changed = {**ffn, **heads}
        if not changed or not self._builds_same(model, changed):
            return {}
        for k, v in changed.items():
            setattr(config, k, v)
        return changed

    def _builds_same(self, model: nn.Module, fields: dict[str, Any]) -> bool:
        """Whether the model class built from the config with ``fields`` has the model's shapes."""
        config = copy.deepcopy(model.config)
        for k, v in fields.items():
            setattr(config, k, v)
        try:
            with torch.device("meta"):
                fresh = type(model)._from_config(config)
        except Exception:  # a config the family rejects cannot be the native one
            return False
        return _tensor_shapes(fresh) == _tensor_shapes(model)

    def example_inputs(self, model: nn.Module, batch_size: int = 2) -> dict[str, torch.Tensor]:
        config = model.config
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if getattr(model, "main_input_name", "input_ids") == "pixel_values":
            size = getattr(config, "image_size", 224)
            size = (size, size) if isinstance(size, int) else tuple(size)
            channels = getattr(config, "num_channels", 3)
            return {"pixel_values": torch.randn(batch_size, channels, *size, device=device)}
        vocab = getattr(config, "vocab_size", None)
        if vocab is None:
            raise UnsupportedModelError(
                f"{type(model).__name__}: cannot make example inputs (no vocab_size / image_size in its "
                "config); pass example_inputs=..."
            )
        length = min(16, getattr(config, "max_position_embeddings", 16) or 16)
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, min(vocab, 1000), (batch_size, length), generator=generator)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device)}

    # -- folders -----------------------------------------------------------------------------------
    def config_dict(self, model: nn.Module) -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as tmp:
            model.config.save_pretrained(tmp)
            config = json.loads((Path(tmp) / "config.json").read_text())
        config["architectures"] = [type(model).__name__]
        config.pop("slimkit", None)
        return config

    def check_config(self, config: dict[str, Any], file: Any) -> None:
        """No remote code by any door (``auto_map``, Hub attention / experts kernels) and the
        fields slimkit reads have the right types (:func:`hf_folders.check_hf_config`)."""
        check_hf_config(config, file)

    def init_non_persistent_buffers(self, model: nn.Module, loaded: set[str]) -> None:
        """transformers' own way after a meta-device load: every loaded tensor is marked
        initialised, then ``initialize_weights`` runs each module's ``_init_weights`` on what is
        left (position ids, rotary frequencies); modules whose tensors all came from the file
        are skipped, and the guarded ``init`` functions never touch a loaded tensor."""
        tensors = model.state_dict(keep_vars=True)
        for key in loaded:
            tensors[key]._is_hf_initialized = True
        for module in model.modules():
            module.__dict__.pop("_is_hf_initialized", None)
            own = [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
            if all(getattr(t, "_is_hf_initialized", False) for t in own):
                module._is_hf_initialized = True
        model.initialize_weights()

    def extra_files(self, model: nn.Module, source: Any, folder: Any) -> bool:
        """sentence-transformers' files (``modules.json``, pooling config, ...) of the folder the
        model came from, so that ``load_sentence_transformer`` rebuilds the same pipeline."""
        if source is None:
            return False
        return copy_sentence_transformers_files(Path(source), Path(folder), getattr(model.config, "hidden_size", None))

    def _config_and_class(self, config: dict[str, Any], where: str) -> tuple[Any, type]:
        self.check_config(config, where)
        architectures = config.get("architectures") or []
        cls = getattr(transformers, architectures[0], None) if architectures else None
        if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
            raise FormatError(f"{where}: 'architectures' must name a transformers model class, got {architectures!r}")
        try:
            config_obj = transformers.AutoConfig.for_model(**config)
        except (KeyError, ValueError) as exc:
            raise FormatError(f"{where}: not a config this transformers version knows ({exc})") from None
        return config_obj, cls

    def build(self, config: dict[str, Any]) -> nn.Module:
        config_obj, cls = self._config_and_class(dict(config), "config.json")
        return cls._from_config(config_obj)

    def load_plain(self, folder: Path) -> nn.Module:
        from slimkit.hub import read_config

        config = read_config(folder)
        _, cls = self._config_and_class(config, str(folder / "config.json"))
        if not (folder / "model.safetensors").is_file() and not (folder / "model.safetensors.index.json").is_file():
            raise FormatError(f"{folder / 'model.safetensors'} is missing; slimkit loads safetensors only")
        from transformers.utils import logging as hf_logging

        # transformers draws a "Loading weights" bar per load: noise in a log file
        bar = hf_logging.is_progress_bar_enabled()
        if not sys.stderr.isatty():
            hf_logging.disable_progress_bar()
        try:
            return cls.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
