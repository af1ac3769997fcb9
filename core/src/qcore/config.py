"""Quantization configs: the :class:`QuantConfig` base every backend's config derives from.

A config is the dict transformers writes as ``quantization_config`` in config.json, parsed into a dataclass:
``QuantConfig.from_dict(d)`` dispatches on ``d["quant_method"]`` to the class a plugin registered for it, and
``to_dict()`` writes the dict back so transformers (and qcore) read it again. It is consumed by every one of the
six phases; this module itself imports neither torch nor any backend library.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

from qcore.errors import ConfigError

__all__ = ["QuantConfig"]


@dataclasses.dataclass
class QuantConfig:
    """Base class of every backend's config.

    A subclass is a dataclass that sets ``quant_method`` and declares its fields with the names and defaults
    transformers uses for that method. It may override :meth:`from_dict` (to accept other spellings of the same
    dict), :meth:`to_dict`, :meth:`check` (range checks), :meth:`skip_modules` and :meth:`quantized_nbytes`.
    """

    #: The ``quant_method`` string this config serves, as transformers spells it.
    quant_method: ClassVar[str] = ""
    #: Fields a user may override when loading a pre-quantized checkpoint (e.g. a compute dtype). Every other
    #: field comes from the checkpoint, because it describes how the stored tensors were made.
    loading_attributes: ClassVar[frozenset[str]] = frozenset()
    #: Keys transformers writes that carry no meaning of their own (derived or legacy); accepted and dropped.
    ignored_keys: ClassVar[frozenset[str]] = frozenset()
    #: The field holding the user's skip list (e.g. ``"llm_int8_skip_modules"``), if the method has one. It lets
    #: the default :meth:`skip_modules` read it, and lets a recipe that uses this one config save in the plain
    #: format transformers reads, with the recipe's full-precision modules written into it.
    skip_field: ClassVar[str | None] = None

    # -- parsing ---------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | QuantConfig) -> QuantConfig:
        """Parse a ``quantization_config`` dict. On the base class, dispatch on ``quant_method``.

        :raises ConfigError: unknown method (naming the package that serves it), unknown field, wrong type or an
            out-of-range value.
        """
        if isinstance(data, QuantConfig):
            return data
        if not isinstance(data, Mapping):
            raise ConfigError(f"a quantization config must be a dict or a QuantConfig, not {type(data).__name__}")
        for key, value in data.items():
            where = _non_finite(value, str(key))
            if where is not None:
                method = data.get("quant_method", cls.quant_method) or "quantization"
                raise ConfigError(f"{method} config: field {where!r} must be a finite number")
        if cls is QuantConfig:
            from qcore.plugins import config_class_for

            method = data.get("quant_method")
            if not isinstance(method, str):
                raise ConfigError(
                    f"quantization config has no 'quant_method' string (got {method!r}); add e.g. "
                    f'"quant_method": "bitsandbytes"'
                )
            return config_class_for(method).from_dict(data)
        if data.get("quant_method", cls.quant_method) != cls.quant_method:
            raise ConfigError(f"{cls.__name__} serves quant_method {cls.quant_method!r}, got {data['quant_method']!r}")
        return cls(**cls._typed_fields(data))

    @classmethod
    def _typed_fields(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        """The dataclass fields present in ``data``, type-checked against the annotations."""
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names - {"quant_method"} - cls.ignored_keys
        if unknown:
            raise ConfigError(
                f"{cls.quant_method} config: unknown field(s) {sorted(unknown)}; valid fields are {sorted(names)}"
            )
        values = {}
        for name in names & set(data):
            value = data[name]
            if not _matches(value, hints[name]):
                raise ConfigError(
                    f"{cls.quant_method} config: field {name!r} must be {_describe(hints[name])}, got {value!r}"
                )
            values[name] = value
        return values

    def __post_init__(self) -> None:
        # Checked on construction, so a config built in code is held to the same ranges as one parsed from a dict.
        for field in dataclasses.fields(self):
            where = _non_finite(getattr(self, field.name), field.name)
            if where is not None:
                # JSON's NaN and Infinity parse in Python; no quantization setting means anything with them.
                raise ConfigError(f"{self.quant_method} config: field {where!r} must be a finite number")
        self.check()

    def check(self) -> None:
        """Raise :class:`ConfigError` naming the field when a value is out of range. Override to add checks.

        Called on construction; a subclass that defines ``__post_init__`` must call ``super().__post_init__()``.
        """

    # -- writing ---------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The dict to write as ``quantization_config`` in config.json (the form transformers writes)."""
        return {"quant_method": self.quant_method, **dataclasses.asdict(self)}

    def with_loading_attributes(self, user: QuantConfig | None) -> QuantConfig:
        """This (checkpoint) config with the user's :attr:`loading_attributes` laid over it.

        Everything else comes from the checkpoint: it describes how the stored tensors were made.
        """
        if user is None:
            return self
        if user.quant_method != self.quant_method:
            raise ConfigError(
                f"the checkpoint is quantized with {self.quant_method!r} but the given config is "
                f"{user.quant_method!r}; load it without a quantization_config, or from a full-precision checkpoint"
            )
        # Only what the user set: a field left at its default must not reset the checkpoint's value.
        defaults = {f.name: f.default for f in dataclasses.fields(user)}
        overrides = {
            name: getattr(user, name) for name in self.loading_attributes if getattr(user, name) != defaults.get(name)
        }
        return dataclasses.replace(self, **overrides)

    # -- what the core asks of a config ----------------------------------------------------------------

    @property
    def needs_calibration(self) -> bool:
        """Whether quantizing with this config needs calibration data (GPTQ, AWQ): the loader then streams the model
        one decoder block at a time and calls ``calibrate_block`` instead of ``load_weight`` for its modules.

        Only full-precision checkpoints are calibrated; loading a pre-quantized one never is. A subclass sets it as
        a class attribute (``needs_calibration: ClassVar[bool] = True``) or overrides the property when a field
        decides it.
        """
        return False

    def skip_modules(self) -> list[str] | None:
        """Module names (or patterns, matched as transformers matches them) the user keeps in full precision.

        ``None`` means the defaults: the output embeddings, tied weights and the model's last module, as
        transformers keeps them. A list replaces those defaults.
        """
        return getattr(self, self.skip_field) if self.skip_field else None

    def shape_fallback(self, module_name: str, out_features: int, in_features: int) -> str | None:
        """What this config does with a ``Linear(in_features, out_features)`` its settings do not fit.

        ``None`` when they fit. Otherwise a few words on the documented fallback the backend takes instead (e.g.
        ``"group_size 32: 64 does not divide in_features=1376"`` or ``"kept in full precision: ..."``), which the load
        reports and ``qcore estimate`` lists; :meth:`quantized_nbytes` counts the fallback's size. A config the user
        made strict raises :class:`ConfigError` naming the module instead. Must not import torch.
        """
        return None

    def quantized_nbytes(self, out_features: int, in_features: int, dtype_nbytes: int) -> int:
        """Bytes a quantized ``Linear(in_features, out_features)`` weight takes, quantization metadata included.

        Used by ``qcore estimate``, ``qcore recommend`` and the memory guard; must not import torch.
        The default assumes no compression.
        """
        return out_features * in_features * dtype_nbytes

    def short_name(self) -> str:
        """A few words for tables, e.g. ``"bitsandbytes nf4"``."""
        return self.quant_method


def _non_finite(value: Any, where: str) -> str | None:
    """The path (``field``, ``field['key'][0]``) of the first NaN or infinite number in a config value, if any."""
    if isinstance(value, float):
        return None if math.isfinite(value) else where
    if isinstance(value, Mapping):
        items: Any = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _non_finite(item, f"{where}[{key!r}]")
        if found is not None:
            return found
    return None


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return isinstance(value, (list, tuple)) and all(_matches(v, item) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, Mapping)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


FLOAT_DTYPE_NAMES = ("float16", "bfloat16", "float32")


def dtype_name(value: Any, *, field: str, method: str, allowed: tuple[str, ...] = FLOAT_DTYPE_NAMES) -> str | None:
    """Normalise a dtype given as ``torch.bfloat16``, ``"torch.bfloat16"`` or ``"bfloat16"`` to ``"bfloat16"``.

    Config classes store dtypes by name so that they stay importable without torch and serialise to JSON as
    transformers writes them.
    """
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if name not in allowed:
        raise ConfigError(f"{method} config: field {field!r} must be one of {list(allowed)}, got {value!r}")
    return name
