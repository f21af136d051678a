"""Where a benchmark ran: device, GPU, driver, library versions, date, commit.

Every value is a non-empty string (``"none"`` when it does not apply, e.g.
the GPU of a CPU run; ``"unknown"`` when it cannot be found out).
"""
from __future__ import annotations

import datetime
import os
import subprocess
from pathlib import Path
from typing import Dict, Optional

import torch

__all__ = ["METADATA_COLUMNS", "run_metadata", "driver_version", "git_commit", "triton_version", "utc_now"]

REPO_ROOT = Path(__file__).resolve().parents[2]
# The columns of run_metadata, at the end of every benchmark CSV's rows.
METADATA_COLUMNS = ("device", "gpu_name", "driver", "torch", "triton", "cuda", "date", "commit")


def _run(cmd, cwd: Optional[Path] = None, timeout: float = 10.0) -> Optional[str]:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def driver_version() -> str:
    """The NVIDIA driver (``nvidia-smi``), or ``"none"`` where there is none."""
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else "none"


COMMIT_ENV = "FIPS_KERNELS_COMMIT"


def git_commit(root: Path = REPO_ROOT) -> str:
    """``git rev-parse --short HEAD`` of the source tree (or ``"unknown"``),
    with ``-dirty`` when tracked or untracked files differ from it.

    ``$FIPS_KERNELS_COMMIT``, when set, is used as is: for a copy of the tree
    without its ``.git`` (a lent GPU machine), pass the commit it was copied from.
    """
    given = os.environ.get(COMMIT_ENV, "").strip()
    if given:
        return given
    if not (root / ".git").exists():
        return "unknown"
    head = _run(["git", "rev-parse", "--short", "HEAD"], cwd=root) or "unknown"
    status = _run(["git", "status", "--porcelain"], cwd=root)
    return head + ("-dirty" if status else "")


def triton_version() -> str:
    try:
        import triton
    except Exception:  # noqa: BLE001 - missing or broken install
        return "none"
    return getattr(triton, "__version__", "unknown")


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def gpu_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "none"
    return torch.cuda.get_device_name(device)


def run_metadata(device: torch.device, when: Optional[datetime.datetime] = None) -> Dict[str, str]:
    """The metadata columns of every CSV row of a run."""
    device = torch.device(device)
    when = when or utc_now()
    return {
        "device": device.type,
        "gpu_name": gpu_name(device),
        "driver": driver_version(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda or "none",
        "date": when.isoformat().replace("+00:00", "Z"),
        "commit": git_commit(),
    }


__all__ += ["gpu_name", "REPO_ROOT", "COMMIT_ENV"]
