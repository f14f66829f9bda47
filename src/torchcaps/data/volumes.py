"""NIfTI volumes: read, write and check images and label maps (nibabel).

A :class:`Volume` holds one image as float32 ``(D, H, W)`` or, for a file with a fourth
axis (channels, diffusion directions, time), ``(C, D, H, W)``, with its voxel-to-world
``affine`` (RAS+ millimetres, as NIfTI defines it) and voxel ``spacing``.

Axis order. By default the array keeps the file's voxel order: ``(D, H, W)`` are the
file's axes ``(i, j, k)``. ``orientation="SAR"`` reorders and flips the axes (never
resamples) so that ``D`` runs inferior to superior, ``H`` posterior to anterior and ``W``
left to right; ``D`` is then the axial axis, which is what
:mod:`torchcaps.data.mni152` and :func:`torchcaps.viz.overlay.save_overlay_png`
expect. Any three-letter code of ``R/L``, ``A/P``, ``S/I`` works (``"RAS"``, ``"LPS"``...);
the affine is updated to match, so world coordinates are unchanged.

Every defect of a file raises :class:`~torchcaps.data.errors.DataFormatError` naming
the file and the problem, never a silent repair: a file that is not NIfTI, a truncated
or corrupt ``.nii``/``.nii.gz``, NaN or Inf in an image, a 2D image where a volume is
needed, a label map whose grid differs from its image's, labels outside
``[0, num_classes)`` and label maps stored as floats with fractional values.

:func:`write_volume` writes atomically (a temporary file in the same folder, then
:func:`os.replace`), so a reader never sees half a file.

:func:`normalize_intensity` rescales intensities with statistics taken inside a
foreground mask (z-score, robust z-score or min-max), the usual step before a network.

nibabel (Brett et al., https://nipy.org/nibabel) is imported on first use; install it
with the ``medical`` extra.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataFormatError

__all__ = [
    "Volume",
    "VOLUME_MAX_BYTES",
    "load_labelled_pair",
    "normalize_intensity",
    "read_label_map",
    "read_volume",
    "reorient",
    "write_volume",
]

#: default limit on the size of the float32 array one file may declare (checked before reading)
VOLUME_MAX_BYTES = 4 << 30

_SUFFIXES = (".nii.gz", ".nii")
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(eq=False)
class Volume:
    """One image volume and where it lies in the world.

    Attributes:
        array: float32 ``(D, H, W)``, or ``(C, D, H, W)`` for a file with a fourth axis.
        affine: ``(4, 4)`` voxel ``(d, h, w, 1)`` to world (RAS+ mm) transform.
        spacing: voxel size in mm along ``(D, H, W)``.
        path: the file it was read from (``None`` for a volume built in memory).
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    path: Path | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(D, H, W)``, the spatial shape (without the channel axis)."""
        return tuple(int(s) for s in self.array.shape[-3:])


def _nibabel():
    try:
        import nibabel
    except ImportError:  # pragma: no cover - nibabel is a test dependency
        raise ImportError("reading NIfTI files needs nibabel: pip install 'torchcaps[medical]' "
                          "(or pip install nibabel)") from None
    return nibabel


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size along each array axis: the length of each column of the affine's 3x3 part."""
    return tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))


# ----------------------------------------------------------------------------- reading


def _check_name(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"no such NIfTI file: {path}")
    if not path.name.lower().endswith(_SUFFIXES):
        raise DataFormatError(f"{path}: not a NIfTI file name (expected .nii or .nii.gz)")


def _sniff(path: Path) -> None:
    """Read the first bytes and refuse anything that does not start like a NIfTI-1/2 header."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            if path.name.lower().endswith(".gz"):
                if head != _GZIP_MAGIC:
                    raise DataFormatError(f"{path}: named .nii.gz but not gzip-compressed "
                                          "(rename it to .nii if it is an uncompressed NIfTI)")
                with gzip.GzipFile(fileobj=f) as g:
                    header = g.read(544)
            else:
                if head == _GZIP_MAGIC:
                    raise DataFormatError(f"{path}: gzip-compressed but named .nii "
                                          "(rename it to .nii.gz)")
                header = f.read(544)
    except DataFormatError:
        raise
    except (OSError, EOFError, zlib.error) as e:
        raise DataFormatError(f"{path}: corrupt or truncated gzip stream ({e})") from None
    nifti1 = len(header) >= 348 and header[344:348] in (b"n+1\0", b"ni1\0")
    nifti2 = len(header) >= 540 and header[4:8] in (b"n+2\0", b"ni2\0")
    if nifti1:
        sizes = {struct.unpack("<i", header[:4])[0], struct.unpack(">i", header[:4])[0]}
        nifti1 = 348 in sizes
    if not (nifti1 or nifti2):
        what = "shorter than a NIfTI header" if len(header) < 348 else "no NIfTI-1/NIfTI-2 header"
        raise DataFormatError(f"{path}: not a NIfTI file ({what})")
    if header[344:348] in (b"ni1\0",) or header[4:8] in (b"ni2\0",):
        raise DataFormatError(f"{path}: a NIfTI header/image pair (.hdr/.img); convert it to a "
                              "single .nii or .nii.gz file")


def _gunzip(path: Path, limit: int) -> bytes:
    """The whole decompressed stream (so gzip checks its CRC and length), at most ``limit`` bytes."""
    chunks, size = [], 0
    try:
        with gzip.open(path, "rb") as g:
            while chunk := g.read(1 << 20):
                size += len(chunk)
                if size > limit:
                    raise DataFormatError(f"{path}: decompresses to more than {limit:,} bytes")
                chunks.append(chunk)
    except DataFormatError:
        raise
    except (OSError, EOFError, zlib.error) as e:
        raise DataFormatError(f"{path}: corrupt or truncated gzip stream ({type(e).__name__}: {e})") from None
    return b"".join(chunks)


def _load(path: Path, max_bytes: int = VOLUME_MAX_BYTES):
    """The nibabel image of ``path``, after the name and header checks.

    A ``.nii.gz`` is decompressed to its end first: nibabel alone reads only the bytes the
    header declares, so damage that leaves the deflate stream parseable would go unnoticed
    without gzip's CRC check at the end.
    """
    _check_name(path)
    _sniff(path)
    nib = _nibabel()
    try:
        if path.name.lower().endswith(".gz"):
            data = _gunzip(path, 2 * max_bytes + (16 << 20))  # float64 storage, header extensions
            cls = nib.Nifti2Image if data[4:8] == b"n+2\0" else nib.Nifti1Image
            img = cls.from_bytes(data)
        else:
            img = nib.load(str(path))
    except (MemoryError, DataFormatError):
        raise
    except Exception as e:  # nibabel raises many types for a damaged file
        why = " ".join(str(e).split())
        raise DataFormatError(f"{path}: corrupt NIfTI file ({type(e).__name__}: {why})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataFormatError(f"{path}: read as {type(img).__name__}, not NIfTI")
    affine = np.asarray(img.affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataFormatError(f"{path}: invalid voxel-to-world affine (not finite or singular)")
    return img


def _data(img, path: Path, dtype, max_bytes: int) -> np.ndarray:
    """The voxel values (scaling applied), read only if the declared size is within ``max_bytes``."""
    nbytes = math.prod(img.shape) * np.dtype(dtype).itemsize
    if nbytes > max_bytes:
        raise DataFormatError(f"{path}: declares shape {img.shape} ({nbytes:,} bytes as "
                              f"{np.dtype(dtype).name}), above the limit of {max_bytes:,} bytes")
    try:
        if np.dtype(dtype).kind == "f":
            return np.asarray(img.get_fdata(dtype=dtype))
        return np.asanyarray(img.dataobj)
    except MemoryError:
        raise
    except Exception as e:  # gzip, zlib and nibabel raise assorted types on a damaged body
        why = " ".join(str(e).split())  # nibabel's messages span lines
        raise DataFormatError(f"{path}: corrupt or truncated NIfTI data "
                              f"({type(e).__name__}: {why})") from None


def _check_volume_shape(shape: tuple[int, ...], path: Path) -> None:
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise DataFormatError(f"{path}: a 2D image (shape {tuple(shape)}); a volume needs three "
                              "spatial axes of at least 2 voxels each")
    if len(shape) > 4:
        raise DataFormatError(f"{path}: {len(shape)} dimensions (shape {tuple(shape)}); expected "
                              "a 3D volume or a 4D volume with channels on the fourth axis")


def _check_finite(array: np.ndarray, where: str) -> None:
    if not np.isfinite(array.sum(dtype=np.float64)):
        bad = ~np.isfinite(array)
        if bad.any():
            raise DataFormatError(f"{where}: {int(np.isnan(array).sum())} NaN and "
                                  f"{int(np.isinf(array).sum())} Inf voxels")


def _orientation_codes(orientation: str) -> tuple[str, str, str]:
    codes = tuple(orientation.upper()) if isinstance(orientation, str) else ()
    axis_of = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}
    if len(codes) != 3 or sorted(axis_of.get(c, -1) for c in codes) != [0, 1, 2]:
        raise ValueError(f"orientation must be three letters, one of R/L, A/P, S/I each "
                         f"(e.g. 'SAR' or 'RAS'), got {orientation!r}")
    return codes


def _apply_orientation(array: np.ndarray, affine: np.ndarray, target) -> tuple[np.ndarray, np.ndarray]:
    """Reorder/flip the last three axes of ``array`` from ``affine``'s orientation to ``target``
    (an nibabel orientation array); the new affine maps the new voxels to the same world points."""
    ornt = _nibabel().orientations
    transform = ornt.ornt_transform(ornt.io_orientation(affine), target)
    spatial = array.shape[-3:]
    lead = array.ndim - 3
    # apply_orientation works on the leading axes: move channels last, then back
    moved = np.moveaxis(array, tuple(range(lead)), tuple(range(3, 3 + lead))) if lead else array
    out = ornt.apply_orientation(moved, transform)
    out = np.moveaxis(out, tuple(range(3, 3 + lead)), tuple(range(lead))) if lead else out
    new_affine = affine @ ornt.inv_ornt_aff(transform, spatial)
    return np.ascontiguousarray(out), new_affine


def reorient(volume: Volume, orientation: str) -> Volume:
    """``volume`` with its axes reordered and flipped to ``orientation`` (e.g. ``"SAR"``).

    No interpolation: only axis permutations and flips, chosen from the affine's closest
    axis directions; the affine is updated so every voxel keeps its world position.
    """
    target = _nibabel().orientations.axcodes2ornt(_orientation_codes(orientation))
    array, affine = _apply_orientation(volume.array, volume.affine, target)
    return Volume(array, affine, _spacing(affine), volume.path)


def read_volume(path: str | os.PathLike, *, orientation: str | None = None,
                max_bytes: int = VOLUME_MAX_BYTES) -> Volume:
    """Read a 3D or 4D NIfTI image (``.nii`` or ``.nii.gz``) as float32.

    Args:
        path: the file.
        orientation: reorder/flip the axes to this code (e.g. ``"SAR"``: ``D`` axial); ``None``
            keeps the file's voxel order.
        max_bytes: refuse a file whose float32 array would exceed this, before reading it.

    Returns:
        A :class:`Volume`: ``(D, H, W)``, or ``(C, D, H, W)`` with the file's fourth axis first.

    Raises:
        FileNotFoundError: no such file.
        DataFormatError: not NIfTI, corrupt or truncated, a 2D image, NaN or Inf values.
    """
    path = Path(path)
    img = _load(path, max_bytes)
    _check_volume_shape(img.shape, path)
    array = _data(img, path, np.float32, max_bytes)
    _check_finite(array, str(path))
    affine = np.asarray(img.affine, dtype=np.float64)
    if array.ndim == 4:
        array = np.moveaxis(array, 3, 0)  # (D, H, W, C) -> (C, D, H, W)
    vol = Volume(np.ascontiguousarray(array, dtype=np.float32), affine, _spacing(affine), path)
    return reorient(vol, orientation) if orientation is not None else vol


def read_label_map(path: str | os.PathLike, num_classes: int, like: Volume | None = None, *,
                   orientation: str | None = None, max_bytes: int = VOLUME_MAX_BYTES) -> np.ndarray:
    """Read a label map: integers in ``[0, num_classes)``, int64 ``(D, H, W)``.

    Labels stored as floats are accepted only when every value is a whole number (some tools
    write label maps as float32); a fractional value such as 0.5 is an error, never rounded.

    Args:
        path: the file.
        num_classes: labels must lie in ``[0, num_classes)``.
        like: the image the labels belong to: the label map is brought into the image's axis
            order (the image may have been reoriented) and must then have its shape and affine.
        orientation: without ``like``, reorder/flip the axes as :func:`read_volume` does.
        max_bytes: refuse a file whose array would exceed this (as int64), before reading it.

    Raises:
        DataFormatError: not NIfTI, corrupt, not 3D, non-finite or fractional values, labels
            out of range, or a grid that differs from ``like``'s.
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    path = Path(path)
    img = _load(path, max_bytes)
    if len(img.shape) != 3:
        raise DataFormatError(f"{path}: a label map must be 3D, got shape {tuple(img.shape)}")
    _check_volume_shape(img.shape, path)
    raw = _data(img, path, np.int64, max_bytes)
    if raw.dtype.kind == "f":
        _check_finite(raw, f"{path}: label map")
        frac = raw != np.round(raw)
        if frac.any():
            example = raw[frac].flat[0]
            raise DataFormatError(f"{path}: {int(frac.sum())} voxels hold non-integer labels "
                                  f"(e.g. {example:g}); a label map must hold whole numbers")
    elif raw.dtype.kind not in "iub":
        raise DataFormatError(f"{path}: label map of dtype {raw.dtype}; expected integers")
    bad = (raw < 0) | (raw >= num_classes)
    if bad.any():
        values = np.unique(raw[bad])
        shown = ", ".join(f"{v:g}" for v in values[:5]) + (", ..." if values.size > 5 else "")
        raise DataFormatError(f"{path}: {int(bad.sum())} voxels hold labels outside "
                              f"[0, {num_classes}) (values {shown})")
    labels = raw.astype(np.int64)
    affine = np.asarray(img.affine, dtype=np.float64)
    if like is not None:
        target = _nibabel().orientations.io_orientation(like.affine)
        labels, affine = _apply_orientation(labels, affine, target)
        where = f" ({like.path})" if like.path is not None else ""
        if labels.shape != like.shape:
            raise DataFormatError(f"{path}: label map shape {labels.shape} differs from its "
                                  f"image's {like.shape}{where}")
        gap = float(np.abs(affine - like.affine).max())
        if gap > 1e-3:
            raise DataFormatError(f"{path}: label map and image{where} are not on the same voxel "
                                  f"grid (their affines differ by up to {gap:.4g} mm)")
    elif orientation is not None:
        target = _nibabel().orientations.axcodes2ornt(_orientation_codes(orientation))
        labels, _ = _apply_orientation(labels, affine, target)
    return labels


def load_labelled_pair(image_path: str | os.PathLike, label_path: str | os.PathLike,
                       num_classes: int, *, orientation: str | None = None) -> tuple[Volume, np.ndarray]:
    """An image and its label map, checked to share one voxel grid.

    Returns:
        ``(volume, labels)``: the image as :func:`read_volume` gives it and int64 labels
        ``(D, H, W)`` in the same axis order.
    """
    volume = read_volume(image_path, orientation=orientation)
    return volume, read_label_map(label_path, num_classes, like=volume)


# ----------------------------------------------------------------------------- writing


def _storage(array: np.ndarray, path: Path) -> np.ndarray:
    """The array in a NIfTI-friendly dtype: floats as float32/float64, integers in the
    smallest of uint8/int16/int32 that holds them, booleans as uint8."""
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype.kind == "f":
        _check_finite(array, f"{path}: array to write")
        return array.astype(np.float64 if array.dtype == np.float64 else np.float32)
    if array.dtype.kind in "iu":
        lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
        for dt in (np.uint8, np.int16, np.int32):
            info = np.iinfo(dt)
            if info.min <= lo and hi <= info.max:
                return array.astype(dt)
        raise ValueError(f"{path}: integer values in [{lo}, {hi}] do not fit int32")
    raise TypeError(f"{path}: cannot write an array of dtype {array.dtype}")


def write_volume(path: str | os.PathLike, array, affine) -> Path:
    """Write ``array`` ``(D, H, W)`` or ``(C, D, H, W)`` as NIfTI, atomically.

    ``.nii.gz`` is compressed, ``.nii`` is not. Channels go to the file's fourth axis (the
    inverse of :func:`read_volume`). Float arrays are stored as float32 (float64 kept),
    integer arrays in the smallest of uint8/int16/int32 that holds their values, booleans as
    uint8. NaN or Inf values are refused: a file written here always reads back.

    Args:
        path: destination, ending in ``.nii`` or ``.nii.gz``.
        array: numpy array or tensor.
        affine: ``(4, 4)`` voxel-to-world transform.

    Returns:
        The path written.
    """
    path = Path(path)
    if not path.name.lower().endswith(_SUFFIXES):
        raise ValueError(f"{path}: a NIfTI file name must end in .nii or .nii.gz")
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.ndim not in (3, 4):
        raise ValueError(f"{path}: array must be (D, H, W) or (C, D, H, W), got shape {array.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise ValueError(f"{path}: affine must be a finite (4, 4) matrix, got shape {affine.shape}")
    data = _storage(array, path)
    if data.ndim == 4:
        data = np.moveaxis(data, 0, 3)  # (C, D, H, W) -> (D, H, W, C)
    nib = _nibabel()
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    img.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.lower().endswith(".gz") else ".nii"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + suffix)
    os.close(fd)
    try:
        nib.save(img, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------- intensities


def normalize_intensity(array: np.ndarray, mask: np.ndarray | None = None, *, method: str = "zscore",
                        clip: tuple[float, float] | None = None) -> np.ndarray:
    """Rescale intensities with statistics taken inside a foreground mask.

    Every voxel is transformed (the background too), with the same linear map per channel:

    * ``"zscore"``: ``(x - mean) / std`` of the foreground;
    * ``"robust"``: ``(x - median) / (1.4826 * MAD)`` of the foreground (the MAD scaled to
      match the standard deviation of a Gaussian), insensitive to a few bright outliers;
    * ``"minmax"``: ``(x - min) / (max - min)`` of the foreground, so it spans ``[0, 1]``.

    Args:
        array: ``(D, H, W)`` or ``(C, D, H, W)``; each channel is normalised on its own.
        mask: boolean ``(D, H, W)`` foreground; ``None``: the voxels that are not zero (in each
            channel), the background of skull-stripped or masked MRI.
        method: ``"zscore"``, ``"robust"`` or ``"minmax"``.
        clip: ``(low, high)`` percentiles of the foreground; every voxel is clipped to them
            before the statistics are taken (``None``: no clipping). Note that clipping also
            lifts a zero background to the low percentile.

    Returns:
        float32 array of ``array``'s shape.
    """
    if method not in ("zscore", "robust", "minmax"):
        raise ValueError(f"method must be 'zscore', 'robust' or 'minmax', got {method!r}")
    x = np.asarray(array, dtype=np.float32)
    if x.ndim not in (3, 4):
        raise ValueError(f"array must be (D, H, W) or (C, D, H, W), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("array holds NaN or Inf values")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype != np.bool_ or mask.shape != x.shape[-3:]:
            raise ValueError(f"mask must be boolean of shape {x.shape[-3:]}, got {mask.dtype} {mask.shape}")
    channels = x if x.ndim == 4 else x[None]
    out = np.empty_like(channels)
    for c, xc in enumerate(channels):
        m = mask if mask is not None else xc != 0
        v = xc[m].astype(np.float64)
        if v.size < 2:
            raise ValueError(f"the foreground mask selects {v.size} voxels of channel {c}; need 2 or more")
        if clip is not None:
            lo, hi = np.percentile(v, clip)
            xc = np.clip(xc, lo, hi)
            v = np.clip(v, lo, hi)
        if method == "zscore":
            shift, scale = v.mean(), v.std()
        elif method == "robust":
            shift = np.median(v)
            scale = 1.4826 * np.median(np.abs(v - shift))
        else:
            shift, scale = v.min(), v.max() - v.min()
        if not scale > 0:
            raise ValueError(f"channel {c} is constant inside the foreground mask; cannot normalise")
        out[c] = (xc - shift) / scale
    return out if x.ndim == 4 else out[0]
