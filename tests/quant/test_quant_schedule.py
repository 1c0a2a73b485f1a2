"""The QAT schedule, PTQ calibration, QAT started from PTQ scales, and config round-trips."""

from __future__ import annotations

import pytest
import torch
from quant_helpers import SmallCNN, agreement, cnn_loss, logits_of

import slimkit
from slimkit.quant import phase_at
from slimkit.recipe import QuantConfig
from tests.families import train_steps


def test_phase_table_of_each_mode():
    qat = QuantConfig(start_step=2, freeze_observers_step=4, freeze_bn_step=5)
    table = [(p.name, p.fake_quant, p.observe, p.bn_frozen) for p in (phase_at(qat, s) for s in range(7))]
    assert table == [
        ("float", False, False, False),
        ("float", False, False, False),
        ("observing", True, True, False),
        ("observing", True, True, False),
        ("frozen", True, False, False),
        ("frozen", True, False, True),
        ("frozen", True, False, True),
    ]
    ptq = QuantConfig(mode="ptq")
    assert phase_at(ptq, 0).name == "float" and not phase_at(ptq, 0).fake_quant
    assert phase_at(ptq, 0, calibrated=True).fake_quant and phase_at(ptq, 0, calibrated=True).bn_frozen
    dynamic = QuantConfig(mode="dynamic", start_step=3)
    assert [phase_at(dynamic, s).fake_quant for s in (2, 3)] == [False, True]


def test_schedule_drives_observers_and_fake_quant(cnn_data):
    batches, held_out = cnn_data
    model = SmallCNN()
    slimkit.prepare(model, {"quant": {"start_step": 2, "freeze_observers_step": 4}}, example_inputs=held_out[:2])
    quantizer = model.conv3.input_quantizer
    float_out = logits_of(model.eval(), held_out)
    train_steps(model, batches, 2, loss=cnn_loss)
    assert int(quantizer.observer.observed) == 0, "observers must stay off before start_step"
    train_steps(model, batches, 2, loss=cnn_loss)
    assert int(quantizer.observer.observed) == 2
    assert slimkit.log_values(model)["quant/phase"] == 2.0
    train_steps(model, batches, 2, loss=cnn_loss)
    assert int(quantizer.observer.observed) == 2, "ranges must stay frozen after freeze_observers_step"
    scale = quantizer.scale.clone()
    logits_of(model.eval(), held_out)  # evaluation never moves the ranges
    assert torch.equal(scale, quantizer.scale)
    assert not torch.equal(float_out, logits_of(model, held_out))


def test_ptq_calibration_then_convert(cnn_data):
    batches, held_out = cnn_data
    model = SmallCNN().eval()
    slimkit.prepare(
        model,
        {"quant": {"mode": "ptq", "activations": {"observer": "histogram"}}},
        example_inputs=held_out[:2],
    )
    float_out = logits_of(model, held_out)
    assert slimkit.log_values(model)["quant/phase"] == 0.0
    slimkit.calibrate(model, batches, num_batches=2)
    assert int(model.conv1.input_quantizer.observer.observed) == 2
    assert slimkit.log_values(model)["quant/phase"] == 2.0
    fake = logits_of(model, held_out)
    assert not torch.equal(fake, float_out)
    same, diff = agreement(fake, logits_of(slimkit.convert(model), held_out))
    assert same >= 0.99 and diff < 1e-3


def test_qat_starts_from_calibrated_scales(cnn_data):
    batches, held_out = cnn_data
    model = SmallCNN()
    slimkit.prepare(model, {"quant": {"learn_scales": True}}, example_inputs=held_out[:2])
    slimkit.calibrate(model, [held_out[:64]])
    quantizer = model.conv3.input_quantizer
    assert bool(quantizer.initialized)
    calibrated = quantizer.scale.detach().clone()
    model.train()
    with torch.no_grad():
        model(batches[0][0])  # a training forward must not re-initialise the learned scale
    assert torch.equal(calibrated, quantizer.scale.detach())
    train_steps(model, batches, 2, loss=cnn_loss, lr=0.05)
    moved = (quantizer.scale.detach() - calibrated).abs().item()
    assert 0 < moved < 0.5 * calibrated.item(), "QAT should refine the calibrated scale, not restart it"


def test_quant_config_round_trips_every_field():
    data = {
        "mode": "ptq",
        "weights": {
            "bits": 8,
            "granularity": "per_tensor",
            "symmetric": True,
            "observer": "percentile",
            "percentile": 99.9,
        },
        "activations": {
            "bits": 8,
            "granularity": "per_tensor",
            "symmetric": True,
            "observer": "histogram",
            "percentile": 99.5,
            "averaging_constant": 0.05,
        },
        "learn_scales": True,
        "fold_bn": False,
        "start_step": 3,
        "freeze_observers_step": 10,
        "freeze_bn_step": 12,
        "exclude": ["fc", "layer1.*"],
        "embeddings": True,
        "equalization": True,
        "bias_correction": True,
        "compile": "never",
        "conv_outputs": False,
        "gates": False,
        "keep_fp32": "auto",
        "keep_fp32_floor": 0.995,
        "keep_fp32_max": 0.2,
        "keep_fp32_batches": 2,
    }
    recipe = slimkit.Recipe.from_dict({"quant": data})
    assert recipe.to_dict()["quant"] == data
    assert slimkit.Recipe.from_dict(recipe.to_dict()) == recipe


def test_freeze_steps_before_start_step_are_rejected():
    with pytest.raises(slimkit.ConfigError, match="quant.freeze_bn_step: must be >= start_step"):
        QuantConfig.from_dict({"start_step": 5, "freeze_bn_step": 2})
