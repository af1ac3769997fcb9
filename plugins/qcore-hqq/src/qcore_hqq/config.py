"""The ``hqq`` quantization config: what the user asks for and what config.json records.

Parsed before phase 1 (``validate``) from either the flat dict a user writes (``{"quant_method": "hqq", "nbits": 4,
"group_size": 64, "axis": 1}``) or the nested dict transformers writes into config.json (``{"quant_method": "hqq",
"quant_config": {"weight_quant_params": {...}, ...}, "skip_modules": [...]}``); both give the same
:class:`HqqConfig`, and :meth:`HqqConfig.to_dict` writes the nested form, key for key as transformers'
``HqqConfig.to_dict`` does. Phase 3 (``preprocess_model``) asks it for each module's hqq ``quant_config`` dict.
Imports neither torch nor hqq.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import qcore

__all__ = ["HqqConfig", "SUPPORTED_NBITS", "linear_tag"]

#: Bit widths hqq packs (transformers' HqqConfig documents the same set).
SUPPORTED_NBITS = (1, 2, 3, 4, 8)

#: hqq group sizes must be multiples of 8 (``hqq.core.quantize.BaseQuantizeConfig`` asserts it).
GROUP_SIZE_MULTIPLE = 8

#: The per-module settings a user may write, flat, with their defaults; ``round_zero=None`` means hqq's default.
_SETTING_DEFAULTS: dict[str, Any] = {
    "nbits": 4,
    "group_size": 64,
    "axis": 1,
    "view_as_float": False,
    "optimize": True,
    "round_zero": None,
}
#: Keys of hqq's ``BaseQuantizeConfig`` that only serve its deprecated meta-data quantization; accepted when off.
_DEPRECATED_OFF_KEYS = ("quant_zero", "quant_scale", "offload_meta")


def linear_tag(module_name: str) -> str:
    """The name tag transformers keys HQQ's per-module settings by: ``model.layers.3.self_attn.q_proj`` ->
    ``self_attn.q_proj`` (``transformers.integrations.hqq.name_to_linear_tag``)."""
    return ".".join(part for part in module_name.split(".") if part not in ("model", "layers") and not part.isnumeric())


@dataclasses.dataclass
class HqqConfig(qcore.QuantConfig):
    """Half-Quadratic Quantization of every ``nn.Linear`` with the hqq library (``HQQLinear``).

    Field names and defaults are transformers' ``HqqConfig`` ones, except ``modules_to_not_convert``, which dicts
    spell ``skip_modules`` (the name :meth:`skip_modules` has on every qcore config), and two qcore additions that
    transformers' nested form already carries per module: ``optimize`` and ``round_zero``.
    """

    quant_method: ClassVar[str] = "hqq"
    skip_field: ClassVar[str | None] = "modules_to_not_convert"

    #: Bits per weight: 1, 2, 3, 4 or 8.
    nbits: int = 4
    #: Weights per (scale, zero) pair; a multiple of 8. ``None``: one group per row (axis 1) or column (axis 0).
    group_size: int | None = 64
    #: Store the packed weights viewed as the compute dtype (for FSDP-style sharding); same bits, same numerics.
    view_as_float: bool = False
    #: 1: groups run along the input features (what fast kernels expect); 0: along hqq's flattened axis 0.
    #: ``None`` becomes 1, as in transformers.
    axis: int | None = None
    #: Per-module settings keyed by linear tag (``"self_attn.q_proj"``), each a dict of the flat fields above. Tags
    #: not listed stay in full precision, as in transformers.
    dynamic_config: dict[str, dict] | None = None
    #: Linear tags or module names kept in full precision (``skip_modules`` in dicts).
    modules_to_not_convert: list[str] = dataclasses.field(default_factory=lambda: ["lm_head"])
    #: Run hqq's half-quadratic solver for the zero points; ``False`` is plain min/max rounding.
    optimize: bool = True
    #: Round zero points to integers; ``None`` is hqq's default (``True`` for 4-bit only).
    round_zero: bool | None = None
    #: What a layer ``group_size`` does not fit (it does not divide the layer, or leaves a group count the packing
    #: cannot take) gets. ``False``: the largest multiple of 8 below ``group_size`` that fits, or, when none does,
    #: full precision; the load reports each such layer (``model.qcore_fallbacks``) and ``qcore estimate`` lists
    #: them. ``True``: a ``ConfigError`` naming the layer. A qcore addition, used while quantizing and not saved: the
    #: stored tensors record each layer's group size.
    strict_group_size: bool = dataclasses.field(default=False, compare=False)

    def __post_init__(self) -> None:
        if self.axis is None:
            self.axis = 1
        if self.round_zero is None and isinstance(self.nbits, int):
            self.round_zero = self.nbits == 4
        if isinstance(self.dynamic_config, Mapping):
            self.dynamic_config = {
                tag: _settings(entry, f"dynamic_config[{tag!r}]") for tag, entry in self.dynamic_config.items()
            }
        super().__post_init__()

    # -- parsing and writing -------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | qcore.QuantConfig) -> qcore.QuantConfig:
        """Parse the flat form a user writes or the nested form transformers writes into config.json."""
        if isinstance(data, qcore.QuantConfig) or not isinstance(data, Mapping):
            return super().from_dict(data)
        flat = dict(data)
        if "quant_config" in flat:
            flat = _flatten_nested(flat)
        if "skip_modules" in flat:
            skip = flat.pop("skip_modules")
            if not isinstance(skip, (list, tuple)) or not all(isinstance(name, str) for name in skip):
                raise qcore.ConfigError(
                    f"hqq config: field 'skip_modules' must be a list of module names, got {skip!r}"
                )
            flat["modules_to_not_convert"] = list(skip)
        return super().from_dict(flat)

    def to_dict(self) -> dict[str, Any]:
        """The nested form, exactly as transformers' ``HqqConfig.to_dict`` writes it."""
        if self.dynamic_config is not None:
            quant_config = {tag: _base_quant_config(s) for tag, s in self.dynamic_config.items()}
        else:
            quant_config = _base_quant_config(self._settings())
        return {
            "quant_config": quant_config,
            "quant_method": self.quant_method,
            "skip_modules": list(self.modules_to_not_convert),
        }

    # -- what the core asks -------------------------------------------------------------------------------

    def check(self) -> None:
        if self.dynamic_config is not None:
            if not isinstance(self.dynamic_config, Mapping) or not self.dynamic_config:
                raise qcore.ConfigError(
                    "hqq config: field 'dynamic_config' must be a non-empty dict of linear tag -> settings, or null"
                )
            for tag, settings in self.dynamic_config.items():
                _check_settings(settings, f"dynamic_config[{tag!r}].")
            # The entries give every quantized module its settings (config.json stores only them, as transformers
            # does), so a flat setting beside them would be silently ignored, and lost on a save.
            defaults = {**_SETTING_DEFAULTS, "round_zero": self.nbits == 4}  # round_zero follows nbits
            ignored = [name for name, value in self._settings().items() if value != defaults[name]]
            if ignored:
                raise qcore.ConfigError(
                    f"hqq config: {', '.join(repr(n) for n in ignored)} set beside 'dynamic_config', whose entries "
                    f"give each linear tag its settings; move the setting into the entries"
                )
        else:
            _check_settings(self._settings(), "")
        if not isinstance(self.strict_group_size, bool):
            raise qcore.ConfigError(
                f"hqq config: field 'strict_group_size' must be true or false, got {self.strict_group_size!r}"
            )
        if not isinstance(self.modules_to_not_convert, (list, tuple)) or not all(
            isinstance(name, str) for name in self.modules_to_not_convert
        ):
            raise qcore.ConfigError(
                f"hqq config: field 'skip_modules' must be a list of module names, got {self.modules_to_not_convert!r}"
            )

    def quant_config_for(
        self, module_name: str, out_features: int | None = None, in_features: int | None = None
    ) -> dict[str, Any] | None:
        """The ``quant_config`` dict ``HQQLinear`` takes for this module, or ``None`` to keep it in full precision
        (a module whose tag ``dynamic_config`` does not list). Given the module's shape, with the group-size
        fallback applied (see ``strict_group_size``): the group size that fits, or ``None`` for full precision."""
        settings = self._settings_for(module_name)
        if settings is None:
            return None
        if out_features is not None and in_features is not None:
            settings = self._fitted(settings, module_name, out_features, in_features)
        return _base_quant_config(settings) if settings is not None else None

    def shape_fallback(self, module_name: str, out_features: int, in_features: int) -> str | None:
        settings = self._settings_for(module_name)
        if settings is None or fit_problem(settings, out_features, in_features) is None:
            return None
        fitted = self._fitted(settings, module_name, out_features, in_features)
        why = fit_problem(settings, out_features, in_features)
        if fitted is None:
            return f"kept in full precision ({why}, and no smaller group size fits)"
        return f"group_size {fitted['group_size']} instead of {settings['group_size']} ({why})"

    def quantized_nbytes(self, out_features: int, in_features: int, dtype_nbytes: int) -> int:
        """Bytes of ``W_q`` (packed as hqq packs it) plus one scale and one zero per group in the compute dtype.

        With ``dynamic_config`` the module's tag is unknown here, so this is the largest of its settings (an upper
        bound for the memory guard).
        """
        settings = list(self.dynamic_config.values()) if self.dynamic_config is not None else [self._settings()]
        sizes = []
        for entry in settings:
            fitted = fitted_settings(entry, out_features, in_features)
            sizes.append(
                _module_nbytes(fitted, out_features, in_features, dtype_nbytes)
                if fitted is not None
                else out_features * in_features * dtype_nbytes
            )
        return max(sizes)

    def short_name(self) -> str:
        if self.dynamic_config is not None:
            return (
                "hqq per-module ("
                + ", ".join(f"{tag} {s['nbits']}-bit" for tag, s in self.dynamic_config.items())
                + ")"
            )
        return f"hqq {self.nbits}-bit " + (f"g{self.group_size}" if self.group_size is not None else "per-row")

    def _settings(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _SETTING_DEFAULTS}

    def _settings_for(self, module_name: str) -> dict[str, Any] | None:
        if self.dynamic_config is None:
            return self._settings()
        return self.dynamic_config.get(linear_tag(module_name))

    def _fitted(
        self, settings: dict[str, Any], module_name: str, out_features: int, in_features: int
    ) -> dict[str, Any] | None:
        why = fit_problem(settings, out_features, in_features)
        if why is not None and self.strict_group_size:
            raise qcore.ConfigError(
                f"hqq config: field {why} of module {module_name!r} ({out_features}x{in_features}), and "
                f"strict_group_size is set; pick a group size that divides it, skip the module (skip_modules), or "
                f"unset strict_group_size to take the largest group size that fits"
            )
        return fitted_settings(settings, out_features, in_features)


# -- the nested form ---------------------------------------------------------------------------------------------


def _flatten_nested(data: dict[str, Any]) -> dict[str, Any]:
    """``{"quant_config": ..., "skip_modules": ...}`` -> the flat fields."""
    unknown = set(data) - {"quant_method", "quant_config", "skip_modules"}
    if unknown:
        raise qcore.ConfigError(
            f"hqq config: unknown field(s) {sorted(unknown)} beside 'quant_config'; the nested form has only "
            f"quant_method, quant_config and skip_modules"
        )
    quant_config = data["quant_config"]
    if not isinstance(quant_config, Mapping):
        raise qcore.ConfigError(f"hqq config: field 'quant_config' must be a dict, got {quant_config!r}")
    flat: dict[str, Any] = {"quant_method": data.get("quant_method", "hqq")}
    if "skip_modules" in data:
        flat["skip_modules"] = data["skip_modules"]
    if "weight_quant_params" in quant_config:
        flat.update(_settings(quant_config, "quant_config"))
    else:
        flat["dynamic_config"] = {
            tag: _settings(entry, f"quant_config[{tag!r}]") for tag, entry in quant_config.items()
        }
    return flat


def _settings(entry: Any, where: str) -> dict[str, Any]:
    """One module's settings, from hqq's nested ``quant_config`` dict or the flat fields, with defaults filled in."""
    if not isinstance(entry, Mapping):
        raise qcore.ConfigError(f"hqq config: {where} must be a dict of settings, got {entry!r}")
    if "weight_quant_params" in entry:
        entry = _unwrap_base_quant_config(entry, where)
    unknown = set(entry) - set(_SETTING_DEFAULTS) - set(_DEPRECATED_OFF_KEYS)
    if unknown:
        raise qcore.ConfigError(
            f"hqq config: {where} has unknown setting(s) {sorted(unknown)}; "
            f"valid settings are {sorted(_SETTING_DEFAULTS)}"
        )
    for key in _DEPRECATED_OFF_KEYS:
        if entry.get(key):
            raise qcore.ConfigError(
                f"hqq config: {where}.{key}=True is not supported: hqq deprecated quantized/offloaded meta-data and "
                f"cannot serialize it; remove {key!r}"
            )
    settings = {key: entry.get(key, default) for key, default in _SETTING_DEFAULTS.items()}
    if settings["axis"] is None:
        settings["axis"] = 1
    if settings["round_zero"] is None and isinstance(settings["nbits"], int):
        settings["round_zero"] = settings["nbits"] == 4
    return settings


def _unwrap_base_quant_config(entry: Mapping[str, Any], where: str) -> dict[str, Any]:
    """hqq's ``BaseQuantizeConfig`` dict -> flat settings, refusing what hqq cannot serialize."""
    for key in ("scale_quant_params", "zero_quant_params", "offload_meta"):
        if entry.get(key):
            raise qcore.ConfigError(
                f"hqq config: {where}.{key} is set; hqq deprecated quantized/offloaded scales and zeros and cannot "
                f"serialize them; set it to null/false"
            )
    params = entry["weight_quant_params"]
    if not isinstance(params, Mapping):
        raise qcore.ConfigError(f"hqq config: {where}.weight_quant_params must be a dict, got {params!r}")
    if params.get("channel_wise", True) is not True:
        raise qcore.ConfigError(
            f"hqq config: {where}.weight_quant_params.channel_wise must be true; per-tensor hqq is not supported"
        )
    return {key: value for key, value in params.items() if key != "channel_wise"}


def _base_quant_config(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The dict ``hqq.core.quantize.BaseQuantizeConfig`` returns (same keys, same order) for these settings."""
    return {
        "weight_quant_params": {
            "nbits": settings["nbits"],
            "channel_wise": True,
            "group_size": settings["group_size"],
            "optimize": settings["optimize"],
            "round_zero": settings["round_zero"],
            "axis": settings["axis"],
            "view_as_float": settings["view_as_float"],
        },
        "scale_quant_params": None,
        "zero_quant_params": None,
        "offload_meta": False,
    }


def _check_settings(settings: Mapping[str, Any], prefix: str) -> None:
    def fail(field: str, expected: str) -> qcore.ConfigError:
        return qcore.ConfigError(f"hqq config: field '{prefix}{field}' must be {expected}, got {settings[field]!r}")

    nbits = settings["nbits"]
    if isinstance(nbits, bool) or nbits not in SUPPORTED_NBITS:
        raise fail("nbits", f"one of {list(SUPPORTED_NBITS)}")
    group_size = settings["group_size"]
    if group_size is not None and (
        isinstance(group_size, bool)
        or not isinstance(group_size, int)
        or group_size <= 0
        or group_size % GROUP_SIZE_MULTIPLE
    ):
        raise fail("group_size", f"a positive multiple of {GROUP_SIZE_MULTIPLE} (hqq packs groups of 8), or null")
    if settings["axis"] not in (0, 1) or isinstance(settings["axis"], bool):
        raise fail("axis", "0 or 1")
    for flag in ("view_as_float", "optimize", "round_zero"):
        if not isinstance(settings[flag], bool):
            raise fail(flag, "true or false")


# -- sizes ---------------------------------------------------------------------------------------------------------

#: Quantized values per packed element, and the packed element's bytes (``hqq.core.bitpack.BitPack``).
_PACKING = {8: (1, 1), 4: (2, 1), 2: (4, 1), 1: (8, 1), 3: (10, 4)}


def resolved_group_size(settings: Mapping[str, Any], out_features: int, in_features: int) -> int:
    """The group size hqq uses: ``None`` means a whole row (axis 1) or column (axis 0), as ``HQQLinear`` sets it."""
    if settings["group_size"] is not None:
        return settings["group_size"]
    return in_features if settings["axis"] == 1 else out_features


def fit_problem(params: Mapping[str, Any], out_features: int, in_features: int) -> str | None:
    """Why hqq cannot tile and pack a weight of this shape with ``params`` (settings, or the ``weight_quant_params``
    of :meth:`HqqConfig.quant_config_for`), or ``None`` when it can."""
    group_size = resolved_group_size(params, out_features, in_features)
    if params["axis"] == 1 and in_features % group_size:
        return f"'group_size'={group_size} does not divide in_features={in_features}"
    if (out_features * in_features) % group_size:
        return f"'group_size'={group_size} does not divide the {out_features * in_features} weights"
    packed_rows = out_features * in_features // group_size if params["axis"] == 1 else group_size
    per_element, _ = _PACKING[params["nbits"]]
    if params["nbits"] != 3 and packed_rows % per_element:
        return (
            f"'group_size'={group_size} leaves {packed_rows} groups, and {params['nbits']}-bit packing needs a "
            f"multiple of {per_element}"
        )
    return None


def fitted_settings(settings: Mapping[str, Any], out_features: int, in_features: int) -> dict[str, Any] | None:
    """``settings`` with the group-size fallback for this shape: unchanged when they fit, else with the largest
    multiple of 8 below the group size that fits; ``None`` (keep the layer in full precision) when none does."""
    if fit_problem(settings, out_features, in_features) is None:
        return dict(settings)
    start = resolved_group_size(settings, out_features, in_features)
    for group_size in range(start - start % GROUP_SIZE_MULTIPLE, 0, -GROUP_SIZE_MULTIPLE):
        candidate = {**settings, "group_size": group_size}
        if group_size != start and fit_problem(candidate, out_features, in_features) is None:
            return candidate
    return None


def check_module_shape(params: Mapping[str, Any], module_name: str, out_features: int, in_features: int) -> None:
    """Raise :class:`qcore.ConfigError` when hqq cannot tile and pack this module's weight with ``params`` (the
    ``weight_quant_params`` of :meth:`HqqConfig.quant_config_for`)."""
    why = fit_problem(params, out_features, in_features)
    if why is not None:
        raise qcore.ConfigError(
            f"hqq config: field {why} of module {module_name!r} ({out_features}x{in_features}); pick "
            f"a group size that fits it, or skip the module (skip_modules)"
        )


def _module_nbytes(settings: Mapping[str, Any], out_features: int, in_features: int, dtype_nbytes: int) -> int:
    group_size = resolved_group_size(settings, out_features, in_features)
    groups = out_features * in_features // group_size
    # hqq lays the weight out as (groups, group_size) for axis 1 and (group_size, groups) for axis 0, and packs
    # along dimension 0; 3-bit pads that dimension to a multiple of 10.
    packed_rows, other = (groups, group_size) if settings["axis"] == 1 else (group_size, groups)
    per_element, element_bytes = _PACKING[settings["nbits"]]
    w_q = math.ceil(packed_rows / per_element) * other * element_bytes
    return w_q + 2 * groups * dtype_nbytes
