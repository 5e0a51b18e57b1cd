"""The model registry: named builders, looked up by exact name or glob pattern."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from cnnkit.errors import CnnkitError

ModelBuilder = Callable[..., nn.Module]
F = TypeVar("F", bound=ModelBuilder)

_MODELS: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[F], F]:
    """Decorator that registers a builder under ``name``; a name can be registered only once."""

    def decorator(builder: F) -> F:
        if name in _MODELS:
            raise CnnkitError(f"model name {name!r} is already registered (by {_MODELS[name].__module__})")
        _MODELS[name] = builder
        return builder

    return decorator


def _ensure_zoo_loaded() -> None:
    # Importing the package registers every family; kept lazy so `registry` has no import cycle.
    import cnnkit.models  # noqa: F401


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered models, optionally filtered by a glob such as ``"efficientnet*"``."""
    _ensure_zoo_loaded()
    names = sorted(_MODELS)
    if pattern is not None:
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    return names


def get_builder(name: str) -> ModelBuilder:
    """The builder registered as ``name``; an unknown name errors with the closest names."""
    _ensure_zoo_loaded()
    try:
        return _MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_MODELS), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `cnnkit.list_models()`"
        raise CnnkitError(f"unknown model {name!r}{hint}") from None


def build(name: str, **kwargs: Any) -> nn.Module:
    """Call the builder registered as ``name``."""
    return get_builder(name)(**kwargs)
