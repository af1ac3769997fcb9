"""Property tests: any config, recipe or safetensors header gives a valid result or a QcoreError, never a crash.

Configs are fuzzed for the test backend and every real backend installed here; headers are fuzzed as raw bytes,
as arbitrary JSON, and as near-valid headers whose verdict must agree with safetensors' own parser (so that a file
qcore accepts never fails half-way through a load, and a file safetensors reads is never refused).
"""

from __future__ import annotations

import json
import math
import signal
import struct
import tempfile
from pathlib import Path

import pytest
import qcore
import toy_backend
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from qcore import plugins
from qcore.checkpoint import DTYPE_SIZES, read_header

# No example database: the suite must not write into the repository. The deadline is loose because the test
# machine is shared; a hang would still exceed it by far.
FUZZ = settings(max_examples=120, deadline=2000, database=None, suppress_health_check=[HealthCheck.too_slow])

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=12))
JSON = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)  # fmt: skip
#: Values near the ones real configs hold, so fuzzing reaches the range checks and not only the type checks.
PLAUSIBLE = st.one_of(
    st.integers(-3, 300),
    st.floats(-10, 10),
    st.booleans(),
    st.none(),
    st.sampled_from(["float16", "bfloat16", "float32", "torch.bfloat16", "nf4", "fp4", "uint8", "int8", "lm_head", ""]),
    st.lists(st.sampled_from(["lm_head", "q_proj", "re:.*_proj"]), max_size=3),
)
VALUES = st.one_of(PLAUSIBLE, JSON)
#: Every method a backend in this repository serves; those not installed skip.
METHODS = [
    "toy_int8", "bitsandbytes", "hqq", "eetq", "gguf", "gptq", "awq", "compressed-tensors", "fp8", "torchao", "quanto",
]  # fmt: skip


@pytest.fixture(autouse=True)
def no_hang():
    """Fail a test that runs for a minute: a hostile input must not hang the parser (the deadline only reports slow
    examples that finish)."""

    def hung(signum, frame):
        raise AssertionError("the test ran for 60 s: an input made the code under test hang")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module", autouse=True)
def toy_registered():
    qcore.register_plugin(toy_backend.ToyPlugin(), "toy-fuzz")
    yield
    qcore.unregister_plugin("toy-fuzz")


def config_class(method: str) -> type:
    try:
        return plugins.config_class_for(method)
    except qcore.ConfigError:
        pytest.skip(f"no plugin for {method} installed")


def presets(method: str) -> list[dict]:
    backend = plugins.backend_for(method).backend
    found = [dict(p.config) for p in backend.presets if p.config.get("quant_method") == method]
    return found or [{"quant_method": method}]


def parse(raw) -> qcore.QuantConfig | None:
    """``QuantConfig.from_dict(raw)``: a config that survives a trip through config.json, or None for a ConfigError."""
    try:
        config = qcore.QuantConfig.from_dict(raw)
    except qcore.ConfigError:
        return None
    assert isinstance(config, qcore.QuantConfig)
    # What config.json keeps comes back equal; loading attributes (how this process runs the model) are the
    # user's to give again at reload, as the loader lays them over the stored config.
    reloaded = qcore.QuantConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert reloaded.with_loading_attributes(config) == config
    nbytes = config.quantized_nbytes(128, 64, 2)
    assert isinstance(nbytes, int) and nbytes > 0
    assert isinstance(config.short_name(), str)
    return config


# -- quantization configs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@FUZZ
@given(data=st.data())
def test_arbitrary_config_dict_parses_or_raises_config_error(method, data):
    fields = sorted(f for f in config_class(method).__dataclass_fields__)
    raw = data.draw(st.dictionaries(st.sampled_from(fields) | st.text(max_size=8), VALUES, max_size=6))
    parse({**raw, "quant_method": method})


@pytest.mark.parametrize("method", METHODS)
@FUZZ
@given(data=st.data())
def test_preset_with_fields_changed_parses_or_raises_config_error(method, data):
    fields = sorted(f for f in config_class(method).__dataclass_fields__)
    raw = dict(data.draw(st.sampled_from(presets(method))))
    raw.update(data.draw(st.dictionaries(st.sampled_from(fields), VALUES, min_size=1, max_size=3)))
    parse(raw)


@FUZZ
@given(raw=st.dictionaries(st.text(max_size=8), VALUES, max_size=4), method=VALUES)
@example(raw={}, method=None)
@example(raw={}, method="")
@example(raw={}, method=["toy_int8"])
def test_any_quant_method_parses_or_raises_config_error(raw, method):
    parse({**raw, "quant_method": method})


@FUZZ
@given(raw=VALUES)
def test_a_config_that_is_not_a_dict_raises_config_error(raw):
    if isinstance(raw, dict):
        return
    with pytest.raises(qcore.ConfigError):
        qcore.QuantConfig.from_dict(raw)


# -- recipes ---------------------------------------------------------------------------------------------------

TOY_CONFIGS = st.one_of(
    st.just({"quant_method": "toy_int8"}),
    st.builds(lambda dtype: {"quant_method": "toy_int8", "compute_dtype": dtype}, PLAUSIBLE),
    VALUES,
)
PATTERNS = st.one_of(
    st.sampled_from(["*", "lm_head", "*.q_proj", "re:.*", "re:(", "re:[", "re:proj$"]), st.text(max_size=8), VALUES
)
RULES = st.one_of(
    st.builds(lambda p, c: {"pattern": p, "config": c}, PATTERNS, st.none() | TOY_CONFIGS),
    st.builds(lambda p, c: [p, c], PATTERNS, st.none() | TOY_CONFIGS),
    VALUES,
)
RECIPES = st.fixed_dictionaries(
    {},
    optional={
        "quant_method": st.just("qcore_recipe") | VALUES,
        "rules": st.lists(RULES, max_size=4) | VALUES,
        "default": st.none() | TOY_CONFIGS,
        "modules": st.dictionaries(st.text(max_size=6), st.integers(-1, 3) | VALUES, max_size=3) | VALUES,
        "configs": st.lists(TOY_CONFIGS, max_size=3) | VALUES,
    },
)


@FUZZ
@given(raw=RECIPES)
@example(raw={"rules": [[1, 2]]})
@example(raw={"rules": [], "modules": {"a": 0}, "configs": 5})
@example(raw={"quant_method": "qcore_recipe", "modules": {}, "configs": [None]})
def test_arbitrary_recipe_parses_or_raises_config_error(raw):
    try:
        recipe = qcore.Recipe.from_dict(raw)
    except qcore.ConfigError:
        return
    written = recipe.to_dict()
    assert json.loads(json.dumps(written)) == written
    assert qcore.Recipe.from_dict(written).to_dict() == written
    assert all(isinstance(c, qcore.QuantConfig) for c in recipe.configs())


# -- safetensors headers ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch() -> Path:
    with tempfile.TemporaryDirectory() as directory:
        yield Path(directory) / "model.safetensors"


def verdict(path: Path):
    """read_header's verdict: the tensors (name -> dtype, shape) or None for a CheckpointError. Nothing else escapes."""
    try:
        infos, _ = read_header(path)
    except qcore.CheckpointError as error:
        assert error.file == str(path)
        return None
    return {name: (info.dtype, info.shape) for name, info in infos.items()}


def safetensors_verdict(path: Path):
    """What safetensors itself makes of the file: the tensors it reads, or None when it refuses it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            return {name: tuple(handle.get_tensor(name).shape) for name in handle.keys()}  # noqa: SIM118
    except SafetensorError:
        return None


@FUZZ
@given(raw=st.binary(max_size=64))
@example(raw=b"")
@example(raw=struct.pack("<Q", 2**64 - 1))
@example(raw=struct.pack("<Q", 2) + b"{}")
def test_arbitrary_bytes_give_a_header_or_a_checkpoint_error(scratch, raw):
    scratch.write_bytes(raw)
    verdict(scratch)


@FUZZ
@given(header=st.binary(max_size=96), data=st.binary(max_size=16))
def test_arbitrary_header_bytes_give_a_header_or_a_checkpoint_error(scratch, header, data):
    scratch.write_bytes(struct.pack("<Q", len(header)) + header + data)
    verdict(scratch)


@FUZZ
@given(header=JSON, data=st.binary(max_size=16))
def test_arbitrary_json_header_gives_a_header_or_a_checkpoint_error(scratch, header, data):
    raw = json.dumps(header).encode()
    scratch.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    verdict(scratch)


#: Dtypes both parsers know, and one neither does. (safetensors also knows sub-byte ones qcore refuses: F4, F6_*.)
DTYPES = st.sampled_from([*DTYPE_SIZES, "F17"])
SHAPES = st.lists(st.integers(0, 4), max_size=3) | st.lists(st.integers(-(2**65), 2**65), max_size=3) | VALUES


@st.composite
def near_valid_files(draw) -> bytes:
    """A valid safetensors file, then maybe broken in one or more places a real corruption would touch."""
    tensor = st.tuples(st.text(min_size=1, max_size=4), DTYPES, st.lists(st.integers(0, 4), max_size=3))
    tensors = draw(st.lists(tensor, max_size=4, unique_by=lambda t: t[0]))
    header, offset = {}, 0
    for name, dtype, shape in tensors:
        size = DTYPE_SIZES.get(dtype, 1) * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    data_len = offset
    if header and draw(st.booleans()):  # corrupt one field of one tensor
        name = draw(st.sampled_from(sorted(header)))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
        header[name][field] = draw(
            {"dtype": DTYPES | VALUES, "shape": SHAPES, "extra": VALUES,
             "data_offsets": st.lists(st.integers(-2, data_len + 2), min_size=2, max_size=2) | VALUES}[field]
        )  # fmt: skip
    if draw(st.booleans()):
        strings = st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2)
        header["__metadata__"] = draw(st.none() | strings | VALUES)
    raw = json.dumps(header).encode() + b" " * draw(st.integers(0, 3))  # safetensors pads headers with spaces
    data_len += draw(st.sampled_from([0, 0, 0, -1, 1, 2]))
    header_len = len(raw) + draw(st.sampled_from([0, 0, 0, -1, 1]))
    return struct.pack("<Q", max(header_len, 0)) + raw + b"\x00" * max(data_len, 0)


@FUZZ
@given(raw=near_valid_files())
def test_near_valid_header_is_accepted_exactly_when_safetensors_reads_it(scratch, raw):
    scratch.write_bytes(raw)
    ours, theirs = verdict(scratch), safetensors_verdict(scratch)
    if ours is None:
        assert theirs is None, "qcore refused a file safetensors reads"
    else:
        assert theirs is not None, "qcore accepted a file safetensors refuses: the load would fail half-way"
        assert {name: shape for name, (_, shape) in ours.items()} == theirs


#: Containers and scalars of the wrong kind, tried in every field of every preset (deterministic, beside the fuzzing).
WRONG_KINDS = ([], {}, {"": []}, [[]], [{}], {"a": {}}, 1.5, -1, "x", None, True)


@pytest.mark.parametrize("method", METHODS)
def test_every_field_of_every_preset_set_to_a_wrong_kind_parses_or_raises_config_error(method):
    fields = sorted(config_class(method).__dataclass_fields__)
    for preset in presets(method):
        for field in fields:
            for value in WRONG_KINDS:
                parse({**preset, field: value})
