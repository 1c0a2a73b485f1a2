"""What slimkit checks and keeps of Hugging Face folders (no transformers import needed).

* :func:`check_hf_config`: a folder's ``config.json`` may not ask for remote code by any door
  (``auto_map``, Hub attention / experts kernels) and the fields slimkit reads must have the
  right types;
* :func:`copy_sentence_transformers_files`: sentence-transformers' own files, kept in slimmed
  folders so that ``load_sentence_transformer`` rebuilds the same pipeline.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from slimkit.errors import FormatError
from slimkit.recipe_io import short_repr

# Attention / experts implementations a folder may name: the ones transformers computes itself.
# Anything else (``"<org>/<repo>"``, or flash attention, which falls back to a Hub kernel when
# the flash_attn package is missing) would download and run code.
_LOCAL_IMPLEMENTATIONS = frozenset({None, "eager", "sdpa", "flex_attention", "grouped_mm", "batched_mm"})
_ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def copy_sentence_transformers_files(source: Path, folder: Path, hidden_size: int | None = None) -> bool:
    """Copy a sentence-transformers model's own files (``modules.json``, ``sentence_bert_config.json``,
    ``config_sentence_transformers.json`` and the module folders ``modules.json`` lists, such as
    ``1_Pooling``) from ``source`` to ``folder``; the pooling width follows ``hidden_size``.
    Returns False (and copies nothing) when ``source`` is not a sentence-transformers folder."""
    listing = source / "modules.json"
    if not listing.is_file():
        return False
    try:
        entries = json.loads(listing.read_text())
        paths = [e["path"] for e in entries if isinstance(e, dict) and isinstance(e.get("path"), str)]
    except (ValueError, TypeError, KeyError, UnicodeDecodeError):
        return False
    for name in _ST_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
    for path in paths:
        if not path or path.startswith(("/", "\\")) or ".." in Path(path).parts or not (source / path).is_dir():
            continue
        shutil.copytree(source / path, folder / path, dirs_exist_ok=True)
        pooling = folder / path / "config.json"
        if hidden_size and pooling.is_file():
            config = json.loads(pooling.read_text())
            if isinstance(config, dict) and "word_embedding_dimension" in config:
                config["word_embedding_dimension"] = hidden_size
                pooling.write_text(json.dumps(config, indent=2) + "\n")
    return True


def check_hf_config(config: dict[str, Any], file: Any) -> None:
    """Refuse ``auto_map``, implementations other than transformers' own, and mistyped
    ``architectures`` / ``model_type`` (``FormatError`` naming ``file`` and the field)."""
    if "auto_map" in config:
        raise FormatError(f"{file} asks for remote code (auto_map); slimkit never runs code from a model folder")
    architectures = config.get("architectures")
    if not (isinstance(architectures, list) and architectures and all(isinstance(a, str) for a in architectures)):
        raise FormatError(
            f"{file}: architectures must be a list of transformers class names, got {short_repr(architectures)}"
        )
    if not isinstance(config.get("model_type"), str):
        raise FormatError(f"{file}: model_type must be a string, got {short_repr(config.get('model_type'))}")
    stack = [("", config)]
    while stack:  # sub-configs (text_config, vision_config, ...) may name implementations too
        prefix, node = stack.pop()
        for key, value in node.items():
            field = f"{prefix}{key}"
            if isinstance(value, dict) and not key.endswith("_implementation"):
                stack.append((f"{field}.", value))
            elif key.endswith("_implementation") and value is not None:
                values = list(value.values()) if isinstance(value, dict) else [value]
                bad = [v for v in values if v not in _LOCAL_IMPLEMENTATIONS]
                if bad:
                    raise FormatError(
                        f"{file}: {field} is {short_repr(bad[0])}; slimkit loads only the implementations "
                        f"transformers ships ({', '.join(sorted(_LOCAL_IMPLEMENTATIONS - {None}))}): a name "
                        "like '<org>/<repo>' is a kernel downloaded from the Hub, i.e. remote code. Remove "
                        f"{field} from the config."
                    )
