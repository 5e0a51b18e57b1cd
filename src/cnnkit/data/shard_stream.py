"""Reading one split of WebDataset shards as a stream of a task's training or evaluation items, split
across processes and data-loading workers and reshuffled each epoch (see :mod:`cnnkit.data.shards`)."""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, IterableDataset, get_worker_info

from cnnkit.data.images import hold_file, open_image, release_file
from cnnkit.data.shards import image_key, read_shard, sample_from
from cnnkit.errors import DataError

log = logging.getLogger("cnnkit")


class ShardStream(IterableDataset[Any]):
    """One split of a shard dataset as a stream of the task's items (what its dataset's ``[i]`` gives).

    ``build(samples)``: the task's dataset over a list of its samples; the stream keeps one per reader,
    whose sample list is the shuffle buffer. :meth:`plan` (called by the engine's loader each epoch) says
    this process's rank, the epoch's seed, and how many items this process yields (``length``, counted
    from the manifest: progress bars, schedules and resume work as for files). Training (``cycle``)
    reads each reader's shards again when the epoch needs more; evaluation yields every sample once.
    """

    def __init__(self, urls: Sequence[str], counts: Sequence[int], build: Callable[[list[Any]], Dataset[Any]],
                 *, buffer: int = 1000, strict: bool = False) -> None:  # fmt: skip
        self.urls, self.counts, self.build = list(urls), list(counts), build
        self.total = sum(self.counts)
        self.buffer, self.strict = max(1, buffer), strict
        self.plan(shuffle=False, seed=0, rank=0, world=1, length=self.total, batch=1, cycle=False)

    def plan(
        self, *, shuffle: bool, seed: int, rank: int, world: int, length: int, batch: int, cycle: bool
    ) -> None:
        self.shuffle, self.seed, self.rank, self.world = shuffle, seed, rank, world
        self.length, self.batch, self.cycle = length, max(1, batch), cycle

    def __len__(self) -> int:
        return self.length

    def _quota(self, worker: int, workers: int) -> int:
        """Items worker ``worker`` yields: whole batches dealt round-robin, as the loader collects them."""
        batches = -(-self.length // self.batch)
        mine = range(worker, batches, workers)
        return sum(min(self.batch, self.length - b * self.batch) for b in mine)

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        w, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        quota = self._quota(w, workers)
        if quota <= 0:
            return
        held: Counter[Path] = Counter()  # files this pass holds in memory (released as items are made)
        try:
            yield from self._serve(self._samples(w, workers, held), quota, held)
        finally:
            _release(list(held.elements()), held)

    def _samples(self, w: int, workers: int, held: Counter[Path]) -> Iterator[tuple[Any, list[Path]]]:
        """This reader's samples, held in memory as they are asked for: its shards when there are enough,
        else every ``G``-th sample of all (``G`` readers in all; evaluation deals samples as the loader's
        batches); training reads them again while it needs more."""
        order = list(range(len(self.urls)))
        if self.shuffle:
            random.Random(self.seed).shuffle(order)  # the same order in every process and worker
        readers, me = self.world * workers, self.rank * workers + w
        by_shard = self.cycle and len(order) >= readers
        mine = order[me::readers] if by_shard else order
        position = 0
        while True:
            produced = 0
            for k in mine:
                for raw in read_shard(self.urls[k], self._problem, self.counts[k]):
                    if not by_shard:  # position p -> rank p % world, then the rank's batches dealt to workers
                        p, position = position, position + 1
                        if p % self.world != self.rank or (p // self.world // self.batch) % workers != w:
                            continue
                    got = self._unpack(raw, self.urls[k], held)
                    if got is not None:
                        produced += 1
                        yield got
            if not self.cycle or produced == 0:
                return

    def _unpack(self, raw: dict[str, Any], url: str, held: Counter[Path]) -> tuple[Any, list[Path]] | None:
        """The sample and the files it reads, held in memory (nothing is written) under the names
        ``SHARD/KEY.EXT``: the task's dataset reads them as files, and a bad one is named by shard and key."""
        key = raw.get("__key__", "?")
        where = f"{url} {key}"
        files: dict[str, Path] = {}
        try:
            labels = json.loads(raw["json"])
            image_ext = image_key(raw)
            if image_ext is None:
                raise KeyError("image")
            masks = [k for k in raw if k.startswith("mask.")]
            for role, ext in [("image", image_ext)] + [("mask", m) for m in masks[:1]]:
                files[role] = Path(url) / f"{key}.{ext}"
                hold_file(files[role], raw[ext])
                held[files[role]] += 1
            if self.strict:  # else a bad image is reported (shard, key) and replaced when read
                with open_image(files["image"]):
                    pass
            return sample_from(labels, files), list(files.values())
        except KeyError:
            self._problem(f"{where}: a sample without its image or json labels")
        except (ValueError, TypeError, DataError) as exc:
            self._problem(f"{where}: bad sample ({exc})")
        _release(files.values(), held)
        return None

    def _problem(self, message: str) -> None:
        if self.strict:
            raise DataError(message)
        log.warning("skipping %s", message)

    def _serve(
        self, samples: Iterator[tuple[Any, list[Path]]], quota: int, held: Counter[Path]
    ) -> Iterator[Any]:
        """``quota`` items. The buffer grows by two samples for each item that leaves it (a random one; the
        oldest when not shuffling) until it holds ``buffer`` samples, so items flow from the first
        hundred samples on; an item's files are released once it is made."""
        rng = random.Random(self.seed * 1_000_003 + self.rank * 1009 + (get_worker_info() or _Solo).id)
        size = self.buffer if self.shuffle else 1
        start = min(size, 100)
        dataset: Any = None
        buffer: list[Any] = []
        files: list[list[Path]] = []
        produced = 0

        def add(sample: Any, paths: list[Path]) -> None:
            nonlocal dataset, buffer
            if dataset is None:
                try:  # the task's dataset, made on the first sample (which it checks)
                    dataset = self.build([sample])
                except DataError as exc:
                    self._problem(f"{paths[0].parent} {paths[0].stem}: {exc}")
                    _release(paths, held)
                    return
                buffer = dataset.samples  # the dataset reads its samples from the buffer itself
            else:
                buffer.append(sample)
            files.append(paths)

        def take() -> Any:
            nonlocal produced
            j = rng.randrange(len(buffer)) if self.shuffle else 0
            try:
                item = dataset[j]  # an unreadable image is logged (shard, key) and replaced
                produced += 1
            except DataError:  # nothing in the buffer decodes: this one leaves it, another is read
                item = _FAILED
            _release(files[j], held)
            buffer[j], files[j] = buffer[-1], files[-1]  # the last fills the gap: order is random anyway
            buffer.pop()
            files.pop()
            return item

        while produced < quota:
            wanted = quota - produced - len(buffer)  # samples still to read: none read that goes unused
            for _ in range(2 if len(buffer) < size else 1):
                got = next(samples, None) if wanted > 0 else None
                if got is not None:
                    add(*got)
                    wanted -= 1
            if not buffer:
                return  # nothing left to read (evaluation, or shards that all failed)
            if len(buffer) >= start or wanted <= 0 or got is None:
                item = take()
                if item is not _FAILED:
                    yield item


_FAILED = object()


class _Solo:
    id = 0


def _release(paths: Iterable[Path], held: Counter[Path]) -> None:
    for path in paths:
        release_file(path)
        held[path] -= 1
        if not held[path]:
            del held[path]
