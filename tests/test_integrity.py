"""The core's defences against hostile or broken checkpoints and misleading errors: unreadable files, names in
config.json that would make transformers or torch import something, non-finite config numbers, stored recipes that
assign what cannot be quantized, pickles that try to run code, weight names that are not regular files, and the
plugin messages a user acts on."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import sys
from pathlib import Path

import pytest
import qcore
import torch
from qcore import plugins
from qcore.checkpoint import CheckpointReader
from qcore.testing import logits

sys.path.insert(0, str(Path(__file__).parent))

import toy_backend  # noqa: E402

TOY = {"quant_method": "toy_int8"}


def copy_with(src: Path, dst: Path, **changes) -> Path:
    """A copy of checkpoint ``src`` whose config.json has ``changes`` laid over it (``None`` deletes a key)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return dst


# -- files that cannot be read ------------------------------------------------------------------------------


def refuse_reading(monkeypatch, path: Path) -> None:
    """Make every read of ``path`` fail as an unreadable file does (tests may run as root, where chmod does not)."""
    denied = PermissionError(13, "Permission denied", str(path))
    read_text, open_ = pathlib.Path.read_text, pathlib.Path.open

    def guarded_read_text(self, *args, **kwargs):
        if self == path:
            raise denied
        return read_text(self, *args, **kwargs)

    def guarded_open(self, *args, **kwargs):
        if self == path:
            raise denied
        return open_(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", guarded_read_text)
    monkeypatch.setattr(pathlib.Path, "open", guarded_open)


def test_unreadable_config_json_is_a_checkpoint_error_naming_it(llama, tmp_path, monkeypatch):
    directory = copy_with(llama, tmp_path / "c")
    refuse_reading(monkeypatch, directory / "config.json")
    with pytest.raises(qcore.CheckpointError, match="cannot be read .*Permission denied.*check its permissions") as e:
        qcore.from_pretrained(directory)
    assert e.value.file == str(directory / "config.json")


def test_unreadable_weight_file_is_a_checkpoint_error_naming_it(llama, tmp_path, monkeypatch):
    directory = copy_with(llama, tmp_path / "c")
    refuse_reading(monkeypatch, directory / "model.safetensors")
    with pytest.raises(qcore.CheckpointError, match="Permission denied") as caught:
        qcore.from_pretrained(directory)
    assert caught.value.file == str(directory / "model.safetensors")


@pytest.mark.parametrize("how", ["stream", "read"])
def test_a_weight_file_that_becomes_unreadable_while_loading_is_a_checkpoint_error(llama, tmp_path, monkeypatch, how):
    directory = copy_with(llama, tmp_path / "c")
    reader = CheckpointReader(directory)  # headers checked while the file was readable
    refuse_reading(monkeypatch, directory / "model.safetensors")
    with pytest.raises(qcore.CheckpointError, match="cannot be read .*Permission denied") as caught:
        list(reader.stream()) if how == "stream" else reader.read(next(iter(reader.tensors)))
    assert caught.value.file == str(directory / "model.safetensors") and caught.value.tensor is not None


def test_unreadable_generation_config_is_a_checkpoint_error_naming_it(llama, tmp_path):
    directory = copy_with(llama, tmp_path / "c")
    (directory / "generation_config.json").write_text("{not json")
    with pytest.raises(qcore.CheckpointError) as caught:
        qcore.from_pretrained(directory)
    assert caught.value.file == str(directory / "generation_config.json")


# -- weight names that are not regular files ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["directory", "FIFO", "character device"])
def test_weight_name_that_is_not_a_regular_file_says_so(llama, tmp_path, kind):
    directory = tmp_path / "c"
    directory.mkdir()
    shutil.copy(llama / "config.json", directory / "config.json")
    weights = directory / "model.safetensors"
    if kind == "directory":
        weights.mkdir()
    elif kind == "FIFO":
        os.mkfifo(weights)  # opening it would block: the loader must only stat it
    else:
        weights.symlink_to("/dev/null")
    with pytest.raises(qcore.CheckpointError, match=f"exists but is not a regular file \\(it is a {kind}\\)") as e:
        qcore.from_pretrained(directory)
    assert e.value.file == str(weights)


def test_shard_that_is_not_a_regular_file_says_so(llama, tmp_path):
    directory = tmp_path / "c"
    directory.mkdir()
    shutil.copy(llama / "config.json", directory / "config.json")
    # Any tensor name will do: the shard is refused before its header is read.
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00001-of-00001.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "model-00001-of-00001.safetensors").mkdir()
    with pytest.raises(qcore.CheckpointError, match="exists but is not a regular file \\(it is a directory\\)"):
        qcore.from_pretrained(directory)


# -- architectures --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["AutoTokenizer", "logging", "GPT2LMHeadModel", "__class__", "NoSuchModelForCausalLM", "LlamaConfig"]
)
@pytest.mark.parametrize("allow_unexpected", [False, True])
def test_architectures_must_name_a_model_class_of_the_model_type(llama, tmp_path, name, allow_unexpected):
    directory = copy_with(llama, tmp_path / "c", architectures=[name])
    with pytest.raises(qcore.ConfigError, match=f"field 'architectures' names {name!r}, which is not a transformers"):
        qcore.from_pretrained(directory, allow_unexpected=allow_unexpected)


def test_architectures_given_as_a_string_names_the_field(llama, tmp_path):
    directory = copy_with(llama, tmp_path / "c", architectures="LlamaForCausalLM")
    with pytest.raises(qcore.ConfigError, match="field 'architectures' must be a list of model class names"):
        qcore.from_pretrained(directory)


def test_architectures_of_the_model_type_load_and_none_falls_back_to_the_base_model(llama, tmp_path):
    assert type(qcore.from_pretrained(llama)).__name__ == "LlamaForCausalLM"
    # The base model has no place for lm_head.weight, hence allow_unexpected.
    directory = copy_with(llama, tmp_path / "c", architectures=None)
    assert type(qcore.from_pretrained(directory, allow_unexpected=True)).__name__ == "LlamaModel"


def test_a_config_value_the_model_rejects_is_a_config_error(llama, tmp_path):
    directory = copy_with(llama, tmp_path / "c", hidden_act="no-such-activation")
    with pytest.raises(qcore.ConfigError, match="transformers cannot build LlamaForCausalLM from it .*KeyError"):
        qcore.from_pretrained(directory)


@pytest.mark.parametrize("name", ["_inductor", "has_cuda", "onnx", "torch.float16", "float16; import os"])
@pytest.mark.parametrize("field", ["dtype", "torch_dtype"])
def test_dtype_names_in_config_json_come_from_a_fixed_table(llama, tmp_path, field, name):
    # torch's module __getattr__ imports a submodule (or calls a function) for some names; transformers looks the
    # name up there, so only known dtype names may reach it.
    directory = copy_with(llama, tmp_path / "c", **{"dtype": None, field: name})
    with pytest.raises(qcore.ConfigError, match=f"field '{field}' must be a dtype name"):
        qcore.from_pretrained(directory)
    with pytest.raises(qcore.ConfigError, match="dtype must be a floating torch dtype"):
        qcore.from_pretrained(llama, dtype="_inductor")


# -- config values ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused_in_every_config_field(llama, tmp_path, number):
    user = json.loads(f'{{"quant_method": "bitsandbytes", "load_in_8bit": true, "llm_int8_threshold": {number}}}')
    with pytest.raises(qcore.ConfigError, match="field 'llm_int8_threshold' must be a finite number"):
        qcore.from_pretrained(llama, user)
    nested = json.loads(f'{{"quant_method": "hqq", "dynamic_config": {{"mlp.up_proj": {{"group_size": {number}}}}}}}')
    with pytest.raises(qcore.ConfigError, match=r"field \"dynamic_config\['mlp.up_proj'\]\['group_size'\]\""):
        qcore.QuantConfig.from_dict(nested)
    stored = json.loads((llama / "config.json").read_text())
    stored["quantization_config"] = user
    (tmp_path / "config.json").write_text(json.dumps(stored))  # Python's json writes NaN/Infinity as such
    directory = copy_with(llama, tmp_path / "stored")
    shutil.copy(tmp_path / "config.json", directory / "config.json")
    with pytest.raises(qcore.ConfigError, match="must be a finite number"):
        qcore.from_pretrained(directory)


def test_non_finite_numbers_are_refused_in_a_config_built_in_code(toy):
    with pytest.raises(qcore.ConfigError, match="field 'modules_to_not_convert\\[0\\]' must be a finite number"):
        toy_backend.ToyConfig(modules_to_not_convert=[float("nan")])  # type: ignore[list-item]


def test_a_stored_recipe_assigning_an_embedding_names_the_module(llama, tmp_path, toy):
    saved = tmp_path / "saved"
    qcore.save_pretrained(qcore.from_pretrained(llama, {"rules": [{"pattern": "*.q_proj", "config": TOY}]}), saved)
    config = json.loads((saved / "config.json").read_text())
    config["quantization_config"]["modules"]["model.embed_tokens"] = 0
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(qcore.CheckpointError, match="assigns module 'model.embed_tokens' \\(Embedding\\) to toy_int8"):
        qcore.from_pretrained(saved)


# -- pickles that try to run code -------------------------------------------------------------------------


class RunsAShellCommand:
    """A pickle payload calling ``os.system``: torch refuses it as from a blocked module, in other words."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize(
    "save_kwargs",
    [{}, {"pickle_protocol": 4}, {"_use_new_zipfile_serialization": False}],
    ids=["zip, protocol 2", "zip, protocol 4 (STACK_GLOBAL)", "legacy format"],
)
def test_a_pickle_calling_a_blocked_function_is_reported_as_trying_to_run_code(llama, tmp_path, save_kwargs):
    from safetensors.torch import load_file

    marker = tmp_path / "ran"
    directory = copy_with(llama, tmp_path / "c")
    (directory / "model.safetensors").unlink()
    state = {**load_file(llama / "model.safetensors"), "model.norm.weight": RunsAShellCommand(marker)}
    torch.save(state, directory / "pytorch_model.bin", **save_kwargs)
    with pytest.raises(qcore.CheckpointError) as caught:
        qcore.from_pretrained(directory, allow_pickle=True)
    assert not marker.exists()
    message = str(caught.value)
    assert f"the file tried to run code: its pickle asks to import and call {os.system.__module__}.system" in message
    assert "download it again" not in message and "weights_only=False" not in message


def test_a_plain_protocol_4_pickle_torch_cannot_read_is_called_unreadable_not_code(llama, tmp_path):
    from safetensors.torch import load_file

    directory = copy_with(llama, tmp_path / "c")
    (directory / "model.safetensors").unlink()
    torch.save(load_file(llama / "model.safetensors"), directory / "pytorch_model.bin", pickle_protocol=4)
    try:
        model = qcore.from_pretrained(directory, allow_pickle=True)
    except qcore.CheckpointError as error:
        assert "tried to run code" not in str(error) and "not a plain PyTorch state dict" in str(error)
    else:
        assert torch.equal(logits(model), logits(qcore.from_pretrained(llama)))


# -- plugins: messages a user acts on ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("QCORE_LOAD_PLUGINS", "nope", "QCORE_LOAD_PLUGINS=nope does not list it; add qcore-bnb to it"),
        ("QCORE_DISABLE_PLUGIN_AUTOLOAD", "1", "QCORE_DISABLE_PLUGIN_AUTOLOAD=1 turns off loading installed plugins"),
    ],
)
def test_an_installed_plugin_excluded_by_the_environment_is_named_with_the_variable(
    llama, monkeypatch, variable, value, named
):
    monkeypatch.setenv(variable, value)
    plugins.reset_plugins()
    try:
        with pytest.raises(qcore.ConfigError) as caught:
            qcore.from_pretrained(llama, {"quant_method": "bitsandbytes", "load_in_8bit": True})
    finally:
        monkeypatch.undo()
        plugins.reset_plugins()
    message = str(caught.value)
    assert "The plugin qcore-bnb is installed but was not loaded" in message and named in message
    assert "pip install qcore-bnb" not in message


@pytest.mark.parametrize("prefer", [None, "toy_int8=qcore-toy-b"])
def test_each_load_logs_which_distribution_served_a_method_several_claim(llama, monkeypatch, caplog, prefer):
    if prefer:
        monkeypatch.setenv("QCORE_PREFER", prefer)
    names = [qcore.register_plugin(toy_backend.ToyPlugin(), f"toy-{x}", distribution=f"qcore-toy-{x}") for x in "ab"]
    try:
        with caplog.at_level(logging.INFO, logger="qcore"):
            qcore.from_pretrained(llama, TOY)
    finally:
        for name in names:
            qcore.unregister_plugin(name)
    winner, other = ("qcore-toy-b", "qcore-toy-a") if prefer else ("qcore-toy-a", "qcore-toy-b")
    records = [r for r in caplog.records if "quant_method 'toy_int8' is served by" in r.getMessage()]
    assert len(records) == 1
    assert f"served by {winner} " in records[0].getMessage() and f"also claimed by {other}" in records[0].getMessage()
    assert records[0].levelno == (logging.INFO if prefer else logging.WARNING)
