"""Config dataclasses that build themselves from plain dicts and validate with field paths.

Every recipe section is a dataclass derived from :class:`Config`. ``from_dict`` checks keys
(an unknown key names the closest valid one), converts nested sections and lists, coerces
numbers, and then runs ``validate`` with the dotted path of the section, so that an error
reads ``distill.features[0].weight: must be >= 0, got -1``.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import types
import typing
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

from .errors import ConfigError, did_you_mean
from .recipe_io import short_repr

_PATH: contextvars.ContextVar[str | None] = contextvars.ContextVar("slimkit_config_path", default=None)


def help_field(default: Any = dataclasses.MISSING, help: str = "", **kwargs) -> Any:
    """A dataclass field with a one-line help text (shown by ``Config.describe``)."""
    metadata = {"help": help}
    if default is not dataclasses.MISSING and isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


@dataclasses.dataclass
class Config:
    """Base of every config section."""

    section: ClassVar[str] = ""
    # What the model is once this section's phase has run ("pruned"): names a run's stages.
    stage_name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate(_PATH.get() or self.section)

    # -- schedule ---------------------------------------------------------------------
    def phase_start(self) -> int | None:
        """The optimizer step at which this section starts changing the model in training (a
        phase a loop may want to score the model before), or None if it starts no phase."""
        return None

    def fit_problems(self, max_steps: int, source: str) -> list[str]:
        """Why this section's schedule cannot finish in ``max_steps`` optimizer steps (``source``
        names where that number came from); empty when it fits. See ``Recipe.check_fits``."""
        return []

    # -- validation -------------------------------------------------------------------
    def validate(self, path: str) -> None:  # overridden by sections
        """Raise ConfigError naming ``path.field`` when a value is out of range."""

    @staticmethod
    def fail(path: str, field: str, message: str) -> typing.NoReturn:
        where = f"{path}.{field}" if path else field
        raise ConfigError(f"{where}: {message}")

    # -- (de)serialisation --------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, path: str | None = None) -> Config:
        path = cls.section if path is None else path
        if data is None:
            data = {}
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        for key in data:
            if key not in fields:
                shown = key if isinstance(key, str) and len(key) <= 80 else short_repr(key)
                where = f"{path}.{shown}" if path else str(shown)
                raise ConfigError(
                    f"{where}: unknown key.{did_you_mean(str(shown), fields)} Valid keys: {', '.join(sorted(fields))}."
                )
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in data.items():
            sub = f"{path}.{key}" if path else key
            kwargs[key] = _convert(value, hints[key], sub)
        token = _PATH.set(path)
        try:
            return cls(**kwargs)
        finally:
            _PATH.reset(token)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _to_plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def describe(cls) -> dict[str, str]:
        """Field name -> help text, for docs and ``--help``."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.init}


def _to_plain(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Convert a plain JSON/YAML value to ``tp`` or raise ConfigError naming ``path``."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors, literal_errors = [], []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, path)
            except ConfigError as exc:
                errors.append(str(exc))
                if get_origin(option) is Literal:
                    literal_errors.append(str(exc))
        if len(errors) == 1:
            raise ConfigError(errors[-1])
        if isinstance(value, str) and len(literal_errors) == 1:  # a misspelt keyword: say which ones exist
            raise ConfigError(literal_errors[0])
        raise ConfigError(f"{path}: {short_repr(value)} fits none of the allowed forms")
    if origin is Literal:
        allowed = get_args(tp)
        if isinstance(value, (list, dict)) or value not in allowed:
            hint = did_you_mean(str(value), [str(a) for a in allowed]) if isinstance(value, str) else ""
            raise ConfigError(f"{path}: {short_repr(value)} is not one of {', '.join(map(repr, allowed))}.{hint}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, Config):
        return tp.from_dict(value, path)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {short_repr(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {short_repr(value)}")
        # inf / nan (YAML .inf / .nan, JSON Infinity / NaN) would train on a NaN loss.
        if not math.isfinite(value):
            raise ConfigError(f"{path}: must be a finite number, got {value}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not (
            isinstance(value, int) or (isinstance(value, float) and math.isfinite(value) and value.is_integer())
        ):
            raise ConfigError(f"{path}: expected a whole number, got {short_repr(value)}")
        return int(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {short_repr(value)}")
        if len(value) > 1000:
            raise ConfigError(f"{path}: {short_repr(value)} is too long for a recipe value")
        return value
    raise ConfigError(f"{path}: cannot read a value of type {_type_name(tp)}")  # pragma: no cover
