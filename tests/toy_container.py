"""A test-only container format, ``.toyc``, and the plugin that reads it.

A ``.toyc`` file is a safetensors file whose names carry a ``toyc.`` prefix (so the reader must map them to the
transformers naming), whose ``__metadata__`` holds the model's config as JSON (so the container carries the config,
as GGUF does), and whose embedding is stored in a type of its own, ``TOY8``: int8 codes plus a float32 scale
(``<name>.scale``), decoded by :meth:`ToyContainer.to_plain`.
"""

from __future__ import annotations

import json
from pathlib import Path

import qcore
from qcore import hookimpl
from qcore.checkpoint import CheckpointSource, TensorInfo, read_header

PREFIX = "toyc."
EMBEDDING = "model.embed_tokens.weight"
READS: list[str] = []
#: The dtype the loader asked each ``to_plain`` call for.
DECODED_AS: list = []


def write(reference: Path, file: Path) -> Path:
    """Write the tiny llama checkpoint ``reference`` as a ``.toyc`` file (its embedding rounded onto the TOY8 grid)."""
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(reference / "model.safetensors")
    embedding = state.pop(EMBEDDING).to(torch.float32)
    scale = embedding.abs().max() / 127
    tensors = {PREFIX + name: tensor for name, tensor in state.items()}
    tensors[PREFIX + EMBEDDING] = torch.round(embedding / scale).to(torch.int8)
    tensors[PREFIX + EMBEDDING + ".scale"] = scale.reshape(())
    config = json.loads((reference / "config.json").read_text())
    save_file(tensors, file, metadata={"config": json.dumps(config)})
    return file


class ToyContainer(CheckpointSource):
    def __init__(self, path: Path):
        infos, metadata = read_header(path)  # the safetensors checks, before any tensor is read
        self.directory, self.files, self.metadata = path.parent, [path], {}
        self._stored = {info.name.removeprefix(PREFIX): info for info in infos.values()}
        self._config = json.loads(metadata["config"])
        self.tensors = {}
        for name, info in self._stored.items():
            if name == EMBEDDING + ".scale":
                continue
            dtype, nbytes = ("TOY8", info.nbytes + 4) if name == EMBEDDING else (info.dtype, info.nbytes)
            self.tensors[name] = TensorInfo(name, path, dtype, info.shape, info.offset, nbytes)

    def model_config(self):
        from transformers import AutoConfig

        config = dict(self._config)
        return AutoConfig.for_model(config.pop("model_type"), **config)

    def read(self, name):
        from safetensors import safe_open

        READS.append(name)
        with safe_open(self.files[0], "pt") as handle:
            return handle.get_tensor(PREFIX + name)

    def to_plain(self, name, tensor, dtype):
        import torch

        DECODED_AS.append(dtype)
        return (tensor.to(torch.float32) * self.read(name + ".scale")).to(dtype)


def decoded_embedding(file: Path):
    """The embedding a load of ``file`` must hold: its codes times its scale, in float32."""
    import torch
    from safetensors.torch import load_file

    state = load_file(file)
    return state[PREFIX + EMBEDDING].to(torch.float32) * state[PREFIX + EMBEDDING + ".scale"]


def open_toyc(path: Path) -> ToyContainer:
    return ToyContainer(path)


class ContainerPlugin:
    def __init__(self, factory=open_toyc):
        self.factory = factory

    @hookimpl
    def register_backend(self):
        return qcore.Backend(name="toyc", configs={}, readers={".toyc": self.factory})
