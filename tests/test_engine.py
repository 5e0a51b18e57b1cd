from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

import cnnkit
from cnnkit.engine import TrainConfig, fit, new_run_dir
from cnnkit.engine.callbacks import Callback, FitState
from cnnkit.engine.freeze import FrozenBatchNorm2d, count_parameters, freeze_base
from cnnkit.engine.optim import lr_factor, param_groups
from cnnkit.tasks.classify import ClassificationTask

CFG = TrainConfig(epochs=3, batch=16, imgsz=16, lr=3e-3, workers=0, quiet=True, plots=False, amp="off")


def blobs(n: int = 96, seed: int = 0) -> TensorDataset:
    """Two classes of 16x16 images: a bright square top-left or bottom-right, plus noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g) * 0.3
    y = torch.arange(n) % 2
    x[y == 0, :, 2:7, 2:7] += 2.0
    x[y == 1, :, 9:14, 9:14] += 2.0
    return TensorDataset(x, y)


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cnnkit.create_model("resnet18", num_classes=2, width=0.125)


def test_fit_learns_and_writes_the_run(tmp_path: Path) -> None:
    result = fit(
        ClassificationTask(2), tiny_model(), blobs(), blobs(64, seed=1), CFG.replace(plots=True), tmp_path
    )
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert result.metrics["top1"] > 0.9
    for name in ("results.csv", "results.png", "confusion_matrix.png", "config.yaml", "train.log"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "results.csv").read_text().count("\n") == 4  # header + 3 epochs
    for name in ("last.pt", "last.safetensors", "best.safetensors"):
        assert (tmp_path / "weights" / name).is_file()


def test_seeded_cpu_run_is_reproducible(tmp_path: Path) -> None:
    a = fit(ClassificationTask(2), tiny_model(), blobs(), None, CFG, tmp_path / "a")
    b = fit(ClassificationTask(2), tiny_model(), blobs(), None, CFG, tmp_path / "b")
    wa, wb = load_file(a.last), load_file(b.last)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


class StopAfter(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, state: FitState) -> None:
        if state.epoch == self.epoch:
            raise KeyboardInterrupt  # the user presses Ctrl-C right after the checkpoint


@pytest.mark.parametrize("ema", [False, True])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path: Path, ema: bool) -> None:
    cfg = CFG.replace(epochs=4, ema=ema)
    full = fit(ClassificationTask(2), tiny_model(), blobs(), blobs(32, 1), cfg, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        fit(
            ClassificationTask(2),
            tiny_model(),
            blobs(),
            blobs(32, 1),
            cfg,
            tmp_path / "cut",
            callbacks=[StopAfter(2)],
        )
    resumed = fit(
        ClassificationTask(2),
        tiny_model(),
        blobs(),
        blobs(32, 1),
        cfg,
        tmp_path / "cut",
        resume=tmp_path / "cut" / "weights" / "last.pt",
    )
    wa, wb = load_file(full.last), load_file(resumed.last)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in full.history]
    assert (tmp_path / "cut" / "results.csv").read_text().count("\n") == 5


def test_logged_loss_does_not_depend_on_gradient_accumulation(tmp_path: Path) -> None:
    """At a learning rate of 1e-12 the weights stay put: every micro-batch's loss is the same whatever
    --accumulate is, so the logged epoch loss must be too (it once took one micro-batch per step as the
    sum and every micro-batch as the count)."""
    frozen = CFG.replace(epochs=1, lr=1e-12, optimizer="sgd", warmup_epochs=0)
    losses = []
    for accumulate in (1, 4):
        cfg = frozen.replace(accumulate=accumulate)
        result = fit(ClassificationTask(2), tiny_model(), blobs(), None, cfg, tmp_path / str(accumulate))
        losses.append(result.history[0]["train_loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_early_stopping(tmp_path: Path) -> None:
    noise = TensorDataset(torch.randn(64, 3, 16, 16), torch.randint(0, 2, (64,)))
    result = fit(
        ClassificationTask(2), tiny_model(), noise, noise, CFG.replace(epochs=30, patience=2), tmp_path
    )
    assert len(result.history) < 30
    assert len(result.history) - result.best_epoch == 2


def test_a_stop_decided_after_the_checkpoint_still_saves_the_last_epoch(tmp_path: Path) -> None:
    """Early stopping (or a stop agreed across ranks) is decided after the epoch's checkpoint hook ran;
    with a long --save-period the run must still end with its last epoch resumable on disk."""
    noise = TensorDataset(torch.randn(64, 3, 16, 16), torch.randint(0, 2, (64,)))
    cfg = CFG.replace(epochs=30, patience=2, save_period=100)
    result = fit(ClassificationTask(2), tiny_model(), noise, noise, cfg, tmp_path)
    assert len(result.history) < 30
    state = torch.load(tmp_path / "weights" / "last.pt", weights_only=True)
    assert state["epoch"] == len(result.history)
    assert load_file(tmp_path / "weights" / "last.safetensors")  # the weights beside it


def test_run_dirs_are_numbered(tmp_path: Path) -> None:
    assert new_run_dir(tmp_path, "classify").name == "exp"
    assert new_run_dir(tmp_path, "classify").name == "exp2"
    assert new_run_dir(tmp_path, "classify", "exp", exist_ok=True).name == "exp"


def test_schedule_warms_up_then_follows_the_cosine() -> None:
    cfg = TrainConfig(epochs=10, warmup_epochs=1, min_lr_ratio=0.0)
    factors = [lr_factor(s, 10, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(1 / 11) and factors[9] == pytest.approx(10 / 11)
    assert factors[10] == pytest.approx(1.0)
    assert factors[55] == pytest.approx(0.5, abs=0.02)
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    step = TrainConfig(epochs=10, warmup_epochs=0, schedule="step", step_epochs=3, step_gamma=0.1)
    assert [lr_factor(s * 10, 10, step) for s in (0, 2, 3, 6)] == pytest.approx([1, 1, 0.1, 0.01])


def test_no_weight_decay_on_norms_and_biases() -> None:
    model = tiny_model()
    groups = param_groups(model, 0.05, {"head": 2.0})
    decayed = {id(p) for g in groups if g["weight_decay"] for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim > 1), name
    head = [g for g in groups if g["lr_scale"] == 2.0]
    assert sum(p.numel() for g in head for p in g["params"]) == sum(
        p.numel() for p in model.head.parameters()
    )


def test_frozen_batchnorm_stays_in_inference_mode() -> None:
    model = cnnkit.create_model("resnet18", num_classes=3, width=0.25)
    frozen, kept = freeze_base(model)
    assert kept == [] and frozen[0] == "stem" and frozen[-1].startswith("stages.3")
    bns = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert bns and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.train()  # must not bring the statistics back to life
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        loss = model(torch.randn(8, 3, 32, 32) * 3 + 1).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = {k: v for k, v in model.state_dict().items() if "running" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    # Frozen output equals an eval-mode BatchNorm's, even in training mode.
    bn = nn.BatchNorm2d(4).eval()
    bn.running_mean.uniform_()
    bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(FrozenBatchNorm2d.from_batchnorm(bn).train()(x), bn(x))
    # The frozen base builds no autograd graph; only the head trains.
    feats = model.forward_features(torch.randn(2, 3, 32, 32))
    assert feats.grad_fn is None
    trainable, n_frozen = count_parameters(model)
    assert trainable == sum(p.numel() for p in model.head.parameters()) and n_frozen > 10 * trainable


def test_unfreeze_last_blocks_and_by_name() -> None:
    model = cnnkit.create_model("resnet18", num_classes=3, width=0.25)
    _frozen, kept = freeze_base(model, unfreeze_last=2)
    assert kept == ["stages.3.0", "stages.3.1"]
    assert model.forward_features(torch.randn(1, 3, 32, 32)).grad_fn is not None
    model = cnnkit.create_model("resnet18", num_classes=3, width=0.25)
    _, kept = freeze_base(model, trainable=["stages.2"])
    assert kept == ["stages.2.0", "stages.2.1"]
    with pytest.raises(cnnkit.CnnkitError, match="unknown layer names"):
        freeze_base(model, trainable=["layer9"])


def test_validation_logs_the_training_loss_for_every_task() -> None:
    """``val_loss``: the task's training loss on the validation batches; segmentation's at each mask's own
    size (as the metrics), through the same crop-and-upsample."""
    import torch.nn.functional as F

    from cnnkit.engine.loops import evaluate
    from cnnkit.tasks.localize import LocalizationTask
    from cnnkit.tasks.segment import SegmentationTask

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 8))
    x, target = torch.randn(6, 3, 8, 8), torch.rand(6, 6)
    target[:, 0], target[:, 5] = (target[:, 0] > 0.5).float(), torch.randint(0, 3, (6,)).float()
    task = LocalizationTask(3)
    metrics, _ = evaluate(task, model, [(x, target)], torch.device("cpu"))
    with torch.no_grad():
        expected_loc = float(task.loss(model(x), (x, target))[0])
    assert metrics["val_loss"] == pytest.approx(expected_loc, rel=1e-5)

    seg = SegmentationTask(3, "ce")
    logits = torch.randn(2, 3, 8, 8)
    masks = [torch.randint(0, 3, (12, 16)), torch.randint(0, 3, (8, 10))]  # each image's own size
    expected = [
        F.cross_entropy(F.interpolate(lg[None], size=m.shape, mode="bilinear", align_corners=False), m[None])
        for lg, m in zip(logits, masks)
    ]
    assert seg.val_loss(logits, (None, masks)) == pytest.approx(float(sum(expected)) / 2, rel=1e-5)


def test_results_png_is_redrawn_every_epoch(tmp_path: Path) -> None:
    seen: list[bool] = []

    class Look(Callback):
        def on_fit_start(self, state: FitState) -> None:
            seen.append((tmp_path / "results.png").exists())

        def before_step(self, state: FitState) -> None:
            if state.epoch == 1 and len(seen) == 1:  # the second epoch starts: the first is drawn
                seen.append((tmp_path / "results.png").exists())

    fit(
        ClassificationTask(2),
        tiny_model(),
        blobs(32),
        blobs(16, 1),
        CFG.replace(epochs=2, plots=True),
        tmp_path,
        callbacks=[Look()],
    )
    assert seen == [False, True]
