"""Class activation maps: Grad-CAM (Selvaraju et al. 2017) and Grad-CAM++ (Chattopadhyay et al. 2018).

For a score ``y`` (a class logit, a box's class score) and the feature maps ``A`` of a layer:

* Grad-CAM: ``w_k = mean_ij dy/dA_kij``, ``cam = ReLU(sum_k w_k A_k)``;
* Grad-CAM++: ``w_k = sum_ij a_kij ReLU(dy/dA_kij)`` with ``a = g^2 / (2 g^2 + sum_ij A_k * g^3)``, the
  closed form for an exponential score used by the paper and by the ``grad-cam`` package.

A layer that returns several maps (a detector's neck: one per scale) gives one map per scale, each
upsampled to the input and summed (a box's score depends on its own scale's features only). Each map is
placed on the input where its cells look (measured, see :meth:`CAM._centres`) and scaled to ``[0, 1]``
per image. The default layer is the deepest block whose maps keep at least 6 cells
on their short side (or the finest the model has): Grad-CAM's "last convolutional layer", kept fine
enough to say where at the small input sizes cnnkit trains at.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

Method = Literal["gradcam", "gradcam++"]
METHODS: tuple[Method, ...] = ("gradcam", "gradcam++")


def feature_maps(output: Any) -> list[torch.Tensor]:
    """The 4-D tensors a module returned (one, or a list/tuple of them)."""
    items = output if isinstance(output, list | tuple) else [output]
    return [t for t in items if isinstance(t, torch.Tensor) and t.ndim == 4]


def default_layer(model: nn.Module, example: torch.Tensor, min_cells: int = 6) -> str:
    """The name of the layer :class:`CAM` explains by default (see the module's note): a detector's
    ``neck`` when it has one, else the deepest block (a module with children) in forward order whose
    output's short side has at least ``min_cells`` cells, or the finest one when none has."""
    if isinstance(getattr(model, "neck", None), nn.Module):
        return "neck"
    seen: list[tuple[str, int]] = []
    last: list[Any] = [None]  # the tensor recorded last
    hooks = []
    for name, module in model.named_modules():
        if name and any(True for _ in module.children()):

            def hook(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
                maps = feature_maps(out)
                if len(maps) == 1 and min(maps[0].shape[-2:]) >= 2 and maps[0] is not last[0]:
                    seen.append((name, min(maps[0].shape[-2:])))  # a container passing it on: its child's
                    last[0] = maps[0]

            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(example[:1])
    finally:
        for h in hooks:
            h.remove()
    if not seen:
        raise ValueError("the model has no block with a spatial feature map to explain")
    fine = [name for name, cells in seen if cells >= min_cells]
    return fine[-1] if fine else max(seen, key=lambda s: s[1])[0]


class CAM:
    """Class activation maps of ``model`` at ``layer`` (a module name; default :func:`default_layer`).

    ``cam(images, score)`` -> ``[B, H, W]`` maps in ``[0, 1]`` at the input's size, where ``score``
    turns the model's outputs into the ``[B]`` scores to explain. ``raw=True`` gives the maps at the
    layer's own resolution, before upsampling and scaling (as other implementations return them).
    """

    def __init__(self, model: nn.Module, layer: str | None = None, method: Method = "gradcam") -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.model, self.layer, self.method = model, layer, method
        self._geometry: dict[tuple[int, int], list[tuple[float, float, float, float]]] = {}

    def __call__(
        self,
        images: torch.Tensor,
        score: Callable[[Any], torch.Tensor],
        *,
        raw: bool = False,
    ) -> torch.Tensor | list[torch.Tensor]:
        model = self.model.eval()
        name = self.layer or default_layer(model, images)
        module = dict(model.named_modules()).get(name)
        if module is None:
            raise ValueError(f"the model has no layer {name!r}")
        captured: list[torch.Tensor] = []
        handle = module.register_forward_hook(lambda _m, _i, out: captured.extend(feature_maps(out)))
        try:
            with torch.enable_grad():
                outputs = model(images.detach().requires_grad_(True))
                scores = score(outputs)
                grads = torch.autograd.grad(scores.sum(), captured, allow_unused=True)
        finally:
            handle.remove()
        maps = [
            self._map(a.detach().float(), torch.zeros_like(a) if g is None else g.float())
            for a, g in zip(captured, grads)
        ]
        if raw:
            return maps
        size = (int(images.shape[-2]), int(images.shape[-1]))
        centres = self._centres(images, module)
        total = sum(to_pixels(m, size, *c) for m, c in zip(maps, centres))
        assert isinstance(total, torch.Tensor)
        low = total.flatten(1).min(1).values.view(-1, 1, 1)
        high = total.flatten(1).max(1).values.view(-1, 1, 1)
        return (total - low) / (high - low).clamp(min=1e-12)

    def _centres(self, images: torch.Tensor, module: nn.Module) -> list[tuple[float, float, float, float]]:
        """Where each map's cells sit in the input: ``(start_y, step_y, start_x, step_x)`` pixels. Cells are
        not centred where plain interpolation puts them: with the usual padding, cell ``i`` of a stride-``s``
        map looks around pixel ``s * i``, not ``s * i + (s - 1) / 2`` (15.5 px off at stride 32), which moves
        every heat map off its object. Measured once per layer: on a probe image large enough for the
        middle cell's field to stay inside it, the centroid of that cell's input gradient is its centre."""
        key = (id(module), images.shape[1])
        if key not in self._geometry:
            size = 64 * math.ceil(max(256, *images.shape[-2:]) / 64)  # a multiple of any stride up to 64
            probe = torch.randn(1, images.shape[1], size, size, generator=torch.Generator().manual_seed(0))
            probe = probe.to(images.device).requires_grad_(True)
            captured: list[torch.Tensor] = []
            handle = module.register_forward_hook(lambda _m, _i, out: captured.extend(feature_maps(out)))
            try:
                with torch.enable_grad():
                    self.model(probe)
            finally:
                handle.remove()
            coords = torch.arange(size, dtype=torch.float64, device=images.device)
            found = []
            for a in captured:
                h, w = a.shape[-2:]
                i, j = h // 2, w // 2
                (grad,) = torch.autograd.grad(a[0, :, i, j].sum(), probe, retain_graph=True)
                weight = grad[0].abs().sum(0).double()
                total = weight.sum().clamp(min=1e-30)
                cy, cx = (
                    float((weight.sum(1) * coords).sum() / total),
                    float((weight.sum(0) * coords).sum() / total),
                )
                step_y, step_x = size / h, size / w
                found.append((cy - i * step_y, step_y, cx - j * step_x, step_x))
            self._geometry[key] = found
        return self._geometry[key]

    def _map(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if self.method == "gradcam":
            weights = g.mean((2, 3), keepdim=True)
        else:
            g2, g3 = g.pow(2), g.pow(3)
            denom = 2 * g2 + a.sum((2, 3), keepdim=True) * g3
            alpha = torch.where(g != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), 0.0)
            weights = (alpha * F.relu(g)).sum((2, 3), keepdim=True)
        return F.relu((weights * a).sum(1))


def to_pixels(
    cam: torch.Tensor, size: tuple[int, int], start_y: float, step_y: float, start_x: float, step_x: float
) -> torch.Tensor:
    """``cam [B, h, w]`` sampled bilinearly at every input pixel, cell ``(i, j)`` sitting at pixel
    ``(start_y + i * step_y, start_x + j * step_x)``; beyond the outer cells the border values hold."""
    h, w = cam.shape[-2:]
    ys = (torch.arange(size[0], dtype=torch.float32) - start_y) / step_y
    xs = (torch.arange(size[1], dtype=torch.float32) - start_x) / step_x
    gy = ys / max(h - 1, 1) * 2 - 1 if h > 1 else torch.zeros_like(ys)
    gx = xs / max(w - 1, 1) * 2 - 1 if w > 1 else torch.zeros_like(xs)
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1).to(cam.device)  # [H, W, 2] as (x, y)
    grid = grid[None].expand(cam.shape[0], -1, -1, -1)
    return F.grid_sample(cam[:, None], grid, mode="bilinear", padding_mode="border", align_corners=True)[:, 0]


def overlay(image: torch.Tensor, heat: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """``heat [H, W]`` in ``[0, 1]`` drawn over ``image [3, H, W] uint8`` with matplotlib's ``jet``."""
    from matplotlib import colormaps

    colours = torch.from_numpy(colormaps["jet"](heat.cpu().numpy())[..., :3]).permute(2, 0, 1).float() * 255
    return ((1 - alpha) * image.float() + alpha * colours).round().clamp(0, 255).to(torch.uint8)
