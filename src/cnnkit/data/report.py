"""One report type for everything a reader or a dataset fixed or left out, whatever the format or task.

Readers and datasets add to a :class:`DataReport` instead of failing on a bad sample (``strict`` turns
the first problem into a :class:`~cnnkit.errors.DataError`); the run lists every skipped sample in
``skipped.txt`` and logs a summary.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field

from cnnkit.errors import DataError


@dataclass
class DataReport:
    """``items``: ``(where, why)`` of every sample left out (``where`` is a file, or ``file:line``);
    ``clipped`` / ``dropped`` / ``duplicates``: per file, box coordinates clipped into the image, empty
    boxes dropped and repeated boxes (same class and box) dropped."""

    items: list[tuple[str, str]] = field(default_factory=list)
    clipped: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    duplicates: Counter[str] = field(default_factory=Counter)
    background: int = 0  # images without a label file, kept as background (YOLO's rule)

    def add(self, where: str | os.PathLike[str], why: str, strict: bool = False) -> None:
        """Leave a sample out because of ``why``; with ``strict``, stop instead."""
        if strict:
            raise DataError(f"{where}: {why}")
        self.items.append((str(where), why))

    def problem(self, message: str, strict: bool = False) -> None:
        """:meth:`add` from one ``"where: why"`` message (the first ``": "`` separates them)."""
        where, _, why = message.partition(": ")
        if strict:
            raise DataError(message)
        self.items.append((where, why or "skipped"))

    def merge(self, other: DataReport) -> None:
        self.items.extend(other.items)
        self.clipped.update(other.clipped)
        self.dropped.update(other.dropped)
        self.duplicates.update(other.duplicates)
        self.background += other.background

    @property
    def problems(self) -> list[str]:
        """Every sample left out, as ``"where: why"`` lines."""
        return [f"{where}: {why}" for where, why in self.items]

    def skipped(self) -> list[tuple[str, str]]:
        return list(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def report(self) -> str:
        return "\n".join(self.problems)

    def log_problems(self, logger: logging.Logger, limit: int | None = 20) -> None:
        """Warn about each sample left out (the first ``limit``; all of them are in the run's
        ``skipped.txt``)."""
        shown = self.problems if limit is None else self.problems[:limit]
        for line in shown:
            logger.warning("%s", line)
        if len(self.problems) > len(shown):
            logger.warning(
                "... and %d more problems (see the run's skipped.txt)", len(self.problems) - len(shown)
            )

    def summary(self) -> str:
        parts = []
        if self.clipped:
            parts.append(f"{sum(self.clipped.values())} coordinates clipped in {len(self.clipped)} files")
        if self.dropped:
            parts.append(f"{sum(self.dropped.values())} empty boxes dropped in {len(self.dropped)} files")
        if self.duplicates:
            n = sum(self.duplicates.values())
            parts.append(f"{n} repeated boxes dropped in {len(self.duplicates)} files")
        if self.background:
            parts.append(f"{self.background} images have no label file (treated as background)")
        if self.items:
            parts.append(f"{len(self.items)} samples skipped")
        return "; ".join(parts) or "no problems"
