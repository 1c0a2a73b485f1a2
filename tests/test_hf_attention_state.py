"""Attention KD's per-layer state on transformers models (plugins/hf_attention.py): one typed
AttentionCapture per attention layer while KD runs, nothing left after convert."""

import torch

import slimkit
from slimkit.plugins.hf_attention import CAPTURE_IMPL, AttentionCapture, capture_state
from tests.families import hf_model

IDS = torch.randint(0, 99, (2, 7))


def test_captured_layers_record_probabilities_the_others_fall_back_and_convert_restores():
    teacher, student = hf_model("bert-base", seed=1), hf_model("bert-base", seed=2)
    original = student.config._attn_implementation
    recipe = {
        "distill": {"attention": [{"student": "encoder.layer.1.attention", "teacher": "encoder.layer.1.attention"}]}
    }
    slimkit.prepare(student, recipe, teacher=teacher)
    layers = [layer.attention.self for layer in student.encoder.layer]
    states = [capture_state(m) for m in layers]
    assert all(isinstance(s, AttentionCapture) for s in states)
    assert states[0].store is None and states[0].fallback == original  # layer 0: not captured, runs as before
    assert states[1].store is not None and states[1].name == "encoder.layer.1.attention"
    assert student.config._attn_implementation == CAPTURE_IMPL
    student.train()
    student(input_ids=IDS, labels=torch.tensor([0, 1]))
    term = slimkit.log_values(student)["distill/attention.encoder.layer.1.attention"]
    assert term > 0  # the captured probabilities reached the KD loss
    small = slimkit.convert(student)
    assert all(capture_state(m) is None for m in small.modules())
    assert small.config._attn_implementation == original
