"""Data-parallel training on one machine: ``[run].processes`` workers, gradients averaged every step.

Why: on this project's 2-core machine, two independent processes at one thread each train 1.30x more
samples per second than one process at two threads (``benchmarks/bench_training_throughput.py``: 0.722 vs
0.556 samples/s; one process with batch 2 is 0.94x). PyTorch's intra-op threading scales poorly on
these small 3D convolutions; separate processes do not share that overhead.

Measured gain: 1.30x for independent processes (an upper bound); in the lock-step default run, with
the all-reduce and the wait for the slower worker, a step of two samples takes ~2.9 s against ~1.75 s
for one sample before (~1.2x).

How: every worker builds the same :class:`~.loop.Trainer` (same seed, so the same initial weights,
broadcast from rank 0 anyway), draws its own samples (generator seed ``seed + rank * RANK_SEED_STRIDE``;
rank 0 keeps the single-process stream), and after each backward pass the gradients are averaged
over the workers (one ``all_reduce`` of a flat buffer over gloo), so every worker takes the same
Adam step: batch size ``processes`` per step; BatchNorm running statistics are averaged after each
step too, so every worker holds the same network. Losses in ``loss.csv`` are the workers' means.
Rank 0 alone writes files (logs, validation, checkpoints, exports); the generator states of all
workers go into each checkpoint, so a resume with the same number of workers continues every
stream exactly. Decisions that end or checkpoint the run are taken together (``any``), so all
workers leave the loop at the same step.

PyTorch's ``DistributedDataParallel`` would do the averaging too, but wraps the module (changing
its state-dict keys and checkpoints) and buckets gradients for overlap that one CPU core per
worker cannot exploit; a flat ``all_reduce`` after ``backward`` is all this needs.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

LOGGER = logging.getLogger(__name__)

__all__ = ["RANK_SEED_STRIDE", "SINGLE", "ProcessGroup", "WorkerFailed", "launch"]

#: Generator seed offset between workers (rank 0: the configured seed itself).
RANK_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class ProcessGroup:
    """This worker's place among ``world`` workers; with ``world == 1`` every operation is a no-op."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the worker that writes files and logs."""
        return self.rank == 0

    def generator_seed(self, seed: int) -> int:
        return int(seed) + self.rank * RANK_SEED_STRIDE

    def average_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        """Replace every gradient by its mean over the workers (parameters without one are skipped)."""
        if self.world > 1:
            self._average_in_place([p.grad for p in parameters if p.grad is not None])

    def average_buffers(self, module: nn.Module) -> None:
        """Replace every floating-point buffer (BatchNorm running statistics) by its mean over the workers,
        so that all workers hold the same network after each step."""
        if self.world > 1:
            self._average_in_place([b for b in module.buffers() if b.is_floating_point()])

    def _average_in_place(self, tensors: list[torch.Tensor]) -> None:
        """One ``all_reduce`` of the tensors flattened into one buffer, divided by the number of workers."""
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        with torch.no_grad():
            for t in tensors:
                n = t.numel()
                t.copy_(flat[offset:offset + n].view(t.shape))
                offset += n

    def mean(self, values: Sequence[float]) -> list[float]:
        """The workers' means of ``values`` (NaN stays NaN)."""
        if self.world == 1:
            return [float(v) for v in values]
        buffer = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dist.all_reduce(buffer)
        return (buffer / self.world).tolist()

    def any(self, flag: bool) -> bool:
        """True on every worker when ``flag`` is true on at least one."""
        if self.world == 1:
            return bool(flag)
        buffer = torch.tensor([1 if flag else 0], dtype=torch.int64)
        dist.all_reduce(buffer, op=dist.ReduceOp.MAX)
        return bool(buffer.item())

    def gather(self, value: Any) -> list[Any]:
        """Every worker's ``value`` (picklable, e.g. a generator state), ordered by rank."""
        if self.world == 1:
            return [value]
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def broadcast(self, module: nn.Module) -> None:
        """Make ``module``'s parameters and buffers those of rank 0."""
        if self.world == 1:
            return
        with torch.no_grad():
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` (picklable) on every worker."""
        if self.world == 1:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


SINGLE = ProcessGroup()


class WorkerFailed(RuntimeError):
    """A data-parallel worker died or raised (its own log has the details); the others were stopped."""


#: How long a worker waits in a collective for the others (rank 0 alone validates and writes checkpoints,
#: seconds to a minute; a worker that died is noticed at once through its closed connection).
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=1)


#: store key prefix a worker sets once its work is done and the final barrier passed
FINISHED_KEY = "synthsr_bids/finished"


def _worker(rank: int, world: int, port: int, target: Callable[[ProcessGroup], Any]) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # The rendezvous store is served by the launcher (see launch), which outlives every worker: after a
    # worker died it can still read which workers had finished their work.
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=COLLECTIVE_TIMEOUT)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    target(ProcessGroup(rank=rank, world=world))
    # Leave together: a worker that tears its connections down while another still works aborts in gloo.
    # (A worker that raised skips this; torch.multiprocessing then stops the others.)
    dist.barrier()
    store.set(f"{FINISHED_KEY}/{rank}", "1")  # every file is written: see launch
    dist.destroy_process_group()


def launch(target: Callable[[ProcessGroup], Any], processes: int) -> None:
    """Run ``target(group)`` in ``processes`` spawned workers (or in this process when 1).

    SIGTERM/SIGINT received by this process are passed on to the workers (which stop together
    after the current step, see :class:`~.loop.Trainer`). Raises when a worker fails (the others
    are terminated by ``torch.multiprocessing``).
    """
    if processes <= 1:
        target(SINGLE)
        return
    import torch.multiprocessing as mp

    # The launcher outlives every worker, so it serves their rendezvous store (port chosen by the OS).
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=COLLECTIVE_TIMEOUT)
    context = mp.start_processes(_worker, args=(processes, store.port, target), nprocs=processes, join=False,
                                 start_method="spawn")

    def forward(signum: int, _frame: object) -> None:
        for process in context.processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not context.join():
            pass
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
        # The worker's traceback is in the message (and in train.log); its last line says what happened.
        lines = str(exc).strip().splitlines()
        if isinstance(exc, mp.ProcessExitedException) and store.check(
                [f"{FINISHED_KEY}/{rank}" for rank in range(processes)]):
            # Under load a worker has been seen to abort in torch/gloo's teardown ("terminate called
            # without an active exception") after every worker had finished its work and left the
            # final barrier: the run itself (checkpoint, logs) is complete, so it did not fail.
            LOGGER.warning("a training worker ended abnormally while shutting down (%s), after every worker had "
                           "finished: the run's files are complete", lines[-1] if lines else exc)
            return
        raise WorkerFailed(f"a training worker failed: {lines[-1] if lines else exc}") from exc
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        del store  # only now: every worker has ended
