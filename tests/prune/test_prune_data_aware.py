"""Data-aware pruning: activation / Fisher / Taylor scores from calibration batches,
reconstruction of the layers that read removed units, allocation by measured sensitivity, and
``prepare -> calibrate -> convert`` without a training loop."""

import copy

import pytest
import torch
from prune_helpers import ConvNet
from torch import nn

import slimkit
from slimkit import IncompatibleError
from tests.families import tiny_bert_config


def trained_batchnorms(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """Give a random-weight CNN the BatchNorm statistics of its data (as training would)."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    return model.eval()


def images(n: int, seed: int) -> torch.Tensor:
    """Smooth random images (neighbouring pixels correlate, as in real ones), with some noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = nn.functional.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=16, mode="bilinear")
    return coarse + 0.1 * torch.randn(n, 3, 16, 16, generator=g)


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return trained_batchnorms(ConvNet(), [images(64, 100)])


def text_batches(n: int, seed: int, size: int = 8, length: int = 12) -> list[dict[str, torch.Tensor]]:
    """Tokenizer-style dicts, with padding at the end of some rows."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 128, (size, length), generator=g)
        mask = torch.ones_like(ids)
        for row in range(0, size, 2):
            mask[row, length - 1 - row % 5 :] = 0
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def encoder(seed: int = 0) -> nn.Module:
    """A BertModel without a head (as all-MiniLM-L6-v2), random weights."""
    import transformers

    torch.manual_seed(seed)
    return transformers.BertModel(tiny_bert_config(), add_pooling_layer=False).eval()


def pruned_masks(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    state = model.slimkit.prune  # the checkpointed masks (README: masks while training)
    return state.channels_pruned.clone(), getattr(state, "heads_pruned", None)


def inputs_of(model: nn.Module, name: str, batch) -> list[torch.Tensor]:
    """What module ``name`` receives in one forward of ``model``."""
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(**batch) if isinstance(batch, dict) else model(batch)
    handle.remove()
    return seen


def outputs(model: nn.Module, inputs) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().square().sum() / b.detach().square().sum())


def kept_outputs(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The outputs of a layer's units that are not pruned themselves (a consumer may lose its
    own outputs to another group too)."""
    alive = layer.weight.detach().flatten(1).abs().sum(1) > 0
    return y[:, alive] if y.dim() != 2 or y.shape[1] == alive.numel() else y[..., alive]


def layer_error(pruned: nn.Module, dense: nn.Module, x: torch.Tensor) -> float:
    """Relative output error of a pruned layer against the dense one, on the same inputs."""
    return relative(kept_outputs(pruned, pruned(x)), kept_outputs(pruned, dense(x)))


# ----------------------------------------------------------------------------------------
# reconstruction
# ----------------------------------------------------------------------------------------
CNN_CONSUMERS = ("conv2", "fc")  # read conv1's and conv2's channels
BERT_CONSUMERS = [f"encoder.layer.{i}.{n}" for i in (0, 1) for n in ("attention.output.dense", "output.dense")]


def _prune_cnn(reconstruct: bool, sequential: bool = False) -> nn.Module:
    model = cnn()
    recipe = {"prune": {"channels": 0.5, "importance": "l2", "reconstruct": reconstruct, "sequential": sequential}}
    slimkit.prepare(model, recipe, example_inputs=images(2, 0))
    slimkit.calibrate(model, [images(32, s) for s in range(4)]) if reconstruct else None
    return model.eval()


def test_reconstruction_reduces_each_layers_output_error_on_held_out_batches():
    dense = cnn()
    plain, rebuilt = _prune_cnn(False), _prune_cnn(True)
    assert torch.equal(pruned_masks(plain)[0], pruned_masks(rebuilt)[0])  # the same units, refit or not
    held_out = images(64, 7)
    for name in CNN_CONSUMERS:
        x = inputs_of(dense, name, held_out)[0]  # the dense model's inputs to this layer
        error_plain = layer_error(plain.get_submodule(name), dense.get_submodule(name), x)
        error_rebuilt = layer_error(rebuilt.get_submodule(name), dense.get_submodule(name), x)
        assert error_rebuilt < 0.3 * error_plain, (name, error_plain, error_rebuilt)
    # and the whole model: closer to the dense logits, on inputs it was not refit on
    assert relative(rebuilt(held_out), dense(held_out)) < 0.6 * relative(plain(held_out), dense(held_out))


def test_reconstruction_of_heads_and_ffn_in_an_encoder_without_a_head():
    dense = encoder()
    calibration, held_out = text_batches(6, seed=1), text_batches(2, seed=9)
    results = {}
    for reconstruct in (False, True):
        model = copy.deepcopy(dense)
        recipe = {"prune": {"heads": 0.5, "channels": 0.5, "importance": "activation", "reconstruct": reconstruct}}
        recipe["prune"]["sequential"] = False
        slimkit.prepare(model, recipe, example_inputs=calibration[0])
        slimkit.calibrate(model, calibration)
        results[reconstruct] = model.eval()
    for name in BERT_CONSUMERS:
        errors = {}
        for reconstruct, model in results.items():
            total = 0.0
            for batch in held_out:
                x = inputs_of(dense, name, batch)[0][batch["attention_mask"].bool()]
                total += layer_error(model.get_submodule(name), dense.get_submodule(name), x)
            errors[reconstruct] = total
        assert errors[True] < 0.7 * errors[False], (name, errors)


def test_sequential_reconstruction_fits_each_layer_on_the_pruned_models_own_inputs():
    dense = cnn()
    model = _prune_cnn(True, sequential=True)
    held_out = images(64, 7)
    plain = _prune_cnn(False)
    for name in CNN_CONSUMERS:
        # each layer on the pruned model's own inputs, against the dense layer on the dense inputs
        layer = model.get_submodule(name)
        target = kept_outputs(layer, dense.get_submodule(name)(inputs_of(dense, name, held_out)[0]))
        ours = kept_outputs(layer, layer(inputs_of(model, name, held_out)[0]))
        theirs = kept_outputs(layer, plain.get_submodule(name)(inputs_of(plain, name, held_out)[0]))
        assert relative(ours, target) < 0.3 * relative(theirs, target), name


# ----------------------------------------------------------------------------------------
# importance from data
# ----------------------------------------------------------------------------------------
def test_activation_importance_needs_no_labels_and_sees_dead_neurons():
    """Neurons with the largest weights but (almost) no activation: l2 keeps them, activation
    removes exactly them."""
    dense = encoder()
    ffn = dense.encoder.layer[0].intermediate.dense
    dead = [3, 10, 17, 24, 31, 38, 45, 52]
    with torch.no_grad():
        ffn.weight[dead] *= 4.0
        ffn.bias[dead] = -40.0  # GELU(-40 + ...) is 0: these neurons never fire
    calibration = text_batches(4, seed=2)
    chosen = {}
    for method in ("l2", "activation"):
        model = copy.deepcopy(dense)
        slimkit.prepare(model, {"prune": {"channels": 0.125, "importance": method}}, example_inputs=calibration[0])
        if method == "activation":
            slimkit.calibrate(model, calibration)  # dicts of tensors, no labels
        layer0 = pruned_masks(model)[0][:64]  # layer 0's FFN neurons come first
        chosen[method] = set(layer0.nonzero().flatten().tolist())
        small = slimkit.convert(model)
        assert small.encoder.layer[0].intermediate.dense.out_features == 56
    assert chosen["activation"] == set(dead)
    assert not chosen["l2"] & set(dead)


def _manual_fisher(model: nn.Module, batches) -> torch.Tensor:
    """sum over batches of (sum_i W_fc[i, u] dL/dW_fc[i, u])^2 for conv2's channels u."""
    fisher = torch.zeros(model.fc.in_features, dtype=torch.float64)
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x), y)
        (grad,) = torch.autograd.grad(loss, model.fc.weight)
        fisher += (model.fc.weight.detach() * grad).sum(0).double().square()
    return fisher


def test_fisher_from_calibration_batches_ranks_by_the_squared_mask_gradient():
    model = cnn()
    model.stem.requires_grad_(False)  # frozen layers are fine: only the scored weights need gradients
    batches = [(images(16, s), torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(s))) for s in (3, 4)]
    expected = _manual_fisher(copy.deepcopy(model).eval(), batches)
    recipe = {"prune": {"channels": 0.5, "importance": "fisher", "exclude": ["conv1"]}}  # only conv2's group
    slimkit.prepare(model, recipe, example_inputs=images(2, 0))
    slimkit.calibrate(model, batches)  # (inputs, targets) tuples: the task loss
    pruned = pruned_masks(model)[0]
    assert set(pruned.nonzero().flatten().tolist()) == set(torch.argsort(expected)[:20].tolist())
    small = slimkit.convert(model)
    assert small.conv2.out_channels == 20 and small.fc.in_features == 20


def test_taylor_at_step_0_takes_its_gradients_from_calibration():
    model = cnn()
    batches = [(images(16, s), torch.randint(0, 10, (16,))) for s in (3, 4)]
    slimkit.prepare(model, {"prune": {"channels": 0.5, "importance": "taylor"}}, example_inputs=images(2, 0))
    slimkit.calibrate(model, batches)
    assert int(pruned_masks(model)[0].sum()) == 12 + 20
    assert slimkit.convert(model).conv1.out_channels == 12


def test_fisher_from_the_kd_loss_when_a_teacher_is_given():
    student, teacher = encoder(seed=0), encoder(seed=1)
    batches = text_batches(3, seed=4)  # no labels: the KD loss ranks the units
    recipe = {
        "prune": {"heads": 0.5, "importance": "fisher"},
        "distill": {"features": [{"student": "encoder.layer.1", "teacher": "encoder.layer.1"}]},
    }
    slimkit.prepare(student, recipe, teacher=teacher, example_inputs=batches[0])
    slimkit.calibrate(student, batches)
    assert int(pruned_masks(student)[1].sum()) == 4
    assert slimkit.convert(student).encoder.layer[0].attention.self.num_attention_heads == 2


# ----------------------------------------------------------------------------------------
# prepare -> calibrate -> convert, no training loop
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["tensor", "tuple", "dict"])
def test_prepare_calibrate_convert_without_a_training_loop(form):
    if form == "dict":
        model, batches = encoder(), text_batches(3, seed=5)
        recipe = {"prune": {"heads": 0.25, "channels": 0.25, "importance": "activation", "reconstruct": True}}
        probe = text_batches(1, seed=6)[0]
    else:
        model = cnn()
        xs = [images(16, s) for s in range(3)]
        batches = xs if form == "tensor" else [(x, torch.zeros(16, dtype=torch.long)) for x in xs]
        recipe = {"prune": {"channels": 0.5, "importance": "activation", "reconstruct": True}}
        probe = images(4, 6)
    slimkit.prepare(model, recipe, example_inputs=batches[0] if form != "tuple" else batches[0][0])
    before = copy.deepcopy(model)
    slimkit.calibrate(model, batches, num_batches=2)
    masked = outputs(model.eval(), probe)
    assert not torch.allclose(masked, outputs(before.eval(), probe))  # pruned (and refit) by calibrate alone
    reader = "encoder.layer.0.output.dense" if form == "dict" else "conv2"
    weight, start = model.get_submodule(reader).weight.detach(), before.get_submodule(reader).weight.detach()
    kept = weight.flatten(2).abs().sum((0, 2)) > 0 if weight.dim() == 4 else weight.abs().sum(0) > 0
    rows = weight.flatten(1).abs().sum(1) > 0
    assert not torch.allclose(weight[rows][:, kept], start[rows][:, kept])  # refit from the calibration batches
    small = slimkit.convert(model)
    torch.testing.assert_close(outputs(small, probe), masked, rtol=1e-5, atol=1e-5)
    if form == "dict":
        assert small.encoder.layer[0].attention.self.num_attention_heads == 3
        assert small.encoder.layer[0].intermediate.dense.out_features == 48
    else:
        assert (small.conv1.out_channels, small.conv2.out_channels) == (12, 20)


def test_data_aware_points_without_calibration_are_refused_clearly():
    model = cnn()
    slimkit.prepare(model, {"prune": {"channels": 0.5, "importance": "activation"}}, example_inputs=images(2, 0))
    model.eval()
    model(images(2, 1))  # evaluating before calibrating is fine (the dense model runs)
    with pytest.raises(IncompatibleError, match=r"importance 'activation' at step 0 need recorded layer inputs.*"):
        slimkit.convert(model)
    model.train()
    with pytest.raises(IncompatibleError, match=r"slimkit.calibrate\(model, batches, num_batches=N\)"):
        model(images(2, 1))
    slimkit.calibrate(model, [images(8, 2)])  # still possible afterwards
    assert slimkit.convert(model).conv1.out_channels == 12

    rebuild = cnn()
    slimkit.prepare(rebuild, {"prune": {"channels": 0.5, "reconstruct": True}}, example_inputs=images(2, 0))
    with pytest.raises(IncompatibleError, match="reconstruct at step 0 need recorded layer inputs"):
        slimkit.convert(rebuild)

    fisher = cnn()
    slimkit.prepare(fisher, {"prune": {"channels": 0.5, "importance": "fisher"}}, example_inputs=images(2, 0))
    with pytest.raises(IncompatibleError, match="carry no labels and the recipe has no teacher"):
        slimkit.calibrate(fisher, [images(8, 2)])

    plain = cnn()
    slimkit.prepare(plain, {"prune": {"channels": 0.5}}, example_inputs=images(2, 0))
    with pytest.raises(IncompatibleError, match="nothing to calibrate: prune: importance 'l2' needs no data"):
        slimkit.calibrate(plain, [images(8, 2)])


# ----------------------------------------------------------------------------------------
# gradual schedules: statistics from training forwards
# ----------------------------------------------------------------------------------------
def test_gradual_schedule_refits_at_every_point_from_training_forwards():
    """With a zero learning rate only reconstruction moves the weights: kept columns of the layers
    that read pruned channels change at the pruning points, and only with reconstruct."""
    changed = {}
    for reconstruct in (False, True):
        model = cnn()
        schedule = {"kind": "cubic", "start_step": 3, "end_step": 7, "every": 2}
        recipe = {"prune": {"channels": 0.5, "importance": "activation", "reconstruct": reconstruct}}
        recipe["prune"].update(schedule=schedule, statistics_steps=2)
        slimkit.prepare(model, recipe, example_inputs=images(2, 0))
        start = model.conv2.weight.detach().clone()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        model.train()
        for step in range(8):
            model(images(8, step)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            slimkit.step(model)
        weight = model.conv2.weight.detach()
        kept, rows = weight.abs().sum((0, 2, 3)) > 0, weight.abs().sum((1, 2, 3)) > 0
        assert int((~kept).sum()) == 12 and int((~rows).sum()) == 20  # conv1's and conv2's own channels
        changed[reconstruct] = not torch.equal(weight[rows][:, kept], start[rows][:, kept])
    assert changed == {False: False, True: True}


# ----------------------------------------------------------------------------------------
# allocation by measured sensitivity
# ----------------------------------------------------------------------------------------
def _redundant_cnn() -> nn.Module:
    """conv1's channels 8-15 repeat channels 0-7, and all 16 have exactly the same l1 score
    (permutations of the same dyadic values): normalised scores cannot tell them apart, but
    half of that layer costs nothing once the next layer is refit. conv2's channels are distinct."""
    torch.manual_seed(0)
    model = ConvNet(widths=(16, 16))
    g = torch.Generator().manual_seed(3)
    filters = torch.randint(-8, 9, (72,), generator=g).float() / 16
    columns = torch.randint(-8, 9, (144,), generator=g).float() / 16
    with torch.no_grad():
        for c in range(8):
            model.conv1.weight[c] = filters[torch.randperm(72, generator=g)].view(8, 3, 3)
            model.conv1.weight[c + 8] = model.conv1.weight[c]
        for c in range(16):
            model.conv2.weight[:, c] = columns[torch.randperm(144, generator=g)].view(16, 3, 3)
    return trained_batchnorms(model, [images(64, 100)])


def test_global_scope_by_sensitivity_takes_the_units_that_cost_nothing():
    results = {}
    dense = _redundant_cnn()
    held_out = images(64, 8)
    for allocation in ("sensitivity", "score"):
        model = _redundant_cnn()
        recipe = {"channels": 0.25, "importance": "l1", "scope": "global", "allocation": allocation}
        slimkit.prepare(model, {"prune": {**recipe, "reconstruct": True}}, example_inputs=images(2, 0))
        slimkit.calibrate(model, [images(32, s) for s in range(4)])
        small = slimkit.convert(model)
        results[allocation] = (small.conv1.out_channels, relative(small(held_out), dense(held_out)))
    assert results["sensitivity"][0] == 8  # all 8 units from the redundant layer
    assert results["score"][0] > 8
    assert results["sensitivity"][1] < 0.25 * results["score"][1]


def test_obs_importance_removes_one_copy_of_each_duplicated_channel():
    """Scores one unit at a time cannot see that two channels carry the same signal; the greedy
    OBS order can: once one copy is gone, the other becomes expensive."""
    dense = _redundant_cnn()
    held_out = images(64, 8)
    errors = {}
    for method in ("obs", "activation"):
        model = _redundant_cnn()
        recipe = {"channels": 0.5, "importance": method, "reconstruct": True, "exclude": ["conv2"]}
        slimkit.prepare(model, {"prune": recipe}, example_inputs=images(2, 0))
        slimkit.calibrate(model, [images(32, s) for s in range(4)])
        removed = set(pruned_masks(model)[0].nonzero().flatten().tolist())
        if method == "obs":
            assert len(removed) == 8 and all((c in removed) != (c + 8 in removed) for c in range(8))
        errors[method] = relative(outputs(slimkit.convert(model), held_out), outputs(dense, held_out))
    assert errors["obs"] < 1e-3 < errors["activation"]
