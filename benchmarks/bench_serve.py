"""``cnnkit serve`` under load: requests per second and p50/p99 latency at 1, 8 and 32 concurrent clients
(loopback), against a naive endpoint in the same framework that runs the model once per request.

Goal: >= 2x the naive throughput at 32 clients, with p99 no worse than 2x the single-client latency.
"""

import argparse
import io
import statistics
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import cnnkit
from benchmarks.harness import header
from cnnkit.serve import _predict, create_app, load_slots, to_json
from cnnkit.serve.uploads import Limits, decode


def _naive_app(slots: dict[str, Any]) -> Any:
    """The same decoding and model, one model run per request, in FastAPI's thread pool."""
    from fastapi import FastAPI, Request

    app = FastAPI()

    @app.post("/predict/{model}")
    async def predict(model: str, request: Request) -> Any:
        from starlette.concurrency import run_in_threadpool

        slot = slots[model]
        frame = decode(await request.body(), "image0", Limits())
        records = await run_in_threadpool(_predict, slot, [frame], None)
        return {"model": model, "predictions": to_json(slot, records)}

    return app


class _Server:
    def __init__(self, app: Any) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def _post(url: str, body: bytes) -> float:
    request = urllib.request.Request(url, data=body, method="POST")
    request.add_header("Content-Type", "image/png")
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        response.read()
    return time.perf_counter() - start


def _load(url: str, body: bytes, clients: int, requests: int, seconds: float) -> tuple[float, float, float]:
    """``(requests/s, p50 s, p99 s)`` of ``clients`` concurrent clients, bounded in count and time."""
    stop = time.perf_counter() + seconds
    latencies: list[float] = []

    def client(_: int) -> None:
        while time.perf_counter() < stop and len(latencies) < requests:
            latencies.append(_post(url, body))

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    ordered = sorted(latencies)
    return len(ordered) / wall, statistics.median(ordered), ordered[int(0.99 * (len(ordered) - 1))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--imgsz", type=int, default=96)
    parser.add_argument("--requests", type=int, default=200, help="per concurrency level, at most")
    parser.add_argument("--seconds", type=float, default=10.0, help="per concurrency level, at most")
    args = parser.parse_args(argv)
    print(header("a naive endpoint (one model run per request, same FastAPI app shape)", model=args.model,
                 input=f"{args.imgsz}x{args.imgsz}"))  # fmt: skip
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        model = cnnkit.create_model(args.model, num_classes=10)
        names = [str(i) for i in range(10)]
        cnnkit.save_weights(model, path, {"task": "classify", "class_names": names, "imgsz": args.imgsz})
        buf = io.BytesIO()
        pixels = (np.random.default_rng(0).random((args.imgsz, args.imgsz, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(buf, "PNG")
        body = buf.getvalue()
        batched = _Server(create_app(load_slots([f"m={path}"]), max_batch=32))
        naive = _Server(_naive_app(load_slots([f"m={path}"])))
        try:
            for server in (batched, naive):  # warm both
                _load(server.url + "/predict/m", body, 2, 8, 10)
            single = None
            for clients in (1, 8, 32):
                ours = _load(batched.url + "/predict/m", body, clients, args.requests, args.seconds)
                peer = _load(naive.url + "/predict/m", body, clients, args.requests, args.seconds)
                single = single or ours[1]
                print(
                    f"{clients:>2} clients  batched {ours[0]:7.1f} req/s p50 {ours[1] * 1e3:7.1f} ms "
                    f"p99 {ours[2] * 1e3:7.1f} ms | naive {peer[0]:7.1f} req/s p50 {peer[1] * 1e3:7.1f} ms "
                    f"p99 {peer[2] * 1e3:7.1f} ms | throughput ratio {ours[0] / peer[0]:.2f}x"
                    + (f"; p99 / single-client p50 {ours[2] / single:.2f}x" if clients == 32 else ""),
                    flush=True,
                )
        finally:
            batched.stop()
            naive.stop()


if __name__ == "__main__":
    main()
