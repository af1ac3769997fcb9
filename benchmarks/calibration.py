"""Peak memory of a calibrating load (one decoder block at a time) and of ``qcore convert``, on the synthetic models.

A calibrating load should peak near the quantized model + one decoder block in full precision + the calibration
activations, never near the full-precision model; a conversion near the larger of the two quantized models + one
module. Each measurement runs in a fresh process (peak RSS is per process) with a benchmark-only backend whose
``calibrate_block`` quantizes each Linear to per-row int8 with its clipping chosen on the block's activations (the
template's example scheme), so the numbers measure the core's mechanism, not a quantization library.

    python benchmarks/calibration.py --size large --sequences 32 --tokens 512     # the 0.84B model
    python benchmarks/calibration.py --size quick                                 # a 19M model, seconds

Prints one JSON object: peak RSS over the process's baseline (torch and transformers imported), against the bound.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _plugin() -> Any:
    import qcore
    from qcore import hookimpl

    @dataclasses.dataclass
    class BenchConfig(qcore.QuantConfig):
        quant_method: ClassVar[str] = "bench_calibrated"
        needs_calibration: ClassVar[bool] = True

        def quantized_nbytes(self, out_features: int, in_features: int, dtype_nbytes: int) -> int:
            return out_features * in_features + out_features * 4

    @dataclasses.dataclass
    class RoundedConfig(BenchConfig):
        """The same stored form, rounded to nearest tensor by tensor (``load_weight``): a conversion's target."""

        quant_method: ClassVar[str] = "bench_int8"
        needs_calibration: ClassVar[bool] = False

    def linear_class() -> Any:
        import torch
        from torch import nn

        class Int8Linear(nn.Module):
            def __init__(self, weight: Any, scale: Any, bias: Any) -> None:
                super().__init__()
                self.weight = nn.Parameter(weight, requires_grad=False)
                self.register_buffer("weight_scale", scale)
                self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                w = (self.weight.to(torch.float32) * self.weight_scale[:, None]).to(x.dtype)
                return nn.functional.linear(x, w, self.bias)

        return Int8Linear

    class Plugin:
        @hookimpl
        def register_backend(self) -> Any:
            return qcore.Backend(name="bench", configs={"bench_calibrated": BenchConfig, "bench_int8": RoundedConfig})

        @hookimpl
        def preprocess_model(self, config, context, model) -> None:
            import torch

            if context.calibrating:
                return
            linear = linear_class()
            for name in context.modules:
                old = model.get_submodule(name)
                out_features, in_features = old.weight.shape
                with torch.device("meta"):
                    empty = torch.empty(out_features, in_features, dtype=torch.int8)
                    bias = torch.empty(out_features, dtype=context.dtype) if old.bias is not None else None
                    model.set_submodule(name, linear(empty, torch.empty(out_features), bias))

        @hookimpl
        def load_weight(self, config, context, model, module_name, tensor_name, tensor) -> Any:
            import torch

            if tensor_name == "bias":
                return None
            if context.pre_quantized:
                stored = context.gather(module_name, tensor_name, tensor)
                return {} if stored is None else {"weight": stored["weight"], "weight_scale": stored["weight_scale"]}
            weight = tensor.to(torch.float32)
            scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
            return {"weight": torch.round(weight / scale[:, None]).to(torch.int8), "weight_scale": scale}

        @hookimpl
        def calibrate_block(self, config, context, model, block_name, block, inputs) -> None:
            import torch

            names = context.block_modules(block_name)
            squares: dict[str, Any] = {}

            def collect(name: str) -> Any:
                def hook(module: Any, args: Any, output: Any) -> None:
                    x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
                    squares[name] = squares.get(name, 0) + (x * x).sum(dim=0)

                return hook

            handles = [model.get_submodule(n).register_forward_hook(collect(n)) for n in names]
            inputs.run(block)
            for handle in handles:
                handle.remove()
            linear = linear_class()
            for name in names:
                plain = model.get_submodule(name)
                weight = plain.weight.to(torch.float32)
                absmax = weight.abs().amax(dim=1).clamp(min=1e-12)
                best, best_error = absmax / 127, torch.full_like(absmax, float("inf"))
                for ratio in (1.0, 0.9, 0.8):
                    scale = absmax * ratio / 127
                    error = (((torch.round(weight / scale[:, None]).clamp(-127, 127) * scale[:, None] - weight) ** 2)
                             * squares[name]).sum(dim=1)  # fmt: skip
                    better = error < best_error
                    best, best_error = torch.where(better, scale, best), torch.where(better, error, best_error)
                codes = torch.round(weight / best[:, None]).clamp(-127, 127).to(torch.int8)
                bias = plain.bias.detach() if plain.bias is not None else None
                del weight
                model.set_submodule(name, linear(codes, best, bias))

        @hookimpl
        def dequantize_module(self, config, module_name, module, dtype) -> Any:
            import torch

            tensors = {"weight": (module.weight.to(torch.float32) * module.weight_scale[:, None]).to(dtype)}
            if module.bias is not None:
                tensors["bias"] = module.bias.detach().to(dtype)
            return tensors

    return Plugin()


def _tensor_nbytes(module: Any) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import resource

    import qcore
    import torch
    from qcore.calibration import decoder_blocks
    from qcore.loading import _candidates

    torch.set_num_threads(args.threads)
    qcore.register_plugin(_plugin(), "bench")
    # The first matmul and attention map torch's CPU kernels (oneDNN, MKL: tens of MB of RSS): count them in the
    # baseline, since every load that runs a forward pays them once, whatever its size.
    x = torch.randn(1, 8, 4, 64, dtype=torch.bfloat16)
    torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)
    torch.nn.functional.linear(x, torch.randn(64, 64, dtype=torch.bfloat16)).float().exp().sum()
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ids = torch.randint(0, 32000, (args.sequences, args.tokens), generator=torch.Generator().manual_seed(0))
    plan = qcore.loading.plan(args.checkpoint)
    skeleton = plan.model
    blocks = decoder_blocks(skeleton, _candidates(skeleton))
    block_nbytes = _tensor_nbytes(skeleton.get_submodule(blocks[0]))  # on meta, in bf16: what one block takes
    full_nbytes = plan.nbytes()
    hidden = skeleton.config.hidden_size
    # The hidden states kept between blocks plus the block's outputs, in bf16, and one fp32 sum of squares per Linear.
    activations = 2 * args.sequences * args.tokens * hidden * 2
    largest_module = max(_tensor_nbytes(m) for n, m in skeleton.named_modules() if n in _candidates(skeleton))
    if args.mode == "calibrate":
        model = qcore.from_pretrained(args.checkpoint, {"quant_method": "bench_calibrated"}, calibration=ids)
    elif args.mode == "convert":
        from qcore.convert import convert

        model = convert(args.checkpoint, args.out, {"quant_method": "bench_int8"}, overwrite=True)
    else:
        model = qcore.from_pretrained(args.checkpoint)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    quantized = _tensor_nbytes(model)
    if args.mode == "calibrate" and args.out is not None:
        qcore.save_pretrained(model, args.out, overwrite=True)
    result = {
        "mode": args.mode,
        "checkpoint": str(args.checkpoint),
        "sequences": args.sequences,
        "tokens": args.tokens,
        "baseline_rss": baseline,
        "peak_rss_over_baseline": peak - baseline,
        "model_nbytes": quantized,
        "full_precision_nbytes": full_nbytes,
        "one_block_nbytes": block_nbytes,
        "activations_nbytes": activations,
    }
    if args.mode == "calibrate":
        result["bound"] = quantized + block_nbytes + activations
    elif args.mode == "convert":
        # Source and target are the same size here: the larger of the two, plus one module in full precision.
        result["largest_module_nbytes"] = largest_module
        result["bound"] = quantized + largest_module
    if "bound" in result:
        result["within_bound"] = peak - baseline <= result["bound"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="quick", help="quick, small, medium or large (the 0.84B model)")
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mode", choices=["bf16", "calibrate", "convert"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode is not None:
        print(json.dumps(worker(args)))
        return
    import checkpoints

    directory = checkpoints.checkpoint_dir(args.size)
    if not checkpoints.is_complete(directory):
        subprocess.run([sys.executable, str(HERE / "checkpoints.py"), "build", args.size], check=True)
    quantized = checkpoints.CACHE / f"{directory.name}-bench-calibrated"
    runs = [("bf16", directory, None), ("calibrate", directory, quantized),
            ("convert", quantized, checkpoints.CACHE / f"{directory.name}-bench-converted")]  # fmt: skip
    results = []
    for mode, source, out in runs:
        command = [sys.executable, __file__, "--mode", mode, "--checkpoint", str(source), "--sequences",
                   str(args.sequences), "--tokens", str(args.tokens), "--threads", str(args.threads)]  # fmt: skip
        completed = subprocess.run([*command, *(["--out", str(out)] if out else [])], capture_output=True, text=True)
        if completed.returncode != 0:
            sys.exit(f"{mode} run failed:\n{completed.stderr[-3000:]}")
        results.append(json.loads(completed.stdout.strip().splitlines()[-1]))
    print(json.dumps({"size": args.size, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
