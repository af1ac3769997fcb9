"""Per-layer sensitivity of a model to each candidate preset, and the automatic recipe under a memory budget.

Both use only the public loader: each candidate is loaded once with :func:`qcore.from_pretrained`; every quantized
Linear is then fed the inputs its full-precision counterpart saw on the same batch, and its output error ``dy``
measured in isolation. Two measures of that error:

* ``"loss"`` (the default): the predicted increase of the model's mean next-token loss when that layer alone is
  quantized, ``1/2 * N * sum(g**2 * dy**2)``, with ``g`` the gradient of the mean loss (over ``N`` predicted tokens)
  with respect to the layer's output, taken by one backward pass of the full-precision model on the batch: the
  diagonal second-order (empirical Fisher) approximation used by mixed-precision methods since Optimal Brain Damage.
  It weights each output element by how much the model's prediction depends on it, so errors in layers whose
  output barely reaches the logits count for little. The approximation is second order and ignores how errors
  compound across layers, which grows with the error (measured on SmolLM2-135M: it over-predicts 4-bit's loss
  increase about twice as much as 3-bit's), so each candidate's errors are then scaled by one factor, chosen so
  that their sum over the layers equals the loss increase measured end to end with that candidate on every layer
  (one forward pass of the model each candidate is loaded as anyway). The result is in nats per token, and the sum
  over a recipe's layers predicts the log-perplexity it adds on the batch.
* ``"relative"``: ``||dy||^2 / ||y||^2``, scale-free and blind to where the layer sits; on a real model its sum does
  not predict perplexity (see the quality benchmark), kept for comparison and for models without a language head.

The automatic recipe picks, per layer, a candidate (or full precision) that minimises the summed error while the
whole model fits the budget: a multiple-choice knapsack solved by dynamic programming over the bytes each choice
adds to the layer's smallest option, rounded up to a fine grid, so the chosen recipe never exceeds the budget and a
budget equal to a single candidate's size can still choose that candidate everywhere.

A prediction summed over hundreds of layers, each estimated on a small batch, is optimistic exactly where the
knapsack looks: it picks the layers whose low-bit error happens to be underestimated (measured on SmolLM2-135M: a
mix predicted 2% better than hqq-4bit everywhere scored 44.0 perplexity against 39.6). :func:`validated_recipe`
therefore checks the choice end to end before offering it: it loads the knapsack's mix over every candidate, the
mixes over only the candidates near or above the size of the best single preset that fits (finer or coarser
groups at the same bit width, 8-bit where the budget leaves room: no 2- or 3-bit layers, where the prediction is
least trustworthy), and that single preset, scores each by perplexity on calibration text the measurement did not
use, and returns the best.
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
    "OBJECTIVES", "validated_recipe", "ValidatedRecipe", "validation_ids",
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
    #: ``"loss"`` only: candidate name -> the mean next-token loss increase measured with that candidate on every
    #: layer at once (what the candidate's errors are scaled to sum to), and the factor they were scaled by.
    measured_loss_increase: dict[str, float] = dataclasses.field(default_factory=dict)
    scale: dict[str, float] = dataclasses.field(default_factory=dict)

    def total_nbytes(self, choice: Mapping[str, str | None]) -> int:
        return self.fixed_nbytes + sum(self.nbytes[layer][choice.get(layer) or "full"] for layer in self.nbytes)

    def total_error(self, choice: Mapping[str, str | None]) -> float:
        return sum(self.errors[layer][name] for layer, name in choice.items() if name is not None)


def synthetic_batch(vocab_size: int, *, batch: int = 4, length: int = 32, seed: int = 0) -> torch.Tensor:
    """Token ids drawn uniformly (fixed seed): a batch that needs no dataset and exercises every embedding row."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=generator)


def text_batch(
    tokenizer: Any, texts: Sequence[str] | None = None, *, batch: int = 4, length: int = 128
) -> torch.Tensor:
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


def validation_ids(
    tokenizer: Any, texts: Sequence[str] | None = None, *, skip: int, tokens: int = 2048
) -> torch.Tensor:
    """Token ids ``[1, tokens]`` of the same text as :func:`text_batch`, starting after its first ``skip`` tokens
    (``batch * length``), so a recipe is checked on text the measurement never saw and the evaluation text stays
    unseen by both.

    :raises ConfigError: the text has fewer than ``skip + 2`` tokens.
    """
    if texts is None:
        from qcore.corpus import calibration_texts

        texts = calibration_texts()
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    if ids.numel() < skip + 2:
        raise ConfigError(f"the text has {ids.numel()} tokens, none left after the {skip} the measurement uses")
    return ids[skip : skip + tokens].unsqueeze(0)


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
    # Measured the same way as each candidate's below (no autograd), so the difference is the quantization's alone.
    reference_loss = _mean_loss(reference, ids) if objective == "loss" else 0.0
    del reference
    skeleton = plan(src, dtype=dtype)
    element = torch.tensor([], dtype=skeleton.dtype).element_size()
    full = estimate_nbytes(skeleton.model, {}, skeleton.dtype)
    errors: dict[str, dict[str, float]] = {layer: {} for layer in layers}
    nbytes: dict[str, dict[str, int]] = {layer: {"full": full[layer]} for layer in layers}
    configs = {}
    measured_increase: dict[str, float] = {}
    scale: dict[str, float] = {}
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
        if objective == "loss":
            measured_increase[name] = _mean_loss(quantized, ids) - reference_loss
            predicted = sum(errors[layer][name] for layer in layers)
            # A candidate that measures no worse than full precision keeps a sliver of its predicted cost, so the
            # choice still prefers the layers it harms least.
            scale[name] = max(measured_increase[name], 1e-3 * predicted) / predicted if predicted > 0 else 1.0
            for layer in layers:
                errors[layer][name] *= scale[name]
        del quantized
    fixed = skeleton.nbytes() - sum(nbytes[layer]["full"] for layer in layers)
    return LayerSensitivity(errors, nbytes, configs, fixed, objective, measured_increase, scale)


def _mean_loss(model: nn.Module, input_ids: torch.Tensor) -> float:
    """The mean next-token cross-entropy of ``model`` on ``input_ids`` (nats per predicted token)."""
    with torch.no_grad():
        logits = model(input_ids).logits
    return float(nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten()))


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


def auto_recipe(
    sensitivity: LayerSensitivity,
    budget: int,
    *,
    allow_full_precision: bool = True,
    candidates: Sequence[str] | None = None,
) -> AutoRecipe:
    """Choose a candidate (or full precision) per layer minimising the summed error within ``budget`` bytes.

    :param candidates: the measured candidates to choose from (default: all).
    :raises ConfigError: no choice fits the budget (it names the smallest size possible).
    """
    layers = list(sensitivity.nbytes)
    names = list(sensitivity.configs) if candidates is None else [n for n in sensitivity.configs if n in candidates]
    options = {
        layer: [(name, sensitivity.nbytes[layer][name], sensitivity.errors[layer][name]) for name in names]
        + ([(None, sensitivity.nbytes[layer]["full"], 0.0)] if allow_full_precision else [])
        for layer in layers
    }
    # Every layer takes at least its smallest option; the knapsack spends only the bytes beyond that, so the grid's
    # rounding applies to those extra bytes alone and a choice of smallest options is never rounded out of the budget.
    floor = {layer: min(size for _, size, _ in options[layer]) for layer in layers}
    smallest = sensitivity.fixed_nbytes + sum(floor.values())
    room = budget - smallest
    if room < 0:
        raise ConfigError(
            f"no recipe fits {format_nbytes(budget)}: the smallest possible is {format_nbytes(smallest)}; raise the "
            f"budget or add a smaller candidate preset"
        )
    step = max(1, -(-room // _GRID))  # ceil: extras rounded up on the grid, so the result never exceeds the budget
    cells = room // step

    def need(layer: str, size: int) -> int:
        return -(-(size - floor[layer]) // step)

    infinity = float("inf")
    best = [0.0] + [infinity] * cells  # best[c]: least error using at most c grid cells, over the layers so far
    picks: list[list[int]] = []
    for layer in layers:
        new = [infinity] * (cells + 1)
        pick = [-1] * (cells + 1)
        for index, (_, size, error) in enumerate(options[layer]):
            cost = need(layer, size)
            for used in range(cost, cells + 1):
                candidate = best[used - cost] + error
                if candidate < new[used]:
                    new[used], pick[used] = candidate, index
        best = new
        picks.append(pick)
    used = min(range(cells + 1), key=lambda c: best[c])
    choice: dict[str, str | None] = {}
    for layer, pick in zip(reversed(layers), reversed(picks), strict=True):
        name, size, _ = options[layer][pick[used]]
        choice[layer] = name
        used -= need(layer, size)
    choice = {layer: choice[layer] for layer in layers}
    import qcore

    # One config object per candidate, so the loader runs each backend once for all its layers.
    parsed = {name: qcore.QuantConfig.from_dict(dict(config)) for name, config in sensitivity.configs.items()}
    return _as_auto_recipe(sensitivity, choice, budget, parsed)


def _as_auto_recipe(sensitivity: LayerSensitivity, choice: dict[str, str | None], budget: int, parsed=None):
    import qcore

    if parsed is None:
        parsed = {name: qcore.QuantConfig.from_dict(dict(config)) for name, config in sensitivity.configs.items()}
    recipe = Recipe([(layer, parsed[name] if name else None) for layer, name in choice.items()], default=None)
    return AutoRecipe(recipe, choice, sensitivity.total_nbytes(choice), sensitivity.total_error(choice), budget)


@dataclasses.dataclass(frozen=True)
class ValidatedRecipe:
    """The recipe :func:`validated_recipe` offers, and every recipe it weighed with its validation perplexity."""

    chosen: AutoRecipe
    #: What was weighed, in the order tried: label -> the recipe.
    tried: dict[str, AutoRecipe]
    #: label -> perplexity on the validation tokens.
    perplexity: dict[str, float]
    #: The label of ``chosen``.
    label: str


def validated_recipe(
    src: str | os.PathLike[str],
    sensitivity: LayerSensitivity,
    budget: int,
    validation: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    progress: Any = None,
) -> ValidatedRecipe:
    """The best of the recipes that fit ``budget``, by perplexity on ``validation`` (token ids the measurement did
    not use, :func:`validation_ids`): the knapsack's mix over every candidate, over the candidates whose size (on
    every layer) is at least 80% of the best single candidate that fits, over those at least as large as it, and
    that single candidate everywhere (see the module docstring); a choice two of them share is loaded once. A mix
    is chosen only when it scores strictly better than the single candidate.

    :param progress: called with a line before each recipe is loaded.
    :raises ConfigError: no single candidate fits the budget (then only :func:`auto_recipe` can choose).
    """
    import qcore
    from qcore.evaluate import perplexity

    layers = list(sensitivity.nbytes)
    uniform = {name: {layer: name for layer in layers} for name in sensitivity.configs}
    fitting = [name for name, choice in uniform.items() if sensitivity.total_nbytes(choice) <= budget]
    if not fitting:
        raise ConfigError(
            f"no single candidate fits {format_nbytes(budget)}, so there is nothing to check a mix against; use "
            f"auto_recipe, or raise the budget"
        )
    single = min(fitting, key=lambda name: sensitivity.total_error(uniform[name]))
    size = sensitivity.total_nbytes(uniform[single])
    tried: dict[str, AutoRecipe] = {}
    for label, least in (
        ("mix of all candidates", 0.0),
        (f"mix of candidates at least 80% of {single}'s size", 0.8),
        (f"mix of candidates at least as large as {single}", 1.0),
    ):
        allowed = [name for name in sensitivity.configs if sensitivity.total_nbytes(uniform[name]) >= least * size]
        chosen = auto_recipe(sensitivity, budget, candidates=allowed)
        if chosen.choice == uniform[single]:
            label = f"{single} everywhere"
        if all(chosen.choice != other.choice for other in tried.values()):
            tried[label] = chosen
    if all(uniform[single] != other.choice for other in tried.values()):
        tried[f"{single} everywhere"] = _as_auto_recipe(sensitivity, uniform[single], budget)
    scores = {}
    for label, chosen in tried.items():
        if progress is not None:
            progress(f"checking '{label}' on {validation.shape[-1]} validation tokens")
        model = qcore.from_pretrained(src, chosen.recipe, dtype=dtype)
        scores[label] = perplexity(model, input_ids=validation).perplexity
        del model
    fallback = f"{single} everywhere"  # a mix must beat it to be offered
    best = min(tried, key=lambda label: (scores[label], label == fallback))
    if scores[best] >= scores[fallback]:
        best = fallback
    return ValidatedRecipe(tried[best], tried, scores, best)
