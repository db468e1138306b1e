"""Paths honour environment overrides; environment.yml agrees with pyproject.toml."""
from __future__ import annotations

import importlib
import subprocess
import sys

from zsl_utils import config


def test_env_var_overrides_move_the_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("ZSL_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("ZSL_FIGURES_DIR", str(tmp_path / "f"))
    try:
        reloaded = importlib.reload(config)
        assert reloaded.DATA_DIR == tmp_path / "d"
        assert reloaded.CACHE_DIR == tmp_path / "d" / "cache"
        assert reloaded.WORDNET_DIR == tmp_path / "d" / "raw" / "wordnet"
        assert reloaded.FIGURES_DIR == tmp_path / "f"
    finally:
        monkeypatch.undo()
        importlib.reload(config)
    assert config.DATA_DIR == config.PROJ_ROOT / "data"


def test_environment_yml_is_generated_from_pyproject():
    sys.path.insert(0, str(config.PROJ_ROOT / "tools"))
    try:
        import tomllib

        from make_environment_yml import render
    finally:
        sys.path.pop(0)
    expected = render(tomllib.loads((config.PROJ_ROOT / "pyproject.toml").read_text()))
    actual = (config.PROJ_ROOT / "environment.yml").read_text()
    assert actual == expected, "environment.yml is stale: run `python tools/make_environment_yml.py`"
    assert "torch==2.14.1" in actual and '-e ".[test]"' in actual


def test_data_and_runs_are_gitignored():
    ignored = subprocess.run(
        ["git", "check-ignore", "data/raw/x", "runs/demo/x.ipynb", ".venv/bin/python"],
        cwd=config.PROJ_ROOT, capture_output=True, text=True,
    ).stdout.split()
    assert ignored == ["data/raw/x", "runs/demo/x.ipynb", ".venv/bin/python"]
