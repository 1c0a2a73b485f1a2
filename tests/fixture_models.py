"""The model of the checked-in fixture folders (tests/fixtures/), and how they were made."""

from __future__ import annotations

import torch
from torch import nn


class FixtureCNN(nn.Module):
    """conv-bn-relu x2 and a linear head: pruned channels, folded BatchNorms and INT8 layers."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


RECIPE = {
    "prune": {"channels": 0.5, "schedule": {"kind": "one_shot", "start_step": 0}},
    "quant": {"mode": "ptq"},
}


def fixture_inputs() -> torch.Tensor:
    return torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def make(folder) -> None:
    """Write the fixture (run with the slimkit version whose format it pins)."""
    from safetensors.torch import save_file

    import slimkit

    torch.manual_seed(0)
    model = slimkit.prepare(FixtureCNN(), RECIPE, example_inputs=fixture_inputs())
    slimkit.step(model, 0)
    slimkit.calibrate(model, [fixture_inputs() * s for s in (0.5, 1.0, 2.0, 1.5)])
    small = slimkit.convert(model)
    with torch.no_grad():
        out = small(fixture_inputs())
    slimkit.save_pretrained(small, folder, model_card=False)
    save_file({"inputs": fixture_inputs(), "outputs": out}, str(folder / "expected.safetensors"))
