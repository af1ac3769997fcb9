"""Per-layer sensitivity of a model to each candidate preset, and the automatic recipe under a memory budget.

Both use only the public loader: each candidate is loaded once with :func:`qcore.from_pretrained`; every quantized
Linear is then fed the inputs its full-precision counterpart saw on the same batch, and its output error ``dy``
measured in isolation. Two measures of that error:

* ``"loss"`` (the default): the predicted increase of the model's mean next-token loss when that layer alone is
  quantized, ``1/2 * N * sum(g**2 * dy**2)``, with ``g`` the gradient of the mean loss (over ``N`` predicted tokens)
  with respect to the layer's output, taken by one backward pass of the full-precision model on the batch: the
  diagonal second-order (empirical Fisher) approximation used by mixed-precision methods since Optimal Brain Damage.
  It weights each output element by how much the model's prediction depends on it, so errors in layers whose
  output barely reaches the logits count for little, and it is in nats per token: the sum over layers predicts the
  log-perplexity the recipe adds.
* ``"relative"``: ``||dy||^2 / ||y||^2``, scale-free and blind to where the layer sits; on a real model its sum does
  not predict perplexity (see the quality benchmark), kept for comparison and for models without a language head.

The automatic recipe picks, per layer, a candidate (or full precision) that minimises the summed error while the
whole model fits the budget: a multiple-choice knapsack solved exactly by dynamic programming over bytes rounded
up to a fine grid, so the chosen recipe never exceeds the budget.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from qcore.errors import ConfigError
from qcore.recipe import Recipe
from qcore.sizes import format_nbytes

__all__ = [
    "LayerSensitivity", "measure_sensitivity", "auto_recipe", "AutoRecipe", "synthetic_batch", "text_batch",
    "OBJECTIVES",
]  # fmt: skip

#: The measures of a layer's error :func:`measure_sensitivity` knows, the default first.
OBJECTIVES = ("loss", "relative")

#: Steps of the byte grid the knapsack runs on; finer is more exact and slower (layers x candidates x steps).
_GRID = 4096


@dataclasses.dataclass(frozen=True)
class LayerSensitivity:
    """The error and size of every candidate on every quantizable layer (``None`` = full precision)."""

    #: Layer -> candidate name -> the layer's error on the batch, measured as :attr:`objective` says.
    errors: dict[str, dict[str, float]]
    #: Layer -> candidate name (or ``"full"``) -> bytes of the layer's weight.
    nbytes: dict[str, dict[str, int]]
    #: Candidate name -> config dict.
    configs: dict[str, dict[str, Any]]
    #: Bytes of everything that stays in full precision whatever is chosen (embeddings, norms, biases, buffers).
    fixed_nbytes: int
    #: ``"loss"``: predicted increase of the mean next-token loss (nats per token); ``"relative"``:
    #: ``||y_q - y||^2 / ||y||^2`` (see the module docstring).
    objective: str = "loss"

    def total_nbytes(self, choice: Mapping[str, str | None]) -> int:
        return self.fixed_nbytes + sum(self.nbytes[layer][choice.get(layer) or "full"] for layer in self.nbytes)

    def total_error(self, choice: Mapping[str, str | None]) -> float:
        return sum(self.errors[layer][name] for layer, name in choice.items() if name is not None)


def synthetic_batch(vocab_size: int, *, batch: int = 4, length: int = 32, seed: int = 0) -> torch.Tensor:
    """Token ids drawn uniformly (fixed seed): a batch that needs no dataset and exercises every embedding row."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=generator)


def text_batch(tokenizer: Any, texts: Sequence[str] | None = None, *, batch: int = 4, length: int = 128) -> torch.Tensor:
    """Token ids ``[batch, length]``: consecutive pieces of real text, by default the calibration part of qcore's
    built-in corpus (never the held-out part that ``qcore eval`` scores, so a recipe is not chosen on its test).

    :raises ConfigError: the text is shorter than ``batch * length`` tokens.
    """
    if texts is None:
        from qcore.corpus import calibration_texts

        texts = calibration_texts()
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    if ids.numel() < batch * length:
        raise ConfigError(
            f"the text has {ids.numel()} tokens, fewer than the {batch} x {length} the measurement needs; give more "
            f"text or a smaller batch"
        )
    return ids[: batch * length].reshape(batch, length)


def measure_sensitivity(
    src: str | os.PathLike[str],
    candidates: Mapping[str, Mapping[str, Any]],
    *,
    input_ids: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    objective: str = "loss",
) -> LayerSensitivity:
    """Measure each candidate config's error on each quantizable layer of the checkpoint at ``src``.

    :param candidates: name -> config dict (presets' configs, say).
    :param input_ids: the batch to measure on (:func:`text_batch` makes one from real text); by default
        :func:`synthetic_batch`, for a model without a tokenizer.
    :param objective: one of :data:`OBJECTIVES` (see the module docstring); ``"loss"`` needs a model with a
        language-model head and sequences of at least two tokens.
    """
    import qcore
    from qcore.loading import _candidates, estimate_nbytes, plan

    if not candidates:
        raise ConfigError("give at least one candidate preset or config")
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown sensitivity objective {objective!r}; choose one of {list(OBJECTIVES)}")
    reference = qcore.from_pretrained(src, dtype=dtype)
    ids = input_ids if input_ids is not None else synthetic_batch(reference.config.vocab_size)
    tied = {
        key.removesuffix(".weight")
        for pair in (getattr(reference, "all_tied_weights_keys", None) or {}).items()
        for key in pair
    }
    layers = [layer for layer in _candidates(reference) if layer not in tied]  # a tied weight must stay shared
    inputs, outputs, weights = _capture(reference, layers, ids, objective)
    del reference
    skeleton = plan(src, dtype=dtype)
    element = torch.tensor([], dtype=skeleton.dtype).element_size()
    full = estimate_nbytes(skeleton.model, {}, skeleton.dtype)
    errors: dict[str, dict[str, float]] = {layer: {} for layer in layers}
    nbytes: dict[str, dict[str, int]] = {layer: {"full": full[layer]} for layer in layers}
    configs = {}
    for name, config_dict in candidates.items():
        config = qcore.QuantConfig.from_dict(dict(config_dict))
        configs[name] = config.to_dict()
        quantized = qcore.from_pretrained(src, Recipe([(layer, config) for layer in layers]), dtype=dtype)
        modules = dict(quantized.named_modules())
        for layer in layers:
            weight = skeleton.model.get_submodule(layer).weight
            out_features, in_features = (
                weight.shape[::-1] if type(modules[layer]).__name__ == "Conv1D" else weight.shape
            )
            bias = skeleton.model.get_submodule(layer).bias
            nbytes[layer][name] = config.quantized_nbytes(out_features, in_features, element) + (
                bias.numel() * element if bias is not None else 0
            )
            with torch.no_grad():
                squared = (modules[layer](inputs[layer]).float() - outputs[layer]).pow(2)
            if objective == "loss":
                errors[layer][name] = float((weights[layer] * squared).sum())
            else:
                errors[layer][name] = float(squared.sum() / outputs[layer].pow(2).sum().clamp_min(1e-30))
        del quantized
    fixed = skeleton.nbytes() - sum(nbytes[layer]["full"] for layer in layers)
    return LayerSensitivity(errors, nbytes, configs, fixed, objective)


def _capture(model: nn.Module, layers: Sequence[str], input_ids: torch.Tensor, objective: str):
    """Each layer's input and float32 output on ``input_ids``; for the ``"loss"`` objective also the weight of each
    output element, ``N / 2 * g**2`` with ``g`` the gradient of the mean next-token loss (one backward pass)."""
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    weights: dict[str, torch.Tensor] = {}
    with_loss = objective == "loss"
    if with_loss and input_ids.shape[-1] < 2:
        raise ConfigError("the loss objective needs sequences of at least two tokens")
    predicted = input_ids[..., 1:].numel()

    def keep(layer: str):
        def weigh(grad: torch.Tensor) -> None:
            # The summed loss's gradient is N times the mean's: N/2 * (g_sum / N)**2 = g_sum**2 / (2 N).
            weights[layer] = grad.detach().float().pow(2) / (2 * predicted)

        def hook(module, args, output):
            inputs[layer] = args[0].detach()
            outputs[layer] = output.detach().float()
            if output.requires_grad:
                output.register_hook(weigh)

        return hook

    handles = [model.get_submodule(layer).register_forward_hook(keep(layer)) for layer in layers]
    if with_loss:
        for parameter in model.parameters():
            parameter.requires_grad_(False)  # gradients of the activations only; no weight gradients are kept
        embeddings = model.get_input_embeddings()
        handles.append(embeddings.register_forward_hook(lambda module, args, output: output.requires_grad_()))
    try:
        if with_loss:
            with torch.enable_grad():
                logits = model(input_ids).logits
                loss = nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction="sum"
                )
                del logits
                loss.backward()
        else:
            with torch.no_grad():
                model(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    if with_loss:
        missing = [layer for layer in layers if layer not in weights]
        if missing:
            raise ConfigError(f"the loss does not depend on {missing[:3]}; measure with objective='relative'")
    return inputs, outputs, weights


@dataclasses.dataclass(frozen=True)
class AutoRecipe:
    """The recipe chosen under a budget, with what it is predicted to cost."""

    recipe: Recipe
    choice: dict[str, str | None]
    predicted_nbytes: int
    predicted_error: float
    budget: int


def auto_recipe(sensitivity: LayerSensitivity, budget: int, *, allow_full_precision: bool = True) -> AutoRecipe:
    """Choose a candidate (or full precision) per layer minimising the summed error within ``budget`` bytes.

    :raises ConfigError: no choice fits the budget (it names the smallest size possible).
    """
    layers = list(sensitivity.nbytes)
    options = {
        layer: [
            (name, sensitivity.nbytes[layer][name], sensitivity.errors[layer][name]) for name in sensitivity.configs
        ]
        + ([(None, sensitivity.nbytes[layer]["full"], 0.0)] if allow_full_precision else [])
        for layer in layers
    }
    room = budget - sensitivity.fixed_nbytes
    smallest = sensitivity.fixed_nbytes + sum(min(size for _, size, _ in options[layer]) for layer in layers)
    if room <= 0 or smallest > budget:
        raise ConfigError(
            f"no recipe fits {format_nbytes(budget)}: the smallest possible is {format_nbytes(smallest)}; raise the budget or add a "
            f"smaller candidate preset"
        )
    step = max(1, -(-room // _GRID))  # ceil: sizes rounded up on the grid, so the result never exceeds the budget
    cells = room // step
    infinity = float("inf")
    best = [0.0] + [infinity] * cells  # best[c]: least error using at most c grid cells, over the layers so far
    picks: list[list[int]] = []
    for layer in layers:
        new = [infinity] * (cells + 1)
        pick = [-1] * (cells + 1)
        for index, (_, size, error) in enumerate(options[layer]):
            need = -(-size // step)
            for used in range(need, cells + 1):
                candidate = best[used - need] + error
                if candidate < new[used]:
                    new[used], pick[used] = candidate, index
        best = new
        picks.append(pick)
    used = min(range(cells + 1), key=lambda c: best[c])
    choice: dict[str, str | None] = {}
    for layer, pick in zip(reversed(layers), reversed(picks), strict=True):
        index = pick[used]
        name, size, _ = options[layer][index]
        choice[layer] = name
        used -= -(-size // step)
    choice = {layer: choice[layer] for layer in layers}
    import qcore

    # One config object per candidate, so the loader runs each backend once for all its layers.
    parsed = {name: qcore.QuantConfig.from_dict(dict(config)) for name, config in sensitivity.configs.items()}
    recipe = Recipe([(layer, parsed[name] if name else None) for layer, name in choice.items()], default=None)
    return AutoRecipe(recipe, choice, sensitivity.total_nbytes(choice), sensitivity.total_error(choice), budget)
