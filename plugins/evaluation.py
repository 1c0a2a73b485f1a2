"""Scoring a student on a held-out split: a classifier's accuracy, or (an encoder without a
head, such as all-MiniLM-L6-v2) the cosine between its mean-pooled embeddings and the
teacher's. Used by :mod:`slimkit.plugins.distill_run` at the end of each training phase.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import slimkit
from slimkit.errors import SlimkitError
from slimkit.plugins.data import TaskData, as_call


def call(model: nn.Module, inputs: tuple | dict, labels: torch.Tensor | None = None, with_labels: bool = False):
    """The model's outputs on ``inputs`` (positional or keyword), with ``labels=`` if asked
    (transformers models then return their own loss)."""
    if isinstance(inputs, dict):
        return model(**inputs, labels=labels) if with_labels else model(**inputs)
    return model(*inputs)


def check_classes(teacher: nn.Module, example: tuple | dict, data: TaskData, name: str | None) -> bool:
    """Whether the teacher has a classification head, checked against the data set: a head must
    predict the data set's classes, and unlabelled data only distils an encoder without a head
    (on its features). ``name`` is the data set's name for the error messages."""
    with torch.no_grad():
        logits = slimkit.adapters.get_logits(call(teacher.eval(), example))
    if not data.labelled:
        if logits is not None:
            raise SlimkitError(
                f"--dataset {name!r} has no 'label' column. Unlabelled data distils an encoder without a head "
                f"(e.g. all-MiniLM-L6-v2) on its features; the teacher ({type(teacher).__name__}) has a "
                "classification head, so add a 'label' column"
            )
        return False
    if logits is not None and logits.shape[-1] != data.num_classes:
        raise SlimkitError(
            f"--dataset {name or 'default'!r} has {data.num_classes} classes but the teacher "
            f"({type(teacher).__name__}) predicts {logits.shape[-1]}; use a data set with the teacher's classes"
        )
    return logits is not None


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TensorDataset, kind: str, batch_size: int, device: Any) -> dict[str, Any]:
    """``{"accuracy": ...}`` of a classifier on ``dataset``; for an encoder without a head,
    ``{"embeddings": ...}``, its mean-pooled sentence embeddings (N, hidden). The model's
    train / eval mode is restored."""
    was_training = model.training
    model.eval()
    correct, total, embeddings = 0, 0, []
    for batch in DataLoader(dataset, batch_size=batch_size):
        batch = tuple(t.to(device) for t in batch)
        inputs, labels = as_call(batch, kind)
        out = call(model, inputs)
        logits = slimkit.adapters.get_logits(out)
        if logits is not None:
            correct += int((logits.argmax(-1) == labels).sum())
            total += len(labels)
        else:
            hidden, mask = out.last_hidden_state, inputs["attention_mask"].unsqueeze(-1).float()
            embeddings.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1))
    model.train(was_training)
    if total:
        return {"accuracy": correct / total}
    return {"embeddings": torch.cat(embeddings)}


def embedding_cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """The mean cosine between matching rows of two embedding matrices (None if their shapes
    differ, e.g. a student with another hidden size)."""
    if a.shape != b.shape:
        return None
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


class Scorer:
    """Scores students on the held-out split: accuracy, or (encoders) embedding cosine to the
    teacher. ``unwrap`` turns a wrapped model (DDP) back into the module to score."""

    def __init__(self, teacher: nn.Module, eval_set: TensorDataset, kind: str, device: Any, unwrap: Any = None) -> None:
        self.eval_set, self.kind, self.device = eval_set, kind, device
        self.unwrap = unwrap or (lambda model: model)
        result = evaluate(teacher.to(device), eval_set, kind, 64, device)
        self._teacher_embeddings = result.get("embeddings")
        self.teacher = {"accuracy": result["accuracy"]} if "accuracy" in result else {}

    def score(self, model: nn.Module) -> dict[str, Any]:
        """``{"accuracy": ...}`` or ``{"embedding_cosine": ...}`` of ``model``."""
        result = evaluate(self.unwrap(model), self.eval_set, self.kind, 64, self.device)
        if "accuracy" in result:
            return result
        return {"embedding_cosine": embedding_cosine(result["embeddings"], self._teacher_embeddings)}


def calibration_batches(
    train_set: TensorDataset, kind: str, with_labels: bool, batch_size: int, count: int, seed: int
) -> list:
    """The first ``count`` shuffled training batches (a fixed order for ``seed``) in the form
    ``slimkit.calibrate`` takes: ``(images, labels)``, or token dicts (with ``labels`` where a
    loss can use them, for gradient-based importance)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for batch in DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=generator):
        if len(batches) >= count:
            break
        inputs, labels = as_call(batch, kind)
        if kind == "image":
            batches.append((inputs[0], labels))
        else:
            batches.append({**inputs, "labels": labels} if with_labels else inputs)
    return batches
