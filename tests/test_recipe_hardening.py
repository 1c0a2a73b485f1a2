"""Recipes from anywhere: alias bombs, non-finite numbers, schedules that cannot finish, values
that only the model shows to be wrong (issue 10, items 6-9)."""

import importlib.util
import json

import pytest
import transformers

import slimkit
from slimkit import ConfigError, Recipe
from slimkit.plugins.hf import slim_callbacks
from tests.families import hf_model, timm_model
from tests.models import ROOT
from tests.test_hf_trainer import ToyText, make_args

# --- 6: YAML alias bombs ----------------------------------------------------------------------


def alias_bomb(levels: int) -> str:
    """``levels`` levels of anchors, each alias repeated nine times: 9**levels values once expanded."""
    text = "a: &a [x,x,x,x,x,x,x,x,x]\n"
    for i in range(levels - 1):
        text += f"{chr(98 + i)}: &{chr(98 + i)} [{','.join([f'*{chr(97 + i)}'] * 9)}]\n"
    return text + f"distill: {{temperature: *{chr(97 + levels - 1)}}}\n"


@pytest.mark.parametrize("levels", [6, 9])  # 531 thousand / 387 million values
def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path, levels):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(levels))
    assert path.stat().st_size < 400
    with pytest.raises(ConfigError, match="expands to more than 100,000 values") as info:
        Recipe.from_file(path)
    assert len(str(info.value)) < 400  # the echoed value is never the expansion


def test_anchors_of_an_ordinary_recipe_still_work(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "prune:\n  channels: 0.5\n  schedule: &s {kind: cubic, start_step: 1, end_step: 9, every: 2}\n"
        "quant: {start_step: &q 10, freeze_observers_step: *q}\n"
    )
    recipe = Recipe.from_file(path)
    assert recipe.prune.schedule.end_step == 9 and recipe.quant.freeze_observers_step == 10


@pytest.mark.parametrize(
    "text, message",
    [
        ("a: &a [*a]\n", "refers to a value that contains it"),
        ("distill: " + "[" * 200 + "]" * 200 + "\n", "nested"),
        ("distill:\n  temperature: [" + ", ".join(["1"] * 5000) + "]\n", "<list of 5000 items>"),
        ("distill: {temperature: '" + "x" * 100_000 + "'}\n", r"\(100000 characters\)"),
        ("distill: {" + "x" * 1000 + ": 1}\n", "unknown key"),
    ],
)
def test_huge_deep_or_recursive_values_are_refused_with_a_short_message(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        Recipe.from_file(path)
    assert len(str(info.value)) < 600


def test_json_recipes_are_bounded_too(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="nested too deeply|nested more than"):
        Recipe.from_file(deep)
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"distill": {"features": [{"student": "a" * 1000}] * 2000}}))
    with pytest.raises(ConfigError, match="bytes; a recipe is at most"):
        Recipe.from_file(big)


# --- 7: non-finite numbers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "suffix, text, field",
    [
        (".yaml", "distill: {temperature: .inf}", "distill.temperature"),
        (".yaml", "distill: {alpha: .nan}", "distill.alpha"),
        (".json", '{"distill": {"temperature": Infinity}}', "distill.temperature"),
        (".json", '{"distill": {"alpha": NaN}}', "distill.alpha"),
        (".yaml", "distill: {features: [{student: a, teacher: b, weight: .nan}]}", r"distill.features\[0\].weight"),
        (".yaml", "distill: {features: [{student: a, teacher: b, weight: .inf}]}", r"distill.features\[0\].weight"),
        (".yaml", "distill: {attention: [{student: a, teacher: b, weight: .inf}]}", r"distill.attention\[0\].weight"),
        (".yaml", "distill: {attention: [{student: a, teacher: b, weight: -.inf}]}", r"distill.attention\[0\].weight"),
        (".yaml", "quant: {activations: {averaging_constant: .nan}}", "quant.activations.averaging_constant"),
        (".yaml", "prune: {channels: .nan}", "prune.channels"),
        (".yaml", "quant: {start_step: .inf}", "quant.start_step"),
    ],
)
def test_non_finite_numbers_are_refused_at_load(tmp_path, suffix, text, field):
    path = tmp_path / f"r{suffix}"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"{field}: (must be a finite number|expected a whole number)"):
        Recipe.from_file(path)


# --- 8: schedules that cannot finish in the run -------------------------------------------------


@pytest.mark.parametrize(
    "recipe, field",
    [
        ({"prune": {"heads": 0.5, "schedule": {"kind": "cubic", "start_step": 1, "end_step": 50}}}, "end_step"),
        ({"prune": {"heads": 0.5, "schedule": {"kind": "one_shot", "start_step": 9}}}, "prune.schedule.start_step"),
        ({"quant": {"start_step": 6}}, "quant.start_step"),
    ],
)
def test_a_trainer_run_too_short_for_the_schedule_is_refused_before_training(tmp_path, recipe, field):
    student = hf_model("bert")
    trainer = transformers.Trainer(
        model=student, args=make_args(tmp_path), train_dataset=ToyText(), callbacks=slim_callbacks(student, recipe)
    )
    with pytest.raises(ConfigError, match=rf"{field} is \d+ but the run stops after max_steps.*=6 steps"):
        trainer.train()
    assert trainer.state.global_step == 0  # refused before the first step


def test_a_schedule_that_fits_exactly_is_accepted():
    prune = {"heads": 0.5, "schedule": {"kind": "cubic", "start_step": 1, "end_step": 6}}
    Recipe.from_dict({"prune": prune}).check_fits(6)  # the last pruning point is the last step
    Recipe.from_dict({"quant": {"start_step": 5}}).check_fits(6)  # one QAT step
    Recipe.from_dict({"quant": {"mode": "ptq", "start_step": 50}}).check_fits(6)  # PTQ does not train
    with pytest.raises(ConfigError, match="prune.schedule.end_step is 6 but the run stops after max_steps=5"):
        Recipe.from_dict({"prune": prune}).check_fits(5)


def _distill_script():
    spec = importlib.util.spec_from_file_location("slimkit_distill_script", ROOT / "scripts" / "distill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_distill_script_refuses_a_schedule_beyond_max_steps(tmp_path):
    slimkit.save_pretrained(timm_model("resnet", seed=2), tmp_path / "student")
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"quant": {"start_step": 40}}))
    args = ["--teacher", "resnet18", "--student", str(tmp_path / "student"), "--recipe", str(recipe)]
    args += ["--output-dir", str(tmp_path / "out"), "--max-steps", "3", "--batch-size", "8", "--image-size", "16"]
    with pytest.raises(ConfigError, match=r"quant.start_step is 40 but the run stops after --max-steps=3"):
        _distill_script().main(args)
    assert not (tmp_path / "out").exists()


# --- 9: values only the model shows to be wrong ---------------------------------------------------


def test_round_to_at_least_every_layer_width_is_an_error():
    model = timm_model("resnet")  # widest prunable layer: 64 channels
    recipe = {"prune": {"channels": 0.5, "round_to": 64, "verify": False}}
    with pytest.raises(ConfigError, match=r"prune.round_to: 64 is at least the width of every prunable layer"):
        slimkit.prepare(model, recipe)


def test_round_to_below_some_widths_warns_about_the_layers_it_leaves_whole(caplog):
    model = timm_model("resnet")  # 8, 16, 32 and 64 channels
    with caplog.at_level("WARNING", logger="slimkit.prune"):
        slimkit.prepare(model, {"prune": {"channels": 0.5, "round_to": 16, "verify": False}})
    assert "prune.round_to=16 is at least the width of" in caplog.text


def test_an_absurd_nm_says_what_is_wrong():
    model = timm_model("resnet")
    with pytest.raises(ConfigError, match=r"prune.nm: '3:1000000' needs weights whose input width is a multiple"):
        slimkit.prepare(model, {"prune": {"nm": "3:1000000"}})
