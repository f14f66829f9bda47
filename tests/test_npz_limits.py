"""Untrusted .npz files are refused from their .npy headers, before anything is decompressed."""

import io
import tracemalloc
import zipfile

import numpy as np
import numpy.lib.format as npy_format
import pytest

from torchcaps.data import DataFormatError, load_npz
from torchcaps.data.labelled import load_labelled_npz


def _header(shape, descr="|u1") -> bytes:
    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _forged(path, images_shape, images_data=b"\0" * 16, n_labels=1):
    """An .npz whose images header declares ``images_shape``, followed by few bytes."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("images.npy", _header(images_shape) + images_data)
        z.writestr("labels.npy", _header((n_labels,), "<i8") + b"\0" * (8 * n_labels))
    return path


def _bomb(path, n_images: int):
    """A real zip bomb: ``n_images`` 56x56 zero images, deflated in 1 MiB chunks."""
    size, chunk = n_images * 56 * 56, bytes(1 << 20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("images.npy", "w", force_zip64=True) as f:
            f.write(_header((n_images, 56, 56)))
            for start in range(0, size, len(chunk)):
                f.write(chunk[: min(len(chunk), size - start)])
        z.writestr("labels.npy", _header((1,), "<i8") + b"\0" * 8)
    return path


def _peak_bytes(fn) -> int:
    """Peak memory traced (Python objects and numpy arrays) while ``fn`` runs."""
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_zip_bomb_is_refused_without_decompressing(tmp_path):
    bomb = _bomb(tmp_path / "bomb.npz", 20_000)  # 62.7 MB of pixels in about 60 KB
    assert bomb.stat().st_size < 200_000

    def load():
        with pytest.raises(DataFormatError, match="bomb.npz: 20000 images but 1 labels"):
            load_labelled_npz(bomb)

    assert _peak_bytes(load) < 4 << 20
    with pytest.raises(DataFormatError, match=r"declare 62,720,\d+ bytes .*above the limit of "
                                              r"1,048,576 bytes"):
        load_npz(bomb, ("images",), max_bytes=1 << 20)


def test_declared_huge_shape_is_one_clear_error(tmp_path):
    huge = _forged(tmp_path / "huge.npz", (10**6, 10**5, 10**5))
    pattern = r"declare 10,000,000,000,000,\d+ bytes \(images \(1000000, 100000, 100000\) uint8"
    with pytest.raises(DataFormatError, match=pattern):
        load_npz(huge, ("images",))
    with pytest.raises(DataFormatError, match=pattern):
        load_labelled_npz(huge)
    # within the limit but larger than the data that follows: truncated, read no further
    short = _forged(tmp_path / "short.npz", (1, 28, 28))
    with pytest.raises(DataFormatError, match="corrupt or truncated"):
        load_labelled_npz(short)


def test_layout_is_checked_before_loading(tmp_path):
    """Wrong dtype, count or size: refused from the headers, the (absent) data never read."""
    cases = [((5, 28, 28), 5, None, "corrupt or truncated"),  # sane layout: reads, finds no data
             ((5, 28, 28), 4, None, "5 images but 4 labels"),
             ((5, 28), 5, None, r"\(N, H, W\)"),
             ((5, 28, 28), 5, (32, 32), "28x28 but 32x32")]
    for shape, n_labels, hw, pattern in cases:
        path = _forged(tmp_path / "f.npz", shape, b"", n_labels)
        with pytest.raises(DataFormatError, match=pattern):
            load_labelled_npz(path, expected_hw=hw)


def test_a_text_file_renamed_npz_is_not_an_npz(tmp_path):
    path = tmp_path / "notes.npz"
    path.write_text("images, labels\n1, 2\n")
    for load in (lambda: load_npz(path, ("images",)), lambda: load_labelled_npz(path)):
        with pytest.raises(DataFormatError, match=r"notes.npz: not a valid .npz file") as e:
            load()
        assert "pickle" not in str(e.value)


def test_an_npy_renamed_npz_is_named_as_such(tmp_path):
    path = tmp_path / "images.npz"
    with open(path, "wb") as f:
        np.save(f, np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DataFormatError, match=r"images.npz: is a single .npy array, not an .npz "
                                              r"archive; write the arrays with numpy.savez"):
        load_labelled_npz(path)


def test_object_arrays_are_refused_from_the_header(tmp_path):
    path = tmp_path / "obj.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("images.npy", _header((2,), "|O") + b"never unpickled")
    with pytest.raises(DataFormatError, match=r"array 'images': holds Python objects .*refused"):
        load_npz(path, ("images",))
