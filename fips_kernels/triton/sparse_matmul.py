"""``out = act(A · B + bias)`` with ``B`` a packed sparse factor, decompressed
tile by tile in SRAM and fed to ``tl.dot`` ("load as sparse, compute as dense").

``A (M × K)`` is dense (any strides); ``B (K × N)`` is a reduction-major
factor in the ``dense``, ``nm`` or ``bitmap`` format (docs/FORMATS.md). The
dense ``B`` is never written to memory. Split-K spreads a small-M problem over
the GPU: each split writes an fp32 partial and a second kernel reduces them
in a fixed order (deterministic) and applies the epilogue.

A gated variant reads two factors with the same ``A`` and returns
``silu(A·B_gate + b_gate) * (A·B_up + b_up)`` (Llama/Gemma MLP).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ..formats import SparseFactor, nm_bits

# Whether these kernels were decorated for the interpreter (decided at import).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

FMT_CODES = {"dense": 0, "nm": 1, "bitmap": 2}
ACTIVATIONS = {None: 0, "none": 0, "gelu": 1, "silu": 2}


@triton.jit
def _load_vals(ptr, row, col, row_stride, mask, QBITS: tl.constexpr):
    """Stored values at index ``row`` (× ``row_stride``) + ``col``, as fp32.
    int4 holds two values per byte along the stored index, the first in the
    low nibble; int8 and float load directly. Dequantisation happens in
    registers: no dequantised copy is ever written."""
    if QBITS == 4:
        b = tl.load(ptr + (row // 2) * row_stride + col, mask=mask, other=0).to(tl.int32) & 0xFF
        nib = (b >> ((row % 2) * 4)) & 0xF
        val = (nib - ((nib >> 3) << 4)).to(tl.float32)
    else:
        val = tl.load(ptr + row * row_stride + col, mask=mask, other=0).to(tl.float32)
    return val


@triton.jit
def _b_tile(vals_ptr, aux0_ptr, aux1_ptr, s_ptr, k0, pid_n, offs_n, K, N,
            FMT: tl.constexpr, NM_N: tl.constexpr, NM_M: tl.constexpr, NM_BITS: tl.constexpr,
            QBITS: tl.constexpr, QG: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The dense (BLOCK_K × BLOCK_N) tile of the stored B (K × N) at rows
    k0 … k0+BLOCK_K and columns ``offs_n`` (column tile ``pid_n``), in fp32;
    quantised values (QBITS 8 or 4) times ``scales[k // QG, c]``."""
    n_ok = offs_n < N
    if FMT == 0:  # dense: values (K, N)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        tile = _load_vals(vals_ptr, offs_k[:, None], offs_n[None, :], N,
                          (offs_k[:, None] < K) & n_ok[None, :], QBITS)
    elif FMT == 1:  # nm: n stored rows per group of m; positions packed NM_BITS wide in int32 words
        GROUPS: tl.constexpr = BLOCK_K // NM_M
        PER_WORD: tl.constexpr = 32 // NM_BITS
        n_groups = (K + NM_M - 1) // NM_M
        g = k0 // NM_M + tl.arange(0, GROUPS)
        ok = (g < n_groups)[:, None] & n_ok[None, :]
        within = tl.arange(0, NM_M)
        dense = tl.zeros((GROUPS, NM_M, BLOCK_N), dtype=tl.float32)
        for t in tl.static_range(NM_N):
            j = g * NM_N + t
            v = _load_vals(vals_ptr, j[:, None], offs_n[None, :], N, ok, QBITS)
            w = tl.load(aux0_ptr + (j // PER_WORD)[:, None] * N + offs_n[None, :], mask=ok, other=0)
            pos = (w >> ((j % PER_WORD) * NM_BITS)[:, None]) & ((1 << NM_BITS) - 1)
            hit = pos[:, None, :] == within[None, :, None]
            dense += tl.where(hit, v[:, None, :], 0.0)
        tile = tl.reshape(dense, (BLOCK_K, BLOCK_N))
    else:  # bitmap: kernel tile == storage tile (BLOCK_K = TK, BLOCK_N = TN)
        WORDS: tl.constexpr = BLOCK_N // 32
        n_tiles_k = (K + BLOCK_K - 1) // BLOCK_K
        n_tiles_n = (N + BLOCK_N - 1) // BLOCK_N
        kt = k0 // BLOCK_K
        t = kt * n_tiles_n + pid_n
        live = kt < n_tiles_k
        rows = tl.arange(0, BLOCK_K)
        cols = tl.arange(0, BLOCK_N)
        word_ptrs = aux0_ptr + t * (BLOCK_K * WORDS) + rows[:, None] * WORDS + (cols // 32)[None, :]
        words = tl.load(word_ptrs, mask=live, other=0)
        bits = (words >> (cols % 32)[None, :]) & 1
        row_total = tl.sum(bits, axis=1)
        before_row = tl.cumsum(row_total, axis=0) - row_total
        pos = tl.load(aux1_ptr + t, mask=live, other=0) + before_row[:, None] + tl.cumsum(bits, axis=1) - bits
        tile = _load_vals(vals_ptr, pos, 0, 1, bits != 0, QBITS)
    if QBITS != 0:
        rows_k = k0 + tl.arange(0, BLOCK_K)
        sc = tl.load(s_ptr + (rows_k // QG)[:, None] * N + offs_n[None, :],
                     mask=(rows_k < K)[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        tile = tile * sc
    return tile


@triton.jit
def _epilogue(acc, bias_ptr, offs_n, N, HAS_BIAS: tl.constexpr, ACT: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:  # exact (erf) GELU, as nn.GELU()
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    elif ACT == 2:
        acc = acc / (1.0 + tl.exp(-acc))
    return acc


# M is not specialized: otherwise M = 1 (decode) compiles a kernel of its own beside M = 2..16 (and, with
# autotuning, every config of its key again), for masks the compiler would fold; see fips_kernels.bench.gpu_plan.
@triton.jit(do_not_specialize=["M"])
def _sparse_b_kernel(
    a_ptr, stride_am, stride_ak,
    v0_ptr, x0_ptr, y0_ptr, s0_ptr, bias0_ptr,
    v1_ptr, x1_ptr, y1_ptr, s1_ptr, bias1_ptr,
    out_ptr, stride_om, stride_on,
    ws_ptr,
    M, N, K, K_PER_SPLIT,
    FMT: tl.constexpr, NM_N: tl.constexpr, NM_M: tl.constexpr, NM_BITS: tl.constexpr,
    QBITS: tl.constexpr, QG: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, SPLIT_K: tl.constexpr,
    TRANS_B: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    M_BUCKET, N_BUCKET, K_BUCKET, TILE_K, TILE_N,  # autotune keys only: plain ints, so they compile nothing
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    acc0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=m_ok[:, None] & (offs_k[None, :] < k_end), other=0.0).to(DOT_DTYPE)
        if TRANS_B:  # stored B is (N × K): load its (BLOCK_N × BLOCK_K) tile and transpose in registers
            b0 = tl.trans(_b_tile(v0_ptr, x0_ptr, y0_ptr, s0_ptr, pid_n * BLOCK_N, k0 // BLOCK_K, offs_k, N, K,
                                  FMT, NM_N, NM_M, NM_BITS, QBITS, QG, BLOCK_N, BLOCK_K))
        else:
            b0 = _b_tile(v0_ptr, x0_ptr, y0_ptr, s0_ptr, k0, pid_n, offs_n, K, N, FMT, NM_N, NM_M, NM_BITS,
                         QBITS, QG, BLOCK_K, BLOCK_N)
        acc0 = tl.dot(a, b0.to(DOT_DTYPE), acc0, input_precision=PRECISION)
        if GATED:
            b1 = _b_tile(v1_ptr, x1_ptr, y1_ptr, s1_ptr, k0, pid_n, offs_n, K, N, FMT, NM_N, NM_M, NM_BITS,
                         QBITS, QG, BLOCK_K, BLOCK_N)
            acc1 = tl.dot(a, b1.to(DOT_DTYPE), acc1, input_precision=PRECISION)
    mask = m_ok[:, None] & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        if GATED:
            gate = _epilogue(acc0, bias0_ptr, offs_n, N, HAS_BIAS, 2)
            up = _epilogue(acc1, bias1_ptr, offs_n, N, HAS_BIAS, 0)
            acc0 = gate * up
        else:
            acc0 = _epilogue(acc0, bias0_ptr, offs_n, N, HAS_BIAS, ACT)
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc0.to(out_ptr.dtype.element_ty), mask=mask)
    else:  # fp32 partials: ws[(which, split), M, N]
        ws = ws_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(ws, acc0, mask=mask)
        if GATED:
            tl.store(ws + SPLIT_K * M * N, acc1, mask=mask)


@triton.jit(do_not_specialize=["M"])
def _reduce_kernel(ws_ptr, bias0_ptr, bias1_ptr, out_ptr, stride_om, stride_on, M, N,
                   GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, SPLIT_K: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    base = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
    acc0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):  # fixed order: bitwise reproducible
        acc0 += tl.load(base + s * M * N, mask=mask, other=0.0)
        if GATED:
            acc1 += tl.load(base + (SPLIT_K + s) * M * N, mask=mask, other=0.0)
    if GATED:
        acc0 = _epilogue(acc0, bias0_ptr, offs_n, N, HAS_BIAS, 2) * _epilogue(acc1, bias1_ptr, offs_n, N, HAS_BIAS, 0)
    else:
        acc0 = _epilogue(acc0, bias0_ptr, offs_n, N, HAS_BIAS, ACT)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc0.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- autotuning
# On a GPU the block shape and warps come, in this order, from the committed
# per-GPU table (fips_kernels/tuning/triton_configs.json, filled by a GPU run's
# tuned stage), else from autotuning per key, else (FIPS_KERNELS_AUTOTUNE=0, or
# the interpreter) from the fixed heuristic of choose_config. The key is what
# changes the best choice, bucketed so that it does not explode: M by block
# rows (16 / 32 / 64 / 128), N and K by the next power of two (every shape
# within a factor of two shares a config), the format and its pattern, the
# orientation, gating, split-K and the dtype; bias and activation (epilogue
# only) are not in it. Configs are pruned to valid ones first: a bitmap kernel
# tile must be its storage tile (those configs are made from the tile), an N:M
# K block must hold whole groups, and BLOCK_M follows the M bucket.

AUTOTUNE = not INTERPRETED and os.environ.get("FIPS_KERNELS_AUTOTUNE", "1") != "0"
TUNE_KEY = ["M_BUCKET", "N_BUCKET", "K_BUCKET", "FMT", "NM_N", "NM_M", "QBITS", "TILE_K", "TILE_N", "TRANS_B",
            "GATED", "SPLIT_K", "DOT_DTYPE"]
# (BLOCK_N, BLOCK_K, num_warps) tried at every M bucket: small tiles for the memory-bound decode, large ones for
# many rows. Few on purpose: each config of each key is one compile (~1.3 s on Triton 3.6 / sm_90).
BLOCK_SHAPES = ((64, 64, 4), (128, 64, 4), (64, 128, 4), (128, 128, 8))
NUM_STAGES = 3
BITMAP_WARPS = (4, 8)


def m_bucket(M: int) -> int:
    """BLOCK_M for M rows: 16 (decode), 32, 64, or 128."""
    return 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128


def shape_bucket(n: int) -> int:
    """N or K in the autotune key: the next power of two (at least 16)."""
    return max(16, 1 << (max(1, int(n)) - 1).bit_length())


def tune_configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=NUM_STAGES)
            for bm in (16, 32, 64, 128) for bn, bk, w in BLOCK_SHAPES]


def _bitmap_blocks(args) -> tuple:
    """(BLOCK_K, BLOCK_N) of a bitmap factor's kernel: its storage tile (transposed for TRANS_B)."""
    return (args["TILE_N"], args["TILE_K"]) if args["TRANS_B"] else (args["TILE_K"], args["TILE_N"])


def valid_blocks(args, block_m: int, block_n: int, block_k: int) -> bool:
    """Whether a block shape can run a call with these kernel arguments (see the comment above)."""
    if block_m != args["M_BUCKET"]:
        return False
    fmt = args["FMT"]
    if fmt == FMT_CODES["bitmap"]:
        return (block_k, block_n) == _bitmap_blocks(args)
    if fmt == FMT_CODES["nm"]:
        grouped = block_n if args["TRANS_B"] else block_k  # the block along the N:M reduction axis
        # whole groups per block; 64 keeps the decode's 3-D tile a power of two
        return grouped % args["NM_M"] == 0 and grouped >= 64 and block_n != 32 and block_k != 32
    return True


def prune_configs(configs, named_args, **kwargs):
    """The configs that are valid for this call: for a bitmap factor one per warp count at its storage
    tile (whatever ``configs`` holds), else those of ``configs`` that :func:`valid_blocks` accepts.
    Raises ``ValueError`` when none is: a wrong block shape would give wrong results, not an error."""
    args = {**named_args, **kwargs}
    if args["FMT"] == FMT_CODES["bitmap"]:
        bk, bn = _bitmap_blocks(args)
        return [triton.Config({"BLOCK_M": args["M_BUCKET"], "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w,
                              num_stages=NUM_STAGES) for w in BITMAP_WARPS]
    keep = [c for c in configs if valid_blocks(args, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"])]
    if not keep:
        raise ValueError(f"triton sparse matmul: no autotune config fits {dict((k, args.get(k)) for k in TUNE_KEY)}")
    return keep


_sparse_b_kernel_tuned = triton.autotune(configs=tune_configs(), key=TUNE_KEY,
                                         prune_configs_by={"early_config_prune": prune_configs})(_sparse_b_kernel)


def tuned_configs() -> list:
    """What autotuning chose in this process, as entries of ``tuning/triton_configs.json``:
    ``[{"key": {TUNE_KEY name: value}, "config": {BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages}}]``."""
    out = []
    for key, cfg in getattr(_sparse_b_kernel_tuned, "cache", {}).items():
        named = dict(zip(TUNE_KEY, key))  # then the tensors' dtypes, which DOT_DTYPE already says
        named = {k: (str(v) if k == "DOT_DTYPE" else v) for k, v in named.items()}
        out.append({"key": named, "config": dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)})
    return out


# ---------------------------------------------------------------- launch

@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 2


_TORCH_TO_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _on_gpu(device: torch.device) -> bool:
    """Whether launches on ``device`` compile for a GPU (the per-GPU table and autotuning apply)."""
    return device.type == "cuda"


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: any small number exercises split-K


def choose_config(M: int, N: int, K: int, factor: SparseFactor, device: torch.device,
                  split_k: Optional[int] = None, transpose: bool = False) -> LaunchConfig:
    """Block sizes by M bucket; split-K when the (M, N) tiles alone cannot fill the GPU.

    The bitmap kernel tile is the storage tile. BLOCK_K is a multiple of the
    N:M group so a K block holds whole groups.
    """
    if factor.format == "bitmap":
        block_k, block_n = factor.tile[::-1] if transpose else factor.tile
    else:
        block_n = 64
        block_k = 64 if factor.format == "dense" else max(64, factor.m)
    block_m = min(m_bucket(M), 64)
    k_blocks = triton.cdiv(K, block_k)
    if split_k is None:
        tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
        split_k = max(1, min(k_blocks, triton.cdiv(2 * _sm_count(device), tiles), 16))
    split_k = max(1, min(split_k, k_blocks))
    return LaunchConfig(block_m, block_n, block_k, split_k)


def tune_key(M: int, N: int, K: int, factor: SparseFactor, transpose: bool, gated: bool, split: int,
             dtype: torch.dtype) -> dict:
    """The autotune key of a call (``TUNE_KEY`` names -> values), as the kernel receives it and as
    ``tuning/triton_configs.json`` stores it (there with ``DOT_DTYPE`` as its name, e.g. ``fp16``)."""
    n, m = (factor.n, factor.m) if factor.format == "nm" else (1, 2)
    tile = factor.tile if factor.format == "bitmap" else (0, 0)
    return dict(M_BUCKET=m_bucket(M), N_BUCKET=shape_bucket(N), K_BUCKET=shape_bucket(K),
                FMT=FMT_CODES[factor.format], NM_N=n, NM_M=m, QBITS=factor.qbits or 0, TILE_K=tile[0],
                TILE_N=tile[1], TRANS_B=bool(transpose), GATED=bool(gated), SPLIT_K=split,
                DOT_DTYPE=_TORCH_TO_TL[dtype])


def _table_config(device: torch.device, key: dict, split_k: int) -> Optional[LaunchConfig]:
    """The committed per-GPU config for this key (``tuning/triton_configs.json``), if any and valid."""
    from ..tuning import triton_config

    found = triton_config(device, dict(key, DOT_DTYPE=str(key["DOT_DTYPE"])))
    if found is None or not valid_blocks(key, found["BLOCK_M"], found["BLOCK_N"], found["BLOCK_K"]):
        return None
    return LaunchConfig(found["BLOCK_M"], found["BLOCK_N"], found["BLOCK_K"], split_k,
                        found.get("num_warps", 4), found.get("num_stages", NUM_STAGES))


def _check_kernel_args(a: torch.Tensor, factor: SparseFactor, transpose: bool) -> None:
    if factor.format not in FMT_CODES:
        raise ValueError(f"triton sparse matmul: format {factor.format!r} has no Triton kernel")
    if factor.format == "bitmap":
        tk, tn = factor.tile
        for name, v in (("TK", tk), ("TN", tn)):
            if v < 16 or v & (v - 1):
                raise ValueError(f"triton sparse matmul: bitmap {name}={v} must be a power of two >= 16")
    K = factor.shape[1 if transpose else 0]
    if a.dim() != 2 or a.shape[1] != K:
        raise ValueError(f"triton sparse matmul: A must be (M, {K}), got {tuple(a.shape)}")
    if a.dtype != factor.dtype:
        raise ValueError(f"triton sparse matmul: A is {a.dtype} but the factor computes in {factor.dtype}")


def sparse_matmul(a: torch.Tensor, factor: SparseFactor, bias: Optional[torch.Tensor] = None,
                  activation: Optional[str] = None, *, up: Optional[SparseFactor] = None,
                  up_bias: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None,
                  split_k: Optional[int] = None, out: Optional[torch.Tensor] = None,
                  transpose: bool = False, config: Optional[LaunchConfig] = None) -> torch.Tensor:
    """``act(a · B + bias)``, or with ``up`` given ``silu(a·B + bias) * (a·B_up + up_bias)``;
    with ``transpose=True``, ``act(a · Bᵀ + bias)`` (not gated).

    Args:
        a: ``(M, K)``, any strides; fp16, bf16 or fp32.
        factor: ``B (K, N)`` in the dense, nm or bitmap format, same dtype as ``a``.
        bias: ``(N,)`` or None. activation: None, ``"gelu"`` or ``"silu"``.
        up, up_bias: the second factor of a gated pair (same format and shape).
        out_dtype: default ``a.dtype``. split_k: override the heuristic.
        out: optional ``(M, N)`` output (any strides).
        config: launch exactly these block sizes and warps (checked by :func:`valid_blocks`) instead of
            the per-GPU table, autotuning or the heuristic; its ``split_k`` unless ``split_k`` is given.
    Returns:
        ``(M, N)``.
    """
    _check_kernel_args(a, factor, transpose)
    M, K = a.shape
    N = factor.shape[0 if transpose else 1]
    gated = up is not None
    if gated and transpose:
        raise ValueError("triton sparse matmul: the gated variant has no transposed form")
    if gated and (up.format != factor.format or up.shape != factor.shape or up.meta != factor.meta
                  or up.quantized != factor.quantized):
        raise ValueError("triton sparse matmul: gate and up factors must share format, shape and pattern")
    if gated and (bias is None) != (up_bias is None):
        raise ValueError("triton sparse matmul: give both gate and up biases or neither")
    out_dtype = out_dtype or a.dtype
    if out is None:
        out = torch.empty(M, N, device=a.device, dtype=out_dtype)
    if M == 0 or N == 0:
        return out
    heuristic = choose_config(M, N, K, factor, a.device, split_k if config is None else split_k or config.split_k,
                              transpose)
    # Splits start on multiples of the largest K block any config may use (a bitmap's is its tile), so
    # they hold whole N:M groups and whole bitmap tiles whatever the table or autotuning picks.
    k_align = heuristic.block_k if factor.format == "bitmap" else 128
    k_per_split = max(1, triton.cdiv(triton.cdiv(K, k_align), heuristic.split_k)) * k_align
    split = max(1, triton.cdiv(K, k_per_split))
    key = tune_key(M, N, K, factor, transpose, gated, split, a.dtype)
    n, m, tile, dot_dtype = key["NM_N"], key["NM_M"], (key["TILE_K"], key["TILE_N"]), key["DOT_DTYPE"]
    if config is None and _on_gpu(a.device):
        config = _table_config(a.device, key, split)
    tuned = config is None and AUTOTUNE and _on_gpu(a.device)
    cfg = config or heuristic
    if not tuned and not valid_blocks(dict(key, M_BUCKET=cfg.block_m), cfg.block_m, cfg.block_n, cfg.block_k):
        raise ValueError(f"triton sparse matmul: blocks ({cfg.block_m}, {cfg.block_n}, {cfg.block_k}) cannot run "
                         f"a {factor.format} factor {tuple(factor.shape)} (tile {tile}, transpose={transpose})")
    ws = (torch.empty((2 if gated else 1) * split * M * N, device=a.device, dtype=torch.float32)
          if split > 1 else out)
    g_aux = list(factor.aux_tensors) + [factor.values, factor.values]
    u = up if gated else factor
    u_aux = list(u.aux_tensors) + [u.values, u.values]

    has_bias = bias is not None
    if tuned:
        kernel = _sparse_b_kernel_tuned
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), split)  # noqa: E731
        launch = {}
    else:
        kernel = _sparse_b_kernel
        grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(N, cfg.block_n), split)
        launch = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                      num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    kernel[grid](
        a, a.stride(0), a.stride(1),
        factor.values, g_aux[0], g_aux[1], factor.scales if factor.quantized else factor.values,
        bias if has_bias else factor.values,
        u.values, u_aux[0], u_aux[1], u.scales if u.quantized else u.values,
        up_bias if gated and has_bias else factor.values,
        out, out.stride(0), out.stride(1), ws,
        M, N, K, k_per_split,
        FMT=key["FMT"], NM_N=n, NM_M=m, NM_BITS=nm_bits(m), QBITS=key["QBITS"], QG=factor.qgroup or 1,
        GATED=gated, HAS_BIAS=has_bias, ACT=ACTIVATIONS[activation], SPLIT_K=split,
        TRANS_B=transpose, DOT_DTYPE=dot_dtype, PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        M_BUCKET=key["M_BUCKET"], N_BUCKET=key["N_BUCKET"], K_BUCKET=key["K_BUCKET"], TILE_K=tile[0],
        TILE_N=tile[1], **launch,
    )
    if split > 1:
        rm, rn = 32, 64
        _reduce_kernel[(triton.cdiv(M, rm), triton.cdiv(N, rn))](
            ws, bias if has_bias else ws, up_bias if gated and has_bias else ws,
            out, out.stride(0), out.stride(1), M, N,
            GATED=gated, HAS_BIAS=has_bias, ACT=ACTIVATIONS[activation], SPLIT_K=split,
            BLOCK_M=rm, BLOCK_N=rn)
    return out
