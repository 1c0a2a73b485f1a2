"""Recipe values that only the model can show to be wrong (checked at ``prepare``)."""

from __future__ import annotations

import logging

from ..errors import ConfigError
from .units import UnitGroup

logger = logging.getLogger("slimkit.prune")


def check_round_to(groups: list[UnitGroup], round_to: int | None) -> None:
    """``round_to`` at or above a group's width leaves that group whole (the kept width is
    rounded *up* to a multiple of ``round_to``): an error when that holds for every group,
    since pruning would silently do nothing; a warning naming the groups otherwise."""
    if not round_to or round_to <= 1 or not groups:
        return
    whole = [g for g in groups if g.size <= round_to]
    if len(whole) == len(groups):
        widest = max(groups, key=lambda g: g.size)
        raise ConfigError(
            f"prune.round_to: {round_to} is at least the width of every prunable layer (the widest, "
            f"{widest.root!r}, has {widest.size} channels), so no channel could be removed: kept widths are "
            f"rounded up to a multiple of round_to. Use a round_to below the layer widths "
            f"(e.g. {max(1, widest.size // 8)}) or leave it out."
        )
    if whole:
        names = ", ".join(f"{g.root!r} ({g.size})" for g in whole[:5]) + (" ..." if len(whole) > 5 else "")
        logger.warning(
            "prune.round_to=%d is at least the width of %d of %d layers, which stay whole: %s",
            round_to,
            len(whole),
            len(groups),
            names,
        )


def nm_message(nm: str, widths: set[int]) -> str:
    """Why no weight can take an N:M mask (none has an input width that M divides)."""
    m = int(nm.split(":")[1])
    shown = ", ".join(str(w) for w in sorted(widths)[:8]) + (" ..." if len(widths) > 8 else "")
    return (
        f"prune.nm: {nm!r} needs weights whose input width is a multiple of M={m}, but no linear / conv "
        f"weight here has one (input widths: {shown or 'none'}); use a small M that divides them, such as '2:4'"
    )
