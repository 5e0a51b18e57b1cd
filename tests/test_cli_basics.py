"""Small things users hit first: ``--version``, every option's default in ``--help``, a closed pipe ends
quietly, and the files a run writes are as readable as any other file (the umask, not mkstemp's 0600)."""

from __future__ import annotations

import argparse
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import cnnkit
from cnnkit.cli import build_parser, main
from cnnkit.io import atomic_path


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"cnnkit {cnnkit.__version__}"


def _parsers(
    parser: argparse.ArgumentParser, path: str = "cnnkit"
) -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _parsers(sub, f"{path} {name}")
    return found


def test_every_option_shows_its_default() -> None:
    missing = []
    for path, parser in _parsers(build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
                continue
            if action.help is None or "default" not in formatter._get_help_string(action) % vars(action):
                missing.append(f"{path} {action.option_strings[0]}")
    assert missing == []


def test_a_closed_pipe_ends_quietly() -> None:
    """``cnnkit models | head -1``: the reader goes away; no BrokenPipeError traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cnnkit", "summary", "resnet50"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before anything is read
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1 and "Traceback" not in err and "BrokenPipe" not in err


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        with atomic_path(tmp_path / "results.csv") as tmp:
            tmp.write_text("epoch\n1\n")
        cnnkit.save_weights(
            cnnkit.create_model("resnet18", num_classes=2, width=0.125), tmp_path / "w.safetensors"
        )
    finally:
        os.umask(old)
    for name in ("results.csv", "w.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
