"""qcore-quanto: optimum-quanto's int2/int4/int8/float8 weight quantization while loading, computed on qcore's kernel
layer (quanto's C++ extension is never built), saved as safetensors whose config.json maps every module; quanto's own
``safetensors + quantization map`` checkpoints load through :func:`quanto_checkpoint`.

The entry point is :mod:`qcore_quanto.plugin`; :class:`QuantoConfig` is the ``quantization_config`` it serves.
Importing this package imports neither torch nor optimum-quanto.
"""

from qcore_quanto.config import QuantoConfig

__all__ = ["QuantoConfig", "quanto_checkpoint"]


def quanto_checkpoint(directory, qmap: str = "quanto_qmap.json"):
    """Open optimum-quanto's own checkpoint directory for ``qcore.from_pretrained`` (see
    :func:`qcore_quanto.reader.quanto_checkpoint`); imports torch when called."""
    from qcore_quanto.reader import quanto_checkpoint as open_checkpoint

    return open_checkpoint(directory, qmap)
