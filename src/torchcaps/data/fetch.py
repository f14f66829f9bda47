"""Download published files into the cache, each checked against its digest before use.

Files live in ``CACHE/downloads/`` under their published names (:mod:`torchcaps.data.sources`).
A file already there is used if it matches its digest, so a file copied there by hand
(from a machine that can reach the host) works offline, and one archive serves every
dataset built from it (the EMNIST splits). A download is written to ``NAME.part`` and
renamed only after its digest matched; a mismatch deletes it and raises
:class:`ChecksumError` naming the file and the URL; a body shorter than the server's
Content-Length raises :class:`DataFormatError` ("truncated download").

``mirror`` replaces the published URLs by one base URL (``mirror + NAME``), for an
institutional mirror or a local server.

Files without a published digest (affNIST) are refused unless ``allow_unverified``; then
the SHA-256 seen on the first download is written to ``NAME.sha256`` and every later use
is checked against it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from . import datasets as _ds
from .errors import ChecksumError, DataFormatError
from .sources import RemoteFile

__all__ = ["fetch_file", "fetch_files", "verify_file"]


def verify_file(path: Path, f: RemoteFile) -> None:
    """Check ``path`` against ``f``'s published digest, or the one recorded at first download."""
    pinned = Path(str(path) + ".sha256")
    if f.digest is not None:
        algorithm, expected = f.digest
    elif pinned.is_file():
        algorithm, expected = "sha256", pinned.read_text().strip()
    else:
        raise ChecksumError(f"{f.name}: no published digest and none recorded at download")
    _ds._verify(path, expected, algorithm, name=f.name)


def _urls(f: RemoteFile, mirror: str | None) -> tuple[str, ...]:
    return (mirror.rstrip("/") + "/" + f.name,) if mirror else f.urls


def fetch_file(f: RemoteFile, folder: str | os.PathLike, timeout: float = 60.0,
               mirror: str | None = None, allow_unverified: bool = False) -> Path:
    """Return the verified local copy of ``f`` in ``folder``, downloading it if needed.

    Raises:
        ChecksumError: the file does not match its digest (or has none and
            ``allow_unverified`` is false).
        DataFormatError: the download was truncated.
        ConnectionError: no URL could be reached.
    """
    folder = Path(folder)
    dest = folder / f.name
    if dest.is_file():
        try:
            verify_file(dest, f)
        except ChecksumError as e:
            raise ChecksumError(f"{e}; the copy at {dest} is not the published file: delete it "
                                "to download it again") from None
        return dest
    if f.digest is None and not allow_unverified:
        raise ChecksumError(f"{f.name}: its publisher gives no digest to verify it against; "
                            "allow an unverified download explicitly (allow_unverified=True, "
                            "`torchcaps data NAME --allow-unverified`) to accept it on its "
                            "format checks alone")
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / (f.name + ".part")
    errors = []
    for url in _urls(f, mirror):
        try:
            _ds._download(url, part, timeout, name=f.name)
        except DataFormatError as e:  # truncated: another URL may serve the whole file
            part.unlink(missing_ok=True)
            errors.append(e)
            continue
        except Exception as e:  # network errors of every kind: try the next URL
            part.unlink(missing_ok=True)
            errors.append(ConnectionError(f"{url}: {e}"))
            continue
        if f.digest is None:
            digest = _ds.sha256_file(part)
            Path(str(dest) + ".sha256").write_text(digest + "\n")
            print(f"torchcaps: {f.name} has no published digest; recorded SHA-256 {digest}",
                  file=sys.stderr)
        else:
            try:
                verify_file(part, f)
            except ChecksumError as e:
                part.unlink(missing_ok=True)
                raise ChecksumError(f"{e} (downloaded from {url})") from None
        os.replace(part, dest)
        return dest
    truncated = [e for e in errors if isinstance(e, DataFormatError)]
    if truncated:
        raise truncated[-1]
    raise ConnectionError(f"could not download {f.name}: " + "; ".join(str(e) for e in errors)
                          + f". Copy the file into {folder} by hand to use it offline")


def fetch_files(files: tuple[RemoteFile, ...], folder: str | os.PathLike, timeout: float = 60.0,
                mirror: str | None = None, allow_unverified: bool = False) -> dict[str, Path]:
    """:func:`fetch_file` for each of ``files``; ``{name: path}``."""
    return {f.name: fetch_file(f, folder, timeout, mirror, allow_unverified) for f in files}
