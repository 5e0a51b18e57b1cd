"""Task specs: one class per task, registered by name, whose ``Options`` dataclass is the only place its
defaults live. Command-line flags (types, choices, help, aliases) and YAML keys are generated from it,
and one CLI loop serves every registered task (see :mod:`cnnkit.cli_tasks`).

Adding a task = a :class:`TaskSpec` subclass decorated with :func:`register_task` (plus its data reader
if it is new, and a test): nothing else.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import pkgutil
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from torch import nn

from cnnkit.engine.callbacks import Callback
from cnnkit.engine.config import TrainConfig, unwrap_optional
from cnnkit.engine.trainer import FitResult, fit
from cnnkit.errors import CnnkitError
from cnnkit.tasks.base import Task

T = TypeVar("T")


def option(
    default: Any,
    help: str,
    *,
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    nargs: str | None = None,
) -> Any:
    """A field of a task's ``Options``: its default, its help, and a parser (with ``nargs``) for values that
    are not plain ``int``/``float``/``str``/tuples/JSON objects."""
    meta = {"help": help, "parse": parse, "metavar": metavar, "nargs": nargs}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(
            f"not valid JSON ({exc.msg} at column {exc.colno}): {text!r}"
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"width\": 0.5}}', got {text!r}")
    return value


@dataclass(frozen=True)
class ValReport:
    """What ``val`` found: the metrics, one row per class, and any task-specific extras (JSON-able)."""

    metrics: dict[str, float]
    per_class: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)
    out: Path | None = None  # the folder its files were written to (``val --out``)

    def to_json(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "per_class": self.per_class, **self.extra}


@dataclass(frozen=True)
class PredictRecord:
    """One prediction as JSON (``data``), as a line of text (``text``), and what JSON does not hold
    (``arrays``: segmentation's ``mask``)."""

    data: dict[str, Any]
    text: str
    arrays: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskData:
    """What a spec reads for a run: the two datasets, the class names, the samples left out (path, reason),
    the facts derived from the data that the run record keeps (a palette, flip pairs...), the batch
    collate function, and the reader's own result (``source``: detection fits its anchors to it)."""

    train: Any
    val: Any
    names: list[str] | None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)
    collate_fn: Callable[..., Any] | None = None
    source: Any = None


@dataclass
class Labelled:
    """One sample as ``cnnkit data check`` sees it: its image and its labels in the image's pixels."""

    path: Path
    classes: list[int] = field(default_factory=list)  # class of each object (classification: its label)
    boxes: Any = None  # [n, 4] xyxy (detection, localization)
    mask: Path | None = None  # segmentation: the mask file
    points: Any = None  # [K, 2] (landmarks)
    visible: Any = None  # [K] bool


class TaskSpec:
    """What makes a task a task. Subclasses set the class attributes and implement :meth:`build_data`,
    :meth:`build_model`, :meth:`objective` and :meth:`predict`; the generic ``train / resume / val`` of
    :mod:`cnnkit.workflows.run` do the rest."""

    name: ClassVar[str]
    help: ClassVar[str]
    data_help: ClassVar[str]
    Options: ClassVar[type]
    #: dataclasses of the val/predict options beyond the common ones (thresholds, top-k...), if any
    ValOptions: ClassVar[type | None] = None
    PredictOptions: ClassVar[type | None] = None
    val_batch: ClassVar[int] = 32

    def build_data(self, opts: Any, cfg: TrainConfig, names: Sequence[str] | None = None) -> TaskData:
        """Read ``opts.data``; ``names``: the classes of the run being resumed or evaluated."""
        raise NotImplementedError

    def build_model(self, opts: Any, data: TaskData, cfg: TrainConfig) -> nn.Module:
        raise NotImplementedError

    def objective(
        self, opts: Any, data: TaskData, model: nn.Module, cfg: TrainConfig, val_options: Any = None
    ) -> Task:
        """The loss and evaluator; ``val_options`` is a ``ValOptions`` instance when evaluating."""
        raise NotImplementedError

    def fit(
        self,
        task: Task,
        model: nn.Module,
        data: TaskData,
        cfg: TrainConfig,
        run_dir: Path,
        metadata: dict[str, Any],
        *,
        opts: Any,
        resume: Path | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> FitResult:
        """Train (one stage; a spec with stages, like classification's fine-tuning, overrides this)."""
        return fit(
            task,
            model,
            data.train,
            data.val,
            cfg,
            run_dir,
            resume=resume,
            metadata=metadata,
            collate_fn=data.collate_fn,
            callbacks=callbacks,
        )

    def val_data(self, opts: Any, cfg: TrainConfig, names: Sequence[str] | None, given: bool) -> TaskData:
        """The data ``val`` evaluates on (``.val``); ``given``: ``opts.data`` is the user's, not the run's.
        By default the validation split of ``opts.data`` (the training's by the same seed)."""
        return self.build_data(opts, cfg, names)

    def val_report(self, evaluator: Any, names: Sequence[str] | None) -> ValReport:
        """Per-class rows and extras of a validation (the metrics are filled in by ``val``)."""
        return ValReport({}, [])

    def predict(
        self, weights: str, sources: Sequence[str], *, out: str | None, options: Any = None, **kwargs: Any
    ) -> Iterator[PredictRecord]:
        """Predict on images; ``options`` is a ``PredictOptions`` instance (None: its defaults)."""
        raise NotImplementedError

    def shard_data(self, opts: Any, cfg: TrainConfig, shards: Any) -> TaskData:
        """:meth:`build_data` from WebDataset shards (a :class:`cnnkit.workflows.shards.Shards`): the
        task's datasets as streams (``shards.stream(split, build)``), names and record from the manifest."""
        raise CnnkitError(f"{self.name} cannot read shards yet")

    def shard_facts(self, data: TaskData) -> dict[str, Any]:
        """What packing keeps beside names and record for :meth:`shard_data` (detection: box sizes)."""
        return {}

    def labelled(self, dataset: Any) -> list[Labelled]:
        """The samples of one of :meth:`build_data`'s datasets, as ``data check`` reports and draws them."""
        raise NotImplementedError

    def predictions_json(self, records: list[PredictRecord]) -> Any:
        """What ``predict --json`` prints: the list of per-image records (detection: COCO results)."""
        return [r.data for r in records]


_TASKS: dict[str, TaskSpec] = {}
S = TypeVar("S", bound=type[TaskSpec])


def register_task(name: str) -> Callable[[S], S]:
    """Class decorator: register a :class:`TaskSpec` under ``name`` (once)."""

    def decorator(cls: S) -> S:
        if name in _TASKS:
            raise CnnkitError(f"task {name!r} is already registered")
        cls.name = name
        _TASKS[name] = cls()
        return cls

    return decorator


def get_task(name: str) -> TaskSpec:
    _load_builtin_tasks()
    try:
        return _TASKS[name]
    except KeyError:
        raise CnnkitError(f"unknown task {name!r}; tasks: {', '.join(_TASKS)}") from None


def list_tasks() -> list[str]:
    _load_builtin_tasks()
    return list(_TASKS)


#: modules of this package that are not task specs; every other module is one and registers its task
_NOT_SPECS = {"spec", "run", "common", "record", "check", "explain", "predictor"}


def _load_builtin_tasks() -> None:
    """Import every spec file of this package (each registers its task): adding a task is adding a file."""
    import cnnkit.workflows

    for module in pkgutil.iter_modules(cnnkit.workflows.__path__):
        if module.name not in _NOT_SPECS and not module.name.startswith("_"):
            importlib.import_module(f"cnnkit.workflows.{module.name}")


# -- dataclass <-> argparse / YAML -------------------------------------------------------------------
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_arguments(group: Any, cls: type) -> None:
    """One flag per field of dataclass ``cls`` that has help text (the others are YAML keys only); every
    flag defaults to ``None`` (= keep the field's default), which the help shows."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta:
            continue
        tp = unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
        shown = "" if default is None or default == () else f" (default {_show(default)})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": f"{meta.get('help', '')}{shown}"}
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if meta.get("parse") is not None:
            kwargs["type"] = meta["parse"]
        elif tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            kwargs["choices"] = list(args)
        elif origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            kwargs.update(type=args[0], nargs="+")
        elif origin is tuple:
            kwargs.update(type=args[0], nargs=len(args))
        elif origin is dict or tp is dict:
            kwargs["type"] = json_object
        elif tp in (int, float, str):
            kwargs["type"] = tp
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line form for {tp!r}")
        for key in ("metavar", "nargs"):
            if meta.get(key):
                kwargs[key] = meta[key]
        group.add_argument(_flag(f.name), **kwargs)


def _show(value: Any) -> str:
    if isinstance(value, tuple | list):
        return " ".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def values_from_args(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` the user set on the command line."""
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if getattr(args, f.name, None) is not None
    }
