"""Data: the dataset catalog and its readers, verified fetching, splits, views and augmentation;
labelled volumes for segmentation (NIfTI files, the MNI152 tissue benchmark)."""

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
from .mni152 import fetch_mni152, load_mni152_tissue, load_pretraining_volumes
from .multimnist import make_multimnist
from .recipes import AUGMENTATIONS, augment_batch
from .safe_pickle import UnsafePickleError, load_numpy_pickle
from .segmentation import SegmentationData, SegmentationItem, load_segmentation_data
from .transforms import random_shift
from .views import apply_views, split_dataset_name
from .volumes import Volume, load_labelled_pair, read_label_map, read_volume, write_volume

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
    "SegmentationData",
    "SegmentationItem",
    "Volume",
    "Split",
    "UnsafePickleError",
    "cache_dir",
    "fetch_dataset",
    "fetch_mni152",
    "fetch_mnist",
    "get_dataset_spec",
    "list_datasets",
    "load_dataset",
    "load_labelled_pair",
    "load_mni152_tissue",
    "load_npz",
    "load_pretraining_volumes",
    "load_segmentation_data",
    "load_numpy_pickle",
    "parse_idx",
    "random_shift",
    "read_idx",
    "read_label_map",
    "read_volume",
    "register_dataset",
    "sha256_file",
    "split_dataset_name",
    "write_idx",
    "write_volume",
]
