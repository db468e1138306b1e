"""Atomic, fingerprinted training checkpoints that make long runs resumable.

A checkpoint directory holds ``step_000001000.pt`` files, one per saved step. Each is
written to a temporary name in the same directory, flushed, fsync-ed and renamed with
``os.replace``, so a run killed at any instant leaves either the previous checkpoints
or the previous ones plus a complete new one -- never a truncated ``step_*.pt``. The
temporary names start with a dot and are ignored by :func:`latest_checkpoint`.

Every checkpoint stores the *fingerprint* of what it belongs to (training settings,
loss weights, architecture, a hash of the training data). Loading it for a different
fingerprint raises :class:`StaleCheckpointError`, listing the keys that differ, instead
of silently continuing someone else's run.

Files are read with ``torch.load(weights_only=True)``: a checkpoint is data, never code.
For that, random-number-generator states are stored as tensors and plain lists
(:func:`capture_rng_state` / :func:`restore_rng_state`).
"""
from __future__ import annotations

import json
import os
import random
import re
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


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    """Final path of the checkpoint of ``step`` in ``directory``."""
    if int(step) < 0:
        raise CheckpointError(f"checkpoint step must be >= 0, got {step}.")
    return Path(directory) / f"step_{int(step):09d}.pt"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint in ``directory``, by increasing step."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest step in ``directory``, or None when there is none."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


# ---------------------------------------------------------------------- RNG state
def capture_rng_state() -> dict[str, Any]:
    """Torch (CPU and every CUDA device), NumPy and Python RNG states as weights_only-safe data."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, python_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "position": int(position), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(python_state), "gauss": gauss},
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states are restored when the device count matches)."""
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    numpy_state = state["numpy"]
    np.random.set_state((
        numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
        numpy_state["has_gauss"], numpy_state["cached_gaussian"],
    ))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss"]))


# ---------------------------------------------------------------------- save / load
def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    state: Mapping[str, Any],
    fingerprint: Mapping[str, Any],
    keep_last: int = 2,
) -> Path:
    """Atomically write ``state`` as the checkpoint of ``step``; keep the ``keep_last`` newest.

    ``state`` holds tensors, numbers, strings and containers of them (state dicts, RNG
    states from :func:`capture_rng_state`, loss history...). Older checkpoints are
    deleted only after the new one is durably in place.
    """
    if keep_last < 1:
        raise CheckpointError(f"keep_last must be >= 1, got {keep_last}.")
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CheckpointError(
            f"cannot create checkpoint directory {directory} ({error.strerror}); pass a writable checkpoint_dir."
        ) from error
    target = checkpoint_path(directory, step)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "step": int(step),
        "fingerprint": json.dumps(normalise_fingerprint(fingerprint), sort_keys=True),
        "state": dict(state),
    }
    try:
        write_atomically(target, lambda handle: torch.save(payload, handle))
    except OSError as error:
        raise CheckpointError(
            f"could not write checkpoint {target} ({error.strerror or error}); free disk space or pass "
            f"another checkpoint_dir. Earlier checkpoints are intact."
        ) from error
    for _, old in list_checkpoints(directory)[:-keep_last]:
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


def load_checkpoint(
    path: str | os.PathLike, fingerprint: Mapping[str, Any] | None = None, map_location: str | torch.device = "cpu"
) -> tuple[int, dict[str, Any]]:
    """Read a checkpoint and return ``(step, state)``.

    Raises :class:`StaleCheckpointError` when ``fingerprint`` is given and differs from
    the stored one, and :class:`CheckpointError` when the file is unreadable.
    """
    path = Path(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as error:
        raise CheckpointError(f"checkpoint {path} does not exist.") from error
    except Exception as error:  # noqa: BLE001 - torch raises many types for corrupt files
        first_line = (str(error).splitlines() or [""])[0][:160]  # torch's messages run to pages
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(error).__name__}: {first_line}); delete it to resume "
            f"from the previous one."
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a zsl_utils checkpoint (format {CHECKPOINT_FORMAT}).")
    if fingerprint is not None:
        stored = _flatten(json.loads(payload["fingerprint"]))
        differences = fingerprint_differences(stored, _flatten(normalise_fingerprint(fingerprint)))
        if differences:
            raise StaleCheckpointError(
                f"checkpoint {path} belongs to a different run:\n  " + "\n  ".join(differences)
                + f"\nUse another checkpoint_dir for this configuration, or delete {path.parent} to start over."
            )
    return payload["step"], payload["state"]
