from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits_0_4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built-in digits 0-4, one rendering each, small images: an ImageFolder root with train/ and val/."""
    from cnnkit.data.builtin import write_classification

    return write_classification(
        tmp_path_factory.mktemp("digits04"), classes=(0, 1, 2, 3, 4), size_range=(28, 36), copies=2, seed=0
    )


@pytest.fixture(scope="session")
def digits_5_9(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cnnkit.data.builtin import write_classification

    return write_classification(
        tmp_path_factory.mktemp("digits59"), classes=(5, 6, 7, 8, 9), size_range=(28, 36), copies=1, seed=1
    )
