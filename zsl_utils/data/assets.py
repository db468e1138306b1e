"""Fetch the offline data assets into ``data/raw`` (never committed): ``python -m zsl_utils.data.assets``.

Each asset's routes are tried in order; a route fills a temporary folder renamed into place (an interrupted fetch
leaves no half-filled folder). When every route fails, the error lists what was tried and what to do."""
from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
import zipfile
from functools import partial
from pathlib import Path
from typing import Callable, Optional

from zsl_utils import config
from zsl_utils.errors import AssetUnavailableError

WORDNET_FILES = ("data.noun", "index.noun")
STAMP_SUFFIXES = (".png", ".txt")
TUXPAINT_UPSTREAM_URL = ("https://sourceforge.net/projects/tuxpaint/files/tuxpaint-stamps/2022-06-04/"
                         "tuxpaint-stamps-2022.06.04.tar.gz/download")
IMAGENET_SAMPLE_URL = "https://github.com/EliSchwartz/imagenet-sample-images/archive/refs/heads/master.zip"
SAMPLE_PATTERN = "n????????_*.JPEG"  # <wnid>_<name>.JPEG, one per 1K class
_COMPLETE_MARKER = ".complete"

# A route fills an empty folder and returns its source, or None where it cannot serve (raises if it tried and failed).
Route = Callable[[Path], Optional[str]]


def _install_atomically(target: Path, route: Route) -> bool:
    """Run ``route`` into a temp folder beside ``target`` and rename it into place."""
    with tempfile.TemporaryDirectory(dir=config.ensure_dir(target.parent), prefix=f".{target.name}-") as tmp:
        staging = Path(tmp) / "staging"
        staging.mkdir()
        source = route(staging)
        if source is not None:
            (staging / _COMPLETE_MARKER).write_text(source + "\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        return source is not None


def _fetch(target: Path, routes: list[tuple[str, Route]], asset: str, advice: str) -> Path:
    if (target / _COMPLETE_MARKER).is_file():
        return target
    failures = []
    for name, route in routes:
        try:
            if _install_atomically(target, route):
                return target
            failures.append(f"{name}: not available here")
        except Exception as error:  # noqa: BLE001 - every route failure is reported together
            failures.append(f"{name}: {type(error).__name__}: {error}".strip())
    tried = "\n  - ".join(failures)
    raise AssetUnavailableError(f"Could not obtain {asset} into {target}.\nTried:\n  - {tried}\nWhat to do: {advice}")


def _copy_tree(source: Path, target: Path, suffixes: tuple[str, ...] | None = None) -> int:
    """Copy files under ``source`` into ``target`` keeping relative paths; return the count."""
    count = 0
    for path in source.rglob("*"):
        if not path.is_file() or (suffixes and path.suffix.lower() not in suffixes):
            continue
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, destination)
        count += 1
    return count


def _has(directory: Path, required: tuple[str, ...]) -> bool:
    return directory.is_dir() and all(any(p.is_file() for p in directory.glob(name)) for name in required)


def _from_dir(source: Optional[Path], suffixes: tuple[str, ...] | None = None, required: tuple[str, ...] = ()) -> Route:
    """A route copying an existing folder (which must hold ``required``: file names or glob patterns)."""

    def route(staging: Path) -> Optional[str]:
        if source is None or not _has(source, required) or _copy_tree(source, staging, suffixes) == 0:
            return None
        return f"copied from {source}"

    return route


def _from_apt_package(package: str, folder: str, suffixes=None, required: tuple[str, ...] = ()) -> Route:
    """A route copying ``folder`` (a path inside the package) out of an ``apt-get download``-ed .deb."""

    def route(staging: Path) -> Optional[str]:
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            download = ["apt-get", "download", "-q", package]
            result = subprocess.run(download, cwd=tmp, capture_output=True, text=True, timeout=900)
            if result.returncode != 0 and os.geteuid() == 0:  # a fresh image may need its package lists
                subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, timeout=900)
                result = subprocess.run(download, cwd=tmp, capture_output=True, text=True, timeout=900)
            debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
            if result.returncode != 0 or not debs:
                raise RuntimeError(f"apt-get download {package} failed: {result.stderr.strip()[-300:]}")
            root = Path(tmp) / "deb-root"
            subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], check=True, capture_output=True, timeout=900)
            if _copy_tree(root / folder, staging, suffixes) == 0:
                raise RuntimeError(f"{debs[0].name} holds no files under {folder}")
            if not _has(staging, required):
                raise RuntimeError(f"Debian package {debs[0].name} does not contain {required}")
            return f"Debian package {debs[0].name}"

    return route


def _wordnet_from_nltk(staging: Path) -> Optional[str]:
    try:
        import nltk  # lazy: optional, only users without apt need it
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        if not nltk.download("wordnet", download_dir=tmp, quiet=True, raise_on_error=True):
            raise RuntimeError("nltk.download('wordnet') failed")
        with zipfile.ZipFile(Path(tmp) / "corpora" / "wordnet.zip") as zipped:
            zipped.extractall(tmp)
        if _from_dir(Path(tmp) / "wordnet", required=WORDNET_FILES)(staging) is None:
            raise RuntimeError("NLTK's wordnet archive lacks the noun database files")
        return "NLTK downloader (wordnet corpus, WordNet 3.0)"


def _download(url: str, target: Path) -> Path:
    with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as out:
        shutil.copyfileobj(response, out)
    return target


def _stamps_from_upstream(staging: Path) -> Optional[str]:
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(_download(TUXPAINT_UPSTREAM_URL, Path(tmp) / "stamps.tar.gz")) as tar:
            tar.extractall(tmp, filter="data")
        roots = [p for p in Path(tmp).glob("*/stamps") if p.is_dir()]
        if not roots or _copy_tree(roots[0], staging, STAMP_SUFFIXES) == 0:
            raise RuntimeError("the upstream archive has no stamps/ folder")
        return f"upstream release {TUXPAINT_UPSTREAM_URL}"


def _sample_from_github(staging: Path) -> Optional[str]:
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(_download(IMAGENET_SAMPLE_URL, Path(tmp) / "sample.zip")) as zipped:
            zipped.extractall(Path(tmp) / "unzipped")
        folders = sorted(Path(tmp, "unzipped").iterdir())  # a GitHub zip holds one <repo>-<branch>/ folder
        if not folders or _sample_from_dir(folders[0])(staging) is None:
            raise RuntimeError(f"the archive has no {SAMPLE_PATTERN} photos")
        return f"GitHub archive {IMAGENET_SAMPLE_URL}"


_sample_from_dir = partial(_from_dir, suffixes=(".jpeg", ".jpg"), required=(SAMPLE_PATTERN,))
_wordnet_from_apt = _from_apt_package("wordnet-base", "usr/share/wordnet", required=WORDNET_FILES)
_stamps_from_apt = _from_apt_package("tuxpaint-stamps-default", "usr/share/tuxpaint/stamps", STAMP_SUFFIXES)
WORDNET_ADVICE = ("install Debian's 'wordnet-base' (apt-get install wordnet-base), or pip install nltk with internet "
                  "access, or download WordNet 3.0 (wordnet.princeton.edu) and set ZSL_WORDNET_SOURCE to the folder "
                  "that holds data.noun and index.noun.")
TUXPAINT_ADVICE = ("install Debian's 'tuxpaint-stamps-default', or download tuxpaint-stamps-2022.06.04.tar.gz from the "
                   "Tux Paint project and unpack its stamps/ folder into this target folder, then create an empty "
                   f"'{_COMPLETE_MARKER}' file in it.")
IMAGENET_SAMPLE_ADVICE = ("set ZSL_IMAGENET_SAMPLE to a folder holding the photos (n01440764_tench.JPEG ...), or clone "
                          "https://github.com/EliSchwartz/imagenet-sample-images and set ZSL_IMAGENET_SAMPLE to it.")


def ensure_wordnet(target: Path | None = None) -> Path:
    """A folder holding the WordNet 3.0 database files, fetched (routes below, in order) if needed."""
    user_copy = os.environ.get("ZSL_WORDNET_SOURCE")
    routes = [("$ZSL_WORDNET_SOURCE", _from_dir(Path(user_copy) if user_copy else None, required=WORDNET_FILES)),
              ("/usr/share/wordnet", _from_dir(Path("/usr/share/wordnet"), required=WORDNET_FILES)),
              ("apt-get download wordnet-base", _wordnet_from_apt),
              ("nltk.download('wordnet')", _wordnet_from_nltk)]
    return _fetch(Path(target) if target else config.WORDNET_DIR, routes, "WordNet 3.0", WORDNET_ADVICE)


def ensure_tuxpaint(target: Path | None = None) -> Path:
    """The root of the Tux Paint stamps tree (``<category>/<sub>/NAME.png``), fetched (routes below) if needed."""
    routes = [("/usr/share/tuxpaint/stamps", _from_dir(Path("/usr/share/tuxpaint/stamps"), STAMP_SUFFIXES)),
              ("apt-get download tuxpaint-stamps-default", _stamps_from_apt),
              ("upstream tarball", _stamps_from_upstream)]
    return _fetch(Path(target or config.TUXPAINT_DIR), routes, "the Tux Paint stamps (demo images)", TUXPAINT_ADVICE)


def ensure_imagenet_sample(target: Path | None = None) -> Path:
    """A folder of the 1,000 ImageNet sample photos (``<wnid>_<name>.JPEG``, one per 1K class), fetched if needed."""
    user_copy = os.environ.get("ZSL_IMAGENET_SAMPLE")
    # A checkout beside the workplace's shared/ folder has a resized copy: `make notebooks` needs no variable there.
    development_copy = config.PROJ_ROOT.parent / "shared" / "data" / "imagenet-sample-256"
    routes = [("$ZSL_IMAGENET_SAMPLE", _sample_from_dir(Path(user_copy).expanduser() if user_copy else None)),
              ("../shared/data/imagenet-sample-256 (development copy)", _sample_from_dir(development_copy)),
              ("GitHub EliSchwartz/imagenet-sample-images (zip)", _sample_from_github)]
    return _fetch(Path(target or config.IMAGENET_SAMPLE_DIR), routes, "the ImageNet sample photos",
                  IMAGENET_SAMPLE_ADVICE)


def ensure_all() -> dict[str, Path]:
    """Fetch every offline asset the demo profile needs (idempotent)."""
    return {"wordnet": ensure_wordnet(), "tuxpaint": ensure_tuxpaint(), "imagenet_sample": ensure_imagenet_sample()}


if __name__ == "__main__":  # ``python -m zsl_utils.data.assets`` is the setup step
    for name, path in ensure_all().items():
        print(f"{name}: {path} ({(path / _COMPLETE_MARKER).read_text().strip()})")
