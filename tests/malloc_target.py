"""Run by tests/test_malloc.py in a fresh process (slimkit.steady_malloc is process-wide and
cannot be undone): ``python tests/malloc_target.py default|steady CACHE`` prints one JSON line."""

import json
import logging
import sys

import torch
from torch import nn

import slimkit
from slimkit.malloc import faults_per_call

mode, cache = sys.argv[1], sys.argv[2]
applied = slimkit.steady_malloc() if mode == "steady" else False
torch.manual_seed(0)
torch.set_num_threads(1)
# a 192 MB allocation, touched: above glibc's largest dynamic mmap threshold (32 MB)
big = faults_per_call(lambda: torch.empty(48 << 20).fill_(1.0), calls=4)

records: list[str] = []


class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())


logging.getLogger("slimkit").addHandler(Keep())
# an MLP whose hidden activation at the timed batch (8192 x 4096 floats) is 128 MB
model = nn.Sequential(nn.Linear(8, 4096), nn.ReLU(), nn.Linear(4096, 8)).eval()
batches = [torch.randn(64, 8) for _ in range(2)]
target = {"speedup": 1.2, "batch": 8192, "threads": 1, "rounds": 1, "widths": 3, "compare": False, "cache": cache}
slimkit.prepare(
    model, {"prune": {"target": target, "importance": "activation", "include": ["0"]}}, example_inputs=batches[0]
)
slimkit.calibrate(model, batches)
outcome = slimkit.prune.summary(model)["target"]
print(
    json.dumps(
        {
            "applied": applied,
            "big_alloc_faults": big,
            "page_faults": outcome["page_faults"],
            "steady_malloc": outcome["steady_malloc"],
            "warned": any("page faults" in r for r in records),
            "card": slimkit.model_info(slimkit.convert(model)).report["methods"]["target"],
        }
    )
)
