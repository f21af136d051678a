"""Block-wise optimisation of one group (local error minimisation, DESIGN §1).

The group's linear layers are replaced, inside the model, by
:class:`MaskedFactorLinear` modules computing the reference math on dense
masked factors in fp32 —

* expand: ``y = (x·U)·(V⊙mask) + b``
* contract: ``y = (x·(V⊙mask)ᵀ)·Uᵀ + b``

— with ``U`` shared by every layer of the group. Each unit (block or MLP) of
the group is fed the input the original model gave it (recorded by
:func:`~.calibration.record`) and trained to reproduce the original output:
loss = Σ over the group's units of the MSE (over the tokens the attention
mask keeps, for text). Only ``U``, the ``V_i`` and the MLP biases train;
AdamW with cosine decay; the masks follow :mod:`.schedule` (GMP or RigL) and
are fixed at the end. The original layers are put back before returning: the
caller packs the result into :class:`~fips_kernels.FiPSLinear` layers.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..modules import get_submodule, set_submodule
from . import schedule
from .calibration import Record, unit_output
from ..formats.quant import quantize_dequantize
from .factors import svd_factors
from .presets import GroupSpec

__all__ = ["TrainConfig", "GroupResult", "MaskedFactorLinear", "TrainableGroup", "train_group", "masked_mse"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a group's result (part of the resume fingerprint)."""

    budget: float
    sparsity: float
    pattern: str
    pattern_tuple: Tuple
    steps: int = 600
    lr: float = 1e-3
    weight_decay: float = 0.05
    pruning: str = "gmp"           # "gmp" or "rigl"
    prune_every: int = 50
    prune_end: float = 0.75
    prune_schedule: str = "cubic"  # "cubic" or "accelerated" (the FiPS authors' code)
    mask_scope: str = "global"     # "global" or "layer"
    nm_schedule: str = "gradual"   # "gradual" or "fixed"
    rigl_alpha: float = 0.3
    seed: int = 0
    qbits: Optional[int] = None     # int8/int4 factors: trained through a straight-through estimator
    qgroup: int = 64
    base_qbits: Optional[int] = None

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["pattern_tuple"] = list(self.pattern_tuple)
        return d


@dataclass
class GroupResult:
    """A trained group: dense fp32 factors on the CPU (pruned entries are 0),
    masks, biases, and the numbers for the report."""

    index: int
    rank: int
    U: torch.Tensor
    Vs: List[torch.Tensor]
    masks: List[torch.Tensor]
    biases: List[Optional[torch.Tensor]]
    errors_init: List[Dict[str, float]]
    errors_final: List[Dict[str, float]]
    losses: List[Tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    process: int = 0               # the rank that trained (or resumed) it


class TrainableGroup(nn.Module):
    """``U``, the ``V_i``, their masks (buffers) and the biases of one group."""

    def __init__(self, U: torch.Tensor, Vs: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]],
                 kinds: Sequence[str]):
        super().__init__()
        self.kinds = list(kinds)
        self.U = nn.Parameter(U.float().clone())
        self.V = nn.ParameterList([nn.Parameter(v.float().clone()) for v in Vs])
        self.biases = nn.ParameterDict({str(i): nn.Parameter(b.float().clone())
                                        for i, b in enumerate(biases) if b is not None})
        for i, v in enumerate(Vs):
            self.register_buffer(f"mask_{i}", torch.ones_like(v, dtype=torch.bool))
        self.qbits, self.qgroup, self.base_qbits = None, 64, None
        self.capture_dense_grad = False
        self.dense_grads: List[Optional[torch.Tensor]] = [None] * len(Vs)

    def mask(self, i: int) -> torch.Tensor:
        return getattr(self, f"mask_{i}")

    @property
    def masks(self) -> List[torch.Tensor]:
        return [self.mask(i) for i in range(len(self.V))]

    def set_masks(self, masks: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            for i, mk in enumerate(masks):
                self.mask(i).copy_(mk)
                self.V[i].mul_(mk)  # a pruned entry is zero (and stays so: see apply_masks)

    def apply_masks(self) -> None:
        with torch.no_grad():
            for i, V in enumerate(self.V):
                V.mul_(self.mask(i))

    def bias(self, i: int) -> Optional[torch.Tensor]:
        return self.biases[str(i)] if str(i) in self.biases else None

    def linear(self, i: int) -> "MaskedFactorLinear":
        return MaskedFactorLinear(self, i)

    def base(self) -> torch.Tensor:
        """``U``, on its int8 grid (one scale per column) when the base is quantised."""
        if not self.base_qbits:
            return self.U
        return _straight_through(self.U, quantize_dequantize(self.U, self.base_qbits, max(self.U.shape[0], 1)))


def _straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``q`` forward, identity backward (the straight-through estimator)."""
    return x + (q - x).detach()


class MaskedFactorLinear(nn.Module):
    """Layer ``i`` of a :class:`TrainableGroup`, computing the reference math in fp32."""

    def __init__(self, group: TrainableGroup, index: int):
        super().__init__()
        object.__setattr__(self, "_group", group)  # not a submodule: the group owns the parameters
        self.index = index
        self.kind = group.kinds[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, i = self._group, self.index
        V = g.V[i] * g.mask(i)
        if g.qbits:  # the storage grid runs along the reduction axis: B = V (expand) or Vᵀ (contract)
            B = V if self.kind == "expand" else V.t()
            Bq = quantize_dequantize(B, g.qbits, g.qgroup)
            V = _straight_through(V, Bq if self.kind == "expand" else Bq.t())
        if g.capture_dense_grad and V.requires_grad:
            def keep(grad, i=i):
                g.dense_grads[i] = grad.detach().clone() if g.dense_grads[i] is None else g.dense_grads[i] + grad
            V.register_hook(keep)
        x32 = x.float()
        U = g.base()
        if self.kind == "expand":
            y = (x32 @ U) @ V
        else:
            y = (x32 @ V.t()) @ U.t()
        b = g.bias(i)
        if b is not None:
            y = y + b
        return y.to(x.dtype)


def masked_mse(out: torch.Tensor, target: torch.Tensor, token_mask: Optional[torch.Tensor]):
    """``(mean squared error, Σ error², Σ target², element count)`` over the
    elements the token mask ``(B, T)`` keeps (all elements without one)."""
    if out.shape != target.shape:
        raise RuntimeError(f"a unit's output has shape {tuple(out.shape)} but the recorded output has "
                           f"{tuple(target.shape)}")
    diff = out.float() - target.float()
    if token_mask is not None:
        w = token_mask.to(diff.device, torch.float32).reshape(*token_mask.shape, *([1] * (diff.dim() - 2)))
        count = float(w.sum()) * math.prod(diff.shape[2:])
        sq = (diff.square() * w).sum()
        ref = (target.float().square() * w).sum()
    else:
        count = float(diff.numel())
        sq = diff.square().sum()
        ref = target.float().square().sum()
    return sq / max(count, 1.0), float(sq.detach()), float(ref), count


def _run_unit(module: nn.Module, rec: Record, device) -> torch.Tensor:
    args, kwargs = rec.inputs(device)
    return unit_output(module(*args, **kwargs))


def _mask(rec: Record, device):
    return None if rec.token_mask is None else rec.token_mask.to(device)


def evaluate(units: Sequence[nn.Module], records: Sequence[Sequence[Record]], device) -> List[Dict[str, float]]:
    """Per unit: MSE and relative error ``‖ŷ − y‖ / ‖y‖`` over all recorded calls."""
    out = []
    with torch.no_grad():
        for module, recs in zip(units, records):
            sq = ref = count = 0.0
            for rec in recs:
                _, s, r, n = masked_mse(_run_unit(module, rec, device), rec.output.to(device), _mask(rec, device))
                sq, ref, count = sq + s, ref + r, count + n
            out.append({"mse": sq / max(count, 1.0), "rel": math.sqrt(sq / ref) if ref > 0 else float("nan")})
    return out


def adamw(params, lr: float, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW, fused where torch has the fused kernel for the parameters' device: on a CPU
    the per-tensor loop costs about as much as a training step's products."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _reset_adam_state(opt: torch.optim.Optimizer, param: torch.Tensor, where: torch.Tensor) -> None:
    state = opt.state.get(param)
    if state:
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key].masked_fill_(where, 0.0)


def train_group(model: nn.Module, spec: GroupSpec, records: Dict[str, List[Record]], config: TrainConfig,
                rank: int, *, device=None, progress: bool = True, desc: str = "") -> GroupResult:
    """Train one group and return its :class:`GroupResult` (the model is left as it was)."""
    start = time.perf_counter()
    kinds = spec.kinds
    linears = [get_submodule(model, name) for name in spec.linears]
    device = device if device is not None else linears[0].weight.device
    ptype = config.pattern_tuple[0]
    if config.pruning not in ("gmp", "rigl"):
        raise ValueError(f"pruning must be 'gmp' or 'rigl', got {config.pruning!r}")
    if config.pruning == "rigl" and ptype != "unstructured":
        raise ValueError(f"RigL keeps an unstructured mask; pattern {config.pattern!r} needs pruning='gmp'")
    unit_records = [records[u.name] for u in spec.units]
    n_batches = len(unit_records[0])
    if any(len(r) != n_batches for r in unit_records):
        raise RuntimeError(f"group {spec.index}: its units were called a different number of times per calibration "
                           f"pass ({[len(r) for r in unit_records]}); each unit must run once per batch")

    with torch.no_grad():
        U, Vs = svd_factors(linears, kinds, rank, svd_device=device)
    biases = [None if getattr(lin, "bias", None) is None else lin.bias.detach() for lin in linears]
    group = TrainableGroup(U, Vs, biases, kinds).to(device)
    group.qbits, group.qgroup, group.base_qbits = config.qbits, config.qgroup, config.base_qbits
    final_keep = schedule.final_keep_counts(kinds, rank, spec.hidden, config.pattern_tuple, config.sparsity)
    nm_gradual = config.nm_schedule == "gradual"
    if config.nm_schedule not in ("gradual", "fixed"):
        raise ValueError(f"nm_schedule must be 'gradual' or 'fixed', got {config.nm_schedule!r}")

    def masks_at(frac, prev):
        return schedule.magnitude_masks(list(group.V), prev, kinds, config.pattern_tuple, frac, final_keep,
                                        config.mask_scope, nm_gradual)

    # put the training layers into the model, freeze everything else; always restore
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for name, i in zip(spec.linears, range(len(linears))):
        set_submodule(model, name, group.linear(i))
    was_training = model.training
    model.eval()
    try:
        modules = [get_submodule(model, u.name) for u in spec.units]
        init_masks = masks_at(1.0, None)  # SVD init + magnitude masks at the final sparsity
        dense_V = [v.detach().clone() for v in group.V]
        group.set_masks(init_masks)
        errors_init = evaluate(modules, unit_records, device)
        if config.pruning == "gmp" and config.steps > 0:
            # start dense and prune gradually (N:M "fixed": the final pattern from step 0)
            with torch.no_grad():
                for v, d in zip(group.V, dense_V):
                    v.copy_(d)
            group.set_masks([torch.ones_like(mk) for mk in init_masks])
        losses = _optimise(group, modules, unit_records, config, masks_at, progress, desc, device, spec.index)
        group.apply_masks()
        errors_final = evaluate(modules, unit_records, device) if config.steps > 0 else errors_init
    finally:
        for name, lin in zip(spec.linears, linears):
            set_submodule(model, name, lin)
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)

    masks = [mk.detach().cpu().clone() for mk in group.masks]
    return GroupResult(
        index=spec.index, rank=rank, U=group.U.detach().cpu().clone(),
        Vs=[(v.detach() * mk.to(v.device)).cpu().clone() for v, mk in zip(group.V, group.masks)], masks=masks,
        biases=[None if group.bias(i) is None else group.bias(i).detach().cpu().clone() for i in range(len(kinds))],
        errors_init=errors_init, errors_final=errors_final, losses=losses,
        seconds=time.perf_counter() - start)


def _optimise(group: TrainableGroup, modules, unit_records, config: TrainConfig, masks_at, progress: bool,
              desc: str, device, index: int) -> List[Tuple[int, float]]:
    steps = config.steps
    if steps <= 0:
        return []
    decay = [group.U, *group.V]
    params = [{"params": decay, "weight_decay": config.weight_decay}]
    if len(group.biases):
        params.append({"params": list(group.biases.values()), "weight_decay": 0.0})
    opt = adamw(params, config.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * t / steps)))
    t_end = min(schedule.prune_end_step(steps, config.prune_end), steps - 1)
    updates = set(schedule.update_steps(steps, config.prune_every, config.prune_end))
    n_batches = len(unit_records[0])
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
    order: List[int] = []
    losses: List[Tuple[int, float]] = []
    log_every = max(1, steps // 50)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc=desc, leave=True, dynamic_ncols=True)
    try:
        for t in range(steps):
            rigl_now = config.pruning == "rigl" and t in updates and 0 < t < t_end
            if config.pruning == "gmp" and t in updates:
                frac = schedule.cubic_fraction(t, t_end) if config.prune_schedule == "cubic" else \
                    schedule.accelerated_fraction(t, t_end, config.prune_every, config.sparsity)
                group.set_masks(masks_at(frac, group.masks))
            if not order:
                order = torch.randperm(n_batches, generator=gen).tolist()
            j = order.pop()
            group.capture_dense_grad = rigl_now
            group.dense_grads = [None] * len(group.V)
            total = 0.0
            for module, recs in zip(modules, unit_records):
                rec = recs[j]
                loss = masked_mse(_run_unit(module, rec, device), rec.output.to(device), _mask(rec, device))[0]
                loss.backward()
                total += float(loss.detach())
            group.capture_dense_grad = False
            if rigl_now:
                grads = [g if g is not None else torch.zeros_like(v) for g, v in zip(group.dense_grads, group.V)]
                old = group.masks
                new = schedule.rigl_update(list(group.V), grads, old, schedule.rigl_fraction(t, t_end, config.rigl_alpha),
                                           config.mask_scope)
                for i, (o, nw) in enumerate(zip(old, new)):
                    grown = nw & ~o
                    _reset_adam_state(opt, group.V[i], grown)
                    with torch.no_grad():
                        group.V[i].masked_fill_(grown, 0.0)  # RigL grows connections at zero
                group.set_masks(new)
                for i, v in enumerate(group.V):
                    if v.grad is not None:
                        v.grad.mul_(group.mask(i))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            group.apply_masks()  # AdamW's momentum would otherwise move pruned entries
            if t % log_every == 0 or t == steps - 1:
                losses.append((t, total))
            if bar is not None:
                density = sum(int(mk.sum()) for mk in group.masks) / sum(mk.numel() for mk in group.masks)
                bar.set_postfix(loss=f"{total:.3e}", density=f"{density:.3f}", refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return losses
