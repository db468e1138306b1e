"""Atomic, fingerprinted, SHA-256-verified checkpoints, read with ``weights_only=True`` (so RNG states are tensors)."""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from zsl_utils.atomic import write_atomically
from zsl_utils.cache import fingerprint_differences, normalise_fingerprint
from zsl_utils.errors import StaleCacheError, ZslError

CHECKPOINT_FORMAT = 1
_NAME = re.compile(r"^step_(\d{9})\.pt$")


class CheckpointError(ZslError):
    """A checkpoint cannot be written or read (not writable, corrupt, bad arguments)."""


class StaleCheckpointError(StaleCacheError):
    """A checkpoint belongs to a different configuration or training data set."""


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint in ``directory``, by increasing step."""
    paths = Path(directory).iterdir() if Path(directory).is_dir() else []
    return sorted((int(match.group(1)), path) for path in paths if (match := _NAME.match(path.name)) and path.is_file())


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest step in ``directory``, or None when there is none."""
    return (list_checkpoints(directory) or [(0, None)])[-1][1]


def capture_rng_state() -> dict[str, Any]:
    """Torch (CPU and every CUDA device), NumPy and Python RNG states as weights_only-safe data."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, python_state, gauss = random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda,
            "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                      "position": int(position), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "state": list(python_state), "gauss": gauss}}


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states are restored when the device count matches)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    random.setstate((state["python"]["version"], tuple(state["python"]["state"]), state["python"]["gauss"]))


def save_checkpoint(directory: str | os.PathLike, step: int, state: Mapping[str, Any], fingerprint: Mapping[str, Any],
                    keep_last: int = 2) -> Path:
    """Atomically write ``state`` (tensors, numbers, strings, containers) as ``step``; keep the ``keep_last`` newest."""
    if keep_last < 1:
        raise CheckpointError(f"keep_last must be >= 1, got {keep_last}.")
    if int(step) < 0:
        raise CheckpointError(f"checkpoint step must be >= 0, got {step}.")
    target = Path(directory) / f"step_{int(step):09d}.pt"
    payload = {"step": int(step), "fingerprint": json.dumps(normalise_fingerprint(fingerprint), sort_keys=True),
               "state": dict(state)}
    payload.update(format=CHECKPOINT_FORMAT, sha256=_digest(payload))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(target, lambda handle: torch.save(payload, handle))
    except OSError as error:
        raise CheckpointError(f"could not write checkpoint {target} ({error.strerror or error}); free disk space or "
                              "pass another, writable checkpoint_dir. Earlier checkpoints are intact.") from error
    for _, old in list_checkpoints(target.parent)[:-keep_last]:
        old.unlink(missing_ok=True)
    return target


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"loss": {"margin": 1}}`` -> ``{"loss.margin": 1}``, so a difference names the leaf that changed."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _digest(tree: Any, digest: Any = None) -> str:
    """SHA-256 of every tensor's dtype, shape and bytes and every other leaf's repr, in key order."""
    digest = digest or hashlib.sha256()
    if isinstance(tree, torch.Tensor):
        tensor = tree.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(tree, (Mapping, list, tuple)):
        digest.update(f"{len(tree)}(".encode())
        pairs = sorted(tree.items(), key=lambda kv: repr(kv[0])) if isinstance(tree, Mapping) else enumerate(tree)
        for key, value in pairs:
            _digest(key, digest)
            _digest(value, digest)
    else:
        digest.update(repr(tree).encode())
    return digest.hexdigest()


def _read(path: Path, map_location: Any) -> dict[str, Any]:
    """The verified payload of checkpoint ``path``, else :class:`CheckpointError` naming it and why."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as error:
        raise CheckpointError(f"checkpoint {path} does not exist.") from error
    except Exception as error:  # noqa: BLE001 - torch raises many types for corrupt files
        first_line = (str(error).splitlines() or [""])[0][:160]  # torch's messages run to pages
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(error).__name__}: {first_line}); delete it to "
                              "resume from the previous one.") from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a zsl_utils checkpoint (format {CHECKPOINT_FORMAT}).")
    if "sha256" in payload and _digest({k: payload[k] for k in ("step", "fingerprint", "state")}) != payload["sha256"]:
        raise CheckpointError(f"checkpoint {path} is damaged: its content no longer matches the SHA-256 written with "
                              "it; delete it to resume from the previous one.")  # older files have no sha256
    return payload


def load_checkpoint(path: str | os.PathLike, fingerprint: Mapping[str, Any] | None = None,
                    map_location: str | torch.device = "cpu") -> tuple[int, dict[str, Any]]:
    """``(step, state)``; with ``fingerprint``: StaleCheckpointError if it differs, a damaged file falls back."""
    path, problems, resuming = Path(path), [], fingerprint is not None
    earlier = [p for _, p in reversed(list_checkpoints(path.parent)) if p.name < path.name] if resuming else []
    for path in [path, *earlier]:
        try:
            payload = _read(path, map_location)
            break
        except CheckpointError as error:
            problems.append(str(error))
    else:
        raise CheckpointError(" ".join(problems) + (f" No intact earlier checkpoint in {path.parent}: delete the "
                                                    "damaged file(s) to start over." if resuming else ""))
    if problems:
        warnings.warn(f"resuming from {path.name}, the newest intact one, as " + " ".join(problems), stacklevel=2)
    if resuming:
        stored = _flatten(json.loads(payload["fingerprint"]))
        differences = fingerprint_differences(stored, _flatten(normalise_fingerprint(fingerprint)))
        if differences:
            raise StaleCheckpointError(f"checkpoint {path} belongs to a different run:\n  " + "\n  ".join(differences)
                                       + f"\nUse another checkpoint_dir for this configuration, or delete "
                                       f"{path.parent} to start over.")
    return payload["step"], payload["state"]


class ResumableBatches:
    """Endless mini-batches: a seeded permutation per epoch cut into ``batch_size`` slices, the last one maybe
    shorter (every item once per epoch). The state (generator, permutation, position) goes into checkpoints."""

    def __init__(self, n_items: int, batch_size: int, seed: int) -> None:
        self.n_items, self.batch_size = n_items, min(batch_size, n_items)
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.position = torch.empty(0, dtype=torch.long), 0

    def next(self) -> torch.Tensor:
        if self.position >= len(self.order):
            self.order, self.position = torch.randperm(self.n_items, generator=self.generator), 0
        batch = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "order": self.order.clone(), "position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.position = state["order"].clone(), int(state["position"])
