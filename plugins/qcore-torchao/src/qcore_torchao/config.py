"""``TorchAoConfig``: the ``quantization_config`` of ``quant_method: torchao``, read by every one of the six phases.

The dict is the one transformers' ``TorchAoConfig`` writes: ``quant_type: {"default": <torchao config>}`` where a
torchao config is torchao's own serialisation (``config_to_dict``: ``{"_type": "Int8WeightOnlyConfig", "_version":
2, "_data": {...}}``, nested objects in the same form). torchao's ``config_from_dict`` imports the class a ``_type``
names from a list of modules; qcore never hands it checkpoint data. Every ``_type``, field and value is checked here
against :data:`SCHEMA`, a fixed table of the configs, granularities, enums and dtypes qcore serves, and only then
turned into torchao objects from the plugin's own table of classes. The same table checks the per-tensor JSON that
torchao's safetensors format stores in the file header. Imports neither torch nor torchao.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, ClassVar

from qcore import ConfigError, QuantConfig

__all__ = ["TorchAoConfig", "SCHEMA", "ENUMS", "DTYPES", "VERSIONS", "SHORT_NAMES", "problem", "leaf_configs"]

#: dtype kinds -> the names torchao writes (``{"_type": "torch.dtype", "_data": "bfloat16"}``).
DTYPES = {
    "float": ("float16", "bfloat16", "float32"),
    "float8": ("float8_e4m3fn", "float8_e5m2"),
    "intx": tuple(f"int{bits}" for bits in range(1, 9)),
}
#: torchao enums -> the members qcore accepts.
ENUMS = {
    "MappingType": ("SYMMETRIC", "SYMMETRIC_NO_CLIPPING_ERR", "ASYMMETRIC"),
    "KernelPreference": ("AUTO", "TORCH", "MSLK", "EMULATED", "TRITON"),
    "IntxPackingFormat": ("UNPACKED_TO_INT8",),
    "IntxChooseQParamsAlgorithm": ("AFFINE", "HQQ_SCALE_ONLY"),
    "Int4PackingFormat": ("PLAIN", "PLAIN_INT32", "TILE_PACKED_TO_4D", "PRESHUFFLED"),
    "Int4ChooseQParamsAlgorithm": ("TINYGEMM", "HQQ"),
    "Float8PackingFormat": ("PLAIN",),
}
_GRANULARITY = ("PerRow", "PerTensor", "PerAxis", "PerGroup")
#: An object (config, tensor subclass, granularity) -> {field: the kinds its value may be}. A kind is ``None``,
#: ``"bool"``, ``"int"``, ``"float"``, ``"ints"`` (a list of ints), ``"dtype:<kind>"``, an enum or object name, or
#: ``"list:<object names>"``.
SCHEMA: dict[str, dict[str, tuple[Any, ...]]] = {
    "PerRow": {"dim": ("int",)},
    "PerTensor": {},
    "PerAxis": {"axis": ("int",)},
    "PerGroup": {"group_size": ("int",)},
    "Float8MMConfig": {"emulate": ("bool",), "use_fast_accum": ("bool",), "pad_inner_dim": ("bool",)},
    "QuantizeTensorToInt8Kwargs": {
        "granularity": _GRANULARITY, "mapping_type": ("MappingType",), "reduce_range": ("bool",),
    },
    "QuantizeTensorToFloat8Kwargs": {
        "float8_dtype": ("dtype:float8",), "granularity": _GRANULARITY, "mm_config": ("Float8MMConfig", None),
        "hp_value_lb": ("float", None), "hp_value_ub": ("float", None), "kernel_preference": ("KernelPreference",),
    },
    # -- the configs (quantize_ on the fly) --
    "Int8WeightOnlyConfig": {
        "group_size": ("int", None), "granularity": (*_GRANULARITY, None), "set_inductor_config": ("bool",),
    },
    "Int8DynamicActivationInt8WeightConfig": {
        "act_mapping_type": ("MappingType", None), "weight_only_decode": ("bool",),
        "granularity": (*_GRANULARITY, "list:PerRow,PerTensor", None), "set_inductor_config": ("bool",),
        "reduce_range": ("bool", None),
    },
    "Float8WeightOnlyConfig": {
        "weight_dtype": ("dtype:float8",), "set_inductor_config": ("bool",), "granularity": (*_GRANULARITY, None),
    },
    "IntxWeightOnlyConfig": {
        "weight_dtype": ("dtype:intx",), "granularity": ("PerAxis", "PerGroup"), "mapping_type": ("MappingType",),
        "scale_dtype": ("dtype:float", None), "intx_packing_format": ("IntxPackingFormat",),
        "intx_choose_qparams_algorithm": ("IntxChooseQParamsAlgorithm",),
    },
    "Int4WeightOnlyConfig": {
        "group_size": ("int",), "set_inductor_config": ("bool",), "int4_packing_format": ("Int4PackingFormat",),
        "int4_choose_qparams_algorithm": ("Int4ChooseQParamsAlgorithm",), "int4_tile_packed_ntile": ("int",),
    },
    "Float8DynamicActivationFloat8WeightConfig": {
        "activation_dtype": ("dtype:float8",), "weight_dtype": ("dtype:float8",),
        "granularity": ("PerTensor", "PerRow", "list:PerTensor,PerRow", None),
        "packing_format": ("Float8PackingFormat", None), "mm_config": ("Float8MMConfig", None),
        "activation_value_lb": ("float", None), "activation_value_ub": ("float", None),
        "kernel_preference": ("KernelPreference",), "set_inductor_config": ("bool",), "alg_id": ("int",),
    },
    # -- the tensor subclasses (safetensors metadata) --
    "Int8Tensor": {
        "block_size": ("ints",), "dtype": ("dtype:float",), "act_quant_kwargs": ("QuantizeTensorToInt8Kwargs", None),
        "reduce_range": ("bool", None),
    },
    "Float8Tensor": {
        "block_size": ("ints",), "mm_config": ("Float8MMConfig", None),
        "act_quant_kwargs": ("QuantizeTensorToFloat8Kwargs", None), "kernel_preference": ("KernelPreference",),
        "dtype": ("dtype:float",),
    },
    "IntxUnpackedToInt8Tensor": {
        "target_dtype": ("dtype:intx",), "block_size": ("ints",), "dtype": ("dtype:float",),
        "activation_quantization": (None,),
    },
}  # fmt: skip
#: ``_version`` torchao 0.18 writes for each object (others write 1 or nothing).
VERSIONS = {name: 2 for name in SCHEMA if name.endswith("Config") and name != "Float8MMConfig"}
#: The configs, by the short names of transformers' former string form (``"quant_type": "int8_weight_only"``).
SHORT_NAMES = {
    "int8_weight_only": "Int8WeightOnlyConfig",
    "int8_dynamic_activation_int8_weight": "Int8DynamicActivationInt8WeightConfig",
    "float8_weight_only": "Float8WeightOnlyConfig",
    "intx_weight_only": "IntxWeightOnlyConfig",
    "int4_weight_only": "Int4WeightOnlyConfig",
    "float8_dynamic_activation_float8_weight": "Float8DynamicActivationFloat8WeightConfig",
}
CONFIGS = tuple(SHORT_NAMES.values())
TENSORS = ("Int8Tensor", "Float8Tensor", "IntxUnpackedToInt8Tensor")


def problem(value: Any, kinds: tuple[Any, ...], where: str) -> str | None:
    """Why ``value`` is none of ``kinds`` (see :data:`SCHEMA`), naming the path ``where``; ``None`` when it is one."""
    for kind in kinds:
        if kind is None and value is None:
            return None
        if kind == "bool" and isinstance(value, bool):
            return None
        if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
            return None
        if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return None
        if kind == "ints" and isinstance(value, list) and all(type(v) is int for v in value):
            return None
        if isinstance(kind, str) and kind.startswith("list:") and isinstance(value, list):
            names = tuple(kind[5:].split(","))
            if all(problem(item, names, f"{where}[{i}]") is None for i, item in enumerate(value)):
                return None
        tagged = isinstance(value, Mapping) and set(value) == {"_type", "_data"}
        dtype = isinstance(kind, str) and kind.startswith("dtype:") and tagged and value["_type"] == "torch.dtype"
        if dtype and value["_data"] in DTYPES[kind[6:]]:
            return None
        if tagged and kind in ENUMS and value["_type"] == kind and value["_data"] in ENUMS[kind]:
            return None
        if kind in SCHEMA and isinstance(value, Mapping) and value.get("_type") == kind:
            return object_problem(value, where)
    return f"{where} is {_short(value)}, expected {' or '.join(_kind_name(k) for k in kinds)}"


def object_problem(value: Mapping[str, Any], where: str, *, exact: bool = False) -> str | None:
    """Why ``value`` is not a well-formed ``{"_type", "_version", "_data"}`` object of :data:`SCHEMA`.

    :param exact: every field must be present (torchao's tensor JSON always writes them all; a config may leave
        fields at their defaults).
    """
    name = value.get("_type")
    if name not in SCHEMA:
        return f"{where}._type is {_short(name)}, not one of {sorted(SCHEMA)}"
    extra = set(value) - {"_type", "_version", "_data", *(("_tensor_data_names",) if name in TENSORS else ())}
    if extra:
        return f"{where} has unknown keys {sorted(extra)}"
    version = value.get("_version", VERSIONS.get(name, 1))
    if version != VERSIONS.get(name, 1):
        return f"{where}._version is {_short(version)}; torchao 0.18 writes {VERSIONS.get(name, 1)} for {name}"
    data = value.get("_data")
    if not isinstance(data, Mapping):
        return f"{where}._data is {_short(data)}, expected an object"
    fields = SCHEMA[name]
    unknown = set(data) - set(fields)
    if unknown:
        return f"{where}: {name} has no field(s) {sorted(unknown)}; its fields are {sorted(fields)}"
    if exact and set(fields) - set(data):
        return f"{where}: {name} lacks field(s) {sorted(set(fields) - set(data))}"
    for field, item in data.items():
        found = problem(item, fields[field], f"{where}.{field}")
        if found is not None:
            return found
    return None


def _kind_name(kind: Any) -> str:
    if kind is None:
        return "null"
    if isinstance(kind, str) and kind.startswith("dtype:"):
        return f"a torch.dtype of {list(DTYPES[kind[6:]])}"
    if kind in ENUMS:
        return f"{kind} {list(ENUMS[kind])}"
    return kind


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclasses.dataclass
class TorchAoConfig(QuantConfig):
    """transformers' ``TorchAoConfig`` as a dict (see the module docstring).

    :param quant_type: ``{"default": <torchao config>}``; a short name (``"int8_weight_only"``) or a bare torchao
        config dict is accepted and written back in the full form. The config may be an ``FqnToConfig``: module name,
        ``"re:<pattern>"`` (full match) or ``"_default"`` -> a config or ``None`` (full precision), first match wins
        in that order.
    :param modules_to_not_convert: modules kept in full precision (transformers' matching).
    :param include_input_output_embeddings: must stay false: qcore-torchao quantizes ``nn.Linear`` layers only.
    :param untie_embedding_weights: written back as given; without embedding quantization it changes nothing.
    :param compile: loading attribute, never saved: ``torch.compile`` the model's forward in ``optimize_runtime``.
    """

    quant_method: ClassVar[str] = "torchao"
    skip_field: ClassVar[str | None] = "modules_to_not_convert"
    loading_attributes: ClassVar[frozenset[str]] = frozenset({"compile"})

    quant_type: dict[str, Any] | str = "int8_weight_only"
    modules_to_not_convert: list[str] | None = None
    include_input_output_embeddings: bool = False
    untie_embedding_weights: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        self.quant_type = _full_form(self.quant_type)
        super().__post_init__()

    def check(self) -> None:
        if self.include_input_output_embeddings:
            raise ConfigError(
                "torchao config: include_input_output_embeddings is not supported; qcore-torchao quantizes nn.Linear "
                "layers only (set it to false)"
            )
        for name, config in leaf_configs(self.quant_type["default"]).items():
            if config is not None and config["_type"] not in CONFIGS:
                raise ConfigError(f"torchao config: quant_type {name} is a {config['_type']}; use one of {CONFIGS}")
        group = self.quant_type["default"]["_data"].get("group_size")
        if isinstance(group, int) and group <= 0:
            raise ConfigError(f"torchao config: field 'quant_type.default.group_size' must be positive, got {group}")

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data.pop("compile")  # a loading attribute: how this process runs the model, not what the checkpoint holds
        return data

    def config_for(self, module_name: str) -> dict[str, Any] | None:
        """The torchao config dict that applies to ``module_name`` (``None``: keep it in full precision)."""
        top = self.quant_type["default"]
        if top["_type"] != "FqnToConfig":
            return top
        table = top["_data"]["fqn_to_config"]
        if module_name in table:
            return table[module_name]
        for pattern, config in table.items():
            if pattern.startswith("re:") and re.fullmatch(pattern[3:], module_name):
                return config
        return table.get("_default")

    def short_name(self) -> str:
        top = self.quant_type["default"]
        return f"torchao {top['_type']}"

    def quantized_nbytes(self, out_features: int, in_features: int, dtype_nbytes: int) -> int:
        top = self.quant_type["default"]
        if top["_type"] == "FqnToConfig":
            return out_features * in_features * dtype_nbytes  # depends on the module: counted as full precision
        if top["_type"] == "Int4WeightOnlyConfig":
            group = top["_data"].get("group_size", 128)
            return out_features * in_features // 2 + 2 * 2 * out_features * max(1, in_features // group)
        return out_features * in_features + 4 * 2 * out_features  # 8-bit codes, a scale and a zero point per row


def leaf_configs(config: Mapping[str, Any]) -> dict[str, Mapping[str, Any] | None]:
    """``{"default": config}``, or an ``FqnToConfig``'s table of pattern -> config."""
    if config["_type"] == "FqnToConfig":
        return dict(config["_data"]["fqn_to_config"])
    return {"default": config}


def _full_form(quant_type: Any) -> dict[str, Any]:
    """``quant_type`` in transformers' form, every name and value checked (raises :class:`ConfigError`)."""
    if isinstance(quant_type, str):
        if quant_type not in SHORT_NAMES:
            raise ConfigError(f"torchao config: quant_type {quant_type!r} is not one of {sorted(SHORT_NAMES)}")
        name = SHORT_NAMES[quant_type]
        return {"default": {"_type": name, "_version": VERSIONS[name], "_data": {}}}
    if not isinstance(quant_type, Mapping):
        raise ConfigError(f"torchao config: quant_type must be a dict or a name, got {_short(quant_type)}")
    if "_type" in quant_type:
        quant_type = {"default": quant_type}
    if set(quant_type) != {"default"} or not isinstance(quant_type["default"], Mapping):
        raise ConfigError(
            f'torchao config: quant_type must be {{"default": {{"_type": ..., "_data": ...}}}}, as transformers '
            f"writes it; got keys {sorted(map(str, quant_type))}"
        )
    top = dict(quant_type["default"])
    found = _fqn_problem(top) if top.get("_type") == "FqnToConfig" else object_problem(top, "quant_type.default")
    if found is not None:
        raise ConfigError(f"torchao config: {found}")
    return {"default": top}


def _fqn_problem(top: Mapping[str, Any]) -> str | None:
    if set(top) - {"_type", "_version", "_data"} or top.get("_version", 1) != 1:
        return "quant_type.default: an FqnToConfig has the keys _type, _version (1) and _data"
    data = top.get("_data")
    if not isinstance(data, Mapping) or not set(data) <= {"fqn_to_config", "module_fqn_to_config"}:
        return "quant_type.default._data of an FqnToConfig holds fqn_to_config (and module_fqn_to_config)"
    table = data.get("fqn_to_config")
    if not isinstance(table, Mapping) or not table:
        return "quant_type.default._data.fqn_to_config must be a non-empty object of module name -> config"
    if "module_fqn_to_config" in data and data["module_fqn_to_config"] != table:
        return "quant_type.default._data.module_fqn_to_config differs from fqn_to_config (torchao writes one copy)"
    for name, config in table.items():
        where = f"quant_type.default._data.fqn_to_config[{name!r}]"
        if name.startswith("re:"):
            try:
                re.compile(name[3:])
            except re.error as error:
                return f"{where}: not a regular expression ({error})"
        if config is not None:
            found = object_problem(config, where) if isinstance(config, Mapping) else f"{where} is not an object"
            if found is not None:
                return found
    return None
