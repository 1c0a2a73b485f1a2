"""Folders from anywhere (issue 10, items 1-5): every malformed-but-valid-JSON folder is a
FormatError naming the file and the field; declared sizes never allocate before the weights
file's header agrees with them; manifests may set only size attributes; INT8 values are
checked; no remote code by way of a Hub attention kernel."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

import slimkit
from slimkit import FormatError
from slimkit.cli import main as cli_main
from tests.families import hf_model, timm_model

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
LIMIT = 64 << 20  # no tensor of these tiny models comes near this


class AllocationGuard(TorchDispatchMode):
    """Fails at once when any real (non-meta) tensor larger than ``LIMIT`` is created."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and not t.is_meta and t.numel() * t.element_size() > LIMIT:
                raise AssertionError(f"{func} allocated {t.numel() * t.element_size() / 2**30:.1f} GiB")
        return out


def _pruned_timm():
    model = timm_model("resnet")
    slimkit.prepare(model, {"prune": {"channels": 0.5, "verify": False}})
    slimkit.step(model, 0)
    return slimkit.convert(model)


def _int8_timm():
    model = timm_model("resnet").eval()
    slimkit.prepare(model, {"quant": {"mode": "ptq"}}, example_inputs=IMAGES)
    slimkit.calibrate(model, [IMAGES])
    return slimkit.convert(model)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    made = {"timm": timm_model("resnet"), "hf": hf_model("bert"), "pruned": _pruned_timm(), "int8": _int8_timm()}
    for name, model in made.items():
        slimkit.save_pretrained(model, root / name)
    plain = root / "plain-hf"
    hf_model("bert").save_pretrained(plain)
    return {**{name: root / name for name in made}, "plain-hf": plain}


def variant(folders, tmp_path, key, edit=None, weights=None, text=None) -> Path:
    """A copy of ``folders[key]`` with its config edited (``edit(config)``, may return a new
    one), its tensors edited (``weights(state)``) or its config replaced by ``text``."""
    folder = tmp_path / key
    shutil.copytree(folders[key], folder)
    config = json.loads((folder / "config.json").read_text())
    if weights is not None:  # written unpacked (as format 1): the checks under test are per tensor
        state = slimkit.hub.folder_state_dict(folders[key])
        weights(state)
        save_file(state, folder / "model.safetensors")
        config.get("slimkit", {}).pop("weights_sha256", None)
    if edit is not None:
        config = edit(config) or config
    (folder / "config.json").write_text(text if text is not None else json.dumps(config))
    return folder


def refused(folder, message):
    with AllocationGuard(), pytest.raises(FormatError, match=message) as info:
        slimkit.from_pretrained(folder)
    assert "config.json" in str(info.value) or "model.safetensors" in str(info.value)  # names the file
    return info.value


def sk(config):
    return config["slimkit"]


def nest(depth):
    value = 1
    for _ in range(depth):
        value = {"a": value}
    return value


# --- 2: malformed but valid JSON ----------------------------------------------------------------------

MALFORMED = [
    ("hf", lambda c: c.update(architectures=5), "architectures must be a list"),
    ("hf", lambda c: c.update(architectures=[]), "architectures must be a list"),
    ("hf", lambda c: c.update(architectures=[["BertModel"]]), "architectures must be a list"),
    ("hf", lambda c: c.update(architectures=["NoSuchModel"]), "'architectures' must name a transformers model"),
    ("hf", lambda c: c.update(architectures=["AutoModel"]), "'architectures' must name a transformers model"),
    ("hf", lambda c: c.update(model_type=5), "model_type must be a string"),
    ("hf", lambda c: c.update(num_hidden_layers="2"), "cannot be built from this config"),
    ("hf", lambda c: c.update(hidden_size=-32), "cannot be built from this config"),
    ("hf", lambda c: c.update(vocab_size=5e7), "cannot be built from this config"),
    ("timm", lambda c: sk(c).update(library=["timm"]), "slimkit.library must be a string"),
    ("timm", lambda c: sk(c).update(library="keras"), "slimkit.library must be one of"),
    ("timm", lambda c: c.update(slimkit=[1]), "'slimkit' must be a JSON object"),
    ("timm", lambda c: sk(c).update(format_version=True), "format_version must be a whole number"),
    ("timm", lambda c: sk(c).update(format_version="1"), "format_version must be a whole number"),
    ("timm", lambda c: sk(c).update(format_version=0), "format_version must be a whole number"),
    ("timm", lambda c: sk(c).pop("format_version") and None, "format_version must be a whole number"),
    ("timm", lambda c: sk(c).update(weights_sha256=5), "weights_sha256 must be 64 lowercase hex digits"),
    ("timm", lambda c: sk(c).update(version=1.0), "slimkit.version must be a string"),
    ("timm", lambda c: sk(c).update(report=5), "slimkit.report must be a JSON object"),
    ("timm", lambda c: sk(c).update(recipe=[]), "slimkit.recipe must be a JSON object"),
    ("timm", lambda c: sk(c).update(pruning="x"), "slimkit.pruning must be a JSON object"),
    ("timm", lambda c: c.update(architecture="hf-hub:timm/resnet18.a1_in1k"), "architecture must name a model timm"),
    ("timm", lambda c: c.update(architecture="local-dir:/tmp"), "architecture must name a model timm"),
    ("timm", lambda c: c.update(architecture=5), "architecture must name a model timm"),
    ("timm", lambda c: c.update(architecture="no_such_net"), "architecture must name a model timm"),
    ("timm", lambda c: c.update(model_args=[1]), "model_args must be a JSON object"),
    ("timm", lambda c: c["model_args"].update(checkpoint_path="/x.pth"), "model_args.checkpoint_path is an option"),
    ("timm", lambda c: c["model_args"].update(pretrained=True), "model_args.pretrained is an option"),
    ("timm", lambda c: c["model_args"].update(channels="abc"), "cannot be built from this config"),
    ("timm", lambda c: c.update(pretrained_cfg=[]), "pretrained_cfg has the wrong type"),
    ("timm", lambda c: c.update(deep=nest(40)), "nested more than 32 levels"),
    ("timm", lambda c: [1], "must hold a JSON object"),
    ("pruned", lambda c: sk(c)["pruning"].update(format="x"), "pruning.format must be a whole number"),
    ("pruned", lambda c: sk(c)["pruning"].update(format=99), "format 99, written by a newer slimkit"),
    ("pruned", lambda c: sk(c)["pruning"].update(tensors=[]), "pruning.tensors must be a JSON object"),
    ("pruned", lambda c: sk(c)["pruning"]["tensors"].update({"fc.weight": [-1, 32]}), "must be a list of whole"),
    ("pruned", lambda c: sk(c)["pruning"]["tensors"].update({"fc.weight": "10,32"}), "must be a list of whole"),
    ("pruned", lambda c: sk(c)["pruning"]["tensors"].update({"fc.weight": [10, 32.5]}), "must be a list of whole"),
    ("pruned", lambda c: sk(c)["pruning"]["tensors"].update({"fc.weight": [10]}), "pruning only shrinks"),
    ("pruned", lambda c: sk(c)["pruning"]["tensors"].update({"nope.weight": [1]}), "does not have"),
    ("pruned", lambda c: sk(c)["pruning"]["tensors"].update({"fc.forward": [1]}), "does not have"),
    ("pruned", lambda c: sk(c)["pruning"]["attributes"].update({"fc": 5}), r"attributes\['fc'\] must be a JSON"),
    ("pruned", lambda c: sk(c)["pruning"]["attributes"].update({"nope": {"out_features": 3}}), "names module"),
    ("pruned", lambda c: sk(c)["pruning"].update(heads={"fc": [0, 1]}), r"heads\['fc'\] must be \[query heads"),
    ("pruned", lambda c: sk(c)["pruning"].update(config=[]), "pruning.config must be a JSON object"),
    ("int8", lambda c: sk(c)["quantization"].update(layers=[]), "quantization.layers must be a JSON object"),
    ("int8", lambda c: sk(c)["quantization"]["layers"]["fc"].update(kind="lstm"), r"\.kind must be one of"),
    ("int8", lambda c: sk(c)["quantization"]["layers"]["fc"].update(kind=None), r"\.kind must be a string"),
    ("int8", lambda c: sk(c)["quantization"]["layers"]["fc"].update(activations=1), r"\.activations must be"),
    ("int8", lambda c: sk(c)["quantization"]["layers"].update(conv1=[]), r"layers\['conv1'\] must be a JSON"),
    ("int8", lambda c: sk(c)["quantization"]["layers"].update(nope={"kind": "linear"}), "names layer 'nope'"),
    ("int8", lambda c: sk(c)["quantization"].update(sites={"act1": "middle"}), r"sites\['act1'\] must be one of"),
    ("int8", lambda c: sk(c)["quantization"].update(folded_batchnorms={"bn1": "x"}), "must be one of"),
    ("int8", lambda c: sk(c)["quantization"].update(embeddings="emb"), "embeddings must be a list of module"),
    ("int8", lambda c: sk(c)["quantization"].update(sites_read_by_layers_only=5), "must be a list of module"),
    ("int8", lambda c: sk(c)["quantization"].update(format="2"), "quantization.format must be a whole number"),
    ("int8", lambda c: sk(c)["quantization"].update(format=99), "format 99, written by a newer slimkit"),
]


@pytest.mark.parametrize("key, edit, message", MALFORMED, ids=[f"{k}-{m[:40]}" for k, _, m in MALFORMED])
def test_malformed_folders_are_format_errors_naming_file_and_field(folders, tmp_path, key, edit, message, capsys):
    folder = variant(folders, tmp_path, key, edit)
    refused(folder, message)
    assert cli_main(["info", str(folder)]) in (0, 2)  # `slimkit info` never prints a traceback either
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("depth", [100_000, 2_000])
def test_deeply_nested_json_is_a_format_error(folders, tmp_path, depth):
    folder = variant(folders, tmp_path, "timm", text='{"x": ' + "[" * depth + "]" * depth + "}")
    refused(folder, "nested")


# --- 1: memory bombs ----------------------------------------------------------------------------------


def test_a_declared_vocabulary_of_fifty_million_is_refused_before_allocating(folders, tmp_path):
    refused(variant(folders, tmp_path, "hf", lambda c: c.update(vocab_size=50_000_000)), r"has shape \(128, 32\)")


def test_declared_positions_and_widths_are_refused_before_allocating(folders, tmp_path):
    refused(variant(folders, tmp_path, "hf", lambda c: c.update(max_position_embeddings=50_000_000)), "has shape")
    channels = lambda c: c["model_args"].update(channels=[8, 16, 32, 40_000])  # noqa: E731
    refused(variant(folders, tmp_path / "t", "timm", channels), "has shape")


def test_a_manifest_shape_of_forty_thousand_squared_is_refused_before_allocating(folders, tmp_path):
    big = lambda c: sk(c)["pruning"]["tensors"].update({"layer4.0.conv1.weight": [40000, 40000, 1, 1]})  # noqa: E731
    refused(variant(folders, tmp_path, "pruned", big), "pruning only shrinks")


@pytest.mark.parametrize("layers", [3_000, 1_000_000])
def test_a_million_layers_are_refused_while_the_model_is_built(folders, tmp_path, layers):
    refused(variant(folders, tmp_path, "hf", lambda c: c.update(num_hidden_layers=layers)), "more than .* tensors")


def test_a_giant_base_shrunk_by_a_manifest_never_allocates_the_base(folders, tmp_path):
    """A valid folder whose unpruned architecture is huge (layer4 of 400k channels) and whose
    manifest gives every tensor of it the small saved shape: it loads, and the base is never
    allocated (a CPU build would need 6 GB for one of its convs)."""
    header = load_file(folders["timm"] / "model.safetensors")

    def edit(config):
        config["model_args"]["channels"] = [8, 16, 32, 400_000]
        with torch.device("meta"):
            big = slimkit.hub.adapter_for_library("timm").build(config)
        shapes = {k: list(v.shape) for k, v in big.state_dict().items()}
        config["slimkit"]["pruning"] = {
            "format": 1,
            "tensors": {k: list(header[k].shape) for k in header if shapes[k] != list(header[k].shape)},
            "attributes": {"": {"num_features": 64}, "fc": {"in_features": 64}},
        }

    folder = variant(folders, tmp_path, "timm", edit)
    with AllocationGuard(), torch.no_grad():
        model = slimkit.from_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(model(IMAGES), slimkit.from_pretrained(folders["timm"])(IMAGES))


def test_weights_that_disagree_with_the_config_are_refused_without_loading(folders, tmp_path):
    grown = lambda s: s.update({"fc.weight": torch.zeros(10, 65)})  # noqa: E731
    refused(variant(folders, tmp_path, "timm", weights=grown), r"fc.weight has shape \(10, 65\)")
    refused(variant(folders, tmp_path / "b", "timm", weights=lambda s: s.pop("fc.bias")), r"lacks.*fc.bias")


def test_plain_folders_are_size_checked_before_their_own_loader_runs(folders, tmp_path):
    refused(variant(folders, tmp_path, "plain-hf", lambda c: c.update(vocab_size=50_000_000)), "has shape")
    refused(variant(folders, tmp_path / "b", "plain-hf", lambda c: c.update(architectures=5)), "architectures must")


# --- 3: manifest attributes -------------------------------------------------------------------------

ATTRIBUTES = [
    ({"fc": {"forward": 3}}, "is not a size attribute pruning writes"),
    ({"fc": {"training": 1}}, "is not a size attribute pruning writes"),
    ({"layer1.0.conv1": {"stride": [2, 2]}}, "is not a size attribute pruning writes"),
    ({"layer1.0.conv1": {"__class__": 1}}, "is not a size attribute pruning writes"),
    ({"fc": {"out_features": "10"}}, "must be a whole number >= 0"),
    ({"fc": {"out_features": True}}, "must be a whole number >= 0"),
    ({"fc": {"out_features": -1}}, "must be a whole number >= 0"),
    ({"fc": {"out_features": [10]}}, r"cannot be set to \[10\]"),
    ({"fc": {"num_gremlins": 3}}, "cannot be set to 3"),
    ({"layer1.0.conv1": {"in_channels": 2**40}}, "must be a whole number >= 0"),
]


@pytest.mark.parametrize("attributes, message", ATTRIBUTES)
def test_manifest_attributes_are_only_sizes_of_the_right_type(folders, tmp_path, attributes, message):
    folder = variant(folders, tmp_path, "pruned", lambda c: sk(c)["pruning"]["attributes"].update(attributes))
    refused(folder, message)


def test_the_size_attributes_pruning_writes_still_load(folders):
    model = slimkit.from_pretrained(folders["pruned"])
    assert model.layer4[0].conv1.out_channels == model.layer4[0].conv1.weight.shape[0] < 64


# --- 4: INT8 values ---------------------------------------------------------------------------------


def _set(key, fill=None, tensor=None):
    def edit(state):
        if tensor is not None:
            state[key] = tensor(state[key])
        else:
            state[key] = state[key].clone()
            state[key].view(-1)[0] = fill

    return edit


INT8 = [
    (_set("layer1.0.conv1.weight_scale", float("nan")), r"layer1.0.conv1.weight_scale holds non-finite"),
    (_set("layer1.0.conv1.weight_scale", float("inf")), "holds non-finite"),
    (_set("layer1.0.conv1.weight_scale", 0.0), "holds zero or negative scales"),
    (_set("layer1.0.conv1.weight_scale", -0.5), "holds zero or negative scales"),
    (_set("fc.input_scale", float("nan")), r"fc.input_scale holds non-finite"),
    (_set("fc.input_zero_point", 300), r"fc.input_zero_point holds zero-points outside the uint8 range"),
    (_set("fc.input_zero_point", -1), "outside the uint8 range"),
    (_set("fc.bias", float("nan")), r"fc.bias holds non-finite"),
    (_set("layer1.0.conv1.weight", tensor=lambda t: t.float() + 0.4), "stored as F32 but .* holds torch.int8"),
    (_set("fc.input_zero_point", tensor=lambda t: t.float()), "stored as F32 but .* holds torch.int32"),
]


@pytest.mark.parametrize("weights, message", INT8)
def test_int8_folders_with_bad_scales_zero_points_or_dtypes_are_refused(folders, tmp_path, weights, message):
    refused(variant(folders, tmp_path, "int8", weights=weights), message)


def test_int8_site_scales_are_checked_too(folders, tmp_path):
    state = slimkit.hub.folder_state_dict(folders["int8"])
    site = next(k for k in state if k.endswith("output_scale") or (k.endswith("input_scale") and "conv" not in k))
    refused(variant(folders, tmp_path, "int8", weights=_set(site, float("nan"))), f"{site} holds non-finite")


def test_a_good_int8_folder_still_loads(folders):
    with torch.no_grad():
        assert slimkit.from_pretrained(folders["int8"])(IMAGES).isfinite().all()


# --- 5: no remote code by way of an attention kernel ------------------------------------------------

KERNELS = [
    ("hf", lambda c: c.update(attn_implementation="kernels-community/flash-attn"), "attn_implementation is"),
    ("hf", lambda c: c.update(_attn_implementation="evil-org/kernel@main:attn"), "_attn_implementation is"),
    ("hf", lambda c: c.update(attn_implementation={"": "evil/kernel"}), "attn_implementation is"),
    ("hf", lambda c: c.update(attn_implementation="flash_attention_2"), "attn_implementation is"),
    ("hf", lambda c: c.update(text_config={"attn_implementation": "evil/kernel"}), "text_config.attn_implementation"),
    ("hf", lambda c: c.update(experts_implementation="evil/experts"), "experts_implementation is"),
    ("plain-hf", lambda c: c.update(attn_implementation="evil/kernel"), "attn_implementation is"),
]


@pytest.mark.parametrize("key, edit, message", KERNELS)
def test_a_hub_attention_kernel_is_refused_as_remote_code(folders, tmp_path, key, edit, message):
    error = refused(variant(folders, tmp_path, key, edit), message)
    assert "remote code" in str(error)


def test_local_attention_implementations_still_load(folders, tmp_path):
    model = slimkit.from_pretrained(variant(folders, tmp_path, "hf", lambda c: c.update(attn_implementation="eager")))
    with torch.no_grad():
        assert model(IDS).logits.shape == (2, 3)
