"""qcore's conformance suite, run against qcore-eetq in bfloat16 on Llama, OPT and GPT-2 (transformers' Conv1D).

The tolerance: an int8 step is 1/127 of its row's largest weight, so each weight is off by at most 1/254 of that;
through two layers and bfloat16 rounding the logits move about 1% of their largest value (measured 0.6 to 1.1% on
these models), and 3% leaves room without hiding a wrong scale (which moves them by 100% or more).
"""

from __future__ import annotations

from qcore.testing import BackendConformance


class TestEetqConformance(BackendConformance):
    distribution = "qcore-eetq"
    config = {"quant_method": "eetq", "weights": "int8"}
    skip_field = "modules_to_not_convert"
    tolerance = 0.03
    architectures = ("llama", "opt", "gpt2")
    expected_failures = {
        "test_validate_reports_missing_library": "qcore-eetq needs no library beyond torch: without the eetq package "
        "it runs torch._weight_int8pack_mm (test_eetq_model.py checks that path and its report)",
    }
