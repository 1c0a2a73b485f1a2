"""The library pieces scripts/distill.py and scripts/demo.py are made of (slimkit.plugins.distill_run
and its helpers): schedules from the recipe, fingerprints, saving, loading, scoring."""

import json

import pytest
import torch
from torch.utils.data import TensorDataset

import slimkit
from slimkit.adapters import ModelAdapter
from slimkit.errors import FormatError, SlimkitError, UnsupportedModelError
from slimkit.fingerprint import architecture_fingerprint, fingerprint, method_state_fingerprint
from slimkit.folder_checks import architecture_of, library_of
from slimkit.hub import build_architecture
from slimkit.json_bounds import exceeded_bound
from slimkit.plugins.data import TaskData, as_call, digits, task_tensors
from slimkit.plugins.evaluation import Scorer, calibration_batches, check_classes, embedding_cosine, evaluate
from slimkit.plugins.loading import input_kind, load_model, load_tokenizer
from slimkit.plugins.training import lr_factor, random_shift, set_lr
from tests.families import hf_model, timm_model
from tests.models import ROOT

ONE_SHOT_HALF = {"prune": {"channels": 0.5, "schedule": {"kind": "one_shot", "start_step": 0}}}


# --- the stages of a run come from the recipe's sections ------------------------------------------


@pytest.mark.parametrize(
    "recipe, ends",
    [
        (ROOT / "recipes" / "digits_pipeline.yaml", {270: "distilled", 810: "pruned"}),
        ({"distill": {}, "quant": {"start_step": 50}}, {50: "distilled"}),
        ({"quant": {"start_step": 50}}, {50: "trained"}),
        ({"quant": {"mode": "ptq", "start_step": 50}}, {}),  # PTQ does not train: no phase
        # pruned at step 0 (slimkit.calibrate), then QAT: the KD-only phase never happens
        ({"distill": {}, "prune": {"heads": 0.5}, "quant": {"start_step": 5}}, {5: "pruned"}),
        ({"prune": {"channels": 0.5, "schedule": {"kind": "one_shot", "start_step": 7}}}, {7: "trained"}),
    ],
)
def test_phase_ends_come_from_the_sections(recipe, ends):
    recipe = slimkit.Recipe.from_file(recipe) if not isinstance(recipe, dict) else slimkit.Recipe.from_dict(recipe)
    assert recipe.phase_ends() == ends


def test_a_registered_section_names_its_own_phase():
    """A method registered later gets its stage in the run by its config alone."""
    import dataclasses
    from typing import ClassVar

    from slimkit._config import Config, help_field
    from slimkit.controller import Method
    from slimkit.methods import unregister_method

    @dataclasses.dataclass
    class LateConfig(Config):
        section: ClassVar[str] = "late"
        stage_name: ClassVar[str] = "late-done"
        start_step: int = help_field(0, "when it starts")

        def phase_start(self):
            return self.start_step

    slimkit.register_method("late", config=LateConfig, method=Method, order=250)
    try:
        recipe = slimkit.Recipe.from_dict({"distill": {}, "late": {"start_step": 9}, "quant": {"start_step": 20}})
        assert recipe.phase_ends() == {9: "distilled", 20: "late-done"}
    finally:
        unregister_method("late")


# --- the loop's stateless pieces --------------------------------------------------------------------


def test_lr_factor_warms_up_then_decays_to_zero():
    total = 100
    factors = [lr_factor(s, total, "cosine") for s in range(total)]
    assert factors[0] == pytest.approx(0.2) and factors[4] == pytest.approx(1.0)  # 5 warm-up steps
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))  # then never rises
    assert factors[-1] < 0.001 and lr_factor(total, total, "cosine") == pytest.approx(0.0)
    assert {lr_factor(s, total, "constant") for s in range(total)} == {1.0}
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    set_lr(optimizer, 0.25)
    assert optimizer.param_groups[0]["lr"] == 0.25


def test_random_shift_depends_on_seed_and_step_only():
    images = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    a, b = random_shift(images, 2, seed=0, step=3), random_shift(images, 2, seed=0, step=3)
    assert torch.equal(a, b)  # reproducible: the same on every process and after resume
    shifts = {tuple(random_shift(images, 2, seed=0, step=s)[0, 0, 0, :2].tolist()) for s in range(20)}
    assert len(shifts) > 1  # steps differ
    rolled = [torch.roll(images, (dy, dx), (2, 3)) for dy in range(-2, 3) for dx in range(-2, 3)]
    assert any(torch.equal(a, r) for r in rolled)  # a translation of at most 2 pixels, nothing else


# --- fingerprints ----------------------------------------------------------------------------------------


def test_fingerprints_tell_values_and_shapes_apart():
    x = torch.arange(4.0)
    assert fingerprint({"a": x, "b": (2, 3)}) == fingerprint({"b": (2, 3), "a": x.clone()})  # order free
    assert fingerprint({"a": x}) != fingerprint({"a": x + 1}) and len(fingerprint({"a": x})) == 16
    one, two = timm_model("resnet", seed=0), timm_model("resnet", seed=1)
    assert architecture_fingerprint(one) == architecture_fingerprint(two)  # weights do not count
    assert architecture_fingerprint(one) != architecture_fingerprint(timm_model("resnet-wide"))


def test_pruning_state_fingerprint_follows_the_masks():
    """The same weights prune the same units (equal hashes); other weights prune others."""
    example = torch.randn(2, 3, 32, 32)
    recipe = {"prune": {"channels": 0.5, "schedule": {"kind": "one_shot", "start_step": 1}}}
    models = [timm_model("resnet", seed=seed) for seed in (0, 0, 1)]
    before = []
    for model in models:
        slimkit.prepare(model, recipe, example_inputs=example)
        before.append(method_state_fingerprint(model, "prune"))
        slimkit.step(model, 1)  # the one-shot pruning point
    after = [method_state_fingerprint(model, "prune") for model in models]
    assert after[0] == after[1] != after[2]
    assert after[0] != before[0]  # the masks changed at the pruning step
    assert method_state_fingerprint(models[0], "quant") == fingerprint({})  # no such state: the empty hash


# --- save_student, build_architecture, model_info --------------------------------------------------------


def test_save_student_converts_scores_and_saves_on_the_main_process(tmp_path):
    from accelerate import Accelerator

    from slimkit.plugins.accelerate import save_student

    accelerator = Accelerator(cpu=True)
    example = torch.randn(2, 3, 32, 32)
    model = timm_model("resnet", seed=3)
    slimkit.prepare(model, ONE_SHOT_HALF, example_inputs=example)
    slimkit.step(model, 1)
    wrapped = accelerator.prepare(model)
    written = []
    small = save_student(
        accelerator, wrapped, tmp_path / "out", written.append, report=lambda m: {"width": m.fc.in_features}
    )
    assert slimkit.methods_of(small) == {} and small.fc.in_features < 64  # converted: pruned, plain
    assert written == [tmp_path / "out"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["slimkit"]["report"]["metrics"] == {"width": small.fc.in_features}
    loaded = slimkit.from_pretrained(tmp_path / "out")
    assert torch.equal(loaded(example), small.eval()(example))
    assert slimkit.model_info(loaded).folder == str(tmp_path / "out")
    assert "channels / MLP neurons removed" in slimkit.model_info(small).report["methods"]


def test_build_architecture_replays_only_the_blocks_asked_with_random_weights(tmp_path):
    example = torch.randn(2, 3, 32, 32)
    model = timm_model("resnet", seed=4)
    slimkit.prepare(model, ONE_SHOT_HALF, example_inputs=example)
    slimkit.step(model, 1)
    small = slimkit.convert(model)
    slimkit.save_pretrained(small, tmp_path / "f")
    pruned = build_architecture(tmp_path / "f")
    assert architecture_fingerprint(pruned) == architecture_fingerprint(small)
    assert not torch.equal(pruned.conv1.weight, small.conv1.weight)  # the shapes, not the weights
    dense = build_architecture(tmp_path / "f", blocks=())
    assert architecture_fingerprint(dense) == architecture_fingerprint(timm_model("resnet"))


# --- loading and scoring ------------------------------------------------------------------------------------


def test_load_model_takes_a_folder_or_a_timm_name(tmp_path):
    built = load_model("resnet18", num_classes=7, in_chans=1)
    assert built.num_classes == 7 and built.conv1.in_channels == 1 and input_kind(built) == "image"
    slimkit.save_pretrained(hf_model("bert-base"), tmp_path / "bert")
    assert input_kind(load_model(str(tmp_path / "bert"))) == "text"
    with pytest.raises(SlimkitError, match="'no-such-net' is neither a folder nor a timm model name"):
        load_model("no-such-net")
    with pytest.raises(SlimkitError, match="no tokenizer files"):
        load_tokenizer(str(tmp_path / "bert"))


def test_scoring_accuracy_and_embedding_cosine():
    data = digits(channels=3, size=(32, 32), seed=0)
    eval_set = TensorDataset(data.eval.inputs[:40], data.eval.labels[:40])
    model = timm_model("resnet", seed=5)
    result = evaluate(model, eval_set, "image", 16, "cpu")
    expected = float((model.eval()(eval_set.tensors[0]).argmax(-1) == eval_set.tensors[1]).float().mean())
    assert result == {"accuracy": pytest.approx(expected)}
    scorer = Scorer(model, eval_set, "image", "cpu")
    assert scorer.teacher == result and scorer.score(model) == result
    a = torch.randn(5, 8)
    assert embedding_cosine(a, a) == pytest.approx(1.0) and embedding_cosine(a, -a) == pytest.approx(-1.0)
    assert embedding_cosine(a, torch.randn(5, 4)) is None


def test_check_classes_refuses_a_head_that_does_not_fit_the_data():
    data = digits(channels=3, size=(32, 32), seed=0)  # 10 classes
    example, _ = as_call(task_tensors(data, "train")[:2], "image")
    assert check_classes(timm_model("resnet", num_classes=10), example, data, "digits") is True
    with pytest.raises(SlimkitError, match="has 10 classes but the teacher .* predicts 4"):
        check_classes(timm_model("resnet", num_classes=4), example, data, "digits")
    unlabelled = TaskData("image", data.train, data.eval, num_classes=0, class_names=[], labelled=False)
    with pytest.raises(SlimkitError, match="has no 'label' column"):
        check_classes(timm_model("resnet"), example, unlabelled, "mine")


def test_calibration_batches_are_a_fixed_shuffled_prefix():
    data = digits(channels=1, size=(8, 8), seed=0)
    train = task_tensors(data, "train")
    first = calibration_batches(train, "image", True, 8, 3, seed=1)
    again = calibration_batches(train, "image", True, 8, 3, seed=1)
    assert len(first) == 3 and all(x.shape == (8, 1, 8, 8) and y.shape == (8,) for x, y in first)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert not torch.equal(first[0][0], calibration_batches(train, "image", True, 8, 3, seed=2)[0][0])


# --- one place for "which library", the adapter interface, one depth walker --------------------------------


def test_library_and_architecture_are_decided_in_one_place():
    assert library_of({"model_type": "bert", "architectures": ["BertModel"]}, "c.json") == "transformers"
    assert library_of({"architecture": "resnet18"}, "c.json") == "timm"
    assert library_of({"model_type": "bert", "slimkit": {"library": "torch"}}, "c.json") == "torch"
    with pytest.raises(FormatError, match="c.json holds neither a transformers config"):
        library_of({"hidden_size": 3}, "c.json")
    with pytest.raises(FormatError, match="slimkit.library must be one of"):
        library_of({"slimkit": {"library": "keras"}}, "c.json")
    assert architecture_of({"architecture": "resnet18"}) == "resnet18"
    assert architecture_of({"architectures": ["BertModel"]}) == "BertModel"
    assert architecture_of({"architectures": [3]}) is None


def test_the_base_adapter_refuses_plain_folders_clearly(tmp_path):
    with pytest.raises(UnsupportedModelError, match="cannot load a folder that slimkit did not write"):
        ModelAdapter().load_plain(tmp_path)
    assert ModelAdapter.load_plain.__doc__


def test_one_walker_bounds_depth_and_size():
    deep: list = []
    node = deep
    for _ in range(10):
        node.append([])
        node = node[0]
    assert exceeded_bound(deep, max_depth=11, max_values=100) is None
    assert exceeded_bound(deep, max_depth=10, max_values=100) == "depth"
    # the dict, the list and its items: 50 values
    assert exceeded_bound({"a": list(range(48))}, max_depth=5, max_values=50) is None
    assert exceeded_bound({"a": list(range(49))}, max_depth=5, max_values=50) == "values"


def test_no_script_or_benchmark_imports_a_script():
    """scripts/*.py are entry points: what they share lives in the library (issue 14)."""
    import ast

    scripts = {p.stem for p in (ROOT / "scripts").glob("*.py")}
    offenders = []
    for path in [*(ROOT / "scripts").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            offenders += [f"{path.name}: import {n}" for n in names if n.split(".")[0] in scripts]
    assert not offenders
    path_edits = [p.name for p in (ROOT / "benchmarks").glob("*.py") if '"scripts"' in p.read_text()]
    assert not path_edits, f"{path_edits} put scripts/ on sys.path"


def test_shallow_student_keeps_the_layers_asked_and_the_tokenizer_files(tmp_path):
    from slimkit.plugins.shallow_student import choose_layers, save_shallow_student

    teacher = hf_model("bert-base", seed=6, num_hidden_layers=3)
    teacher.save_pretrained(tmp_path / "t")
    (tmp_path / "t" / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    out = save_shallow_student(tmp_path / "t", teacher, [0, 2], tmp_path / "s")
    student = slimkit.from_pretrained(out)
    assert student.config.num_hidden_layers == 2 and (out / "vocab.txt").read_text() == "[PAD]\n[UNK]\n"
    kept = [layer.output.dense.weight for layer in student.encoder.layer]
    assert torch.equal(kept[1], teacher.encoder.layer[2].output.dense.weight)
    with pytest.raises(SlimkitError, match="--num-layers 3: the teacher has 3 layers; keep between 1 and 2"):
        choose_layers(teacher, [], 3, "output_cosine")
