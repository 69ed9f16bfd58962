"""Run a function on N gloo ranks on CPU, one process per rank, and get each rank's result back.

    results = run_on_ranks(fn, 2, x, timeout=120)   # [fn(0, 2, x), fn(1, 2, x)]

``fn(rank, world_size, *args)`` must be a module-level function (the child process imports it by
name). Each child sees a torchrun-like environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), uses one CPU thread and, unless
``init_process_group=False``, runs inside a gloo process group that is always destroyed
afterwards. Arguments and results travel as ``torch.save`` bytes, so they may hold tensors
(results come back detached, on CPU). A rank that raises fails the call with a ``RankError``
carrying the child's traceback; a run that outlives ``timeout`` is killed, never waited on.
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import os
import queue as queue_module
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from accelerate.utils.other import get_free_port

MASTER_ADDR = "127.0.0.1"

# After one rank fails, the others are often blocked in a collective waiting for it.
_GRACE_AFTER_FAILURE_S = 5.0
# A rank that exited may still have its result in the pipe; wait this long before calling it lost.
_GRACE_AFTER_EXIT_S = 2.0


class RankError(Exception):
    """A rank raised, died, or did not finish in time; the message holds its traceback."""

    def __init__(self, message: str, rank: int | None = None, child_traceback: str = ""):
        super().__init__(message)
        self.rank = rank
        self.child_traceback = child_traceback


def torchrun_env(
    rank: int, world_size: int, master_port: int, master_addr: str = MASTER_ADDR
) -> dict[str, str]:
    """The variables torchrun sets for one rank of a single-node run."""
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size),
        "GROUP_RANK": "0",
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
    }


def _collective_targets() -> list[tuple[Any, str]]:
    """(module, name) of every Python-level torch.distributed collective."""
    import torch.distributed.nn.functional as dist_nn

    targets = [
        (dist, name)
        for name in (
            "all_reduce",
            "all_gather",
            "all_gather_into_tensor",
            "all_gather_object",
            "broadcast",
            "reduce",
            "reduce_scatter",
            "reduce_scatter_tensor",
            "all_to_all",
            "barrier",
        )
        if hasattr(dist, name)
    ]
    return targets + [(dist_nn, name) for name in ("all_reduce", "all_gather", "broadcast")]


@contextlib.contextmanager
def _replaced(targets: list[tuple[Any, str]], make: Callable[[str, Any], Any]) -> Iterator[None]:
    """Each ``module.name`` replaced by ``make(name, original)`` inside the block."""
    saved = [(module, name, getattr(module, name)) for module, name in targets]
    for module, name, original in saved:
        setattr(module, name, make(name, original))
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


@contextlib.contextmanager
def forbid_collectives() -> Iterator[None]:
    """Make every torch.distributed collective raise inside the block (to prove code is local)."""

    def make(name: str, original: Any) -> Any:
        def refuse(*args: Any, **kwargs: Any) -> None:
            raise AssertionError("a collective was called inside forbid_collectives()")

        return refuse

    with _replaced(_collective_targets(), make):
        yield


HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")
"""Tensor methods that read a value on the host: each one drains a GPU's queue."""


@contextlib.contextmanager
def count_host_syncs() -> Iterator[dict[str, Any]]:
    """Count, inside the block, what makes the host wait: Python-level collectives (by the file
    and function that called them), tensor reads on the host (``HOST_READS``, by caller), and
    every collective the process group ran, DDP's reducer included (the profiler's ``gloo:``
    and ``nccl:`` events). The dict yielded is filled when the block ends."""
    from torch.profiler import ProfilerActivity, profile

    counts: dict[str, Any] = {"collectives": {}, "host_reads": {}, "backend_collectives": 0}

    def counting(kind: str) -> Callable[[str, Any], Any]:
        def make(name: str, original: Any) -> Any:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                caller = traceback.extract_stack(limit=2)[0]
                key = f"{name} from {Path(caller.filename).name}:{caller.name}"
                counts[kind][key] = counts[kind].get(key, 0) + 1
                return original(*args, **kwargs)

            return wrapper

        return make

    reads = [(torch.Tensor, name) for name in HOST_READS]
    with (
        _replaced(_collective_targets(), counting("collectives")),
        _replaced(reads, counting("host_reads")),
        profile(activities=[ProfilerActivity.CPU]) as prof,
    ):
        yield counts
    counts["backend_collectives"] = sum(
        1 for e in prof.events() if e.name.startswith(("gloo:", "nccl:"))
    )


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    init_process_group: bool = True,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; return the results
    in rank order.

    ``init_process_group=False`` leaves initialization to ``fn`` (e.g. code under test that reads
    the torchrun variables itself). ``env`` adds variables to every child's environment.
    Raises ``RankError`` if any rank raises or exits without a result, ``TimeoutError`` (after
    killing every child) if the ranks have not all finished ``timeout`` seconds after start.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    port = get_free_port()
    payload = _dumps((fn, args))
    ctx = mp.get_context("spawn")
    results_queue = ctx.Queue()
    procs = [
        ctx.Process(
            target=_child_main,
            args=(
                rank,
                world_size,
                port,
                payload,
                results_queue,
                init_process_group,
                env or {},
                timeout,
            ),
            # Not daemonic: code under test may start processes of its own (DataLoader workers).
            daemon=False,
            name=f"rank{rank}",
        )
        for rank in range(world_size)
    ]
    deadline = time.monotonic() + timeout
    results: dict[int, Any] = {}
    failures: list[tuple[int, str]] = []  # in the order they were reported
    exited_at: dict[int, float] = {}
    finished = False
    try:
        for p in procs:
            p.start()
        while len(results) + len(failures) < world_size:
            now = time.monotonic()
            if now > deadline:
                if failures:
                    break  # the failure is the story; the stragglers were waiting on it
                missing = [r for r in range(world_size) if r not in results]
                raise TimeoutError(
                    f"ranks {missing} did not finish within {timeout:.0f}s; killed them "
                    "(their Python stacks were dumped to stderr)"
                )
            try:
                rank, ok, data = results_queue.get(timeout=0.1)
            except queue_module.Empty:
                for rank, p in enumerate(procs):
                    done = rank in results or any(r == rank for r, _ in failures)
                    if done or p.exitcode is None:
                        continue
                    exited_at.setdefault(rank, now)
                    if now - exited_at[rank] > _GRACE_AFTER_EXIT_S:
                        failures.append((rank, f"exited with code {p.exitcode} without a result"))
                        deadline = min(deadline, now + _GRACE_AFTER_FAILURE_S)
                continue
            if ok:
                results[rank] = _loads(data)
            else:
                failures.append((rank, data))
                deadline = min(deadline, time.monotonic() + _GRACE_AFTER_FAILURE_S)
        finished = True
    finally:
        # On an error in the parent itself (timeout, Ctrl-C) stop the children at once.
        _stop(procs, deadline if finished else time.monotonic())
        results_queue.close()
    if failures:
        rank, text = failures[0]
        others = "".join(
            f"\n--- rank {r} (probably a consequence) ---\n{t}" for r, t in failures[1:]
        )
        unfinished = [r for r in range(world_size) if r not in results and r not in dict(failures)]
        if unfinished:
            others += f"\n--- ranks {unfinished} were killed while still running ---"
        raise RankError(f"rank {rank} of {world_size} failed:\n{text}{others}", rank, text)
    return [results[r] for r in range(world_size)]


def _stop(procs: list[Any], deadline: float) -> None:
    """Join every child until the deadline; then SIGTERM (stack dump), then SIGKILL."""
    for p in procs:
        if p.pid is not None:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.pid is not None and p.is_alive():
            p.terminate()
            p.join(timeout=2.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)


def _child_main(
    rank: int,
    world_size: int,
    port: int,
    payload: bytes,
    results_queue: Any,
    init_process_group: bool,
    env: dict[str, str],
    timeout: float,
) -> None:
    os.environ.update(torchrun_env(rank, world_size, port))
    os.environ.update(env)
    if hasattr(faulthandler, "register"):  # not on Windows
        # The parent sends SIGTERM to a hung rank: print where it hangs, then die as usual.
        faulthandler.register(signal.SIGTERM, file=sys.stderr, all_threads=True, chain=True)
    torch.set_num_threads(1)
    try:
        fn, args = _loads(payload)  # imports fn's module; fails here if it is not importable
        if init_process_group:
            dist.init_process_group(
                "gloo",
                init_method=f"tcp://{MASTER_ADDR}:{port}",
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=timeout),
            )
            # gloo's init returns before every peer has finished connecting: a rank that
            # finished fn and tore down its group would break a peer's handshake.
            dist.barrier()
        result = fn(rank, world_size, *args)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # nobody tears down while a peer still reads from it
        message = (rank, True, _dumps(_detached(result)))
    except BaseException:
        message = (rank, False, traceback.format_exc())
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    results_queue.put(message)
    results_queue.close()
    results_queue.join_thread()  # the result is in the pipe before the process exits


def _detached(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return type(obj)((k, _detached(v)) for k, v in obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_detached(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detached(v) for v in obj)
    return obj


def _dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def accelerate_launch_cmd(*args: str, processes: int = 2) -> list[str]:
    """``accelerate launch`` on ``processes`` CPU processes (launch/cpu_2proc.yaml, a free port)
    followed by ``args`` (launcher options, then the script and its arguments). The caller sets
    ACCELERATE_USE_CPU=1 in the environment."""
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    return [
        accelerate,
        "launch",
        "--config_file",
        "launch/cpu_2proc.yaml",
        "--num_processes",
        str(processes),
        "--main_process_port",
        str(get_free_port()),
        *args,
    ]
