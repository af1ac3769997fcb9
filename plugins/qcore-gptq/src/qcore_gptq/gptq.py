"""GPTQ itself, and the ``calibrate_block`` step that runs it on one decoder block (phase 4 with calibration).

GPTQ (Frantar, Ashkboos, Hoefler and Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023, arXiv:2210.17323, Algorithm 1) quantizes a linear layer's weight ``W`` column
by column so as to minimise ``||W X - Q X||^2`` over calibration inputs ``X``:

1. ``H = 2 X X^T / n`` (the Hessian of that error), dampened by ``damp_percent`` of its mean diagonal; columns no
   input ever reached are zeroed. With act-order (``desc_act``) columns go by decreasing ``diag(H)``.
2. ``U`` = the upper Cholesky factor of ``H^-1``: row ``j`` of ``U`` over ``U[j, j]`` is how the error of column
   ``j`` is best spread over the columns not yet quantized.
3. For each block of 128 columns, for each column ``j``: when ``j`` starts a group, its scale and zero point come
   from the group's current (already compensated) weights; quantize ``q = clamp(round(w / s) + z, 0, 2^b - 1)``;
   ``e = (w - s (q - z)) / U[j, j]``; subtract ``e U[j, j+1:]`` from the block's remaining columns. After the block,
   its errors update all later columns at once (the "lazy batch" update).

Scales are rounded to float16 before use, since checkpoints store them so. With ``H`` the identity no error is
propagated and the result is plain round-to-nearest with the same grids (what the tests and benchmark compare to).
"""

from __future__ import annotations

import torch
from torch import nn

from qcore_gptq.formats import Decoded

__all__ = ["quantize_layer", "HessianCollector", "block_stages", "stage_hessians"]

#: Columns quantized together before the lazy update of the rest (the paper's B = 128).
BLOCK_COLUMNS = 128


def _grid(weights: torch.Tensor, bits: int, sym: bool, zero_at_least: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale (float16-exact) and integer zero point covering ``weights`` [out, columns] and 0."""
    maxq = (1 << bits) - 1
    low = weights.min(dim=1).values.clamp(max=0)
    high = weights.max(dim=1).values.clamp(min=0)
    if sym:
        high = torch.maximum(-low, high)
        low = -high
    flat = (low == 0) & (high == 0)
    low, high = torch.where(flat, -1.0, low), torch.where(flat, 1.0, high)
    scale = ((high - low) / maxq).to(torch.float16).clamp(min=torch.finfo(torch.float16).tiny).float()
    if sym:
        return scale, torch.full_like(scale, (maxq + 1) // 2)
    return scale, torch.round(-low / scale).clamp(zero_at_least, maxq)


def quantize_layer(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    desc_act: bool,
    damp_percent: float,
    zero_at_least: int = 0,
    overwrite_hessian: bool = False,
) -> Decoded:
    """GPTQ one weight ``[out, in]`` against ``hessian`` ``[in, in]``: codes, float16 scales, zeros and ``g_idx``.

    ``overwrite_hessian=True`` lets it work in ``hessian`` itself (dampened, then freed) instead of a copy: what
    :func:`stage_hessians` hands out is the caller's alone, and for a 5632-wide Linear the copy is 121 MiB.

    ``group_size`` divides ``in`` (``-1``: one group per row). ``zero_at_least=1`` keeps asymmetric zero points
    representable in GPTQ's v1 format (which stores zero - 1).
    """
    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(device=W.device, dtype=torch.float32)
    if not overwrite_hessian and H.data_ptr() == hessian.data_ptr():
        H = H.clone()  # the caller's matrix stays as it was
    rows, columns = W.shape
    group = columns if group_size == -1 else group_size
    maxq = (1 << bits) - 1
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if desc_act else torch.arange(columns, device=W.device)
    if desc_act:
        W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(damp_percent * torch.mean(torch.diag(H)))
    # All three factorizations in H's own storage (LAPACK works in place; the result is bit-identical): for a
    # 5632-input Linear each [in, in] matrix is 121 MiB, and holding several at once was most of the calibrating
    # load's peak above the block it quantizes.
    torch.linalg.cholesky(H, out=H)
    torch.cholesky_inverse(H, out=H)
    U = torch.linalg.cholesky(H, upper=True, out=H)

    codes = torch.zeros_like(W, dtype=torch.uint8)
    scales = torch.zeros(rows, columns // group, device=W.device)
    zeros = torch.zeros_like(scales)
    for start in range(0, columns, BLOCK_COLUMNS):
        stop = min(start + BLOCK_COLUMNS, columns)
        block, errors, U_block = (
            W[:, start:stop].clone(),
            torch.zeros(rows, stop - start, device=W.device),
            U[start:stop, start:stop],
        )
        for j in range(stop - start):
            column = start + j
            if column % group == 0:
                # The group's columns past this block still hold weights the lazy update has not reached: update
                # them now, as the reference implementations do, so the grid fits what will be quantized.
                ahead = W[:, column : column + group].clone()
                ahead[:, : stop - column] = block[:, j : j + group]
                scale, zero = _grid(ahead, bits, sym, zero_at_least)
                scales[:, column // group], zeros[:, column // group] = scale, zero
            w = block[:, j]
            q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
            codes[:, column] = q.to(torch.uint8)
            error = (w - scale * (q - zero)) / U_block[j, j]
            block[:, j:] -= error.unsqueeze(1) * U_block[j, j:].unsqueeze(0)
            errors[:, j] = error
        W[:, stop:] -= errors @ U[start:stop, stop:]

    inverse = torch.argsort(perm)
    g_idx = (torch.arange(columns, device=W.device) // group)[inverse].to(torch.int32)
    return Decoded(codes[:, inverse].cpu(), scales.to(torch.float16).cpu(), zeros.to(torch.uint8).cpu(), g_idx.cpu())


class HessianCollector:
    """Accumulates ``2 X X^T / n`` from a Linear's inputs while hooked (float32, on the layer's device)."""

    def __init__(self, module: nn.Module, in_features: int):
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=_device_of(module))
        self.samples = 0
        self._handle = module.register_forward_pre_hook(self._add)

    def _add(self, module: nn.Module, args: tuple) -> None:
        rows = args[0].detach().reshape(-1, self.hessian.shape[0]).to(torch.float32)
        total = self.samples + rows.shape[0]
        self.hessian.mul_(self.samples / total).addmm_(rows.T, rows, alpha=2 / total)
        self.samples = total

    def remove(self) -> None:
        self._handle.remove()


def block_stages(block: nn.Module, names: list[str], run_one) -> list[list[str]]:
    """The block's Linears (relative ``names``) in execution order, grouped by shared input (q/k/v, gate/up).

    ``run_one`` runs the block on one calibration sequence; hooks note which Linear sees which input tensor.
    """
    # The input tensors themselves are kept until the grouping is done: a freed input's address can be reused by the
    # next Linear's input, which would make two different inputs look shared.
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [
        block.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: calls.append((name, args[0]))
        )
        for name in names
    ]
    try:
        run_one()
    finally:
        for handle in handles:
            handle.remove()
    stages: list[list[str]] = []
    seen: set[str] = set()
    last_input = None
    for name, tensor in calls:
        if name in seen:  # a Linear called twice counts once, at its first call
            continue
        if stages and last_input is not None and _same_tensor(tensor, last_input):
            stages[-1].append(name)
        else:
            stages.append([name])
        seen.add(name)
        last_input = tensor
    calls.clear()
    # Linears the block never called (an unused branch) are quantized last, from no data: round-to-nearest.
    return stages + [[name] for name in names if name not in seen]


def stage_hessians(block: nn.Module, names: list[str], inputs, *, true_sequential: bool = True):
    """Yield ``(name, hessian)`` for each Linear of ``block`` named in ``names``, stage by stage in execution order.

    ``inputs`` (:class:`qcore.calibration.BlockInputs`) runs the block on the calibration sequences once per stage,
    so a stage's Hessian is collected on what the stages before it produce: the caller swaps each Linear for its
    quantized version before asking for the next name (true-sequential GPTQ). The Linears of a stage read one input
    tensor (q/k/v, gate/up) and share one Hessian. With ``true_sequential=False`` every Linear is collected on the
    block's full-precision run, in one pass. A Linear no calibration data reached gets the identity (plain
    round-to-nearest), never zeros. Each Hessian yielded is the caller's own (a stage's shared one is copied for all
    but its last user), so it may be overwritten (``quantize_layer(..., overwrite_hessian=True)``).
    """
    from qcore.calibration import BlockInputs
    from qcore.linear import linear_shape

    if true_sequential:
        first = BlockInputs(inputs.args[:1], inputs.kwargs[:1])
        stages = block_stages(block, names, lambda: first.run(block))
    else:
        stages = [names]
    for stage in stages:
        hooked = stage[:1] if true_sequential else stage
        collectors = {
            name: HessianCollector(block.get_submodule(name), linear_shape(block.get_submodule(name)).in_features)
            for name in hooked
        }
        try:
            inputs.run(block)
        finally:
            for collector in collectors.values():
                collector.remove()
        owner = {name: name if name in collectors else stage[0] for name in stage}
        last_user = {owner[name]: name for name in stage}
        for name in stage:
            collector = collectors[owner[name]]
            if not collector.samples:
                yield name, torch.eye(collector.hessian.shape[0], device=collector.hessian.device)
            elif last_user[owner[name]] == name:
                hessian, collector.hessian = collector.hessian, None  # handed over, not copied
                yield name, hessian
                del hessian
            else:
                yield name, collector.hessian.clone()
        del collectors


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
