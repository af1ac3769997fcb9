"""Device maps: every form works with every backend, automatic maps place by quantized size, and placements no
device here can serve are refused before reading weights.

Two-device placements are computed for a budget with a GPU index and checked without dispatching, so they run on
any machine; the one test that dispatches across a GPU and the CPU is marked ``cuda``.
"""

from __future__ import annotations

import json
import shutil

import pytest
import qcore
import torch
from click.testing import CliRunner
from qcore import placement
from qcore.cli import cli
from qcore.config import QuantConfig
from qcore.loading import plan
from tiny_models import build, logits

TOY = {"quant_method": "toy_int8"}
BACKENDS = {
    "toy": TOY,
    "bnb-nf4": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "bnb-int8": {"quant_method": "bitsandbytes", "load_in_8bit": True},
    "eetq": {"quant_method": "eetq", "weights": "int8"},
    "hqq": {"quant_method": "hqq", "nbits": 4, "group_size": 64},
}
#: Every form a CPU-only machine can serve; None is the reference load. An int (a GPU index) is tested below.
MAPS = ["auto", "balanced", "balanced_low_0", "sequential", "cpu", {"": "cpu"}]


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    """A tiny Llama with four decoder layers, so a budget can split them."""
    return build("llama", tmp_path_factory.mktemp("llama4") / "llama", num_hidden_layers=4)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_every_device_map_form_loads_with_every_backend(llama, toy, backend, tmp_path):
    reference = qcore.from_pretrained(llama, BACKENDS[backend])  # device_map=None
    expected = logits(reference)
    qcore.save_pretrained(reference, tmp_path / "saved")
    for device_map in MAPS:
        for model in (
            qcore.from_pretrained(llama, BACKENDS[backend], device_map=device_map),  # on the fly
            qcore.from_pretrained(tmp_path / "saved", device_map=device_map),  # pre-quantized
        ):
            assert {p.device.type for p in model.parameters()} == {"cpu"}, device_map
            assert torch.equal(logits(model), expected), device_map


class _Recorder:
    """Records the device map each phase-2-or-earlier hook of the toy backend sees."""

    def __init__(self):
        self.seen: dict[str, list] = {"validate": [], "update_device_map": []}

    @qcore.hookimpl(wrapper=True)
    def validate(self, config, context):
        self.seen["validate"].append(dict(context.device_map))
        return (yield)

    @qcore.hookimpl(wrapper=True)
    def update_device_map(self, config, context, device_map):
        self.seen["update_device_map"].append(dict(device_map))
        return (yield)


@pytest.mark.parametrize(
    ("device_map", "requested"),
    [("auto", {}), ("balanced", {}), ("balanced_low_0", {}), ("sequential", {}), (None, {}), ("cpu", {"": "cpu"}),
     ({"": "cpu"}, {"": "cpu"})],
)  # fmt: skip
def test_validate_sees_the_requested_map_and_update_device_map_the_resolved_one(llama, toy, device_map, requested):
    recorder = _Recorder()
    qcore.register_plugin(recorder, "recorder")
    try:
        qcore.from_pretrained(llama, TOY, device_map=device_map)
    finally:
        qcore.unregister_plugin("recorder")
    assert recorder.seen["validate"] == [requested]
    (resolved,) = recorder.seen["update_device_map"]
    assert resolved and all(target == "cpu" for target in resolved.values())


@pytest.mark.parametrize("backend", ["hqq", "bnb-nf4", "toy"])
def test_auto_places_by_quantized_size_so_a_model_that_fits_quantized_loads(llama4, toy, backend):
    model_plan = plan(llama4)
    config = QuantConfig.from_dict(BACKENDS[backend])
    applied = model_plan.assign(config)
    sizes = placement.module_sizes(model_plan.model, applied, model_plan.dtype)
    assert sum(sizes.values()) == model_plan.nbytes(config)
    in_flight = placement.in_flight_nbytes(model_plan.model, applied, model_plan.dtype, False)
    budget = placement.required_budget(sum(sizes.values()), in_flight)
    assert budget < model_plan.nbytes()  # sized at full precision, accelerate would send layers to disk
    model = qcore.from_pretrained(llama4, BACKENDS[backend], device_map="auto", max_memory={"cpu": budget})
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    with pytest.raises(qcore.ConfigError, match="'disk'"):  # the core's refusal, or the backend's own
        qcore.from_pretrained(llama4, BACKENDS[backend], device_map="auto", max_memory={"cpu": budget * 3 // 4})


def _placement(llama4, strategy, max_memory, backend="hqq"):
    model_plan = plan(llama4)
    applied = model_plan.assign(QuantConfig.from_dict(BACKENDS[backend]))
    sizes = placement.module_sizes(model_plan.model, applied, model_plan.dtype)
    in_flight = placement.in_flight_nbytes(model_plan.model, applied, model_plan.dtype, False)
    return placement.place(model_plan.model, sizes, strategy, max_memory, in_flight=in_flight), sizes, in_flight


def test_a_gpu_budget_splits_the_decoder_layers_between_gpu_and_cpu(llama4):
    whole, sizes, in_flight = _placement(llama4, "auto", {"cpu": 10**9})
    total = sum(sizes.values())
    placed, _, _ = _placement(llama4, "auto", {0: total, "cpu": 10**9})  # the GPU's reserve pushes layers out
    groups = placed.groups()
    assert set(groups) == {0, "cpu"}
    assert groups[0][0] == "model.embed_tokens" and any(g.startswith("model.layers.0") for g in groups[0])
    assert any(g.startswith("model.layers.") for g in groups["cpu"]) and "lm_head" in groups["cpu"]
    assert sum(placed.nbytes.values()) == total == whole.nbytes["cpu"]
    for device, nbytes in placed.nbytes.items():
        assert nbytes <= placed.budgets[device] - placed.reserves[device]
    # The GPU keeps room for a CPU-placed block, moved there for each forward, on top of the usual reserve.
    assert placed.reserves[0] > placement.reserve_nbytes(placed.budgets[0], in_flight)
    layer = {name: device for name, device in placed.device_map.items() if name.startswith("model.layers.")}
    assert all(isinstance(d, int) or d == "cpu" for d in layer.values())


def test_balanced_spreads_layers_over_two_gpus_and_low_0_spares_the_first(llama4):
    _, sizes, _ = _placement(llama4, "sequential", {"cpu": 10**9})
    budget = sum(sizes.values())
    sequential, _, _ = _placement(llama4, "sequential", {0: budget * 2, 1: budget * 2, "cpu": 10**9})
    balanced, _, _ = _placement(llama4, "balanced", {0: budget * 2, 1: budget * 2, "cpu": 10**9})
    low_0, _, _ = _placement(llama4, "balanced_low_0", {0: budget * 2, 1: budget * 2, "cpu": 10**9})
    assert sequential.device_map == {"": 0}
    assert balanced.nbytes[0] > 0 and balanced.nbytes[1] > 0
    assert low_0.nbytes[0] < balanced.nbytes[0]
    assert all(p.fits for p in (sequential, balanced, low_0))


def test_max_memory_keys_and_sizes_are_checked():
    assert placement.parse_max_memory({"cpu": "1KiB", "cuda:1": 5, "0": "2KB"}) == {0: 2000, 1: 5, "cpu": 1024}
    with pytest.raises(qcore.ConfigError, match="max_memory key 'disk'"):
        placement.parse_max_memory({"disk": "1GB"})
    with pytest.raises(qcore.ConfigError, match=r"max_memory\['cpu'\]"):
        placement.parse_max_memory({"cpu": "lots"})


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_estimate_prints_the_placement_from_config_json_alone(llama4, toy, tmp_path):
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(llama4 / "config.json", config_only / "config.json")  # no weights to read
    _, sizes, _ = _placement(llama4, "auto", {"cpu": 10**9}, backend="toy")
    gpu = sum(sizes.values())  # the GPU's reserve pushes some layers to the CPU
    placed, _, _ = _placement(llama4, "auto", {0: gpu, "cpu": 10**9}, backend="toy")
    assert set(placed.groups()) == {0, "cpu"}
    result = _cli(
        "estimate", config_only, "--preset", "toy-int8", "--device-map", "auto", "--max-memory", f"0={gpu},cpu=1GB",
        "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["presets"]
    devices = {d["device"]: d for d in row["placement"]["devices"]}
    assert set(devices) == {"0", "cpu"} and row["placement"]["fits"]
    assert {d: devices[str(d)]["nbytes"] for d in placed.nbytes} == placed.nbytes
    assert devices["0"]["modules"] == placed.groups()[0]
    table = _cli("estimate", config_only, "--preset", "toy-int8", "--device-map", "auto", "--max-memory", f"0={gpu}")
    assert table.exit_code == 0 and "cuda:0" in table.stdout and "model.embed_tokens" in table.stdout
    assert _cli("estimate", config_only, "--max-memory", "0=1GB").exit_code == 2  # needs --device-map
    assert "DEVICE=SIZE" in _cli("estimate", config_only, "--device-map", "auto", "--max-memory", "x").output


#: Llama 3.1 8B's config.json, as its hub repository holds it (the fields that size and place the model).
LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "torch_dtype": "bfloat16",
}  # fmt: skip


def test_the_readme_estimate_output_is_what_qcore_estimate_prints(tmp_path):
    """README's Devices section shows this command's table: each placement row is the one printed now."""
    import re
    from pathlib import Path

    if "eetq-int8" not in qcore.plugins.presets():
        pytest.skip("qcore-eetq is not installed")
    directory = tmp_path / "Llama-3.1-8B"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(LLAMA_3_1_8B))
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    command = "qcore estimate Llama-3.1-8B --preset eetq-int8 --device-map auto --max-memory 0=6GiB,cpu=64GiB"
    block = readme.split(f"$ {command}\n", 1)[1].split("```", 1)[0]
    result = _cli("estimate", directory, *command.split()[3:], "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["presets"]
    for device in row["placement"]["devices"]:
        name = "cuda:0" if device["device"] == "0" else device["device"]
        line = next(line for line in block.splitlines() if line.startswith(f"│ {name} "))
        shown = re.search(r"│ ([\d.]+) GiB │", line)
        assert shown and float(shown[1]) == round(device["nbytes"] / 2**30, 2), (name, line)
        assert device["modules"][0] in line
    assert f"{row['nbytes'] / 2**30:.2f} GiB" in block


def test_recommend_fits_exactly_when_the_placement_does(llama4, toy):
    result = _cli("estimate", llama4, "--preset", "toy-int8", "--json")
    (row,) = json.loads(result.stdout)["presets"]

    def fits(memory: int) -> bool:
        report = json.loads(_cli("recommend", llama4, "--memory", memory, "--device", "cpu", "--json").stdout)
        return next(r["fits"] for r in report["presets"] if r["preset"] == "toy-int8")

    assert fits(row["device_nbytes"]) and not fits(row["device_nbytes"] - 1)
    assert row["nbytes"] < row["device_nbytes"]


def test_explicit_per_module_map_is_honoured(llama, toy):
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    model = qcore.from_pretrained(llama, TOY, device_map=device_map)
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_placement_without_cuda_names_module_and_device(llama, toy, monkeypatch):
    read = []
    monkeypatch.setattr(qcore.checkpoint.CheckpointReader, "stream", lambda self, *a: read.append(1) or iter(()))
    with pytest.raises(qcore.ConfigError, match=r"module 'model.layers' on 'cuda:0' but this machine has 0 CUDA"):
        qcore.from_pretrained(llama, TOY, device_map={"model.layers": "cuda:0", "": "cpu"})
    assert read == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_an_int_map_asks_for_that_gpu_and_validate_sees_it_as_such(llama, toy):
    """``device_map=0`` is accelerate's whole model on GPU 0 (loaded on a GPU by
    test_every_other_backend_split_across_gpu_and_cpu_matches_a_load_on_that_gpu): validate sees ``{"": 0}``, and
    without CUDA the placement is refused with the fix before any weight is read."""
    recorder = _Recorder()
    qcore.register_plugin(recorder, "recorder")
    try:
        with pytest.raises(qcore.ConfigError, match=r"device_map 0 asks for CUDA but no CUDA device .* use 'cpu'"):
            qcore.from_pretrained(llama, TOY, device_map=0)
    finally:
        qcore.unregister_plugin("recorder")
    assert recorder.seen["validate"] == [{"": 0}]


def test_disk_offload_is_refused_with_the_module_named(llama, toy):
    with pytest.raises(qcore.ConfigError, match="module 'lm_head' on 'disk'"):
        qcore.from_pretrained(llama, TOY, device_map={"": "cpu", "lm_head": "disk"})


def test_auto_with_too_little_max_memory_is_refused_before_loading(llama, toy):
    with pytest.raises(qcore.ConfigError, match="on 'disk'"):
        qcore.from_pretrained(llama, TOY, device_map="auto", max_memory={"cpu": 20_000})


def test_a_device_map_that_is_no_device_names_itself(llama, toy):
    with pytest.raises(qcore.ConfigError, match="device_map 'everywhere' is not a device"):
        qcore.from_pretrained(llama, TOY, device_map="everywhere")


#: Backends whose quantized layers may run from the CPU beside a GPU (accelerate moves their weights in for the
#: forward); bitsandbytes and HQQ refuse that placement in update_device_map, so they are split with their own
#: rule: bnb keeps CPU modules in float32 (llm_int8_enable_fp32_cpu_offload), HQQ is split with plain layers on CPU.
_SPLIT = {
    "toy": TOY,
    "eetq": BACKENDS["eetq"],
    "bnb-nf4": {**BACKENDS["bnb-nf4"], "llm_int8_enable_fp32_cpu_offload": True},
    "bnb-int8": {**BACKENDS["bnb-int8"], "llm_int8_enable_fp32_cpu_offload": True},
    "hqq": {**BACKENDS["hqq"], "modules_to_not_convert": ["lm_head", "model.layers.1"]},
}


#: The tiny Llama's first block on GPU 0, the rest on the CPU.
SPLIT_MAP = {
    "model.embed_tokens": 0,
    "model.layers.0": 0,
    "model.layers.1": "cpu",
    "model.norm": "cpu",
    "model.rotary_emb": 0,
    "lm_head": "cpu",
}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", sorted(_SPLIT))
def test_split_across_gpu_and_cpu_matches_a_single_device_load(llama, toy, backend):
    split = qcore.from_pretrained(llama, _SPLIT[backend], device_map=SPLIT_MAP)
    single = qcore.from_pretrained(llama, _SPLIT[backend], device_map={"": 0})
    assert split.model.layers[0].self_attn.q_proj.weight.device.type == "cuda"
    expected, got = logits(single).float().cpu(), logits(split).float().cpu()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)


#: One preset per installed backend beyond the five above, so every form is tried with every backend; a backend
#: that is not installed skips. GPTQ calibrates (token ids below); the rest quantize on the fly.
EVERY_BACKEND = ["gptq-4bit", "ct-w4a16", "ct-w8a8", "fp8-block128", "quanto-int4", "torchao-int8-weight-only",
                 "gguf-q4_0"]  # fmt: skip
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def _preset(name):
    if name not in qcore.plugins.presets():
        pytest.skip(f"{name}: its backend is not installed")
    return qcore.plugins.preset_config(name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preset", EVERY_BACKEND)
def test_every_other_backend_split_across_gpu_and_cpu_matches_a_load_on_that_gpu(llama, preset):
    config = _preset(preset)
    calibration = {"calibration": IDS} if preset.startswith("gptq") else {}
    split = qcore.from_pretrained(llama, config, device_map=SPLIT_MAP, **calibration)
    single = qcore.from_pretrained(llama, config, device_map=0, **calibration)  # an int: the whole model on GPU 0
    assert {p.device.type for p in single.parameters()} == {"cuda"}
    expected, got = logits(single).float().cpu(), logits(split).float().cpu()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("preset", EVERY_BACKEND)
def test_every_device_map_form_loads_every_backend_on_the_fly_and_pre_quantized(llama, preset, tmp_path):
    config = _preset(preset)
    calibration = {"calibration": IDS} if preset.startswith("gptq") else {}
    reference = qcore.from_pretrained(llama, config, **calibration)
    expected = logits(reference)
    qcore.save_pretrained(reference, tmp_path / "saved")
    for device_map in MAPS:
        if not calibration:  # a calibrating load gives the same model under every map; one is enough
            on_the_fly = qcore.from_pretrained(llama, config, device_map=device_map)
            assert torch.equal(logits(on_the_fly), expected), device_map
        reloaded = qcore.from_pretrained(tmp_path / "saved", device_map=device_map)
        assert {p.device.type for p in reloaded.parameters()} == {"cpu"}, device_map
        assert torch.equal(logits(reloaded), expected), device_map
    if calibration:
        on_the_fly = qcore.from_pretrained(llama, config, device_map="auto", **calibration)
        assert torch.equal(logits(on_the_fly), expected)


def test_every_device_map_form_loads_a_recipe_mixing_backends(llama, tmp_path):
    recipe = qcore.Recipe(
        [("*self_attn*", BACKENDS["bnb-int8"]), ("*mlp.down_proj", BACKENDS["eetq"]), ("*mlp*", BACKENDS["hqq"]),
         ("lm_head", None)],
    )  # fmt: skip
    reference = qcore.from_pretrained(llama, recipe)
    expected = logits(reference)
    qcore.save_pretrained(reference, tmp_path / "saved")
    for device_map in MAPS:
        assert torch.equal(logits(qcore.from_pretrained(llama, recipe, device_map=device_map)), expected), device_map
        assert torch.equal(logits(qcore.from_pretrained(tmp_path / "saved", device_map=device_map)), expected)
    with pytest.raises(qcore.ConfigError, match="'disk'"):  # placed by the recipe's quantized sizes, so too little
        qcore.from_pretrained(llama, recipe, device_map="auto", max_memory={"cpu": 20_000})
