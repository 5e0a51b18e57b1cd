"""Walking a dataset's folders safely: the one directory walker every reader uses.

Hidden files and folders (``.ipynb_checkpoints``, ``.DS_Store``, editor swap files) are left out;
symbolic links are followed, but a link that leads back into a folder being walked (a loop) is not, a
file reached twice through links is kept once, and a broken link is skipped. Each of these is logged
once per walked folder, so a surprising count is never silent.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("cnnkit")
_said: set[str] = set()  # messages already logged: sniffers walk the same folder several times


@dataclass
class Walk:
    """What a walk found: the files kept, and what it left out or noticed, by kind."""

    files: list[Path] = field(default_factory=list)
    hidden: list[Path] = field(default_factory=list)
    loops: list[Path] = field(default_factory=list)
    broken: list[Path] = field(default_factory=list)
    twice: list[Path] = field(default_factory=list)
    outside: list[Path] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    def notes(self, root: Path) -> list[str]:
        """One line per kind of thing noticed (empty when the walk was plain)."""

        def some(paths: list[Path]) -> str:
            return ", ".join(str(p) for p in paths[:3]) + (" ..." if len(paths) > 3 else "")

        kinds = [
            (self.loops, "symlink loops not followed"),
            (self.twice, "files reached again through links, kept once"),
            (self.broken, "broken links skipped"),
            (self.outside, "links followed to places outside the dataset"),
            (self.hidden, "hidden files or folders ignored"),
        ]
        out = [f"{root}: {len(paths)} {what} ({some(paths)})" for paths, what in kinds if paths]
        if self.unreadable:
            out.append(
                f"{root}: {len(self.unreadable)} folders cannot be listed ({'; '.join(self.unreadable[:3])})"
            )
        return out


def walk(
    root: str | os.PathLike[str],
    keep: Callable[[str], bool],
    max_depth: int | None = None,
    within: str | os.PathLike[str] | None = None,
) -> Walk:
    """The files below ``root`` whose name ``keep`` accepts (``max_depth`` folders deep at most), sorted,
    with what was left out (see the module docstring). ``within``: the dataset ``root`` is part of (a
    class folder's dataset), for telling loops and links outside it. Findings are logged once."""
    root = Path(root)
    found = Walk()
    real_root = Path(within or root).resolve()
    seen_files: set[Path] = set()

    def visit(folder: Path, real: Path, ancestors: frozenset[Path], depth: int) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            found.unreadable.append(f"{folder}: {exc.strerror}")
            return
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith("."):
                found.hidden.append(path)
                continue
            entry_real = real / entry.name  # ``real`` is resolved, so only a link's own target differs
            if entry.is_symlink():
                try:
                    entry_real = path.resolve(strict=True)
                except (OSError, RuntimeError):  # missing target, or a link to itself
                    found.broken.append(path)
                    continue
            if entry.is_dir(follow_symlinks=True):
                if entry_real in ancestors or entry_real == real or real_root.is_relative_to(entry_real):
                    found.loops.append(path)
                    continue
                if entry.is_symlink() and not entry_real.is_relative_to(real_root):
                    found.outside.append(path)
                if max_depth is None or depth < max_depth:
                    visit(path, entry_real, ancestors | {real}, depth + 1)
            elif keep(entry.name):
                if entry.is_symlink() and not entry_real.is_relative_to(real_root):
                    found.outside.append(path)
                if entry_real in seen_files:
                    found.twice.append(path)
                    continue
                seen_files.add(entry_real)
                found.files.append(path)

    if root.is_dir():
        visit(root, root.resolve(), frozenset(), 0)
    found.files.sort()
    for line in found.notes(root):
        if line not in _said:
            _said.add(line)
            log.warning("%s", line)
    return found


def walk_files(
    root: str | os.PathLike[str],
    keep: Callable[[str], bool],
    max_depth: int | None = None,
    within: str | os.PathLike[str] | None = None,
) -> list[Path]:
    """:func:`walk`'s files only."""
    return walk(root, keep, max_depth, within).files
