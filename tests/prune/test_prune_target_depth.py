"""``prune.target`` with ``prune.layers``: the solver may remove whole blocks as well as widths.

For each block count from 0 to ``layers`` it takes the blocks whose removal moves the output
least, solves the widths for the rest of the budget, and keeps the plan whose outputs stay
closest to the dense model's. Counted (MACs / parameter) targets keep every assertion here free
of timings.
"""

import copy

import pytest
import torch

import slimkit
from slimkit import ConfigError, IncompatibleError
from slimkit.prune import count_macs
from tests.families import hf_model, settle_batchnorm, timm_model, token_batch
from tests.prune.test_prune_target import cnn, images

IDENTITY = ("layer2.1", "layer3.1")


def identity_blocks(seed: int = 0, names=IDENTITY) -> torch.nn.Module:
    """resnet18 at widths 16-128 whose residual branches all work (timm zero-initialises their last
    BatchNorm), except in ``names``: a zero last BatchNorm leaves relu(x + 0) = x there."""
    model = timm_model("resnet-wide", seed=seed, zero_init_last=False)
    with torch.no_grad():
        for name in names:
            bn = model.get_submodule(name).bn2
            bn.weight.zero_()
            bn.bias.zero_()
    return settle_batchnorm(model, torch.randn(8, 3, 32, 32)).eval()


def solve(model, target: dict, batches=None, **section):
    batches = batches or images(3, 5)
    recipe = {"prune": {"target": target, "importance": "activation", "reconstruct": True, **section}}
    slimkit.prepare(model, recipe, example_inputs=batches[0])
    slimkit.calibrate(model, batches)
    return model


def test_the_recipe_takes_layers_with_a_target_and_still_refuses_ratios():
    recipe = slimkit.Recipe.from_dict({"prune": {"target": {"macs": 0.5}, "layers": 2}})
    assert recipe.prune.layers == 2 and recipe.prune.target.kind == "macs"
    assert slimkit.Recipe.from_dict(recipe.to_dict()).to_dict() == recipe.to_dict()
    with pytest.raises(ConfigError, match=r"prune\.heads: prune\.target chooses the widths itself.*prune\.layers"):
        slimkit.Recipe.from_dict({"prune": {"target": {"macs": 0.5}, "heads": 0.25, "layers": 1}})


def test_blocks_that_do_nothing_go_first_and_the_plan_with_the_best_outputs_is_kept():
    dense = identity_blocks()
    # no refit: the plans are then scored exactly on these batches; with one they are scored on
    # rows the refit did not see, and 12 noise images cannot separate plans 0.03 apart
    model = solve(copy.deepcopy(dense), {"macs": 0.8}, layers=2, reconstruct=False)
    outcome = slimkit.prune.summary(model)["target"]
    options = outcome["depth"]
    assert [len(o["layers"]) for o in options] == [0, 1, 2]
    assert set(options[2]["layers"]) == set(IDENTITY)  # the pair whose removal costs nothing
    assert options[2]["depth_cost"] < 1e-6 and options[0]["depth_cost"] == 0.0
    met = [o for o in options if o.get("met")]
    best = max(met, key=lambda o: o["cosine"])
    assert outcome["layers"] == best["layers"] and outcome["met"]
    # removing identities frees MACs at no cost: fewer channels go, the outputs stay closer
    assert best["layers"] and best["cosine"] > options[0]["cosine"]
    assert slimkit.prune.summary(model)["layers"]["removed"] == best["layers"]
    batch = images(1, 9)[0]
    with torch.no_grad():
        prepared = model(batch)
    small = slimkit.convert(model)
    for stage in ("layer2", "layer3"):  # a removed block leaves its stage
        assert len(small.get_submodule(stage)) == 2 - sum(name.startswith(stage + ".") for name in best["layers"])
    with torch.no_grad():
        torch.testing.assert_close(small(batch), prepared, rtol=1e-4, atol=1e-4)
    ratio = count_macs(small, batch) / count_macs(dense, batch)
    assert abs(ratio - 0.8) <= 0.1 * 0.8


def test_a_budget_widths_cannot_reach_is_met_with_blocks_refused_without_and_checkpointed():
    # resnet18 at widths 16-128, every layer losing at most half its channels: widths alone reach
    # 0.638 of the MACs, with 3 blocks removed 0.594 (counted, so these figures are exact)
    with pytest.raises(IncompatibleError, match=r"best reachable is about 0\.638 .*or prune\.layers"):
        solve(cnn(), {"macs": 0.55}, max_layer_ratio=0.5)
    section = {"max_layer_ratio": 0.5, "layers": 3}
    model = solve(cnn(), {"macs": 0.55, "compare": False}, **section)
    chosen = slimkit.prune.summary(model)["target"]
    assert chosen["met"] and chosen["layers"]
    assert "refused" in chosen["depth"][0]  # no blocks: out of reach
    # the blocks chosen are part of the checkpoint, as the widths are
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = cnn(seed=1)
    recipe = {"prune": {"target": {"macs": 0.55, "compare": False}, "importance": "activation", **section}}
    recipe["prune"]["reconstruct"] = True
    slimkit.prepare(fresh, recipe, example_inputs=images(1, 5)[0])
    fresh.load_state_dict(state)
    restored = slimkit.prune.summary(fresh)
    assert restored["target"]["layers"] == chosen["layers"] and restored["target"]["widths"] == chosen["widths"]
    assert restored["layers"]["removed"] == chosen["layers"]
    batch = images(1, 9)[0]
    with torch.no_grad():
        torch.testing.assert_close(slimkit.convert(fresh)(batch), slimkit.convert(model)(batch))
    with pytest.raises(IncompatibleError, match=r"best reachable is about 0\.594 .*3 block\(s\) removed"):
        solve(cnn(), {"macs": 0.3, "compare": False}, **section)


def test_an_encoder_loses_layers_and_widths_and_reloads(tmp_path):
    model = hf_model("bert-base", num_hidden_layers=4).eval()
    with torch.no_grad():  # layer 2 returns LayerNorm(x) of a normalised x: removing it costs ~nothing
        for dense in (model.encoder.layer[2].attention.output.dense, model.encoder.layer[2].output.dense):
            dense.weight.zero_()
            dense.bias.zero_()
    batches = [token_batch(4, 12, seed=s) for s in (1, 2, 3)]
    solve(model, {"macs": 0.5, "compare": False}, batches=batches, layers=1)
    outcome = slimkit.prune.summary(model)["target"]
    assert outcome["depth"][1]["layers"] == ["encoder.layer.2"]
    small = slimkit.convert(model)
    assert len(small.encoder.layer) == 4 - len(outcome["layers"])
    slimkit.save_pretrained(small, tmp_path / "bert")
    again = slimkit.from_pretrained(tmp_path / "bert")
    with torch.no_grad():
        torch.testing.assert_close(
            again(**batches[0]).last_hidden_state, small(**batches[0]).last_hidden_state, rtol=1e-5, atol=1e-5
        )
    readme = (tmp_path / "bert" / "README.md").read_text()
    assert "target 0.5 of MACs" in readme
    if outcome["layers"]:
        assert "block(s) removed: encoder.layer.2" in readme


def test_depth_with_a_target_without_calibration_batches_names_the_fix():
    model = cnn()
    recipe = {"prune": {"target": {"macs": 0.7}, "importance": "l2", "layers": 1}}
    slimkit.prepare(model, recipe, example_inputs=images(1, 5)[0])
    with pytest.raises(IncompatibleError, match=r"prune\.layers with prune\.target ranks blocks on calibration .*"):
        slimkit.convert(model)
