"""Run by tests/prune/test_prune_distributed.py under ``accelerate launch --multi_gpu --num_processes 2``.

Each process calibrates a tiny encoder on its *own* batches (activation importance,
reconstruction, independent and sequential) and writes digests of the masks and of the refit
weights to ``<out>/calibrate<k>.json``; the test checks that both processes hold the very same.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch
import transformers
from accelerate import Accelerator

import slimkit
from tests.families import tiny_bert_config
from tests.models import close_process_group


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().numpy().tobytes()).hexdigest()


def batches(rank: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)  # every process sees other sentences
    out = []
    for _ in range(3):
        ids = torch.randint(1, 128, (6, 10), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def calibrated(data: list, sequential: bool) -> tuple[torch.nn.Module, dict]:
    """The tiny encoder (same weights everywhere), pruned and refit on ``data``."""
    torch.manual_seed(0)
    model = transformers.BertModel(tiny_bert_config(), add_pooling_layer=False).eval()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    prune = {"heads": 0.5, "channels": 0.5, "importance": "activation", "reconstruct": True, "sequential": sequential}
    slimkit.prepare(model, {"prune": prune}, example_inputs=data[0])
    slimkit.calibrate(model, data)
    return model, dense


def main(out: Path) -> None:
    if out.name == "single":  # the reference: one process calibrated on both processes' batches
        record = {}
        for sequential in (False, True):
            model, _ = calibrated(batches(0) + batches(1), sequential)
            record[f"sequential={sequential}"] = model.state_dict()["encoder.layer.0.output.dense.weight"].tolist()
        out.mkdir(parents=True, exist_ok=True)
        (out / "single.json").write_text(json.dumps(record))
        return
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    record = {"world_size": accelerator.num_processes}
    for sequential in (False, True):
        model, dense = calibrated(batches(rank), sequential)
        refit = [f"encoder.layer.{i}.{n}" for i in (0, 1) for n in ("attention.output.dense", "output.dense")]
        state = model.state_dict()
        record[f"sequential={sequential}"] = {
            "masks": [digest(state["slimkit.prune.channels_pruned"]), digest(state["slimkit.prune.heads_pruned"])],
            "weights": {n: digest(state[f"{n}.weight"]) + digest(state[f"{n}.bias"]) for n in refit},
            "changed": all(not torch.equal(state[f"{n}.bias"], dense[f"{n}.bias"]) for n in refit),
            "layer0_ffn_out": state["encoder.layer.0.output.dense.weight"].tolist(),
        }
    (out / f"calibrate{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    close_process_group()
