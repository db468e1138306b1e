"""Process groups under ``torchrun`` (with timeouts), rank helpers, and launching and failing whole jobs.

A failing rank writes its error to a JSON file (:func:`rank_failure_guard`), so :func:`launch_torchrun` can raise the
*first* failing rank's error, not the "SIGTERM received" of the ranks torn down after it."""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from zsl_utils.atomic import write_text_atomically
from zsl_utils.device import pick_device
from zsl_utils.errors import ParameterError, ZslError

# Long enough for the slowest rank of an unbalanced extraction to finish its shards
# while the others wait at the final barrier; short enough that a hung job dies today.
DEFAULT_TIMEOUT_S = 2 * 3600
_ERROR_FILE = "rank_{rank}.error.json"


class DistributedError(ZslError):
    """A distributed job cannot start or a collective failed (timeout, disagreement)."""


class DistributedRunError(DistributedError):
    """A job launched with :func:`launch_torchrun` failed; the message holds the failing rank's error."""

    def __init__(self, message: str, rank_errors: Sequence[dict] = (), log_path: Path | None = None) -> None:
        super().__init__(message)
        self.rank_errors, self.log_path = list(rank_errors), log_path


@dataclass(frozen=True)
class DistContext:
    """Who this process is in the job: global/local rank, sizes, backend (None: no group) and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:  # the rank that writes shared outputs
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None and self.world_size > 1


def _rank_device(preference: str, local_rank: int) -> torch.device:
    """The GPU of this local rank when CUDA is wanted and present; otherwise the preferred device."""
    # A notebook's "cuda:0" means "cuda": under torchrun each rank owns the GPU of its LOCAL_RANK.
    choice = (preference or "auto").strip().lower().split(":")[0]
    if choice in ("auto", "cuda") and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise DistributedError(f"local rank {local_rank} has no GPU: this node has {count} CUDA device(s). Use "
                                   f"--nproc_per_node {count} or fewer, or device='cpu'.")
        return torch.device(f"cuda:{local_rank}")
    device = pick_device(choice)
    return torch.device("cpu") if device.type == "mps" else device  # no MPS collective backend


def init_distributed(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Join the torchrun process group (outside torchrun: a single-process context) on ``cuda:LOCAL_RANK``
    (NCCL) or the CPU (Gloo). ``timeout_s`` bounds every collective: a dead peer raises, never hangs."""
    if not timeout_s > 0:
        raise ParameterError(f"timeout_s must be > 0 seconds, got {timeout_s!r}.")
    if not all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return DistContext(device=pick_device(device))
    try:
        rank, world_size, local_rank = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    except ValueError as error:
        raise DistributedError(f"a torchrun environment variable is not an integer ({error}); launch with "
                               "torchrun.") from error
    torch_device = _rank_device(device, local_rank)
    backend = "nccl" if torch_device.type == "cuda" else "gloo"
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"device_id": torch_device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistContext(rank, world_size, local_rank, local_world_size, backend, torch_device)


def shutdown_distributed() -> None:
    """Leave the process group if one is active (call on success; a failing rank just exits)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def default_num_workers(local_world_size: int = 1, cap: int = 8) -> int:
    """DataLoader workers per rank: this process's CPUs split between local ranks, one kept for the rank (0 if few)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)  # macOS
    per_rank = cpus // max(1, local_world_size)
    return max(0, min(cap, per_rank - 1)) if per_rank > 2 else 0


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """On Linux, get ``sig`` when the parent (torchrun agent) dies: a SIGKILLed agent leaves no orphans writing."""
    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        if sys.platform.startswith("linux") and ctypes.CDLL(None).prctl(pr_set_pdeathsig, int(sig), 0, 0, 0) == 0:
            if os.getppid() == 1:  # the parent was already gone before prctl ran
                os.kill(os.getpid(), sig)


def barrier(ctx: DistContext, timeout_s: float = DEFAULT_TIMEOUT_S, what: str = "barrier") -> None:
    """Wait for every rank, or raise :class:`DistributedError` (Gloo names the ranks that never came)."""
    if not ctx.is_distributed:
        return
    try:
        if ctx.backend == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)
        else:  # NCCL: bounded by the process-group timeout
            dist.barrier(device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    except RuntimeError as error:
        raise DistributedError(f"rank {ctx.rank}: not every rank reached '{what}' within {timeout_s:.0f} s ({error}). "
                               "Another rank crashed or hangs: see its error above; rerun to resume.") from error


def all_gather_objects(ctx: DistContext, value: Any) -> list[Any]:
    """``value`` of every rank, in rank order (``[value]`` in a single process). Keep it small."""
    if not ctx.is_distributed:
        return [value]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def agree_on(ctx: DistContext, value: str, what: str) -> None:
    """Raise :class:`DistributedError` unless every rank passes the same ``value`` (e.g. a listing hash)."""
    values = all_gather_objects(ctx, value)
    if len(set(values)) > 1:
        by_rank = ", ".join(f"rank {r}: {v[:16]}" for r, v in enumerate(values))
        raise DistributedError(f"ranks disagree on {what} ({by_rank}); every node must see the same files. Check "
                               "that the paths are on a shared file system and not changing during the run.")


def write_rank_error(error_dir: str | os.PathLike, rank: int, error: BaseException) -> Path:
    """Record ``error`` of ``rank`` as JSON in ``error_dir`` (read by :func:`launch_torchrun`)."""
    record = {"rank": rank, "local_rank": int(os.environ.get("LOCAL_RANK", 0)), "host": socket.gethostname(),
              "pid": os.getpid(), "time": time.time(), "type": type(error).__name__, "message": str(error),
              "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__))[-8000:]}
    return write_text_atomically(Path(error_dir) / _ERROR_FILE.format(rank=rank), json.dumps(record, indent=2))


def read_rank_errors(error_dir: str | os.PathLike) -> list[dict]:
    """Error records of failed ranks, earliest first (the first is the root cause)."""
    records = []
    for path in Path(error_dir).glob(_ERROR_FILE.format(rank="*")):
        with contextlib.suppress(OSError, ValueError):
            records.append(json.loads(path.read_text()))
    return sorted(records, key=lambda r: (r.get("time", 0.0), r.get("rank", 0)))


@contextlib.contextmanager
def rank_failure_guard(error_dir: str | os.PathLike | None) -> Iterator[None]:
    """Write any exception escaping the block to ``error_dir`` (if given) as ``$RANK``'s, then re-raise it."""
    try:
        yield
    except BaseException as error:  # noqa: BLE001 - recorded and re-raised
        if error_dir is not None and not isinstance(error, SystemExit):
            with contextlib.suppress(OSError):  # reporting must not hide the original error
                write_rank_error(error_dir, int(os.environ.get("RANK", 0)), error)
        raise


def run_cli(prog: str, work: Callable[[], object]) -> int:
    """Exit status of a worker CLI running ``work()``: 0, or 1 after printing a :class:`ZslError` in one line."""
    try:
        work()
    except ZslError as error:  # a problem the user can fix: one readable message, no traceback
        print(f"{prog}, rank {os.environ.get('RANK', '0')}: error: {error}", file=sys.stderr)
        return 1
    return 0


def _descendants(pid: int) -> list[int]:
    try:
        import psutil  # lazy: an optional (test) dependency; without it only the torchrun agent is signalled
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except Exception:  # noqa: BLE001 - psutil missing or process gone
        return []


def terminate_tree(agent: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the torchrun agent (it stops its workers) and the workers; SIGKILL what is left after ``grace_s``."""
    victims = [agent.pid, *_descendants(agent.pid)]
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        for pid in victims:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            agent.wait(timeout=wait_s)


def torchrun_command(module: str, args: Sequence[str], nproc: int) -> list[str]:
    """The single-node ``torchrun`` command line (``python -m torch.distributed.run``) for ``module``."""
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ParameterError(f"nproc (processes) must be a positive int, got {nproc!r}.")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "--max_restarts=0", "--monitor_interval=0.2", "-m", module, *map(str, args)]


def _copy_output(stream, log_path: Path, echo: bool) -> None:
    with open(log_path, "w", buffering=1, encoding="utf-8", errors="replace") as log:  # line-buffered: a live log
        for line in iter(stream.readline, ""):
            log.write(line)
            if echo:
                print(line, end="", flush=True)


def launch_torchrun(module: str, args: Sequence[str], nproc: int, run_dir: str | os.PathLike | None = None,
                    timeout_s: float | None = None, echo: bool = False) -> Path:
    """Run ``torchrun ... -m module args... --error-dir <dir>`` (log: ``<run_dir>/torchrun.log``); return ``run_dir``.
    ``module`` wraps its work in :func:`rank_failure_guard`; failure or timeout raise :class:`DistributedRunError`."""
    run_dir = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="zsl_torchrun_"))
    error_dir, log_path = run_dir / "errors", run_dir / "torchrun.log"
    shutil.rmtree(error_dir, ignore_errors=True)  # a previous run's errors
    error_dir.mkdir(parents=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Workers import this package by name whatever the caller's working directory: put its parent on their path.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")]))
    process = subprocess.Popen(torchrun_command(module, [*args, "--error-dir", str(error_dir)], nproc), env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    copier = threading.Thread(target=_copy_output, args=(process.stdout, log_path, echo), daemon=True)
    copier.start()
    try:
        returncode = process.wait(timeout=timeout_s)
    except BaseException as error:  # the timeout, or Ctrl-C in a notebook: do not leave workers behind
        terminate_tree(process)
        if not isinstance(error, subprocess.TimeoutExpired):
            raise
        returncode = None
    copier.join(timeout=5)
    if returncode != 0:
        raise _run_error(f"{module} on {nproc} processes", returncode, timeout_s, error_dir, log_path)
    return run_dir


def _run_error(job: str, returncode: int | None, timeout_s: float | None, error_dir: Path,
               log_path: Path) -> DistributedRunError:
    errors = read_rank_errors(error_dir)
    try:
        log = f"Log: {log_path}\n" + "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
    except OSError:
        log = f"No log at {log_path}."
    if returncode is None:
        message = f"{job} did not finish within {timeout_s} s and was stopped; rerun to resume. {log}"
    elif not errors:
        message = f"{job} failed (exit code {returncode}) without a Python error (killed, out of memory?). {log}"
    else:
        first, others = errors[0], "; ".join(f"rank {e['rank']}: {e['type']}" for e in errors[1:])
        message = (f"rank {first['rank']} (host {first['host']}, pid {first['pid']}) failed: {first['type']}: "
                   f"{first['message']}" + (f"\n(later failures, likely consequences: {others})" if others else "")
                   + f"\nFull log: {log_path}")
    return DistributedRunError(message, errors, log_path)
