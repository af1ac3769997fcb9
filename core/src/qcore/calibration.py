"""Calibration through the streaming load: decoder blocks one at a time, with the calibration batch's activations.

Phase 4 of a load whose config needs calibration (``QuantConfig.needs_calibration``, e.g. GPTQ) runs here instead
of the tensor-by-tensor stream: the tensors outside the decoder blocks are loaded first; the calibration batch is
run through the model up to the first block, whose inputs are captured; then, for each block in model order, its
tensors are read (at random from the shards), the calibrating backends' modules placed in full precision, and the
``calibrate_block`` hook quantizes them from :class:`BlockInputs`; the core runs the quantized block to make the next
block's inputs and lets the full-precision tensors go. Peak memory: the quantized model, one block in full
precision, and the activations of the calibration batch (one hidden-state tensor per sequence).

Calibration data is the ``calibration=`` argument of :func:`qcore.from_pretrained` (texts, or token ids), or by
default :func:`qcore.corpus.calibration_texts`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from qcore.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["BlockInputs", "calibration_batch", "decoder_blocks", "capture_inputs", "SEQUENCE_LENGTH", "SEQUENCES"]

#: Tokens per calibration sequence (capped at the model's context length) when the data is text.
SEQUENCE_LENGTH = 512
#: Sequences cut from calibration text, at most.
SEQUENCES = 128


@dataclasses.dataclass
class BlockInputs:
    """The calibration batch's inputs to one decoder block, exactly as the model passes them to it.

    One entry per calibration sequence: ``args[i]`` the positional arguments (the hidden states first, unless the
    model passes them by keyword) and ``kwargs[i]`` the keyword arguments (attention mask, position embeddings,
    position ids, ...), on the block's device.
    """

    args: list[tuple[Any, ...]]
    kwargs: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.args)

    def __iter__(self) -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
        return iter(zip(self.args, self.kwargs, strict=True))

    def hidden_states(self) -> list[torch.Tensor]:
        """The hidden states going into the block, one ``[1, tokens, hidden]`` tensor per sequence."""
        return [args[0] if args else kwargs["hidden_states"] for args, kwargs in self]

    def run(self, module: nn.Module | Callable[..., Any]) -> list[torch.Tensor]:
        """Run ``module`` (the block, or anything taking the block's arguments) on every sequence, without
        gradients; returns its hidden-states output per sequence (the first element when it returns a tuple)."""
        import torch

        outputs = []
        with torch.no_grad():
            for args, kwargs in self:
                output = module(*args, **kwargs)
                outputs.append(output[0] if isinstance(output, (tuple, list)) else output)
        return outputs

    def advanced(self, hidden_states: Sequence[torch.Tensor]) -> BlockInputs:
        """The inputs of the next block: the same arguments with these hidden states in place of this block's."""
        args, kwargs = [], []
        for (old_args, old_kwargs), hidden in zip(self, hidden_states, strict=True):
            if old_args:
                args.append((hidden, *old_args[1:]))
                kwargs.append(old_kwargs)
            else:
                args.append(())
                kwargs.append({**old_kwargs, "hidden_states": hidden})
        return BlockInputs(args, kwargs)


def calibration_batch(data: Any, tokenizer_source: Any, context_length: int | None) -> list[torch.Tensor]:
    """The calibration sequences, one ``[1, tokens]`` int64 tensor each, from what the user passed.

    :param data: ``None`` (the built-in corpus), a string or a sequence of strings (tokenized with the checkpoint's
        tokenizer and cut into sequences of :data:`SEQUENCE_LENGTH` tokens), a 2-D tensor ``[sequences, tokens]``,
        or a sequence of 1-D token-id tensors or lists.
    :param tokenizer_source: where to load a tokenizer from, for text.
    :param context_length: the model's maximum sequence length, if known.
    :raises ConfigError: empty data, a sequence shorter than two tokens, text without a tokenizer.
    """
    import torch

    if data is None:
        from qcore.corpus import calibration_texts

        data = calibration_texts()
    if isinstance(data, str):
        data = [data]
    if isinstance(data, torch.Tensor):
        data = list(data.unsqueeze(0) if data.dim() == 1 else data)
    if not isinstance(data, Sequence) or len(data) == 0:
        raise ConfigError(
            "calibration data is empty; pass texts or token ids as calibration=, or leave it out for the built-in "
            "corpus"
        )
    if all(isinstance(item, str) for item in data):
        sequences = _tokenized(list(data), tokenizer_source, context_length)
    else:
        sequences = []
        for number, item in enumerate(data):
            try:
                ids = torch.as_tensor(item, dtype=torch.long)
            except (TypeError, ValueError, RuntimeError) as error:
                raise ConfigError(
                    f"calibration item {number} is neither text nor token ids ({type(item).__name__}: {error})"
                ) from None
            sequences.append(ids.reshape(1, -1))
    short = [number for number, ids in enumerate(sequences) if ids.shape[1] < 2]
    if short or not sequences:
        raise ConfigError(
            f"calibration sequence {short[0] if short else 0} has fewer than 2 tokens; each sequence needs at least "
            f"2 (pass longer texts, or more of them)"
        )
    return sequences


def _tokenized(texts: list[str], source: Any, context_length: int | None) -> list[torch.Tensor]:
    import torch

    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as error:  # no tokenizer files, or ones transformers cannot read: both mean "pass ids"
        raise ConfigError(
            f"calibration texts need the checkpoint's tokenizer, which cannot be loaded from {source} "
            f"({type(error).__name__}); pass token ids as calibration= instead"
        ) from None
    length = min(SEQUENCE_LENGTH, context_length or SEQUENCE_LENGTH)
    ids = tokenizer("\n\n".join(texts), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    count = min(SEQUENCES, max(1, len(ids) // length))
    return [ids[i * length : (i + 1) * length].reshape(1, -1).to(torch.long) for i in range(count)]


# -- the decoder blocks ---------------------------------------------------------------------------------------


def decoder_blocks(model: nn.Module, candidates: Sequence[str]) -> list[str]:
    """The names of the model's decoder blocks, in model order: the children of the ``nn.ModuleList`` that holds
    the most Linear candidates (``model.layers``, ``transformer.h``).

    :raises ConfigError: no module list holds a Linear, so the model cannot be calibrated block by block.
    """
    from torch import nn

    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module):
            count = sum(c.startswith(f"{name}.") for c in candidates)
            if count > best_count:
                best, best_count = name, count
    if best is None:
        raise ConfigError(
            f"{type(model).__name__} has no list of decoder blocks holding Linear layers (such as model.layers); a "
            f"config that needs calibration cannot be applied to it: choose a method that does not"
        )
    return [f"{best}.{index}" for index in range(len(model.get_submodule(best)))]


def block_lookup(blocks: Sequence[str]) -> Callable[[str], str | None]:
    """A function from a module name to the decoder block holding it (``None`` outside every block)."""
    names = set(blocks)

    def block_of(module_name: str) -> str | None:
        parts = module_name.split(".")
        for cut in range(len(parts), 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in names:
                return prefix
        return None

    return block_of


def modules_by_block(modules: Sequence[str], blocks: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Block name -> the ``modules`` inside it, in order (modules outside every block are left out)."""
    block_of = block_lookup(blocks)
    grouped: dict[str, list[str]] = {}
    for name in modules:
        block = block_of(name)
        if block is not None:
            grouped.setdefault(block, []).append(name)
    return {block: tuple(names) for block, names in grouped.items()}


def context_length(model_config: Any) -> int | None:
    """The model's maximum sequence length, under the names transformers configs use for it."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# -- activations ------------------------------------------------------------------------------------------------


class _Captured(Exception):
    """Raised from the first block's pre-hook once its inputs are recorded: nothing after it needs to run."""


def capture_inputs(model: nn.Module, first_block: nn.Module, sequences: Sequence[torch.Tensor]) -> BlockInputs:
    """Run each calibration sequence through ``model`` up to ``first_block`` and record what it is called with.

    Only the modules before the first block run (embeddings, rotary tables); the blocks themselves, still on the
    meta device, never do.
    """
    import torch

    args: list[tuple[Any, ...]] = []
    kwargs: list[dict[str, Any]] = []

    def record(module: nn.Module, positional: tuple[Any, ...], keywords: dict[str, Any]) -> None:
        args.append(tuple(positional))
        kwargs.append(dict(keywords))
        raise _Captured

    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    handle = first_block.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in sequences:
                try:
                    model(input_ids=ids.to(device), use_cache=False)
                except _Captured:
                    continue
                raise ConfigError(
                    f"{type(model).__name__}'s forward never reached its first decoder block; it cannot be "
                    f"calibrated block by block"
                )
    finally:
        handle.remove()
    return BlockInputs(args, kwargs)


def moved(inputs: BlockInputs, device: torch.device) -> BlockInputs:
    """``inputs`` with every tensor on ``device`` (the same object when they all are already)."""
    import torch

    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, (tuple, list)):
            return type(value)(move(v) for v in value)
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        return value

    hidden = inputs.hidden_states()
    if all(h.device == device for h in hidden):
        return inputs
    return BlockInputs([move(a) for a in inputs.args], [move(k) for k in inputs.kwargs])
