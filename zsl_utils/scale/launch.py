"""Process groups under ``torchrun``, rank helpers, and launching/failing whole jobs cleanly.

The suite scales out with PyTorch's own engine: ``torchrun`` (``torch.distributed.run``)
starts one process per GPU (or per CPU slot), sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, and restarts or kills workers.
This module adds the few things every job of ours needs on top of it:

* :func:`init_distributed` reads those variables and joins the process group (NCCL when
  the rank has a CUDA device, Gloo on CPU) *with a timeout*, so a collective whose peer
  died raises instead of blocking forever. Outside ``torchrun`` it returns a
  single-process context and joins nothing, so the same code runs in a notebook.
* :func:`barrier` waits for every rank with a timeout (Gloo's ``monitored_barrier``
  names the ranks that did not arrive).
* :func:`agree_on` checks that every rank sees the same value (for example the hash of
  the dataset listing) before any work starts.
* :func:`rank_failure_guard` writes a failing rank's exception to a small JSON file, and
  :func:`launch_torchrun` starts ``torchrun`` as a subprocess and, if the job fails,
  raises :class:`DistributedRunError` carrying the *first* failing rank's error, not the
  "SIGTERM received" of the ranks that torchrun killed afterwards.

Failure model: when one worker exits non-zero, ``torchrun`` sends SIGTERM (then SIGKILL)
to the others, so a crash never leaves a job hanging on one node. Across nodes, and
for a rank that hangs instead of crashing, the process-group timeout is the backstop.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
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
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

from zsl_utils.atomic import write_text_atomically
from zsl_utils.errors import ParameterError, ZslError

# Long enough for the slowest rank of an unbalanced extraction to finish its shards
# while the others wait at the final barrier; short enough that a hung job dies today.
DEFAULT_TIMEOUT_S = 2 * 3600
_ERROR_FILE_PATTERN = "rank_{rank}.error.json"
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistributedError(ZslError):
    """A distributed job cannot start or a collective failed (timeout, disagreement)."""


class DistributedRunError(DistributedError):
    """A job launched with :func:`launch_torchrun` failed; the message holds the failing rank's error."""

    def __init__(self, message: str, rank_errors: Sequence[dict] = (), log_path: Path | None = None) -> None:
        super().__init__(message)
        self.rank_errors = list(rank_errors)
        self.log_path = log_path


@dataclass(frozen=True)
class DistContext:
    """Who this process is in the job: global/local rank, sizes, backend and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None  # None: no process group (single process)
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on the rank that writes shared outputs (rank 0)."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when a process group with more than one rank is active."""
        return self.backend is not None and self.world_size > 1


# ---------------------------------------------------------------------- environment
def launched_by_torchrun() -> bool:
    """True when ``torchrun`` (or another launcher using its variables) started this process."""
    return all(name in os.environ for name in _TORCHRUN_ENV)


def _env_int(name: str, default: int | None = None) -> int:
    text = os.environ.get(name)
    if text is None:
        if default is None:
            raise DistributedError(f"environment variable {name} is not set; launch with torchrun.")
        return default
    try:
        return int(text)
    except ValueError as error:
        raise DistributedError(f"environment variable {name}={text!r} is not an integer; launch with torchrun.") from error


def choose_backend(device: torch.device) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise (CPU, and MPS which has no backend)."""
    return "nccl" if device.type == "cuda" else "gloo"


def _rank_device(preference: str, local_rank: int) -> torch.device:
    """One GPU per local rank when CUDA is wanted and present; otherwise the preferred device."""
    from zsl_utils.device import pick_device

    choice = (preference or "auto").strip().lower()
    if choice.startswith("cuda:"):
        # A notebook resolves "auto" to "cuda:0"; under torchrun each rank owns the GPU of its
        # LOCAL_RANK instead (choose the GPUs with CUDA_VISIBLE_DEVICES).
        choice = "cuda"
    if choice in ("auto", "cuda") and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise DistributedError(
                f"local rank {local_rank} has no GPU: this node has {count} CUDA device(s). Use "
                f"--nproc_per_node {count} or fewer, or device='cpu'."
            )
        return torch.device(f"cuda:{local_rank}")
    device = pick_device(choice)
    return torch.device("cpu") if device.type == "mps" else device  # no MPS collective backend


def init_distributed(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Join the torchrun process group (or return a single-process context outside torchrun).

    Args:
        device: ``auto``/``cuda``/``cuda:N`` -> ``cuda:LOCAL_RANK`` when CUDA is present
            (pick GPUs with ``CUDA_VISIBLE_DEVICES``), else CPU; ``cpu`` forces CPU ranks
            with the Gloo backend. Outside torchrun the preference is used as given.
        timeout_s: limit for every collective; a peer that died or hangs makes the
            collective raise after this long instead of blocking forever.
    """
    if not timeout_s > 0:
        raise ParameterError(f"timeout_s must be > 0 seconds, got {timeout_s!r}.")
    if not launched_by_torchrun():
        from zsl_utils.device import pick_device

        return DistContext(device=pick_device(device))
    rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK")
    local_world_size = _env_int("LOCAL_WORLD_SIZE", default=world_size)
    torch_device = _rank_device(device, local_rank)
    backend = choose_backend(torch_device)
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
    """DataLoader workers per rank from the CPUs this process may use.

    Each rank keeps one core for itself (decode results arrive there and the model runs
    there on CPU); the rest of the node's share is split between local ranks. Returns 0
    (load in the main process) on small machines, where worker start-up costs more than
    it saves.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    per_rank = cpus // max(1, local_world_size)
    return max(0, min(cap, per_rank - 1)) if per_rank > 2 else 0


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent (the torchrun agent) dies.

    torchrun starts each worker in its own session, so killing the agent with SIGKILL
    would otherwise leave orphaned workers still writing. Returns False where unsupported.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        if libc.prctl(pr_set_pdeathsig, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    # The parent may already be gone (re-parented to init / a subreaper) before prctl ran.
    if os.getppid() == 1:
        os.kill(os.getpid(), sig)
    return True


# ---------------------------------------------------------------------- collectives
def barrier(ctx: DistContext, timeout_s: float = DEFAULT_TIMEOUT_S, what: str = "barrier") -> None:
    """Wait until every rank reaches this point, or raise :class:`DistributedError` after ``timeout_s``.

    On Gloo this is ``monitored_barrier``, whose error names the ranks that never came.
    On NCCL it is a device barrier bounded by the process-group timeout.
    """
    if not ctx.is_distributed:
        return
    try:
        if ctx.backend == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)
        else:
            dist.barrier(device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    except RuntimeError as error:
        raise DistributedError(
            f"rank {ctx.rank}: not every rank reached '{what}' within {timeout_s:.0f} s ({error}). "
            f"Another rank crashed or hangs: see its error above; rerun to resume."
        ) from error


def all_gather_objects(ctx: DistContext, value: Any) -> list[Any]:
    """``value`` of every rank, in rank order (``[value]`` in a single process). Keep it small."""
    if not ctx.is_distributed:
        return [value]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def agree_on(ctx: DistContext, value: str, what: str) -> None:
    """Raise :class:`DistributedError` unless every rank passes the same ``value``.

    Used before work starts, e.g. on the hash of the dataset listing: ranks that list a
    network file system at different moments must not silently process different rows.
    """
    values = all_gather_objects(ctx, value)
    if len(set(values)) > 1:
        by_rank = ", ".join(f"rank {r}: {v[:16]}" for r, v in enumerate(values))
        raise DistributedError(
            f"ranks disagree on {what} ({by_rank}); every node must see the same files. "
            f"Check that the paths are on a shared file system and not changing during the run."
        )


# ---------------------------------------------------------------------- failure reports
def rank_error_path(error_dir: str | os.PathLike, rank: int) -> Path:
    return Path(error_dir) / _ERROR_FILE_PATTERN.format(rank=rank)


def write_rank_error(error_dir: str | os.PathLike, ctx_or_rank: DistContext | int, error: BaseException) -> Path:
    """Record ``error`` of this rank as JSON in ``error_dir`` (read by :func:`launch_torchrun`)."""
    rank = ctx_or_rank.rank if isinstance(ctx_or_rank, DistContext) else int(ctx_or_rank)
    record = {
        "rank": rank,
        "local_rank": _env_int("LOCAL_RANK", default=0) if launched_by_torchrun() else 0,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "time": time.time(),
        "type": type(error).__name__,
        "message": str(error),
        "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__))[-8000:],
    }
    return write_text_atomically(rank_error_path(error_dir, rank), json.dumps(record, indent=2))


def read_rank_errors(error_dir: str | os.PathLike) -> list[dict]:
    """Error records of failed ranks, earliest first (the first is the root cause)."""
    records = []
    for path in Path(error_dir).glob(_ERROR_FILE_PATTERN.format(rank="*")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(records, key=lambda r: (r.get("time", 0.0), r.get("rank", 0)))


@contextlib.contextmanager
def rank_failure_guard(error_dir: str | os.PathLike | None, rank: int | None = None) -> Iterator[None]:
    """Write any exception escaping the block to ``error_dir`` (if given), then re-raise it.

    ``rank`` defaults to ``$RANK`` (0 outside torchrun). The process then exits non-zero,
    and torchrun tears down the other ranks.
    """
    try:
        yield
    except BaseException as error:  # noqa: BLE001 - recorded and re-raised
        if error_dir is not None and not isinstance(error, SystemExit):
            try:
                write_rank_error(error_dir, _env_int("RANK", default=0) if rank is None else rank, error)
            except OSError:
                pass  # reporting must not hide the original error
        raise


# ---------------------------------------------------------------------- launching
def _descendants(pid: int) -> list[int]:
    try:
        import psutil

        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except Exception:  # noqa: BLE001 - psutil missing or process gone
        return []


def terminate_tree(pid: int, grace_s: float = 10.0) -> None:
    """SIGTERM ``pid`` (torchrun forwards it to its workers), then SIGKILL whatever is left."""
    victims = [pid, *_descendants(pid)]
    for victim in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(victim, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(v) for v in victims):
        time.sleep(0.1)
    for victim in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(victim, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child counts as dead
        finished, _ = os.waitpid(pid, os.WNOHANG)
        return finished == 0
    except ChildProcessError:
        return True


def torchrun_command(module: str, args: Sequence[str], nproc: int, extra_torchrun_args: Sequence[str] = ()) -> list[str]:
    """The single-node ``torchrun`` command line (``python -m torch.distributed.run``) for ``module``."""
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ParameterError(f"nproc (processes) must be a positive int, got {nproc!r}.")
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "--max_restarts=0", "--monitor_interval=0.2", *extra_torchrun_args, "-m", module, *map(str, args),
    ]


def _copy_output(stream, log_path: Path, echo: bool) -> None:
    with open(log_path, "w", encoding="utf-8", errors="replace") as log:
        for line in iter(stream.readline, ""):
            log.write(line)
            log.flush()
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def launch_torchrun(
    module: str,
    args: Sequence[str],
    nproc: int,
    run_dir: str | os.PathLike | None = None,
    timeout_s: float | None = None,
    echo: bool = False,
    env: dict[str, str] | None = None,
    extra_torchrun_args: Sequence[str] = (),
) -> Path:
    """Run ``torchrun --standalone --nproc_per_node nproc -m module args... --error-dir <dir>``.

    The module must accept ``--error-dir`` and wrap its work in :func:`rank_failure_guard`.
    Output goes to ``<run_dir>/torchrun.log`` (and to stdout when ``echo``). Returns
    ``run_dir``. On failure or timeout raises :class:`DistributedRunError` whose message
    starts with the earliest failing rank's exception type and message.
    """
    run_dir = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="zsl_torchrun_"))
    error_dir = run_dir / "errors"
    error_dir.mkdir(parents=True, exist_ok=True)
    for stale in error_dir.glob("*.json"):
        stale.unlink()
    log_path = run_dir / "torchrun.log"
    command = torchrun_command(module, [*args, "--error-dir", str(error_dir)], nproc, extra_torchrun_args)
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    # Workers import this package by module name, whatever the caller's working directory
    # (a notebook runs in notebooks/): put the package's parent folder on their path.
    package_parent = str(Path(__file__).resolve().parents[1])
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, child_env.get("PYTHONPATH")]))
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env, start_new_session=True,
    )
    copier = threading.Thread(target=_copy_output, args=(process.stdout, log_path, echo), daemon=True)
    copier.start()
    try:
        returncode = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        terminate_tree(process.pid)
        process.wait()
        copier.join(timeout=5)
        raise DistributedRunError(
            f"{module} on {nproc} processes did not finish within {timeout_s} s and was stopped; rerun "
            f"to resume from what was completed. Log: {log_path}\n{_tail(log_path)}",
            read_rank_errors(error_dir), log_path,
        )
    except BaseException:  # KeyboardInterrupt in a notebook: do not leave workers behind
        terminate_tree(process.pid)
        raise
    copier.join(timeout=5)
    if returncode != 0:
        raise _run_error(module, nproc, returncode, error_dir, log_path)
    return run_dir


def _run_error(module: str, nproc: int, returncode: int, error_dir: Path, log_path: Path) -> DistributedRunError:
    errors = read_rank_errors(error_dir)
    if not errors:
        return DistributedRunError(
            f"{module} on {nproc} processes failed (exit code {returncode}) without a Python error "
            f"(killed by a signal or out of memory?). Log: {log_path}\n{_tail(log_path)}",
            errors, log_path,
        )
    first = errors[0]
    others = "; ".join(f"rank {e['rank']}: {e['type']}" for e in errors[1:])
    return DistributedRunError(
        f"rank {first['rank']} (host {first['host']}, pid {first['pid']}) failed: {first['type']}: "
        f"{first['message']}" + (f"\n(later failures, likely consequences: {others})" if others else "")
        + f"\nFull log: {log_path}",
        errors, log_path,
    )
