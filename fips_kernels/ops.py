"""``torch.library`` custom ops: ``fips_kernels::expand``, ``::contract``,
``::gate_up`` and ``::reconstruct``.

Each op takes the base ``U`` (float, or int8 with per-column ``U_scales``)
and the packed factor as raw tensors (``values``, two optional index tensors,
optional ``scales`` of a quantised factor, the format name and ``meta``; see
:attr:`SparseFactor.meta`), checks its inputs, picks a backend
(:mod:`fips_kernels.dispatch`) and runs it. Fake implementations make them
traceable by ``torch.compile(fullgraph=True)``; autograd formulas make them
trainable (gradients for ``x``, a float ``U``, float factor ``values`` and
``bias``; quantised tensors are constants).

Use :func:`fips_linear`, :func:`gate_up` and :func:`reconstruct` with
SparseFactors rather than calling ``torch.ops.fips_kernels.*`` by hand.
"""
from typing import List, Optional, Sequence, Union

import torch

from . import dispatch, formats
from .formats import FormatError, Layout, SparseFactor, gather_values, unpack
from .reference import ACTIVATIONS

__all__ = ["fips_linear", "gate_up", "reconstruct", "check_inputs", "base_operand", "base_matrix"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
Base = Union[torch.Tensor, SparseFactor]


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def _layer_dims(kind: str, U: torch.Tensor, meta: Sequence[int]):
    """(in_features, out_features, r) of a layer."""
    K, N = meta[0], meta[1]
    if kind == "expand":
        return U.shape[0], N, K
    return K, U.shape[0], N


def base_operand(U: torch.Tensor, U_scales: Optional[torch.Tensor]) -> Base:
    """What backends receive as the base: ``U`` itself, or for an int8 base a
    quantised dense SparseFactor ``(d, r)`` with one scale per column."""
    if U_scales is None:
        return U
    d, r = U.shape
    return SparseFactor("dense", (d, r), U, scales=U_scales, qbits=8, qgroup=max(d, 1), validate=False)


def base_matrix(U: Base) -> torch.Tensor:
    """The dense float ``U`` of a base operand."""
    return U.to_dense() if isinstance(U, SparseFactor) else U


def check_inputs(kind: str, x: Optional[torch.Tensor], U: torch.Tensor, U_scales: Optional[torch.Tensor],
                 values: torch.Tensor, aux0: Optional[torch.Tensor], aux1: Optional[torch.Tensor],
                 scales: Optional[torch.Tensor], bias: Optional[torch.Tensor], fmt: str,
                 meta: Sequence[int]) -> None:
    """Raise a ValueError/TypeError naming what is wrong with an op call.

    Only metadata (shapes, dtypes, devices) is read, so this also runs on fake
    tensors at trace time and never synchronises with the GPU.
    """
    op = f"fips_kernels.{kind}" if x is not None else "fips_kernels.reconstruct"
    if fmt not in formats.names():
        raise ValueError(f"{op}: unknown format {fmt!r}; expected one of {formats.names()}")
    if len(meta) not in (4, 6):
        raise ValueError(f"{op}: meta must be [K, N, p0, p1] (+ [qbits, qgroup] when quantised), got {list(meta)}")
    spec = formats.get(fmt)
    if U.dim() != 2:
        raise ValueError(f"{op}: the base U must be 2-D (d, r), got shape {_shape(U)}")
    K, N = meta[0], meta[1]
    in_f, out_f, r = _layer_dims(kind, U, meta)
    if U.shape[1] != r:
        which = "K" if kind == "expand" else "N"
        raise ValueError(f"{op}: base U has rank {U.shape[1]} but the {kind} factor's {which} is {r} "
                         f"(factor shape ({K}, {N}))")
    # the arithmetic dtype: the float base's, or the int8 base's scales'
    if U_scales is None:
        if U.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{op}: U must be floating point (or int8 with U_scales), got {U.dtype}")
        dtype = U.dtype
    else:
        if U.dtype != torch.int8:
            raise TypeError(f"{op}: a base with U_scales must be int8, got {U.dtype}")
        if U_scales.shape != (1, r):
            raise ValueError(f"{op}: U_scales must have shape (1, {r}) (one scale per column), "
                             f"got {_shape(U_scales)}")
        if U_scales.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{op}: U_scales must be floating point, got {U_scales.dtype}")
        if U_scales.device != U.device:
            raise ValueError(f"{op}: device mismatch: U_scales are on {U_scales.device} but U is on {U.device}")
        dtype = U_scales.dtype
    quantized = len(meta) == 6 and int(meta[4]) != 0
    if quantized:
        if not spec.quantizable:
            raise ValueError(f"{op}: the {fmt} format cannot be quantised")
        if values.dtype != torch.int8:
            raise TypeError(f"{op}: quantised factor values must be int8, got {values.dtype}")
        if scales is None:
            raise ValueError(f"{op}: a quantised factor needs its scales")
        groups = -(-K // max(int(meta[5]), 1))
        if scales.shape != (groups, N):
            raise ValueError(f"{op}: factor scales must have shape ({groups}, {N}), got {_shape(scales)}")
        if scales.dtype != dtype:
            raise TypeError(f"{op}: dtype mismatch: factor scales are {scales.dtype} but the base is {dtype}")
        if scales.device != U.device:
            raise ValueError(f"{op}: device mismatch: factor scales are on {scales.device} but U is on {U.device}")
    else:
        if scales is not None:
            raise ValueError(f"{op}: scales given for a factor whose meta says it is not quantised")
        if values.dtype != dtype:
            raise TypeError(f"{op}: dtype mismatch: factor values are {values.dtype} but the base U is {dtype}")
    if values.device != U.device:
        raise ValueError(f"{op}: device mismatch: factor values are on {values.device} but U is on {U.device}")
    for i, t in enumerate((aux0, aux1)):
        if i < len(spec.aux):
            name = spec.aux[i]
            if t is None:
                raise ValueError(f"{op}: the {fmt} format needs its {name!r} tensor")
            if t.dtype != torch.int32:
                raise TypeError(f"{op}: {name} must be int32, got {t.dtype}")
            if t.device != U.device:
                raise ValueError(f"{op}: device mismatch: {name} is on {t.device} but U is on {U.device}")
    if x is not None:
        if x.dim() < 1 or x.shape[-1] != in_f:
            raise ValueError(f"{op}: expected input of shape (*, {in_f}) (in_features={in_f}), "
                             f"got {_shape(x)}")
        # fp32 activations with fp16/bf16 factors ("mixed": the arithmetic is fp32 either way, the
        # output is fp32) spare a CPU model two casts per layer; any other mismatch is refused
        mixed = x.dtype == torch.float32 and dtype in (torch.float16, torch.bfloat16)
        if x.dtype != dtype and not mixed:
            raise TypeError(f"{op}: dtype mismatch: input is {x.dtype} but the layer's factors are {dtype} "
                            f"(float32 input is accepted with float16/bfloat16 factors)")
        if x.device != U.device:
            raise ValueError(f"{op}: device mismatch: input is on {x.device} but the layer's factors "
                             f"are on {U.device}")
    if bias is not None:
        if bias.shape != (out_f,):
            raise ValueError(f"{op}: bias must have shape ({out_f},), got {_shape(bias)}")
        if bias.dtype != dtype:
            raise TypeError(f"{op}: dtype mismatch: bias is {bias.dtype} but the layer's factors are {dtype}")
        if bias.device != U.device:
            raise ValueError(f"{op}: device mismatch: bias is on {bias.device} but U is on {U.device}")


def _layout(fmt, meta) -> Layout:
    try:
        return Layout.from_meta(fmt, meta)
    except FormatError as exc:
        raise ValueError(f"fips_kernels: bad factor layout: {exc}") from None


def _factor(fmt, meta, values, aux0, aux1, scales) -> SparseFactor:
    aux = [t for t in (aux0, aux1) if t is not None][: len(formats.get(fmt).aux)]
    return SparseFactor.from_layout(_layout(fmt, meta), values, aux, scales, validate=False)


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"fips_kernels.expand: activation must be one of {ACTIVATIONS}, got {activation!r}")


def _check_kind(kind: str) -> None:
    if kind not in ("expand", "contract"):
        raise ValueError(f"fips_kernels.reconstruct: kind must be 'expand' or 'contract', got {kind!r}")


def _problem(op, fmt, dtype, device, M, U, meta, kind=None, activation="none") -> dispatch.Problem:
    return dispatch.Problem.for_layer(op, kind or ("expand" if op == "gate_up" else op), _layout(fmt, meta), dtype,
                                      device, M, U.shape[0], activation)


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _run_layer(kind, x, U, U_scales, values, aux0, aux1, scales, bias, fmt, meta, activation="none"):
    check_inputs(kind, x, U, U_scales, values, aux0, aux1, scales, bias, fmt, meta)
    x2 = x.reshape(-1, x.shape[-1])
    kernel = dispatch.select(_problem(kind, fmt, x.dtype, x.device, _rows(x), U, meta, activation=activation)
                             ).kernel(kind)
    factor = _factor(fmt, meta, values, aux0, aux1, scales)
    base = base_operand(U, U_scales)
    if kind == "expand":
        y2 = kernel(x2, base, factor, bias, activation)
    else:
        y2 = kernel(x2, base, factor, bias)
    return y2.reshape(*x.shape[:-1], y2.shape[-1])


def _fake_layer(kind, x, U, U_scales, values, aux0, aux1, scales, bias, fmt, meta):
    check_inputs(kind, x, U, U_scales, values, aux0, aux1, scales, bias, fmt, meta)
    out_f = _layer_dims(kind, U, meta)[1]
    return x.new_empty(*x.shape[:-1], out_f)


@torch.library.custom_op("fips_kernels::expand", mutates_args=())
def _expand(x: torch.Tensor, U: torch.Tensor, U_scales: Optional[torch.Tensor], values: torch.Tensor,
            aux0: Optional[torch.Tensor], aux1: Optional[torch.Tensor], scales: Optional[torch.Tensor],
            bias: Optional[torch.Tensor], fmt: str, meta: List[int], activation: str = "none") -> torch.Tensor:
    _check_activation(activation)
    return _run_layer("expand", x, U, U_scales, values, aux0, aux1, scales, bias, fmt, meta, activation)


@torch.library.custom_op("fips_kernels::contract", mutates_args=())
def _contract(x: torch.Tensor, U: torch.Tensor, U_scales: Optional[torch.Tensor], values: torch.Tensor,
              aux0: Optional[torch.Tensor], aux1: Optional[torch.Tensor], scales: Optional[torch.Tensor],
              bias: Optional[torch.Tensor], fmt: str, meta: List[int]) -> torch.Tensor:
    return _run_layer("contract", x, U, U_scales, values, aux0, aux1, scales, bias, fmt, meta)


@torch.library.custom_op("fips_kernels::reconstruct", mutates_args=())
def _reconstruct(U: torch.Tensor, U_scales: Optional[torch.Tensor], values: torch.Tensor,
                 aux0: Optional[torch.Tensor], aux1: Optional[torch.Tensor], scales: Optional[torch.Tensor],
                 fmt: str, meta: List[int], kind: str) -> torch.Tensor:
    _check_kind(kind)
    check_inputs(kind, None, U, U_scales, values, aux0, aux1, scales, None, fmt, meta)
    dtype = U.dtype if U_scales is None else U_scales.dtype
    problem = _problem("reconstruct", fmt, dtype, U.device, 0, U, meta, kind)
    return dispatch.select(problem).kernel("reconstruct")(
        base_operand(U, U_scales), _factor(fmt, meta, values, aux0, aux1, scales), kind)


@torch.library.custom_op("fips_kernels::gate_up", mutates_args=())
def _gate_up(x: torch.Tensor, U: torch.Tensor, U_scales: Optional[torch.Tensor],
             g_values: torch.Tensor, g_aux0: Optional[torch.Tensor], g_aux1: Optional[torch.Tensor],
             g_scales: Optional[torch.Tensor], g_bias: Optional[torch.Tensor],
             u_values: torch.Tensor, u_aux0: Optional[torch.Tensor], u_aux1: Optional[torch.Tensor],
             u_scales: Optional[torch.Tensor], u_bias: Optional[torch.Tensor],
             fmt: str, meta: List[int]) -> torch.Tensor:
    _check_gate_up(x, U, U_scales, g_values, g_aux0, g_aux1, g_scales, g_bias,
                   u_values, u_aux0, u_aux1, u_scales, u_bias, fmt, meta)
    x2 = x.reshape(-1, x.shape[-1])
    kernel = dispatch.select(_problem("gate_up", fmt, x.dtype, x.device, _rows(x), U, meta)).kernel("gate_up")
    y2 = kernel(x2, base_operand(U, U_scales), _factor(fmt, meta, g_values, g_aux0, g_aux1, g_scales),
                _factor(fmt, meta, u_values, u_aux0, u_aux1, u_scales), g_bias, u_bias)
    return y2.reshape(*x.shape[:-1], y2.shape[-1])


def _check_gate_up(x, U, U_scales, g_values, g_aux0, g_aux1, g_scales, g_bias,
                   u_values, u_aux0, u_aux1, u_scales, u_bias, fmt, meta):
    check_inputs("expand", x, U, U_scales, g_values, g_aux0, g_aux1, g_scales, g_bias, fmt, meta)
    check_inputs("expand", x, U, U_scales, u_values, u_aux0, u_aux1, u_scales, u_bias, fmt, meta)
    layout = _layout(fmt, meta)
    static = layout.fmt.value_rows(layout.K, layout.N, layout.params) is not None  # else counts may differ
    if static and g_values.shape != u_values.shape:
        raise ValueError(f"fips_kernels.gate_up: gate and up values differ in shape: "
                         f"{_shape(g_values)} vs {_shape(u_values)}")
    if (g_bias is None) != (u_bias is None):
        raise ValueError("fips_kernels.gate_up: give both gate and up biases or neither")


@_gate_up.register_fake
def _(x, U, U_scales, g_values, g_aux0, g_aux1, g_scales, g_bias, u_values, u_aux0, u_aux1, u_scales, u_bias,
      fmt, meta):
    _check_gate_up(x, U, U_scales, g_values, g_aux0, g_aux1, g_scales, g_bias,
                   u_values, u_aux0, u_aux1, u_scales, u_bias, fmt, meta)
    return x.new_empty(*x.shape[:-1], meta[1])


@_expand.register_fake
def _(x, U, U_scales, values, aux0, aux1, scales, bias, fmt, meta, activation="none"):
    _check_activation(activation)
    return _fake_layer("expand", x, U, U_scales, values, aux0, aux1, scales, bias, fmt, meta)


@_contract.register_fake
def _(x, U, U_scales, values, aux0, aux1, scales, bias, fmt, meta):
    return _fake_layer("contract", x, U, U_scales, values, aux0, aux1, scales, bias, fmt, meta)


@_reconstruct.register_fake
def _(U, U_scales, values, aux0, aux1, scales, fmt, meta, kind):
    _check_kind(kind)
    check_inputs(kind, None, U, U_scales, values, aux0, aux1, scales, None, fmt, meta)
    in_f, out_f, _ = _layer_dims(kind, U, meta)
    return (U if U_scales is None else U_scales).new_empty(out_f, in_f)


# ---------------------------------------------------------------- autograd
# Gradients are computed with plain torch ops in fp32 from the dense factor:
# training is not the kernels' job (the compression pipeline trains dense
# masked factors); this makes a FiPSLinear fine-tunable like nn.Linear.
# Quantised tensors (int8 values, scales) get no gradient.

def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def _float_grad(t: Optional[torch.Tensor]) -> bool:
    return t is not None and t.is_floating_point()


def _activation_grad(pre: torch.Tensor, activation: str) -> torch.Tensor:
    """d act / d pre."""
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(pre * 0.7071067811865476))
        return cdf + pre * torch.exp(-0.5 * pre * pre) * 0.3989422804014327
    if activation == "silu":
        s = torch.sigmoid(pre)
        return s * (1.0 + pre * (1.0 - s))
    return torch.ones_like(pre)


def _setup_layer(ctx, inputs, output):
    x, U, U_scales, values, aux0, aux1, scales, bias, fmt, meta = inputs[:10]
    ctx.save_for_backward(x, U, U_scales, values, aux0, aux1, scales, bias)
    ctx.fmt, ctx.meta, ctx.has_bias = fmt, list(meta), bias is not None
    ctx.activation = inputs[10] if len(inputs) > 10 else "none"


def _layer_backward(kind, ctx, grad):
    x, U, U_scales, values, aux0, aux1, scales, bias = ctx.saved_tensors
    need_x, need_U, _, need_v, _, _, _, need_b = ctx.needs_input_grad[:8]
    need_U = need_U and _float_grad(U)
    need_v = need_v and _float_grad(values) and scales is None
    fmt, meta = ctx.fmt, ctx.meta
    B = _acc(unpack(fmt, meta, values, aux0, aux1, scales=scales))
    U32 = _acc(base_matrix(base_operand(U, U_scales)))
    x2, g2 = _acc(x.reshape(-1, x.shape[-1])), _acc(grad.reshape(-1, grad.shape[-1]))
    if ctx.activation != "none":  # back through act(pre), pre = (x U) B + b
        pre = (x2 @ U32) @ B
        if bias is not None:
            pre = pre + _acc(bias)
        g2 = g2 * _activation_grad(pre, ctx.activation)
    gx = gU = gv = gb = None
    if kind == "expand":  # y = (x U) B
        gz = g2 @ B.t()
        if need_x:
            gx = (gz @ U32.t()).reshape(x.shape).to(x.dtype)
        if need_U:
            gU = (x2.t() @ gz).to(U.dtype)
        if need_v:
            gB = (x2 @ U32).t() @ g2
    else:  # y = (x B) Uᵀ
        gz = g2 @ U32
        if need_x:
            gx = (gz @ B.t()).reshape(x.shape).to(x.dtype)
        if need_U:
            gU = (g2.t() @ (x2 @ B)).to(U.dtype)
        if need_v:
            gB = x2.t() @ gz
    if need_v:
        gv = gather_values(fmt, meta, gB, aux0, aux1, nnz=values.shape[0]).to(values.dtype)
    if need_b and ctx.has_bias:
        gb = g2.sum(0).to(grad.dtype)
    return (gx, gU, None, gv, None, None, None, gb, None, None) + ((None,) if kind == "expand" else ())


def _setup_gate_up(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:13])
    ctx.fmt, ctx.meta = inputs[13], list(inputs[14])


def _gate_up_backward(ctx, grad):
    x, U, U_scales, gv, ga0, ga1, gs, gbias, uv, ua0, ua1, us, ubias = ctx.saved_tensors
    needs = ctx.needs_input_grad
    fmt, meta = ctx.fmt, ctx.meta
    Bg = _acc(unpack(fmt, meta, gv, ga0, ga1, scales=gs))
    Bu = _acc(unpack(fmt, meta, uv, ua0, ua1, scales=us))
    U32 = _acc(base_matrix(base_operand(U, U_scales)))
    x2, g2 = _acc(x.reshape(-1, x.shape[-1])), _acc(grad.reshape(-1, grad.shape[-1]))
    z = x2 @ U32
    gate, up = z @ Bg, z @ Bu
    if gbias is not None:
        gate, up = gate + _acc(gbias), up + _acc(ubias)
    g_gate = g2 * up * _activation_grad(gate, "silu")
    g_up = g2 * torch.nn.functional.silu(gate)
    gz = g_gate @ Bg.t() + g_up @ Bu.t()
    gx = (gz @ U32.t()).reshape(x.shape).to(x.dtype) if needs[0] else None
    gU = (x2.t() @ gz).to(U.dtype) if needs[1] and _float_grad(U) else None
    ggv = (gather_values(fmt, meta, z.t() @ g_gate, ga0, ga1, nnz=gv.shape[0]).to(gv.dtype)
           if needs[3] and _float_grad(gv) and gs is None else None)
    guv = (gather_values(fmt, meta, z.t() @ g_up, ua0, ua1, nnz=uv.shape[0]).to(uv.dtype)
           if needs[8] and _float_grad(uv) and us is None else None)
    ggb = g_gate.sum(0).to(grad.dtype) if needs[7] and gbias is not None else None
    gub = g_up.sum(0).to(grad.dtype) if needs[12] and ubias is not None else None
    return gx, gU, None, ggv, None, None, None, ggb, guv, None, None, None, gub, None, None


def _setup_reconstruct(ctx, inputs, output):
    U, U_scales, values, aux0, aux1, scales, fmt, meta, kind = inputs
    ctx.save_for_backward(U, U_scales, values, aux0, aux1, scales)
    ctx.fmt, ctx.meta, ctx.kind = fmt, list(meta), kind


def _reconstruct_backward(ctx, grad):
    U, U_scales, values, aux0, aux1, scales = ctx.saved_tensors
    need_U = ctx.needs_input_grad[0] and _float_grad(U)
    need_v = ctx.needs_input_grad[2] and _float_grad(values) and scales is None
    B = _acc(unpack(ctx.fmt, ctx.meta, values, aux0, aux1, scales=scales))
    U32, g = _acc(base_matrix(base_operand(U, U_scales))), _acc(grad)
    if ctx.kind == "expand":  # W = (U B)ᵀ, G = dL/d(U B) = gᵀ
        gU = g.t() @ B.t() if need_U else None
        gB = U32.t() @ g.t() if need_v else None
    else:  # W = U Bᵀ
        gU = g @ B if need_U else None
        gB = g.t() @ U32 if need_v else None
    gU = gU.to(U.dtype) if gU is not None else None
    gv = (gather_values(ctx.fmt, ctx.meta, gB, aux0, aux1, nnz=values.shape[0]).to(values.dtype)
          if gB is not None else None)
    return gU, None, gv, None, None, None, None, None, None


_expand.register_autograd(lambda ctx, g: _layer_backward("expand", ctx, g), setup_context=_setup_layer)
_contract.register_autograd(lambda ctx, g: _layer_backward("contract", ctx, g), setup_context=_setup_layer)
_reconstruct.register_autograd(_reconstruct_backward, setup_context=_setup_reconstruct)
_gate_up.register_autograd(_gate_up_backward, setup_context=_setup_gate_up)


# ---------------------------------------------------------------- public helpers

def _base_args(U: Base):
    """(U tensor, U_scales) of a float tensor or an int8 per-column quantised base."""
    if isinstance(U, SparseFactor):
        if U.format != "dense" or U.qbits != 8 or U.qgroup != U.shape[0]:
            raise ValueError("a quantised base must be a dense int8 SparseFactor with one scale per column "
                             "(SparseFactor.pack(U, 'dense', qbits=8, qgroup=d))")
        return U.values, U.scales
    return U, None


def _factor_args(factor: SparseFactor):
    aux = list(factor.aux_tensors) + [None, None]
    return factor.values, aux[0], aux[1], factor.scales


def fips_linear(x: torch.Tensor, U: Base, factor: SparseFactor, kind: str,
                bias: Optional[torch.Tensor] = None, activation: str = "none") -> torch.Tensor:
    """Run a FiPS layer through the dispatched op (``activation``: expand only).

    Args:
        x: ``(*, in_features)``; any strides.
        U: the shared base ``(d, r)``: a float tensor, or an int8 dense
            SparseFactor with one scale per column.
        factor: reduction-major factor, ``(r, h)`` for expand, ``(h, r)`` for
            contract; float, int8 or int4 values.
        kind: ``"expand"`` (``y = (x·U)·V + b``) or ``"contract"`` (``y = (x·Vᵀ)·Uᵀ + b``).
        bias: ``(out_features,)`` or None.
    Returns:
        ``(*, out_features)`` in ``x.dtype``.
    """
    Ut, Us = _base_args(U)
    if kind == "expand":
        return torch.ops.fips_kernels.expand(x, Ut, Us, *_factor_args(factor), bias, factor.format,
                                             factor.meta, activation)
    if kind != "contract":
        raise ValueError(f"kind must be 'expand' or 'contract', got {kind!r}")
    if activation != "none":
        raise ValueError("fips_linear: an activation epilogue is only fused into expand layers")
    return torch.ops.fips_kernels.contract(x, Ut, Us, *_factor_args(factor), bias, factor.format, factor.meta)


def gate_up(x: torch.Tensor, U: Base, gate: SparseFactor, up: SparseFactor,
            bias_gate: Optional[torch.Tensor] = None, bias_up: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``silu((x·U)·V_gate + b_g) * ((x·U)·V_up + b_u)``, computing ``z = x·U`` once.

    ``x (*, d)``, ``U (d, r)``, ``gate``/``up``: expand factors ``(r, h)`` of one format → ``(*, h)``.
    """
    if gate.format != up.format or gate.meta != up.meta:
        raise ValueError(f"gate_up: gate and up factors must share format and shape, got {gate!r} and {up!r}")
    Ut, Us = _base_args(U)
    g, u = _factor_args(gate), _factor_args(up)
    return torch.ops.fips_kernels.gate_up(x, Ut, Us, *g, bias_gate, *u, bias_up, gate.format, gate.meta)


def reconstruct(U: Base, factor: SparseFactor, kind: str) -> torch.Tensor:
    """The layer's dense torch-layout weight (``out × in``), via the dispatched op."""
    Ut, Us = _base_args(U)
    return torch.ops.fips_kernels.reconstruct(Ut, Us, *_factor_args(factor), factor.format, factor.meta, kind)
