"""The built-in offline data sets of scripts/distill.py."""

import torch

from slimkit.plugins.data import digits, load_task_data, stdlib_docs_texts


def test_digits_resized_to_the_model_geometry():
    data = digits(channels=3, size=(24, 24))
    assert data.train.inputs.shape[1:] == (3, 24, 24) and data.num_classes == 10
    assert len(data.train) + len(data.eval) == 1797
    assert abs(float(data.train.inputs.mean())) < 0.1  # standardised
    assert set(data.eval.labels.tolist()) == set(range(10))
    again = digits(channels=3, size=(24, 24))
    assert torch.equal(again.eval.inputs, data.eval.inputs)  # the split is seeded


def test_stdlib_docs_is_deterministic_and_labelled_by_topic():
    texts, labels, topics = stdlib_docs_texts()
    assert topics == ["math", "text", "files", "network", "concurrency", "data"]
    assert len(texts) == len(set(texts)) > 1500
    assert (texts, labels) == stdlib_docs_texts()[:2]
    counts = torch.bincount(torch.tensor(labels))
    assert len(counts) == 6 and counts.min() > 100
    assert all(4 <= len(t.split()) <= 40 for t in texts)
    data = load_task_data(None, "text")
    assert data.kind == "text" and data.num_classes == 6 and len(data.train) > len(data.eval) > 300
