"""The training engine: a small fit loop plus callbacks, shared by every task."""

from cnnkit.engine.callbacks import Callback, FitState
from cnnkit.engine.config import TrainConfig
from cnnkit.engine.trainer import FitResult, Trainer, TrainingDiverged, evaluate, fit, new_run_dir

__all__ = [
    "Callback",
    "FitResult",
    "FitState",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "evaluate",
    "fit",
    "new_run_dir",
]
