"""cnnkit: convolutional networks on PyTorch, from convolution arithmetic to trained, exported models."""

from cnnkit.api import LoadReport, create_model, list_models, load_model, load_weights, save_weights
from cnnkit.errors import CnnkitError, DataError, WeightsError

__version__ = "0.1.0"

__all__ = [
    "CnnkitError",
    "DataError",
    "LoadReport",
    "WeightsError",
    "__version__",
    "create_model",
    "list_models",
    "load_model",
    "load_weights",
    "save_weights",
]
