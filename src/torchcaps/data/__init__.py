"""Data: MNIST readers, verified fetching, the bundled subset, splits and augmentation."""

from .affnist import make_affnist_test, make_translated_mnist, read_affnist_mat
from .datasets import (
    DatasetSplits,
    Split,
    cache_dir,
    fetch_mnist,
    list_datasets,
    load_dataset,
    load_npz,
    sha256_file,
)
from .errors import ChecksumError, DataFormatError
from .idx import parse_idx, read_idx, write_idx
from .labelled import fit_images, load_labelled_npz
from .multimnist import make_multimnist
from .safe_pickle import UnsafePickleError, load_numpy_pickle
from .transforms import random_shift

__all__ = [
    "fit_images",
    "load_labelled_npz",
    "make_affnist_test",
    "make_multimnist",
    "make_translated_mnist",
    "read_affnist_mat",
    "ChecksumError",
    "DataFormatError",
    "DatasetSplits",
    "Split",
    "UnsafePickleError",
    "cache_dir",
    "fetch_mnist",
    "list_datasets",
    "load_dataset",
    "load_npz",
    "load_numpy_pickle",
    "parse_idx",
    "random_shift",
    "read_idx",
    "sha256_file",
    "write_idx",
]
