"""Data sets for ``scripts/distill.py``: built-in offline defaults and local files.

Built-in, no download:

* ``digits``: scikit-learn's 1,797 handwritten digits (8x8, 10 classes), resized to the
  model's input size and channel count.
* ``stdlib-docs``: a six-topic text classification set made from the docstrings of
  Python's own standard library (math, text, files, network, concurrency, data formats):
  the first paragraph of each public function's / class's docstring, labelled by the topic of
  its module. About 1,900 sentences on CPython 3.11; it ships with every Python.

Local data: a folder written by ``datasets.Dataset.save_to_disk``, an image folder
(``class_name/*.png``), or a ``.csv`` / ``.json`` / ``.jsonl`` / ``.parquet`` file, loaded with
the ``datasets`` library. Columns: ``text`` (or ``sentence``) or ``image``, and ``label``;
without a ``label`` column the data set is *unlabelled* (``TaskData.labelled`` is False), which
distils an encoder without a head (such as all-MiniLM-L6-v2) on its features alone.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from slimkit.errors import ConfigError

STDLIB_TOPICS: dict[str, list[str]] = {
    "math": ["math", "cmath", "statistics", "decimal", "fractions", "random", "numbers", "operator"],
    "text": ["string", "re", "textwrap", "difflib", "unicodedata", "codecs", "locale"],
    "files": ["os", "os.path", "shutil", "pathlib", "glob", "fnmatch", "tempfile", "filecmp", "io", "stat"],
    "network": [
        "socket",
        "ssl",
        "http.client",
        "http.server",
        "urllib.request",
        "urllib.parse",
        "ftplib",
        "smtplib",
        "imaplib",
        "ipaddress",
    ],
    "concurrency": [
        "threading",
        "multiprocessing",
        "concurrent.futures",
        "asyncio",
        "queue",
        "sched",
        "subprocess",
        "selectors",
    ],
    "data": [
        "json",
        "csv",
        "pickle",
        "sqlite3",
        "zipfile",
        "tarfile",
        "gzip",
        "configparser",
        "xml.etree.ElementTree",
        "base64",
        "struct",
    ],
}


@dataclass
class Split:
    """A labelled split: inputs are image tensors [N, C, H, W] or a list of strings."""

    inputs: Any
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class TaskData:
    kind: str  # "image" or "text"
    train: Split
    eval: Split
    num_classes: int  # 0 for unlabelled data
    class_names: list[str]
    labelled: bool = True  # False: no label column (labels are placeholders; distil encoders on features)


def _split(inputs: Any, labels: torch.Tensor, eval_fraction: float, seed: int) -> tuple[Split, Split]:
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_eval = max(1, int(len(labels) * eval_fraction))
    ev, tr = order[:n_eval], order[n_eval:]
    pick = (lambda idx: inputs[idx]) if isinstance(inputs, torch.Tensor) else (lambda idx: [inputs[i] for i in idx])
    return Split(pick(tr), labels[tr]), Split(pick(ev), labels[ev])


def resize_images(images: torch.Tensor, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """[N, c, h, w] in [0, 1] -> [N, channels, *size], standardised per data set."""
    if images.shape[-2:] != tuple(size):
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    if images.shape[1] != channels:
        images = images.mean(1, keepdim=True).expand(-1, channels, -1, -1).contiguous()
    return (images - images.mean()) / images.std().clamp_min(1e-6)


def digits(channels: int = 1, size: tuple[int, int] = (32, 32), eval_fraction: float = 0.2, seed: int = 0) -> TaskData:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    images = resize_images(images, channels, size)
    labels = torch.tensor(data.target, dtype=torch.long)
    train, ev = _split(images, labels, eval_fraction, seed)
    return TaskData("image", train, ev, 10, [str(i) for i in range(10)])


def first_paragraph(doc: str, max_words: int = 40) -> str | None:
    """A docstring's first paragraph as one line of at most ``max_words`` words; None under 4."""
    words = doc.strip().split("\n\n")[0].split()
    return " ".join(words[:max_words]) if len(words) >= 4 else None


def stdlib_docs_texts() -> tuple[list[str], list[int], list[str]]:
    """(sentences, labels, topic names) from the standard library's docstrings; deterministic."""
    texts, labels, seen = [], [], set()
    topics = list(STDLIB_TOPICS)
    for label, topic in enumerate(topics):
        for module_name in STDLIB_TOPICS[topic]:
            module = importlib.import_module(module_name)
            for attr in sorted(dir(module)):
                if attr.startswith("_"):
                    continue
                obj = getattr(module, attr)
                candidates = [obj]
                if inspect.isclass(obj):
                    candidates += [v for k, v in sorted(vars(obj).items()) if not k.startswith("_") and callable(v)]
                for item in candidates:
                    if not (inspect.isroutine(item) or inspect.isclass(item)):
                        continue
                    doc = inspect.getdoc(item)
                    if not doc:
                        continue
                    sentence = first_paragraph(doc)
                    if sentence is None or sentence in seen:
                        continue
                    seen.add(sentence)
                    texts.append(sentence)
                    labels.append(label)
    return texts, labels, topics


def stdlib_docs(eval_fraction: float = 0.2, seed: int = 0) -> TaskData:
    texts, labels, topics = stdlib_docs_texts()
    train, ev = _split(texts, torch.tensor(labels), eval_fraction, seed)
    return TaskData("text", train, ev, len(topics), topics)


def _load_local(path: Path):
    import datasets

    if path.is_dir():
        if (
            (path / "dataset_info.json").exists()
            or (path / "state.json").exists()
            or (path / "dataset_dict.json").exists()
        ):
            return datasets.load_from_disk(str(path))
        return datasets.load_dataset("imagefolder", data_dir=str(path))
    builder = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(path.suffix.lower())
    if builder is None:
        raise ConfigError(f"--dataset {str(path)!r}: use a folder or a .csv / .json / .jsonl / .parquet file")
    return datasets.load_dataset(builder, data_files=str(path))


def local(
    path: str | Path, channels: int = 3, size: tuple[int, int] = (32, 32), eval_fraction: float = 0.2, seed: int = 0
) -> TaskData:
    """A local data set that ``datasets`` can load, as a TaskData."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--dataset {str(path)!r} does not exist (use 'digits', 'stdlib-docs' or a local path)")
    ds = _load_local(path)
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    columns = set(ds.column_names)
    label_col = next((c for c in ("label", "labels") if c in columns), None)
    if label_col is None:  # unlabelled: placeholder labels, no classes
        names, labels = [], torch.zeros(len(ds), dtype=torch.long)
    else:
        labels_raw = ds[label_col]
        feature = ds.features.get(label_col)
        names = list(getattr(feature, "names", None) or sorted({str(x) for x in labels_raw}))
        to_index = {n: i for i, n in enumerate(names)}
        labels = torch.tensor([x if isinstance(x, int) else to_index[str(x)] for x in labels_raw])
    labelled = label_col is not None
    text_col = next((c for c in ("text", "sentence") if c in columns), None)
    if text_col is not None:
        train, ev = _split(list(ds[text_col]), labels, eval_fraction, seed)
        return TaskData("text", train, ev, len(names), names, labelled)
    if "image" in columns:
        import numpy as np

        arrays = [
            np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0 for img in ds["image"]
        ]
        images = torch.stack([torch.from_numpy(a).reshape(a.shape[0], a.shape[1], -1).permute(2, 0, 1) for a in arrays])
        train, ev = _split(resize_images(images, channels, size), labels, eval_fraction, seed)
        return TaskData("image", train, ev, len(names), names, labelled)
    raise ConfigError(
        f"--dataset {str(path)!r}: needs a 'text' / 'sentence' or an 'image' column; it has {sorted(columns)}"
    )


def load_task_data(
    name: str | None, kind: str, channels: int = 1, size: tuple[int, int] = (32, 32), seed: int = 0
) -> TaskData:
    """``name``: 'digits', 'stdlib-docs', a local path, or None for the default of ``kind``."""
    if name in (None, ""):
        name = "digits" if kind == "image" else "stdlib-docs"
    if name == "digits":
        return digits(channels, size, seed=seed)
    if name == "stdlib-docs":
        return stdlib_docs(seed=seed)
    return local(name, channels, size, seed=seed)


def task_tensors(data: TaskData, split: str, tokenizer: Any = None, max_length: int = 64):
    """A ``TensorDataset`` of one split (``"train"`` / ``"eval"``): (images, labels), or
    (input_ids, attention_mask, labels) tokenized to ``max_length`` for text."""
    from torch.utils.data import TensorDataset

    part = getattr(data, split)
    if data.kind == "image":
        return TensorDataset(part.inputs, part.labels)
    enc = tokenizer(part.inputs, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return TensorDataset(enc["input_ids"], enc["attention_mask"], part.labels)


def as_call(batch: tuple[torch.Tensor, ...], kind: str) -> tuple[tuple | dict, torch.Tensor]:
    """(model inputs, labels) of a :func:`task_tensors` batch, in the model's calling convention:
    ``(images,)`` for image models, ``{"input_ids", "attention_mask"}`` for text models."""
    if kind == "image":
        return (batch[0],), batch[1]
    return {"input_ids": batch[0], "attention_mask": batch[1]}, batch[2]
