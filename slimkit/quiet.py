"""Keeping dependencies' notices that users cannot act on out of slimkit's output.

Importing transformers (which imports torchao when it is installed) logs torchao's
"``<enum ...>`` is an Enum subclass ... register_constant() on Enum subclasses is deprecated";
importing ``torch.utils.cpp_extension`` (torchao, Inductor) logs "No CUDA runtime is found" on a
machine with a CUDA folder but no GPU; Inductor's x86 int8 lowering warns
"To copy construct from a tensor ..." about its own code. None of them says anything about the
user's model or recipe, so slimkit's own imports and calls of those libraries silence exactly
these, and nothing else.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

_NOISY_LOGGERS = ("torch.utils._pytree", "torch.utils.cpp_extension")


@contextmanager
def quiet_logs(*names: str) -> Iterator[None]:
    """Raise the given loggers to ERROR for the duration (e.g. timm's data-config notice
    "Pretrained mean does not match 1 channels", logged each time a 1-channel model's config
    is written)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextmanager
def quiet_imports() -> Iterator[None]:
    """Import dependencies without their import-time deprecation notices."""
    with quiet_logs(*_NOISY_LOGGERS), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*Enum subclass.*")
        yield


def silence_inductor_int8_notice() -> None:
    """Inductor's x86 int8 lowering builds a tensor with ``torch.tensor(tensor)`` and warns about
    its own call on every compiled INT8 model; the filter matches only that module."""
    warnings.filterwarnings(
        "ignore", message="To copy construct from a tensor", category=UserWarning, module=r"torch\._inductor\..*"
    )
