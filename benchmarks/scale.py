#!/usr/bin/env python
"""Memory at scale: a sharded teacher, and large-vocabulary logit KD (issue 13).

**Teacher replicated vs sharded.** ``torchrun --standalone --nproc_per_node 2`` (this script
starts it), gloo on CPU. A 8-layer BERT teacher (hidden 512, ~29M parameters) distils into a
2-layer student (hidden 128) sharded by ``fully_shard`` in both variants; the teacher is either
whole on each process ("replicated", what timm and most KD code do) or sharded with
``fully_shard`` like the student. Per process it measures:

* ``teacher_resident_mib``: the bytes of the teacher's parameters this process holds (exact);
* ``step_alloc_peak_mib``: the peak of the tensors one KD step allocates (benchmarks/memory.py;
  exact, but blind to FSDP2's storage resizes for gathered parameters);
* ``rss_step_peak_mib``: the process's resident size at its highest during a KD step, sampled
  every 0.2 ms, minus the resident size before the teacher was built (glibc's mmap threshold is
  pinned so that freed tensors go back to the system: MALLOC_MMAP_THRESHOLD_).

Goal: the teacher's share per process halves over 2 processes.

**Chunked KD loss.** One process, vocabulary 32k x 1k tokens, the exact allocation counter:
the logits' loss + backward for plain CE, slimkit's chunked KD + CE, and the unchunked KD + CE
it replaces; and a whole GPT-2 training step (vocabulary 32k, 1k tokens) without KD and with
slimkit's KD (teacher forward included). Goal: chunked KD step <= 1.3x the plain CE step.

Memory figures do not depend on the machine's load. Prints the goals beside the measurements
and writes ``benchmarks/results/scale.json``.

    python benchmarks/scale.py
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from benchmarks.memory import peak_bytes  # noqa: E402

MIB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class RssPeak:
    """The highest resident size while the ``with`` block runs (a sampling thread)."""

    def __enter__(self) -> RssPeak:
        self.peak, self._on = rss(), True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._on:
            self.peak = max(self.peak, rss())
            time.sleep(0.0002)

    def __exit__(self, *exc: object) -> None:
        self._on = False
        self._thread.join()
        self.peak = max(self.peak, rss())


# ------------------------------------------------------------------------------------------
# teacher replicated vs sharded (each torchrun process)
# ------------------------------------------------------------------------------------------


def bert(seed: int, layers: int, hidden: int):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=8192,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(2, hidden // 64),
        intermediate_size=4 * hidden,
        max_position_embeddings=128,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(cfg)


def shard(model) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)


def local_bytes(model) -> int:
    from slimkit.distributed import local_tensor

    return sum(local_tensor(p).numel() * p.element_size() for p in model.parameters())


def teacher_variant(sharded: bool, rank: int) -> dict:
    import slimkit

    student = bert(2, 2, 128)
    shard(student)  # the same in both variants: only the teacher differs
    gc.collect()
    before = rss()
    teacher = bert(1, 8, 512)
    full = local_bytes(teacher)
    recipe = {"distill": {"alpha": 0.5, "temperature": 2.0}}
    if sharded:
        shard(teacher)
    slimkit.prepare(student, recipe, teacher=teacher)
    gc.collect()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(rank)
    batch = {
        "input_ids": torch.randint(1, 8192, (8, 128), generator=g),
        "labels": torch.randint(0, 3, (8,), generator=g),
    }

    def step() -> None:
        student(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        slimkit.step(student)

    for _ in range(2):  # warm-up: lazy FSDP init, optimizer state
        step()
    alloc = max(peak_bytes(step) for _ in range(2))
    peaks = []
    for _ in range(3):
        with RssPeak() as sampler:
            step()
        peaks.append(sampler.peak - before)
    out = {
        "teacher_full_mib": full / MIB,
        "teacher_resident_mib": local_bytes(teacher) / MIB,
        "step_alloc_peak_mib": alloc / MIB,
        "rss_step_peak_mib": max(peaks) / MIB,
    }
    return out


def worker(out_file: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    record = {"replicated": teacher_variant(False, rank)}
    dist.barrier()
    record["sharded"] = teacher_variant(True, rank)
    out_file.with_name(f"{out_file.stem}-rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def teacher_sharding() -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "teacher.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "131072"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        done = subprocess.run([*cmd, __file__, "--worker", str(out)], env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit("\n".join(line for line in done.stderr.splitlines() if "W1201" not in line)[-4000:])
        ranks = [json.loads((Path(tmp) / f"teacher-rank{r}.json").read_text()) for r in (0, 1)]
    result: dict = {"processes": 2, "per_rank": ranks}
    for variant in ("replicated", "sharded"):
        result[variant] = {k: max(r[variant][k] for r in ranks) for k in ranks[0][variant]}
    rep, sh = result["replicated"], result["sharded"]
    result["teacher_share_ratio"] = sh["teacher_resident_mib"] / rep["teacher_resident_mib"]
    result["rss_step_peak_ratio"] = sh["rss_step_peak_mib"] / rep["rss_step_peak_mib"]
    result["goal"] = "teacher's share per process halves (ratio <= 0.5 + rounding of uneven shards)"
    return result


# ------------------------------------------------------------------------------------------
# chunked KD at a 32k vocabulary
# ------------------------------------------------------------------------------------------


def chunked_kd(tokens: int = 1024, vocabulary: int = 32000) -> dict:
    from slimkit.distill.losses import logit_kd_and_ce

    torch.manual_seed(0)
    s0, t = torch.randn(tokens, vocabulary), torch.randn(tokens, vocabulary)
    y = torch.randint(0, vocabulary, (tokens,))

    def plain() -> None:
        s = s0.clone().requires_grad_()
        F.cross_entropy(s, y).backward()

    def chunked() -> None:
        s = s0.clone().requires_grad_()
        kd, n, ce, m = logit_kd_and_ce(s, t, 2.0, y, with_ce=True)
        (0.5 * kd / n + 0.5 * ce / m).backward()

    def unchunked() -> None:
        s = s0.clone().requires_grad_()
        log_p_s, log_p_t = F.log_softmax(s / 2.0, -1), F.log_softmax(t / 2.0, -1)
        kd = 4.0 * (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()
        (0.5 * kd + 0.5 * F.cross_entropy(s, y)).backward()

    loss = {name: peak_bytes(fn) / MIB for name, fn in (("plain_ce", plain), ("chunked_kd_ce", chunked))}
    loss["unchunked_kd_ce"] = peak_bytes(unchunked) / MIB
    loss["logits_mib"] = tokens * vocabulary * 4 / MIB
    loss["chunked_over_plain"] = loss["chunked_kd_ce"] / loss["plain_ce"]
    loss["unchunked_over_plain"] = loss["unchunked_kd_ce"] / loss["plain_ce"]
    return {"tokens": tokens, "vocabulary": vocabulary, "loss_only": loss, "gpt2_step": gpt2_step(tokens, vocabulary)}


def gpt2_step(tokens: int, vocabulary: int) -> dict:
    import copy

    import transformers

    import slimkit
    from slimkit.plugins import hf_adapters  # noqa: F401  (the HF adapter)

    def gpt2(seed: int):
        torch.manual_seed(seed)
        cfg = transformers.GPT2Config(
            vocab_size=vocabulary, n_positions=tokens, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
        )
        return transformers.GPT2LMHeadModel(cfg)

    student, teacher = gpt2(2), gpt2(1)
    plain = copy.deepcopy(student).train()
    slimkit.prepare(student, {"distill": {"alpha": 0.5}}, teacher=teacher)
    student.train()
    ids = torch.randint(0, vocabulary, (1, tokens), generator=torch.Generator().manual_seed(0))
    out = {
        "plain_ce_step": peak_bytes(lambda: plain(input_ids=ids, labels=ids).loss.backward()) / MIB,
        "kd_step": peak_bytes(lambda: student(input_ids=ids, labels=ids).loss.backward()) / MIB,
    }
    out["kd_over_plain"] = out["kd_step"] / out["plain_ce_step"]
    return out


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]))
        return
    result = {"teacher_sharding": teacher_sharding(), "chunked_kd": chunked_kd(), "torch": torch.__version__}
    ts, ck = result["teacher_sharding"], result["chunked_kd"]
    print("teacher replicated vs sharded, 2 processes (max over processes, MiB):")
    for key in ("teacher_resident_mib", "step_alloc_peak_mib", "rss_step_peak_mib"):
        print(f"  {key:22s} replicated {ts['replicated'][key]:8.1f}   sharded {ts['sharded'][key]:8.1f}")
    print(f"  teacher share sharded / replicated: {ts['teacher_share_ratio']:.3f}   (goal: 0.5, halves)")
    print(f"  resident peak during a KD step, sharded / replicated: {ts['rss_step_peak_ratio']:.3f}")
    loss, step = ck["loss_only"], ck["gpt2_step"]
    print(f"KD loss at vocabulary {ck['vocabulary']} x {ck['tokens']} tokens (logits {loss['logits_mib']:.0f} MiB):")
    print(
        f"  plain CE {loss['plain_ce']:.0f} MiB, chunked KD + CE {loss['chunked_kd_ce']:.0f} MiB, "
        f"unchunked KD + CE {loss['unchunked_kd_ce']:.0f} MiB"
    )
    print(
        f"  chunked / plain: {loss['chunked_over_plain']:.2f}   (goal: <= 1.3)   "
        f"unchunked / plain: {loss['unchunked_over_plain']:.2f}"
    )
    print(
        f"  GPT-2 step: plain {step['plain_ce_step']:.0f} MiB, KD {step['kd_step']:.0f} MiB, "
        f"KD / plain {step['kd_over_plain']:.2f}   (goal: <= 1.3)"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS / 'scale.json'}")


if __name__ == "__main__":
    main()
