"""qcore's conformance suite, run against qcore-bnb for 4-bit NF4 and for LLM.int8().

It checks registration, the config round trip, quantizing tiny models of real architectures through all six phases,
accuracy against full precision, save and reload without re-quantizing, no pickle, the skip list and the error when
bitsandbytes is missing. A failing test's docstring says how to fix it.
"""

from __future__ import annotations

from qcore.testing import BackendConformance


class TestBnbNf4Conformance(BackendConformance):
    distribution = "qcore-bnb"
    library = "bitsandbytes"
    config = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
              "bnb_4bit_compute_dtype": "bfloat16"}  # fmt: skip
    skip_field = "llm_int8_skip_modules"
    # GPT-2 stores its Linears as transformers' Conv1D, transposed; quantizing it checks the layer handles both.
    architectures = ("llama", "opt", "gpt2")


class TestBnbInt8Conformance(BackendConformance):
    distribution = "qcore-bnb"
    library = "bitsandbytes"
    config = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    skip_field = "llm_int8_skip_modules"
