"""slimkit.steady_malloc: large activations stop being page-faulted in on every forward, and a
timed prune.target says when its timings include those page faults (slimkit/malloc.py).

Each case runs in a fresh process (tests/malloc_target.py): the allocator setting is
process-wide and cannot be undone. Page faults are counted, not timed, so the assertions hold
on a busy machine too."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from slimkit.malloc import _libc
from tests.models import ROOT

pytestmark = pytest.mark.skipif(_libc() is None, reason="mallopt is glibc's (Linux); elsewhere it does nothing")


def run(mode: str, cache) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD"):
        env.pop(name, None)  # the default allocator, whatever the caller's shell set
    cmd = [sys.executable, str(ROOT / "tests" / "malloc_target.py"), mode, str(cache)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_default_allocator_page_faults_are_counted_and_reported_by_a_timed_target(tmp_path):
    got = run("default", tmp_path)
    assert got["applied"] is False and got["steady_malloc"] is False
    # glibc maps a 192 MB block anew on every allocation: every 4 KB page faults in again
    assert got["big_alloc_faults"] > 40_000, got
    # the MLP's 128 MB hidden activation at the timed batch, 64 MB in and out of ReLU
    assert got["page_faults"] > 25_600 and got["warned"], got
    assert "page faults per dense forward (see slimkit.steady_malloc)" in got["card"], got["card"]


def test_steady_malloc_keeps_large_blocks_and_the_target_times_without_page_faults(tmp_path):
    got = run("steady", tmp_path)
    assert got["applied"] is True and got["steady_malloc"] is True
    assert got["big_alloc_faults"] < 100, got
    assert got["page_faults"] < 1_000 and not got["warned"], got
    assert "page faults" not in got["card"], got["card"]
