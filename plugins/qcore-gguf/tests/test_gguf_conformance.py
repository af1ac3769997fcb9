"""qcore's conformance suite, run against qcore-gguf quantizing tiny full-precision models to GGUF Q8_0 on the fly
(with the gguf package's own quantizer), in bfloat16, on Llama, OPT and GPT-2 (transformers' Conv1D).

The tolerance: a Q8_0 step is 1/127 of its block's largest weight, so each weight is off by at most 1/254 of that;
through two layers and bfloat16 rounding the logits move about 1% of their largest value, and 3% leaves room without
hiding a wrong scale (which moves them by 100% or more).
"""

from __future__ import annotations

from qcore.testing import BackendConformance


class TestGgufConformance(BackendConformance):
    distribution = "qcore-gguf"
    library = "gguf"
    config = {"quant_method": "gguf", "weight_type": "Q8_0"}
    skip_field = "modules_to_not_convert"
    tolerance = 0.03
    architectures = ("llama", "opt", "gpt2")
