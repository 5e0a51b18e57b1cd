"""``cnnkit serve``: trained models of any task behind an HTTP API (FastAPI on uvicorn;
``pip install 'cnnkit[serve]'``).

- ``GET /``: a page to choose a model, drop images or a short video and see the predictions drawn
  (top-k bars, boxes re-filtered by confidence and NMS IoU sliders without asking the model again, a
  mask overlay with its legend, a localizer's box, landmark points; a video plays with the predictions
  of the frame shown);
- ``GET /runs`` (with ``--runs DIR``): the training runs under ``DIR`` with their curves, plots and
  configuration, each run's best weights one click from the page above (files are served only from
  inside ``DIR``: no ``..``, however encoded, and no symbolic link out);
- ``GET /health``, ``GET /models`` (name, task, classes, input size, training metrics), the OpenAPI
  description at ``/openapi.json`` (and ``/docs``);
- ``POST /predict/{model}`` with images or short videos as ``multipart/form-data`` files or one as the
  raw body (``image/*``, ``video/*`` or ``application/octet-stream``); the task's predict options
  (``conf``, ``iou``, ``topk``...) as query parameters, and ``fps`` (the frames per second taken from a
  video; default every frame); the answer holds the same records as ``cnnkit predict --json``
  (segmentation adds each mask as a PNG in base64), a video's per frame with the frame's time.

Requests of many clients are batched: each model has a queue that a worker drains every ``max_wait_ms``
or ``max_batch`` images, running the model in one thread beside the event loop (which keeps serving).
Bad input is a 4xx JSON ``{"error": ...}`` naming the file and the problem: not an image, a truncated one,
over the byte or pixel limits (decompression bombs included), a video over the frame limit, an unknown
model or option, a wrong content type; a bearer ``token`` (or ``CNNKIT_SERVE_TOKEN``) is required on every
API request when set (the page and its scripts hold no data; the page asks for the token).
"""

import asyncio
import base64
import dataclasses
import io
import itertools
import os
import secrets
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cnnkit.data.images import Frame
from cnnkit.errors import CnnkitError
from cnnkit.serve.uploads import BadRequest, Limits, Video, parse_fps, read_uploads
from cnnkit.weights import read_metadata, task_of
from cnnkit.workflows import run
from cnnkit.workflows.common import Loaded
from cnnkit.workflows.spec import PredictRecord, TaskSpec, get_task

TOKEN_ENV = "CNNKIT_SERVE_TOKEN"
STATIC = Path(__file__).parent / "static"  # the page: plain HTML, CSS and JS, no build step, no CDN


@dataclass
class Slot:
    """One served model: its weights loaded once, and the queue its requests wait in."""

    name: str
    weights: str
    spec: TaskSpec
    meta: dict[str, Any]
    loaded: Loaded
    queue: asyncio.Queue[tuple[list[Frame], Any, asyncio.Future[list[PredictRecord]]]] | None = None
    batches: int = 0  # model runs, and the images they took: batching at work
    images: int = 0
    worker: asyncio.Task[None] | None = field(default=None, repr=False)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "task": self.spec.name,
            "classes": self.meta.get("class_names"),
            "imgsz": self.meta.get("imgsz"),
            "metrics": self.meta.get("metrics"),
            "weights": Path(self.weights).name,
            "options": sorted(_option_fields(self.spec)),
        }


def _option_fields(spec: TaskSpec) -> dict[str, dataclasses.Field[Any]]:
    """The task's predict options by name (none for a task without them)."""
    cls = spec.PredictOptions
    return {f.name: f for f in dataclasses.fields(cls)} if cls is not None else {}


def load_slots(
    weights: Sequence[str], device: str = "auto", fast: bool = True, backend: str | None = None
) -> dict[str, Slot]:
    """``PATH`` or ``NAME=PATH`` each; a model is named by its file's stem unless named; ``backend``: what
    runs the models (:mod:`cnnkit.backends`)."""
    slots: dict[str, Slot] = {}
    for item in weights:
        name, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        name = name or Path(path).name.split(".")[0]
        if name in slots:
            raise CnnkitError(f"two models named {name!r}: name them, --weights NAME=PATH")
        meta = read_metadata(path)
        task = task_of(meta)
        loaded = Loaded.of(path, task, device=device, fast=fast, backend=backend)
        slots[name] = Slot(name, path, get_task(task), meta, loaded)
    return slots


def query_options(spec: TaskSpec, params: dict[str, str]) -> Any:
    """The task's predict options from query parameters (strings, converted by each field's default)."""
    cls = spec.PredictOptions
    fields = _option_fields(spec)
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise BadRequest(400, f"unknown options {unknown}; {spec.name} takes {sorted(fields)}")
    values: dict[str, Any] = {}
    for key, text in params.items():
        default: Any = fields[key].default
        try:
            if isinstance(default, bool):
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                values[key] = text.lower() in ("true", "1")
            else:
                values[key] = type(default)(text)
        except ValueError:
            kind = {"int": "a whole number", "float": "a number", "bool": "true or false"}[
                type(default).__name__
            ]
            raise BadRequest(400, f"option {key}: {text!r} is not {kind}") from None
    return cls(**values) if cls is not None else None


def to_json(slot: Slot, records: list[PredictRecord]) -> Any:
    """``cnnkit predict --json``'s records; a segmentation mask rides along as a PNG in base64."""
    if slot.spec.name == "segment":
        out = []
        for r in records:
            mask = np.asarray(r.arrays["mask"])
            buf = io.BytesIO()
            Image.fromarray(mask.astype(np.uint8 if mask.max(initial=0) < 256 else np.uint16)).save(
                buf, "PNG"
            )
            out.append({**r.data, "mask_png": base64.b64encode(buf.getvalue()).decode("ascii")})
        return out
    return slot.spec.predictions_json(records)


class Batcher:
    """Drains each model's queue: the requests that arrived while the model was busy, and those arriving
    within ``max_wait_ms`` of the first (0: none waits), run together up to ``max_batch`` images, one model
    run per set of equal options. Under load, batches form without any waiting."""

    def __init__(self, max_batch: int, max_wait_ms: float) -> None:
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cnnkit-model")

    async def submit(self, slot: Slot, frames: list[Frame], options: Any) -> list[PredictRecord]:
        assert slot.queue is not None
        done: asyncio.Future[list[PredictRecord]] = asyncio.get_running_loop().create_future()
        await slot.queue.put((frames, options, done))
        return await done

    async def drain(self, slot: Slot) -> None:
        assert slot.queue is not None
        loop = asyncio.get_running_loop()
        while True:
            waiting = [await slot.queue.get()]
            deadline = loop.time() + self.max_wait
            while sum(len(w[0]) for w in waiting) < self.max_batch:
                if not slot.queue.empty():  # what arrived while the model ran joins at once
                    waiting.append(slot.queue.get_nowait())
                    continue
                try:
                    waiting.append(await asyncio.wait_for(slot.queue.get(), max(0.0, deadline - loop.time())))
                except TimeoutError:
                    break
            groups: dict[str, list[Any]] = {}
            for item in waiting:  # options compared by value (their repr names every field)
                groups.setdefault(repr(item[1]), []).append(item)
            for items in groups.values():
                await self._run(slot, items, loop)

    async def _run(self, slot: Slot, items: list[Any], loop: asyncio.AbstractEventLoop) -> None:
        frames = [f for item in items for f in item[0]]
        try:
            records = await loop.run_in_executor(self.executor, _predict, slot, frames, items[0][1])
        except Exception as exc:  # the model failed: each waiting request answers, and the worker goes on
            for _, _, done in items:
                if not done.done():
                    done.set_exception(exc)
            return
        slot.batches, slot.images = slot.batches + 1, slot.images + len(frames)
        start = 0
        for item_frames, _, done in items:
            if not done.done():  # a client that went away has cancelled its future
                done.set_result(records[start : start + len(item_frames)])
            start += len(item_frames)


def _predict(slot: Slot, frames: list[Frame], options: Any) -> list[PredictRecord]:
    records = list(
        run.predict(slot.weights, frames, task=slot.spec.name, options=options, loaded=slot.loaded)
    )
    if len(records) != len(frames):
        raise CnnkitError(f"{slot.name}: {len(records)} predictions for {len(frames)} images")
    return records


def create_app(
    slots: dict[str, Slot],
    *,
    token: str | None = None,
    limits: Limits = Limits(),
    max_batch: int = 16,
    max_wait_ms: float = 0.0,
    runs: str | os.PathLike[str] | None = None,
    device: str = "auto",
) -> Any:
    """The ASGI application serving ``slots`` (see the module's description); ``runs``: the folder whose
    training runs the runs page shows (and whose best weights it can load)."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import FileResponse, JSONResponse
        from fastapi.staticfiles import StaticFiles
    except ImportError:
        raise CnnkitError("cnnkit serve needs FastAPI and uvicorn: pip install 'cnnkit[serve]'") from None
    from contextlib import asynccontextmanager

    batcher = Batcher(max_batch, max_wait_ms)
    token = token or os.environ.get(TOKEN_ENV) or None

    runs_root = Path(runs).resolve() if runs is not None else None

    def runs_folder() -> Path:
        if runs_root is None:  # answered as JSON by the BadRequest handler
            raise BadRequest(404, "no runs folder: start the server with --runs DIR")
        return runs_root

    def start(slot: Slot) -> None:
        slot.queue = asyncio.Queue()
        slot.worker = asyncio.create_task(batcher.drain(slot))

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        for slot in slots.values():
            start(slot)
        yield
        for slot in slots.values():
            if slot.worker is not None:
                slot.worker.cancel()
        batcher.executor.shutdown(wait=True)

    app = FastAPI(title="cnnkit", description=__doc__, lifespan=lifespan)
    app.state.slots = slots

    def error(status: int, message: str) -> Any:
        return JSONResponse({"error": message}, status_code=status)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        page = request.url.path in ("/", "/runs") or request.url.path.startswith("/static/")  # no data
        if token is not None and not page:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return error(401, "a bearer token is required: Authorization: Bearer TOKEN")
        return await call_next(request)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest) -> Any:
        """Every route's refusal of its input: the status and one line naming the problem, as JSON."""
        return error(exc.status, exc.message)

    @app.get("/", include_in_schema=False)
    async def index() -> Any:
        """The page: choose a model, drop images, see the predictions drawn."""
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "models": {n: {"batches": s.batches, "images": s.images} for n, s in slots.items()},
            "limits": dataclasses.asdict(limits),
        }

    @app.get("/models")
    async def models() -> list[dict[str, Any]]:
        return [slot.describe() for slot in slots.values()]

    @app.get("/runs", include_in_schema=False)
    async def runs_page() -> Any:
        """The training runs under ``--runs``: curves, plots, configuration, their best weights to try."""
        return FileResponse(STATIC / "runs.html")

    @app.get("/api/runs")
    async def list_runs() -> Any:
        root = runs_folder()
        served = {str(Path(s.weights).resolve()): s.name for s in slots.values()}
        return [_describe_run(run_dir, root, served) for run_dir in _run_dirs(root)]

    @app.get("/api/runs/file/{path:path}")
    async def run_file(path: str) -> Any:
        """A file of a run (plots, results.csv, config.yaml, train.log): only inside --runs."""
        root = runs_folder()
        target = _inside(root, path)
        if target is None or target.suffix.lower() not in RUN_FILES:
            return error(404, f"no such run file: {path}")
        return FileResponse(target)

    @app.post("/api/runs/try/{path:path}")
    async def try_run(path: str) -> Any:
        """Serve a run's best weights (loaded once, named by the run's folder) and say under what name."""
        root = runs_folder()
        run_dir = _inside(root, path)
        best = None if run_dir is None else run_dir / "weights" / "best.safetensors"
        if best is None or not best.is_file():
            return error(404, f"no run with best weights at {path}")
        for slot in slots.values():
            if Path(slot.weights).resolve() == best.resolve():
                return {"model": slot.name}
        name = run_dir.relative_to(root).as_posix()  # type: ignore[union-attr]
        loaded = await asyncio.get_running_loop().run_in_executor(
            batcher.executor, lambda: load_slots([f"{name}={best}"], device)
        )
        slots.update(loaded)
        start(slots[name])
        return {"model": name}

    @app.post("/predict/{model}")
    async def predict(model: str, request: Request) -> Any:
        """Images and short videos (multipart files, or the raw body) -> the model's predictions: images'
        under ``predictions``; each video's frames (sampled at ``?fps=``, else every frame) under
        ``videos``, each frame with its index, time and predictions."""
        slot = slots.get(model)
        if slot is None:
            return error(404, f"no model {model!r}; served: {sorted(slots)}")
        params = dict(request.query_params)
        fps = parse_fps(params.pop("fps", None))
        options = query_options(slot.spec, params)
        uploads = await read_uploads(request, limits, fps)
        frames = [u for u in uploads if isinstance(u, Frame)]
        try:
            records = await batcher.submit(slot, frames, options) if frames else []
            videos = [await _predict_video(slot, v, options) for v in uploads if isinstance(v, Video)]
        except BadRequest:
            raise
        except Exception as exc:  # the model itself failed (not the input): said, and the server stays
            return error(500, f"{model} failed on this batch: {type(exc).__name__}: {exc}")
        finally:
            for upload in uploads:
                if isinstance(upload, Video):
                    upload.container.close()
        answer = {"model": model, "task": slot.spec.name, "predictions": to_json(slot, records)}
        return {**answer, "videos": videos} if videos else answer

    async def _predict_video(slot: Slot, video: Video, options: Any) -> dict[str, Any]:
        """The video's frames decoded ``max_batch`` at a time (memory bounded by one batch, not by the
        video) and queued with every other request's images."""
        from starlette.concurrency import run_in_threadpool

        stream = video.frames()
        out: list[dict[str, Any]] = []
        while chunk := await run_in_threadpool(lambda: list(itertools.islice(stream, batcher.max_batch))):
            records = await batcher.submit(slot, chunk, options)
            for frame, record in zip(chunk, records):
                time = video.times[len(out)]
                out.append({"index": frame.index, "time": time, "predictions": to_json(slot, [record])})
        return {**video.describe(), "frames": out}

    return app


RUN_FILES = {".png", ".jpg", ".jpeg", ".csv", ".yaml", ".txt", ".json", ".log"}


def _inside(root: Path, relative: str) -> Path | None:
    """``root/relative`` when it exists and is inside ``root`` once every ``..`` and symbolic link is
    resolved (no path traversal, however encoded: the router has decoded the path); else None."""
    if not relative or "\x00" in relative or Path(relative).is_absolute():
        return None
    target = (root / relative).resolve()
    return target if target.is_relative_to(root) and target.exists() else None


def _run_dirs(root: Path) -> list[Path]:
    """Folders under ``root`` holding a ``results.csv`` (a training run), at most four levels down."""
    found = [p.parent for depth in range(1, 5) for p in root.glob("/".join(["*"] * depth) + "/results.csv")]
    found += [root] if (root / "results.csv").is_file() else []
    inside = [d for d in found if d.resolve().is_relative_to(root)]  # a symbolic link out is no run of ours
    return sorted(set(inside))


def _describe_run(run_dir: Path, root: Path, served: dict[str, str]) -> dict[str, Any]:
    best = run_dir / "weights" / "best.safetensors"
    meta = read_metadata(best) if best.is_file() else {}
    relative = run_dir.relative_to(root).as_posix() if run_dir != root else "."
    return {
        "path": relative,
        "task": meta.get("task"),
        "model": meta.get("model"),
        "metrics": meta.get("metrics"),
        "files": sorted(p.name for p in run_dir.iterdir() if p.is_file() and p.suffix.lower() in RUN_FILES),
        "best": best.is_file(),
        "served_as": served.get(str(best.resolve())) if best.is_file() else None,
    }


def serve(
    weights: Sequence[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    limits: Limits = Limits(),
    max_batch: int = 16,
    max_wait_ms: float = 0.0,
    device: str = "auto",
    runs: str | os.PathLike[str] | None = None,
    backend: str | None = None,
) -> None:
    """Serve ``weights`` until interrupted (SIGINT/SIGTERM finish the requests in flight)."""
    try:
        import uvicorn
    except ImportError:
        raise CnnkitError("cnnkit serve needs FastAPI and uvicorn: pip install 'cnnkit[serve]'") from None
    slots = load_slots(weights, device, backend=backend)
    app = create_app(slots, token=token, limits=limits, max_batch=max_batch, max_wait_ms=max_wait_ms,
                     runs=runs, device=device)  # fmt: skip
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=30)
