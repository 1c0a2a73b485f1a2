"""OpenMP's wait policy: spinning threads cost training and inference time on a busy machine.

PyTorch's CPU kernels run on OpenMP threads, which by default spin for a while after every
parallel region waiting for the next one. On a machine where other processes compete for the
cores, those spinning threads take time from the threads doing work: on a shared 2-core VM a
Trainer-route training step took 7.6 s instead of 1.4 s without ``OMP_WAIT_POLICY=PASSIVE``.
On a quiet machine spinning saves the wake-up latency instead: measured on the same 2-core VM
while it was quiet (``benchmarks/omp_wait_policy.py --rounds 3``), ``PASSIVE`` made the training
step 1.13x, resnet18 FP32 inference 1.55x and its INT8 inference 2.17x *slower*. So slimkit
never sets it by default, and warns only when the machine is oversubscribed when a model is
prepared (1-minute load average above 1.5x the number of cores: a process alone on the machine
puts up to one runnable thread per core there itself, so "above the core count" fired on a quiet
machine as soon as the caller's own model ran). :data:`DEFAULT` holds the decision:

* ``"set"``: ``import slimkit`` sets ``OMP_WAIT_POLICY=PASSIVE`` when it is unset and torch is
  not imported yet (OpenMP reads the variable once, when torch loads its runtime); later, the
  warning below is given instead;
* ``"warn"``: ``slimkit.prepare`` warns once per process, with the fix, when it is unset and
  the machine is busy (:func:`busy`);
* ``"off"``: nothing.

``SLIMKIT_OMP_WAIT_POLICY=set|warn|off`` overrides the default; an ``OMP_WAIT_POLICY`` that the
user set is never changed.
"""

from __future__ import annotations

import os
import sys
import warnings

DEFAULT = "warn"
_warned = False


def policy() -> str:
    chosen = os.environ.get("SLIMKIT_OMP_WAIT_POLICY", DEFAULT).strip().lower()
    return chosen if chosen in ("set", "warn", "off") else DEFAULT


def apply_default() -> bool:
    """At ``import slimkit``, before torch is imported: set ``OMP_WAIT_POLICY=PASSIVE`` under the
    ``"set"`` policy. Returns whether it was set."""
    if policy() != "set" or "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


BUSY_LOAD_PER_CORE = 1.5  # this process's own threads fill up to 1.0 per core; the rest is others'


def busy() -> bool:
    """Others compete for the cores: the 1-minute load average (where the OS reports it) is above
    what this process's own threads put there (at most one per core) by half the cores."""
    try:
        return os.getloadavg()[0] > BUSY_LOAD_PER_CORE * (os.cpu_count() or 1)
    except (AttributeError, OSError):  # Windows has no load average
        return False


def warn_once() -> None:
    """At ``slimkit.prepare``: the warning of the ``"warn"`` policy (and of ``"set"`` when torch
    was imported before slimkit, too late to set it), once per process."""
    global _warned
    if _warned or policy() == "off" or "OMP_WAIT_POLICY" in os.environ:
        return
    import torch

    if torch.get_num_threads() < 2 or not busy():
        return
    _warned = True
    warnings.warn(
        f"slimkit: this machine is busy (load average above {BUSY_LOAD_PER_CORE:g}x its core count) and OpenMP "
        "threads spin while waiting "
        "(OMP_WAIT_POLICY is unset), which can make each training step and inference several times slower while "
        "other processes share the cores. Start Python with "
        "OMP_WAIT_POLICY=PASSIVE (export OMP_WAIT_POLICY=PASSIVE), or set SLIMKIT_OMP_WAIT_POLICY=off to "
        "silence this.",
        UserWarning,
        stacklevel=3,
    )


apply_default()  # at ``import slimkit``, which imports this module before torch
