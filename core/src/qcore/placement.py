"""Automatic device maps by quantized size: where ``device_map="auto"`` (and its kin) put each module.

Phase 2 starts from this map: the loader resolves ``"auto"``, ``"balanced"``, ``"balanced_low_0"`` and
``"sequential"`` here, before any weight is read, and hands the result to every backend's ``update_device_map``.
``qcore estimate --device-map`` and ``qcore recommend`` print the same computation without loading anything.

accelerate sizes a model by its parameters' dtypes, so a 4-bit model would be placed as if it were full precision
and declared not to fit. Here each module counts at the bytes it will hold once loaded: a quantized module at its
config's :meth:`~qcore.QuantConfig.quantized_nbytes` (packed weights plus the statistics the backend keeps), every
other tensor at its load dtype, tied weights once. Each device's budget is then reduced by a reserve
(:func:`reserve_nbytes`): :data:`ACTIVATION_FRACTION` of it for activations and the KV cache, as transformers
reserves for quantized loads, plus twice the largest weight converted in flight at full precision (the tensor being
converted and one temporary of its size). Modules are laid out in model order, filling the accelerators (in index
order, balanced for all but ``"sequential"``), then the CPU; a decoder block (the model's ``_no_split_modules``) is
never split. When the model spills onto the CPU beside an accelerator, the first accelerator also keeps room for the
largest block, because accelerate runs a CPU-placed block there, moving its weights in for each forward. What fits
nowhere is mapped to ``"disk"``, which the loader refuses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import nn

from qcore.errors import ConfigError

__all__ = [
    "ACTIVATION_FRACTION",
    "STRATEGIES",
    "Placement",
    "in_flight_nbytes",
    "module_sizes",
    "parse_max_memory",
    "place",
    "required_budget",
    "reserve_nbytes",
]

#: The automatic strategies ``device_map`` accepts, as accelerate and transformers name them.
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
#: Share of each device's budget kept free for activations and the KV cache.
ACTIVATION_FRACTION = 0.10


@dataclasses.dataclass
class Placement:
    """An automatic device map and the numbers behind it."""

    #: accelerate-style map: module-name prefix -> GPU index, ``"cpu"``, or ``"disk"`` for what fits nowhere.
    device_map: dict[str, Any]
    #: Bytes placed on each device (quantized sizes).
    nbytes: dict[Any, int]
    #: Each device's budget (``max_memory``, or the free memory) before the reserve.
    budgets: dict[Any, int]
    #: Bytes of each budget kept free (activations, the tensor converted in flight, a CPU-placed block's weights).
    reserves: dict[Any, int]

    @property
    def fits(self) -> bool:
        """Whether every module got a device (nothing went to ``"disk"``)."""
        return "disk" not in self.device_map.values()

    def groups(self) -> dict[Any, list[str]]:
        """Device -> its module groups, consecutive numbered siblings folded (``model.layers.0-13``), in model order."""
        grouped: dict[Any, list[str]] = {}
        for device in [*self.budgets, "disk"]:
            names = [name or "(whole model)" for name, target in self.device_map.items() if target == device]
            if names:
                grouped[device] = _fold(names)
        return grouped

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_map": {name: target for name, target in self.device_map.items()},
            "devices": [
                {
                    "device": str(device),
                    "budget": self.budgets.get(device),
                    "reserve": self.reserves.get(device, 0),
                    "nbytes": self.nbytes.get(device, 0),
                    "modules": self.groups().get(device, []),
                }
                for device in [*self.budgets, *(["disk"] if not self.fits else [])]
            ],
            "fits": self.fits,
        }


def parse_max_memory(max_memory: Mapping[Any, Any] | None) -> dict[Any, int]:
    """``max_memory`` as ``{gpu index: bytes, "cpu": bytes}``, GPUs first; the free memory of each device when None.

    Keys may be GPU indexes (``0``, ``"0"``, ``"cuda:0"``) or ``"cpu"``; values bytes or sizes such as ``"24GiB"``.
    A GPU index need not exist here, so a placement for another machine can be computed (nothing is dispatched).
    """
    from qcore.sizes import parse_nbytes

    if max_memory is None:
        return _free_memory()
    budgets: dict[Any, int] = {}
    for key, value in max_memory.items():
        device = _device_key(key)
        try:
            budgets[device] = parse_nbytes(value) if not (isinstance(value, int) and value == 0) else 0
        except ValueError as error:
            raise ConfigError(f"max_memory[{key!r}]: {error}") from None
    gpus = sorted(d for d in budgets if isinstance(d, int))
    return {**{d: budgets[d] for d in gpus}, **({"cpu": budgets["cpu"]} if "cpu" in budgets else {})}


def _device_key(key: Any) -> Any:
    text = str(key).strip()
    if text == "cpu":
        return "cpu"
    number = text.removeprefix("cuda:") if text != "cuda" else "0"
    if number.isdigit():
        return int(number)
    raise ConfigError(
        f"max_memory key {key!r} is not a device: use a GPU index (0, 'cuda:0') or 'cpu'; qcore does not offload "
        f"to disk"
    )


def _free_memory() -> dict[Any, int]:
    import psutil
    import torch

    budgets: dict[Any, int] = {}
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            budgets[index] = torch.cuda.mem_get_info(index)[0]
    budgets["cpu"] = psutil.virtual_memory().available
    return budgets


def reserve_nbytes(budget: int, in_flight: int) -> int:
    """Bytes of a device's ``budget`` kept free: the activation share plus twice the largest tensor in flight."""
    return int(budget * ACTIVATION_FRACTION) + 2 * in_flight


def required_budget(nbytes: int, in_flight: int) -> int:
    """The smallest budget one device needs to hold ``nbytes`` of model with its reserve (:func:`reserve_nbytes`)."""
    budget = int((nbytes + 2 * in_flight) / (1 - ACTIVATION_FRACTION))  # within a few bytes; settle it exactly
    while budget - reserve_nbytes(budget, in_flight) < nbytes:
        budget += 1
    while budget > 1 and budget - 1 - reserve_nbytes(budget - 1, in_flight) >= nbytes:
        budget -= 1
    return budget


def place(
    model: nn.Module,
    sizes: Mapping[str, int],
    strategy: str,
    max_memory: Mapping[Any, Any] | None,
    *,
    in_flight: int = 0,
) -> Placement:
    """The automatic device map for ``model`` (a skeleton: parameters may be on the meta device).

    :param sizes: bytes each module holds itself (not its children), as loaded: quantized modules at their packed
        size, tied weights counted once (:func:`module_sizes`).
    :param strategy: one of :data:`STRATEGIES`.
    :param max_memory: per-device budgets (:func:`parse_max_memory`); the free memory of each device when None.
    :param in_flight: bytes of the largest weight converted during the load, at full precision.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"device_map {strategy!r} is not one of {', '.join(STRATEGIES)}, a device or a dict")
    budgets = parse_max_memory(max_memory)
    if not budgets:
        raise ConfigError("max_memory gives no device a budget; give at least 'cpu' or a GPU index")
    totals = _subtree_totals(model, sizes)
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    largest_block = max(
        (totals.get(name, 0) for name, m in model.named_modules() if type(m).__name__ in no_split), default=0
    )
    reserves = {device: min(budget, reserve_nbytes(budget, in_flight)) for device, budget in budgets.items()}
    limits = {device: budget - reserves[device] for device, budget in budgets.items()}
    gpus = [d for d in budgets if d != "cpu"]
    if strategy != "sequential" and len(gpus) > 1:
        _balance(limits, gpus, totals.get("", 0), largest_block, low_zero=strategy == "balanced_low_0")
    device_map, used = _fill(model, totals, no_split, limits)
    if gpus and any(device_map.get(name) not in gpus for name in device_map if totals.get(name, 0)):
        # Something runs from the CPU: its weights visit the first GPU for each forward, so keep room there.
        reserves[gpus[0]] = min(budgets[gpus[0]], reserves[gpus[0]] + largest_block)
        limits[gpus[0]] = budgets[gpus[0]] - reserves[gpus[0]]
        device_map, used = _fill(model, totals, no_split, limits)
    _follow_ties(model, device_map)
    return Placement(_collapse(model, device_map), used, budgets, reserves)


def module_sizes(model: nn.Module, applied: Mapping[str, Any], dtype: Any) -> dict[str, int]:
    """Bytes each module holds itself once loaded: its parameters (a quantized Linear's weight at its packed size,
    statistics included), its buffers, and no tied weight twice (it shares its source's storage)."""
    import torch

    from qcore.loading import estimate_nbytes

    sizes = estimate_nbytes(model, applied, dtype)
    element = torch.tensor([], dtype=dtype).element_size()
    for target in getattr(model, "all_tied_weights_keys", None) or {}:
        module_name, _, tensor_name = target.rpartition(".")
        parameter = model.get_submodule(module_name)._parameters.get(tensor_name)
        if parameter is not None and module_name not in applied:
            sizes[module_name] = sizes.get(module_name, 0) - parameter.numel() * element
    for name, module in model.named_modules():
        for buffer in module.buffers(recurse=False):
            sizes[name] = sizes.get(name, 0) + buffer.numel() * buffer.element_size()
    return sizes


def in_flight_nbytes(model: nn.Module, applied: Mapping[str, Any], dtype: Any, pre_quantized: bool) -> int:
    """The largest weight a backend converts during the load: at full precision when quantizing on the fly, at its
    stored (quantized) size when the checkpoint is pre-quantized."""
    import torch

    element = torch.tensor([], dtype=dtype).element_size()
    largest = 0
    for name, config in applied.items():
        weight = model.get_submodule(name)._parameters.get("weight")
        if weight is None or weight.dim() != 2:
            continue
        out_features, in_features = weight.shape
        full = out_features * in_features * element
        largest = max(largest, config.quantized_nbytes(out_features, in_features, element) if pre_quantized else full)
    return largest


def _subtree_totals(model: nn.Module, sizes: Mapping[str, int]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for name, nbytes in sizes.items():
        parts = name.split(".") if name else []
        for cut in range(len(parts) + 1):
            prefix = ".".join(parts[:cut])
            totals[prefix] = totals.get(prefix, 0) + nbytes
    return totals


def _balance(limits: dict[Any, int], gpus: list[Any], total: int, largest_block: int, *, low_zero: bool) -> None:
    """accelerate's balancing: each GPU but the last takes about its share plus a block's worth of slack."""
    sharing = len(gpus) - 1 if low_zero else len(gpus)
    per_gpu = total // max(sharing, 1) + int(1.25 * largest_block)
    for device in gpus[:-1]:
        limits[device] = min(limits[device], per_gpu)
    if low_zero:
        limits[gpus[0]] = min(limits[gpus[0]], max(0, total - sum(limits[d] for d in gpus[1:])))


def _fill(
    model: nn.Module, totals: Mapping[str, int], no_split: set[str], limits: Mapping[Any, int]
) -> tuple[dict[str, Any], dict[Any, int]]:
    devices = list(limits)
    used = dict.fromkeys(devices, 0)
    device_map: dict[str, Any] = {}
    queue = [(name, module) for name, module in model.named_children()]
    if any(True for _ in model.named_parameters(recurse=False)) or any(
        True for _ in model.named_buffers(recurse=False)
    ):
        queue = [("", model)]  # tensors of the root itself: it cannot be split
    current = 0
    while queue:
        name, module = queue.pop(0)
        size = totals.get(name, 0)
        while current < len(devices) and used[devices[current]] + size > limits[devices[current]]:
            if _splittable(module, no_split):
                queue[0:0] = [(f"{name}.{child}", sub) for child, sub in module.named_children()]
                break
            current += 1
        else:
            device = devices[current] if current < len(devices) else "disk"
            device_map[name] = device
            if device != "disk":
                used[device] += size
    return device_map, used


def _splittable(module: nn.Module, no_split: set[str]) -> bool:
    own = any(True for _ in module.named_parameters(recurse=False)) or any(
        True for _ in module.named_buffers(recurse=False)
    )
    return type(module).__name__ not in no_split and not own and any(True for _ in module.children())


def _follow_ties(model: nn.Module, device_map: dict[str, Any]) -> None:
    """A tied weight (``lm_head.weight`` sharing the embedding) lives with its source."""
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        target_module, source_module = target.rpartition(".")[0], source.rpartition(".")[0]
        if target_module in device_map and len(list(model.get_submodule(target_module).parameters())) == 1:
            device_map[target_module] = _device_of(device_map, source_module)


def _device_of(device_map: Mapping[str, Any], name: str) -> Any:
    best, device = -1, "cpu"
    for prefix, target in device_map.items():
        if (prefix == "" or name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
            best, device = len(prefix), target
    return device


def _collapse(model: nn.Module, device_map: dict[str, Any]) -> dict[str, Any]:
    """Fold a module whose placed descendants all share one device into one entry, in model order."""
    order = {name: index for index, (name, _) in enumerate(model.named_modules())}
    names = sorted(device_map, key=lambda n: order.get(n, len(order)))
    changed = True
    while changed:
        changed = False
        parents: dict[str, set[Any]] = {}
        for name in names:
            if name:
                parents.setdefault(name.rpartition(".")[0], set()).add(device_map[name])
        for parent, devices in parents.items():
            children = [n for n in names if n and n.rpartition(".")[0] == parent]
            module = model.get_submodule(parent)
            complete = len(children) == len(list(module.named_children()))
            if len(devices) == 1 and complete and parent not in device_map:
                device_map = {n: d for n, d in device_map.items() if n not in children}
                device_map[parent] = devices.pop()
                names = sorted(device_map, key=lambda n: order.get(n, len(order)))
                changed = True
                break
    return {name: device_map[name] for name in names}


def _fold(names: list[str]) -> list[str]:
    """``["model.layers.0", "model.layers.1", "model.layers.2"]`` -> ``["model.layers.0-2"]``."""
    folded: list[str] = []
    run: tuple[str, int, int] | None = None
    for name in names:
        stem, _, last = name.rpartition(".")
        if last.isdigit() and run is not None and run[0] == stem and run[2] + 1 == int(last):
            run = (stem, run[1], int(last))
            folded[-1] = f"{stem}.{run[1]}-{run[2]}" if run[1] != run[2] else f"{stem}.{run[1]}"
            continue
        run = (stem, int(last), int(last)) if last.isdigit() else None
        folded.append(name)
    return folded
