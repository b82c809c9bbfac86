"""Shared fixtures for the mars-serve test suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO_ROOT / "configs" / "model" / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny model (HF format), built once and reused across sessions.

    Built from ``configs/model/tiny.yaml`` into ``$MARS_TINY_MODEL_DIR`` if set,
    else ``<repo>/models/tiny`` (git-ignored). A directory that already holds
    a build of the same recipe is reused as is (a fraction of a second).
    """
    from workers.model_builder import build_model, load_recipe

    out = Path(os.environ.get("MARS_TINY_MODEL_DIR") or REPO_ROOT / "models" / "tiny")
    return build_model(load_recipe(TINY_RECIPE), out)
