"""slimkit.sensitivity: per-layer quality drops when one layer alone is pruned or INT8."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import slimkit
from slimkit.errors import SlimkitError
from slimkit.sensitivity import Sensitivity


def _mlp() -> nn.Sequential:
    """Two prunable hidden layers ('2' and '4'; the first and last layers are the stem and
    classifier, left whole by default). Half of layer 4's neurons barely reach the output, so
    pruning 50% of them costs almost nothing; layer 2's neurons all matter. Layer 2's neuron 0
    is scaled up 1000x (and layer 4 reads it 1000x weaker: the float function is unchanged), so
    layer 4's input has one outlier channel that a per-tensor INT8 range cannot resolve."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )
    with torch.no_grad():
        model[6].weight[:, 16:] *= 1e-3
        model[4].weight[16:] *= 1e-3  # their inputs are small too: l2 importance ranks them last
        model[2].weight[0] *= 1000.0
        model[2].bias[0] = model[2].bias[0].abs() * 1000.0
        model[4].weight[:, 0] /= 1000.0
    return model.eval()


def _batches(n: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(16, 8, generator=generator) for _ in range(n)]


def test_drops_rank_the_layers_that_matter():
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = slimkit.sensitivity(model, _batches(), ratios=(0.25, 0.5))
    channels = table.drops("channels")
    assert set(channels) == {"2", "4"}
    assert channels["4"][0.5] < 0.1 * channels["2"][0.5]
    assert channels["2"][0.5] > 0.01
    assert table.most_harmful_int8(1) == ["4"]
    int8 = table.drops("int8")
    assert set(int8) == {"0", "2", "4", "6"}
    assert int8["4"][None] > 10 * max(int8[name][None] for name in ("0", "2", "6"))
    # the model given is never changed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_deterministic_and_saved(tmp_path):
    first = slimkit.sensitivity(_mlp(), _batches(), ratios=(0.5,), quant=False)
    second = slimkit.sensitivity(_mlp(), _batches(), ratios=(0.5,), quant=False)
    assert first.to_dict() == second.to_dict()
    path = first.save(tmp_path)
    data = json.loads(path.read_text())
    assert Sensitivity.from_dict(data).to_dict() == first.to_dict()
    assert (tmp_path / "sensitivity.png").stat().st_size > 1000
    assert "channels pruned" in first.format()


def test_loss_metric_and_custom_metric():
    model = _mlp()
    labels = [model(x).argmax(-1) for x in _batches()]
    batches = [(x, y) for x, y in zip(_batches(), labels)]
    loss = slimkit.sensitivity(model, batches, ratios=(0.5,), metric="loss", quant=False)
    assert loss.metric == "loss"
    assert loss.drops("channels")["2"][0.5] > loss.drops("channels")["4"][0.5]

    def accuracy(m, data):
        return float(torch.cat([(m(x).argmax(-1) == y) for x, y in data]).float().mean())

    acc = slimkit.sensitivity(model, batches, ratios=(0.5,), metric=accuracy, prune=False)
    assert acc.baseline == 1.0
    assert acc.most_harmful_int8(1) == ["4"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ratios": (0.0, 0.5)}, "ratios must lie in"),
        ({"prune": False, "quant": False}, "nothing to scan"),
        ({"metric": "bleu"}, "metric must be"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(SlimkitError, match=match):
        slimkit.sensitivity(_mlp(), _batches(), **kwargs)


def test_cli_scans_a_saved_folder(tmp_path, capsys):
    from slimkit.cli import main
    from tests.families import timm_model

    slimkit.save_pretrained(timm_model("resnet", in_chans=1), tmp_path / "cnn")
    argv = ["sensitivity", str(tmp_path / "cnn"), "--dataset", "digits", "--ratios", "0.5"]
    argv += ["--batches", "2", "--batch-size", "8", "--no-quant", "--output", str(tmp_path / "scan")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "channels pruned" in printed and "layer1.0.downsample.0" in printed
    data = json.loads((tmp_path / "scan" / "sensitivity.json").read_text())
    assert {row["kind"] for row in data["rows"]} == {"channels"}
    assert main(["sensitivity", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_output_comparison_skips_padding_tokens():
    """Token outputs are compared per real token: a change confined to padded positions (which
    mean pooling and heads never read) leaves the cosine at 1, a change to a real token does not."""
    from transformers.modeling_outputs import BaseModelOutput

    from slimkit.outputs import flat_outputs, mean_cosine

    class Encoder(nn.Module):
        def __init__(self, touch: int | None) -> None:
            super().__init__()
            self.embed, self.touch = nn.Embedding(20, 8), touch

        def forward(self, input_ids, attention_mask):
            hidden = self.embed(input_ids).clone()
            if self.touch is not None:
                hidden[:, self.touch] = -hidden[:, self.touch]
            return BaseModelOutput(last_hidden_state=hidden)

    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    batches = [{"input_ids": torch.randint(0, 20, (2, 4)), "attention_mask": mask}]
    base, padded_only, real = Encoder(None), Encoder(3), Encoder(0)  # position 3 is padding in both rows
    padded_only.embed = real.embed = base.embed
    reference = flat_outputs(base, batches)
    assert reference[0].shape == (5, 8)  # one row per real token
    assert mean_cosine(flat_outputs(padded_only, batches), reference) == pytest.approx(1.0)
    assert mean_cosine(flat_outputs(real, batches), reference) < 0.7
