"""What slimkit knows of Hugging Face transformers models.

* the task comes from the class (``...ForCausalLM`` shifts logits, token-level heads mask
  padding), the classifier is every head outside the base model, the stem is the input
  embedding;
* attention probabilities (for attention KD) and the layout of attention heads (for head
  pruning) come from ``plugins/hf_attention.py``;
* folders are the model's own ``config.json`` + ``model.safetensors``: a dense model also
  loads with ``AutoModel...from_pretrained``. Loading never uses remote code.
"""

from __future__ import annotations

import contextlib
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
from slimkit.modules import user_named_modules
from slimkit.quant.layers import register_transposed_linear
from slimkit.quiet import quiet_imports

from .hf_folders import check_hf_config, copy_sentence_transformers_files

with quiet_imports():  # transformers' modeling code imports torchao, which logs deprecation notices
    import transformers
    from transformers import PreTrainedModel
    from transformers.pytorch_utils import Conv1D

from . import hf_attention, hf_depth
from .hf_attention import CAPTURE_IMPL as CAPTURE_IMPL  # re-exported: the public name it always had
from .hf_attention import layer_width

register_transposed_linear(Conv1D)  # GPT-2's Conv1D: a Linear with an [in, out] weight (slimkit.quant)


def _name_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, module in user_named_modules(model):
        if module is target:
            return name
    return None


# MLP hidden layers per family, and the config fields that size them.
_FFN_LAYERS = ("intermediate.dense", "mlp.up_proj", "mlp.fc1", "mlp.c_fc", "ffn.lin1", ".ffn")
_FFN_FIELDS = ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "hidden_dim")


def _tensor_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {
        k: tuple(v.shape)
        for named in (model.named_parameters(), model.named_buffers())
        for k, v in named
        if not k.startswith("slimkit.")
    }


def _input_embedding(model: nn.Module) -> tuple[str | None, list[str]]:
    """The name of the model's input embedding module (None if it has none) and of the Conv2d
    layers inside it (ViT-style patch embeddings)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    name = _name_of(model, emb)
    if name is None:
        return None, []
    return name, [f"{name}.{n}" for n, m in emb.named_modules() if isinstance(m, nn.Conv2d)]


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
        name, convs = _input_embedding(model)
        if name is None:
            return []
        # ViT-style patch embeddings wrap a conv: name that conv (the layer that sees pixels).
        return convs[:1] or [name]

    def attention_modules(self, model: nn.Module) -> list[str]:
        return hf_attention.attention_modules(model)

    # -- quantization ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def export_settings(self, model: nn.Module):
        """No KV cache while exporting: an output torch.export cannot flatten, and of no use to a
        single-pass ONNX graph."""
        config = getattr(model, "config", None)
        use_cache = getattr(config, "use_cache", None)
        if use_cache:
            config.use_cache = False
        try:
            yield
        finally:
            if use_cache:
                config.use_cache = use_cache

    def int8_embeddings_by_default(self) -> bool:
        return True  # the token table is up to half of an encoder's weights

    def float_layers(self, model: nn.Module) -> dict[str, str]:
        """The patch-embedding conv of vision models: their forward casts ``pixel_values`` to
        that conv's weight dtype (ViT, DeiT, CLIP, ... ``pixel_values.to(...weight.dtype)``),
        which an int8 weight would turn into truncated integers."""
        if getattr(model, "main_input_name", None) != "pixel_values":
            return {}
        why = "transformers casts pixel_values to this layer's weight dtype before calling it"
        return dict.fromkeys(_input_embedding(model)[1], why)

    def capture_attention(self, model: nn.Module, name: str, store: dict[str, torch.Tensor]) -> list[Any]:
        return hf_attention.capture_attention(model, name, store)

    def release_attention(self, model: nn.Module) -> None:
        hf_attention.release_attention(model)

    # -- pruning ---------------------------------------------------------------------------------
    def prune_exclusions(self, model: nn.Module) -> list[str]:
        """Classifier heads, the input embedding and the pooler: the pooler's width cannot be
        expressed in the config, and keeping it lets a uniformly pruned model load natively."""
        poolers = [n for n, _ in user_named_modules(model) if n.rsplit(".", 1)[-1] == "pooler"]
        return [*super().prune_exclusions(model), *poolers]

    def attention_heads(self, model: nn.Module) -> list[HeadLayout]:
        """Self-attention modules the model declares (``_can_record_outputs``), with separate
        q/k/v projections (BERT, ViT, Llama/Mistral grouped-query attention) or GPT-2's fused
        Conv1D ``c_attn``, and the output projection over the heads (``o_proj``, ``c_proj`` or
        BERT's ``attention.output.dense``); see ``plugins/hf_attention.py``."""
        return hf_attention.attention_heads(model)

    def set_attention_heads(self, model: nn.Module, layout: HeadLayout, num_heads: int, num_kv_heads: int) -> None:
        hf_attention.set_attention_heads(model, layout, num_heads, num_kv_heads)

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
        widths = {layer_width(m, "out") for n, m in user_named_modules(model) if n.endswith(_FFN_LAYERS)}
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
