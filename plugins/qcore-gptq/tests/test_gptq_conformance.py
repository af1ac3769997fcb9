"""qcore's conformance suite, run against qcore-gptq quantizing with GPTQ (4-bit, groups of 32: the tiny models are
64 wide) on Llama, OPT and GPT-2 (transformers' Conv1D), calibrated on the suite's token ids.

The tolerance: a 4-bit step is 1/7.5 of its group's largest weight. GPTQ's error compensation moves single weights
by more than half a step on purpose (it trades a weight's own error for a smaller output error), so the dequantized
weights lie up to 15-19% of a module's largest weight from the originals (measured on these models), and the logits
of these random-weight models move 5-17% of their largest value. 30% leaves room for that without hiding a wrong
scale or a misplaced group (which move them by 100% or more).
"""

from __future__ import annotations

from qcore.testing import BackendConformance


class TestGptqConformance(BackendConformance):
    distribution = "qcore-gptq"
    config = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    skip_field = "modules_to_not_convert"
    tolerance = 0.3
    architectures = ("llama", "opt", "gpt2")
    expected_failures = {
        "test_validate_reports_missing_library": "qcore-gptq needs no library beyond torch: GPTQ is implemented in "
        "the plugin and the packed weights run on qcore's kernel layer",
    }
