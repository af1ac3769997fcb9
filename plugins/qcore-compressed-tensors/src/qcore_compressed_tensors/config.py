"""``CompressedTensorsConfig``: the ``quantization_config`` of ``quant_method: compressed-tensors``, read by every
one of the six phases.

The dict is the one compressed-tensors writes (``config_groups`` of schemes with ``targets``, ``weights``,
``input_activations``, ``format``; ``ignore``; ``quantization_status``). Parsing validates it once and completes
it the way compressed-tensors' own ``QuantizationConfig`` and ``ModelCompressor`` do: a group given as a preset
name (``{"W4A16": ["Linear"]}``) becomes its scheme, missing argument fields get compressed-tensors' defaults, a
group without ``format`` gets the one compressed-tensors would choose, and ``quantization_status`` becomes
``compressed``, because that is what qcore holds and saves. A dict copied from a compressed checkpoint's
config.json is already complete, so it is written back unchanged. Imports neither torch nor compressed-tensors (the
presets and defaults below are checked against compressed-tensors' own in the tests).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import math
import re
from typing import Any, ClassVar

from qcore import ConfigError, QuantConfig

__all__ = ["CompressedTensorsConfig", "PRESET_SCHEMES", "FORMATS"]

#: compressed-tensors' preset schemes qcore serves (``compressed_tensors.quantization.quant_scheme``), as
#: ``QuantizationScheme.model_dump`` writes their arguments.
_W = {"type": "int", "symmetric": True, "dynamic": False}
_F8 = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False}
_TOKEN = {"symmetric": True, "group_size": None, "strategy": "token", "dynamic": True}
PRESET_SCHEMES: dict[str, dict[str, Any]] = {
    "W4A16": {"weights": {"num_bits": 4, **_W, "group_size": 128, "strategy": "group"}},
    "W4A16_ASYM": {"weights": {"num_bits": 4, **_W, "symmetric": False, "group_size": 128, "strategy": "group"}},
    "W8A16": {"weights": {"num_bits": 8, **_W, "group_size": 128, "strategy": "group"}},
    "W8A8": {
        "weights": {"num_bits": 8, **_W, "group_size": None, "strategy": "channel"},
        "input_activations": {"num_bits": 8, "type": "int", **_TOKEN},
    },
    "FP8_DYNAMIC": {
        "weights": {**_F8, "group_size": None, "strategy": "channel"},
        "input_activations": {"num_bits": 8, "type": "float", **_TOKEN},
    },
    "FP8_BLOCK": {
        "weights": {**_F8, "group_size": None, "strategy": "block", "block_structure": [128, 128]},
        "input_activations": {**_F8, "dynamic": True, "group_size": 128, "strategy": "group"},
    },
}
PRESET_SCHEMES["INT8"] = PRESET_SCHEMES["W8A8"]

#: Stored formats (``CompressionFormat`` values) this backend reads and writes.
FORMATS = ("pack-quantized", "naive-quantized", "int-quantized", "float-quantized")
_STRATEGIES = {"int": ("tensor", "channel", "group"), "float": ("tensor", "channel", "block")}
_ACTORDER_WITHOUT_G_IDX = (None, "weight", "static")
_ARG_FIELDS = (
    "num_bits", "type", "symmetric", "group_size", "strategy", "block_structure", "dynamic", "actorder",
    "scale_dtype", "zp_dtype", "observer", "observer_kwargs",
)  # fmt: skip
_SCHEME_FIELDS = ("targets", "weights", "input_activations", "output_activations", "format")


@dataclasses.dataclass
class CompressedTensorsConfig(QuantConfig):
    """compressed-tensors' quantization config (vLLM's native format), completed on construction (see module).

    :param config_groups: group name -> scheme dict, or a preset name (``"W4A16"``) -> list of targets.
    :param ignore: modules kept in full precision: exact names or ``re:`` regular expressions (``re.match``), as
        compressed-tensors and vLLM match them (a bare ``"q_proj"`` matches no module; write ``"re:.*q_proj$"``).
    :param calibration: qcore's addition: ``"gptq"`` makes the weight codes and scales with GPTQ on calibration
        data (same stored format); ``None`` rounds to nearest, as compressed-tensors' minmax observer does.
    :param strict_group_size: qcore's addition, used while quantizing and not saved. ``False``: a Linear its group's
        ``group_size`` does not divide (or a 4-bit one with an odd ``in_features``) stays in full precision, is
        reported in ``model.qcore_fallbacks`` and by ``qcore estimate``, and is written into ``ignore`` on save, so
        vLLM and transformers load its plain weight. ``True``: a ``ConfigError`` naming the module.
    """

    quant_method: ClassVar[str] = "compressed-tensors"
    skip_field: ClassVar[str | None] = "ignore"

    config_groups: dict[str, Any] = dataclasses.field(default_factory=dict)
    format: str | None = None
    quantization_status: str = "compressed"
    kv_cache_scheme: dict[str, Any] | None = None
    global_compression_ratio: float | None = None
    ignore: list[str] | None = dataclasses.field(default_factory=list)
    moe_sparsity_config: dict[str, Any] | None = None
    sparsity_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    transform_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    version: str | None = None
    calibration: str | None = None
    strict_group_size: bool = dataclasses.field(default=False, compare=False)

    def __post_init__(self) -> None:
        # Completed here, so a config built in code, parsed from a preset or read from a checkpoint is the same object.
        self.config_groups = {name: _scheme(name, group) for name, group in copy.deepcopy(self.config_groups).items()}
        formats = {group["format"] for group in self.config_groups.values()}
        if self.format in (None, "dense", "fakequant"):
            self.format = formats.pop() if len(formats) == 1 else "mixed-precision"
        self.quantization_status = "compressed"
        if self.version is None:
            self.version = _installed_version()
        super().__post_init__()

    def check(self) -> None:
        if not self.config_groups:
            raise ConfigError("compressed-tensors config: 'config_groups' is empty; give e.g. {'W4A16': ['Linear']}")
        if self.format not in (*FORMATS, "mixed-precision"):
            raise ConfigError(f"compressed-tensors config: 'format' {self.format!r} is not one of {list(FORMATS)}")
        if self.kv_cache_scheme is not None:
            raise ConfigError(
                "compressed-tensors config: 'kv_cache_scheme' (a quantized KV cache) is not supported by qcore; "
                "set it to null (vLLM can still quantize the cache at serving time with --kv-cache-dtype)"
            )
        if self.sparsity_config or self.transform_config or self.moe_sparsity_config:
            raise ConfigError(
                "compressed-tensors config: sparsity, transform and MoE-sparsity configs are not supported by qcore; "
                "set 'sparsity_config' and 'transform_config' to {} and 'moe_sparsity_config' to null"
            )
        if self.calibration not in (None, "gptq"):
            raise ConfigError(
                f"compressed-tensors config: 'calibration' must be null or 'gptq', not {self.calibration!r}"
            )
        if self.calibration == "gptq" and any(
            g["weights"]["type"] != "int" or g["weights"]["strategy"] == "tensor" for g in self.config_groups.values()
        ):
            raise ConfigError(
                "compressed-tensors config: calibration 'gptq' makes integer weights per group or channel; every "
                "group's weights must have type 'int' and strategy 'group' or 'channel'"
            )
        if not isinstance(self.strict_group_size, bool):
            raise ConfigError(
                f"compressed-tensors config: 'strict_group_size' must be true or false, got {self.strict_group_size!r}"
            )
        for pattern in self.ignore or ():
            if not isinstance(pattern, str):
                raise ConfigError(f"compressed-tensors config: 'ignore' entries must be strings, got {pattern!r}")
            if pattern.startswith("re:"):
                _compile(pattern, "ignore")

    @property
    def needs_calibration(self) -> bool:
        return self.calibration == "gptq"

    # -- writing ---------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The dict compressed-tensors' ``ModelCompressor.update_config`` writes, plus ``calibration`` when set."""
        data = {"quant_method": self.quant_method}
        data.update((f.name, copy.deepcopy(getattr(self, f.name))) for f in dataclasses.fields(self))
        if data["calibration"] is None:
            del data["calibration"]
        del data["strict_group_size"]
        if data["version"] is None:
            del data["version"]
        return data

    # -- what the core asks of a config ----------------------------------------------------------------

    def skip_modules(self) -> list[str]:
        """``ignore`` in the core's pattern language: exact names anchored, ``re:`` regexes matched from the start.

        Entries naming classes (``"Linear"``) and the groups' ``targets`` are matched in ``preprocess_model``, by
        compressed-tensors itself.
        """
        return [f"(?:{p[3:]}).*" if p.startswith("re:") else re.escape(p) + "$" for p in self.ignore or ()]

    def shape_fallback(self, module_name: str, out_features: int, in_features: int) -> str | None:
        """Full precision (``ignore``) for a Linear its group's weights do not fit (see ``strict_group_size``)."""
        scheme = self.scheme_named(module_name)
        why = None if scheme is None else fit_problem(scheme["weights"], in_features)
        if why is None:
            return None
        if self.strict_group_size:
            raise ConfigError(
                f"compressed-tensors config: {why} of module {module_name!r} ({out_features}x{in_features}), and "
                f"strict_group_size is set; choose a group size dividing it, add the module to 'ignore', or unset "
                f"strict_group_size"
            )
        return f"kept in full precision, written into 'ignore' ({why})"

    def scheme_named(self, module_name: str) -> dict[str, Any] | None:
        """The scheme compressed-tensors gives an ``nn.Linear`` named ``module_name``, matched by name alone (exact
        name, then ``re:``, then the class name ``Linear``; a later group wins a target); ``None`` when ``ignore``
        names it or no group targets it. The plugin matches with compressed-tensors itself; this is the same rule
        without torch, for ``qcore estimate``."""
        if any(_names(pattern, module_name) for pattern in self.ignore or ()):
            return None
        by_target = {target: scheme for scheme in self.config_groups.values() for target in scheme["targets"]}
        for kind in ("name", "re", "class"):
            for target, scheme in by_target.items():
                if (kind, target) in (("name", module_name), ("class", "Linear")) or (
                    kind == "re" and target.startswith("re:") and re.match(target[3:], module_name)
                ):
                    return scheme
        return None

    def quantized_nbytes(self, out_features: int, in_features: int, dtype_nbytes: int) -> int:
        group = next(iter(self.config_groups.values()))
        weights = group["weights"]
        if fit_problem(weights, in_features) is not None:
            return out_features * in_features * dtype_nbytes  # the fallback: full precision
        codes = out_features * (
            math.ceil(in_features * weights["num_bits"] / 32) * 4
            if group["format"] == "pack-quantized"
            else in_features
        )
        if weights["strategy"] == "group":
            rows, columns = out_features, in_features // weights["group_size"]
        elif weights["strategy"] == "block":
            rows = math.ceil(out_features / weights["block_structure"][0])
            columns = math.ceil(in_features / weights["block_structure"][1])
        else:
            rows, columns = (out_features, 1) if weights["strategy"] == "channel" else (1, 1)
        zero_points = 0 if weights["symmetric"] else rows * columns
        if zero_points and group["format"] == "pack-quantized" and weights["strategy"] in ("group", "channel"):
            zero_points = math.ceil(rows * weights["num_bits"] / 32) * 4 * columns
        shape = 16 if group["format"] == "pack-quantized" else 0
        return codes + rows * columns * dtype_nbytes + zero_points + shape

    def short_name(self) -> str:
        group = next(iter(self.config_groups.values()))
        weights, inputs = group["weights"], group["input_activations"]
        w = f"W{weights['num_bits']}" if weights["type"] == "int" else "FP8"
        a = "A16" if inputs is None else f"A{inputs['num_bits']}"
        return f"compressed-tensors {w}{a} {group['format']}"


def fit_problem(weights: dict[str, Any], in_features: int) -> str | None:
    """Why a scheme's ``weights`` cannot be stored for a Linear with ``in_features`` inputs, or ``None``: whole groups
    along the input (vLLM's kernels refuse a shorter last group), and an even width for 4-bit codes packed in pairs."""
    if weights["strategy"] == "group" and in_features % weights["group_size"]:
        return f"'group_size'={weights['group_size']} does not divide in_features={in_features}"
    if weights["type"] == "int" and weights["num_bits"] == 4 and in_features % 2:
        return f"4-bit weights need an even in_features, got {in_features}"
    return None


def _names(pattern: str, module_name: str) -> bool:
    """Whether an ``ignore`` entry names this Linear: an exact name, a ``re:`` match, or the class name."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module_name) is not None
    return pattern in (module_name, "Linear")


def _scheme(name: str, group: Any) -> dict[str, Any]:
    where = f"config_groups.{name}"
    if isinstance(group, list):  # a preset name mapped to its targets, as QuantizationConfig accepts it
        preset = PRESET_SCHEMES.get(name.upper())
        if preset is None:
            raise ConfigError(
                f"compressed-tensors config: {where} is a list of targets, so {name!r} must be a preset scheme name; "
                f"qcore serves {sorted(PRESET_SCHEMES)}"
            )
        group = {"targets": group, **copy.deepcopy(preset)}
    if not isinstance(group, dict):
        raise ConfigError(f"compressed-tensors config: {where} must be a scheme object or a list of targets")
    unknown = sorted(set(group) - set(_SCHEME_FIELDS))
    if unknown:
        raise ConfigError(f"compressed-tensors config: {where} has unknown field(s) {unknown}")
    targets = group.get("targets")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ConfigError(f"compressed-tensors config: {where}.targets must be a non-empty list of strings")
    for target in targets:
        if target.startswith("re:"):
            _compile(target, f"{where}.targets")
    weights = _args(group.get("weights"), f"{where}.weights")
    inputs = _args(group.get("input_activations"), f"{where}.input_activations")
    if weights is None:
        raise ConfigError(f"compressed-tensors config: {where}.weights is missing; qcore quantizes weights")
    _check_weights(weights, f"{where}.weights")
    if inputs is not None:
        _check_inputs(inputs, weights, f"{where}.input_activations")
    if group.get("output_activations") is not None:
        raise ConfigError(f"compressed-tensors config: {where}.output_activations is not supported; set it to null")
    fmt = group.get("format") or _infer_format(weights, inputs)
    allowed = (
        ("pack-quantized", "naive-quantized", "int-quantized")
        if weights["type"] == "int"
        else ("float-quantized", "naive-quantized")
    )
    if fmt not in allowed:
        raise ConfigError(
            f"compressed-tensors config: {where}.format {fmt!r} cannot hold {weights['type']} weights; use one of "
            f"{list(allowed)}"
        )
    if fmt == "pack-quantized" and weights["num_bits"] > 8:
        raise ConfigError(f"compressed-tensors config: {where}: pack-quantized holds at most 8 bits")
    return {
        "targets": list(targets),
        "weights": weights,
        "input_activations": inputs,
        "output_activations": None,
        "format": fmt,
    }


def _args(data: Any, where: str) -> dict[str, Any] | None:
    """A ``QuantizationArgs`` dict with compressed-tensors' defaults filled in, other keys kept as given."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ConfigError(f"compressed-tensors config: {where} must be an object or null")
    unknown = sorted(set(data) - set(_ARG_FIELDS))
    if unknown:
        raise ConfigError(f"compressed-tensors config: {where} has unknown field(s) {unknown}")
    args = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, **data}
    args.setdefault("dynamic", False)
    group_size = args["group_size"]
    if group_size is not None and (
        not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < -1 or group_size == 0
    ):
        raise ConfigError(f"compressed-tensors config: {where}.group_size must be a positive int, -1 or null")
    if args.get("strategy") is None:
        args["strategy"] = "tensor" if group_size is None else "channel" if group_size == -1 else "group"
    for key, kind in (("num_bits", int), ("symmetric", bool), ("type", str), ("strategy", str)):
        if not isinstance(args[key], kind) or (kind is int and isinstance(args[key], bool)):
            raise ConfigError(f"compressed-tensors config: {where}.{key} must be a {kind.__name__}, got {args[key]!r}")
    args["type"], args["strategy"] = args["type"].lower(), args["strategy"].lower()
    if args["strategy"] == "group" and (group_size is None or group_size <= 0):
        raise ConfigError(f"compressed-tensors config: {where}: strategy 'group' needs a positive group_size")
    if (args["strategy"] == "block") != (args.get("block_structure") is not None):
        raise ConfigError(f"compressed-tensors config: {where}: block_structure goes with strategy 'block' only")
    return args


def _check_weights(weights: dict[str, Any], where: str) -> None:
    kind, bits, strategy = weights["type"], weights["num_bits"], weights["strategy"]
    if kind not in _STRATEGIES or (kind == "int" and bits not in (4, 8)) or (kind == "float" and bits != 8):
        raise ConfigError(
            f"compressed-tensors config: {where}: {kind} {bits}-bit weights are not served by qcore; use int 4 or 8 "
            f"bits (W4A16, W8A16, W8A8) or float 8 bits (FP8_DYNAMIC, FP8_BLOCK)"
        )
    if strategy not in _STRATEGIES[kind]:
        raise ConfigError(
            f"compressed-tensors config: {where}.strategy {strategy!r} for {kind} weights must be one "
            f"of {list(_STRATEGIES[kind])}"
        )
    if weights["dynamic"] is not False:
        raise ConfigError(f"compressed-tensors config: {where}.dynamic must be false: weights are quantized once")
    if kind == "float" and not weights["symmetric"]:
        raise ConfigError(f"compressed-tensors config: {where}: float8 weights are symmetric only")
    block = weights.get("block_structure")
    if block is not None and (
        not isinstance(block, list) or len(block) != 2 or not all(isinstance(v, int) and v > 0 for v in block)
    ):
        raise ConfigError(f"compressed-tensors config: {where}.block_structure must be [rows, cols] of positive ints")
    if weights.get("actorder") not in _ACTORDER_WITHOUT_G_IDX:
        raise ConfigError(
            f"compressed-tensors config: {where}.actorder {weights['actorder']!r} stores a g_idx permutation, which "
            f"qcore does not read; use actorder 'weight' or null"
        )
    if weights.get("scale_dtype") is not None:
        raise ConfigError(f"compressed-tensors config: {where}.scale_dtype is not supported; leave it unset")
    # Checked here, from a fixed list: compressed-tensors itself would look the name up on the torch module.
    if weights.get("zp_dtype") not in (None, "torch.int8", "int8") or (kind == "float" and weights.get("zp_dtype")):
        raise ConfigError(f"compressed-tensors config: {where}.zp_dtype must be 'torch.int8' or unset")


def _check_inputs(inputs: dict[str, Any], weights: dict[str, Any], where: str) -> None:
    if inputs["dynamic"] is not True:
        raise ConfigError(
            f"compressed-tensors config: {where}: static activation scales need calibrating activation ranges, which "
            f"qcore does not do; use dynamic activations (W8A8, FP8_DYNAMIC) or none (W4A16)"
        )
    if not inputs["symmetric"] or inputs["num_bits"] != 8 or inputs["type"] != weights["type"]:
        raise ConfigError(
            f"compressed-tensors config: {where}: qcore serves symmetric 8-bit activations of the weights' type "
            f"(int8 with int8 weights, float8 with float8 weights)"
        )
    if inputs["strategy"] not in ("token", "group", "tensor"):
        raise ConfigError(f"compressed-tensors config: {where}.strategy must be 'token', 'group' or 'tensor'")
    if weights["type"] == "int" and weights["num_bits"] != 8:
        raise ConfigError(f"compressed-tensors config: {where}: int8 activations go with 8-bit weights (W8A8)")


def _infer_format(weights: dict[str, Any], inputs: dict[str, Any] | None) -> str:
    """compressed-tensors' ``infer_module_format`` for a Linear, restricted to the schemes above."""
    if weights["type"] == "int":
        return "int-quantized" if inputs is not None else "pack-quantized"
    return "float-quantized" if inputs is not None else "naive-quantized"


def _compile(pattern: str, where: str) -> None:
    try:
        re.compile(pattern[3:])
    except re.error as error:
        raise ConfigError(
            f"compressed-tensors config: {where} pattern {pattern!r} is not a valid regex: {error}"
        ) from None


def _installed_version() -> str | None:
    try:
        return importlib.metadata.version("compressed-tensors")
    except importlib.metadata.PackageNotFoundError:
        return None
