"""Corral's one home directory: ~/.corral, or $CORRAL_HOME."""

import os
from pathlib import Path


def corral_home() -> Path:
    return Path(os.environ.get("CORRAL_HOME") or Path.home() / ".corral").expanduser()


def models_dir() -> Path:
    """Where downloaded checkpoints live: one directory per model."""
    return corral_home() / "models"
