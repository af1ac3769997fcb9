"""Checkpoint sources: the reader interface, its two built-in providers, and a container reader a plugin declares."""

from __future__ import annotations

import json
import shutil

import pytest
import qcore
import tiny_models
import torch
import toy_backend
import toy_container
from click.testing import CliRunner
from qcore.checkpoint import CheckpointReader, CheckpointSource, PickleReader, open_checkpoint
from qcore.cli import cli

TOY = {"quant_method": "toy_int8"}


@pytest.fixture
def container():
    plugin = toy_container.ContainerPlugin()
    qcore.register_plugin(plugin, "toyc")
    toy_container.READS.clear()
    yield plugin
    qcore.unregister_plugin("toyc")


@pytest.fixture(scope="module")
def toyc(checkpoints, tmp_path_factory):
    """A directory holding only ``model.toyc`` (no config.json: the container carries it)."""
    directory = tmp_path_factory.mktemp("toyc")
    toy_container.write(checkpoints["llama"], directory / "model.toyc")
    return directory


def expected_logits(llama, toyc, config=None):
    """The logits of the safetensors checkpoint with the embedding the container stores, loaded the usual way."""
    model = qcore.from_pretrained(llama, config)
    embedding = toy_container.decoded_embedding(toyc / "model.toyc")
    model.model.embed_tokens.weight.data = embedding.to(model.model.embed_tokens.weight.dtype)
    return tiny_models.logits(model)


@pytest.mark.parametrize("where", ["file", "directory"])
def test_a_container_file_or_its_directory_loads_with_the_config_it_carries(llama, toyc, container, where):
    model = qcore.from_pretrained(toyc / "model.toyc" if where == "file" else toyc)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert torch.equal(tiny_models.logits(model), expected_logits(llama, toyc))


def test_a_container_quantizes_on_the_fly_like_safetensors(llama, toyc, container, toy):
    model = qcore.from_pretrained(toyc / "model.toyc", TOY)
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "ToyLinear"
    assert torch.equal(tiny_models.logits(model), expected_logits(llama, toyc, TOY))


def test_the_reader_decodes_straight_into_the_dtype_the_model_holds(toyc, container):
    toy_container.DECODED_AS.clear()
    model = qcore.from_pretrained(toyc / "model.toyc", dtype=torch.float16)
    assert [torch.float16] == toy_container.DECODED_AS  # the embedding slot's dtype, so no float32 copy is made
    assert model.model.embed_tokens.weight.dtype == torch.float16


def test_the_stored_type_of_a_tensor_no_backend_takes_is_decoded_by_the_reader(toyc, container):
    source = open_checkpoint(toyc)
    info = source.tensors[toy_container.EMBEDDING]
    assert (info.dtype, info.is_plain, info.shape) == ("TOY8", False, (256, 64))
    assert info.nbytes == 256 * 64 + 4
    assert isinstance(source, CheckpointSource) and not isinstance(source, CheckpointReader)


def test_validate_and_the_fit_check_run_before_any_tensor_is_read(toyc, container, toy, monkeypatch):
    read = toy_container.ToyContainer.read
    monkeypatch.setattr(
        toy_container.ToyContainer,
        "read",
        lambda self, name: toy_backend.CALLS.append(("read", name)) or read(self, name),
    )
    qcore.from_pretrained(toyc, TOY)
    phases = [call[0] for call in toy_backend.CALLS]
    assert phases[0] == "validate" and phases.index("read") > phases.index("preprocess_model")

    source = open_checkpoint(toyc)
    config = source.model_config()
    config.intermediate_size = 96  # the stored MLP weights are 128 wide
    monkeypatch.setattr(source, "model_config", lambda: config)
    toy_container.READS.clear()
    with pytest.raises(qcore.CheckpointError, match="does not fit"):
        qcore.from_pretrained(source, TOY)
    assert toy_container.READS == []


def test_gguf_file_picks_one_of_several_container_files(llama, toyc, container, tmp_path):
    directory = shutil.copytree(toyc, tmp_path / "two")
    shutil.copyfile(toyc / "model.toyc", directory / "other.toyc")
    with pytest.raises(qcore.CheckpointError, match="several weight files .*gguf_file=NAME"):
        qcore.from_pretrained(directory)
    model = qcore.from_pretrained(directory, gguf_file="other.toyc")
    assert torch.equal(tiny_models.logits(model), expected_logits(llama, toyc))


def test_a_weight_file_name_leaving_the_directory_is_refused(toyc, container, tmp_path):
    with pytest.raises(qcore.CheckpointError, match="path traversal"):
        qcore.from_pretrained(toyc, gguf_file="../elsewhere.toyc")
    outside = tmp_path / "outside.toyc"
    shutil.copyfile(toyc / "model.toyc", outside)
    link_dir = tmp_path / "links"
    link_dir.mkdir()
    (link_dir / "model.toyc").symlink_to(outside)
    with pytest.raises(qcore.CheckpointError, match="symlink leaving the checkpoint directory"):
        qcore.from_pretrained(link_dir)


def test_a_hostile_container_header_is_refused_by_the_readers_checks(toyc, container, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.toyc").write_bytes((toyc / "model.toyc").read_bytes()[:-10])
    with pytest.raises(qcore.CheckpointError, match="model.toyc"):
        qcore.from_pretrained(broken)


def test_a_suffix_no_plugin_reads_names_the_plugin_to_install(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(
        qcore.CheckpointError, match="no installed qcore plugin reads .gguf files; pip install qcore-gguf"
    ):
        open_checkpoint(tmp_path / "model.gguf", readers={})
    (tmp_path / "model.xyz").write_bytes(b"")
    with pytest.raises(qcore.CheckpointError, match="install a qcore plugin for it"):
        open_checkpoint(tmp_path / "model.xyz", readers={})


def test_a_reader_that_fails_or_returns_something_else_is_a_plugin_error(toyc):
    def broken(path):
        raise ValueError("reader bug")

    for factory, message in (
        (broken, "reader bug"),
        (lambda path: object(), "not a qcore.checkpoint.CheckpointSource"),
    ):
        with pytest.raises(qcore.PluginError, match=message) as caught:
            open_checkpoint(toyc, readers={".toyc": ("qcore-toyc", factory)})
        assert caught.value.plugin == "qcore-toyc" and caught.value.phase == "reader"


def test_a_container_reader_imports_nothing_at_registration(container):
    import importlib

    assert "toyc" in [info.name for info in qcore.backends()]
    backend = toy_container.ContainerPlugin().register_backend()
    assert set(backend.readers) == {".toyc"}
    assert importlib.import_module("qcore.plugins").readers()[".toyc"][0] == "toyc"


def test_qcore_inspect_describes_a_container_file(toyc, container):
    result = CliRunner().invoke(cli, ["inspect", str(toyc / "model.toyc"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["architecture"] == "LlamaForCausalLM" and report["files"] == ["model.toyc"]
    embedding = next(row for row in report["modules"] if row["kind"] == "embed_tokens")
    assert embedding["dtypes"] == ["TOY8"]
    assert toy_container.READS == []


def test_the_two_built_in_providers_share_the_interface(llama, tmp_path):
    from safetensors.torch import load_file

    safetensors = open_checkpoint(llama)
    assert isinstance(safetensors, CheckpointReader) and isinstance(safetensors, CheckpointSource)
    name = "model.norm.weight"
    assert torch.equal(safetensors.read(name), load_file(llama / "model.safetensors")[name])
    directory = tmp_path / "bin"
    directory.mkdir()
    shutil.copyfile(llama / "config.json", directory / "config.json")
    torch.save(load_file(llama / "model.safetensors"), directory / "pytorch_model.bin")
    with pytest.raises(qcore.CheckpointError, match="refuses pickle by default"):
        open_checkpoint(directory)
    pickled = open_checkpoint(directory, allow_pickle=True)
    assert isinstance(pickled, PickleReader) and pickled.tensors.keys() == safetensors.tensors.keys()
    assert torch.equal(pickled.read(name), safetensors.read(name))
    assert dict(pickled.stream({name})).keys() == {name}


def test_a_checkpoint_source_can_be_handed_to_from_pretrained(llama):
    model = qcore.from_pretrained(open_checkpoint(llama))
    assert torch.equal(tiny_models.logits(model), tiny_models.logits(qcore.from_pretrained(llama)))


def test_shards_that_disagree_on_a_metadata_entry_are_refused(llama, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(llama / "model.safetensors")
    names = sorted(state)
    directory = tmp_path / "sharded"
    directory.mkdir()
    shutil.copyfile(llama / "config.json", directory / "config.json")
    halves = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2 :]}
    for file, keys in halves.items():
        save_file({k: state[k] for k in keys}, directory / file, metadata={"format": "pt", "run": file})
    index = {"weight_map": {k: file for file, keys in halves.items() for k in keys}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(qcore.CheckpointError, match="__metadata__ entry 'run' differs"):
        open_checkpoint(directory)
