"""Schedules (values at given steps) and the prune recipe section."""

import pytest

from slimkit import ConfigError, PruneConfig, Recipe, ScheduleConfig
from slimkit.prune import pruning_points, target_at, target_at_point
from slimkit.prune.schedule import due_point


def test_one_shot_prunes_everything_at_start_step():
    s = ScheduleConfig(kind="one_shot", start_step=5)
    assert pruning_points(s) == [5]
    assert [target_at(s, 0.5, t) for t in (0, 4, 5, 100)] == [0.0, 0.0, 0.5, 0.5]


def test_iterative_removes_the_same_share_of_what_is_left_at_each_stage():
    s = ScheduleConfig(kind="iterative", start_step=0, end_step=30, stages=3)
    assert pruning_points(s) == [10, 20, 30]
    p = 0.875  # 1 - 0.5**3: each stage halves what is left
    values = [target_at(s, p, t) for t in (9, 10, 19, 20, 30, 31)]
    assert values == pytest.approx([0.0, 0.5, 0.5, 0.75, 0.875, 0.875])
    kept = [1 - target_at_point(s, p, t) for t in (10, 20, 30)]
    assert kept[1] / kept[0] == pytest.approx(kept[2] / kept[1]) == pytest.approx(0.5)


def test_cubic_follows_zhu_and_gupta():
    s = ScheduleConfig(kind="cubic", start_step=100, end_step=1100, every=100)
    assert pruning_points(s) == list(range(100, 1101, 100))
    final = 0.8
    for t in range(100, 1101, 100):
        expected = final + (0.0 - final) * (1 - (t - 100) / 1000) ** 3
        assert target_at_point(s, final, t) == pytest.approx(expected)
    assert target_at(s, final, 99) == 0.0 and target_at(s, final, 100) == 0.0
    assert target_at(s, final, 250) == pytest.approx(final * (1 - 0.9**3))  # held since step 200
    assert target_at(s, final, 600) == pytest.approx(0.7)  # 0.8 * (1 - 0.5 ** 3)
    assert target_at(s, final, 5000) == final


def test_cubic_reaches_the_final_ratio_at_end_step_when_every_does_not_divide():
    s = ScheduleConfig(kind="cubic", start_step=0, end_step=10, every=4)
    assert pruning_points(s) == [0, 4, 8, 10]
    assert target_at(s, 0.5, 10) == 0.5 and target_at(s, 0.5, 9) < 0.5


def test_linear_removes_the_same_amount_at_every_point():
    s = ScheduleConfig(kind="linear", start_step=10, end_step=50, every=10)
    assert pruning_points(s) == [10, 20, 30, 40, 50]
    values = [target_at_point(s, 0.6, t) for t in pruning_points(s)]
    assert values == pytest.approx([0.0, 0.15, 0.3, 0.45, 0.6])
    assert target_at(s, 0.6, 35) == pytest.approx(0.3) and target_at(s, 0.6, 9) == 0.0


def test_exponential_decays_the_kept_fraction_geometrically():
    s = ScheduleConfig(kind="exponential", start_step=0, end_step=40, every=10)
    p = 1 - 0.5**4  # half of what is left goes every 10 steps
    kept = [1 - target_at_point(s, p, t) for t in pruning_points(s)]
    assert kept == pytest.approx([1.0, 0.5, 0.25, 0.125, 0.0625])
    assert target_at(s, p, 40) == pytest.approx(p) and target_at(s, p, 1000) == pytest.approx(p)
    # ahead of linear early on, as iterative is
    linear = ScheduleConfig(kind="linear", start_step=0, end_step=40, every=10)
    assert target_at(s, p, 10) > target_at(linear, p, 10)


def test_due_point_catches_up_on_skipped_steps():
    s = ScheduleConfig(kind="cubic", start_step=0, end_step=10, every=2)
    assert due_point(s, 5, last_done=0) == 4
    assert due_point(s, 5, last_done=4) is None
    assert due_point(s, 50, last_done=4) == 10


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        ({"channels": 1.0}, "prune.channels: must be in [0, 1), got 1.0"),
        ({"heads": -0.1}, "prune.heads: must be in [0, 1), got -0.1"),
        ({"sparsity": 1.5}, "prune.sparsity: must be in [0, 1)"),
        ({"importance": "l3"}, "prune.importance: 'l3' is not one of 'l1', 'l2', 'taylor', 'bn_scale'"),
        ({"schedule": {"kind": "cubical", "end_step": 10}}, "Did you mean 'cubic'?"),
        ({"schedule": {"kind": "cubic"}}, "prune.schedule.end_step: is required for kind='cubic'"),
        ({"scope": "everywhere"}, "prune.scope: 'everywhere' is not one of 'local', 'global'"),
        ({"max_layer_ratio": 1.0}, "prune.max_layer_ratio: must be in (0, 1)"),
        ({"round_to": 0}, "prune.round_to: must be >= 1"),
        ({"nm": "4:2"}, "prune.nm: expected 'N:M' with 0 < N < M"),
        ({"importance": "wanda"}, "prune.importance: 'wanda' is not one of"),
        ({"channels": 0.5, "reconstruct": "yes"}, "prune.reconstruct: expected true or false, got 'yes'"),
        ({"reconstruct": True}, "prune.reconstruct: refits the layers that read removed channels / heads"),
        ({"channels": 0.5, "damping": 1.0}, "prune.damping: must be in [0, 1), got 1.0"),
        ({"channels": 0.5, "statistics_steps": 0}, "prune.statistics_steps: must be >= 1, got 0"),
        ({"scope": "global", "allocation": "sensitive"}, "Did you mean 'sensitivity'?"),
        ({"chanels": 0.5}, "Did you mean 'channels'?"),
        ({"layers": 1.5}, "prune.layers: must be a whole number of blocks (>= 1) or a fraction in (0, 1), got 1.5"),
        ({"layers": -1}, "prune.layers: must be a whole number"),
        ({"layer_importance": "bi"}, "prune.layer_importance: 'bi' is not one of 'block_influence', 'output_cosine'"),
        ({"schedule": {"kind": "exponentail", "end_step": 10}}, "Did you mean 'exponential'?"),
        ({"schedule": {"kind": "linear"}}, "prune.schedule.end_step: is required for kind='linear'"),
    ],
)
def test_bad_prune_sections_are_rejected_with_the_field_named(section, needle):
    with pytest.raises(ConfigError) as info:
        Recipe.from_dict({"prune": section})
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError)


def test_prune_config_round_trips(tmp_path):
    data = {
        "channels": 0.5,
        "heads": 0.25,
        "importance": "fisher",
        "reconstruct": True,
        "sequential": True,
        "damping": 0.05,
        "statistics_steps": 4,
        "scope": "global",
        "allocation": "score",
        "max_layer_ratio": 0.8,
        "round_to": 8,
        "schedule": {"kind": "cubic", "start_step": 10, "end_step": 110, "every": 20, "stages": 3},
        "exclude": ["blocks.0.*"],
        "include": ["blocks.*"],
        "layers": 2.0,
        "layer_importance": "block_influence",
        "sparsity": 0.0,
        "nm": None,
        "verify": False,
        "target": None,
    }
    config = PruneConfig.from_dict(data)
    assert config.to_dict() == data
    assert Recipe.from_dict({"prune": data}).to_dict() == {"prune": data}
    assert "verify" in PruneConfig.describe() and PruneConfig.describe()["verify"]
    assert all(PruneConfig.describe()[k] for k in ("reconstruct", "sequential", "damping", "allocation"))
    yaml_text = "prune: {heads: 0.25, importance: activation, reconstruct: true, statistics_steps: 8}\n"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml_text)
    loaded = Recipe.from_file(path).prune
    assert (loaded.importance, loaded.reconstruct, loaded.statistics_steps, loaded.sequential) == (
        "activation",
        True,
        8,
        False,
    )
