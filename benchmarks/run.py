"""Run every benchmark (``make bench``); each prints ratios against a peer measured in the same run."""

from __future__ import annotations

import importlib
import sys

SUITES = (
    "bench_zoo",
    "bench_train",
    "bench_segment",
    "bench_sliding",
    "bench_detect",
    "bench_distributed",
    "bench_export",
    "bench_backends",
    "bench_serve",
    "bench_shards",
)


def main() -> None:
    chosen = sys.argv[1:] or list(SUITES)
    for name in chosen:
        print(f"\n== {name} ==", flush=True)
        importlib.import_module(f"benchmarks.{name}").main([])


if __name__ == "__main__":
    main()
