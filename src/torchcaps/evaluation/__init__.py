"""Evaluation suites: train a model under a paper's protocol and report robustness results.

* :func:`run_affnist_suite`: train on translated 40x40 MNIST, test on translated and on
  affine-transformed MNIST test digits (Sabour et al. 2017, Sec. 5.2).
* :func:`run_multimnist_suite`: train and test on overlapping digit pairs, top-2 error
  and per-digit reconstructions (Sabour et al. 2017, Sec. 6).
"""

from .suites import (
    format_suite_table,
    multimnist_reconstruction_figure,
    run_affnist_suite,
    run_multimnist_suite,
)

__all__ = [
    "format_suite_table",
    "multimnist_reconstruction_figure",
    "run_affnist_suite",
    "run_multimnist_suite",
]
