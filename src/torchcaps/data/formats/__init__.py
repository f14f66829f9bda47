"""Readers for the on-disk formats of the datasets in :mod:`torchcaps.data.catalog`.

One module per format family: ``cifar`` (python batches in a tar.gz, read through the
restricted unpickler), ``svhn`` (MATLAB ``.mat``), ``smallnorb`` (NORB binary matrices),
``emnist`` (IDX files inside a zip) and ``folder`` (a user's image folder, Pillow).
MNIST-style IDX files are read by :mod:`torchcaps.data.idx` and the official affNIST
``.mat`` files by :func:`torchcaps.data.affnist.read_affnist_mat`. Every reader returns
uint8 images ``(N, C, H, W)`` (or ``(N, H, W)`` for single-channel sources) and int64
labels, and raises :class:`~torchcaps.data.errors.DataFormatError` naming the file on any
defect.
"""

from .cifar import read_cifar_archive, read_cifar_batch
from .emnist import read_emnist_zip
from .folder import read_image_folder
from .smallnorb import read_norb_matrix, read_smallnorb
from .svhn import read_svhn_mat

__all__ = ["read_cifar_archive", "read_cifar_batch", "read_emnist_zip", "read_image_folder",
           "read_norb_matrix", "read_smallnorb", "read_svhn_mat"]
