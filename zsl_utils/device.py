"""Device choice, seeding and mixed precision, so one notebook runs on a CPU, an Apple GPU or CUDA."""
from __future__ import annotations

import contextlib
import os
import random
import re

import numpy as np
import torch

from zsl_utils.errors import ParameterError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
# A float32 forward's last bits depend on the CPU's instruction set (AVX-512 vs AVX2); float64 stored as float32 not.
COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def try_gpu(index: int = 0) -> torch.device:
    """Return ``cuda:index`` if that GPU exists, else ``mps`` if available, else CPU (d2l style)."""
    if torch.cuda.device_count() > index:
        return torch.device(f"cuda:{index}")
    return torch.device("mps" if _mps_available() else "cpu")


def pick_device(preference: str = "auto") -> torch.device:
    """``auto`` picks cuda -> mps -> cpu; anything else is honoured or raises, so a GPU run never becomes a CPU run."""
    choice = (preference or "auto").strip().lower()
    if choice == "auto":
        return try_gpu()
    if choice == "mps" and not _mps_available():
        raise ParameterError("device='mps' was requested but MPS is not available; use device='auto' or 'cpu'.")
    if choice in ("cpu", "mps"):
        return torch.device(choice)
    cuda = re.fullmatch(r"cuda(?::(0|[1-9][0-9]*))?", choice)
    if cuda is None:
        raise ParameterError(f"device={preference!r} is not understood; expected one of {DEVICE_CHOICES}.")
    index = int(cuda.group(1) or 0)
    if torch.cuda.device_count() <= index:
        raise ParameterError(f"device={preference!r} was requested but this machine has {torch.cuda.device_count()} "
                             "CUDA device(s); use device='auto' (falls back to CPU) or 'cpu'.")
    return torch.device(f"cuda:{index}")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a rerun draws the same numbers."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ParameterError(f"seed must be an int, got {seed!r}.")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)


def autocast(device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
             enabled: bool = True) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA; a no-op elsewhere, so CPU results stay in float32."""
    if enabled and torch.device(device).type == "cuda":
        return torch.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext()


def torch_dtype(name: str) -> torch.dtype:
    if name not in COMPUTE_DTYPES:
        raise ParameterError(f"compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {name!r}.")
    return COMPUTE_DTYPES[name]
