"""Hub-style folders: ``config.json`` + ``model.safetensors`` (+ ``README.md``).

``config.json`` is the base library's own config (transformers' or timm's) plus one
``"slimkit"`` block: the format version, the library and class, the recipe, and one entry
per method that changed the architecture (``pruning``, ``quantization``), from which
``from_pretrained`` rebuilds the model before loading the compact weights. Nothing is ever
unpickled; loading never runs code from the folder.

Writes are atomic: a new folder is written beside the target and renamed into place; into an
existing folder the files are first written to a temporary subfolder and renamed over the old
ones only when all of them are complete, ``config.json`` last. The config records the SHA-256
of the weights, so a weights file from another save, or a corrupt one, is reported by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .adapters import adapter_for_library, get_adapter
from .errors import FormatError
from .modules import SLIMKIT_ATTR

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
PLOT_NAME = "kept.png"
_MANAGED = (WEIGHTS_NAME, PLOT_NAME, CARD_NAME, CONFIG_NAME)  # written in this order; config.json commits


# ----------------------------------------------------------------------------------------
# method blocks: how pruning / quantization describe and rebuild their architecture changes
# ----------------------------------------------------------------------------------------


@dataclass
class Block:
    name: str
    describe: Callable[[nn.Module], dict | None]  # model -> JSON-able block, or None if not applicable
    rebuild: Callable[[nn.Module, dict], nn.Module]  # fresh base model + block -> final structure


_BLOCKS: dict[str, Block] = {}


def register_block(name: str, describe: Callable, rebuild: Callable) -> None:
    """Let a method record what it changed (``describe``) and redo it on load (``rebuild``).

    On load, pruning is replayed before quantization, then any other block.
    """
    _BLOCKS[name] = Block(name, describe, rebuild)


# Architecture changes are replayed in the order they were made: pruning slices the float
# model, quantization then swaps its layers. Blocks registered by other packages come after.
_ORDER = ("pruning", "quantization")


def _blocks_in_order() -> list[Block]:
    return sorted(_BLOCKS.values(), key=lambda b: _ORDER.index(b.name) if b.name in _ORDER else len(_ORDER))


def _load_method_blocks() -> None:
    # The method packages register their blocks on import; they need only torch.
    from . import prune, quant  # noqa: F401


# ----------------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------------


def student_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors without what slimkit attached, tied duplicates dropped, contiguous."""
    seen: dict[tuple, str] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if key == SLIMKIT_ATTR or key.startswith(SLIMKIT_ATTR + "."):
            continue
        if tensor.device.type != "meta" and tensor.numel():
            ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if ident in seen:  # a tied weight (e.g. lm_head <- embeddings): saved once, re-tied on load
                continue
            seen[ident] = key
        out[key] = tensor.detach().to("cpu").contiguous()
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_folder(
    model: nn.Module, folder: Path, recipe: Any, card: Callable | None, extra_report: dict | None = None
) -> None:
    from . import __version__

    adapter = get_adapter(model)
    config = adapter.config_dict(model)
    state = student_state_dict(model)
    weights = folder / WEIGHTS_NAME
    save_file(state, str(weights), metadata={"format": "pt", "slimkit_format": str(FORMAT_VERSION)})
    _fsync(weights)

    _load_method_blocks()
    block: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "version": __version__,
        "library": adapter.library,
        "class": type(model).__name__,
        "weights_sha256": _sha256(weights),
    }
    if recipe is None:
        recipe = getattr(getattr(model, "_slimkit_info", None), "recipe", None)
    if recipe is not None:
        block["recipe"] = recipe.to_dict() if hasattr(recipe, "to_dict") else recipe
    for method in _blocks_in_order():
        described = method.describe(model)
        if described:
            block[method.name] = described
    report = dict(getattr(getattr(model, "_slimkit_info", None), "report", None) or {})
    if extra_report:
        report["metrics"] = {**report.get("metrics", {}), **extra_report}
    if report:
        block["report"] = report
    config["slimkit"] = block
    kept = report.get("kept") or {}
    if kept.get("channels") or kept.get("heads"):
        from .report import plot_kept

        plot_kept(kept, folder / PLOT_NAME)

    if card is not None:
        (folder / CARD_NAME).write_text(card(model, config))
    text = json.dumps(config, indent=2, sort_keys=False, default=_json_default) + "\n"
    (folder / CONFIG_NAME).write_text(text)
    _fsync(folder / CONFIG_NAME)


def _json_default(value: Any) -> Any:
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"config value of type {type(value).__name__} is not JSON-serialisable")


def save_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    recipe: Any = None,
    model_card: bool = True,
    report: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as a hub-style folder at ``path`` and return the path.

    HF ``PreTrainedModel``s, timm models and plain ``nn.Module``s are supported (the latter load
    with ``from_pretrained(path, model=MyNet())``). Projectors, masks and other training state
    that slimkit attached are never saved. A failed save leaves an existing folder as it was.
    ``report`` adds metrics (e.g. ``{"accuracy": 0.97}``) to the model card and config block; the
    before -> after measurements of ``slimkit.convert`` are written automatically.
    """
    from .report import model_card as default_card

    target = Path(path)
    card = default_card if model_card else None
    if target.exists() and not target.is_dir():
        raise FormatError(f"save_pretrained: {str(target)!r} exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
        try:
            _write_folder(model, tmp, recipe, card, report)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    tmp = Path(tempfile.mkdtemp(prefix=".slimkit-saving-", dir=target))
    try:
        _write_folder(model, tmp, recipe, card, report)
        for name in _MANAGED:  # config.json last: it names the weights it belongs to
            if (tmp / name).exists():
                os.replace(tmp / name, target / name)
            elif name in (CARD_NAME, PLOT_NAME) and (target / name).exists():
                (target / name).unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a folder, with errors that name the file."""
    folder = Path(path)
    if not folder.is_dir():
        raise FormatError(f"{str(folder)!r} is not a folder; from_pretrained needs a folder with {CONFIG_NAME}")
    file = folder / CONFIG_NAME
    if not file.is_file():
        raise FormatError(f"{file} is missing; a hub-style folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{file} is not valid JSON ({exc}); the file is corrupt, save the model again") from None
    if not isinstance(config, dict):
        raise FormatError(f"{file} must hold a JSON object")
    return config


def _library_of(config: dict[str, Any], file: Path) -> str:
    block = config.get("slimkit")
    if isinstance(block, dict) and "library" in block:
        return block["library"]
    if "model_type" in config:
        return "transformers"
    if "architecture" in config:
        return "timm"
    raise FormatError(f"{file} holds neither a transformers config ('model_type') nor a timm config ('architecture')")


def _check_version(block: dict[str, Any], file: Path) -> None:
    version = block.get("format_version")
    if not isinstance(version, int):
        raise FormatError(f"{file}: the 'slimkit' block has no integer format_version")
    if version > FORMAT_VERSION:
        raise FormatError(
            f"{file} was written by slimkit format {version} (slimkit {block.get('version', '?')}); this "
            f"slimkit reads formats up to {FORMAT_VERSION}. Upgrade slimkit: pip install -U slimkit"
        )


def load_weights(file: Path, expected_sha: str | None = None) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise FormatError(f"{file} is missing; save the model again with slimkit.save_pretrained")
    if expected_sha is not None and _sha256(file) != expected_sha:
        raise FormatError(
            f"{file} does not match {file.parent / CONFIG_NAME} (SHA-256 differs): the file is corrupt or "
            "from another save. Save the model again."
        )
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise FormatError(f"{file} is not a readable safetensors file ({exc}); save the model again") from None


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], file: Path) -> None:
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise FormatError(f"{file} holds tensors the model does not have: {unexpected[:5]}")
    for key, tensor in state.items():
        if tuple(expected[key].shape) != tuple(tensor.shape):
            raise FormatError(
                f"{file}: {key} has shape {tuple(tensor.shape)} but the rebuilt model expects "
                f"{tuple(expected[key].shape)}; config.json and the weights do not belong together"
            )
    model.load_state_dict(state, strict=False)
    loaded = {(t.untyped_storage().data_ptr(), t.storage_offset()) for k, t in model.state_dict().items() if k in state}
    missing = [
        k
        for k in sorted(set(expected) - set(state))
        if (expected[k].untyped_storage().data_ptr(), expected[k].storage_offset()) not in loaded
        and not k.startswith(SLIMKIT_ATTR + ".")
    ]
    if missing:
        raise FormatError(f"{file} lacks tensors the model needs: {missing[:5]}")


def _check_instance(model: nn.Module, block: dict[str, Any], config: dict[str, Any], file: Path) -> None:
    """``model=`` must be a fresh instance of the class the folder was saved from."""
    expected = block.get("class")
    cls = type(model)
    if cls.__name__ != expected:
        where = config.get("torch_module")
        raise FormatError(
            f"{file} holds a {expected}{f' (module {where})' if where else ''}, but model= is a "
            f"{cls.__module__}.{cls.__qualname__}; pass a fresh {expected}(...) built with the arguments it was "
            "trained with"
        )
    if SLIMKIT_ATTR in model._modules:
        raise FormatError(
            f"from_pretrained(model=...): the {cls.__name__} given is prepared by slimkit; pass a fresh instance"
        )


def from_pretrained(
    path: str | os.PathLike, *, model: nn.Module | None = None, device: str | torch.device = "cpu"
) -> nn.Module:
    """Load a hub-style folder: a slimkit folder (any pruning / INT8 is rebuilt), or a plain
    transformers or timm folder. Returns the model in eval mode.

    ``model`` is a fresh instance of the saved class to load into (required for plain
    ``nn.Module`` models, which slimkit cannot build from a config; optional otherwise): the
    recorded pruning (and INT8) is replayed on it, then the weights are loaded with strict
    shape checks. A model of another class is refused with a ``FormatError``.
    """
    folder = Path(path)
    config = read_config(folder)
    file = folder / CONFIG_NAME
    library = _library_of(config, file)
    adapter = adapter_for_library(library)
    block = config.pop("slimkit", None)
    if block is None:  # a plain folder written by transformers or timm: their own loaders
        if model is not None:
            raise FormatError(f"{file} was not written by slimkit; model= is only for slimkit folders")
        return adapter.load_plain(folder).to(device).eval()
    if not isinstance(block, dict):
        raise FormatError(f"{file}: 'slimkit' must be a JSON object")
    _check_version(block, file)
    if model is not None:
        _check_instance(model, block, config, file)
    else:
        model = adapter.build(config)
    _load_method_blocks()
    for method in _blocks_in_order():
        if method.name in block:
            model = method.rebuild(model, block[method.name])
    _load_into(model, load_weights(folder / WEIGHTS_NAME, block.get("weights_sha256")), folder / WEIGHTS_NAME)
    info = _LoadedInfo(folder=str(folder), block=block)
    object.__setattr__(model, "_slimkit_info", info)
    return model.to(device).eval()


def build_architecture(path: str | os.PathLike, blocks: tuple[str, ...] = ("pruning",)) -> nn.Module:
    """The architecture of a saved folder with only the given blocks replayed and *random*
    weights, e.g. the float pruned model of an INT8 folder, to measure its speed or size."""
    folder = Path(path)
    config = read_config(folder)
    block = config.pop("slimkit", None) or {}
    model = adapter_for_library(_library_of(config, folder / CONFIG_NAME)).build(config)
    _load_method_blocks()
    for method in _blocks_in_order():
        if method.name in block and method.name in blocks:
            model = method.rebuild(model, block[method.name])
    return model.eval()


@dataclass
class _LoadedInfo:
    folder: str
    block: dict[str, Any]

    @property
    def recipe(self) -> Any:
        return self.block.get("recipe")

    @property
    def report(self) -> dict[str, Any]:
        return self.block.get("report") or {}
