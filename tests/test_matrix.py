"""One matrix: every model family of tests/families.py through every method, public API only
(prepare, step, calibrate, convert, save_pretrained, from_pretrained, log_values, methods_of).

prune     prepare, a few steps, convert: fewer parameters, outputs equal the masked model's,
          save / load gives the same outputs
ptq       calibrate, convert: INT8 outputs close to the fake-quant model's and to the float one's
qat       a few steps, convert: finite INT8 outputs close to the fake-quant model's
kd        teacher = the family model, student = a smaller one of the same family: the KD term is
          logged, the loss is finite and falls
pipeline  prune + QAT + KD in one recipe, convert, save, from_pretrained: the same outputs
"""

from __future__ import annotations

import pytest
import torch

import slimkit
from slimkit.prune import count_parameters
from tests.families import FAMILIES, Family, logits, train_steps

STEPS = 3


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: what cosine does not see, a wrong scale."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def assert_int8_matches(int8: torch.Tensor, fake: torch.Tensor) -> None:
    """The INT8 kernels compute what fake-quant simulated, up to float rounding (measured 2e-8 to
    4e-7 on every family that passes): a wrong scale or zero point anywhere shows up here."""
    assert torch.isfinite(int8).all()
    assert relative_error(int8, fake) < 1e-4, relative_error(int8, fake)


def prepared(family: Family, recipe: dict, **kwargs) -> tuple[torch.nn.Module, object]:
    model = family.build()
    inputs = family.inputs()
    slimkit.prepare(model, recipe, example_inputs=inputs, measure=False, **kwargs)
    assert set(slimkit.methods_of(model)) == set(recipe)
    return model, inputs


def round_trip(small: torch.nn.Module, inputs, folder) -> torch.Tensor:
    """Save, load with slimkit.from_pretrained, and return the loaded model's logits."""
    slimkit.save_pretrained(small, folder, model_card=False)
    again = slimkit.from_pretrained(folder)
    assert type(again) is type(small)
    return logits(again, inputs)


# ----------------------------------------------------------------------------------------------
# the methods
# ----------------------------------------------------------------------------------------------
def check_prune(family: Family, tmp_path) -> None:
    model, inputs = prepared(family, {"prune": family.prune})
    params = count_parameters(model)
    train_steps(model, family.batches(2, size=8), STEPS, task=family.task)
    for key in family.prune:
        assert slimkit.log_values(model)[f"prune/{key}"] > 0.2
    masked = logits(model, inputs)
    small = slimkit.convert(model)
    assert slimkit.methods_of(small) == {}
    assert count_parameters(small) < params
    out = logits(small, inputs)
    assert out.shape == masked.shape
    torch.testing.assert_close(out, masked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(round_trip(small, inputs, tmp_path / "pruned"), out, rtol=0, atol=1e-6)


def check_ptq(family: Family, tmp_path) -> None:
    model, inputs = prepared(family, {"quant": {"mode": "ptq", "compile": "never"}})
    float_out = logits(family.build(), inputs)
    slimkit.calibrate(model, family.batches(8, size=8))
    fake = logits(model, inputs)
    small = slimkit.convert(model)
    int8 = logits(small, inputs)
    assert_int8_matches(int8, fake)
    assert cosine(int8, float_out) > family.ptq_cosine, cosine(int8, float_out)
    torch.testing.assert_close(round_trip(small, inputs, tmp_path / "ptq"), int8, rtol=0, atol=1e-5)


def check_qat(family: Family, tmp_path) -> None:
    model, inputs = prepared(family, {"quant": {"mode": "qat", "compile": "never"}})
    losses = train_steps(model, family.batches(), STEPS, task=family.task, lr=1e-3)
    assert all(torch.isfinite(torch.tensor(losses)))
    fake = logits(model, inputs)
    small = slimkit.convert(model)
    int8 = logits(small, inputs)
    assert_int8_matches(int8, fake)


def check_kd(family: Family, tmp_path) -> None:
    teacher = family.build(seed=1)
    student = family.build(seed=2, **family.smaller)
    assert count_parameters(student) < count_parameters(teacher)
    recipe = {"distill": {"temperature": 2.0, "alpha": 0.5}}
    slimkit.prepare(student, recipe, teacher=teacher, example_inputs=family.inputs(), measure=False)
    batch = family.batches(1, size=8)  # 8 inputs: batch statistics of 2 make BatchNorm CNNs' losses jump
    losses = train_steps(student, batch, 6, task=family.task, lr=3e-3)
    terms = slimkit.log_values(student)  # averaged over the 6 steps
    assert terms["distill/kd"] > 0 and torch.isfinite(torch.tensor(losses)).all()
    mix = 0.5 * terms["distill/kd"] + 0.5 * terms["distill/task"]  # alpha 0.5: the loss trained is the mix
    assert sum(losses) / len(losses) == pytest.approx(mix, rel=1e-4)
    assert losses[-1] < losses[0], losses


def check_pipeline(family: Family, tmp_path) -> None:
    recipe = {
        "prune": family.prune,
        "quant": {"start_step": 1, "compile": "never"},
        "distill": {"temperature": 2.0, "alpha": 0.5},
    }
    teacher = family.build(seed=1)
    model, inputs = prepared(family, recipe, teacher=teacher)
    params = count_parameters(model)
    losses = train_steps(model, family.batches(), STEPS, task=family.task, lr=1e-3)
    assert torch.isfinite(torch.tensor(losses)).all()
    terms = slimkit.log_values(model)
    assert terms["distill/kd"] > 0 and terms[f"prune/{next(iter(family.prune))}"] > 0.2
    fake = logits(model, inputs)
    small = slimkit.convert(model)
    assert count_parameters(small) < params
    int8 = logits(small, inputs)
    assert_int8_matches(int8, fake)
    torch.testing.assert_close(round_trip(small, inputs, tmp_path / "pipeline"), int8, rtol=0, atol=1e-5)


METHODS = {"prune": check_prune, "ptq": check_ptq, "qat": check_qat, "kd": check_kd, "pipeline": check_pipeline}

# (family, method) -> reason: combinations that fail today (strict xfails: they turn red once fixed)
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


# (family, method) -> reason: combinations that fail with one intra-op thread only
ONE_THREAD_FAILURES: dict[tuple[str, str], str] = {
    ("timm_mobilenetv3", "qat"): (
        "with one thread (OMP_NUM_THREADS=1) only: INT8 logits 3% off the fake-quant ones after QAT with "
        "BatchNorm still updating; traced site by site, everything agrees exactly up to blocks.4.0.conv_dw "
        "(a depthwise conv), whose single-thread oneDNN int8 kernel differs from fake-quant by 1.4e-4 "
        "(relative) on identical inputs, and later rounding amplifies it; exact with 2 threads"
    ),
}


def _cases():
    for family in FAMILIES:
        for method in METHODS:
            reason = KNOWN_FAILURES.get((family, method))
            if reason is None and torch.get_num_threads() == 1:
                reason = ONE_THREAD_FAILURES.get((family, method))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(family, method, id=f"{family}-{method}", marks=marks)


@pytest.mark.parametrize("family, method", list(_cases()))
def test_matrix(family, method, tmp_path):
    torch.manual_seed(0)
    METHODS[method](FAMILIES[family], tmp_path)


def test_qat_that_starts_before_pruning_ends_is_refused():
    """Pruning one-shot at step 0 with QAT from step 0 would observe ranges of removed channels:
    the recipe is refused before anything is attached, naming the field and the fix."""
    family = FAMILIES["timm_resnet"]
    model = family.build()
    recipe = {"prune": {"channels": 0.5}, "quant": {"mode": "qat"}}
    with pytest.raises(slimkit.ConfigError, match=r"quant\.start_step: .*set quant\.start_step to at least 1"):
        slimkit.prepare(model, recipe, example_inputs=family.inputs(), measure=False)
    assert slimkit.methods_of(model) == {}
