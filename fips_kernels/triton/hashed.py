"""Triton kernels of randomized parameter sharing (ROAST / STABLE-RPS layers).

The layer's weight ``W[o, i] = λ · s(o, i) · mem[idx(o, i)]`` is never
written to memory: every kernel computes ``idx`` (and the ROAST sign) of the
weight tile it needs from the hash (:mod:`fips_kernels.hashed.mapping`) and
loads the tile straight from the shared array ``mem``. No index tensor exists.

* forward ``y = λ · x·Wᵀ + b``: grid over (rows of x, output features), K
  loop over the input features; each K step loads a ``BLOCK_N × BLOCK_K``
  tile of ``W`` by hash.
* input gradient ``dx = λ · dy·W``: grid over (rows, input features), K loop
  over the output features.
* array gradient ``dmem[t] = Σ_{idx(o,i)=t} λ·s(o,i)·dW[o,i]`` with
  ``dW = dyᵀ·x``: each program computes one tile of ``dW`` (fp32) and either
  adds it into an fp32 buffer with ``tl.atomic_add`` (default; the M range may
  be split across programs), or — deterministic mode — stores ``dW`` in an
  fp32 workspace that a second kernel reduces slot by slot in a fixed order:
  STABLE-RPS inverts its rotations analytically (slot ``t`` of partition ``c``
  holds ``ℓ = c·m + (t − g(c)) mod m``), ROAST walks, for each chunk of the
  array, the tiles that overlap it in tile order (a small list built once per
  layer from the mapping: two int32 per tile).

The mapping is a function of the element only, so any block sizes give the
same weights. The kernels' one constraint: a ROAST column block lies inside
one hash-tile column (``BLOCK ≤ TI``), so a tile row loads as one contiguous
run; the launchers clamp the block. When the alignment conditions hold (see
:func:`_hints_ok`), the loads carry ``multiple_of``/``max_contiguous`` hints so
they vectorise.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..hashed.mapping import HashSpec, roast_offset

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
STRATEGY_ENV = "FIPS_KERNELS_HASHED_STRATEGY"
STRATEGIES = ("fused", "materialize")

__all__ = ["linear", "grad_input", "grad_memory", "weight", "scatter", "Blocks", "choose_blocks",
           "STRATEGIES", "INTERPRETED"]


# ---------------------------------------------------------------- the mapping, in Triton

@triton.jit
def _stable_g(c, K0, K1, CHOICES, ALIGN: tl.constexpr):
    """Rotation ``g(c)`` of partition ``c`` (int64 in, int64 out)."""
    c64 = tl.cast(c, tl.int64)
    h = ((c64 * K0) % 2147483647 + K1) % 2147483647
    return (h % CHOICES) * ALIGN


@triton.jit
def _roast_h(a, b, KA, KB, KJ):
    """``(KA·a + KB·b + KJ) mod P`` with ``KJ`` the layer term, int64."""
    return ((tl.cast(a, tl.int64) * KA) % 2147483647 + (tl.cast(b, tl.int64) * KB) % 2147483647 + KJ) % 2147483647


@triton.jit
def _row_state(rows, L0, IN, MSIZE, K0, K1, CHOICES,
               METHOD: tl.constexpr, TO: tl.constexpr, TI: tl.constexpr, ALIGN: tl.constexpr,
               WIDE: tl.constexpr):
    """What the rows of a tile share (computed once per row block).

    STABLE: ``(ℓ_row mod m, g(c_row), g(c_row + 1))`` (``ℓ_row`` itself when
    WIDE, i.e. a row may span more than two partitions). ROAST:
    ``((K0·a) mod P, (o mod TO)·TI, a)``.
    """
    if METHOD == 0:
        ell = L0 + rows.to(tl.int64) * IN
        if WIDE:
            s0 = ell
            s1 = rows
            s2 = rows
        else:
            c = ell // MSIZE
            s0 = (ell - c * MSIZE).to(tl.int32)
            s1 = _stable_g(c, K0, K1, CHOICES, ALIGN).to(tl.int32)
            s2 = _stable_g(c + 1, K0, K1, CHOICES, ALIGN).to(tl.int32)
    else:
        a = rows // TO
        s0 = (a.to(tl.int64) * K0) % 2147483647
        s1 = (rows % TO) * TI
        s2 = a
    return s0, s1, s2


@triton.jit
def _tile_idx(s0, s1, s2, col0, cols, MSIZE, K0, K1, OJ, K4, K5, SJ, CHOICES,
              METHOD: tl.constexpr, TI: tl.constexpr, ALIGN: tl.constexpr, SIGN: tl.constexpr,
              WIDE: tl.constexpr, HINTS: tl.constexpr):
    """Slots ``idx`` (rows × cols, int32) and the per-row sign (int32 ±1) of a
    tile whose columns ``cols`` start at ``col0``. For ROAST the columns lie in
    one hash-tile column (the launchers guarantee it)."""
    if METHOD == 0:
        if WIDE:
            ell = s0[:, None] + cols.to(tl.int64)[None, :]
            c = ell // MSIZE
            idx = ((_stable_g(c, K0, K1, CHOICES, ALIGN) + ell - c * MSIZE) % MSIZE).to(tl.int32)
        else:
            r = s0[:, None] + cols[None, :]
            cross = r >= MSIZE
            r = tl.where(cross, r - MSIZE, r)
            idx = tl.where(cross, s2[:, None], s1[:, None]) + r
            idx = tl.where(idx >= MSIZE, idx - MSIZE, idx)
            if HINTS:
                idx = tl.max_contiguous(tl.multiple_of(idx, [1, ALIGN]), [1, ALIGN])
        sgn = s1 * 0 + 1
    else:
        b = col0 // TI
        h = (s0 + (tl.cast(b, tl.int64) * K1) % 2147483647 + OJ) % 2147483647
        base = ((h % CHOICES) * ALIGN).to(tl.int32) + s1 + (col0 % TI)
        if HINTS:
            base = tl.multiple_of(base, [ALIGN])
        idx = base[:, None] + (cols - col0)[None, :]
        if SIGN:
            hs = _roast_h(s2, b, K4, K5, SJ)
            sgn = (1 - 2 * (hs % 2)).to(tl.int32)
        else:
            sgn = s1 * 0 + 1
    return idx, sgn


# ---------------------------------------------------------------- kernels

@triton.jit
def _fwd_kernel(x_ptr, stride_xm, stride_xk, mem_ptr, bias_ptr, out_ptr, stride_om, stride_on,
                M, N, K, MSIZE, L0, CHOICES, K0, K1, OJ, K4, K5, SJ, scale,
                METHOD: tl.constexpr, TO: tl.constexpr, TI: tl.constexpr, ALIGN: tl.constexpr,
                SIGN: tl.constexpr, WIDE: tl.constexpr, HINTS: tl.constexpr, HAS_BIAS: tl.constexpr,
                DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out = scale · x·Wᵀ + bias``; ``W (N × K)`` read by hash. N = out, K = in."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    s0, s1, s2 = _row_state(offs_n, L0, K, MSIZE, K0, K1, CHOICES, METHOD, TO, TI, ALIGN, WIDE)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        idx, sgn = _tile_idx(s0, s1, s2, k0, offs_k, MSIZE, K0, K1, OJ, K4, K5, SJ, CHOICES,
                             METHOD, TI, ALIGN, SIGN, WIDE, HINTS)
        w = tl.load(mem_ptr + idx, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if SIGN:
            w = tl.where(sgn[:, None] < 0, -w, w)
        acc = tl.dot(a.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc, input_precision=PRECISION)
    acc = acc * scale
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _grad_input_kernel(g_ptr, stride_gm, stride_go, mem_ptr, out_ptr, stride_om, stride_oi,
                       M, OUT, IN, MSIZE, L0, CHOICES, K0, K1, OJ, K4, K5, SJ, scale,
                       METHOD: tl.constexpr, TO: tl.constexpr, TI: tl.constexpr, ALIGN: tl.constexpr,
                       SIGN: tl.constexpr, WIDE: tl.constexpr, HINTS: tl.constexpr,
                       DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``dx = scale · dy·W``: reduction over the output features (rows of W)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = pid_n * BLOCK_N
    offs_n = col0 + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < IN
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, OUT, BLOCK_K):
        rows = k0 + tl.arange(0, BLOCK_K)
        r_ok = rows < OUT
        s0, s1, s2 = _row_state(rows, L0, IN, MSIZE, K0, K1, CHOICES, METHOD, TO, TI, ALIGN, WIDE)
        idx, sgn = _tile_idx(s0, s1, s2, col0, offs_n, MSIZE, K0, K1, OJ, K4, K5, SJ, CHOICES,
                             METHOD, TI, ALIGN, SIGN, WIDE, HINTS)
        w = tl.load(mem_ptr + idx, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        if SIGN:
            w = tl.where(sgn[:, None] < 0, -w, w)
        g = tl.load(g_ptr + offs_m[:, None] * stride_gm + rows[None, :] * stride_go,
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(g.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PRECISION)
    acc = acc * scale
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_oi,
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _grad_weight_kernel(g_ptr, stride_gm, stride_go, x_ptr, stride_xm, stride_xi, out_ptr,
                        M, M_PER_SPLIT, OUT, IN, MSIZE, L0, CHOICES, K0, K1, OJ, K4, K5, SJ, scale,
                        METHOD: tl.constexpr, TO: tl.constexpr, TI: tl.constexpr, ALIGN: tl.constexpr,
                        SIGN: tl.constexpr, WIDE: tl.constexpr, HINTS: tl.constexpr, ATOMIC: tl.constexpr,
                        DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_M: tl.constexpr):
    """One ``BLOCK_O × BLOCK_I`` tile of ``dW = dyᵀ·x`` over this program's M range.
    ATOMIC: ``scale·s·dW`` is added into the fp32 array-gradient buffer at the
    hashed slots. Otherwise the plain tile is stored into the fp32 ``(OUT, IN)``
    workspace (deterministic mode; no M split)."""
    pid_o = tl.program_id(0)
    pid_i = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    col0 = pid_i * BLOCK_I
    offs_i = col0 + tl.arange(0, BLOCK_I)
    o_ok = offs_o < OUT
    i_ok = offs_i < IN
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    m_begin = pid_s * M_PER_SPLIT
    m_end = tl.minimum(m_begin + M_PER_SPLIT, M)
    for m0 in range(m_begin, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_end
        g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_o[None, :] * stride_go,
                    mask=m_ok[:, None] & o_ok[None, :], other=0.0)
        xx = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_i[None, :] * stride_xi,
                     mask=m_ok[:, None] & i_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(g.to(DOT_DTYPE)), xx.to(DOT_DTYPE), acc, input_precision=PRECISION)
    mask = o_ok[:, None] & i_ok[None, :]
    if ATOMIC:
        s0, s1, s2 = _row_state(offs_o, L0, IN, MSIZE, K0, K1, CHOICES, METHOD, TO, TI, ALIGN, WIDE)
        idx, sgn = _tile_idx(s0, s1, s2, col0, offs_i, MSIZE, K0, K1, OJ, K4, K5, SJ, CHOICES,
                             METHOD, TI, ALIGN, SIGN, WIDE, HINTS)
        acc = acc * scale
        if SIGN:
            acc = tl.where(sgn[:, None] < 0, -acc, acc)
        tl.atomic_add(out_ptr + idx, acc, mask=mask)
    else:
        tl.store(out_ptr + offs_o.to(tl.int64)[:, None] * IN + offs_i[None, :], acc, mask=mask)


@triton.jit
def _weight_tile_kernel(mem_ptr, w_ptr, stride_wo, stride_wi, OUT, IN, MSIZE, L0, CHOICES, K0, K1, OJ, K4, K5, SJ,
                        scale, METHOD: tl.constexpr, TO: tl.constexpr, TI: tl.constexpr, ALIGN: tl.constexpr,
                        SIGN: tl.constexpr, WIDE: tl.constexpr, HINTS: tl.constexpr, SCATTER: tl.constexpr,
                        BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    """One ``(BLOCK_O × BLOCK_I)`` tile of the weight and its hashed slots: gather
    ``W = scale · s ⊙ mem[idx]`` into ``w_ptr`` (for ``.weight`` and large-M calls), or
    with ``SCATTER`` atomically add ``scale · s ⊙ dW`` (read from ``w_ptr``) into the
    fp32 array gradient at ``mem_ptr``."""
    offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    col0 = tl.program_id(1) * BLOCK_I
    offs_i = col0 + tl.arange(0, BLOCK_I)
    mask = (offs_o < OUT)[:, None] & (offs_i < IN)[None, :]
    s0, s1, s2 = _row_state(offs_o, L0, IN, MSIZE, K0, K1, CHOICES, METHOD, TO, TI, ALIGN, WIDE)
    idx, sgn = _tile_idx(s0, s1, s2, col0, offs_i, MSIZE, K0, K1, OJ, K4, K5, SJ, CHOICES,
                         METHOD, TI, ALIGN, SIGN, WIDE, HINTS)
    w_ptrs = w_ptr + offs_o[:, None] * stride_wo + offs_i[None, :] * stride_wi
    if SCATTER:
        v = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32) * scale
    else:
        v = tl.load(mem_ptr + idx, mask=mask, other=0.0).to(tl.float32) * scale
    if SIGN:
        v = tl.where(sgn[:, None] < 0, -v, v)
    if SCATTER:
        tl.atomic_add(mem_ptr + idx, v, mask=mask)
    else:
        tl.store(w_ptrs, v.to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _stable_reduce_kernel(dw_ptr, stride_do, stride_di, out_ptr, L0, IN, NL, MSIZE, C_FIRST, C_LAST,
                          K0, K1, CHOICES, scale, ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    """Deterministic STABLE-RPS array gradient: slot ``t`` sums, partition by
    partition in increasing ``c``, the one weight of each partition mapped to it."""
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    t_ok = t < MSIZE
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(C_FIRST, C_LAST + 1):
        g = _stable_g(c, K0, K1, CHOICES, ALIGN)
        r = t.to(tl.int64) - g
        r = tl.where(r < 0, r + MSIZE, r)
        rel = tl.cast(c, tl.int64) * MSIZE + r - L0  # flat index inside the layer
        ok = t_ok & (rel >= 0) & (rel < NL)
        o = rel // IN
        i = rel - o * IN
        acc += tl.load(dw_ptr + o * stride_do + i * stride_di, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t, acc * scale, mask=t_ok)


@triton.jit
def _roast_reduce_kernel(dw_ptr, stride_do, stride_di, units_ptr, chunk_ptr, out_ptr, OUT, IN, MSIZE, NB,
                         CHOICES, K0, K1, OJ, K4, K5, SJ, scale,
                         TO: tl.constexpr, TI: tl.constexpr, ALIGN: tl.constexpr, SIGN: tl.constexpr):
    """Deterministic ROAST array gradient: chunk ``q`` (``TO·TI`` slots) sums the
    tiles overlapping it, in tile order (``units[chunk[q]:chunk[q+1]]``)."""
    CH: tl.constexpr = TO * TI
    q = tl.program_id(0)
    slots = q * CH + tl.arange(0, CH)
    start = tl.load(chunk_ptr + q)
    end = tl.load(chunk_ptr + q + 1)
    acc = tl.zeros((CH,), dtype=tl.float32)
    for e in range(start, end):
        u = tl.load(units_ptr + e)
        a = u // NB
        b = u - a * NB
        off = ((_roast_h(a, b, K0, K1, OJ) % CHOICES) * ALIGN).to(tl.int32)
        pos = slots - off
        o = a * TO + pos // TI
        i = b * TI + pos % TI
        ok = (pos >= 0) & (pos < CH) & (o < OUT) & (i < IN)
        v = tl.load(dw_ptr + o.to(tl.int64) * stride_do + i * stride_di, mask=ok, other=0.0).to(tl.float32)
        if SIGN:
            hs = _roast_h(a, b, K4, K5, SJ)
            v = tl.where(hs % 2 == 1, -v, v)
        acc += v
    tl.store(out_ptr + slots, acc * scale, mask=slots < MSIZE)


# ---------------------------------------------------------------- launch

_TORCH_TO_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@dataclass(frozen=True)
class Blocks:
    """Block sizes of one launch. For the matmuls ``m, n, k`` (for the weight
    gradient: ``n`` = output-feature block, ``k`` = input-feature block,
    ``m`` = the M step); a ROAST column block is clamped to the tile width."""

    m: int = 64
    n: int = 64
    k: int = 64
    num_warps: int = 4
    num_stages: int = 2


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a small number still exercises the M split


def choose_blocks(M: int, device: torch.device) -> Blocks:
    """Heuristic block sizes by M (not autotuned yet: the GPU benchmark is to
    measure them)."""
    if device.type != "cuda":
        return Blocks(16 if M <= 16 else 32, 32, 32)
    if M <= 16:
        return Blocks(16, 64, 64, 4, 3)
    if M <= 64:
        return Blocks(64, 64, 64, 4, 3)
    return Blocks(128, 128, 64, 8, 3)


def _col_block(spec: HashSpec, want: int) -> int:
    """A column block inside one ROAST tile column (ROAST tiles are powers of two)."""
    return min(want, spec.tile[1]) if spec.method == "roast" else want


def _wide(spec: HashSpec) -> bool:
    return spec.method == "stable" and spec.in_features > spec.size


def _hints_ok(spec: HashSpec, col_block: int) -> bool:
    """Whether every ``align``-aligned group of columns of a tile row is ``align``
    contiguous slots starting at a multiple of ``align`` (so the loads may be
    vectorised). STABLE: partition and wrap boundaries fall on multiples of
    ``align`` when ``m``, ``in`` and ``ℓ₀`` are multiples of it. ROAST: offsets
    are multiples of ``align`` by construction; tile rows are when ``TI`` is."""
    A = spec.align
    if A < 2 or col_block % A:
        return False
    if spec.method == "stable":
        return not _wide(spec) and spec.size % A == 0 and spec.in_features % A == 0 and spec.offset % A == 0
    return spec.tile[1] % A == 0


def _args(spec: HashSpec):
    """Runtime ints of the kernels: (MSIZE, L0, CHOICES, K0, K1, OJ, K4, K5, SJ)."""
    k = spec.coef
    if spec.method == "stable":
        return spec.size, spec.offset, spec.choices, k[0], k[1], 0, 0, 0, 0
    return spec.size, 0, spec.choices, k[0], k[1], spec.layer_term(0), k[4], k[5], spec.layer_term(1)


def _consts(spec: HashSpec, col_block: int):
    return dict(METHOD=0 if spec.method == "stable" else 1, TO=spec.tile[0], TI=spec.tile[1], ALIGN=spec.align,
                SIGN=bool(spec.sign and spec.method == "roast"), WIDE=_wide(spec),
                HINTS=_hints_ok(spec, col_block))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch_opts(blocks: Blocks, device: torch.device) -> dict:
    return dict(num_warps=blocks.num_warps, num_stages=blocks.num_stages) if device.type == "cuda" else {}


def check_supported(spec: HashSpec, dtype: torch.dtype) -> None:
    if dtype not in _TORCH_TO_TL:
        raise ValueError(f"triton hashed kernels: dtype {dtype} is not supported")
    if spec.method == "roast" and spec.tile[1] < 16:
        raise ValueError(f"triton hashed kernels: ROAST tile width {spec.tile[1]} < 16 (the smallest kernel block)")


def choose_strategy(forced: Optional[str] = None) -> str:
    """``fused`` (hashed tiles loaded inside the matmul; default) or
    ``materialize`` (``W`` gathered once per call into a temporary, then cuBLAS)."""
    s = (forced or os.environ.get(STRATEGY_ENV, "") or "fused").strip().lower()
    if s not in STRATEGIES:
        raise ValueError(f"{STRATEGY_ENV}={s!r}: choose one of {STRATEGIES}")
    return s


def linear(x2: torch.Tensor, memory: torch.Tensor, bias: Optional[torch.Tensor], spec: HashSpec, scale: float,
           *, blocks: Optional[Blocks] = None, strategy: Optional[str] = None) -> torch.Tensor:
    """``y = λ·x·Wᵀ + b`` for ``x2 (M, in)`` → ``(M, out)`` in ``x2.dtype``."""
    check_supported(spec, x2.dtype)
    M = x2.shape[0]
    N, K = spec.out_features, spec.in_features
    if choose_strategy(strategy) == "materialize":
        return F.linear(x2, weight(memory, spec, scale, x2.dtype), bias)
    out = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    if M == 0:
        return out
    b = blocks or choose_blocks(M, x2.device)
    bk = _col_block(spec, b.k)
    grid = (triton.cdiv(M, b.m), triton.cdiv(N, b.n))
    _fwd_kernel[grid](
        x2, x2.stride(0), x2.stride(1), memory, bias if bias is not None else memory, out, out.stride(0), out.stride(1),
        M, N, K, *_args(spec), float(scale), **_consts(spec, bk), HAS_BIAS=bias is not None,
        DOT_DTYPE=_TORCH_TO_TL[x2.dtype], PRECISION=_precision(x2.dtype),
        BLOCK_M=b.m, BLOCK_N=b.n, BLOCK_K=bk, **_launch_opts(b, x2.device))
    return out


def grad_input(g2: torch.Tensor, memory: torch.Tensor, spec: HashSpec, scale: float, *,
               blocks: Optional[Blocks] = None, strategy: Optional[str] = None) -> torch.Tensor:
    """``dx = λ·dy·W`` for ``g2 (M, out)`` → ``(M, in)`` in ``g2.dtype``."""
    check_supported(spec, g2.dtype)
    M = g2.shape[0]
    if choose_strategy(strategy) == "materialize":
        return g2 @ weight(memory, spec, scale, g2.dtype)
    out = torch.empty(M, spec.in_features, device=g2.device, dtype=g2.dtype)
    if M == 0:
        return out
    b = blocks or choose_blocks(M, g2.device)
    bn = _col_block(spec, b.n)
    grid = (triton.cdiv(M, b.m), triton.cdiv(spec.in_features, bn))
    _grad_input_kernel[grid](
        g2, g2.stride(0), g2.stride(1), memory, out, out.stride(0), out.stride(1),
        M, spec.out_features, spec.in_features, *_args(spec), float(scale), **_consts(spec, bn),
        DOT_DTYPE=_TORCH_TO_TL[g2.dtype], PRECISION=_precision(g2.dtype),
        BLOCK_M=b.m, BLOCK_N=bn, BLOCK_K=b.k, **_launch_opts(b, g2.device))
    return out


def _grad_blocks(device: torch.device) -> Blocks:
    return Blocks(32, 32, 32) if device.type != "cuda" else Blocks(64, 64, 64, 4, 3)


def grad_memory(g2: torch.Tensor, x2: torch.Tensor, memory: torch.Tensor, spec: HashSpec, scale: float,
                deterministic: bool = False, *, blocks: Optional[Blocks] = None,
                split: Optional[int] = None) -> torch.Tensor:
    """The array's gradient ``(m,)`` in the memory's dtype, from ``g2 (M, out)``
    and ``x2 (M, in)``. ``deterministic``: no atomics; bitwise reproducible."""
    check_supported(spec, g2.dtype)
    M = g2.shape[0]
    OUT, IN = spec.out_features, spec.in_features
    b = blocks or _grad_blocks(g2.device)
    bi = _col_block(spec, b.k)
    tiles = triton.cdiv(OUT, b.n) * triton.cdiv(IN, bi)
    common = dict(DOT_DTYPE=_TORCH_TO_TL[g2.dtype], PRECISION=_precision(g2.dtype),
                  BLOCK_O=b.n, BLOCK_I=bi, BLOCK_M=b.m, **_consts(spec, bi), **_launch_opts(b, g2.device))
    if deterministic:
        dw = torch.zeros(OUT, IN, device=g2.device, dtype=torch.float32)
        if M > 0:
            _grad_weight_kernel[(triton.cdiv(OUT, b.n), triton.cdiv(IN, bi), 1)](
                g2, g2.stride(0), g2.stride(1), x2, x2.stride(0), x2.stride(1), dw,
                M, max(M, 1), OUT, IN, *_args(spec), 1.0, ATOMIC=False, **common)
        return _reduce(dw, spec, scale).to(memory.dtype)
    buf = torch.zeros(spec.size, device=g2.device, dtype=torch.float32)
    if M == 0:
        return buf.to(memory.dtype)
    m_blocks = triton.cdiv(M, b.m)
    if split is None:
        split = max(1, min(m_blocks, triton.cdiv(2 * _sm_count(g2.device), tiles), 64))
    split = max(1, min(split, m_blocks))
    m_per_split = triton.cdiv(m_blocks, split) * b.m
    split = triton.cdiv(M, m_per_split)
    _grad_weight_kernel[(triton.cdiv(OUT, b.n), triton.cdiv(IN, bi), split)](
        g2, g2.stride(0), g2.stride(1), x2, x2.stride(0), x2.stride(1), buf,
        M, m_per_split, OUT, IN, *_args(spec), float(scale), ATOMIC=True, **common)
    return buf.to(memory.dtype)


def weight(memory: torch.Tensor, spec: HashSpec, scale: float, dtype: Optional[torch.dtype] = None, *,
           blocks: Optional[Blocks] = None) -> torch.Tensor:
    """The materialised ``W (out × in)`` in ``dtype`` (default: the memory's)."""
    dtype = dtype or memory.dtype
    check_supported(spec, dtype)
    OUT, IN = spec.out_features, spec.in_features
    out = torch.empty(OUT, IN, device=memory.device, dtype=dtype)
    b = blocks or Blocks(32, 32, 64)
    bi = _col_block(spec, b.k)
    _weight_tile_kernel[(triton.cdiv(OUT, b.n), triton.cdiv(IN, bi))](
        memory, out, out.stride(0), out.stride(1), OUT, IN, *_args(spec), float(scale), **_consts(spec, bi),
        SCATTER=False, BLOCK_O=b.n, BLOCK_I=bi)
    return out


def scatter(grad_w: torch.Tensor, memory: torch.Tensor, spec: HashSpec, scale: float,
            deterministic: bool = False, *, blocks: Optional[Blocks] = None) -> torch.Tensor:
    """The array's gradient ``(m,)`` from a weight gradient ``(out × in)``."""
    check_supported(spec, grad_w.dtype)
    if deterministic:
        return _reduce(grad_w, spec, scale).to(memory.dtype)
    OUT, IN = spec.out_features, spec.in_features
    buf = torch.zeros(spec.size, device=grad_w.device, dtype=torch.float32)
    b = blocks or Blocks(32, 32, 64)
    bi = _col_block(spec, b.k)
    _weight_tile_kernel[(triton.cdiv(OUT, b.n), triton.cdiv(IN, bi))](
        buf, grad_w, grad_w.stride(0), grad_w.stride(1), OUT, IN, *_args(spec), float(scale),
        **_consts(spec, bi), SCATTER=True, BLOCK_O=b.n, BLOCK_I=bi)
    return buf.to(memory.dtype)


# ---------------------------------------------------------------- deterministic reduction

@functools.lru_cache(maxsize=64)
def _roast_chunks(spec: HashSpec, device: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """For each chunk ``q`` of ``TO·TI`` slots, the tiles that overlap it in
    increasing tile number: ``units[chunk[q]:chunk[q+1]]`` (int32)."""
    dev = torch.device(device)
    T = spec.tile_numel
    na, nb = spec.tiles
    u = torch.arange(na * nb, device=dev, dtype=torch.int64)
    off = roast_offset(spec, u // nb, u % nb)
    q0 = off // T
    q1 = (off + T - 1) // T
    both = q1 != q0
    q = torch.cat([q0, q1[both]])
    units = torch.cat([u, u[both]])
    order = torch.argsort(q * (na * nb) + units)  # by chunk, then tile number
    n_chunks = -(-spec.size // T)
    counts = torch.bincount(q, minlength=n_chunks)
    chunk = torch.zeros(n_chunks + 1, dtype=torch.int64, device=dev)
    chunk[1:] = torch.cumsum(counts, 0)
    return units[order].to(torch.int32).contiguous(), chunk.to(torch.int32).contiguous()


def _reduce(dw: torch.Tensor, spec: HashSpec, scale: float) -> torch.Tensor:
    """Fixed-order reduction of a weight gradient ``(out × in)`` into the
    array's fp32 gradient (deterministic)."""
    out = torch.empty(spec.size, device=dw.device, dtype=torch.float32)
    MSIZE, L0, CHOICES, K0, K1, OJ, K4, K5, SJ = _args(spec)
    if spec.method == "stable":
        n = spec.numel
        block = 256
        _stable_reduce_kernel[(triton.cdiv(MSIZE, block),)](
            dw, dw.stride(0), dw.stride(1), out, L0, spec.in_features, n, MSIZE, L0 // MSIZE, (L0 + n - 1) // MSIZE,
            K0, K1, CHOICES, float(scale), ALIGN=spec.align, BLOCK=block)
        return out
    units, chunk = _roast_chunks(spec, str(dw.device))
    _roast_reduce_kernel[(chunk.numel() - 1,)](
        dw, dw.stride(0), dw.stride(1), units, chunk, out, spec.out_features, spec.in_features, MSIZE,
        spec.tiles[1], CHOICES, K0, K1, OJ, K4, K5, SJ, float(scale),
        TO=spec.tile[0], TI=spec.tile[1], ALIGN=spec.align, SIGN=bool(spec.sign))
    return out
