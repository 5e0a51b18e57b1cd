"""Side-by-side timing: warm both sides, run them in pairs alternating which goes first, and report
the median of the per-pair ratios (robust to a noisy, shared machine)."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Comparison:
    name: str
    ours_s: float  # median seconds per call
    peer_s: float
    speedup: float  # median over pairs of peer_time / our_time (> 1: cnnkit is faster)

    def line(self, target: str = "") -> str:
        return (
            f"{self.name:<34} cnnkit {self.ours_s * 1e3:9.2f} ms  peer {self.peer_s * 1e3:9.2f} ms  "
            f"speed ratio {self.speedup:5.3f}x {target}"
        )


def _time(fn: Callable[[], object], repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def compare(
    name: str,
    ours: Callable[[], object],
    peer: Callable[[], object],
    *,
    pairs: int = 7,
    repeat: int = 1,
    warmup: int = 2,
) -> Comparison:
    """Time ``ours`` and ``peer`` in ``pairs`` interleaved rounds; ``repeat`` calls per measurement."""
    for _ in range(warmup):
        ours()
        peer()
    ratios, t_ours, t_peer = [], [], []
    for i in range(pairs):
        if i % 2 == 0:
            a = _time(ours, repeat)
            b = _time(peer, repeat)
        else:
            b = _time(peer, repeat)
            a = _time(ours, repeat)
        t_ours.append(a)
        t_peer.append(b)
        ratios.append(b / a)
    return Comparison(name, statistics.median(t_ours), statistics.median(t_peer), statistics.median(ratios))


def header(peer: str, **details: object) -> str:
    import torchvision

    info = ", ".join(f"{k} {v}" for k, v in details.items())
    return (
        f"# peer: {peer}; torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; {info}"
    )
