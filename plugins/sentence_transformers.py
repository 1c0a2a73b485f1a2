"""sentence-transformers: any slimkit folder (pruned, INT8) as a ``SentenceTransformer``.

    from slimkit.plugins.sentence_transformers import load_sentence_transformer
    model = load_sentence_transformer("out/student")      # a SentenceTransformer
    embeddings = model.encode(["a sentence", "another one"])

``SentenceTransformer(folder)`` itself builds the transformer with ``AutoModel.from_pretrained``,
which cannot load a non-uniformly pruned or INT8 folder (it reports a size mismatch). Here the
model is loaded by :func:`slimkit.from_pretrained` (with all its checks) and handed to
sentence-transformers' own ``Transformer`` module; the other modules (pooling, normalisation,
dense layers) come from the folder's ``modules.json`` exactly as sentence-transformers reads
them, which ``save_pretrained`` and ``scripts/distill.py`` keep in slimmed folders when the
model they came from had them. A folder without ``modules.json`` gets mean pooling, the
default of sentence-transformers for a plain transformers folder. Only module classes of
sentence-transformers itself are imported, never code named by the folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules.transformer import Transformer
from sentence_transformers.util.misc import import_module_class

import slimkit
from slimkit.errors import FormatError
from slimkit.recipe_io import short_repr

_PICKLES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def _modules(folder: Path) -> list[dict[str, Any]]:
    file = folder / "modules.json"
    if not file.is_file():
        return [
            {"name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
    try:
        entries = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{file} is not valid JSON ({exc})") from None
    ok = isinstance(entries, list) and all(
        isinstance(e, dict) and all(isinstance(e.get(k), str) for k in ("name", "path", "type")) for e in entries
    )
    if not ok or not entries:
        raise FormatError(f"{file} must be a list of {{name, path, type}} objects, got {short_repr(entries)}")
    for entry in entries:
        path = entry["path"]
        if path.startswith(("/", "\\")) or ".." in Path(path).parts:
            raise FormatError(f"{file}: module path {path!r} leaves the folder")
        if not entry["type"].startswith("sentence_transformers."):
            raise FormatError(
                f"{file}: module type {entry['type']!r} is not a sentence-transformers class; slimkit never "
                "imports code a folder names"
            )
        if path and any(p.suffix in _PICKLES for p in (folder / path).glob("*")):
            raise FormatError(f"{folder / path} holds a pickle file; slimkit loads safetensors only")
    if not entries[0]["type"].endswith(".Transformer") or entries[0]["path"] != "":
        raise FormatError(f"{file}: the first module must be the Transformer at path '' (got {entries[0]})")
    return entries


def load_sentence_transformer(folder: str | Path, *, device: str | None = None) -> SentenceTransformer:
    """A ``SentenceTransformer`` whose transformer is ``slimkit.from_pretrained(folder)`` and whose
    other modules are the folder's ``modules.json`` (mean pooling without one)."""
    folder = Path(folder)
    entries = _modules(folder)
    model = slimkit.from_pretrained(folder)

    class SlimkitTransformer(Transformer):
        """sentence-transformers' Transformer module around the model slimkit loaded."""

        def _load_model(self, *args: Any, **kwargs: Any) -> Any:
            return model

    modules = [SlimkitTransformer.load(str(folder), local_files_only=True)]
    for entry in entries[1:]:
        cls = import_module_class(entry["type"], str(folder), trust_remote_code=False, local_files_only=True)
        if entry["type"].endswith(".Pooling") and not (folder / entry["path"] / "config.json").is_file():
            modules.append(cls(modules[0].get_embedding_dimension(), pooling_mode="mean"))
        else:
            modules.append(cls.load(str(folder), subfolder=entry["path"], local_files_only=True))
    return SentenceTransformer(modules=modules, device=device)


__all__ = ["load_sentence_transformer"]
