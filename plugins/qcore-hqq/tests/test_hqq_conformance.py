"""qcore's conformance suite, run against qcore-hqq: registration, config round trip, quantizing tiny Llama, OPT and
GPT-2 models through all six phases, accuracy, save and reload without re-quantizing, no pickle, the skip list and
the error when hqq is missing. A failing test's docstring says how to fix it."""

from __future__ import annotations

from qcore.testing import BackendConformance


class TestHqqConformance(BackendConformance):
    distribution = "qcore-hqq"
    library = "hqq"
    config = {"quant_method": "hqq", "nbits": 4, "group_size": 64, "axis": 1}
    skip_field = "modules_to_not_convert"
    # OPT's Linears carry biases; GPT-2's are transformers' Conv1D (transposed weights).
    architectures = ("llama", "opt", "gpt2")
    # 4-bit groups of 64 stay within 8-13% of the largest full-precision logit on these tiny random models
    # (random weights have no structure for the quantizer to exploit; 8-bit is within about 1%).
    tolerance = 0.2
