"""Paths and process helpers shared by the tests (the tiny models live in tests/families.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)


def accelerate_launch(
    script: Path, args: list[str], processes: int, cwd: Path | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``accelerate launch`` for real: ``--multi_gpu`` with 2+ processes, which on a machine
    without GPUs starts that many CPU processes over gloo (``--cpu`` would start only one)."""
    multi = ["--multi_gpu", "--num_processes", str(processes)] if processes > 1 else ["--num_processes", "1"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *multi, "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", str(script), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def close_process_group() -> None:
    """Ends a launched script: waits for every process, then destroys the process group. Left to
    interpreter exit, gloo's threads are torn down in no set order, and a process that finished
    its work can still abort ("terminate called without an active exception", SIGABRT)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
