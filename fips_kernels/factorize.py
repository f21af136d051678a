"""The paper's initialisation of a group: :func:`svd_init` (stacked SVD and
overcomplete growth) and :func:`factorize_group` (rank from the budget, SVD or
PGD, magnitude masks, packing into :class:`~fips_kernels.modules.FiPSLinear`).

No training here: that is :func:`fips_kernels.compress`.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import reference
from .budget import group_rank, resolve_sparsity
from .formats import DEFAULT_TILE, FormatError, SparseFactor
from .masks import SCOPES, group_masks
from .modules import KINDS, FiPSGroup, FiPSLinear, SharedBase

__all__ = ["factorize_group", "svd_init", "infer_kinds", "d_by_h"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def infer_kinds(weights: Sequence[torch.Tensor]) -> List[str]:
    """``"expand"`` for a weight ``(h × d)`` with ``h > d``, ``"contract"`` for ``h < d``."""
    kinds = []
    for i, w in enumerate(weights):
        out_f, in_f = w.shape
        if out_f == in_f:
            raise ValueError(f"factorize_group: cannot tell whether layer {i} ({in_f}→{out_f}) expands or "
                             f"contracts; pass kinds=[...]")
        kinds.append("expand" if out_f > in_f else "contract")
    return kinds


def d_by_h(weights: Sequence[torch.Tensor], kinds: Sequence[str]) -> List[torch.Tensor]:
    """Each weight in ``d × h`` orientation (an expand weight ``h × d`` transposed)."""
    return [w.t() if k == "expand" else w for w, k in zip(weights, kinds)]


def svd_init(mats: Sequence[torch.Tensor], rank: int, device: Optional[torch.device] = None
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SVD start of a group: ``(M, U, V)`` in fp32 with ``M (d × Σh)`` the
    stacked ``d × h`` weights, ``U (d × r)`` the left singular vectors and
    ``V = diag(S)·Vhᵀ (r × Σh)``, truncated to ``rank``. When ``r`` exceeds the
    SVD's size the base is overcomplete: ``U`` gets zero columns and ``V``
    extra rows copied from its top rows divided by 32, so ``U·V`` is unchanged
    and the new columns still receive gradient (DESIGN §1)."""
    work = torch.cat(list(mats), dim=1).to(device=device or mats[0].device, dtype=torch.float32)
    P, S, Qh = torch.linalg.svd(work, full_matrices=False)
    k = S.shape[0]
    Vfull = S.unsqueeze(1) * Qh  # (k × H)
    if rank <= k:
        return work, P[:, :rank], Vfull[:rank]
    extra = rank - k
    U = torch.cat([P, P.new_zeros(P.shape[0], extra)], dim=1)
    V = torch.cat([Vfull, Vfull[torch.arange(extra, device=Vfull.device) % k] / 32], dim=0)
    return work, U, V


def factorize_group(linears: Sequence[nn.Module], *, budget: float = 0.5, sparsity: Optional[float] = None,
                    pattern: str = "unstructured", kinds: Optional[Sequence[str]] = None,
                    rank: Optional[int] = None, mask_scope: str = "global", format: Optional[str] = None,
                    tile: Tuple[int, int] = DEFAULT_TILE, dtype: Optional[torch.dtype] = None,
                    svd_device: Optional[torch.device] = None, qbits: Optional[int] = None,
                    qgroup: int = 64, base_qbits: Optional[int] = None, method: str = "svd",
                    pgd_steps: int = 100, gram: Optional[torch.Tensor] = None) -> FiPSGroup:
    """Factorise a group of linear layers into one shared base and sparse factors.

    The paper's initialisation (no training: that is ``fips_kernels.compress``):
    the weights are stacked in ``d × h`` orientation along the hidden axis into
    ``M (d × Σh)``; ``U`` = the left singular vectors, ``V = diag(S)·Vhᵀ``,
    truncated to the rank the budget allows (:func:`svd_init`; overcomplete
    when ``r > d``). Masks keep the largest-magnitude entries of ``V`` (over
    the whole group by default; :mod:`fips_kernels.masks`).

    Args:
        linears: the group's ``nn.Linear`` layers (expand: d→h, contract: h→d).
        budget: kept fraction ``p`` of the group's weight parameters; ``d·r +
            Σ nnz(V_i) ≤ p · Σ d·h_i`` holds exactly (biases not counted).
        sparsity: ``s`` of the factors (default 0.75 for unstructured; implied
            by an N:M pattern; 0 for ``"dense"``).
        pattern: ``"unstructured"``, ``"dense"``, ``"N:M"`` (e.g. ``"1:4"``)
            along each product's reduction axis (r for expand, h for contract),
            or ``"topK"`` (e.g. ``"top4"``): at most K non-zeros per hidden unit
            (a column of V; the ``ell`` format, served by the tile-reconstruct kernel).
        kinds: ``"expand"``/``"contract"`` per layer (inferred from the shapes when None).
        rank: override the budget's rank.
        mask_scope: ``"global"`` (one magnitude threshold over the group) or ``"layer"``.
        format: storage format (default: ``bitmap`` for unstructured, ``nm``, ``dense``, ``ell``).
        tile: bitmap tile.
        dtype: floating dtype of the result (default: the weights' dtype).
        svd_device: where to run the SVD (default: the weights' device).
        qbits, qgroup: quantise the factors' values to int8/int4 with one scale
            per ``qgroup`` rows of each reduction axis (docs/FORMATS.md).
        base_qbits: 8 for an int8 base with per-column scales.
        method: ``"svd"`` (mask the SVD factors, then round: the paper's init)
            or ``"pgd"`` (then :func:`fips_kernels.pgd.pgd_factorize`:
            projected gradient descent onto the sparse set and the grids).
        pgd_steps: PGD iterations. gram: optional ``(d, d)`` weighting of the
            error for PGD (e.g. ``XᵀX`` of calibration inputs of the expand layers).
    Returns:
        a :class:`FiPSGroup` whose ``info`` holds the rank, budget, parameter and
        byte counts and each layer's relative reconstruction error.
    """
    if len(linears) == 0:
        raise ValueError("factorize_group: needs at least one linear layer")
    if dtype is not None and dtype not in _FLOAT_DTYPES:
        raise ValueError(f"factorize_group: dtype must be a floating dtype {_FLOAT_DTYPES} (int8/int4 factors "
                         f"come from qbits=8|4), got dtype={dtype}")
    weights = [lin.weight.detach() for lin in linears]
    for i, w in enumerate(weights):
        if w.dim() != 2:
            raise ValueError(f"factorize_group: layer {i} weight must be 2-D, got {tuple(w.shape)}")
    kinds = list(kinds) if kinds is not None else infer_kinds(weights)
    if len(kinds) != len(weights) or any(k not in KINDS for k in kinds):
        raise ValueError(f"factorize_group: kinds must list 'expand'/'contract' for each of the "
                         f"{len(weights)} layers, got {kinds}")
    mats = d_by_h(weights, kinds)
    d = mats[0].shape[0]
    for i, mat in enumerate(mats):
        if mat.shape[0] != d:
            raise ValueError(f"factorize_group: layer {i} ({kinds[i]}, weight {tuple(weights[i].shape)}) "
                             f"does not share the model width d={d} of layer 0; groups never cross a change of d")
    hidden = [mat.shape[1] for mat in mats]
    try:
        pat, sparsity = resolve_sparsity(pattern, sparsity)
    except ValueError as exc:
        if isinstance(exc, FormatError):
            raise
        raise ValueError(f"factorize_group: {exc}") from None
    if mask_scope not in SCOPES:
        raise ValueError(f"factorize_group: mask_scope must be 'global' or 'layer', got {mask_scope!r}")
    if not 0.0 < budget <= 1.0 and rank is None:
        raise ValueError(f"factorize_group: budget must be in (0, 1], got {budget}")
    fmt = format or pat.default_format
    if fmt not in pat.formats:
        raise ValueError(f"factorize_group: format {fmt!r} does not fit pattern {pattern!r}")
    if method not in ("svd", "pgd"):
        raise ValueError(f"factorize_group: method must be 'svd' or 'pgd', got {method!r}")

    dense_params = sum(d * h for h in hidden)
    if rank is None:
        try:
            rank = group_rank(d, hidden, kinds, pattern, budget, sparsity if pat.kind == "unstructured" else None)
        except ValueError as exc:
            raise ValueError(f"factorize_group: {exc}") from None
    if rank < 1:
        raise ValueError(f"factorize_group: rank must be >= 1, got {rank}")

    out_dtype = dtype or weights[0].dtype
    device = weights[0].device
    work, U, Vall = svd_init(mats, rank, svd_device or device)
    if method == "pgd":
        from .pgd import pgd_factorize

        if qbits and fmt not in ("dense", "nm", "bitmap"):
            raise ValueError(f"factorize_group: the {fmt} format cannot be quantised")
        result = pgd_factorize(work, U, Vall, widths=hidden, kinds=kinds, pattern=pattern, sparsity=sparsity,
                               scope=mask_scope, qbits=qbits, qgroup=qgroup, base_qbits=base_qbits,
                               steps=pgd_steps, G=gram)
        U, Vall = result.U, result.V  # already sparse and on the grids
    U = U.to(device)
    Vs = [v.to(device) for v in Vall.split(hidden, dim=1)]
    masks = group_masks(Vs, kinds, pat, sparsity, mask_scope)

    base = SharedBase(U.to(out_dtype).contiguous())
    if base_qbits:
        base.quantize_(base_qbits)
    layers, errors = [], []
    for lin, kind, V, mask, W in zip(linears, kinds, Vs, masks, weights):
        Vm = (V * mask).to(out_dtype)
        B = Vm if kind == "expand" else Vm.t()
        factor = SparseFactor.pack(B.contiguous(), fmt, qbits=qbits, qgroup=qgroup,
                                   **pat.format_params(fmt, kind, rank, tile))
        bias = lin.bias.detach().to(out_dtype).clone() if getattr(lin, "bias", None) is not None else None
        layers.append(FiPSLinear(base, factor, kind, bias))
        with torch.no_grad():
            W_hat = reference.linear_weight(base.operand, factor, kind).float()
            errors.append(float((W_hat - W.float()).norm() / W.float().norm().clamp_min(1e-30)))
    group = FiPSGroup(base, layers)
    if pat.kind == "topk":
        sparsity = 1.0 - min(pat.n, rank) / rank
    group.info = {
        "rank": rank, "budget": budget, "sparsity": sparsity, "pattern": pattern, "format": fmt,
        "qbits": qbits, "qgroup": qgroup if qbits else None, "base_qbits": base_qbits, "method": method,
        "kinds": kinds, "d": d, "hidden": hidden,
        "dense_parameters": dense_params,
        "parameters": base.U.numel() + sum(layer.factor.nnz for layer in layers),
        "dense_bytes": dense_params * torch.empty((), dtype=out_dtype).element_size(),
        "bytes": group.nbytes() - sum(layer.bias_nbytes() for layer in layers),
        "relative_errors": errors,
    }
    return group
