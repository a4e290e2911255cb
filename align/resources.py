"""Where the bundled data and recipes live: next to the package in a checkout, inside the package in a wheel."""

from __future__ import annotations

import importlib
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent


def _find(package: str, folder: str) -> Path:
    local = _ROOT / folder
    if local.is_dir():
        return local
    try:  # installed wheel: pyproject maps data/ -> align/_data and recipes/ -> align/_recipes (namespace packages)
        return Path(next(iter(importlib.import_module(package).__path__)))
    except (ModuleNotFoundError, StopIteration) as e:
        raise FileNotFoundError(f"bundled folder {folder!r} not found next to {_ROOT} nor as {package}") from e


def data_dir() -> Path:
    """The bundled datasets (the repository's `data/`)."""
    return _find("align._data", "data")


def recipes_dir() -> Path:
    """The bundled recipes (the repository's `recipes/`)."""
    return _find("align._recipes", "recipes")
