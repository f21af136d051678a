"""``compress(model, ...)``: the paper's algorithm end to end (DESIGN §1).

1. find the MLPs and the blocks (:mod:`.presets`) and cut the blocks into
   groups of ``group_size`` consecutive blocks within a stage;
2. record every unit's inputs and outputs on the calibration data, and the
   model's final outputs on the held-back batches (:mod:`.calibration`);
3. per group: rank from the budget (:func:`~fips_kernels.budget.group_rank`),
   SVD init, block-wise training with gradual magnitude pruning or RigL
   (:mod:`.train`, :mod:`.schedule`); finished groups go to the state
   directory at once (:mod:`.state`); under ``torchrun`` each rank trains its
   share (:mod:`.distributed`);
4. pack the factors into the chosen format, put :class:`FiPSLinear` layers in
   place (:func:`~fips_kernels.install`), measure the end-to-end agreement on
   the held-back batches and return the model with a
   :class:`~.report.CompressionReport`.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch import nn

from .. import cpu
from ..budget import group_rank, resolve_sparsity
from ..formats import PATTERN_FORMATS, QUANT_FORMATS, FormatError
from ..modules import fusion_report, install
from . import calibration, distributed, finetune
from .config import CompressConfig, merge
from .factors import pack_group
from .ratio import plan_ratio
from .presets import GroupSpec, Preset, find_units, make_groups, resolve_preset
from .report import CompressionReport, GroupReport, output_agreement
from .state import ResumeState, weights_digest
from .train import GroupResult, TrainConfig, train_group

__all__ = ["compress", "CompressConfig"]

COMPRESS_PATTERNS = ("unstructured", "nm", "dense")  # the training schedules handle these kinds
FACTOR_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
                 "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_factor_dtype(factor_dtype) -> Optional[torch.dtype]:
    """None, or the torch dtype ``factor_dtype`` names (float32, float16, bfloat16, or the
    names ``"fp32"``, ``"fp16"``, ``"bf16"``); anything else raises ValueError."""
    if factor_dtype is None:
        return None
    if isinstance(factor_dtype, str) and factor_dtype.lower() in FACTOR_DTYPES:
        return FACTOR_DTYPES[factor_dtype.lower()]
    if isinstance(factor_dtype, torch.dtype) and factor_dtype in FACTOR_DTYPES.values():
        return factor_dtype
    raise ValueError(f"compress: factor_dtype must be None, torch.float32, torch.float16 or torch.bfloat16 "
                     f"('fp32', 'fp16', 'bf16'), got {factor_dtype!r}")


@contextlib.contextmanager
def _no_kv_cache(model: nn.Module):
    """Hugging Face decoders would otherwise hand a growing KV cache to every layer."""
    config = getattr(model, "config", None)
    old = getattr(config, "use_cache", None)
    if old:
        config.use_cache = False
    try:
        yield
    finally:
        if old:
            config.use_cache = old


def _check_args(budget, steps, pattern, sparsity, format, pruning, mask_scope, nm_schedule, prune_every, prune_end,
                lr):
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
        raise ValueError(f"compress: budget must be in (0, 1], got {budget!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"compress: steps must be a non-negative integer, got {steps!r}")
    try:
        pat, s = resolve_sparsity(pattern, sparsity)
    except FormatError:
        raise
    except ValueError as exc:
        raise ValueError(f"compress: {exc}") from None
    if pat.kind not in COMPRESS_PATTERNS:
        raise ValueError(f"compress: pattern {pattern!r} is not supported here; use 'unstructured', an N:M pattern "
                         f"such as '1:4' or '2:4', or 'dense'")
    fmt = format or pat.default_format
    if fmt not in PATTERN_FORMATS[pat[0]]:
        raise ValueError(f"compress: format {fmt!r} does not fit pattern {pattern!r} "
                         f"(use {' or '.join(PATTERN_FORMATS[pat[0]])})")
    if pruning not in ("gmp", "rigl"):
        raise ValueError(f"compress: pruning must be 'gmp' or 'rigl', got {pruning!r}")
    if pruning == "rigl" and pat[0] != "unstructured":
        raise ValueError(f"compress: RigL keeps unstructured masks; pattern {pattern!r} needs pruning='gmp'")
    if mask_scope not in ("global", "layer"):
        raise ValueError(f"compress: mask_scope must be 'global' or 'layer', got {mask_scope!r}")
    if nm_schedule not in ("gradual", "fixed"):
        raise ValueError(f"compress: nm_schedule must be 'gradual' or 'fixed', got {nm_schedule!r}")
    if not isinstance(prune_every, int) or prune_every < 1:
        raise ValueError(f"compress: prune_every must be a positive integer, got {prune_every!r}")
    if not 0.0 < prune_end <= 1.0:
        raise ValueError(f"compress: prune_end must be in (0, 1], got {prune_end!r}")
    if not lr > 0:
        raise ValueError(f"compress: lr must be positive, got {lr!r}")
    return pat, s, fmt


@cpu.compressed_while_running
def compress(model: nn.Module, budget: Optional[float] = None, sparsity: Optional[float] = None,
             pattern: Optional[str] = None, group_size: Optional[int] = None, calib_data: Any = None,
             steps: int = 600, *, preset: Union[None, str, Preset] = None, unit: Optional[str] = None,
             batch_size: int = 8, holdout: Union[int, float] = 0.1, eval_data: Any = None,
             lr: float = 1e-3, weight_decay: float = 0.05, pruning: str = "gmp", prune_every: int = 50,
             prune_end: float = 0.75, mask_scope: str = "global", nm_schedule: str = "gradual",
             rigl_alpha: float = 0.3, format: Optional[str] = None, tile: Tuple[int, int] = (64, 64),
             seed: int = 0, resume_dir=None, progress: bool = True,
             forward: Optional[Callable] = None, output_fn: Optional[Callable] = None, top1: Optional[bool] = None,
             store_device: Union[str, torch.device] = "cpu", record_per_group: bool = False,
             model_name: Optional[str] = None, qbits: Optional[int] = None, qgroup: Optional[int] = None,
             base_qbits: Optional[int] = None,
             factor_dtype: Union[None, str, torch.dtype] = None, finetune_steps: Optional[int] = None,
             finetune_lr: float = 1e-4, ratio: Optional[float] = None,
             prune_schedule: str = "cubic", cpu_mode: Optional[str] = None) -> Tuple[nn.Module, CompressionReport]:
    """Compress the MLPs of ``model`` with FiPS, in place; returns ``(model, report)``.

    ``compress(model, config, calib_data=...)`` takes the settings as one
    :class:`~.config.CompressConfig` instead (keywords given beside it override its fields).

    Args:
        model: a trained model (timm ViT/DeiT/Swin, a Hugging Face BERT-family encoder,
            Llama, Gemma, ... or anything a :class:`Preset` describes). Its MLP
            ``nn.Linear`` layers are replaced by :class:`~fips_kernels.FiPSLinear`
            (deep-copy the model first to keep the original).
        budget: kept fraction ``p`` of each group's MLP weight parameters; ``d·r + Σ
            stored values ≤ p·Σ d·h`` holds exactly for every group (default 0.5; or give
            ``ratio``).
        sparsity: of the factors ``V_i`` (default 0.75 unstructured; implied by N:M).
        pattern: ``"unstructured"`` (bitmap format; the default), ``"1:4"``, ``"2:4"`` (any N:M; nm
            format, along each product's reduction axis), or ``"dense"``.
        group_size: consecutive blocks sharing one base ``U`` (default: the preset's).
        calib_data: calibration inputs: a tensor ``(N, ...)`` or a dict of them (cut into
            batches of ``batch_size``), a list of batches, or a DataLoader (see
            :func:`~.calibration.as_batches`).
        steps: optimisation steps per group (0: the SVD init with magnitude masks only).
        preset: a name (``vit``, ``swin``, ``bert``, ``llama``), a :class:`Preset`, or
            None to detect it.
        unit: ``"block"`` (loss on the block's output; default for ViT/Swin/BERT) or
            ``"mlp"`` (MLP input → output; default for Llama/Gemma).
        holdout: batches kept back from training for the end-to-end agreement (a
            count, or a fraction of the batches); ignored when ``eval_data`` is given.
        lr, weight_decay: AdamW (cosine decay to 0 over ``steps``; no decay on biases).
        pruning: ``"gmp"`` (cubic schedule from dense to the final sparsity at
            ``prune_end·steps``, masks recomputed every ``prune_every`` steps) or
            ``"rigl"`` (unstructured; drop/grow with fraction ``rigl_alpha``).
        mask_scope: ``"global"`` (one magnitude threshold per group) or ``"layer"``. (The FiPS
            authors' code uses one threshold over the whole model; groups here train one
            after another, so the group is the widest scope.)
        nm_schedule: for N:M patterns, ``"gradual"`` (4:4 → 3:4 → 2:4 → 1:4 on the
            cubic schedule) or ``"fixed"`` (the final N:M mask from step 0).
        format: storage format (default ``bitmap`` / ``nm`` / ``dense`` by pattern; ``csr``
            is allowed for unstructured).
        seed: every group trains from ``(seed, group index)``: the result does not
            depend on which process trains which group, or on resuming.
        resume_dir: a state directory: finished groups are saved there at once and
            reused by a later call with the same arguments (an interrupted run
            continues from its last finished group).
        progress: progress bars (recording, and per group with the loss).
        forward: ``forward(model, batch, device)`` runs the model on a batch (default:
            ``model(**batch)`` for dicts, ``model(batch)`` otherwise).
        output_fn: ``output_fn(output, batch) -> tensor`` compared end to end (default:
            ``logits``, else ``last_hidden_state``, else the output tensor).
        top1: report top-1 agreement (default: when the compared output is logits).
        store_device: where the recorded activations are kept (``"cpu"`` by default).
        record_per_group: record each group's activations just before training it (one
            pass of the calibration data per group) instead of all at once: memory for
            one group's activations instead of all (large models); the same result.
        model_name: the model's name in the report (default: its class name).
        qbits, qgroup: int8 or int4 factor values, one scale per ``qgroup`` rows of the
            reduction axis (docs/FORMATS.md); training sees the rounded values through a
            straight-through estimator, so it fits the grid the kernels will read.
        base_qbits: 8 for an int8 base ``U`` (one scale per column), trained the same way.
        ratio: instead of ``budget``: compress the MLP weights ``ratio`` times, counted in bytes
            (the dense weights' bytes in the model's dtype over every stored byte of the
            factors, scales and bases, as the report counts them). The form (sparsity,
            int8/int4 values, an int8 base, fp16 storage; :mod:`.ratio`'s rules) and the
            largest rank of every group that stays within the target are chosen; ``pattern``,
            ``sparsity``, ``qbits``, ``qgroup``, ``base_qbits`` and ``factor_dtype``, when
            given, are kept. The bytes never exceed ``dense / ratio``; a ratio no form
            reaches raises :class:`~.ratio.RatioError` (a ValueError). The report's
            ``config["plan"]`` says what was chosen.
        finetune_steps, finetune_lr: end-to-end fine-tuning after the block-wise stage
            (:mod:`.finetune`): every group's ``U``, ``V_i`` and biases trained together so
            the model's outputs match the original's on the calibration batches (AdamW,
            cosine decay; default ``steps`` steps at 1e-4; 0 turns it off). It needs the
            memory of a backward pass through the whole model.
        prune_schedule: ``"cubic"`` (from dense) or ``"accelerated"`` (the FiPS authors'
            code: sparsity 0.05, then a jump to 0.5 at the first update, then cubic).
        cpu_mode: how the returned model runs on a CPU, ``"speed"`` or ``"compressed"``
            (:mod:`fips_kernels.cpu`; None: ``FIPS_KERNELS_CPU_MODE`` or the default).
        factor_dtype: store the packed factors in ``torch.float16`` or ``torch.bfloat16``
            (None or the model's dtype: the model's). Training is unchanged (fp32); at
            packing ``U``, float factor values, the scales of int8/int4 values and of an
            int8 base, and the MLP biases are rounded to it, and the FiPS layers cast their
            input to it and their output back to the model's dtype (``cast_input``), so the
            report's bytes, the end-to-end agreement and the checkpoint are those of the
            16-bit factors. The per-unit errors on the training batches are the fp32
            factors' (measured before packing).
    """
    if isinstance(budget, CompressConfig):  # compress(model, config, ...): the config, then explicit keywords
        return compress(model, **merge(compress, budget, {k: v for k, v in locals().items() if k != "model"}))
    if cpu_mode is not None:
        cpu.check_mode(cpu_mode)
    t_start = time.perf_counter()
    factor_dtype = resolve_factor_dtype(factor_dtype)
    preset = resolve_preset(model, preset)
    units = find_units(model, preset, unit)
    unit = unit or preset.unit
    group_size = group_size if group_size is not None else preset.group_size
    groups = make_groups(units, group_size)
    plan = None
    if ratio is not None:  # the form and every group's rank come from the byte target
        if budget is not None:
            raise ValueError("compress: give budget or ratio, not both (ratio chooses the budget)")
        first_weight = model.get_submodule(groups[0].linears[0]).weight
        plan = plan_ratio(groups, ratio, first_weight.dtype, pattern=pattern, sparsity=sparsity, qbits=qbits,
                          qgroup=qgroup, base_qbits=base_qbits, factor_dtype=factor_dtype)
        form = plan.form
        pattern, sparsity, qbits, qgroup, base_qbits = (form.pattern, form.sparsity, form.qbits, form.qgroup,
                                                         form.base_qbits)
        factor_dtype = form.factor_dtype
        budget = plan.budget
    budget = 0.5 if budget is None else budget
    pattern = pattern or "unstructured"
    qgroup = 64 if qgroup is None else qgroup
    # with a ratio the bytes bind, not the parameter count: an overcomplete int4 plan may keep more
    # parameters than the dense weights have (budget > 1)
    pat, sparsity, fmt = _check_args(budget if plan is None else 1.0, steps, pattern, sparsity, format, pruning,
                                     mask_scope, nm_schedule, prune_every, prune_end, lr)
    if qbits not in (None, 8, 4) or base_qbits not in (None, 8):
        raise ValueError(f"compress: qbits must be None, 8 or 4 and base_qbits None or 8, got {qbits}, {base_qbits}")
    if qbits and fmt not in QUANT_FORMATS:
        raise ValueError(f"compress: the {fmt} format cannot be quantised (quantised formats: {QUANT_FORMATS})")
    if qbits and qgroup < 1:
        raise ValueError(f"compress: qgroup must be >= 1, got {qgroup}")
    if prune_schedule not in ("cubic", "accelerated"):
        raise ValueError(f"compress: prune_schedule must be 'cubic' or 'accelerated', got {prune_schedule!r}")
    if finetune_steps is None:
        finetune_steps = steps
    if isinstance(finetune_steps, bool) or not isinstance(finetune_steps, int) or finetune_steps < 0:
        raise ValueError(f"compress: finetune_steps must be a non-negative integer, got {finetune_steps!r}")
    if not finetune_lr > 0:
        raise ValueError(f"compress: finetune_lr must be positive, got {finetune_lr!r}")
    ranks = {}
    for i, g in enumerate(groups):
        if plan is not None:
            ranks[g.index] = plan.ranks[i]
            continue
        try:
            ranks[g.index] = group_rank(g.d, g.hidden, g.kinds, pattern, budget,
                                        sparsity if pat[0] == "unstructured" else None)
        except ValueError as exc:
            raise ValueError(f"compress: group {g.index} ({', '.join(u.block for u in g.units)}): {exc}") from None

    batches = calibration.as_batches(calib_data, batch_size)
    if eval_data is not None:
        train_batches, held = batches, calibration.as_batches(eval_data, batch_size)
    else:
        train_batches, held = calibration.split_holdout(batches, holdout)
    distributed.check_same_inputs(model, [*train_batches, *held])  # every rank: the same model and data
    forward = forward or calibration.model_forward
    first = model.get_submodule(groups[0].linears[0])
    dtype, device = first.weight.dtype, first.weight.device
    config = TrainConfig(budget=float(budget), sparsity=float(sparsity), pattern=pattern, pattern_tuple=pat,
                         steps=steps, lr=lr, weight_decay=weight_decay, pruning=pruning, prune_every=prune_every,
                         prune_end=prune_end, prune_schedule=prune_schedule, mask_scope=mask_scope,
                         nm_schedule=nm_schedule,
                         rigl_alpha=rigl_alpha, seed=seed, qbits=qbits, qgroup=qgroup, base_qbits=base_qbits)
    run_config = dict(config.as_dict(), format=fmt, group_size=group_size, unit=unit, preset=preset.name,
                      tile=list(tile))
    rank_id, world_size = distributed.world()
    mine = distributed.assign(groups, world_size)[rank_id]
    tag = f"[rank {rank_id}] " if world_size > 1 else ""
    by_index = {g.index: g for g in groups}
    digests = {i: weights_digest([t for name in by_index[i].linears for t in _weight_and_bias(model, name)])
               for i in mine}

    state = None
    if resume_dir is not None:
        state = ResumeState(resume_dir, {
            "config": run_config, "model": type(model).__name__, "dtype": str(dtype),
            "groups": [g.describe() for g in groups], "ranks": [ranks[g.index] for g in groups],
            "calibration": calibration.fingerprint(train_batches)})
    results: Dict[int, GroupResult] = {}
    resumed = set()
    if state is not None:
        for i in mine:
            r = state.load(i, digests[i])
            if r is not None:
                r.process = rank_id
                results[i] = r
                resumed.add(i)
    pending = [i for i in mine if i not in results]

    seconds: Dict[str, float] = {}
    with _no_kv_cache(model):
        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            reference = _final_outputs(model, held, forward, device, output_fn) if held else None
        finally:
            model.train(was_training)
        seconds["record"] = time.perf_counter() - t0

        def record(indices):
            names = [u.name for i in indices for u in by_index[i].units]
            if not names:
                return {}
            t = time.perf_counter()
            bar = _bar(progress, len(train_batches), f"{tag}recording {len(names)} units")
            try:
                return calibration.record(model, names, train_batches, forward=forward, device=device,
                                          store_device=store_device,
                                          progress=(lambda i: bar.update(1)) if bar is not None else None)
            finally:
                if bar is not None:
                    bar.close()
                seconds["record"] += time.perf_counter() - t

        records = {} if record_per_group else record(pending)
        for i in pending:
            spec = by_index[i]
            if record_per_group:  # the model is still the original one: the same activations, less memory
                records = record([i])
            desc = f"{tag}group {i + 1}/{len(groups)} ({_span(spec)}, r={ranks[i]})"
            result = train_group(model, spec, records, config, ranks[i], device=device, progress=progress, desc=desc)
            result.process = rank_id
            if state is not None:
                state.save(result, digests[i])
            results[i] = result
            for u in spec.units:  # free the group's activations
                records.pop(u.name, None)
        seconds["train"] = sum(results[i].seconds for i in pending)

        all_results = distributed.gather_results(results)
        all_resumed = distributed.gather_results({i: True for i in resumed})
        missing = [g.index for g in groups if g.index not in all_results]
        if missing:
            raise RuntimeError(f"compress: no result for groups {missing}")

        if finetune_steps > 0:
            t = time.perf_counter()
            targets = finetune.record_targets(model, train_batches, forward, device, output_fn, store_device)
            ft_losses, _ = finetune.finetune(
                model, groups, all_results, train_batches, targets,
                finetune.FinetuneConfig(steps=finetune_steps, lr=finetune_lr, seed=seed),
                qbits=qbits, qgroup=qgroup, base_qbits=base_qbits, forward=forward, device=device,
                output_fn=output_fn, progress=progress)
            seconds["finetune"] = time.perf_counter() - t

        params_before = sum(p.numel() for p in model.parameters())
        # not part of the resume fingerprint: the state holds the fp32 training result
        report = CompressionReport(model=model_name or type(model).__name__, preset=preset.name, unit=unit,
                                   config=dict(run_config, factor_dtype=str(factor_dtype or dtype).replace(
                                       "torch.", ""), finetune_steps=finetune_steps, finetune_lr=finetune_lr,
                                               ratio=None if plan is None else plan.ratio,
                                               plan=None if plan is None else plan.describe()))
        for g in groups:
            res = all_results[g.index]
            try:
                fgroup = pack_group(res.U, res.Vs, res.biases, g.kinds, pat, fmt, dtype=dtype, device=device,
                                    tile=tile, info={"rank": res.rank, "budget": budget, "sparsity": sparsity,
                                                     "pattern": pattern},
                                    qbits=qbits, qgroup=qgroup, base_qbits=base_qbits, factor_dtype=factor_dtype)
            except ValueError as exc:  # a value beyond the 16-bit range (the trained groups stay in resume_dir)
                raise ValueError(f"compress: group {g.index} ({_span(g)}): {exc}") from None
            install(model, fgroup, g.linears)
            report.groups.append(_group_report(g, res, fgroup, fmt, dtype, g.index in all_resumed))
        params_after = sum(p.numel() for p in model.parameters())
        report.fusion = fusion_report(model)
        report.model_parameters = {"before": params_before, "after": params_after}
        report.calibration = {"train_batches": len(train_batches),
                              "train_samples": sum(calibration.batch_size_of(b) for b in train_batches),
                              "holdout_batches": len(held),
                              "holdout_samples": sum(calibration.batch_size_of(b) for b in held)}

        t0 = time.perf_counter()
        if held:
            model.eval()
            try:
                outs = _final_outputs(model, held, forward, device, output_fn)
            finally:
                model.train(was_training)
            report.end_to_end = {"samples": report.calibration["holdout_samples"], "outputs": {}}
            for key, (ref, masks) in reference[0].items():
                logits = reference[1][key] if top1 is None else bool(top1)
                report.end_to_end["outputs"][key] = output_agreement(outs[0][key][0], ref, masks, logits)
        seconds["evaluate"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    report.seconds = seconds
    if cpu_mode is not None:
        cpu.set_mode(model, cpu_mode)
    return model, report


def _weight_and_bias(model: nn.Module, name: str):
    lin = model.get_submodule(name)
    return [lin.weight, getattr(lin, "bias", None)]


def _span(spec: GroupSpec) -> str:
    names = [u.block for u in spec.units]
    return names[0] if len(names) == 1 else f"{names[0]}..{names[-1].rpartition('.')[2]}"


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def _final_outputs(model, batches, forward, device, output_fn):
    """``{name: (outputs, masks)}`` and ``{name: is_logits}`` of the model on
    ``batches`` (CPU fp32). ``output_fn`` may return a tensor or a dict of them."""
    outs: Dict[str, list] = {}
    logits: Dict[str, bool] = {}
    with torch.no_grad():
        for batch in batches:
            out = forward(model, batch, device)
            if output_fn is not None:
                y = output_fn(out, batch)
                named = dict(y) if isinstance(y, dict) else {"output_fn": y}
                for k in named:
                    logits.setdefault(k, False)
            else:
                y, is_logits = calibration.default_output(out)
                key = "logits" if getattr(out, "logits", None) is not None else (
                    "last_hidden_state" if getattr(out, "last_hidden_state", None) is not None else "output")
                named = {key: y}
                logits[key] = is_logits
            mask = calibration.token_mask_of(batch)
            for k, t in named.items():
                t = t.detach().float().cpu()
                m = mask.cpu() if mask is not None and t.dim() == 3 and tuple(t.shape[:2]) == tuple(mask.shape) else None
                outs.setdefault(k, ([], []))
                outs[k][0].append(t)
                outs[k][1].append(m)
    return outs, logits


def _group_report(spec: GroupSpec, res: GroupResult, fgroup, fmt: str, dtype, resumed: bool) -> GroupReport:
    itemsize = torch.empty((), dtype=dtype).element_size()
    bias_bytes = sum(layer.bias.numel() * layer.bias.element_size() for layer in fgroup if layer.bias is not None)
    return GroupReport(
        index=spec.index, units=[u.name for u in spec.units], layers=spec.linears, kinds=spec.kinds, d=spec.d,
        hidden=spec.hidden, rank=res.rank, format=fmt, dense_parameters=spec.dense_parameters,
        parameters=fgroup.base.U.numel() + sum(layer.factor.nnz for layer in fgroup),
        dense_bytes=spec.dense_parameters * itemsize, bytes=fgroup.nbytes() - bias_bytes,
        errors_init=[dict(e, unit=u.name) for e, u in zip(res.errors_init, spec.units)],
        errors_final=[dict(e, unit=u.name) for e, u in zip(res.errors_final, spec.units)],
        train_loss_first_step=res.losses[0][1] if res.losses else None,
        train_loss_last_step=res.losses[-1][1] if res.losses else None,
        seconds=res.seconds, resumed=resumed, process=res.process)
