import json

import pytest

import slimkit
from slimkit import ConfigError, Recipe, SlimkitError

FULL = {
    "distill": {
        "temperature": 2.0,
        "alpha": 0.3,
        "features": [{"student": "encoder.layer.*", "teacher": "encoder.layer.*", "weight": 0.5, "loss": "cosine"}],
        "attention": [{"student": "a.1", "teacher": "b.5", "heads": "average"}],
    },
    "prune": {
        "channels": 0.5,
        "heads": 0.25,
        "importance": "taylor",
        "scope": "global",
        "round_to": 8,
        "schedule": {"kind": "cubic", "start_step": 10, "end_step": 110, "every": 20},
        "exclude": ["classifier"],
    },
    "quant": {"start_step": 200, "freeze_observers_step": 300, "activations": {"observer": "histogram"}},
}


def test_round_trip_dict_yaml_json(tmp_path):
    recipe = Recipe.from_dict(FULL)
    assert recipe.distill.temperature == 2.0
    assert recipe.distill.features[0].loss == "cosine"
    assert recipe.prune.schedule.kind == "cubic" and recipe.prune.schedule.every == 20
    assert recipe.quant.activations.observer == "histogram"
    assert recipe.quant.weights.granularity == "per_channel"  # defaults filled in
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    for suffix in (".yaml", ".json"):
        path = tmp_path / f"r{suffix}"
        recipe.to_file(path)
        assert Recipe.from_file(path) == recipe
    assert json.loads((tmp_path / "r.json").read_text())["prune"]["round_to"] == 8


def test_sections_are_optional_and_to_dict_drops_missing():
    recipe = Recipe.from_dict({"distill": {}})
    assert recipe.prune is None and recipe.quant is None
    assert recipe.to_dict() == {"distill": recipe.distill.to_dict()}
    assert recipe.distill.temperature == 4.0 and recipe.distill.alpha == 0.5


@pytest.mark.parametrize(
    "data, message",
    [
        ({"distil": {}}, "distil: unknown key. Did you mean 'distill'?"),
        ({"distill": {"temprature": 2}}, "distill.temprature: unknown key. Did you mean 'temperature'?"),
        ({"distill": {"features": [{"studnet": "a", "teacher": "b"}]}}, "distill.features[0].studnet: unknown key"),
        ({"prune": {"schedule": {"knd": "cubic"}}}, "prune.schedule.knd: unknown key. Did you mean 'kind'?"),
        ({"distill": {"temperature": 0}}, "distill.temperature: must be > 0, got 0.0"),
        ({"distill": {"temperature": -1.5}}, "distill.temperature: must be > 0"),
        ({"distill": {"alpha": 1.2}}, "distill.alpha: must be in [0, 1], got 1.2"),
        ({"distill": {"alpha": -0.1}}, "distill.alpha: must be in [0, 1]"),
        ({"distill": {"alpha": "high"}}, "distill.alpha: expected a number, got 'high'"),
        ({"distill": {"features": [{"student": "a.*", "teacher": "b"}]}}, "both names need a '*'"),
        ({"distill": {"features": [{"student": "a", "teacher": "b", "weight": -1}]}}, "weight: must be >= 0"),
        ({"distill": {"features": {"student": "a"}}}, "distill.features: expected a list"),
        ({"distill": {"attention": [{"student": "a", "teacher": "b", "heads": "mean"}]}}, "is not one of"),
        ({"prune": {"channels": 1.0}}, "prune.channels: must be in [0, 1), got 1.0"),
        ({"prune": {"heads": -0.1}}, "prune.heads: must be in [0, 1)"),
        ({"prune": {"importance": "l3"}}, "prune.importance: 'l3' is not one of"),
        ({"prune": {"schedule": {"kind": "quadratic"}}}, "prune.schedule.kind: 'quadratic' is not one of"),
        ({"prune": {"schedule": {"kind": "cubic"}}}, "prune.schedule.end_step: is required for kind='cubic'"),
        ({"prune": {"nm": "4:2"}}, "prune.nm: expected 'N:M' with 0 < N < M"),
        ({"quant": {"weights": {"bits": 4}}}, "quant.weights.bits: must be 8, 7 (exact on CPUs without VNNI) or auto"),
        ({"quant": {"activations": {"granularity": "per_channel"}}}, "quant.activations.granularity"),
        ({"quant": {"start_step": 10, "freeze_bn_step": 5}}, "quant.freeze_bn_step: must be >= start_step"),
    ],
)
def test_bad_values_name_the_field(data, message):
    with pytest.raises(ConfigError) as err:
        Recipe.from_dict(data)
    assert message in str(err.value)
    assert isinstance(err.value, ValueError) and isinstance(err.value, SlimkitError)


def test_qat_before_pruning_ends_is_refused():
    data = {
        "prune": {"channels": 0.5, "schedule": {"kind": "iterative", "end_step": 100, "stages": 4}},
        "quant": {"start_step": 50},
    }
    with pytest.raises(ConfigError, match=r"quant.start_step: QAT starts at step 50 .* at least 101"):
        Recipe.from_dict(data)
    data["quant"]["start_step"] = 101
    assert Recipe.from_dict(data).quant.start_step == 101
    # unstructured masks do not change shapes, so QAT may overlap them
    assert (
        Recipe.from_dict(
            {"prune": {"sparsity": 0.5, "schedule": {"kind": "cubic", "end_step": 100}}, "quant": {"start_step": 0}}
        ).quant.start_step
        == 0
    )


def test_direct_construction_validates():
    with pytest.raises(ConfigError, match="distill.temperature"):
        slimkit.DistillConfig(temperature=0)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Recipe.from_file(tmp_path / "missing.yaml")
    bad = tmp_path / "r.txt"
    bad.write_text("distill: {}")
    with pytest.raises(ConfigError, match="use a .yaml, .yml or .json file"):
        Recipe.from_file(bad)
    broken = tmp_path / "r.yaml"
    broken.write_text("distill: [unclosed")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        Recipe.from_file(broken)
    broken_json = tmp_path / "r.json"
    broken_json.write_text("{distill")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        Recipe.from_file(broken_json)
    typo = tmp_path / "typo.yaml"
    typo.write_text("distill:\n  alpah: 0.5\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: distill.alpah: unknown key. Did you mean 'alpha'"):
        Recipe.from_file(typo)


def test_every_field_has_help():
    for cls in (
        slimkit.DistillConfig,
        slimkit.FeaturePair,
        slimkit.PruneConfig,
        slimkit.ScheduleConfig,
        slimkit.QuantConfig,
        slimkit.ActivationQuantConfig,
    ):
        assert all(cls.describe().values()), cls
