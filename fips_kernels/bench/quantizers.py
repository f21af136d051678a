"""The quality benchmark's peers: weight compressors a user would pick instead
of FiPS, each defined once, each returning the weight it leaves and every byte
it stores.

* :func:`rtn` — round to nearest on an asymmetric min-max grid (``bits``, one
  fp16 scale and one ``bits``-bit integer zero point per ``group`` inputs of
  an output row), no calibration;
* :func:`gptq` — GPTQ (Frantar et al., arXiv 2210.17323, Algorithm 1): the
  same grid, columns quantised left to right, each rounding error spread
  over the columns not yet quantised through the inverse Hessian ``H⁻¹`` of
  the layer's calibration inputs (``H = XᵀX``; Cholesky form, lazy batches
  of 128 columns, 1 % dampening);
* :func:`sparsegpt` — SparseGPT (Frantar & Alistarh, arXiv 2301.00774): the
  same loop, pruning by ``w² / [H⁻¹]_jj²`` per block of columns (unstructured)
  or per group of ``m`` inputs (N:M), optionally quantising what is kept;
* :func:`wanda` — Wanda (Sun et al., arXiv 2306.11695): prune by
  ``|w| · ‖x_j‖`` per output row, no update;
* :func:`hqq_weight` — HQQ (the ``hqq`` package's own quantiser: half-quadratic
  optimisation of the zero point and scale), fp16 scale and zero per group;
* :func:`torchao_weight` — torchao's weight-only configs applied to a copy of
  the layer: ``Int8WeightOnlyConfig``, and ``IntxWeightOnlyConfig`` for 2–4 bits
  (its CPU path; ``Int4WeightOnlyConfig`` needs CUDA kernels).

Bytes (:class:`Compressed`) are counted the way the FiPS report counts its
own: the values at their bit width, packed; indices of sparse weights in the
package's own ``bitmap`` / ``nm`` layouts (bitmask words and tile offsets, or
N:M position words, exactly :attr:`SparseFactor.nbytes`); scales and zero
points as stored (fp16; integer zero points at the value width). Biases are
left dense and counted on neither side.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

__all__ = ["Compressed", "rtn", "gptq", "sparsegpt", "wanda", "hqq_weight", "torchao_weight",
           "minmax_grid", "sparse_index_bytes"]


@dataclass
class Compressed:
    """A compressed weight: the weight the layer computes with (``out × in``,
    fp32, dequantised) and the bytes it is stored in."""

    weight: torch.Tensor
    nbytes: int


def _packed(count: int, bits: int) -> int:
    return -(-count * bits // 8)


def minmax_grid(x: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` per row of ``x`` for the asymmetric ``bits`` grid whose range
    holds the row's min and max and 0 (so a zero weight stays exactly zero); the
    scale is rounded to fp16 (what is stored), the zero point is an integer."""
    maxq = 2 ** bits - 1
    lo = torch.clamp(x.min(dim=1, keepdim=True).values, max=0.0)
    hi = torch.clamp(x.max(dim=1, keepdim=True).values, min=0.0)
    scale = ((hi - lo) / maxq)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).half().float()
    zero = torch.clamp(torch.round(-lo / scale), 0, maxq)
    return scale, zero


def _round(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    q = torch.clamp(torch.round(x / scale) + zero, 0, 2 ** bits - 1)
    return scale * (q - zero)


def _grid_bytes(rows: int, cols: int, bits: int, group: int, kept: Optional[int] = None) -> int:
    """Values (``kept`` of them, default all) at ``bits``, an fp16 scale and a
    ``bits``-bit zero point per ``group`` inputs of each row."""
    groups = rows * -(-cols // group)
    return _packed(rows * cols if kept is None else kept, bits) + 2 * groups + _packed(groups, bits)


def sparse_index_bytes(mask: torch.Tensor, pattern: str = "unstructured") -> int:
    """Bytes of the indices of the kept entries of an ``out × in`` weight in the
    package's own formats (along the reduction axis: the factor is ``Wᵀ``):
    bitmap (64 × 64 tiles, bitmask words + an int32 offset per tile) or N:M
    position words; the values themselves are not included."""
    from ..formats import SparseFactor

    B = mask.t().contiguous().float()
    if pattern == "unstructured":
        f = SparseFactor.pack(B, "bitmap")
    else:
        n, m = (int(v) for v in pattern.split(":"))
        f = SparseFactor.pack(B, "nm", n=n, m=m)
    return f.nbytes - f.values.numel() * f.values.element_size()


def rtn(W: torch.Tensor, bits: int, group: int = 64) -> Compressed:
    """Round to nearest: each ``group`` inputs of each output row on its own min-max grid."""
    rows, cols = W.shape
    W = W.float()
    out = torch.empty_like(W)
    for c in range(0, cols, group):
        block = W[:, c:c + group]
        scale, zero = minmax_grid(block, bits)
        out[:, c:c + group] = _round(block, scale, zero, bits)
    return Compressed(out, _grid_bytes(rows, cols, bits, group))


def _inverse_hessian_factor(H: torch.Tensor, damp: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(upper Cholesky factor of H⁻¹, dead columns)`` after dampening: the
    mean diagonal times ``damp`` is added; inputs that never fire (zero
    diagonal) get a unit diagonal and their weights are zeroed by the caller."""
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype)
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True).float(), dead


def _obs_loop(W: torch.Tensor, H: torch.Tensor, *, bits: Optional[int], group: int, sparsity: float = 0.0,
              nm: Optional[Tuple[int, int]] = None, block: int = 128, damp: float = 0.01
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The loop GPTQ and SparseGPT share: columns left to right, each pruned
    and/or rounded, the error ``(w − q) / [H⁻¹]_jj`` pushed onto the columns to
    its right along row ``j`` of the Cholesky factor of ``H⁻¹``. Returns the
    weight and the kept-entry mask."""
    if bits is not None and block % group:
        raise ValueError(f"the GPTQ block ({block}) must be a multiple of the group ({group})")
    W = W.float().clone()
    rows, cols = W.shape
    U, dead = _inverse_hessian_factor(H, damp)
    W[:, dead] = 0.0
    Q = torch.zeros_like(W)
    mask = torch.ones_like(W, dtype=torch.bool)
    scale = zero = None
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err = torch.zeros_like(W1)
        keep = torch.ones_like(W1, dtype=torch.bool)
        d = torch.diag(U1)
        if sparsity > 0 and nm is None:  # SparseGPT: the smallest w²/d² of the block go
            score = W1.square() / d.square().unsqueeze(0)
            k = int(score.numel() * sparsity)
            if k:
                keep.view(-1)[torch.topk(score.flatten(), k, largest=False).indices] = False
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                score = W1[:, i:i + m].square() / d[i:i + m].square().unsqueeze(0)
                drop = torch.topk(score, score.shape[1] - n, dim=1, largest=False).indices if score.shape[1] > n \
                    else None
                if drop is not None:
                    keep[:, i:i + m].scatter_(1, drop, False)
            w = W1[:, i]
            if bits is not None and (i1 + i) % group == 0:
                scale, zero = minmax_grid(W1[:, i:i + group] * keep[:, i:i + group], bits)
            q = w * keep[:, i]
            if bits is not None:
                q = _round(q.unsqueeze(1), scale, zero, bits).squeeze(1) * keep[:, i]
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ U1[i, i:].unsqueeze(0)
            Q[:, i1 + i] = q
            Err[:, i] = err
        mask[:, i1:i2] = keep
        W[:, i2:] -= Err @ U[i1:i2, i2:]
    return Q, mask


def gptq(W: torch.Tensor, H: torch.Tensor, bits: int, group: int = 64, *, block: int = 128,
         damp: float = 0.01) -> Compressed:
    """GPTQ: ``W (out × in)`` on the :func:`rtn` grid, with ``H = XᵀX`` (``in × in``) of
    the layer's calibration inputs."""
    rows, cols = W.shape
    Q, _ = _obs_loop(W, H, bits=bits, group=group, block=block, damp=damp)
    return Compressed(Q, _grid_bytes(rows, cols, bits, group))


def sparsegpt(W: torch.Tensor, H: torch.Tensor, sparsity: float = 0.5, *, pattern: str = "unstructured",
              bits: Optional[int] = None, group: int = 64, block: int = 128, damp: float = 0.01) -> Compressed:
    """SparseGPT: prune ``W`` to ``sparsity`` (unstructured) or an ``n:m`` pattern along
    the inputs, optionally rounding the kept values to ``bits`` (joint sparsification
    and quantisation); float values are stored in fp16."""
    rows, cols = W.shape
    nm = None if pattern == "unstructured" else tuple(int(v) for v in pattern.split(":"))
    Q, mask = _obs_loop(W, H, bits=bits, group=group, sparsity=0.0 if nm else sparsity, nm=nm, block=block,
                        damp=damp)
    if bits is None:
        Q = Q.half().float()
    return Compressed(Q, _sparse_bytes(mask, pattern, bits, group))


def _sparse_bytes(mask: torch.Tensor, pattern: str, bits: Optional[int], group: int) -> int:
    rows, cols = mask.shape
    stored = int(mask.sum()) if pattern == "unstructured" else \
        rows * -(-cols // int(pattern.split(":")[1])) * int(pattern.split(":")[0])
    values = 2 * stored if bits is None else _grid_bytes(rows, cols, bits, group, kept=stored)
    return values + sparse_index_bytes(mask, pattern)


def wanda(W: torch.Tensor, input_norms: torch.Tensor, sparsity: float = 0.5, *,
          pattern: str = "unstructured") -> Compressed:
    """Wanda: keep, in each output row, the inputs with the largest ``|w_ij| · ‖x_j‖``
    (``input_norms``: the L2 norm of each input feature over the calibration tokens);
    values in fp16."""
    W = W.float()
    rows, cols = W.shape
    score = W.abs() * input_norms.float().unsqueeze(0)
    keep = torch.zeros_like(W, dtype=torch.bool)
    if pattern == "unstructured":
        k = cols - int(cols * sparsity)
        keep.scatter_(1, torch.topk(score, k, dim=1).indices, True)
    else:
        n, m = (int(v) for v in pattern.split(":"))
        if cols % m:
            raise ValueError(f"wanda {pattern}: {cols} inputs are not a multiple of {m}")
        idx = torch.topk(score.view(rows, cols // m, m), n, dim=2).indices
        keep.view(rows, cols // m, m).scatter_(2, idx, True)
    return Compressed((W * keep).half().float(), _sparse_bytes(keep, pattern, None, 64))


def hqq_weight(W: torch.Tensor, bits: int, group: int = 64) -> Compressed:
    """HQQ via the ``hqq`` package (``HQQLinear`` with its default optimiser); the
    fp16 scale and zero point per group it stores in half precision are rounded to
    fp16 here too. Raises ImportError without ``hqq``."""
    import copy

    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    rows, cols = W.shape
    lin = torch.nn.Linear(cols, rows, bias=False)
    with torch.no_grad():
        lin.weight.copy_(W.float())
    layer = HQQLinear(copy.deepcopy(lin), BaseQuantizeConfig(nbits=bits, group_size=group),
                      compute_dtype=torch.float32, device="cpu")
    for key in ("scale", "zero"):
        layer.meta[key] = layer.meta[key].half().float()
    with torch.no_grad():
        Wq = layer.dequantize().float().reshape(rows, cols)
    groups = rows * -(-cols // group)
    return Compressed(Wq, _packed(rows * cols, bits) + 4 * groups)


def torchao_weight(W: torch.Tensor, bits: int, group: int = 64) -> Compressed:
    """torchao's weight-only quantisation of an ``nn.Linear`` holding ``W``:
    ``Int8WeightOnlyConfig`` (one scale per output channel) for 8 bits,
    ``IntxWeightOnlyConfig`` (symmetric, one scale per ``group`` inputs; torchao's CPU
    path) for 2 to 4 bits. The weight the quantised layer computes with is read back
    by feeding it the identity. Bytes: the values at their bit width and one fp16
    scale per group or channel. Raises whatever torchao raises where it cannot run."""
    from torchao.quantization import quantize_

    rows, cols = W.shape
    lin = torch.nn.Linear(cols, rows, bias=False)
    with torch.no_grad():
        lin.weight.copy_(W.float())
    if bits == 8:
        from torchao.quantization import Int8WeightOnlyConfig

        quantize_(lin, Int8WeightOnlyConfig())
        nbytes = rows * cols + 2 * rows
    elif bits in (2, 3, 4):
        from torchao.quantization import IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerGroup

        quantize_(lin, IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerGroup(group)))
        nbytes = _packed(rows * cols, bits) + 2 * rows * -(-cols // group)
    else:
        raise ValueError(f"torchao weight-only: bits must be 8, 4, 3 or 2, got {bits}")
    with torch.no_grad():
        Wq = lin(torch.eye(cols)).float().t().contiguous()
    if not math.isfinite(float(Wq.abs().sum())):
        raise RuntimeError("torchao returned non-finite weights")
    return Compressed(Wq, nbytes)
