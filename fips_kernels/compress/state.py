"""Resume: every finished group is written to a state directory at once, so an
interrupted run loses at most the group it was training.

Layout of the directory:

* ``manifest.json`` — the run's fingerprint: the training configuration, the
  model class, the groups (names and shapes) and a SHA-256 of the calibration
  data. A directory written by a different run is refused
  (:class:`ResumeError` names what differs) rather than mixed in.
* ``group_<index>.safetensors`` — one finished group: ``U``, each masked
  ``V.<i>``, ``mask.<i>`` (uint8), ``bias.<i>``; the metadata holds its errors,
  losses and a SHA-256 of the group's original weights. Files are written to a
  temporary name and renamed, so a crash never leaves a half-written group.

Groups are trained from a seed that depends only on the run's seed and the
group's index, so a resumed run gives the same result as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Dict, List, Optional, Sequence

import torch

from .train import GroupResult

__all__ = ["ResumeState", "ResumeError", "weights_digest"]

MANIFEST = "manifest.json"


class ResumeError(RuntimeError):
    """The state directory belongs to a different run."""


def weights_digest(tensors: Sequence[Optional[torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none;")
            continue
        t = t.detach().contiguous().cpu()
        h.update(f"{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _diff(a, b, prefix="") -> List[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


class ResumeState:
    """A state directory for one run (see the module docstring)."""

    def __init__(self, directory: os.PathLike, fingerprint: dict):
        self.directory = os.fspath(directory)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # normalised (tuples -> lists)
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, MANIFEST)
        if os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    old = json.load(f)
            except (OSError, json.JSONDecodeError) as exc:
                raise ResumeError(f"{path}: unreadable manifest ({exc}); delete the directory to start over") from None
            if old != self.fingerprint:
                raise ResumeError(
                    f"{self.directory} holds the state of a different run (differs in: "
                    f"{', '.join(_diff(old, self.fingerprint)[:8])}); use another directory or delete it")
        else:
            self._write_text(path, json.dumps(self.fingerprint, indent=1, sort_keys=True))

    @staticmethod
    def _write_text(path: str, text: str) -> None:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)

    def path(self, index: int) -> str:
        return os.path.join(self.directory, f"group_{index:04d}.safetensors")

    def finished(self) -> List[int]:
        return self.finished_in(self.directory)

    @staticmethod
    def finished_in(directory: os.PathLike) -> List[int]:
        """Indices of the finished groups in ``directory`` (none when it does not exist)."""
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            return []
        return sorted(int(fn[6:10]) for fn in os.listdir(directory)
                      if fn.startswith("group_") and fn.endswith(".safetensors") and fn[6:10].isdigit())

    def save(self, result: GroupResult, digest: str) -> None:
        from safetensors.torch import save_file

        tensors: Dict[str, torch.Tensor] = {"U": result.U.contiguous()}
        for i, (V, mk, b) in enumerate(zip(result.Vs, result.masks, result.biases)):
            tensors[f"V.{i}"] = V.contiguous()
            tensors[f"mask.{i}"] = mk.to(torch.uint8).contiguous()
            if b is not None:
                tensors[f"bias.{i}"] = b.contiguous()
        meta = {"index": result.index, "rank": result.rank, "layers": len(result.Vs),
                "errors_init": result.errors_init, "errors_final": result.errors_final,
                "losses": result.losses, "seconds": result.seconds, "weights_sha256": digest}
        path = self.path(result.index)
        tmp = f"{path}.tmp{os.getpid()}"
        save_file(tensors, tmp, metadata={"fips_kernels_group": json.dumps(meta)})
        os.replace(tmp, path)

    def load(self, index: int, digest: str) -> Optional[GroupResult]:
        """The finished group ``index``, or None when it is not there (or unreadable:
        then it is trained again)."""
        path = self.path(index)
        if not os.path.exists(path):
            return None
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                meta = json.loads((f.metadata() or {})["fips_kernels_group"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            n = meta["layers"]
            result = GroupResult(
                index=meta["index"], rank=meta["rank"], U=tensors["U"],
                Vs=[tensors[f"V.{i}"] for i in range(n)], masks=[tensors[f"mask.{i}"].bool() for i in range(n)],
                biases=[tensors.get(f"bias.{i}") for i in range(n)],
                errors_init=meta["errors_init"], errors_final=meta["errors_final"],
                losses=[tuple(x) for x in meta["losses"]], seconds=meta["seconds"])
        except Exception as exc:  # damaged file: train the group again
            warnings.warn(f"{path}: unreadable ({type(exc).__name__}: {exc}); the group is trained again")
            return None
        if meta.get("weights_sha256") != digest or result.index != index:
            raise ResumeError(f"{path} was written for other weights of group {index}; the model changed since "
                              f"the interrupted run. Use another state directory or delete it")
        return result

    @staticmethod
    def remove(directory: os.PathLike) -> int:
        """Delete the files a run writes in ``directory`` (the manifest and the group
        files, nothing else), and the directory when it is then empty. Returns the
        number of files removed."""
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            return 0
        removed = 0
        for fn in os.listdir(directory):
            if fn == MANIFEST or (fn.startswith("group_") and ".safetensors" in fn) or fn.startswith(MANIFEST + ".tmp"):
                os.remove(os.path.join(directory, fn))
                removed += 1
        try:
            os.rmdir(directory)
        except OSError:
            pass
        return removed
