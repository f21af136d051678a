"""Several processes (``torchrun``), each compressing its share of the groups.

Groups are independent once the original activations are recorded, so with
``torch.distributed`` initialised each rank records only its own groups' units,
trains them, and the results are exchanged (``all_gather_object``) so every
rank installs the same compressed model. Each group's training depends only on
its own recorded activations, its weights and ``(seed, group index)``, so the
result equals the single-process one (given the same number of threads per
process: CPU kernels may sum in another order with another thread count).

Groups are dealt to ranks by size (largest first, to the least-loaded rank),
deterministically.

That holds only if every rank starts from the same model and calibration data:
:func:`check_same_inputs` compares digests of both across the ranks and refuses
a run where they differ (random weights drawn without a common seed, loading
code that is not deterministic), which would otherwise mix groups trained on
different models into one silently worse result.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from .presets import GroupSpec

__all__ = ["world", "assign", "gather_results", "init_from_env", "check_same_inputs", "RankMismatchError"]


class RankMismatchError(ValueError):
    """The processes of a distributed run hold different models or calibration data."""


def world() -> Tuple[int, int]:
    """``(rank, world size)``: ``(0, 1)`` without an initialised process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def assign(groups: Sequence[GroupSpec], world_size: int) -> List[List[int]]:
    """Group indices per rank, balancing ``dense parameters × units`` (a proxy for the work)."""
    load = [0] * world_size
    out: List[List[int]] = [[] for _ in range(world_size)]
    for g in sorted(groups, key=lambda g: (-g.dense_parameters * len(g.units), g.index)):
        r = min(range(world_size), key=lambda i: (load[i], i))
        out[r].append(g.index)
        load[r] += g.dense_parameters * len(g.units)
    return [sorted(x) for x in out]


def gather_results(local: Dict[int, object]) -> Dict[int, object]:
    """Every rank's ``{group index: result}`` merged on every rank."""
    import torch.distributed as dist

    rank, size = world()
    if size == 1:
        return dict(local)
    parts: List[Dict[int, object]] = [None] * size  # type: ignore[list-item]
    dist.all_gather_object(parts, local)
    merged: Dict[int, object] = {}
    for part in parts:
        merged.update(part)
    return merged


def model_digest(model: torch.nn.Module) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of the model's state (parameters and buffers)."""
    import hashlib

    from .state import weights_digest

    state = model.state_dict()
    return hashlib.sha256(("\n".join(state) + weights_digest(list(state.values()))).encode()).hexdigest()


def check_same_inputs(model: torch.nn.Module, batches: Sequence[object]) -> None:
    """Under torch.distributed: raise :class:`RankMismatchError` unless every rank holds the same model
    and the same calibration batches (digests compared with ``all_gather_object``). One process: nothing."""
    from . import calibration

    rank, size = world()
    if size == 1:
        return
    import torch.distributed as dist

    mine = (model_digest(model), calibration.fingerprint(batches))
    every: List[Tuple[str, str]] = [None] * size  # type: ignore[list-item]
    dist.all_gather_object(every, mine)
    for what, i in (("weights", 0), ("calibration data", 1)):
        differ = [r for r in range(size) if every[r][i] != every[0][i]]
        if differ:
            raise RankMismatchError(
                f"compress: the processes hold different {what}: rank{'s' if len(differ) > 1 else ''} "
                f"{', '.join(map(str, differ))} differ{'' if len(differ) > 1 else 's'} from rank 0; every rank "
                f"must build or load the same {what} (seed random initialisation the same way on every rank), "
                f"or groups trained on different models would be mixed into one")


def init_from_env() -> Tuple[int, int, torch.device]:
    """Initialise the process group from torchrun's environment (``WORLD_SIZE`` > 1):
    NCCL with one GPU per local rank when CUDA is there, gloo on CPUs.
    Returns ``(rank, world size, device)``."""
    import os

    import torch.distributed as dist

    size = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, size = world()
    return rank, size, device
