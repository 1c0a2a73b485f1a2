"""What slimkit needs to know about a model family, behind one small interface.

Adapters for timm and transformers live in ``slimkit.plugins`` (they import those libraries);
the core only knows this interface and the fallback for plain ``nn.Module``s.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..errors import UnsupportedModelError

Task = Literal["classification", "token_classification", "causal_lm", "embedding"]


@dataclass
class HeadLayout:
    """Where the heads of one attention module live, for head pruning.

    Every projection is named with the feature offset at which its head-ordered block starts:
    head ``h`` occupies features ``offset + h * head_dim ... + head_dim`` of the module's outputs
    (``query`` and ``key_value``) or inputs (``output``). With grouped-query attention,
    ``num_kv_heads < num_heads`` and query head ``h`` reads key/value head
    ``h // (num_heads // num_kv_heads)``; a key/value head and its query heads are pruned together.
    """

    name: str  # the attention module
    num_heads: int  # query heads
    num_kv_heads: int  # key / value heads (== num_heads without grouped-query attention)
    head_dim: int
    query: list[tuple[str, int]]  # projections whose outputs hold the query heads (and per-head gates)
    key_value: list[tuple[str, int]]  # projections whose outputs hold the key and value heads
    output: list[tuple[str, int]]  # projections whose inputs hold the per-head attention outputs
    unsupported: str | None = None  # why heads cannot be removed exactly here (None: they can)
    # Modules outside the attention whose outputs hold one value per head at ``offset + h``, read by
    # every layout that lists them (MPNet's relative position bias): those layouts lose the same heads.
    shared: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class BlockStack:
    """A run of blocks that depth pruning may remove: one ``nn.ModuleList`` / ``nn.Sequential``.

    ``removable`` lists the entries whose output has their input's shape and meaning (a
    transformer layer, a residual block without a downsample): skipping one leaves the stream as
    it was, so it can become an identity while training and be dropped from the list at
    ``convert``. ``channel_dim`` is the features' dimension of the stream (-1 for tokens
    ``[B, N, C]``, 1 for CNN maps ``[B, C, H, W]``).
    """

    name: str  # the container module
    size: int  # entries in it
    removable: list[int]
    channel_dim: int = -1
    unsupported: str | None = None  # why no block of this stack can be removed (None: they can)


class ModelAdapter:
    """Model-family knowledge: classifier, stem, attention, inputs, config.

    Subclasses override what their family knows; the defaults describe a plain PyTorch model
    that returns logits.
    """

    library: str = "torch"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return False

    # -- structure ------------------------------------------------------------------------
    def classifier_names(self, model: nn.Module) -> list[str]:
        """Modules that produce the final prediction; excluded from pruning by default."""
        last = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        return last[-1:]

    def stem_names(self, model: nn.Module) -> list[str]:
        """The first layer(s) that see raw inputs; excluded from pruning by default."""
        for name, m in model.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
                return [name]
        return []

    def attention_modules(self, model: nn.Module) -> list[str]:
        """Names of attention modules whose probabilities / heads slimkit can reach."""
        return []

    def prune_exclusions(self, model: nn.Module) -> list[str]:
        """Modules whose outputs pruning leaves alone by default: the classifier and the stem."""
        return [*self.classifier_names(model), *self.stem_names(model)]

    def int8_embeddings_by_default(self) -> bool:
        """Whether ``quant.embeddings: null`` (the default) stores this family's ``nn.Embedding``
        tables as int8 (worth it where the table is a large share of the weights)."""
        return False

    def float_layers(self, model: nn.Module) -> dict[str, str]:
        """Layers quantization keeps in floating point by default for this family, each with the
        reason (said in the log and the model card), e.g. a layer whose weight dtype the model's
        own forward casts its inputs to."""
        return {}

    def export_settings(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """A context in which ``slimkit.export_onnx`` traces the model: the family's settings for a
        single-pass graph (transformers: no KV cache output); nothing by default."""
        return contextlib.nullcontext()

    def attention_heads(self, model: nn.Module) -> list[HeadLayout]:
        """Where the heads of every attention module live (empty: none that slimkit knows).

        A module whose heads cannot be removed exactly (a norm over all heads, per-head
        parameters, ...) is listed with ``unsupported`` set to the reason: its projections are
        still kept out of channel pruning, and pruning its heads raises an error naming it.
        """
        return []

    def set_attention_heads(self, model: nn.Module, layout: HeadLayout, num_heads: int, num_kv_heads: int) -> None:
        """Update the attention module's attributes after its heads were sliced to ``num_heads``."""
        raise UnsupportedModelError(
            f"{type(model).__name__}: no adapter knows how to update attention module {layout.name!r} "
            "after head pruning"
        )

    def block_stacks(self, model: nn.Module) -> list[BlockStack]:
        """The runs of blocks depth pruning (``prune.layers``) may remove (empty: none known)."""
        return []

    def after_depth_pruning(self, model: nn.Module, kept: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Bring attributes and config fields in line after blocks were dropped from their stacks.

        ``kept`` maps each stack to ``{"kept": [old indices, in order], "total": old size}``; the
        stacks are already re-indexed. Returns the native config fields rewritten.
        """
        return {}

    def transposed_linear_types(self) -> dict[type, tuple[str, str]]:
        """Linear-like module classes whose weight is stored [in, out] (HF GPT-2's ``Conv1D``),
        with the names of their output- and input-size attributes."""
        return {}

    def trace_kwargs(self, model: nn.Module) -> dict[str, Any]:
        """Keyword arguments added to dict example inputs when a model is traced (e.g. turning a
        key/value cache off, whose concatenations are not part of the model's structure)."""
        return {}

    def after_pruning(self, model: nn.Module) -> dict[str, Any]:
        """Bring model-level attributes and config fields in line with the pruned widths.

        Returns the native config fields it rewrote (so that the base library alone can load a
        uniformly pruned model); an empty dict when none can express the new widths.
        """
        return {}

    def capture_attention(self, model: nn.Module, name: str, store: dict[str, torch.Tensor]) -> list[Any]:
        """Arrange for ``store[name]`` to receive the attention probabilities [B, H, Q, K] of
        module ``name`` on every forward; return removable handles."""
        raise UnsupportedModelError(
            f"attention KD: {type(model).__name__} has no adapter that exposes attention probabilities "
            f"(module {name!r}). Use a timm ViT-style or Hugging Face transformer model, or drop "
            "distill.attention for this model."
        )

    def release_attention(self, model: nn.Module) -> None:
        """Undo what ``capture_attention`` changed on the model (hooks are removed by the caller)."""

    # -- inputs and outputs ----------------------------------------------------------------
    def task(self, model: nn.Module) -> Task:
        return "classification"

    def loss_is_token_cross_entropy(self, model: nn.Module) -> bool:
        """Whether the loss the model computes from ``labels`` is exactly the shifted token
        cross-entropy (-100 ignored, summed / ``num_items_in_batch`` or averaged). Logit KD then
        computes it in its own chunked pass instead, so that a large-vocabulary LM does not
        hold the model's log-softmax and gradients next to KD's (see distill/chunked.py)."""
        return False

    def example_inputs(self, model: nn.Module, batch_size: int = 2) -> Any:
        """Inputs of ``batch_size`` samples the model can be called with (a tensor, a tuple or a
        dict of keyword tensors), for tracing and measuring when the user passes none."""
        raise UnsupportedModelError(
            f"{type(model).__name__}: slimkit cannot guess example inputs for this model; "
            "pass example_inputs=... (a tensor, a tuple of tensors or a dict of keyword tensors)."
        )

    # -- hub-style folders ---------------------------------------------------------------------
    def config_dict(self, model: nn.Module) -> dict[str, Any]:
        """The family's own ``config.json`` content for ``model`` (``save_pretrained`` adds the
        ``"slimkit"`` block to it)."""
        raise UnsupportedModelError(
            f"save_pretrained: {type(model).__name__} is neither a Hugging Face PreTrainedModel nor a "
            "timm model, so no config.json can rebuild it. Wrap it in one of those, or save its "
            "state_dict with safetensors.torch.save_file."
        )

    def build(self, config: dict[str, Any]) -> nn.Module:  # pragma: no cover - abstract for torch
        """A fresh model (random weights) from ``config`` (a ``config.json`` without its
        ``"slimkit"`` block); ``from_pretrained`` calls it on the meta device, then replays the
        method blocks and loads the weights."""
        raise UnsupportedModelError("plain PyTorch models cannot be rebuilt from config.json")

    def load_plain(self, folder: Path) -> nn.Module:
        """Load a folder the family's own library wrote (no ``"slimkit"`` block), with that
        library's loader (safetensors only, local files only). ``from_pretrained`` calls it after
        checking the declared shapes against the weights file's header."""
        raise UnsupportedModelError(
            f"{folder}: {type(self).__name__} (library {self.library!r}) cannot load a folder that slimkit did "
            "not write; save the model with slimkit.save_pretrained, or load it with its own library"
        )

    def check_config(self, config: dict[str, Any], file: Any) -> None:
        """Raise ``FormatError`` (naming ``file`` and the field) for a config value that would make
        building run code, touch the network or fail with a raw error (``config`` has no
        ``"slimkit"`` block). Called before any model is built from a folder."""

    def extra_files(self, model: nn.Module, source: Any, folder: Any) -> bool:
        """Copy files the family's other tools need from the folder the model was loaded from
        (``source``, None if unknown) into the folder being saved; True when any were."""
        return False

    def init_non_persistent_buffers(self, model: nn.Module, loaded: set[str]) -> None:
        """After a model built on the meta device got the tensors ``loaded`` from a file: compute
        the buffers no file holds (position ids, rotary frequencies, ...), which are zeros now."""


class TorchAdapter(ModelAdapter):
    """Fallback for a plain ``nn.Module``: knows only what the module structure shows.

    Its folders hold the weights and the manifest of final shapes, plus the class's name and
    module in ``config.json``; no code. ``slimkit.from_pretrained(path, model=MyNet())`` rebuilds
    the pruned shapes on the fresh instance the user passes, and loads the weights into it.
    """

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return True

    def config_dict(self, model: nn.Module) -> dict[str, Any]:
        cls = type(model)
        return {"torch_class": cls.__qualname__, "torch_module": cls.__module__}

    def build(self, config: dict[str, Any]) -> nn.Module:
        name = config.get("torch_class", "?")
        module = config.get("torch_module", "?")
        from ..errors import FormatError

        raise FormatError(
            f"config.json holds a plain PyTorch model ({name} from module {module}); slimkit never runs code "
            f"from a folder, so it cannot build one. Pass a fresh instance: "
            f"slimkit.from_pretrained(path, model={name}(...))"
        )


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Run ``model`` on example inputs given as a tensor, a tuple/list or a dict of kwargs."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def batch_inputs(batch: Any, device: torch.device, role: str = "calibrate") -> Any:
    """What to call the model with for one data batch: a dict of keyword tensors (HF; ``labels``
    dropped), the first item of an ``(inputs, targets)`` tuple / list, or a tensor."""
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k != "labels"}
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    raise UnsupportedModelError(
        f"{role}: cannot feed a batch of type {type(batch).__name__} to the model; batches must be tensors, "
        "(inputs, targets) tuples or dicts of keyword tensors (tokenizer outputs)"
    )


def get_logits(outputs: Any) -> torch.Tensor | None:
    """The logits in a model's outputs: a tensor, ``.logits`` / ``["logits"]``, or a tuple's first."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, dict):
        logits = outputs.get("logits")
    is_tuple = isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor)
    if logits is None and is_tuple and getattr(outputs, "last_hidden_state", None) is None:
        logits = outputs[0]
    return logits


def get_loss(outputs: Any) -> torch.Tensor | None:
    loss = getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, dict):
        loss = outputs.get("loss")
    return loss
