"""Layer mapping between a student and a teacher of different depth."""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from ..modules import get_module, indexed_layers


def uniform_layer_map(num_student: int, num_teacher: int) -> list[tuple[int, int]]:
    """Map student layer i to teacher layer round((i + 1) * L_t / L_s) - 1.

    The last student layer meets the last teacher layer and the others are spread evenly:
    3 student and 12 teacher layers give [(0, 3), (1, 7), (2, 11)].
    """
    if num_student < 1 or num_teacher < 1:
        raise ConfigError(f"uniform layer map needs >= 1 layer on each side, got {num_student} and {num_teacher}")
    # round half up, not Python's banker's rounding: the formula is meant literally
    return [(i, int((i + 1) * num_teacher / num_student + 0.5) - 1) for i in range(num_student)]


def expand_pairs(pair, student: nn.Module, teacher: nn.Module, path: str) -> list[tuple[str, str]]:
    """The (student_name, teacher_name) pairs of one recipe entry, checked against both models.

    An entry without '*' is one explicit pair. With '*', the layers present in each model are
    found and paired by ``map`` ('uniform' by default, or explicit [[s, t], ...]).
    """
    if "*" not in pair.student:
        get_module(student, pair.student, role=f"{path}.student: student ")
        get_module(teacher, pair.teacher, role=f"{path}.teacher: teacher ")
        return [(pair.student, pair.teacher)]
    s_layers = indexed_layers(student, pair.student, role=f"{path}.student: student ")
    t_layers = indexed_layers(teacher, pair.teacher, role=f"{path}.teacher: teacher ")
    s_idx, t_idx = list(s_layers), list(t_layers)
    if pair.map is None or pair.map == "uniform":
        index_pairs = [(s_idx[i], t_idx[j]) for i, j in uniform_layer_map(len(s_idx), len(t_idx))]
    else:
        index_pairs = [tuple(p) for p in pair.map]
        for i, (s, t) in enumerate(index_pairs):
            if s not in s_layers:
                raise ConfigError(f"{path}.map[{i}]: student has no layer {s} (it has {s_idx})")
            if t not in t_layers:
                raise ConfigError(f"{path}.map[{i}]: teacher has no layer {t} (it has {t_idx})")
    return [(s_layers[s], t_layers[t]) for s, t in index_pairs]
