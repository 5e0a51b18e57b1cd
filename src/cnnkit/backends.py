"""Inference backends: the same model run by PyTorch (eager or ``torch.compile``), ONNX Runtime, OpenVINO
or TensorRT (through ONNX Runtime's provider), in fp32/bf16 or int8, behind one call.

:func:`prepare_backend` returns a :class:`~cnnkit.inference.FastModel` whatever the backend, so every
predict, val and serve path runs them alike. A runtime that is not PyTorch gets the model as an ONNX graph
with BatchNorm folded and any batch and image size, exported once and cached under ``$CNNKIT_CACHE``
(``~/.cache/cnnkit``)``/backends``; the wrapper around it answers the task's questions about the model
(a detector's anchors and strides) from the PyTorch model it came from.

``auto`` times every installed backend on the model at the input it will see, keeps those whose outputs
agree with PyTorch fp32 (:data:`TOLERANCE`: a relative error; reduced precision is allowed what bf16
costs) and takes the fastest; the choice and why are cached per model, input and machine.
``compile`` is never chosen by ``auto``: it compiles again in every process (tens of seconds).
int8 backends quantize the graph statically (ONNX Runtime's quantizer: per-channel int8 weights, uint8
activations calibrated on images given with ``calib``).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cnnkit.engine.device import amp_dtype
from cnnkit.errors import CnnkitError
from cnnkit.export import quiet_exporter
from cnnkit.inference import FastModel, OnnxModel, fold_batchnorm, prepare
from cnnkit.io import atomic_path

log = logging.getLogger("cnnkit")

BACKENDS = ("eager", "eager-fp32", "compile", "onnxruntime", "openvino", "tensorrt", "onnxruntime-int8",
            "openvino-int8")  # fmt: skip
CHOICES = ("auto", *BACKENDS)
#: the largest relative error (:func:`difference`) from PyTorch fp32 a backend may show, by its precision
TOLERANCE = {"fp32": 1e-4, "reduced": 5e-2, "int8": 0.15}  # bf16: 8 mantissa bits, a few % deep
_INSTALL = {
    "onnxruntime": "pip install 'cnnkit[export]'",
    "openvino": "pip install 'cnnkit[openvino]'",
    "tensorrt": "pip install onnxruntime-gpu tensorrt (a CUDA machine)",
}


def default_backend() -> str:
    """``$CNNKIT_BACKEND`` or ``eager`` (the fast PyTorch path: ``auto``'s first run on a model costs an
    export and a timing, worth it for serving and long evaluations)."""
    name = os.environ.get("CNNKIT_BACKEND", "eager")
    if name not in CHOICES:
        raise CnnkitError(f"CNNKIT_BACKEND={name}: not a backend; choose from {', '.join(CHOICES)}")
    return name


@dataclass
class Choice:
    """What ``auto`` chose and why: milliseconds per call and difference from fp32 of every candidate."""

    backend: str
    why: str
    ms: dict[str, float] = field(default_factory=dict)
    diff: dict[str, float] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)


class RuntimeModel(nn.Module):
    """A non-PyTorch runtime where a cnnkit model is expected: ``forward`` feeds it fp32 and returns its
    outputs as CPU tensors (a list when there are several, as the model's own forward); other attributes
    (a detector's ``anchors``, ``strides``) are the source model's."""

    def __init__(self, source: nn.Module, run: Callable[[np.ndarray], list[np.ndarray]], name: str) -> None:
        super().__init__()
        self.source, self.run, self.name = source, run, name

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        got = self.run(x.detach().float().contiguous().cpu().numpy())
        outputs = [torch.from_numpy(np.asarray(o)) for o in got]
        return outputs[0] if len(outputs) == 1 else outputs

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("source"), name)


# -- the ONNX graph ----------------------------------------------------------------------------------------
def cache_root() -> Path:
    return Path(os.environ.get("CNNKIT_CACHE") or Path.home() / ".cache" / "cnnkit") / "backends"


def model_digest(model: nn.Module) -> str:
    """A digest of what the model's exported graph depends on: each module's class and plain settings
    (strides, a test-time augmentation's scales...), and every parameter and buffer."""
    h = hashlib.sha256()
    for name, module in model.named_modules():
        settings = {k: v for k, v in vars(module).items() if not k.startswith("_") and _plain(v)}
        h.update(f"{name} {type(module).__qualname__} {sorted(settings.items())}".encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def _plain(value: Any) -> bool:
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, bool | int | float | str)


def onnx_graph(model: nn.Module, example: torch.Tensor, digest: str | None = None) -> Path:
    """The model (BatchNorm folded) as an ONNX graph taking any batch and image size, exported once per
    model (cached by :func:`model_digest`)."""
    require("onnxruntime")
    path = cache_root() / f"{digest or model_digest(model)}.onnx"
    if path.is_file():
        return path
    folded, _ = fold_batchnorm(model)
    dim = torch.export.Dim.DYNAMIC
    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet_exporter(), torch.no_grad():
        try:
            program = torch.onnx.export(folded.eval().cpu(), (example[:1].cpu().float(),), dynamo=True,
                                        input_names=["images"], dynamic_shapes=({0: dim, 2: dim, 3: dim},),
                                        verbose=False)  # fmt: skip
        except Exception as exc:  # an architecture the exporter cannot handle
            raise CnnkitError(f"the ONNX export failed ({str(exc).splitlines()[0]})") from None
        assert program is not None
        with atomic_path(path) as tmp:
            program.save(str(tmp), external_data=False)
    return path


def require(runtime: str) -> Any:
    """The runtime's Python package, or an error saying what to install."""
    module = {"onnxruntime": "onnxruntime", "openvino": "openvino", "tensorrt": "onnxruntime"}[runtime]
    try:
        return __import__(module)
    except ImportError:
        raise CnnkitError(f"--backend {runtime} needs {module}: {_INSTALL[runtime]}") from None


def installed(runtime: str) -> bool:
    try:
        require(runtime)
    except CnnkitError:
        return False
    if runtime == "tensorrt":
        return "TensorrtExecutionProvider" in require("onnxruntime").get_available_providers()
    return True


# -- int8 --------------------------------------------------------------------------------------------------
def quantized_graph(graph: Path, calib: Sequence[torch.Tensor]) -> Path:
    """``graph`` quantized to int8 (:func:`quantize_onnx`), cached by graph and calibration data."""
    if not calib:
        raise CnnkitError("int8 needs calibration images: give --calib DATA (a few hundred training images)")
    h = hashlib.sha256(graph.name.encode())
    for t in calib:
        h.update(t.float().numpy().tobytes())
    path = graph.with_name(f"{graph.stem}-int8-{h.hexdigest()[:16]}.onnx")
    if not path.is_file():
        quantize_onnx(graph, path, calib)
    return path


def quantize_onnx(source: Path, out: Path, calib: Sequence[torch.Tensor]) -> None:
    """Static int8 quantization of an ONNX graph with ONNX Runtime's quantizer (QDQ: per-channel int8
    weights, uint8 activations whose ranges are calibrated on the batches ``calib``, min-max; the layers
    producing the outputs stay fp32, :func:`output_layers`); the graph's metadata (cnnkit's task,
    classes, normalisation) is kept."""
    require("onnxruntime")
    import onnx
    from onnxruntime import quantization as q

    class Reader(q.CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.batches = iter(calib)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch.float().numpy()}

    with atomic_path(out) as tmp:
        prepared = tmp.with_name(tmp.stem + "-pre.onnx")
        try:
            with quiet_exporter():
                q.quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
                q.quantize_static(str(prepared), str(tmp), Reader(), quant_format=q.QuantFormat.QDQ,
                                  per_channel=True, activation_type=q.QuantType.QUInt8,
                                  weight_type=q.QuantType.QInt8,
                                  nodes_to_exclude=output_layers(onnx.load(str(prepared))),
                                  calibrate_method=q.CalibrationMethod.MinMax)  # fmt: skip
        finally:
            prepared.unlink(missing_ok=True)
        props = {p.key: p.value for p in onnx.load(str(source), load_external_data=False).metadata_props}
        if props:
            graph = onnx.load(str(tmp))
            onnx.helper.set_model_props(graph, props)
            onnx.save(graph, str(tmp))


_COMPUTE = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def output_layers(graph: Any) -> list[str]:
    """The names of the nodes from the last layers (convolutions, linear layers) to the graph's outputs,
    those layers included: int8 leaves them in fp32. Measured on the demo's localizer: quantizing the
    sigmoid and scaling after its last linear layer alone cost 5.8 points of box IoU (coordinates
    rounded to 8 bits); the heads are a small share of the work."""
    producer = {out: node for node in graph.graph.node for out in node.output}
    found: list[str] = []
    todo = [o.name for o in graph.graph.output]
    while todo:
        node = producer.get(todo.pop())
        if node is None or node.name in found:
            continue
        found.append(node.name)
        if node.op_type not in _COMPUTE:
            todo.extend(node.input)
    return found


# -- building each backend ---------------------------------------------------------------------------------
def _onnxruntime(graph: Path, device: torch.device, provider: str = "") -> Callable[[np.ndarray], Any]:
    ort = require("tensorrt" if provider == "TensorrtExecutionProvider" else "onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    # ONNX Runtime's threads spin for a while after each run by default: measured here, an OpenVINO run
    # right after one took 40 ms instead of 24 (resnet50), and so would the image decoding between batches
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    if provider:
        providers.insert(0, provider)
    session = ort.InferenceSession(str(graph), opts, providers=providers)
    return lambda x: session.run(None, {"images": x})


@functools.cache
def _openvino_core() -> Any:
    return require("openvino").Core()  # one per process, as OpenVINO advises: its models share threads


def _openvino(graph: Path) -> Callable[[np.ndarray], Any]:
    compiled = _openvino_core().compile_model(str(graph), "CPU")  # its defaults: bf16 where the CPU has it
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> list[np.ndarray]:
        request.infer({0: x}, share_inputs=True)  # read in place: no copy of the batch
        return [request.get_output_tensor(i).data.copy() for i in range(len(compiled.outputs))]

    return run


def build(model: nn.Module, device: torch.device, backend: str, example: torch.Tensor,
          calib: Sequence[torch.Tensor] = (), digest: str | None = None) -> FastModel:  # fmt: skip
    """``model`` run by ``backend`` (not ``auto``) on ``device``."""
    if backend not in BACKENDS:
        raise CnnkitError(f"--backend {backend}: choose from {', '.join(CHOICES)}")
    if backend == "eager":
        return prepare(model, device, True)
    if backend == "eager-fp32":
        return prepare(model, device, True, reduced=False)
    if backend == "compile":
        fast = prepare(model, device, True)
        fast.model = torch.compile(fast.model)  # type: ignore[assignment]
        return fast
    runtime = backend.removesuffix("-int8")
    if runtime == "tensorrt" and not installed("tensorrt"):
        raise CnnkitError(f"--backend tensorrt needs ONNX Runtime with TensorRT: {_INSTALL['tensorrt']}")
    require(runtime)
    graph = onnx_graph(model, example, digest)
    if backend.endswith("-int8"):
        graph = quantized_graph(graph, calib)
    if runtime == "openvino":
        run = _openvino(graph)
    else:
        run = _onnxruntime(graph, device, "TensorrtExecutionProvider" if runtime == "tensorrt" else "")
    source = copy.deepcopy(model).eval().cpu()  # what the task asks of the model (anchors) on the CPU
    return FastModel(RuntimeModel(source, run, backend).eval(), torch.device("cpu"), None, False)


# -- auto --------------------------------------------------------------------------------------------------
def _machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]  # fmt: skip
        cpu = names[0] if names else cpu
    except OSError:
        pass
    if device.type == "cuda":
        cpu += " / " + torch.cuda.get_device_name(device)
    versions = [f"torch {torch.__version__}", f"{torch.get_num_threads()} threads"]
    for runtime in ("onnxruntime", "openvino"):
        if installed(runtime):
            versions.append(f"{runtime} {require(runtime).__version__}")
    return f"{cpu}; {', '.join(versions)}"


def outputs_of(y: Any) -> list[torch.Tensor]:
    """A model's output(s) as a list of float CPU tensors."""
    return [t.detach().float().cpu() for t in (y if isinstance(y, list | tuple) else [y])]


def difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The relative error of outputs ``a`` against ``b``: ``||a - b|| / ||b||`` (the largest over outputs)."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    return max(float((x - y).norm() / y.norm().clamp_min(1e-12)) for x, y in zip(a, b))


def time_ms(run: FastModel, x: torch.Tensor, budget: float = 0.5) -> float:
    """Median milliseconds per call: two warm-up calls, then at least 3 and up to ``budget`` seconds
    (after a pause: another runtime's threads may still be spinning)."""
    time.sleep(0.1)
    run(x)
    run(x)
    times: list[float] = []
    spent = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - spent < budget and len(times) < 30):
        t = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def precision(backend: str, device: torch.device) -> str:
    if backend.endswith("-int8"):
        return "int8"
    if backend == "openvino" or (backend in ("eager", "compile") and amp_dtype("auto", device) is not None):
        return "reduced"  # OpenVINO's CPU default is bf16 where the CPU has it
    return "fp32"


def choose(
    model: nn.Module, device: torch.device, example: torch.Tensor, calib: Sequence[torch.Tensor] = ()
) -> tuple[FastModel, Choice]:
    """The fastest installed backend whose outputs agree with PyTorch fp32 on ``example`` (the shape the
    model will be run at), timed now or taken from the cache of earlier choices."""
    digest = model_digest(model)
    key = f"{digest} {tuple(example.shape)} {_machine(device)} calib={bool(calib)}"
    cache = cache_root() / "choices.json"
    known = _read_json(cache)
    if key in known:
        choice = Choice(**known[key])
        log.info("backend %s (chosen earlier: %s)", choice.backend, choice.why)
        return build(model, device, choice.backend, example, calib, digest), choice
    with torch.inference_mode():
        reference = outputs_of(model.eval().to(device)(example.to(device)))
    candidates = ["eager", "eager-fp32", "onnxruntime", "openvino", "tensorrt"]
    if calib:
        candidates += ["onnxruntime-int8", "openvino-int8"]
    choice = Choice("eager-fp32", "")
    built: dict[str, FastModel] = {}
    for name in candidates:
        if name.removesuffix("-int8") in _INSTALL and not installed(name.removesuffix("-int8")):
            choice.left_out[name] = "not installed"
            continue
        try:
            run = build(model, device, name, example, calib, digest)
            choice.diff[name] = difference(outputs_of(run(example)), reference)
        except CnnkitError as exc:
            choice.left_out[name] = str(exc)
            continue
        allowed = TOLERANCE[precision(name, device)]
        if choice.diff[name] > allowed:
            choice.left_out[name] = f"differs from fp32 by {choice.diff[name]:.1e} (> {allowed:.0e})"
            continue
        choice.ms[name] = time_ms(run, example)
        built[name] = run
    best = min(choice.ms, key=choice.ms.__getitem__)
    ranked = ", ".join(f"{n} {ms:.2f} ms" for n, ms in sorted(choice.ms.items(), key=lambda kv: kv[1]))
    choice.backend = best
    choice.why = f"fastest at input {list(example.shape)} of those agreeing with fp32: {ranked}"
    if choice.left_out:
        choice.why += "; left out: " + "; ".join(f"{n} ({r})" for n, r in choice.left_out.items())
    known[key] = asdict(choice)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache) as tmp:
        tmp.write_text(json.dumps(known, indent=1) + "\n")
    log.info("backend %s: %s", best, choice.why)
    return built[best], choice


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def prepare_backend(model: nn.Module, device: torch.device, backend: str, example: torch.Tensor, *,
                    fast: bool = True, calib: Sequence[torch.Tensor] = ()) -> FastModel:  # fmt: skip
    """``model`` ready to run by ``backend`` (``auto``: :func:`choose`); ``fast=False`` is PyTorch fp32
    as the model is (no folding), whatever the backend; an exported ONNX file runs on ONNX Runtime."""
    if isinstance(model, OnnxModel) or not fast:
        return prepare(model, device, fast)
    if example.numel() == 0:  # nothing to export or time on (an empty validation set)
        backend = "eager"
    if backend == "auto":
        return choose(model, device, example, calib)[0]
    return build(model, device, backend, example, calib)
