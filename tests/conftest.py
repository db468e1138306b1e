"""Shared fixtures. Asset fixtures fetch the offline assets (idempotent) rather than
skip, so a missing install step shows up as a failure with the fetch error's advice."""
from __future__ import annotations

import pytest

from zsl_utils.data import assets
from zsl_utils.data.wordnet import WordNet


@pytest.fixture(scope="session")
def wordnet_dir():
    return assets.ensure_wordnet()


@pytest.fixture(scope="session")
def wordnet(wordnet_dir) -> WordNet:
    return WordNet.load(wordnet_dir)


@pytest.fixture(scope="session")
def tuxpaint_root():
    return assets.ensure_tuxpaint()


@pytest.fixture(scope="session")
def imagenet_sample():
    return assets.ensure_imagenet_sample()
