"""Hub-style folders: ``config.json`` + ``model.safetensors`` (+ ``README.md``).

``config.json`` is the base library's own config (transformers' or timm's) plus one
``"slimkit"`` block: the format version, the library and class, the recipe, and one entry
per method that changed the architecture (``pruning``, ``quantization``), from which
``from_pretrained`` rebuilds the model before loading the compact weights. Nothing is ever
unpickled; loading never runs code from the folder.

Writes are atomic for the whole folder: the new folder is written complete beside the target
and swapped into place in one rename (:mod:`slimkit.atomic`), carrying over the files slimkit
does not manage. The config records the SHA-256 of the weights, so a weights file from another
save, or a corrupt one, is reported by name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .adapters import adapter_for_library, get_adapter
from .atomic import interrupted_swap, replace_folder, sha256_file
from .errors import FormatError, SlimkitError
from .folder_checks import check_slimkit_block, check_tree, library_of
from .methods import hub_blocks
from .model_info import ModelInfo, model_info, set_model_info
from .modules import SLIMKIT_ATTR, attached_by_slimkit
from .packing import pack
from .safe_build import (
    Header,
    NeedsCpuBuild,
    build_on_meta,
    check_against_header,
    check_cpu_build,
    check_plain_folder,
    load_state,
    materialize,
    read_header,
    unpack_header,
)

# 2: the small tensors of INT8 folders are packed (slimkit.packing); other folders are still
# written as format 1, which every slimkit reads.
FORMAT_VERSION = 2
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
PLOT_NAME = "kept.png"
_MANAGED = (WEIGHTS_NAME, PLOT_NAME, CARD_NAME, CONFIG_NAME)  # written in this order; config.json commits
MAX_CONFIG_BYTES = 64 << 20


# The method blocks (``pruning``, ``quantization``, any registered method's) come from the
# method registry (slimkit/methods.py), in its order: pruning slices the float model first,
# quantization then swaps its layers. The registry names each block's functions by reference,
# so this module imports no method package, and no method package imports this one.


# ----------------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------------


def student_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors without what slimkit attached, tied duplicates dropped, contiguous."""
    seen: dict[tuple, str] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if attached_by_slimkit(key):
            continue
        if tensor.device.type != "meta" and tensor.numel():
            ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if ident in seen:  # a tied weight (e.g. lm_head <- embeddings): saved once, re-tied on load
                continue
            seen[ident] = key
        out[key] = tensor.detach().to("cpu").contiguous()
    return out


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_folder(
    model: nn.Module,
    folder: Path,
    recipe: Any,
    card: Callable | None,
    extra_report: dict | None = None,
    files_from: Any = None,
) -> None:
    from . import __version__

    adapter = get_adapter(model)
    config = adapter.config_dict(model)
    described = {method.name: method.call("describe", model) for method in hub_blocks()}
    described = {name: value for name, value in described.items() if value}
    state, metadata = student_state_dict(model), {}
    if "quantization" in described:  # only slimkit loads these folders: pack their small tensors
        state, metadata = pack(state)
    version = FORMAT_VERSION if metadata else 1
    weights = folder / WEIGHTS_NAME
    save_file(state, str(weights), metadata={"format": "pt", "slimkit_format": str(version), **metadata})
    _fsync(weights)

    block: dict[str, Any] = {
        "format_version": version,
        "version": __version__,
        "library": adapter.library,
        "class": type(model).__name__,
        "weights_sha256": sha256_file(weights),
    }
    if recipe is None:
        recipe = getattr(model_info(model), "recipe", None)
    if recipe is not None:
        block["recipe"] = recipe.to_dict() if hasattr(recipe, "to_dict") else recipe
    block.update(described)
    # Whether transformers / timm alone can load the folder: said first by the card and `slimkit info`.
    block["native_load"] = "quantization" not in block and _builds_natively(adapter, model, config)
    report = dict(getattr(model_info(model), "report", None) or {})
    if extra_report:
        report["metrics"] = {**report.get("metrics", {}), **extra_report}
    if report:
        block["report"] = report
    config["slimkit"] = block
    kept = report.get("kept") or {}
    if kept.get("channels") or kept.get("heads"):
        from .report import plot_kept

        plot_kept(kept, folder / PLOT_NAME)

    source = files_from or getattr(model_info(model), "folder", None)
    if adapter.extra_files(model, source, folder):  # e.g. sentence-transformers' modules.json and pooling
        block["sentence_transformers"] = True
    if card is not None:
        (folder / CARD_NAME).write_text(card(model, config))
    text = json.dumps(config, indent=2, sort_keys=False, default=_json_default) + "\n"
    (folder / CONFIG_NAME).write_text(text)
    _fsync(folder / CONFIG_NAME)


def _builds_natively(adapter: Any, model: nn.Module, config: dict[str, Any]) -> bool:
    """The base library's build of ``config`` has exactly the model's tensor shapes (a dense or
    uniformly pruned model); checked on the meta device."""
    try:
        with torch.device("meta"):
            fresh = adapter.build(config)
    except Exception:  # a config its library cannot build alone
        return False
    own = {k: tuple(v.shape) for k, v in student_state_dict(model).items()}
    return all(tuple(t.shape) == own.get(k, tuple(t.shape)) for k, t in fresh.state_dict().items()) and set(own) <= set(
        fresh.state_dict()
    )


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
    files_from: str | os.PathLike | None = None,
) -> Path:
    """Write ``model`` as a hub-style folder at ``path`` and return the path.

    HF ``PreTrainedModel``s, timm models and plain ``nn.Module``s are supported (the latter load
    with ``from_pretrained(path, model=MyNet())``). Projectors, masks and other training state
    that slimkit attached are never saved. A failed save leaves an existing folder as it was.
    ``report`` adds metrics (e.g. ``{"accuracy": 0.97}``) to the model card and config block; the
    before -> after measurements of ``slimkit.convert`` are written automatically.
    ``files_from`` is a folder whose sentence-transformers files (``modules.json``, pooling) are
    kept in the new folder; by default the folder the model was loaded from.

    In a process group (DDP, FSDP2) only rank 0 writes; the other processes return at once, so
    call it on every process or on rank 0 alone (then a barrier before others read the folder).
    A model still sharded by ``fully_shard`` is refused: ``slimkit.convert`` gathers it first.
    """
    from .distributed import is_main_process, is_sharded
    from .report import model_card as default_card

    target = Path(path)
    if is_sharded(model):
        raise SlimkitError(
            f"save_pretrained: {type(model).__name__} is sharded by fully_shard (FSDP2): each process holds "
            "only a part of its parameters. Call slimkit.convert(model) on every process first (it gathers "
            "the whole model), or slimkit.distributed.gather_full_model_(model) for a model without a recipe, "
            "then save."
        )
    if not is_main_process():
        return target
    card = default_card if model_card else None
    if target.exists() and not target.is_dir():
        raise FormatError(f"save_pretrained: {str(target)!r} exists and is not a folder")
    # The whole folder is written beside the target and swapped in at once (slimkit.atomic):
    # files slimkit does not manage (a tokenizer, notes) are carried over.
    return replace_folder(
        target, lambda staging: _write_folder(model, staging, recipe, card, report, files_from), _MANAGED
    )


# ----------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a folder, with errors that name the file (depth and size bounded)."""
    folder = Path(path)
    if not folder.is_dir():
        aside = interrupted_swap(folder)
        if aside is not None:
            raise FormatError(
                f"{str(folder)!r} is missing: a save into it was interrupted between its two renames; the "
                f"previous contents are in {str(aside)!r}. Move that folder back to {str(folder)!r}."
            )
        raise FormatError(f"{str(folder)!r} is not a folder; from_pretrained needs a folder with {CONFIG_NAME}")
    file = folder / CONFIG_NAME
    if not file.is_file():
        raise FormatError(f"{file} is missing; a hub-style folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise FormatError(f"{file} is {file.stat().st_size:,} bytes; a model config is far smaller")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{file} is not valid JSON ({exc}); the file is corrupt, save the model again") from None
    except RecursionError:
        raise FormatError(f"{file} is nested too deeply to be a model config") from None
    if not isinstance(config, dict):
        raise FormatError(f"{file} must hold a JSON object")
    check_tree(config, file)
    return config


def _check_version(block: dict[str, Any], file: Path) -> None:
    version = block["format_version"]
    if version > FORMAT_VERSION:
        raise FormatError(
            f"{file} was written by slimkit format {version} (slimkit {block.get('version', '?')}); this "
            f"slimkit reads formats up to {FORMAT_VERSION}. Upgrade slimkit: pip install -U slimkit"
        )


def _check_checksum(file: Path, expected_sha: str | None) -> None:
    if not file.is_file():
        raise FormatError(f"{file} is missing; save the model again with slimkit.save_pretrained")
    if expected_sha is not None and sha256_file(file) != expected_sha:
        raise FormatError(
            f"{file} does not match {file.parent / CONFIG_NAME} (SHA-256 differs): the file is corrupt or "
            "from another save. Save the model again."
        )


def _replay(block: dict[str, Any], names: tuple[str, ...] | None = None) -> Callable[[nn.Module], nn.Module]:
    def rebuild(model: nn.Module) -> nn.Module:
        for method in hub_blocks():
            if method.name in block and (names is None or method.name in names):
                model = method.call("rebuild", model, block[method.name])
        return model

    return rebuild


def _build_checked(adapter: Any, config: dict[str, Any], block: dict[str, Any], header: Header) -> nn.Module:
    """The model of a slimkit folder, its size checked on the meta device before allocation
    (:mod:`slimkit.safe_build`), the compact weights assigned, the loaded values checked."""
    file = header.file.parent / CONFIG_NAME
    try:
        model, base_bytes = build_on_meta(lambda: adapter.build(config), _replay(block), header, file)
    except FormatError as exc:  # the method blocks name "config.json": say which one
        message = str(exc)
        raise FormatError(
            f"{file}{message[len(CONFIG_NAME) :]}" if message.startswith(CONFIG_NAME) else message
        ) from None
    header = unpack_header(header, model)
    check_against_header(model, header)
    try:
        model = materialize(model, header, adapter.init_non_persistent_buffers)
    except NeedsCpuBuild:  # tensors outside the state_dict: build for real, when that is small enough
        check_cpu_build(base_bytes, header)
        model = _replay(block)(adapter.build(config))
        model.load_state_dict(load_state(header), strict=False)
    _check_loaded(model, block, header.file)
    return model


def _check_loaded(model: nn.Module, block: dict[str, Any], file: Path) -> None:
    for method in hub_blocks():
        if method.name in block:
            method.call("check", model, file)


def _load_into_instance(model: nn.Module, block: dict[str, Any], header: Header) -> nn.Module:
    """A user's fresh instance (``from_pretrained(path, model=...)``): the recorded changes
    replayed on it, its shapes checked against the weights file's header before loading."""
    model = _replay(block)(model)
    header = unpack_header(header, model)
    check_against_header(model, header)
    model.load_state_dict(load_state(header), strict=False)
    _check_loaded(model, block, header.file)
    return model


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


def _open(path: str | os.PathLike) -> tuple[Path, dict[str, Any], Path, Any, dict[str, Any] | None]:
    """A folder's path, its config (checked by its library's adapter, the slimkit block taken
    out), the config file, the adapter and the slimkit block (None for a plain folder)."""
    folder = Path(path)
    config = read_config(folder)
    file = folder / CONFIG_NAME
    adapter = adapter_for_library(library_of(config, file))
    block = config.pop("slimkit", None)
    adapter.check_config(config, file)
    return folder, config, file, adapter, block


def _checked_block(block: dict[str, Any], folder: Path, file: Path) -> tuple[dict[str, Any], Header]:
    block = check_slimkit_block(block, file)
    _check_version(block, file)
    _check_checksum(folder / WEIGHTS_NAME, block.get("weights_sha256"))
    return block, read_header(folder / WEIGHTS_NAME)


def folder_state_dict(path: str | os.PathLike, *, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a folder's weights file under the model's own keys, packed ones split
    (INT8 folders, :mod:`slimkit.packing`), without loading the model: what to read instead of
    ``safetensors.torch.load_file`` to inspect a slimkit folder. The layout comes from the model
    rebuilt on the meta device; a plain ``nn.Module`` folder needs ``model=`` (a fresh instance,
    which the recorded pruning / INT8 is replayed on, as in ``from_pretrained``)."""
    folder, config, file, adapter, block = _open(path)
    if block is None:
        return load_state(read_header(folder / WEIGHTS_NAME))
    block, header = _checked_block(block, folder, file)
    if model is not None:
        _check_instance(model, block, config, file)
        layout_model = _replay(block)(model)
    else:
        layout_model, _ = build_on_meta(lambda: adapter.build(config), _replay(block), header, file)
    return load_state(unpack_header(header, layout_model))


def from_pretrained(
    path: str | os.PathLike, *, model: nn.Module | None = None, device: str | torch.device = "cpu"
) -> nn.Module:
    """Load a hub-style folder: a slimkit folder (any pruning / INT8 is rebuilt), or a plain
    transformers or timm folder. Returns the model in eval mode.

    ``model`` is a fresh instance of the saved class to load into (required for plain
    ``nn.Module`` models, which slimkit cannot build from a config; optional otherwise): the
    recorded pruning (and INT8) is replayed on it, then the weights are loaded with strict
    shape checks. A model of another class is refused with a ``FormatError``.

    Nothing in the folder can run code, nothing is unpickled, and no tensor is allocated before
    the declared architecture was checked against the weights file's header (docs/security.md)."""
    folder, config, file, adapter, block = _open(path)
    if block is None:  # a plain folder written by transformers or timm: their own loaders, sizes checked first
        if model is not None:
            raise FormatError(f"{file} was not written by slimkit; model= is only for slimkit folders")
        header = read_header(folder / WEIGHTS_NAME) if (folder / WEIGHTS_NAME).is_file() else None
        if header is not None:
            meta, _ = build_on_meta(lambda: adapter.build(config), lambda m: m, header, file)
            check_plain_folder(meta, header)
        model = adapter.load_plain(folder)
        set_model_info(model, ModelInfo(folder=str(folder)))
        return model.to(device).eval()
    block, header = _checked_block(block, folder, file)
    if model is not None:
        _check_instance(model, block, config, file)
        model = _load_into_instance(model, block, header)
    else:
        model = _build_checked(adapter, config, block, header)
    set_model_info(model, ModelInfo(recipe=block.get("recipe"), report=block.get("report") or {}, folder=str(folder)))
    return model.to(device).eval()


def build_architecture(path: str | os.PathLike, blocks: tuple[str, ...] = ("pruning",)) -> nn.Module:
    """The architecture of a saved folder with only the given blocks replayed and *random*
    weights, e.g. the float pruned model of an INT8 folder, to measure its speed or size."""
    _, config, file, adapter, block = _open(path)
    block = check_slimkit_block(block or {"format_version": FORMAT_VERSION}, file)
    return _replay(block, blocks)(adapter.build(config)).eval()
