"""Training-side speed: engine overhead, data pipeline throughput, frozen-base vs full fine-tuning step.

Targets (issue 3): fit <= 1.05x the time of a minimal hand-written loop (speed ratio >= 0.95); the
classification loader >= 1.0x torchvision ImageFolder's images/s; the frozen stage-1 step well under
0.5x the time of a full fine-tuning step.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import cnnkit
from benchmarks.harness import compare, header
from cnnkit.data.builtin import write_classification
from cnnkit.data.classify import ClassificationDataset
from cnnkit.data.transforms import AugmentConfig, classify_train_transform
from cnnkit.engine import TrainConfig, fit
from cnnkit.engine.freeze import freeze_base
from cnnkit.engine.optim import lr_factor, param_groups, set_lr
from cnnkit.tasks.classify import ClassificationTask


def engine_overhead(pairs: int) -> None:
    data = TensorDataset(torch.randn(2048, 3, 32, 32), torch.randint(0, 10, (2048,)))
    cfg = TrainConfig(
        epochs=1, batch=32, lr=1e-3, workers=0, quiet=True, plots=False, amp="off", warmup_epochs=0
    )

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return cnnkit.create_model("resnet18", num_classes=10, width=0.5)

    def ours() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            fit(ClassificationTask(10), model(), data, None, cfg, Path(tmp))

    def hand() -> None:
        net = model()
        # The same parameter groups and update rule, with PyTorch's default kernels, as a user would write.
        groups = param_groups(net, cfg.weight_decay)
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))
        loader = DataLoader(data, batch_size=32, shuffle=True, drop_last=True)
        net.train()
        for step, (x, y) in enumerate(loader):
            set_lr(opt, cfg.lr, lr_factor(step, len(loader), cfg))
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
            opt.step()

    print(header("a hand-written loop", model="resnet18 x0.5", input="32x32", batch=32, steps=64))
    r = compare("fit vs hand loop (1 epoch)", ours, hand, pairs=pairs)
    print(r.line("(target >= 0.95, i.e. fit <= 1.05x the time; fit also writes checkpoints and logs)"))


def data_pipeline(pairs: int) -> None:
    from torchvision import datasets
    from torchvision import transforms as T

    with tempfile.TemporaryDirectory() as tmp:
        root = write_classification(
            Path(tmp), size_range=(300, 480), limit=160, copies=1, val_fraction=0, ext="jpg"
        )
        root = root / "train"
        aug = AugmentConfig()
        ours_ds = ClassificationDataset.from_folder(root, classify_train_transform(224, aug))
        peer_tf = T.Compose(
            [
                T.RandomResizedCrop(224, scale=aug.scale, antialias=True),
                T.RandomHorizontalFlip(aug.hflip),
                T.ColorJitter(aug.jitter, aug.jitter, aug.jitter, aug.hue),
                T.ToTensor(),
                T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            ]
        )
        peer_ds = datasets.ImageFolder(str(root), peer_tf)

        def run(ds: torch.utils.data.Dataset) -> None:  # type: ignore[type-arg]
            for _ in DataLoader(ds, batch_size=32, num_workers=0):
                pass

        details = {"images": len(ours_ds), "size": "300-480 px JPEG", "out": 224, "workers": 0}
        print(header("torchvision ImageFolder + transforms (PIL)", **details))
        r = compare(
            "loader: decode + train transforms", lambda: run(ours_ds), lambda: run(peer_ds), pairs=pairs
        )
        n = len(ours_ds)
        print(r.line(f"(target >= 1.0; {n / r.ours_s:.0f} vs {n / r.peer_s:.0f} images/s)"))


def frozen_step(pairs: int) -> None:
    x = torch.randn(16, 3, 224, 224)
    y = torch.randint(0, 10, (16,))

    def make(frozen: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        net = cnnkit.create_model("mobilenet_v2", num_classes=10)
        if frozen:
            freeze_base(net)
        net.train()
        return net, torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.01)

    def step(net: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    frozen_net, frozen_opt = make(True)
    full_net, full_opt = make(False)
    print(header("the same model fully fine-tuned", model="mobilenet_v2", input="224x224", batch=16))
    r = compare("frozen-base step vs full step", lambda: step(frozen_net, frozen_opt),
                lambda: step(full_net, full_opt), pairs=pairs)  # fmt: skip
    print(r.line(f"(frozen step = {1 / r.speedup:.2f}x the full step's time; expect well under 0.5x)"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args(argv)
    logging.getLogger("cnnkit").setLevel(logging.WARNING)
    engine_overhead(args.pairs)
    data_pipeline(args.pairs)
    frozen_step(args.pairs)


if __name__ == "__main__":
    main()
