"""Fetch the suite's offline data assets into ``data/raw`` (never committed).

Two assets, each with an ordered list of routes tried until one works:

* **WordNet 3.0** (the noun database files ``data.noun`` / ``index.noun``):
  an existing copy named by ``ZSL_WORDNET_SOURCE``; the system's ``/usr/share/wordnet``;
  Debian's ``wordnet-base`` package via ``apt-get download``; NLTK's downloader.
* **Tux Paint stamps** (the demo image/text/category set): the system's
  ``/usr/share/tuxpaint/stamps``; Debian's ``tuxpaint-stamps-default``; the upstream
  release tarball.

Every fetch unpacks into a temporary folder next to the target and renames it into
place, so an interrupted fetch never leaves a half-filled ``data/raw`` folder behind.
When every route fails the error lists what was tried and what the user can do.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable, Optional

from zsl_utils import config
from zsl_utils.errors import AssetUnavailableError

WORDNET_FILES = ("data.noun", "index.noun")
TUXPAINT_UPSTREAM_URL = (
    "https://sourceforge.net/projects/tuxpaint/files/tuxpaint-stamps/2022-06-04/"
    "tuxpaint-stamps-2022.06.04.tar.gz/download"
)
_COMPLETE_MARKER = ".complete"

# A route takes a fresh empty folder and fills it, returning a short description of
# where the files came from, or raises/returns None when it cannot serve.
Route = Callable[[Path], Optional[str]]


# --------------------------------------------------------------------------- helpers
def _is_complete(target: Path) -> bool:
    return (target / _COMPLETE_MARKER).is_file()


def _install_atomically(target: Path, route: Route) -> Optional[str]:
    """Run ``route`` into a temp folder beside ``target`` and rename it into place."""
    config.ensure_dir(target.parent)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as tmp:
        staging = Path(tmp) / "staging"
        staging.mkdir()
        source = route(staging)
        if source is None:
            return None
        (staging / _COMPLETE_MARKER).write_text(source + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        return source


def _fetch(target: Path, routes: list[tuple[str, Route]], asset: str, advice: str) -> Path:
    if _is_complete(target):
        return target
    failures = []
    for name, route in routes:
        try:
            if _install_atomically(target, route) is not None:
                return target
            failures.append(f"{name}: not available here")
        except Exception as error:  # noqa: BLE001 - every route failure is reported together
            failures.append(f"{name}: {type(error).__name__}: {error}".strip())
    tried = "\n  - ".join(failures)
    raise AssetUnavailableError(
        f"Could not obtain {asset} into {target}.\nTried:\n  - {tried}\nWhat to do: {advice}"
    )


def _apt_download_deb(package: str, workdir: Path) -> Optional[Path]:
    """``apt-get download`` a package (running ``apt-get update`` once if root and needed)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return None

    def download() -> subprocess.CompletedProcess:
        return subprocess.run(
            ["apt-get", "download", "-q", package], cwd=workdir, capture_output=True, text=True, timeout=900
        )

    result = download()
    if result.returncode != 0 and os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, timeout=900)
        result = download()
    debs = sorted(workdir.glob(f"{package}_*.deb"))
    if result.returncode != 0 or not debs:
        raise RuntimeError(f"apt-get download {package} failed: {result.stderr.strip()[-300:]}")
    return debs[0]


def _unpack_deb(deb: Path, workdir: Path) -> Path:
    root = workdir / "deb-root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, capture_output=True, timeout=900)
    return root


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


# --------------------------------------------------------------------------- WordNet
def _wordnet_dir_ok(directory: Path) -> bool:
    return all((directory / name).is_file() for name in WORDNET_FILES)


def _wordnet_from_dir(source: Optional[Path]) -> Route:
    def route(staging: Path) -> Optional[str]:
        if source is None or not _wordnet_dir_ok(source):
            return None
        _copy_tree(source, staging)
        return f"copied from {source}"

    return route


def _from_apt_package(package: str, folder: str, suffixes: tuple[str, ...] | None = None) -> Route:
    """A route copying ``folder`` (a path inside the package) out of a downloaded .deb."""

    def route(staging: Path) -> Optional[str]:
        with tempfile.TemporaryDirectory() as tmp:
            deb = _apt_download_deb(package, Path(tmp))
            if deb is None:
                return None
            source = _unpack_deb(deb, Path(tmp)) / folder
            if _copy_tree(source, staging, suffixes) == 0:
                raise RuntimeError(f"{deb.name} holds no files under {folder}")
            return f"Debian package {deb.name}"

    return route


def _wordnet_from_apt(staging: Path) -> Optional[str]:
    source = _from_apt_package("wordnet-base", "usr/share/wordnet")(staging)
    if source is not None and not _wordnet_dir_ok(staging):
        raise RuntimeError(f"{source} does not contain {WORDNET_FILES}")
    return source


def _wordnet_from_nltk(staging: Path) -> Optional[str]:
    try:
        import nltk  # optional: only users without apt need it
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        if not nltk.download("wordnet", download_dir=tmp, quiet=True, raise_on_error=True):
            raise RuntimeError("nltk.download('wordnet') failed")
        archive = Path(tmp) / "corpora" / "wordnet.zip"
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(tmp)
        source = Path(tmp) / "wordnet"
        if not _wordnet_dir_ok(source):
            raise RuntimeError("NLTK's wordnet archive lacks the noun database files")
        _copy_tree(source, staging)
        return "NLTK downloader (wordnet corpus, WordNet 3.0)"


def ensure_wordnet(target: Path | None = None) -> Path:
    """Return a folder holding the WordNet 3.0 database files, fetching them if needed."""
    target = Path(target) if target else config.WORDNET_DIR
    user_copy = os.environ.get("ZSL_WORDNET_SOURCE")
    routes: list[tuple[str, Route]] = [
        ("$ZSL_WORDNET_SOURCE", _wordnet_from_dir(Path(user_copy) if user_copy else None)),
        ("/usr/share/wordnet", _wordnet_from_dir(Path("/usr/share/wordnet"))),
        ("apt-get download wordnet-base", _wordnet_from_apt),
        ("nltk.download('wordnet')", _wordnet_from_nltk),
    ]
    return _fetch(
        target,
        routes,
        "WordNet 3.0",
        "install Debian's 'wordnet-base' (apt-get install wordnet-base), or pip install nltk with "
        "internet access, or download WordNet 3.0 (wordnet.princeton.edu) and set ZSL_WORDNET_SOURCE "
        "to the folder that holds data.noun and index.noun.",
    )


# --------------------------------------------------------------------------- Tux Paint
_STAMP_SUFFIXES = (".png", ".txt")


def _stamps_from_dir(source: Path) -> Route:
    def route(staging: Path) -> Optional[str]:
        if not source.is_dir():
            return None
        if _copy_tree(source, staging, _STAMP_SUFFIXES) == 0:
            return None
        return f"copied from {source}"

    return route


_stamps_from_apt = _from_apt_package("tuxpaint-stamps-default", "usr/share/tuxpaint/stamps", _STAMP_SUFFIXES)


def _stamps_from_upstream(staging: Path) -> Optional[str]:
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "stamps.tar.gz"
        with urllib.request.urlopen(TUXPAINT_UPSTREAM_URL, timeout=60) as response, open(archive, "wb") as out:
            shutil.copyfileobj(response, out)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        roots = [p for p in Path(tmp).glob("*/stamps") if p.is_dir()]
        if not roots or _copy_tree(roots[0], staging, _STAMP_SUFFIXES) == 0:
            raise RuntimeError("the upstream archive has no stamps/ folder")
        return f"upstream release {TUXPAINT_UPSTREAM_URL}"


def ensure_tuxpaint(target: Path | None = None) -> Path:
    """Return the root of the Tux Paint stamps tree (``<category>/<sub>/NAME.png``)."""
    target = Path(target) if target else config.TUXPAINT_DIR
    routes: list[tuple[str, Route]] = [
        ("/usr/share/tuxpaint/stamps", _stamps_from_dir(Path("/usr/share/tuxpaint/stamps"))),
        ("apt-get download tuxpaint-stamps-default", _stamps_from_apt),
        ("upstream tarball", _stamps_from_upstream),
    ]
    return _fetch(
        target,
        routes,
        "the Tux Paint stamps (demo images)",
        "install Debian's 'tuxpaint-stamps-default', or download tuxpaint-stamps-2022.06.04.tar.gz from "
        "the Tux Paint project and unpack its stamps/ folder into this target folder, then create an "
        f"empty '{_COMPLETE_MARKER}' file in it.",
    )


def ensure_all() -> dict[str, Path]:
    """Fetch every offline asset the demo profile needs (idempotent)."""
    return {"wordnet": ensure_wordnet(), "tuxpaint": ensure_tuxpaint()}


if __name__ == "__main__":  # ``python -m zsl_utils.data.assets`` is the setup step
    for name, path in ensure_all().items():
        print(f"{name}: {path} ({(path / _COMPLETE_MARKER).read_text().strip()})")
