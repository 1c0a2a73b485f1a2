"""timm integration: what slimkit knows of timm models.

* the classifier and stem come from the model's ``pretrained_cfg`` (``classifier``,
  ``first_conv``), so they are excluded from pruning by default;
* attention probabilities of ViT-style ``Attention`` blocks (fused qkv) are recomputed from
  the ``qkv`` projection's output (timm runs fused SDPA, which never materialises them);
* folders use timm's own ``config.json`` (``architecture`` + ``model_args`` +
  ``pretrained_cfg``), so a dense model also loads with ``timm.create_model('local-dir:...')``.
"""

from __future__ import annotations

import copy
import inspect
import json
import tempfile
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import _hub as timm_hub
from timm.models import _input as timm_input
from torch import nn

from slimkit.adapters import BlockStack, HeadLayout, ModelAdapter, register_adapter
from slimkit.errors import FormatError, UnsupportedModelError
from slimkit.modules import get_module, user_named_modules
from slimkit.quant.fold import register_norm_remainder
from slimkit.quant.layers import register_plain_forward
from slimkit.quiet import quiet_logs
from slimkit.recipe_io import short_repr

# create_model's own keyword options (everything else in model_args goes to the model class).
_CREATE_MODEL_OPTIONS = frozenset(
    [*inspect.signature(timm.create_model).parameters, "pretrained_strict", "feature_cfg", "kwargs_filter"]
) - {"kwargs", "model_name"}


# What quantization needs to know of timm's layers: its Linear overrides forward only to add dtype
# casts under TorchScript (it computes nn.Linear); a folded BatchNormAct2d still runs its dropout
# and activation after the conv that computes its normalization.
register_plain_forward(timm.layers.Linear)
register_norm_remainder(timm.layers.BatchNormAct2d, lambda bn, x: bn.act(bn.drop(x)))


def _names(model: nn.Module, value: Any) -> list[str]:
    values = [value] if isinstance(value, str) else list(value or [])
    present = {n for n, _ in user_named_modules(model)}
    return [v for v in values if v in present]


def _is_transformer_block(module: nn.Module) -> bool:
    """A ViT-style block: ``x + attn(...)``, then ``x + mlp(...)`` (timm ``Block`` and its kin)."""
    return hasattr(module, "attn") and hasattr(module, "mlp")


def _has_identity_shortcut(module: nn.Module) -> bool:
    """A residual block whose shortcut is the identity: ResNet blocks without a downsample,
    ConvNeXt / GhostNet blocks with an identity (or empty) shortcut, EfficientNet / MobileNet
    blocks with a skip."""
    if hasattr(module, "downsample") and hasattr(module, "conv1"):
        return module.downsample is None
    shortcut = getattr(module, "shortcut", None)
    if isinstance(shortcut, nn.Identity) or (isinstance(shortcut, nn.Sequential) and len(shortcut) == 0):
        return True
    return getattr(module, "has_skip", None) is True


def is_timm_attention(module: nn.Module) -> bool:
    """A ViT-style attention block with a fused ``qkv`` Linear and ``num_heads``."""
    return isinstance(getattr(module, "qkv", None), nn.Linear) and hasattr(module, "num_heads")


@register_adapter
class TimmAdapter(ModelAdapter):
    library = "timm"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__module__.startswith("timm.")

    def classifier_names(self, model: nn.Module) -> list[str]:
        return _names(model, getattr(model, "pretrained_cfg", {}).get("classifier"))

    def stem_names(self, model: nn.Module) -> list[str]:
        return _names(model, getattr(model, "pretrained_cfg", {}).get("first_conv"))

    def attention_modules(self, model: nn.Module) -> list[str]:
        return [n for n, m in user_named_modules(model) if is_timm_attention(m)]

    def capture_attention(self, model: nn.Module, name: str, store: dict[str, torch.Tensor]) -> list[Any]:
        attn = get_module(model, name)
        if not is_timm_attention(attn):
            hits = self.attention_modules(model)[:4]
            raise UnsupportedModelError(
                f"attention KD: {name!r} in {type(model).__name__} is a {type(attn).__name__}, not a timm "
                f"Attention block with a fused qkv; attention blocks here are e.g. {hits}"
            )

        def hook(qkv_module: nn.Module, args: Any, qkv: torch.Tensor) -> None:
            b, n, _ = qkv.shape
            heads, head_dim = attn.num_heads, attn.head_dim
            q, k, _v = qkv.reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            q, k = attn.q_norm(q), attn.k_norm(k)
            store[name] = torch.softmax((q * attn.scale) @ k.transpose(-2, -1), dim=-1)

        return [attn.qkv.register_forward_hook(hook)]

    # -- head pruning ----------------------------------------------------------------------------
    def attention_heads(self, model: nn.Module) -> list[HeadLayout]:
        """timm ``Attention``: one fused qkv Linear ([q; k; v], head-major), an optional per-head
        sigmoid ``gate`` Linear, and ``proj``, whose inputs are the heads side by side."""
        layouts = []
        for name, attn in user_named_modules(model):
            if not is_timm_attention(attn):
                continue
            heads, head_dim = attn.num_heads, getattr(attn, "head_dim", None)
            width = heads * head_dim if head_dim else None
            proj = getattr(attn, "proj", None)
            problem = None
            if width is None or attn.qkv.out_features != 3 * width:
                problem = "its qkv projection is not [q; k; v] of num_heads * head_dim each"
            elif not isinstance(proj, nn.Linear) or proj.in_features != width:
                problem = "it has no output projection 'proj' over the heads"
            elif not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
                problem = "a norm over all heads (scale_norm) sees every head"
            elif any(True for _ in attn.named_parameters(recurse=False)):
                own = [n for n, _ in attn.named_parameters(recurse=False)]
                problem = f"it has per-head parameters ({', '.join(own)}) slimkit does not slice"
            gate = getattr(attn, "gate", None)
            query = [(f"{name}.qkv", 0)] + ([(f"{name}.gate", 0)] if isinstance(gate, nn.Linear) else [])
            layouts.append(
                HeadLayout(
                    name=name,
                    num_heads=heads,
                    num_kv_heads=heads,
                    head_dim=head_dim or 0,
                    query=query,
                    key_value=[(f"{name}.qkv", width or 0), (f"{name}.qkv", 2 * (width or 0))],
                    output=[(f"{name}.proj", 0)],
                    unsupported=problem,
                )
            )
        return layouts

    def set_attention_heads(self, model: nn.Module, layout: HeadLayout, num_heads: int, num_kv_heads: int) -> None:
        attn = get_module(model, layout.name)
        attn.num_heads = num_heads
        if hasattr(attn, "attn_dim"):
            attn.attn_dim = num_heads * layout.head_dim

    def block_stacks(self, model: nn.Module) -> list[BlockStack]:
        """Every ``Sequential`` / ``ModuleList`` of residual blocks: ViT-style blocks (all of them)
        and CNN blocks whose shortcut is the identity (a ResNet stage without its first,
        downsampling block; ConvNeXt, EfficientNet, GhostNet blocks that keep their width)."""
        stacks = []
        for name, container in user_named_modules(model):
            if not isinstance(container, (nn.Sequential, nn.ModuleList)):
                continue
            children = list(container.children())
            tokens = [i for i, c in enumerate(children) if _is_transformer_block(c)]
            convs = [i for i, c in enumerate(children) if not _is_transformer_block(c) and _has_identity_shortcut(c)]
            if tokens:
                stacks.append(BlockStack(name, len(children), tokens, channel_dim=-1))
            elif convs:
                stacks.append(BlockStack(name, len(children), convs, channel_dim=1))
        return stacks

    def after_pruning(self, model: nn.Module) -> dict[str, Any]:
        """Refresh ``num_features`` / ``head_hidden_size`` (what reset_classifier and feature
        users read) from a forward pass; timm configs cannot express pruned widths, so the
        saved manifest carries them."""
        if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
            return {}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                features = model.forward_features(self.example_inputs(model, batch_size=1))
                pre_logits = model.forward_head(features, pre_logits=True)
        finally:
            model.train(was_training)
        if hasattr(model, "num_features"):
            model.num_features = features.shape[1] if features.dim() == 4 else features.shape[-1]
        if hasattr(model, "head_hidden_size"):
            model.head_hidden_size = pre_logits.shape[-1]
        return {}

    def example_inputs(self, model: nn.Module, batch_size: int = 2) -> torch.Tensor:
        config = timm_input.get_model_input_config(model)
        c, h, w = config["input_size"]
        if not config.get("fixed_input_size", False):
            h, w = min(h, 64), min(w, 64)  # any size works; small keeps tracing cheap
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return torch.randn(batch_size, c, h, w, device=device)

    # -- folders ---------------------------------------------------------------------------------
    def config_dict(self, model: nn.Module) -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as tmp, quiet_logs("timm.data.model_config"):
            path = Path(tmp) / "config.json"
            timm_hub.save_config_for_hf(model, str(path))
            return json.loads(path.read_text())

    def check_config(self, config: dict[str, Any], file: Any) -> None:
        """The architecture must be a model timm registers (never ``hf-hub:`` / ``local-dir:``,
        which fetch configs and weights), and ``model_args`` must not carry ``create_model``'s own
        options (``checkpoint_path`` would unpickle a file, ``pretrained`` download one)."""
        name = config.get("architecture")
        if not isinstance(name, str) or ":" in name or "/" in name or not timm.is_model(name):
            raise FormatError(
                f"{file}: architecture must name a model timm registers (timm.list_models()), got "
                f"{short_repr(name)}; hub ('hf-hub:...') and path ('local-dir:...') names are not loaded"
            )
        args = config.get("model_args", {})
        if not isinstance(args, dict):
            raise FormatError(f"{file}: model_args must be a JSON object, got {short_repr(args)}")
        refused = sorted(set(args) & _CREATE_MODEL_OPTIONS)
        if refused:
            raise FormatError(
                f"{file}: model_args.{refused[0]} is an option of timm.create_model, not a model argument; a folder "
                "cannot set it (it would load or download other files)"
            )
        for key in ("pretrained_cfg", "num_features"):
            if key in config and not isinstance(config[key], dict if key == "pretrained_cfg" else (int, type(None))):
                raise FormatError(f"{file}: {key} has the wrong type ({short_repr(config[key])})")

    def init_non_persistent_buffers(self, model: nn.Module, loaded: set[str]) -> None:
        """timm's own hook for what checkpoints do not hold (relative position indices, RoPE)."""
        from timm.models._manipulate import reinit_non_persistent_buffers

        reinit_non_persistent_buffers(model)

    def build(self, config: dict[str, Any]) -> nn.Module:
        cfg = copy.deepcopy(config)
        cfg.pop("slimkit", None)
        pretrained_cfg, name, model_args = timm_hub._parse_model_cfg(cfg, {"source": "local-dir"})
        return timm.create_model(name, pretrained=False, pretrained_cfg=pretrained_cfg, **model_args)

    def load_plain(self, folder: Path) -> nn.Module:
        from slimkit.hub import read_config

        self.check_config(read_config(folder), folder / "config.json")
        if not (folder / "model.safetensors").is_file():
            raise FormatError(
                f"{folder / 'model.safetensors'} is missing; slimkit loads safetensors only (never pickle)"
            )
        return timm.create_model(f"local-dir:{folder}", pretrained=True)
