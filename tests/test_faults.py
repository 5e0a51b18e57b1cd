"""Faults never lose or corrupt data: a kill at any write boundary leaves a consistent checkpoint set,
nothing non-finite is saved as good, a failing plot never ends a finished run, and a failed write (disk
full, read-only folder, a file where a folder goes) is one line with the previous checkpoint intact."""

from __future__ import annotations

import errno
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from cnnkit.engine import TrainingDiverged, fit
from cnnkit.engine.callbacks import Callback, FitState
from cnnkit.errors import OutputError
from cnnkit.tasks.classify import ClassificationTask
from test_engine import CFG, blobs, tiny_model
from test_mistakes import tiny_train


class PoisonLoss(ClassificationTask):
    def __init__(self, at_step: int) -> None:
        super().__init__(2)
        self.calls = 0
        self.at_step = at_step

    def loss(self, outputs, batch):  # type: ignore[no-untyped-def]
        self.calls += 1
        loss, logs = super().loss(outputs, batch)
        return (loss * math.nan if self.calls >= self.at_step else loss), logs


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    steps_per_epoch = 96 // 16
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 8; the last good checkpoint is .*last.pt"):
        fit(PoisonLoss(steps_per_epoch + 2), tiny_model(), blobs(), None, CFG, tmp_path)
    state = torch.load(tmp_path / "weights" / "last.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


class PoisonBatchNorm(Callback):
    """From epoch ``epoch`` on, a BatchNorm's running variance overflows (seen with --lr 1e6: 12 inf
    BatchNorm tensors saved in last and best while the training loss stayed finite)."""

    def __init__(self, model: nn.Module, epoch: int) -> None:
        self.model, self.epoch = model, epoch

    def after_step(self, state: FitState) -> None:
        if state.epoch + 1 >= self.epoch:
            bn = next(m for m in self.model.modules() if isinstance(m, nn.BatchNorm2d))
            bn.running_var.fill_(float("inf"))


def test_non_finite_weights_are_never_saved_as_good(tmp_path: Path) -> None:
    model = tiny_model()
    with pytest.raises(TrainingDiverged, match=r"at epoch 2: 1 weight tensors became non-finite \(stem"):
        fit(
            ClassificationTask(2),
            model,
            blobs(),
            blobs(32, 1),
            CFG,
            tmp_path,
            callbacks=[PoisonBatchNorm(model, 2)],
        )
    state = torch.load(tmp_path / "weights" / "last.pt", weights_only=True)
    assert state["epoch"] == 1
    for name in ("last.safetensors", "best.safetensors"):
        saved = load_file(tmp_path / "weights" / name)
        assert all(torch.isfinite(v).all() for v in saved.values() if v.is_floating_point()), name


def test_a_failing_plot_never_ends_a_finished_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Seen: a matplotlib ValueError while plotting ended a finished run with a traceback."""
    import cnnkit.engine.callbacks as callbacks
    import cnnkit.tasks.classify as classify

    def broken(*args: object) -> None:
        raise ValueError("Axis limits cannot be NaN or Inf")

    monkeypatch.setattr(callbacks, "plot_history", broken)
    monkeypatch.setattr(classify, "plot_confusion", broken)
    with caplog.at_level("WARNING"):
        result = fit(
            ClassificationTask(2),
            tiny_model(),
            blobs(32),
            blobs(16),
            CFG.replace(epochs=1, plots=True),
            tmp_path,
        )
    assert result.best.is_file() and (tmp_path / "results.csv").is_file()
    assert caplog.text.count("not drawn (ValueError: Axis limits cannot be NaN or Inf)") == 2


class Improving(ClassificationTask):
    """Every validation scores higher than the last: each epoch writes a new best."""

    score = 0.0

    def evaluator(self) -> object:  # type: ignore[override]
        evaluator = super().evaluator()
        compute = evaluator.compute

        def higher() -> dict[str, float]:
            Improving.score += 0.01
            return {**compute(), "top1": Improving.score}

        evaluator.compute = higher  # type: ignore[method-assign]
        return evaluator


def _kill_at_write(monkeypatch: pytest.MonkeyPatch, k: int) -> list[int]:
    """Make the ``k``-th atomic rename of the run raise (a kill between two files of a checkpoint set)."""
    import cnnkit.io as io

    real, calls = io.os.replace, [0]

    def replace(src: object, dst: object) -> None:
        calls[0] += 1
        if calls[0] == k:
            raise KeyboardInterrupt(f"killed before write {k}")
        real(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(io.os, "replace", replace)
    return calls


def test_a_kill_between_any_two_writes_leaves_a_consistent_checkpoint_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seen: last.pt named epoch 4 as best while best.safetensors held epoch 2, and the CLI reported
    epoch 4's score for epoch 2's weights. Killed at every write boundary of a run, then resumed: the
    best epoch and score reported are always those of the weights in best.safetensors."""
    from cnnkit.weights import read_metadata

    cfg = CFG.replace(epochs=4, save_period=3)  # best is written in epochs without a resumable state
    with monkeypatch.context() as m:
        calls = _kill_at_write(m, 0)
        fit(Improving(2), tiny_model(), blobs(), blobs(32, 1), cfg, tmp_path / "count")
    for k in range(1, calls[0] + 1):
        run_dir = tmp_path / f"kill{k}"
        with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
            _kill_at_write(m, k)
            fit(Improving(2), tiny_model(), blobs(), blobs(32, 1), cfg, run_dir)
        last = run_dir / "weights" / "last.pt"
        if not last.is_file():
            continue  # killed before the first resumable state: nothing to resume
        (run_dir / "weights" / ".best.safetensors.abc.tmp").write_bytes(b"half a file")  # a kill's leftover
        # what the run reports right after resuming (no epoch left to train), then after finishing
        done = int(torch.load(last, weights_only=True)["epoch"])
        for epochs in (done, cfg.epochs):
            result = fit(
                Improving(2),
                tiny_model(),
                blobs(),
                blobs(32, 1),
                cfg.replace(epochs=epochs),
                run_dir,
                resume=last,
            )
            meta = read_metadata(result.best)
            assert (meta["epoch"], meta["metrics"]["top1"]) == (result.best_epoch, result.best_fitness), k
        assert not list((run_dir / "weights").glob(".*.tmp")), k


class FullDiskAt(Callback):
    """From epoch ``epoch`` on, every write fails as on a full disk (the writer's own error text)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, epoch: int) -> None:
        self.monkeypatch, self.epoch = monkeypatch, epoch

    def before_step(self, state: FitState) -> None:
        if state.epoch + 1 >= self.epoch:  # ``state.epoch``: the epochs done

            def full(*args: object, **kwargs: object) -> None:
                raise RuntimeError(
                    "[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
                    "data/0: file write failed"
                )

            def no_space(*args: object, **kwargs: object) -> None:
                raise OSError(errno.ENOSPC, "No space left on device")

            self.monkeypatch.setattr(torch, "save", full)
            self.monkeypatch.setattr("safetensors.torch.save_file", no_space)


def test_a_full_disk_is_one_error_and_the_previous_checkpoint_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(OutputError, match=r"last.safetensors: cannot write: the disk is full"):
        fit(
            ClassificationTask(2),
            tiny_model(),
            blobs(),
            blobs(32, 1),
            CFG,
            tmp_path,
            callbacks=[FullDiskAt(monkeypatch, 2)],
        )
    monkeypatch.undo()
    state = torch.load(tmp_path / "weights" / "last.pt", weights_only=True)
    assert state["epoch"] == 1  # epoch 1's resumable state, whole
    assert load_file(tmp_path / "weights" / "last.safetensors")  # and its weights
    assert not list((tmp_path / "weights").glob(".*.tmp"))  # no half-written temporary left behind


def test_a_torch_writer_failure_reads_as_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cnnkit.io import atomic_path

    (tmp_path / "last.pt").write_bytes(b"previous")
    with (
        pytest.raises(OutputError, match=r"last.pt: cannot write: the disk is full"),
        atomic_path(tmp_path / "last.pt"),
    ):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    assert (tmp_path / "last.pt").read_bytes() == b"previous"
    with pytest.raises(ValueError), atomic_path(tmp_path / "last.pt"):  # not a write failure: as it was
        raise ValueError("a bug")


@pytest.mark.parametrize(
    ("err", "why"),
    [
        (errno.EACCES, "no permission to write there"),
        (errno.EROFS, "the file system is read-only"),
    ],
)
def test_a_read_only_output_folder_is_one_cli_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    digits_0_4: Path,
    err: int,
    why: str,
) -> None:
    """Tests run as root, where chmod does not stop a write: the refusal is injected where the run
    directory is made."""
    from cnnkit.cli import main

    real = Path.mkdir

    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        if "ro" in self.parts:
            raise OSError(err, "refused", str(self))
        real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "mkdir", refuse)
    argv = tiny_train(digits_0_4, tmp_path / "ro")
    assert main(argv) == 2
    err_text = capsys.readouterr().err
    assert f"cnnkit: error: {tmp_path / 'ro'}" in err_text and why in err_text and "Traceback" not in err_text


def test_a_file_where_the_output_folder_goes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], digits_0_4: Path
) -> None:
    from cnnkit.cli import main

    (tmp_path / "afile").write_text("mine")
    argv = tiny_train(digits_0_4, tmp_path / "afile")
    assert main(argv) == 2
    assert "a file stands where a folder is needed" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "mine"
