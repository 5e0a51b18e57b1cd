from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

CliRun = Callable[..., subprocess.CompletedProcess[str]]


def _run_cnnkit(
    *args: str, cwd: Path | None = None, threads: int | None = None, ok: bool = True
) -> subprocess.CompletedProcess[str]:
    """``python -m cnnkit ARGS`` in a child process, outside any torchrun environment of this one;
    with ``ok`` the run must succeed (its stderr is shown when it does not)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(
        [sys.executable, "-m", "cnnkit", *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env
    )
    if ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture
def cnnkit_cli() -> CliRun:
    """Run the command line in a child process: ``cnnkit_cli("train", "detect", ..., cwd=..., ok=...)``."""
    return _run_cnnkit


@pytest.fixture(autouse=True, scope="session")
def _own_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Downloaded weights, exported graphs and backend choices go to the session's folder, not ~/.cache
    (command-line children inherit it)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CNNKIT_CACHE", str(tmp_path_factory.mktemp("cnnkit-cache")))
        yield


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _in_a_temporary_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test runs in its own folder: default outputs (runs/val, runs/predict, mlruns) never land in
    the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def digits_0_4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built-in digits 0-4, one rendering each, small images: an ImageFolder root with train/ and val/."""
    from cnnkit.data.builtin import write_classification

    return write_classification(
        tmp_path_factory.mktemp("digits04"), classes=(0, 1, 2, 3, 4), size_range=(28, 36), copies=2, seed=0
    )


@pytest.fixture(scope="session")
def digits_5_9(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cnnkit.data.builtin import write_classification

    return write_classification(
        tmp_path_factory.mktemp("digits59"), classes=(5, 6, 7, 8, 9), size_range=(28, 36), copies=1, seed=1
    )


def write_every_task(root: Path) -> dict[str, Path]:
    """A tiny built-in dataset of every task in its usual layout: ``task -> folder``."""
    from cnnkit.data import builtin
    from cnnkit.data.scenes import write_scenes

    return {
        "classify": builtin.write_classification(root / "digits", classes=(0, 1, 2), size_range=(28, 32)),
        "detect": builtin.write_detection(root / "det", n_train=24, n_val=8, seed=0),
        "segment": write_scenes(root / "scenes", n_train=12, n_val=4, size=(40, 56)),
        "localize": builtin.write_localization(root / "boxes", n_train=24, n_val=8, seed=0),
        "landmarks": builtin.write_landmarks(root / "kites", n_train=24, n_val=8, seed=0),
    }
