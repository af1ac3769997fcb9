"""qcore's conformance suite, run against qcore-torchao: Int8WeightOnlyConfig (int8 per row) in bfloat16 on Llama,
OPT and Qwen2.

The tolerance: an int8 step is 1/127 of a row's largest weight, so each weight is off by at most 1/254 of it; through
two layers in bfloat16 the logits move about 1% of their largest value, and 3% leaves room without hiding a wrong
scale (which moves them by 100% or more). GPT-2 is left out: torchao's ``quantize_`` takes ``nn.Linear`` only, and
transformers' ``Conv1D`` is not one (transformers' torchao path leaves GPT-2 unquantized too).
"""

from __future__ import annotations

from qcore.testing import BackendConformance


class TestTorchAoConformance(BackendConformance):
    distribution = "qcore-torchao"
    library = "torchao"
    config = {"quant_method": "torchao", "quant_type": "int8_weight_only"}
    skip_field = "modules_to_not_convert"
    tolerance = 0.03
    architectures = ("llama", "opt", "qwen2")
