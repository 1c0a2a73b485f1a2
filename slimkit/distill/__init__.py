"""Knowledge distillation: logit KD, projected feature KD, attention-map KD."""

from .capture import FeatureCapture, hidden_states
from .distiller import Distiller
from .losses import attention_kd, feature_loss, logit_kd, mean_pool, task_cross_entropy
from .mapping import expand_pairs, uniform_layer_map
from .projectors import align, build_projector

__all__ = [
    "Distiller",
    "FeatureCapture",
    "align",
    "attention_kd",
    "build_projector",
    "expand_pairs",
    "feature_loss",
    "hidden_states",
    "logit_kd",
    "mean_pool",
    "task_cross_entropy",
    "uniform_layer_map",
]
