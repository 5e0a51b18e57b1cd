"""WebDataset shards: ``cnnkit data pack`` for every task, training/validation/prediction from shards
(local, HTTP, ``pipe:``), each sample read once per epoch across processes and workers, bad shards
skipped and reported, flat memory, and two ``torchrun`` "nodes" equal to one node of two processes."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import pickle
import re
import socket
import subprocess
import sys
import tarfile
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch.utils.data import DataLoader

import cnnkit
from cnnkit.engine import Callback
from cnnkit.engine.config import TrainConfig, config_from_dict
from cnnkit.errors import DataError
from cnnkit.workflows import run
from cnnkit.workflows.check import check
from cnnkit.workflows.spec import get_task
from conftest import write_every_task

wds = pytest.importorskip("webdataset")
from cnnkit.data.shard_stream import ShardStream  # noqa: E402
from cnnkit.data.shards import is_shards, read_manifest  # noqa: E402
from cnnkit.engine.distributed import ShardSampler  # noqa: E402
from cnnkit.workflows.shards import pack_data, task_data  # noqa: E402

QUICK = {"epochs": 1, "workers": 0, "quiet": True, "batch": 8}
SMALL = {"model": "resnet18", "model_args": {"width": 0.125}, "imgsz": 32}
BACKBONE = {"backbone_args": {"width": 0.125}, "imgsz": 64}


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """A tiny dataset of every task in its usual layout, and its shards (several per split)."""
    root = tmp_path_factory.mktemp("shards")
    data = write_every_task(root)
    return {
        task: (src, pack_data(task, src, root / f"{task}_shards", shard_size="40KB", progress=False))
        for task, src in data.items()
    }


def keys(stream: ShardStream, workers: int = 0) -> list[str]:
    """The sample keys a stream yields (its dataset gives each sample's file name)."""
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    return [str(k) for k in loader]


class Names:
    """A stand-in for a task's dataset: item ``i`` is its sample's shard key."""

    def __init__(self, samples: list[Any]) -> None:
        self.samples = samples

    def __getitem__(self, i: int) -> str:
        return Path(self.samples[i][0]).stem.rsplit("-", 1)[0]


def names_stream(shards: Path, split: str = "val", **kw: Any) -> ShardStream:
    m = read_manifest(shards)
    return ShardStream(m.urls[split], m.counts[split], Names, **kw)


def test_pack_writes_every_sample_as_it_was_with_a_manifest(
    packed: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    src, shards = packed["classify"]
    manifest = yaml.safe_load((shards / "dataset.yaml").read_text())
    assert manifest["task"] == "classify" and manifest["names"] == ["one", "two", "zero"]
    files = {p.name: p for p in src.rglob("*.png")}
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == len(files)
    for split in ("train", "val"):
        entries = manifest["splits"][split]["shards"]
        assert len(entries) > 2 and sum(e["count"] for e in entries) == manifest["splits"][split]["count"]
        for e in entries:
            assert hashlib.sha256((shards / e["name"]).read_bytes()).hexdigest() == e["sha256"]
            # the size asked for, tar headers and padding counted (+ the tar's end, a 10 KiB record at most)
            assert e["bytes"] == (shards / e["name"]).stat().st_size <= 40 * 1024 + 10240
    with tarfile.open(shards / "val-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    images = [data for name, data in members.items() if name.endswith(".png")]
    labels = {json.loads(data)["label"] for name, data in members.items() if name.endswith(".json")}
    assert labels == {0, 1, 2}  # packed in a seeded random order: one shard holds every class
    assert images[0] in {p.read_bytes() for p in files.values()}  # the bytes as they were: no re-encoding
    seg = yaml.safe_load((packed["segment"][1] / "dataset.yaml").read_text())
    assert seg["record"]["ignore_index"] == 255 and "facts" not in seg
    det = yaml.safe_load((packed["detect"][1] / "dataset.yaml").read_text())
    assert len(det["facts"]["box_sizes"]) > 10 and all(0 < w <= 1 for w, _ in det["facts"]["box_sizes"])
    with pytest.raises(DataError, match="exists and is not empty"):
        pack_data("classify", src, shards, progress=False)  # never over another output
    again = pack_data("classify", src, shards.parent / "again", shard_size="40KB", progress=False)
    assert all((again / t.name).read_bytes() == t.read_bytes() for t in shards.glob("*.tar"))  # reproducible
    with pytest.raises(DataError, match="shards; data check reads a dataset's files"):
        check("classify", shards, out=None)
    braces = tmp_path / "a{1}.png"  # an image, not a brace pattern of shards
    braces.write_bytes(next(src.rglob("*.png")).read_bytes())
    assert not is_shards(braces) and is_shards(shards / "train-{000000..000001}.tar")


def test_every_task_trains_validates_and_predicts_from_shards(packed: dict[str, tuple[Path, Path]]) -> None:
    extra: dict[str, dict[str, Any]] = {
        "classify": SMALL,
        "detect": {"strides": (8, 16), **BACKBONE},
        "segment": {"imgsz": 48, "model_args": {"base": 8, "depth": 2}},
        "localize": BACKBONE,
        "landmarks": BACKBONE,
    }
    for task, (_, shards) in packed.items():
        result = cnnkit.train(task, shards, project="runs", name=task, **extra[task], **QUICK)
        assert result.best.is_file() and result.metrics, task
        report = cnnkit.val(result.best, workers=0)  # the shards the run recorded: their val split
        assert report.metrics, task
        records = list(run.predict(result.best, [shards], task=task))
        val_count = sum(read_manifest(shards).counts["val"])
        assert len(records) == sum(sum(c) for c in read_manifest(shards).counts.values()) > val_count, task
    seg = next(run.predict(Path("runs/segment/segment/weights/best.safetensors"), [packed["segment"][1]]))
    assert "train-000000.tar/train000000000" in seg.data["path"]
    resumed = run.resume("runs/classify/classify", epochs=2)  # the run's shards again, from its last epoch
    assert len(resumed.history) == 2 and resumed.history[1]["epoch"] == 2


def test_streams_pickle_for_spawned_workers(packed: dict[str, tuple[Path, Path]]) -> None:
    """Every task's streams survive pickling (data-loading workers started by spawn, as on macOS and
    Windows, receive them pickled), and a spawned worker delivers batches."""
    for task, (_, shards) in packed.items():
        spec = get_task(task)
        opts = config_from_dict(spec.Options, {"data": str(shards)})
        data = task_data(spec, opts, TrainConfig(imgsz=64))
        for stream in (data.train, data.val):
            copy = pickle.loads(pickle.dumps(stream))
            assert len(copy) == len(stream) and next(iter(copy)) is not None, task
    spec = get_task("classify")
    val = task_data(
        spec, config_from_dict(spec.Options, {"data": str(packed["classify"][1])}), TrainConfig(imgsz=32)
    ).val
    loader = DataLoader(val, batch_size=16, num_workers=1, multiprocessing_context="spawn")
    assert sum(len(x) for x, _ in loader) == len(val)


def test_each_sample_once_per_epoch_across_processes_and_workers(
    packed: dict[str, tuple[Path, Path]],
) -> None:
    shards = packed["classify"][1]
    every = sorted(keys(names_stream(shards)))
    assert len(every) == len(set(every)) == sum(read_manifest(shards).counts["val"])
    for world, workers, batch in ((2, 0, 8), (3, 2, 5), (2, 2, 64)):
        seen: list[str] = []
        for rank in range(world):
            stream = names_stream(shards)
            n = len(ShardSampler(stream.total, shuffle=False, rank=rank, world_size=world))
            stream.plan(shuffle=False, seed=0, rank=rank, world=world, length=n, batch=batch, cycle=False)
            got = keys(stream, workers)
            assert len(got) == n  # the length the loader was told
            seen += got
        assert sorted(seen) == every, (world, workers)  # validation: every sample exactly once
    for world, workers in ((1, 2), (2, 2), (4, 1)):  # training: equal steps per rank, reshuffled each epoch
        orders = []
        for seed in (1000, 1001):
            per_rank = []
            for rank in range(world):
                stream = names_stream(shards, "train", buffer=16)
                n = len(
                    ShardSampler(
                        stream.total, shuffle=True, rank=rank, world_size=world, batch=8, drop_last=True
                    )
                )
                stream.plan(shuffle=True, seed=seed, rank=rank, world=world, length=n, batch=8, cycle=True)
                per_rank.append(keys(stream, workers))
            assert len({len(k) for k in per_rank}) == 1 and len(per_rank[0]) % 8 == 0
            flat = [k for ks in per_rank for k in ks]
            assert max(Counter(flat).values()) <= 2  # a reader short of its share reads its shards again
            orders.append(flat)
        assert orders[0] != orders[1] and len(set(orders[0]) & set(orders[1])) > 0.8 * len(set(orders[0]))


def test_bad_shards_and_samples_are_reported_and_skipped(
    packed: dict[str, tuple[Path, Path]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shards = tmp_path / "bad"
    source = packed["classify"][1]
    shards.mkdir()
    for f in source.iterdir():
        (shards / f.name).write_bytes(f.read_bytes())
    good = sorted(keys(names_stream(shards)))
    cut = shards / "val-000001.tar"
    whole = cut.read_bytes()
    cut.write_bytes(whole[: len(whole) * 2 // 3 + 100])  # cut inside a member
    with wds.TarWriter(str(shards / "val-000002.tar")) as sink:  # a broken image, bad JSON, no image
        sink.write(
            {"__key__": "broken", "png": b"\x89PNG not really", "json": b'{"kind": "class", "label": 0}'}
        )
        sink.write({"__key__": "badjson", "png": good_png(), "json": b"{"})
        sink.write({"__key__": "noimage", "json": b'{"kind": "class", "label": 1}'})
    got = keys(names_stream(shards))
    assert 0 < len(got) < len(good)
    text = caplog.text
    lost = re.search(
        r"val-000001.tar: a shard cut short or corrupt \((\d+) of (\d+) samples read, the last", text
    )
    assert lost is not None and 0 < int(lost.group(1)) < int(lost.group(2)), text
    assert "val-000002.tar badjson: bad sample" in text
    assert "val-000002.tar noimage: a sample without its image" in text
    with pytest.raises(DataError, match=r"val-00000[12]\.tar"):
        keys(names_stream(shards, strict=True))
    caplog.clear()  # the task's own dataset: the broken image is named by shard and key, and replaced
    spec = get_task("classify")
    val = task_data(spec, config_from_dict(spec.Options, {"data": str(shards)}), TrainConfig(imgsz=32)).val
    assert len(list(DataLoader(val, batch_size=None))) == len(got)
    assert re.search(
        r"skipping unreadable image: \S+/val-000002\.tar/broken\.png: cannot decode", caplog.text
    )


def good_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture()
def http_root(packed: dict[str, tuple[Path, Path]]) -> Iterator[str]:
    """The classification shards served by an HTTP server on the loopback address."""
    handler = functools.partial(QuietHandler, directory=str(packed["classify"][1]))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


def test_shards_by_url_pattern_and_pipe(
    packed: dict[str, tuple[Path, Path]], http_root: str, tmp_path: Path
) -> None:
    import shutil

    if shutil.which("curl") is None:
        pytest.skip("WebDataset opens http URLs with curl, which this machine lacks")
    local = sorted(keys(names_stream(packed["classify"][1])))
    n = len(read_manifest(packed["classify"][1]).urls["train"]) - 1
    for source in (f"{http_root}/dataset.yaml", f"{http_root}/train-{{000000..{n:06d}}}.tar"):
        m = read_manifest(source)
        assert m.urls["val"][0] == f"{http_root}/val-000000.tar"
        assert sorted(keys(ShardStream(m.urls["val"], m.counts["val"], Names))) == local
    manifest = yaml.safe_load((packed["classify"][1] / "dataset.yaml").read_text())
    manifest["base"] = f"pipe:cat {packed['classify'][1]}/{{name}}"
    (tmp_path / "dataset.yaml").write_text(yaml.safe_dump(manifest))
    m = read_manifest(tmp_path / "dataset.yaml")
    assert sorted(keys(ShardStream(m.urls["val"], m.counts["val"], Names))) == local
    result = cnnkit.train("classify", f"{http_root}/dataset.yaml", project="runs", **SMALL, **QUICK)
    assert result.metrics["top1"] >= 0
    with pytest.raises(DataError, match=r"pipe: source needs its dataset\.yaml"):
        read_manifest(f"pipe:cat {packed['classify'][1]}/train-000000.tar")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_stays_flat_over_an_epoch_of_20_buffers(
    packed: dict[str, tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One epoch from shards holding ~20x the shuffle buffer: the main process's resident memory after
    the first quarter of the epoch and at its end differ by little (nothing accumulates per sample)."""
    shards = packed["classify"][1]
    total = sum(read_manifest(shards).counts["train"])
    monkeypatch.setenv("CNNKIT_SHUFFLE_BUFFER", str(total // 20))
    marks: list[int] = []

    class Watch(Callback):
        def after_step(self, state: Any) -> None:
            marks.append(_rss())

    cnnkit.train(
        "classify", shards, project="runs", callbacks=[Watch()], **SMALL, **{**QUICK, "plots": False}
    )
    quarter, end = max(marks[: len(marks) // 4]), max(marks)
    assert len(marks) > 40 and end - quarter < 40 * 2**20, (quarter, end)
    # Python's own allocations, to the kilobyte: a reference kept per sample would show here
    stream = names_stream(shards, "train", buffer=total // 20)
    stream.plan(shuffle=True, seed=1, rank=0, world=1, length=total, batch=1, cycle=True)
    tracemalloc.start()
    try:
        held = [tracemalloc.get_traced_memory()[0] for _ in stream]
    finally:
        tracemalloc.stop()
    early = max(held[: total // 4])
    assert len(held) == total and max(held) - early < 100 * 1024, (early, max(held))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_torchrun_nodes_train_as_one_node_of_two_processes(
    packed: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    shards = packed["classify"][1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    train = ["-m", "cnnkit", "train", "classify", "--data", str(shards), "--model", "resnet18",
             "--model-args", '{"width": 0.125}', "--imgsz", "32", "--epochs", "1", "--batch", "8",
             "--workers", "1", "--quiet", "--no-plots"]  # fmt: skip
    run = [sys.executable, "-m", "torch.distributed.run"]
    alone = [*run, "--standalone", "--nproc-per-node", "2", *train, "--project", str(tmp_path / "one")]
    one = subprocess.run(alone, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    port = _free_port()
    nodes = [
        subprocess.Popen(
            [
                *run,
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                "cnnkit-test",
                *train,
                "--project",
                str(tmp_path / "two"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    deadline = time.time() + 300
    for node in nodes:
        _, err = node.communicate(timeout=max(1, deadline - time.time()))
        assert node.returncode == 0, err[-3000:]
    a = torch.load(tmp_path / "one/classify/exp/weights/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two/classify/exp/weights/last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
