"""Figures: reconstructions, the capsule-dimension perturbation grid, routing maps.

Drawn on :class:`matplotlib.figure.Figure` without pyplot: importing or using this package
leaves matplotlib's backend alone. Every figure writer returns a :class:`FigurePath`.
"""

from ._common import FigurePath
from .explain import capsule_length_figure, routing_map, routing_map_figure
from .figures import perturbation_figure, perturbation_grid, reconstruction_figure

__all__ = ["FigurePath", "capsule_length_figure", "perturbation_figure", "perturbation_grid",
           "reconstruction_figure", "routing_map", "routing_map_figure"]
