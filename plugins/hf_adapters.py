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

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from slimkit.adapters import ModelAdapter, Task, register_adapter
from slimkit.errors import FormatError, UnsupportedModelError
from slimkit.modules import get_module, user_named_modules

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


def _name_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, module in user_named_modules(model):
        if module is target:
            return name
    return None


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

    def _config_and_class(self, config: dict[str, Any], where: str) -> tuple[Any, type]:
        if "auto_map" in config:
            raise FormatError(f"{where} asks for remote code (auto_map); slimkit never runs code from a model folder")
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
        config = json.loads((folder / "config.json").read_text())
        _, cls = self._config_and_class(config, str(folder / "config.json"))
        if not (folder / "model.safetensors").is_file() and not (folder / "model.safetensors.index.json").is_file():
            raise FormatError(f"{folder / 'model.safetensors'} is missing; slimkit loads safetensors only")
        return cls.from_pretrained(folder, local_files_only=True, use_safetensors=True)
