"""Models a user brings: a plain nn.Module (the tutorial's SmallCNN) saved and loaded by slimkit,
prune.include for layers the defaults leave alone, and fine-tuning after convert."""

import pytest
import torch
from torch import nn

import slimkit
from slimkit import FormatError


class SmallCNN(nn.Module):
    """conv-bn-relu blocks and a linear head, as in the pruning tutorial."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.BatchNorm2d(128),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


class OtherCNN(SmallCNN):
    pass


def _data(n: int = 16):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.features if isinstance(m, nn.Conv2d)]


def _train(model: nn.Module, optimizer, x, y, steps: int, prepared: bool = True) -> list[float]:
    losses = []
    model.train()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if prepared:
            slimkit.step(model)
        losses.append(float(loss.detach()))
    return losses


def test_a_plain_module_saves_and_loads_into_a_fresh_instance(tmp_path):
    x, y = _data()
    model = SmallCNN()
    slimkit.prepare(model, {"prune": {"channels": 0.5}}, example_inputs=x[:2])
    _train(model, torch.optim.SGD(model.parameters(), lr=0.05), x, y, steps=2)
    small = slimkit.convert(model).eval()
    assert _widths(small) == [32, 32, 64] and small.fc.in_features == 64  # the stem stays (default)
    slimkit.save_pretrained(small, tmp_path / "cnn")
    assert "model=SmallCNN(...)" in (tmp_path / "cnn" / "README.md").read_text()

    again = slimkit.from_pretrained(tmp_path / "cnn", model=SmallCNN())
    assert type(again) is SmallCNN and _widths(again) == [32, 32, 64] and again.fc.in_features == 64
    with torch.no_grad():
        torch.testing.assert_close(again(x), small(x), rtol=0, atol=0)

    with pytest.raises(FormatError, match=r"plain PyTorch model \(SmallCNN.*model=SmallCNN\(\.\.\.\)"):
        slimkit.from_pretrained(tmp_path / "cnn")
    with pytest.raises(FormatError, match="holds a SmallCNN .*but model= is a .*OtherCNN"):
        slimkit.from_pretrained(tmp_path / "cnn", model=OtherCNN())


def test_include_prunes_the_stem_the_defaults_leave_alone():
    x, _ = _data()
    default = slimkit.convert(slimkit.prepare(SmallCNN(), {"prune": {"channels": 0.5}}, example_inputs=x[:2]))
    assert _widths(default)[0] == 32  # the stem is excluded by default
    stem_only = slimkit.prepare(
        SmallCNN(), {"prune": {"channels": 0.5, "include": ["features.0"]}}, example_inputs=x[:2]
    )
    assert _widths(slimkit.convert(stem_only)) == [16, 64, 128]


def test_include_prunes_one_chosen_layer_and_it_fine_tunes():
    """The tutorial's workflow: prune one conv 64 -> 45, keep the loss of the last step around
    (as a loop does), convert, and fine-tune with a new optimizer."""
    x, y = _data()
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    slimkit.prepare(model, {"prune": {"channels": 0.3, "include": ["features.3"]}}, example_inputs=x[:2])
    loss = nn.functional.cross_entropy(model(x), y)  # a graph from before convert, still referenced
    loss.backward()
    optimizer.step()
    small = slimkit.convert_(model)  # in place: the old optimizer holds the sliced parameters
    assert _widths(small) == [32, 45, 128] and small.features[7].in_channels == 45

    with pytest.raises(RuntimeError, match="size of tensor"):  # its momentum has the unpruned shapes
        _train(small, optimizer, x, y, steps=1, prepared=False)
    small.zero_grad()
    fresh = torch.optim.Adam(small.parameters(), lr=1e-2)
    losses = _train(small, fresh, x, y, steps=8, prepared=False)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.7 * losses[0], losses
    assert small.features[3].weight.grad is None or small.features[3].weight.grad.shape == (45, 32, 3, 3)
    del loss


def test_include_names_modules_that_exist():
    with pytest.raises(slimkit.ModuleNameError, match="prune.include: module 'features.99'"):
        slimkit.prepare(
            SmallCNN(), {"prune": {"channels": 0.5, "include": ["features.99"]}}, example_inputs=_data()[0][:2]
        )
