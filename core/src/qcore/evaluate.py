"""Perplexity of a loaded model on real text: the "verify quantization" step after a load.

It sits after the six phases: it takes a finished model (quantized or not) and measures it. The computation is the
sliding-window perplexity of the transformers documentation: the text is tokenized once, windows of ``window``
tokens start every ``stride`` tokens, and each window scores only the tokens the previous window did not, with the
window's earlier tokens as context. A model scored this way by qcore and by a plain transformers loop over the same
windows gets the same number (``tests/test_evaluate.py`` checks it to the last digit in float32).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from qcore.errors import ConfigError

__all__ = ["Perplexity", "perplexity", "encode_texts", "DEFAULT_WINDOW", "DEFAULT_STRIDE"]

#: Tokens a window holds, unless the model's context is shorter.
DEFAULT_WINDOW = 512
#: Tokens between window starts: each scored token then has at least ``window - stride`` tokens of context.
DEFAULT_STRIDE = 256


@dataclasses.dataclass(frozen=True)
class Perplexity:
    """The result of :func:`perplexity`."""

    #: ``exp`` of the mean negative log-likelihood per scored token.
    perplexity: float
    #: Mean negative log-likelihood per scored token, in nats.
    nll: float
    #: Tokens scored: every token but the text's first when windows overlap (``stride < window``); without
    #: overlap, each window's first token has no context and is not scored.
    tokens: int
    window: int
    stride: int
    #: Seconds spent in the model's forward passes.
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


def encode_texts(tokenizer: Any, texts: Sequence[str], *, max_tokens: int | None = None) -> Any:
    """Token ids ``[1, n]`` of ``texts`` joined by blank lines (as the usual wikitext evaluation joins articles)."""
    if isinstance(texts, str):
        texts = [texts]
    if not texts or not any(text.strip() for text in texts):
        raise ConfigError("no text to evaluate on: give at least one non-empty text")
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids
    return ids[:, :max_tokens] if max_tokens is not None else ids


def perplexity(
    model: Any,
    tokenizer: Any = None,
    texts: Sequence[str] | None = None,
    *,
    input_ids: Any = None,
    window: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Perplexity:
    """Sliding-window perplexity of ``model`` on ``texts`` (tokenized with ``tokenizer``) or on ``input_ids``.

    :param texts: the text to score; with neither texts nor ``input_ids``, the held-out part of qcore's built-in
        corpus (text calibration never sees).
    :param input_ids: token ids ``[1, n]`` instead of texts.
    :param window: tokens per forward pass; default :data:`DEFAULT_WINDOW`, capped at the model's context length.
    :param stride: tokens between window starts; default :data:`DEFAULT_STRIDE`, at most ``window``.
    :param max_tokens: score only the first ``max_tokens`` tokens of the text.
    :param progress: called as ``progress(tokens_done, tokens_total)`` after each window.
    """
    import torch

    if input_ids is None:
        if tokenizer is None:
            raise ConfigError("perplexity needs a tokenizer to encode texts, or input_ids")
        if texts is None:
            from qcore.corpus import evaluation_texts

            texts = evaluation_texts()
        input_ids = encode_texts(tokenizer, texts, max_tokens=max_tokens)
    elif max_tokens is not None:
        input_ids = input_ids[:, :max_tokens]
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    length = input_ids.shape[1]
    if length < 2:
        raise ConfigError(f"the text has {length} token(s); perplexity needs at least 2")
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    window = window or min(DEFAULT_WINDOW, context or DEFAULT_WINDOW)
    stride = stride or min(DEFAULT_STRIDE, window)
    if context is not None and window > context:
        raise ConfigError(f"window {window} is longer than the model's context of {context} tokens; pass a smaller one")
    if not 0 < stride <= window:
        raise ConfigError(f"stride must be between 1 and the window ({window}), got {stride}")

    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    nll_sum = torch.zeros((), dtype=torch.float64)
    scored = 0
    previous_end = 0
    seconds = 0.0
    with torch.no_grad():
        for begin in range(0, length, stride):
            end = min(begin + window, length)
            target_length = end - previous_end  # tokens not scored by an earlier window
            ids = input_ids[:, begin:end].to(device)
            labels = ids.clone()
            labels[:, :-target_length] = -100
            started = time.perf_counter()
            loss = model(ids, labels=labels).loss
            seconds += time.perf_counter() - started
            # The model shifts labels by one, so the loss averages over the labels after the first position. (The
            # transformers guide subtracts one per row from every window's count, which is exact only for the
            # first window: later windows' first label is already masked.)
            count = int((labels[:, 1:] != -100).sum())
            nll_sum += loss.double() * count
            scored += count
            previous_end = end
            if progress is not None:
                progress(end, length)
            if end == length:
                break
    nll = float(nll_sum / scored)
    return Perplexity(math.exp(nll), nll, scored, window, stride, seconds)
