"""The ``gptq`` and ``awq`` quantization configs: what config.json (or quantize_config.json) records, and what a
user asks for when quantizing with GPTQ.

Parsed before phase 1 (``validate``). Both classes take the dicts gptqmodel, AutoGPTQ, AutoAWQ, optimum and
transformers write, with their spellings (``format``/``checkpoint_format``, AWQ's ``version``), and write back the
keys transformers' ``GPTQConfig``/``AwqConfig`` read. The rest of a tool's bookkeeping (``meta``, calibration
settings) is accepted and dropped, because it does not change how the stored tensors decode. Imports neither
torch nor any quantization library.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import qcore

__all__ = ["GptqConfig", "AwqConfig", "GPTQ_BITS", "GPTQ_FORMATS", "AWQ_VERSIONS"]

#: Bit widths GPTQ checkpoints use (int32 words hold 16, 32/3, 8 or 4 codes).
GPTQ_BITS = (2, 3, 4, 8)
#: ``checkpoint_format`` values whose tensors this plugin decodes: v1 stores each zero point minus one, v2 as is.
GPTQ_FORMATS = ("gptq", "gptq_v2")
#: AutoAWQ layouts: ``gemm`` packs along the output features in AWQ's interleaved order, ``gemv`` along the input.
AWQ_VERSIONS = ("gemm", "gemv")

#: Keys gptqmodel, AutoGPTQ, optimum and transformers write that do not change how stored tensors decode.
_TOOL_KEYS = frozenset(
    {
        "meta", "method", "quantizer", "model_name_or_path", "model_file_base_name", "is_marlin_format",
        "act_group_aware", "mse", "backend", "use_exllama", "exllama_config", "use_cuda_fp16", "max_input_length",
        "tokenizer", "dataset", "model_seqlen", "block_name_to_quantize", "module_name_preceding_first_block",
        "batch_size", "pad_token_id", "cache_block_outputs", "modules_in_block_to_quantize", "damp_auto_increment",
        "static_groups", "v2", "v2_alpha", "adapter", "rotation", "hyb_act", "fail_safe", "offload_to_disk",
        "offload_to_disk_path", "pack_impl", "true_sequential_scope", "lm_head", "pack_dtype", "dynamic",
    }
)  # fmt: skip


@dataclasses.dataclass
class GptqConfig(qcore.QuantConfig):
    """GPTQ (Frantar et al., 2022): loading gptqmodel/AutoGPTQ checkpoints, or quantizing with calibration data.

    Field names and defaults are transformers' ``GPTQConfig`` ones; ``checkpoint_format`` is also read from
    ``format``. On a full-precision checkpoint the load runs GPTQ block by block on calibration data.
    """

    quant_method: ClassVar[str] = "gptq"
    skip_field: ClassVar[str | None] = "modules_to_not_convert"
    ignored_keys: ClassVar[frozenset[str]] = _TOOL_KEYS | {"format"}
    #: Quantizing needs activations; loading a GPTQ checkpoint does not (the core asks only when quantizing).
    needs_calibration: ClassVar[bool] = True

    #: Bits per weight: 2, 3, 4 or 8.
    bits: int = 4
    #: Input features sharing one scale and zero point; -1: one group per output row.
    group_size: int = 128
    #: Act-order: quantize columns by decreasing Hessian diagonal; stored with ``g_idx``.
    desc_act: bool = False
    #: Symmetric: every zero point is ``2 ** (bits - 1)``.
    sym: bool = True
    #: Dampening added to the Hessian diagonal, as a fraction of its mean.
    damp_percent: float = 0.1
    #: Quantize the linears of a block in execution order, each on the inputs the already quantized ones produce.
    true_sequential: bool = True
    #: ``gptq`` (v1: zero points stored minus one, what every GPTQ reader takes) or ``gptq_v2``.
    checkpoint_format: str = "gptq"
    #: Module names or patterns kept in full precision when quantizing (``None``: transformers' defaults).
    modules_to_not_convert: list[str] | None = None
    #: What a Linear that ``group_size`` does not fit (it does not divide in_features, or a width leaves part of an
    #: int32 word) gets when quantizing. ``False``: full precision, reported in ``model.qcore_fallbacks`` and listed
    #: by ``qcore estimate``; the saved config names it in ``modules_to_not_convert``, since a GPTQ checkpoint has one
    #: group size for every layer and vLLM and exllama refuse a shorter last group. ``True``: a ``ConfigError``
    #: naming the module. A qcore addition, used while quantizing and not saved.
    strict_group_size: bool = dataclasses.field(default=False, compare=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | qcore.QuantConfig) -> qcore.QuantConfig:
        if isinstance(data, qcore.QuantConfig) or not isinstance(data, Mapping):
            return super().from_dict(data)
        flat = dict(data)
        _refuse_unsupported(flat)
        for key in ("format", "checkpoint_format"):
            if flat.get(key) is not None and not isinstance(flat[key], str):
                raise qcore.ConfigError(
                    f"gptq config: field {key!r} must be one of {list(GPTQ_FORMATS)}, got {flat[key]!r}"
                )
        spelled = {flat.get(key) for key in ("format", "checkpoint_format")} - {None}
        if len(spelled) > 1:
            raise qcore.ConfigError(
                f"gptq config: 'format' and 'checkpoint_format' disagree ({sorted(map(str, spelled))}); keep one"
            )
        if spelled:
            flat["checkpoint_format"] = spelled.pop().lower()
        return super().from_dict(flat)

    def check(self) -> None:
        if self.bits not in GPTQ_BITS:
            raise qcore.ConfigError(f"gptq config: field 'bits' must be one of {list(GPTQ_BITS)}, got {self.bits}")
        _check_group_size("gptq", self.group_size)
        if self.checkpoint_format not in GPTQ_FORMATS:
            raise qcore.ConfigError(
                f"gptq config: field 'checkpoint_format' must be one of {list(GPTQ_FORMATS)}, got "
                f"{self.checkpoint_format!r}; convert other layouts (marlin, bitblas) back to gptq with gptqmodel"
            )
        if not 0 < self.damp_percent < 1:
            raise qcore.ConfigError(f"gptq config: field 'damp_percent' must be in (0, 1), got {self.damp_percent}")
        if not isinstance(self.strict_group_size, bool):
            raise qcore.ConfigError(
                f"gptq config: field 'strict_group_size' must be true or false, got {self.strict_group_size!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """transformers' ``GPTQConfig.to_dict`` keys (``format`` and ``checkpoint_format`` both, as it writes)."""
        data = {"quant_method": "gptq", **dataclasses.asdict(self), "format": self.checkpoint_format}
        data.update(pack_dtype="int32", lm_head=False)
        del data["strict_group_size"]
        if self.modules_to_not_convert is None:
            del data["modules_to_not_convert"]
        return data

    def shape_fallback(self, module_name: str, out_features: int, in_features: int) -> str | None:
        why = self.fit_problem(out_features, in_features)
        if why is None:
            return None
        if self.strict_group_size:
            raise qcore.ConfigError(
                f"gptq config: {why} of module {module_name!r} ({out_features}x{in_features}), and strict_group_size "
                f"is set; pick a group size that divides it (or -1), keep the module in full precision with "
                f"modules_to_not_convert, or unset strict_group_size"
            )
        return f"kept in full precision ({why})"

    def fit_problem(self, out_features: int, in_features: int) -> str | None:
        """Why GPTQ's packing cannot store a ``Linear(in_features, out_features)`` with these settings, or ``None``:
        whole groups along the input, 32 input features per int32 word of ``qweight``, and whole words of
        ``qzeros`` along the output."""
        group = in_features if self.group_size == -1 else self.group_size
        if in_features % group:
            return f"'group_size'={group} does not divide in_features={in_features}"
        if in_features % 32:
            return f"in_features={in_features} is not a multiple of 32 (one int32 word of qweight)"
        if (out_features * self.bits) % 32:
            return f"out_features={out_features} at {self.bits} bits does not fill whole int32 words of qzeros"
        return None

    def quantized_nbytes(self, out_features: int, in_features: int, dtype_nbytes: int) -> int:
        if self.fit_problem(out_features, in_features) is not None:
            return out_features * in_features * dtype_nbytes  # the fallback: full precision
        groups = _groups(self.group_size, in_features)
        # packed codes + fp16 scales + packed zeros + int32 g_idx
        return (
            out_features * in_features * self.bits + groups * out_features * (16 + self.bits)
        ) // 8 + 4 * in_features

    def short_name(self) -> str:
        return f"gptq {self.bits}-bit g{self.group_size}"


@dataclasses.dataclass
class AwqConfig(qcore.QuantConfig):
    """AWQ checkpoints as AutoAWQ writes them (4-bit, ``version`` gemm or gemv). Loading only: AWQ's scale search
    is not run here, so a full-precision checkpoint cannot be quantized with this config."""

    quant_method: ClassVar[str] = "awq"
    skip_field: ClassVar[str | None] = "modules_to_not_convert"
    # transformers' AwqConfig derives from GPTQConfig and writes its fields too; they mean nothing for AWQ tensors.
    ignored_keys: ClassVar[frozenset[str]] = _TOOL_KEYS | {
        "format", "damp_percent", "desc_act", "sym", "true_sequential", "checkpoint_format", "w_bit", "q_group_size",
    }  # fmt: skip

    #: Bits per weight; AutoAWQ writes 4 only.
    bits: int = 4
    #: Input features sharing one scale and zero point; -1: one group per output row.
    group_size: int = 128
    #: Asymmetric codes with stored zero points (``qzeros``); without, every zero point is 8.
    zero_point: bool = True
    #: ``gemm`` or ``gemv`` (AutoAWQ's tensor layouts); also read from ``format``.
    version: str = "gemm"
    #: Module names kept in full precision.
    modules_to_not_convert: list[str] | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | qcore.QuantConfig) -> qcore.QuantConfig:
        if isinstance(data, qcore.QuantConfig) or not isinstance(data, Mapping):
            return super().from_dict(data)
        flat = dict(data)
        _refuse_unsupported(flat)
        # AutoAWQ's own quant_config spelling, accepted so its dict can be passed as is.
        for theirs, ours in (("w_bit", "bits"), ("q_group_size", "group_size")):
            if theirs in flat:
                flat.setdefault(ours, flat[theirs])
        value = flat.get("version", flat.get("format"))
        if value is not None:
            flat["version"] = value.lower() if isinstance(value, str) else value
        return super().from_dict(flat)

    def check(self) -> None:
        if self.bits != 4:
            raise qcore.ConfigError(f"awq config: field 'bits' must be 4 (AutoAWQ packs 4-bit only), got {self.bits}")
        _check_group_size("awq", self.group_size)
        if self.version not in AWQ_VERSIONS:
            raise qcore.ConfigError(
                f"awq config: field 'version' must be one of {list(AWQ_VERSIONS)}, got {self.version!r}; other "
                f"AutoAWQ layouts (gemv_fast, marlin, exllama) are kernel-specific: re-export the model as gemm"
            )

    def to_dict(self) -> dict[str, Any]:
        """The keys AutoAWQ writes (transformers' ``AwqConfig`` reads them)."""
        return {"quant_method": "awq", **dataclasses.asdict(self)}

    def quantized_nbytes(self, out_features: int, in_features: int, dtype_nbytes: int) -> int:
        groups = _groups(self.group_size, in_features)
        return (out_features * in_features * 4 + groups * out_features * (16 + 4)) // 8

    def short_name(self) -> str:
        return f"awq 4-bit g{self.group_size} {self.version}"


def _check_group_size(method: str, group_size: Any) -> None:
    if group_size != -1 and group_size <= 0:
        raise qcore.ConfigError(f"{method} config: field 'group_size' must be positive or -1, got {group_size}")


def _groups(group_size: int, in_features: int) -> int:
    return 1 if group_size == -1 else -(-in_features // group_size)


def _preview(value: Any) -> str:
    """A few of a field's keys for a message, whatever type the file put there."""
    return repr(sorted(map(str, value))[:3] if isinstance(value, (dict, list)) else value)[:80]


def _refuse_unsupported(data: dict[str, Any]) -> None:
    """Settings that change which tensors exist, which this plugin does not decode; said before any weight is read."""
    if data.get("pack_dtype", "int32") != "int32":
        raise qcore.ConfigError(
            f"{data.get('quant_method')} config: pack_dtype {data['pack_dtype']!r} is not supported; qcore-gptq "
            f"reads int32 words, as gptqmodel writes by default"
        )
    if data.get("lm_head"):
        raise qcore.ConfigError(
            f"{data.get('quant_method')} config: lm_head=true (a quantized output head) is not supported by "
            f"qcore-gptq; quantize the model with lm_head=False"
        )
    if data.get("dynamic"):
        raise qcore.ConfigError(
            f"{data.get('quant_method')} config: per-module 'dynamic' overrides are not supported by qcore-gptq "
            f"(got {_preview(data['dynamic'])}); quantize with one setting for every module"
        )
