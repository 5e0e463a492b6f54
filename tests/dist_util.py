"""Run a function on W local processes joined by a gloo process group, and collect results.

`run_ranks(fn, world, *args)` starts W spawned processes; each sets the torchrun
environment variables, calls `memcompile.runtime.init_distributed` (gloo, finite timeout),
runs `fn(rank, world, *args)` and writes its return value (torch.save) or its traceback to
a temporary directory. The parent waits with a deadline, kills what is left (its own
children, by process handle) and returns the per-rank values or raises `RankFailed` with
the failing rank's traceback. `fn` must be importable by name (a module-level function).
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any


class RankFailed(AssertionError):
    def __init__(self, rank: int, text: str) -> None:
        super().__init__(f"rank {rank} failed:\n{text}")
        self.rank, self.text = rank, text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank: int, world: int, port: int, out: str, timeout_s: float, args) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    import torch

    torch.set_num_threads(1)
    from memcompile.runtime import init_distributed

    try:
        init_distributed("gloo", timeout=timeout_s)
        result = fn(rank, world, *args)
        torch.save(result, Path(out, f"rank{rank}.pt"))
    except BaseException:
        Path(out, f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    import torch.distributed as dist

    try:  # after a peer failed, tearing the group down may fail too: the result is written
        dist.destroy_process_group()
    except Exception:
        pass


def run_ranks(
    fn,
    world: int,
    *args,
    deadline_s: float = 400.0,
    timeout_s: float = 120.0,
    allow_failures: bool = False,
) -> list[Any]:
    """`fn(rank, world, *args)` on `world` gloo ranks; the list of their return values.

    `timeout_s`: the process group's collective timeout; `deadline_s`: how long the parent
    waits for all ranks before killing them. With `allow_failures` a failed rank's entry
    is its `RankFailed` instead of an exception.
    """
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="memcompile-dist-") as out:
        port = free_port()
        procs = [
            ctx.Process(target=_entry, args=(fn, rank, world, port, out, timeout_s, args))
            for rank in range(world)
        ]
        for p in procs:
            p.start()
        end = time.monotonic() + deadline_s
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
        hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
        for rank in hung:
            procs[rank].kill()
            procs[rank].join()
        import torch

        results = []
        for rank, p in enumerate(procs):
            path, err = Path(out, f"rank{rank}.pt"), Path(out, f"rank{rank}.err")
            if err.exists():
                failure = RankFailed(rank, err.read_text())
            elif rank in hung:
                failure = RankFailed(rank, f"still running after {deadline_s} s (killed)")
            elif not path.exists():
                failure = RankFailed(rank, f"exited with code {p.exitcode} and no result")
            else:
                results.append(torch.load(path, weights_only=True))
                continue
            if not allow_failures:
                raise failure
            results.append(failure)
        return results
