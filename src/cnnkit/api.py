"""The public model API: create, load and save models (implemented in :mod:`cnnkit.registry` and
:mod:`cnnkit.weights`, which the model families use too)."""

from __future__ import annotations

from cnnkit.registry import create_model, import_keras, list_models, load_model
from cnnkit.weights import LoadReport, load_weights, save_weights

__all__ = [
    "LoadReport",
    "create_model",
    "import_keras",
    "list_models",
    "load_model",
    "load_weights",
    "save_weights",
]
