"""Training across processes with torch.distributed: environment detection, sharding, reductions, and a
one-machine launcher.

``torchrun --nproc-per-node N [--nnodes M --node-rank R --rdzv-endpoint HOST:PORT] -m cnnkit train ...``
sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; :func:`setup` reads them and joins the process group (NCCL
on CUDA, gloo on CPU). ``cnnkit train ... --nproc N`` runs the same through torchrun's launcher on this
machine. Rank 0 writes logs, progress bars, checkpoints and plots; every rank evaluates its own shard of
the validation set (no sample twice, none left out) and the evaluators' states are summed across ranks.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from cnnkit.errors import CnnkitError
from cnnkit.tasks.base import interleave as interleave  # re-exported: shards are merged with it

log = logging.getLogger("cnnkit")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_info() -> DistInfo:
    """The process's place in the job from torchrun's environment variables (one process if unset)."""
    return DistInfo(
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def info() -> DistInfo:
    """The current process group's rank and size (``DistInfo()`` when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def setup(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (idempotent); NCCL when CUDA is used, else gloo.

    On CUDA each process takes the GPU of its local rank."""
    env = env_info()
    if not env.enabled or not dist.is_available():
        return DistInfo()
    if dist.is_initialized():
        return info()
    use_cuda = torch.cuda.is_available() and not device.startswith("cpu")
    if use_cuda:
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    atexit.register(cleanup)  # the group is destroyed however the process ends
    if not env.is_main:
        logging.getLogger("cnnkit").setLevel(logging.WARNING)  # rank 0 reports; others only warn/err
    return env


def barrier() -> None:
    """Wait for every process (no-op on one)."""
    if info().enabled:
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (on success and on error)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def process_device(device: torch.device) -> torch.device:
    """This process's device: on CUDA, the GPU of its local rank."""
    where = info()
    return torch.device("cuda", where.local_rank) if device.type == "cuda" and where.enabled else device


class ShardSampler(Sampler[int]):
    """Indices of one rank's shard, the same global order on any number of processes.

    Each epoch's order is a permutation seeded by ``seed`` and the epoch (:meth:`set_epoch`), or the
    identity when not shuffling; rank ``r`` of ``w`` takes positions ``r, r + w, ...``. For training
    (``drop_last``) every rank gets the same number of samples and the global batch ``b * w`` of step
    ``k`` is positions ``k*b*w ... (k+1)*b*w - 1`` of the order whatever ``w`` is, so a run on 2
    processes sees the same batches as one process with twice the batch. For evaluation
    (``drop_last=False``) shards differ in size by at most one and cover every index exactly once.
    """

    def __init__(
        self,
        n: int,
        *,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        batch: int = 1,
        drop_last: bool = False,
    ) -> None:
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size, self.batch, self.drop_last = rank, world_size, batch, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def _used(self) -> int:
        """How many positions of the order are used: all, or (training) whole global batches -- or, for a
        set smaller than one global batch, as many as split evenly across the ranks."""
        if not self.drop_last:
            return self.n
        global_batch = self.batch * self.world_size
        usable = (self.n // global_batch) * global_batch if self.n >= global_batch else self.n
        return usable - usable % self.world_size

    def __iter__(self) -> Iterator[int]:
        return iter(self._order()[: self._used()][self.rank :: self.world_size])

    def __len__(self) -> int:
        return len(range(self.rank, self._used(), self.world_size))


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average a dict of floats over the ranks (same keys on every rank)."""
    if not info().enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= info().world_size
    return dict(zip(keys, t.tolist()))


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank (e.g. a stop asked for by one process)."""
    if not info().enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank."""
    if not info().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not info().enabled:
        return [obj]
    out: list[Any] = [None] * info().world_size
    dist.all_gather_object(out, obj)
    return out


def sync_evaluator(evaluator: Any, device: torch.device) -> None:
    """Combine the ranks' evaluators in place: the tensors of ``state()`` are summed; an evaluator with
    per-sample records (``shard_records()`` / ``merge_shards(per_rank)``) gets every rank's, in the
    dataset's order (the shards interleave: rank ``r`` held samples ``r, r + w, ...``)."""
    if not info().enabled:
        return
    for tensor in evaluator.state().values():
        moved = tensor.to(device)
        dist.all_reduce(moved)
        tensor.copy_(moved.to(tensor.device))
    if hasattr(evaluator, "shard_records"):
        evaluator.merge_shards(gather_objects(evaluator.shard_records()))


def launch(argv: Sequence[str], nproc: int) -> int:
    """Run ``python -m cnnkit <argv>`` in ``nproc`` processes on this machine through torchrun's
    launcher; when one process fails the others are stopped and its error is reported."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--module", "cnnkit", *argv]
    )
    try:
        torchrun.run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        raise CnnkitError(
            f"process {rank} of {nproc} failed (exit code {failure.exitcode}); its error is printed above"
        ) from None
    return 0
