"""Every path the project uses (Cookiecutter Data Science layout): immutable raw downloads under ``data/raw``, derived
artefacts under ``data/cache``, executed notebooks under ``runs/``, figures under ``figures/``. Each can be moved
with an environment variable (e.g. to a cluster's scratch disk) without editing code."""
from __future__ import annotations

import os
from pathlib import Path

PROJ_ROOT = Path(__file__).resolve().parents[1]


def _env_path(variable: str, default: Path) -> Path:
    value = os.environ.get(variable)
    return Path(value).expanduser().resolve() if value else default


DATA_DIR = _env_path("ZSL_DATA_DIR", PROJ_ROOT / "data")
RAW_DIR = _env_path("ZSL_RAW_DIR", DATA_DIR / "raw")
CACHE_DIR = _env_path("ZSL_CACHE_DIR", DATA_DIR / "cache")
RUNS_DIR = _env_path("ZSL_RUNS_DIR", PROJ_ROOT / "runs")
FIGURES_DIR = _env_path("ZSL_FIGURES_DIR", PROJ_ROOT / "figures")
NOTEBOOKS_DIR = PROJ_ROOT / "notebooks"
PROFILES_DIR = NOTEBOOKS_DIR / "profiles"
TABLES_DIR = Path(__file__).resolve().parent / "tables"  # reviewed tables (name -> WNID ...) ship with the package

WORDNET_DIR = RAW_DIR / "wordnet"
TUXPAINT_DIR = RAW_DIR / "tuxpaint_stamps"
IMAGENET_SAMPLE_DIR = RAW_DIR / "imagenet_sample"


def ensure_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if needed and return it."""
    path.mkdir(parents=True, exist_ok=True)
    return path
