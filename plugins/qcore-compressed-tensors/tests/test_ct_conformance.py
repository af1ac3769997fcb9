"""qcore's conformance suite, run against qcore-compressed-tensors: W4A16 symmetric, groups of 32, in bfloat16, on
Llama, OPT and Qwen2 (the tiny models' 64/128 features take groups of 32; ``lm_head`` ignored, as the presets do).

The tolerance: a 4-bit step is 2/15 of a group's largest weight, so each weight is off by up to 1/15 of it; through
two layers in bfloat16 the logits move 7 to 12% of their largest value on these models (measured: Qwen2 6.6%, Llama
11.7%, OPT 12.4%), and 0.2 leaves room without hiding a wrong scale or a shifted code (which move them by 50% or
more). GPT-2 is left out: its transformers
``Conv1D`` layers are not ``Linear`` to compressed-tensors, so a ``["Linear"]`` target quantizes none of them.
"""

from __future__ import annotations

from qcore.testing import BackendConformance

W4A16_G32 = {
    "quant_method": "compressed-tensors",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "group_size": 32, "strategy": "group"},
        }
    },
    "ignore": ["lm_head"],
}


class TestCompressedTensorsConformance(BackendConformance):
    distribution = "qcore-compressed-tensors"
    library = "compressed_tensors"
    config = W4A16_G32
    skip_field = "ignore"
    tolerance = 0.2
    architectures = ("llama", "opt", "qwen2")
    expected_failures = {
        "test_skip_list_is_honoured": "compressed-tensors' ignore list matches exact module names and 're:' regular "
        "expressions, as vLLM and transformers read it, so the suite's bare 'q_proj' matches no module and q_proj is "
        "quantized; test_ct_config.py::test_ignore_matches_as_compressed_tensors_does covers the real semantics",
    }
