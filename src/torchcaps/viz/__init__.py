"""Figures: reconstructions and the capsule-dimension perturbation grid."""

from .figures import perturbation_figure, perturbation_grid, reconstruction_figure

__all__ = ["perturbation_figure", "perturbation_grid", "reconstruction_figure"]
