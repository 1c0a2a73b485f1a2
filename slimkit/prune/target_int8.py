"""``prune.target.int8``: time the pruned copies as the INT8 models the recipe ships.

A speed target met in float leaves the user to guess what INT8 adds on top (on MiniLM at batch
32, on the AMD EPYC of the README's earlier tables, a 1.8x float target became 3.0x eager INT8 and
4.5x compiled; on an AMX-INT8 Xeon INT8 alone gave 3.3-4.2x). With ``int8: true`` each copy
the solver checks is made plain again (:meth:`~slimkit.controller.Controller.strip_copy`),
prepared with the recipe's ``quant`` section (QAT calibrated as PTQ: the same INT8 kernels at
convert; without a section, the default static PTQ), calibrated on the calibration batches,
converted, and timed interleaved with the dense FP32 model and the dense model's own INT8 copy.

The solver's per-layer costs stay float (the latency table). Its correction works in units of
the dense INT8 model (pruned INT8 / dense INT8 is 1 with nothing pruned, as its interpolation
assumes), while the figure reported and judged against the target is the pruned INT8 model
against the dense FP32 model: what ``convert`` will return, on the path the quant section's
``compile`` setting picks.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from torch import nn

from ..distributed import alone
from ..recipe import QuantConfig

if TYPE_CHECKING:
    from .pruner import Pruner

logger = logging.getLogger("slimkit")


class Int8Copies:
    """Turns copies of the prepared model into the INT8 models the recipe's quant section makes."""

    def __init__(self, pruner: Pruner, batches: list) -> None:
        section = pruner.controller.recipe_sections.get("quant")
        config = QuantConfig() if section is None else section
        if config.mode == "qat":  # the converted kernels are those of PTQ on the same layers
            config = dataclasses.replace(config, mode="ptq")
        self.recipe = {"quant": config.to_dict()}
        self.controller = pruner.controller
        self.batches = [b for b in batches if b is not None] or [pruner.example_inputs]
        self.example_inputs = pruner.example_inputs
        if section is None:
            logger.info("prune.target.int8: the recipe has no quant section; timing the default static PTQ")

    def convert(self, net: nn.Module) -> nn.Module:
        """``net`` (a ``copy.deepcopy`` of the prepared model, pruned or not) as INT8, in place."""
        from ..api import convert_, prepare
        from ..calibration import calibrate

        self.controller.strip_copy(net)
        with alone():  # rank 0 alone under DDP: keep_fp32 must not wait for the other processes
            prepare(net, self.recipe, example_inputs=self.example_inputs, measure=False)
            if self.recipe["quant"]["mode"] != "dynamic":
                calibrate(net, self.batches, allow_degenerate=True)  # ranges only decide speed here
            return convert_(net).eval()
