"""qcore's conformance suite, run against qcore-quanto: int4 weights in bfloat16 on Llama, OPT and Qwen2, with the
C++ extension guard of conftest.py active throughout.

The tolerance: the tiny models' 64 and 128 input features are at most 128, so quanto's rule gives one group per row:
a 4-bit step is 1/15 of a row's range, each weight is off by up to 1/30 of it, and through two layers in bfloat16
the logits move up to about a quarter of their largest value; 0.35 leaves room without hiding a wrong scale or shift
(which moves them by 100% or more). GPT-2 is left out: transformers' ``Conv1D`` is not an ``nn.Linear``, which is all
quanto's transformers path (and this backend) quantizes.
"""

from __future__ import annotations

from qcore.testing import BackendConformance


class TestQuantoConformance(BackendConformance):
    distribution = "qcore-quanto"
    library = "optimum"
    config = {"quant_method": "quanto", "weights": "int4"}
    skip_field = "modules_to_not_convert"
    tolerance = 0.35
    architectures = ("llama", "opt", "qwen2")
