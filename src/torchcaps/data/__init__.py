"""Data: the dataset catalog and its readers, verified fetching, splits, views and augmentation."""

from .affnist import make_affnist_test, make_translated_mnist, read_affnist_mat
from .catalog import (
    DatasetSpec,
    fetch_dataset,
    get_dataset_spec,
    list_datasets,
    load_dataset,
    register_dataset,
)
from .datasets import (
    DatasetSplits,
    Split,
    cache_dir,
    fetch_mnist,
    load_npz,
    sha256_file,
)
from .errors import ChecksumError, DataFormatError
from .idx import parse_idx, read_idx, write_idx
from .labelled import fit_images, load_labelled_npz
from .multimnist import make_multimnist
from .recipes import AUGMENTATIONS, augment_batch
from .safe_pickle import UnsafePickleError, load_numpy_pickle
from .transforms import random_shift
from .views import apply_views, split_dataset_name

__all__ = [
    "AUGMENTATIONS",
    "augment_batch",
    "apply_views",
    "fit_images",
    "load_labelled_npz",
    "make_affnist_test",
    "make_multimnist",
    "make_translated_mnist",
    "read_affnist_mat",
    "ChecksumError",
    "DataFormatError",
    "DatasetSpec",
    "DatasetSplits",
    "Split",
    "UnsafePickleError",
    "cache_dir",
    "fetch_dataset",
    "fetch_mnist",
    "get_dataset_spec",
    "list_datasets",
    "load_dataset",
    "load_npz",
    "load_numpy_pickle",
    "parse_idx",
    "random_shift",
    "read_idx",
    "register_dataset",
    "sha256_file",
    "split_dataset_name",
    "write_idx",
]
