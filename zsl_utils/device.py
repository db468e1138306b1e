"""Device choice, seeding and mixed precision, so one notebook runs on a CPU, an Apple GPU or CUDA."""
from __future__ import annotations

import contextlib
import os
import random
from typing import Iterator

import numpy as np
import torch

from zsl_utils.errors import ParameterError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def try_gpu(index: int = 0) -> torch.device:
    """Return ``cuda:index`` if that GPU exists, else ``mps`` if available, else CPU (d2l style)."""
    if torch.cuda.device_count() > index:
        return torch.device(f"cuda:{index}")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_device(preference: str = "auto") -> torch.device:
    """Resolve a device parameter: ``auto`` picks cuda -> mps -> cpu; anything else is honoured.

    An explicit request for hardware that is not there fails with the list of choices
    rather than silently falling back, so a GPU run never quietly becomes a CPU run.
    """
    choice = (preference or "auto").strip().lower()
    if choice == "auto":
        return try_gpu()
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "mps":
        if not _mps_available():
            raise ParameterError("device='mps' was requested but MPS is not available; use device='auto' or 'cpu'.")
        return torch.device("mps")
    if choice == "cuda" or choice.startswith("cuda:"):
        index = int(choice.split(":", 1)[1]) if ":" in choice and choice.split(":", 1)[1].isdigit() else 0
        if choice not in ("cuda", f"cuda:{index}"):
            raise ParameterError(f"device={preference!r} is not understood; expected one of {DEVICE_CHOICES}.")
        if torch.cuda.device_count() <= index:
            raise ParameterError(
                f"device={preference!r} was requested but this machine has {torch.cuda.device_count()} CUDA "
                "device(s); use device='auto' (falls back to CPU) or 'cpu'."
            )
        return torch.device(f"cuda:{index}")
    raise ParameterError(f"device={preference!r} is not understood; expected one of {DEVICE_CHOICES}.")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a rerun draws the same numbers."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ParameterError(f"seed must be an int, got {seed!r}.")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)


@contextlib.contextmanager
def autocast(device: torch.device | str, dtype: torch.dtype = torch.bfloat16, enabled: bool = True) -> Iterator[None]:
    """Mixed precision on CUDA; a no-op elsewhere, so CPU results stay in float32."""
    device = torch.device(device)
    if enabled and device.type == "cuda":
        with torch.autocast(device_type="cuda", dtype=dtype):
            yield
    else:
        yield
