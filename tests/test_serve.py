"""``cnnkit serve``: the HTTP API on a free loopback port, for every task's tiny model; bad input is a 4xx
JSON error and the server stays up; concurrent requests are batched."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision.ops import batched_nms

import cnnkit
from cnnkit.data import builtin
from cnnkit.data.scenes import write_scenes

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
from cnnkit.serve import Limits, create_app, load_slots  # noqa: E402

QUICK = {"epochs": 1, "workers": 0, "quiet": True, "batch": 8}


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny trained model of every task."""
    root = tmp_path_factory.mktemp("serve")
    runs = {"project": root / "runs", **QUICK}
    digits = builtin.write_classification(root / "digits", classes=(0, 1, 2), size_range=(28, 32), seed=0)
    det = builtin.write_detection(root / "det", n_train=8, n_val=2, seed=0)
    scenes = write_scenes(root / "scenes", n_train=4, n_val=2, size=(40, 56))
    boxes = builtin.write_localization(root / "boxes", n_train=8, n_val=2, seed=0)
    kites = builtin.write_landmarks(root / "kites", n_train=8, n_val=2, seed=0)
    small = {"model": "resnet18", "model_args": {"width": 0.125}, "imgsz": 32}
    backbone = {"backbone_args": {"width": 0.125}, "imgsz": 64}
    return {
        "cls": cnnkit.train("classify", digits, **small, **runs).best,
        "det": cnnkit.train("detect", det, strides=(8, 16), **backbone, **runs).best,
        "seg": cnnkit.train("segment", scenes, imgsz=48, model_args={"base": 8, "depth": 2}, **runs).best,
        "loc": cnnkit.train("localize", boxes, **backbone, **runs).best,
        "pts": cnnkit.train("landmarks", kites, **backbone, **runs).best,
    }


class Server:
    """uvicorn serving an app on a free loopback port, in a thread, for one test module."""

    def __init__(self, app: Any) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def raw(self, path: str) -> tuple[int, bytes]:
        """GET ``path`` exactly as written (no client-side normalisation of ``..``)."""
        import http.client

        host, port = self.url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()

    def call(
        self,
        path: str,
        body: bytes | None = None,
        kind: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        request = urllib.request.Request(
            self.url + path, data=body, method="POST" if body is not None else "GET"
        )
        for key, value in {**({"Content-Type": kind} if kind else {}), **(headers or {})}.items():
            request.add_header(key, value)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())


def multipart(files: list[tuple[str, bytes]], kinds: dict[str, str] | None = None) -> tuple[bytes, str]:
    """A form of ``files`` (PNGs unless ``kinds`` names another content type for a file)."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
        f"Content-Type: {(kinds or {}).get(name, 'image/png')}\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, data in files
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def png(size: tuple[int, int] = (64, 48), seed: int = 0, mode: str = "RGB") -> bytes:
    pixels = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(weights: dict[str, Path]) -> Iterator[Server]:
    slots = load_slots([f"{name}={path}" for name, path in weights.items()])
    limits = Limits(max_bytes=300_000, max_pixels=2_000_000, max_images=8, max_frames=40)
    runs = weights["cls"].parents[3]  # runs/<task>/exp/weights/best.safetensors
    running = Server(create_app(slots, limits=limits, max_batch=16, max_wait_ms=100, runs=runs))
    yield running
    running.stop()


def test_models_health_and_openapi(server: Server) -> None:
    status, models = server.call("/models")
    assert status == 200 and [m["name"] for m in models] == ["cls", "det", "seg", "loc", "pts"]
    assert [m["task"] for m in models] == ["classify", "detect", "segment", "localize", "landmarks"]
    assert models[0]["classes"] == ["one", "two", "zero"] and models[0]["imgsz"] == 32
    assert "conf" in models[1]["options"] and "top1" in models[0]["metrics"]
    assert server.call("/health")[1]["status"] == "ok"
    status, spec = server.call("/openapi.json")
    assert status == 200 and "/predict/{model}" in spec["paths"]


def test_every_task_predicts_as_the_command_line_prints(server: Server) -> None:
    image = png()
    status, out = server.call("/predict/cls?topk=2", image, "image/png")
    assert status == 200 and out["task"] == "classify" and len(out["predictions"][0]["topk"]) == 2
    status, out = server.call("/predict/det?conf=0.0&max_det=3", image, "image/png")
    assert status == 200 and len(out["predictions"]) == 3
    assert {"image_id", "category_id", "bbox", "score"} <= set(out["predictions"][0])
    assert server.call("/predict/det?conf=1.0", image, "image/png")[1]["predictions"] == []
    status, out = server.call("/predict/seg", image, "image/png")
    mask = Image.open(io.BytesIO(base64.b64decode(out["predictions"][0]["mask_png"])))
    assert status == 200 and mask.size == (64, 48) and out["predictions"][0]["classes"]
    status, out = server.call("/predict/loc", image, "image/png")
    assert status == 200 and {"object_prob", "class", "box"} <= set(out["predictions"][0])
    status, out = server.call("/predict/pts", image, "image/png")
    assert status == 200 and len(out["predictions"][0]["points"]) == 4
    body, kind = multipart([("a.png", png(seed=1)), ("b.png", png(seed=2)), ("c.png", png(seed=3))])
    status, out = server.call("/predict/cls", body, kind)
    assert status == 200 and [p["path"] for p in out["predictions"]] == ["a.png", "b.png", "c.png"]


def _bomb() -> bytes:
    """A few kilobytes of PNG that decode to 25 million pixels."""
    buf = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buf, "PNG")
    return buf.getvalue()


def test_bad_input_is_a_4xx_json_error_and_the_next_request_works(server: Server) -> None:
    image = png()
    cases = [
        (("/predict/cls", b"not an image at all", "image/png"), 400, "image0: not an image"),
        (("/predict/cls", image[: len(image) // 2], "image/png"), 400, "truncated or corrupt"),
        (("/predict/cls", _bomb(), "image/png"), 413, "5000x5000 pixels, over the limit"),
        (("/predict/cls", b"x" * 400_000, "image/png"), 413, "over the limit of 300,000 bytes"),
        (("/predict/cls", image, "text/plain"), 415, "not text/plain"),
        (("/predict/nope", image, "image/png"), 404, "no model 'nope'"),
        (("/predict/cls?topk=many", image, "image/png"), 400, "'many' is not a whole number"),
        (("/predict/cls?conf=0.5", image, "image/png"), 400, "unknown options ['conf']"),
        (("/predict/cls", b"", "image/png"), 400, "image0: empty"),
        (("/predict/cls", *multipart([(f"{i}.png", image) for i in range(9)])), 400, "multipart"),
    ]
    for args, status, message in cases:
        got, out = server.call(*args)
        assert (got, message in out.get("error", "")) == (status, True), (args[0], out)
    assert server.call("/predict/cls", image, "image/png")[0] == 200


def video(frames: int = 10, fps: int = 5, size: tuple[int, int] = (64, 48), form: str = "webm") -> bytes:
    """A clip of a red square moving right on grey (VP8 in WebM, which any browser plays; or MPEG-4)."""
    av = pytest.importorskip("av")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=form) as out:
        stream = out.add_stream("libvpx" if form == "webm" else "mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            pixels = np.full((size[1], size[0], 3), 90, np.uint8)
            pixels[10:30, 4 + 3 * i : 24 + 3 * i] = (220, 40, 40)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        out.mux(stream.encode())
    return buf.getvalue()


def test_a_video_is_predicted_frame_by_frame(server: Server) -> None:
    """Every task answers per sampled frame (index, time, the image's records); ``fps`` samples; a
    video in a form beside an image; the frame limit, a cut or false video are 4xx errors."""
    clip = video()
    for model in ("cls", "det", "seg", "loc", "pts"):
        status, out = server.call(f"/predict/{model}", clip, "video/webm")
        assert status == 200 and out["predictions"] == [], out
        (answer,) = out["videos"]
        assert (answer["width"], answer["height"], answer["fps"], answer["duration"]) == (64, 48, 5.0, 2.0)
        assert [f["index"] for f in answer["frames"]] == list(range(10)) and answer["note"] is None
        assert [f["time"] for f in answer["frames"]] == pytest.approx([i / 5 for i in range(10)])
    assert len(out["videos"][0]["frames"][3]["predictions"][0]["points"]) == 4
    status, out = server.call("/predict/det?conf=0&max_det=2&fps=2", video(form="mp4"), "video/mp4")
    frames = out["videos"][0]["frames"]
    assert status == 200 and [f["index"] for f in frames] == [0, 3, 5, 8]  # first frames at 0, .5, 1, 1.5 s
    assert all(len(f["predictions"]) == 2 and "bbox" in f["predictions"][0] for f in frames)
    status, out = server.call("/predict/seg?fps=1", clip, "application/octet-stream")  # told by its bytes
    second = out["videos"][0]["frames"][1]["predictions"][0]
    mask = Image.open(io.BytesIO(base64.b64decode(second["mask_png"])))
    assert status == 200 and mask.size == (64, 48) and len(out["videos"][0]["frames"]) == 2
    body, kind = multipart([("a.png", png()), ("clip.webm", clip)], {"clip.webm": "video/webm"})
    status, out = server.call("/predict/cls?topk=1", body, kind)
    assert status == 200 and [p["path"] for p in out["predictions"]] == ["a.png"]
    assert out["videos"][0]["name"] == "clip.webm" and len(out["videos"][0]["frames"]) == 10
    long = video(frames=60, fps=10)
    status, out = server.call("/predict/cls", long, "video/webm")
    assert status == 413 and "more than 40 frames (every frame)" in out["error"], out
    assert server.call("/predict/cls?fps=5", long, "video/webm")[0] == 200  # 6 s at 5 fps: 30 frames
    status, out = server.call("/predict/cls", long[: len(long) * 2 // 3], "video/webm")
    assert status == 413  # announces 6 s: refused before decoding
    status, out = server.call("/predict/cls?fps=5", long[: len(long) * 2 // 3], "video/webm")
    assert status == 200 and "cut short" in out["videos"][0]["note"] and len(out["videos"][0]["frames"]) < 30
    cases = [
        (video(form="mp4")[:900], "video/mp4", 400, "or one cut short"),
        (b"\x00" * 500, "video/webm", 400, "video0: not a video"),
        (b"", "video/mp4", 400, "video0: empty"),
    ]
    for data, kind, code, message in cases:
        status, out = server.call("/predict/cls", data, kind)
        assert status == code and message in out["error"], out
    status, out = server.call("/predict/cls?fps=-1", clip, "video/webm")
    assert status == 400 and "not a positive number" in out["error"]
    assert server.call("/health")[0] == 200


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.one_of(st.binary(max_size=2000), st.integers(0, 3000).map(lambda n: png()[:n])),
    kind=st.sampled_from(["image/png", "video/mp4", "application/octet-stream"]),
)
def test_fuzzed_uploads_never_break_the_server(server: Server, data: bytes, kind: str) -> None:
    status, out = server.call("/predict/det", data, kind)
    assert status == 200 or (400 <= status < 500 and out["error"]), out
    assert server.call("/health")[0] == 200


def test_concurrent_requests_are_batched(server: Server) -> None:
    before = server.call("/health")[1]["models"]["cls"]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda i: server.call("/predict/cls", png(seed=i), "image/png"), range(12)))
    assert all(status == 200 for status, _ in answers)
    after = server.call("/health")[1]["models"]["cls"]
    runs, images = after["batches"] - before["batches"], after["images"] - before["images"]
    assert images == 12 and runs < 12  # at least two requests shared a model run


def test_a_token_is_required_on_every_request(weights: dict[str, Path]) -> None:
    server = Server(create_app(load_slots([f"cls={weights['cls']}"]), token="s3cret"))
    try:
        assert server.call("/models")[0] == 401
        assert server.call("/predict/cls", png(), "image/png", {"Authorization": "Bearer wrong"})[0] == 401
        status, out = server.call("/predict/cls", png(), "image/png", {"Authorization": "Bearer s3cret"})
        assert status == 200 and out["predictions"]
    finally:
        server.stop()


def test_models_served_by_another_backend_answer_alike(server: Server, weights: dict[str, Path]) -> None:
    """ONNX Runtime behind the same API (any batch the batcher forms): the same classes, near probabilities,
    the detector's post-processing on the runtime's raw outputs."""
    chosen = [f"cls={weights['cls']}", f"det={weights['det']}"]
    other = Server(create_app(load_slots(chosen, backend="onnxruntime"), max_batch=4, max_wait_ms=50))
    try:
        body, kind = multipart([(f"{k}.png", png(seed=k)) for k in range(5)])
        _, ours = other.call("/predict/cls?topk=3", body, kind)
        _, eager = server.call("/predict/cls?topk=3", body, kind)
        for a, b in zip(ours["predictions"], eager["predictions"], strict=True):
            assert a["topk"][0]["class"] == b["topk"][0]["class"]
            assert a["topk"][0]["prob"] == pytest.approx(b["topk"][0]["prob"], abs=0.03)  # eager runs bf16
        status, out = other.call("/predict/det?conf=0.0&max_det=3", png(), "image/png")
        assert status == 200 and len(out["predictions"]) == 3
    finally:
        other.stop()


def test_two_models_of_one_name_are_refused(weights: dict[str, Path]) -> None:
    with pytest.raises(cnnkit.CnnkitError, match="two models named 'best'"):
        load_slots([str(weights["cls"]), str(weights["det"])])


def _artifacts(tmp_path: Path) -> Path:
    """Where the screenshots go: ``$CNNKIT_TEST_ARTIFACTS`` (kept, e.g. by CI), else the test's folder."""
    import os

    folder = Path(os.environ.get("CNNKIT_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def browser_page(url: str, viewport: dict[str, int] | None = None) -> Iterator[tuple[Any, list[str]]]:
    """``url`` in headless Chromium (Debian's, driven by Playwright), and the errors its console logs;
    skipped, with the reason, where there is no browser."""
    import shutil

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser tests: playwright is not installed (pip install playwright)")
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("browser tests: no chromium (apt-get install -y chromium)")
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        page = browser.new_page(viewport=viewport) if viewport else browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        try:
            yield page, errors
        finally:
            browser.close()


def test_the_page_in_a_real_browser(server: Server, weights: dict[str, Path], tmp_path: Path) -> None:
    """The page loads without console errors, draws each task's predictions (bars, boxes, a legend), and
    the confidence slider re-filters the boxes without asking the model again."""
    image = tmp_path / "street.png"
    image.write_bytes(png((96, 72), seed=5))
    with browser_page(server.url + "/") as (page, errors):
        page.wait_for_function("document.querySelectorAll('#model option').length === 5")

        def upload(model: str) -> Any:
            cards = page.locator(".card").count()
            page.select_option("#model", model)
            page.set_input_files("#files", str(image))
            page.wait_for_function(f"document.querySelectorAll('.card').length === {cards + 1}")
            return page.wait_for_selector(".card:first-child .extra > *")

        upload("cls")
        assert page.locator(".card:first-child .bar").count() == 3
        upload("det")
        before = server.call("/health")[1]["models"]["det"]["batches"]

        def boxes_at(conf: str, iou: str = "0.45") -> int:
            for slider, value in (("#conf", conf), ("#iou", iou)):
                page.eval_on_selector(
                    slider, "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); }", value
                )
            return int(page.get_attribute(".card:first-child", "data-boxes") or -1)

        many, none = boxes_at("0.0"), boxes_at("1.0")
        assert many > 0 and none == 0 and "0 boxes" in page.inner_text(".card:first-child .count")
        loose, tight = boxes_at("0.0", "0.95"), boxes_at("0.0", "0.1")
        assert loose > tight > 0  # the IoU slider runs NMS on the page
        query = "/predict/det?conf=0.001&iou=1&max_det=1000"  # what the page asked for: no NMS yet
        raw = server.call(query, image.read_bytes(), "image/png")[1]["predictions"]
        xywh = torch.tensor([b["bbox"] for b in raw])
        scores, classes = (
            torch.tensor([b["score"] for b in raw]),
            torch.tensor([b["category_id"] for b in raw]),
        )
        for iou in ("0.3", "0.6"):  # the page's NMS is torchvision's, on the boxes it was sent
            keep = batched_nms(
                torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1), scores, classes, float(iou)
            )
            assert boxes_at("0.0", iou) == len(keep)
        assert server.call("/health")[1]["models"]["det"]["batches"] == before + 1  # the call above
        boxes_at("0.0")
        upload("seg")
        assert page.locator(".card:first-child .legend span").count() >= 1
        upload("pts")
        assert "4 points" in page.inner_text(".card:first-child .count")
        page.screenshot(path=str(_artifacts(tmp_path) / "serve_page.png"), full_page=True)
    assert errors == []
    assert Image.open(_artifacts(tmp_path) / "serve_page.png").size[0] >= 800


def test_a_video_in_a_real_browser(server: Server, tmp_path: Path) -> None:
    """A dropped video plays with its frame's predictions drawn over it: seeking shows the frame sampled
    at or before that time, and the sliders re-filter without a new request."""
    clip = tmp_path / "clip.webm"
    clip.write_bytes(video(frames=20, fps=10, size=(96, 64)))
    with browser_page(server.url + "/") as (page, errors):
        page.wait_for_function("document.querySelectorAll('#model option').length >= 5")
        for model, fps, frames in (("seg", "10", 20), ("det", "4", 8)):
            page.select_option("#model", model)
            page.fill("#fps", fps)
            page.set_input_files("#files", str(clip))
            page.wait_for_selector(f".card:first-child[data-frames='{frames}'][data-frame]")
        assert page.locator(".card:nth-child(2) .legend span").count() >= 1  # the segmenter's video
        batches = server.call("/health")[1]["models"]["det"]["batches"]

        def seek(seconds: float) -> str:
            page.eval_on_selector(".card:first-child video", f"v => {{ v.currentTime = {seconds}; }}")
            page.wait_for_function(
                f"document.querySelector('.card:first-child video').currentTime === {seconds}"
                " && !document.querySelector('.card:first-child video').seeking"
            )
            page.wait_for_timeout(100)
            return page.get_attribute(".card:first-child", "data-frame") or ""

        # sampled at 0, .3, .5, .8, 1, 1.3, 1.5 and 1.8 s
        assert [seek(t) for t in (0.0, 0.72, 1.0, 1.9)] == ["0", "5", "10", "18"]
        page.eval_on_selector("#conf", "e => { e.value = '0'; e.dispatchEvent(new Event('input')); }")
        assert int(page.get_attribute(".card:first-child", "data-boxes") or -1) > 0
        page.eval_on_selector("#conf", "e => { e.value = '1'; e.dispatchEvent(new Event('input')); }")
        assert page.get_attribute(".card:first-child", "data-boxes") == "0"
        assert server.call("/health")[1]["models"]["det"]["batches"] == batches  # no new request
        page.eval_on_selector("#conf", "e => { e.value = '0'; e.dispatchEvent(new Event('input')); }")
        assert "frame 18 (8 of 8 predicted)" in page.inner_text(".card:first-child .frame")
        page.screenshot(path=str(_artifacts(tmp_path) / "serve_video.png"), full_page=True)
    assert errors == []


def test_the_runs_api_serves_only_files_inside_the_runs_folder(
    server: Server, weights: dict[str, Path], tmp_path: Path
) -> None:
    runs = weights["cls"].parents[3]
    status, listed = server.call("/api/runs")
    assert status == 200 and {r["path"] for r in listed} >= {"classify/exp", "detect/exp", "segment/exp"}
    classify = next(r for r in listed if r["path"] == "classify/exp")
    assert (
        classify["task"] == "classify"
        and classify["served_as"] == "cls"
        and "results.csv" in classify["files"]
    )
    status, body = server.raw("/api/runs/file/classify/exp/results.csv")
    assert status == 200 and body.startswith(b"epoch,")
    secret = tmp_path / "secret.txt"
    secret.write_text("not for you")
    (runs / "outside").symlink_to(tmp_path, target_is_directory=True)
    (runs / "classify" / "exp" / "leak.txt").symlink_to(secret)
    for path in (
        "/api/runs/file/../secret.txt",
        "/api/runs/file/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/api/runs/file/..%2f..%2f..%2fetc%2fpasswd",
        "/api/runs/file/classify/exp/../../../../etc/passwd",
        "/api/runs/file//etc/passwd",
        "/api/runs/file/outside/secret.txt",
        "/api/runs/file/classify/exp/leak.txt",
        "/api/runs/file/classify/exp/weights/best.safetensors",  # weights are not a run file to fetch
    ):
        status, body = server.raw(path)
        assert status == 404 and b"not for you" not in body and b"root:" not in body, path
    assert "outside" not in {r["path"].split("/")[0] for r in server.call("/api/runs")[1]}
    status, answer = server.call("/api/runs/try/detect/exp", b"", "application/json")
    assert status == 200 and answer["model"] == "det"  # already served: that name
    assert server.call("/api/runs/try/../../x", b"", "application/json")[0] == 404


def test_the_runs_page_in_a_real_browser(server: Server, weights: dict[str, Path], tmp_path: Path) -> None:
    """Each run with its curves, plots and configuration; its best weights one click from the predict page."""
    with browser_page(server.url + "/runs", viewport={"width": 1200, "height": 900}) as (page, errors):
        page.wait_for_selector('.run[data-path="segment/exp"] .curves canvas')
        page.wait_for_function("document.querySelectorAll('.run .actions button').length >= 5")
        card = page.locator('.run[data-path="segment/exp"]')
        assert int(card.locator("canvas").first.get_attribute("data-series") or 0) >= 2  # the losses
        assert "confusion_matrix.png" in [i.get_attribute("alt") for i in card.locator("img").all()]
        assert "epochs" in (card.locator(".config").text_content() or "")
        page.screenshot(path=str(_artifacts(tmp_path) / "serve_runs.png"), full_page=True)
        card.locator("button").click()
        page.wait_for_url("**/?model=seg")
        page.wait_for_function("document.querySelector('#model').value === 'seg'")
    assert errors == []


def test_a_slow_client_does_not_block_the_others(server: Server) -> None:
    """A client that sends half a body and stalls holds only its own connection."""
    import socket

    host, port = server.url.removeprefix("http://").split(":")
    stalled = socket.create_connection((host, int(port)))
    try:
        stalled.sendall(b"POST /predict/cls HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                        b"Content-Length: 100000\r\n\r\n" + png()[:500])  # fmt: skip
        start = time.perf_counter()
        assert server.call("/predict/cls", png(), "image/png")[0] == 200
        assert time.perf_counter() - start < 10
    finally:
        stalled.close()
    assert server.call("/health")[0] == 200


def test_sigterm_finishes_the_requests_in_flight(weights: dict[str, Path], tmp_path: Path) -> None:
    """``cnnkit serve`` stopped by SIGTERM while a request waits in its batch still answers it."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    command = [sys.executable, "-m", "cnnkit", "serve", "--weights", f"cls={weights['cls']}",
               "--port", str(port), "--max-wait-ms", "1500"]  # fmt: skip
    log = (tmp_path / "serve.log").open("w")  # a file, not a pipe nobody reads (it could fill and block)
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except OSError:
                assert time.time() < deadline and process.poll() is None, "cnnkit serve did not start"
                time.sleep(0.2)
        client = Server.__new__(Server)
        client.url = url
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(client.call, "/predict/cls", png(), "image/png")
            time.sleep(0.5)  # the request waits in its batch (1.5 s)
            process.send_signal(signal.SIGTERM)
            status, out = answer.result(timeout=60)
        assert status == 200 and out["predictions"]
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises it once drained
    finally:
        if process.poll() is None:
            process.kill()
        log.close()


def test_a_model_that_fails_is_a_json_error_and_the_worker_goes_on(weights: dict[str, Path]) -> None:
    import dataclasses

    slots = load_slots([f"cls={weights['cls']}"])

    def broken(x: Any) -> Any:
        raise RuntimeError("out of memory, say")

    slots["cls"].loaded = dataclasses.replace(slots["cls"].loaded, prepared=broken)
    server = Server(create_app(slots))
    try:
        for _ in range(2):  # the second request is answered too: the batch worker survived the first
            status, out = server.call("/predict/cls", png(), "image/png")
            assert status == 500 and "cls failed on this batch: RuntimeError: out of memory" in out["error"]
        assert server.call("/health")[0] == 200
    finally:
        server.stop()
