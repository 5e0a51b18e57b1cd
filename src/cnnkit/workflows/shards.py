"""Tasks on WebDataset shards: ``cnnkit data pack`` writes any dataset a task reads into shards, and
:func:`task_data` reads a task's data from files or from shards alike (see :mod:`cnnkit.data.shards`)."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from cnnkit.data.shard_stream import ShardStream
from cnnkit.data.shards import Manifest, is_shards, pack, parse_size, read_manifest

__all__ = ["Shards", "is_shards", "pack_data", "task_data"]
from cnnkit.engine.config import TrainConfig, config_from_dict
from cnnkit.errors import CnnkitError, DataError
from cnnkit.workflows.spec import TaskData, TaskSpec, get_task

log = logging.getLogger("cnnkit")
#: samples each reader holds to shuffle from (their files lie in memory); CNNKIT_SHUFFLE_BUFFER sets it
SHUFFLE_BUFFER = 1000


@dataclass
class Shards:
    """What a spec needs to make its data from shards: the manifest read, and its splits as streams."""

    manifest: Manifest
    source: str
    strict: bool = False
    buffer: int = field(default_factory=lambda: int(os.environ.get("CNNKIT_SHUFFLE_BUFFER", SHUFFLE_BUFFER)))

    @property
    def names(self) -> list[str] | None:
        return self.manifest.names

    @property
    def record(self) -> dict[str, Any]:
        return self.manifest.record

    @property
    def facts(self) -> dict[str, Any]:
        return self.manifest.facts

    def stream(self, split: str, build: Callable[[list[Any]], Dataset[Any]]) -> ShardStream:
        """Split ``split`` (``train``, ``val``) as the task's items; ``build``: its dataset over samples."""
        if not self.manifest.counts.get(split):
            raise DataError(
                f"{self.source}: the shards have no {split} split (they have {sorted(self.manifest.counts)})"
            )
        urls, counts = self.manifest.urls[split], self.manifest.counts[split]
        return ShardStream(urls, counts, build, buffer=self.buffer, strict=self.strict)


def task_data(spec: TaskSpec, opts: Any, cfg: TrainConfig, names: Sequence[str] | None = None) -> TaskData:
    """``spec.build_data`` for files, or the spec's streams for shards (``opts.data`` a shards folder, its
    ``dataset.yaml``, shard files or URLs)."""
    source = getattr(opts, "data", None)
    if not is_shards(source):
        return spec.build_data(opts, cfg, names)
    manifest = read_manifest(str(source))
    if manifest.task != spec.name:
        raise DataError(f"{source}: shards of a {manifest.task} dataset, not {spec.name}")
    if names and manifest.names and list(names) != list(manifest.names):
        raise DataError(f"{source}: the shards' classes {manifest.names} are not the run's {list(names)}")
    counts = {split: sum(c) for split, c in manifest.counts.items()}
    log.info("%s: WebDataset shards of a %s dataset, %s; streamed", source, manifest.task,
             ", ".join(f"{n} {split}" for split, n in counts.items()))  # fmt: skip
    return spec.shard_data(
        opts, cfg, Shards(manifest, str(source), strict=bool(getattr(opts, "strict", False)))
    )


def pack_data(
    task: str,
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    shard_size: str | int = "1GB",
    val_fraction: float | None = None,
    seed: int = 0,
    strict: bool = False,
    progress: bool = True,
    **options: Any,
) -> Path:
    """Read ``data`` as ``task`` reads it (any layout; unreadable samples left out and reported) and write
    its train and validation splits, each in a random order seeded by ``seed``, as WebDataset shards
    under ``out`` (a new or empty folder)."""
    spec = get_task(task)
    if is_shards(data):
        raise CnnkitError(f"{data}: already shards")
    values: dict[str, Any] = {"data": str(data), **options}
    if val_fraction is not None:
        values["val_fraction"] = val_fraction
    if strict and "strict" in {f.name for f in dataclasses.fields(spec.Options)}:
        values["strict"] = True
    opts: Any = config_from_dict(spec.Options, values, f"data pack {task}")
    read = spec.build_data(opts, TrainConfig(seed=seed), None)
    # Readers list samples class by class; a shuffle buffer mixes only neighbours, so the shards hold them
    # in a seeded random order (WebDataset's advice): every shard, and every buffer, sees every class.
    splits = {
        split: random.Random(seed).sample(d.samples, len(d.samples))
        for split, d in (("train", read.train), ("val", read.val))
    }
    if read.skipped:
        log.warning("%s: %d samples left out (unreadable, bad labels): not packed", data, len(read.skipped))
    facts = spec.shard_facts(read)
    return pack(splits, out, task=spec.name, names=read.names, record=read.record, facts=facts,
                shard_size=parse_size(shard_size), source=str(data), progress=progress)  # fmt: skip
