"""A third-party method registered through ``slimkit.register_method`` goes through every stage.

The method (``lowrank``: factor named Linear layers into two thin ones at convert) lives in this
file only. Each stage reads the registry: ``Recipe.from_dict`` (the section), ``prepare`` (the
method object), ``step`` / ``log_values``, ``slim_callbacks`` (a callback for the section),
``convert`` (in order), ``save_pretrained`` (its hub block), ``from_pretrained`` (the block
replayed before the weights load) and ``slimkit info`` (the block's summary). Bypassing the
registry at any of them makes this test fail.
"""

from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

import pytest
import torch
from torch import nn

import slimkit
from slimkit._config import Config, help_field
from slimkit.cli import folder_info, format_info
from slimkit.controller import Method
from slimkit.errors import FormatError, ModuleNameError
from tests.families import hf_model


@dataclasses.dataclass
class LowRankConfig(Config):
    """Factor Linear layers into two layers of rank ``rank`` at convert (truncated SVD)."""

    section: ClassVar[str] = "lowrank"

    modules: list[str] = help_field([], "the Linear layers to factor")
    rank: int = help_field(4, "rank of each factorization (>= 1)")

    def validate(self, path: str) -> None:
        if self.rank < 1:
            self.fail(path, "rank", f"must be >= 1, got {self.rank}")


class Factored(nn.Sequential):
    """``Linear(in, rank, bias=False)`` then ``Linear(rank, out)``: what convert leaves."""

    @classmethod
    def empty(cls, like: nn.Linear, rank: int) -> Factored:
        kw = {"device": like.weight.device, "dtype": like.weight.dtype}
        return cls(
            nn.Linear(like.in_features, rank, bias=False, **kw),
            nn.Linear(rank, like.out_features, bias=like.bias is not None, **kw),
        )


class LowRank(Method):
    def prepare(self, model: nn.Module) -> None:
        self.steps = 0
        for name in self.config.modules:
            if not isinstance(model.get_submodule(name) if _has(model, name) else None, nn.Linear):
                raise ModuleNameError(f"lowrank.modules: {name!r} is not a Linear layer of {type(model).__name__}")

    def on_step(self, model: nn.Module, step: int) -> None:
        self.steps = step

    def log_values(self) -> dict[str, float]:
        return {"lowrank/steps": float(self.steps)}

    def convert(self, model: nn.Module) -> nn.Module:
        for name in self.config.modules:
            linear = model.get_submodule(name)
            u, s, vh = torch.linalg.svd(linear.weight.detach(), full_matrices=False)
            factored = Factored.empty(linear, self.config.rank)
            with torch.no_grad():
                factored[0].weight.copy_(s[: self.config.rank, None] * vh[: self.config.rank])
                factored[1].weight.copy_(u[:, : self.config.rank])
                if linear.bias is not None:
                    factored[1].bias.copy_(linear.bias)
            model.set_submodule(name, factored)
        return model


def _has(model: nn.Module, name: str) -> bool:
    return name in dict(model.named_modules())


def describe(model: nn.Module) -> dict | None:
    block = {name: m[0].out_features for name, m in model.named_modules() if isinstance(m, Factored)}
    return block or None


def rebuild(model: nn.Module, block: dict) -> nn.Module:
    for name, rank in block.items():
        if not (_has(model, name) and isinstance(rank, int) and rank >= 1):
            raise FormatError(f"config.json: slimkit.low_rank.{name}: not a Linear layer with a rank >= 1")
        model.set_submodule(name, Factored.empty(model.get_submodule(name), rank))
    return model


def summary(block: dict) -> str:
    return f"{len(block)} layers factored, ranks {sorted(set(block.values()))}"


MODULES = ["classifier", "bert.encoder.layer.0.intermediate.dense"]


@pytest.fixture
def lowrank():
    spec = slimkit.register_method(
        "lowrank",
        config=LowRankConfig,
        method=LowRank,
        order=150,  # after pruning, before quantization
        block=slimkit.HubBlock("low_rank", describe=describe, rebuild=rebuild, summary=summary),
    )
    yield spec
    slimkit.methods.unregister_method("lowrank")


def _inputs():
    return {"input_ids": torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(0))}


def test_a_registered_method_is_prepared_converted_saved_and_rebuilt(lowrank, tmp_path):
    assert [s.section for s in slimkit.registered_methods()] == ["prune", "lowrank", "quant", "distill"]
    recipe = slimkit.Recipe.from_dict({"lowrank": {"modules": MODULES, "rank": 3}})
    assert recipe.section("lowrank") == LowRankConfig(modules=MODULES, rank=3)
    assert slimkit.Recipe.from_dict(recipe.to_dict()) == recipe
    with pytest.raises(slimkit.ConfigError, match=r"lowrank\.rank: must be >= 1"):
        slimkit.Recipe.from_dict({"lowrank": {"rank": 0}})

    model = hf_model("bert").eval()
    slimkit.prepare(model, recipe, example_inputs=_inputs())
    method = slimkit.methods_of(model)["lowrank"]
    assert isinstance(method, LowRank) and method.config.rank == 3
    slimkit.step(model)
    slimkit.step(model)
    assert slimkit.log_values(model)["lowrank/steps"] == 2.0

    small = slimkit.convert(model)
    assert slimkit.methods_of(small) == {}
    assert all(isinstance(small.get_submodule(name), Factored) for name in MODULES)
    assert small.get_submodule(MODULES[0])[0].out_features == 3
    with torch.no_grad():
        expected = small(**_inputs()).logits

    slimkit.save_pretrained(small, tmp_path / "out")
    block = json.loads((tmp_path / "out" / "config.json").read_text())["slimkit"]
    assert block["low_rank"] == {name: 3 for name in MODULES}
    assert block["recipe"]["lowrank"] == {"modules": MODULES, "rank": 3}
    assert block["native_load"] is False  # transformers alone would build plain Linear layers

    again = slimkit.from_pretrained(tmp_path / "out")
    assert all(isinstance(again.get_submodule(name), Factored) for name in MODULES)
    with torch.no_grad():
        torch.testing.assert_close(again(**_inputs()).logits, expected)

    info = folder_info(tmp_path / "out")
    assert info["low_rank"] == block["low_rank"]
    assert "2 layers factored, ranks [3]" in format_info(info)


@dataclasses.dataclass
class NoteConfig(Config):
    """A method that only notes when each stage reaches it."""

    note: str = help_field("", "the name it notes")


class Note(Method):
    seen: ClassVar[list[str]] = []

    def prepare(self, model: nn.Module) -> None:
        Note.seen.append(f"prepare {self.config.note}")

    def convert(self, model: nn.Module) -> nn.Module:
        Note.seen.append(f"convert {self.config.note}")
        model.__dict__.setdefault("notes", []).append(self.config.note)
        return model


def _note_block(name: str) -> slimkit.HubBlock:
    def describe(model):
        return {"note": name} if name in model.__dict__.get("notes", []) else None

    def rebuild(model, block):
        Note.seen.append(f"rebuild {block['note']}")
        return model

    return slimkit.HubBlock(f"{name}_block", describe=describe, rebuild=rebuild)


def test_registered_methods_run_in_their_order_at_every_stage(tmp_path):
    # 'alpha' is registered first, named first in the recipe and first alphabetically: only the orders
    # say that 'zeta' runs first.
    for name, order in (("alpha", 400), ("zeta", 50)):
        slimkit.register_method(name, config=NoteConfig, method=Note, order=order, block=_note_block(name))
    try:
        Note.seen.clear()
        model = nn.Sequential(nn.Linear(4, 3))
        recipe = {"alpha": {"note": "alpha"}, "zeta": {"note": "zeta"}}
        slimkit.prepare(model, recipe, example_inputs=torch.randn(2, 4))
        assert list(slimkit.methods_of(model)) == ["zeta", "alpha"]
        small = slimkit.convert(model)
        slimkit.save_pretrained(small, tmp_path / "out")
        slimkit.from_pretrained(tmp_path / "out", model=nn.Sequential(nn.Linear(4, 3)))
        assert Note.seen == [
            f"{stage} {name}" for stage in ("prepare", "convert", "rebuild") for name in ("zeta", "alpha")
        ]

        # Prepared one section at a time, the late one first: convert still follows the orders.
        Note.seen.clear()
        model = nn.Sequential(nn.Linear(4, 3))
        slimkit.prepare(model, {"alpha": {"note": "alpha"}}, example_inputs=torch.randn(2, 4))
        slimkit.prepare(model, {"zeta": {"note": "zeta"}}, example_inputs=torch.randn(2, 4))
        slimkit.convert(model)
        assert Note.seen == ["prepare alpha", "prepare zeta", "convert zeta", "convert alpha"]
    finally:
        for name in ("alpha", "zeta"):
            slimkit.methods.unregister_method(name)


def test_a_registered_method_gets_a_trainer_callback(lowrank, tmp_path):
    transformers = pytest.importorskip("transformers")
    from slimkit.plugins.hf import SlimCallback, slim_callbacks

    model = hf_model("bert")
    callbacks = slim_callbacks(model, {"lowrank": {"modules": MODULES[:1], "rank": 2}})
    assert [(type(c), c.section) for c in callbacks] == [(SlimCallback, "lowrank")]
    ids = torch.randint(1, 128, (8, 10), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": row, "labels": int(row[0]) % 3} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    trainer.train()
    assert slimkit.methods_of(model)["lowrank"].steps == 2
    assert [h["lowrank/steps"] for h in trainer.state.log_history if "loss" in h] == [1.0, 2.0]


def test_registering_refuses_a_clash():
    with pytest.raises(slimkit.SlimkitError, match="already registered"):
        slimkit.register_method("prune", config=LowRankConfig, method=LowRank, order=1)
    with pytest.raises(slimkit.SlimkitError, match="hub block 'pruning' already belongs to 'prune'"):
        slimkit.register_method(
            "other", config=LowRankConfig, method=LowRank, order=1, block=slimkit.HubBlock("pruning", describe, rebuild)
        )
    assert "other" not in [s.section for s in slimkit.registered_methods()]
