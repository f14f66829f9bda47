"""Routing algorithms behind one interface: votes ``(B, I, J, D)`` -> :class:`RoutingOutput`."""

from .base import Routing, RoutingOutput, create_routing, list_routings, register_routing
from .dynamic import DynamicRouting

__all__ = [
    "Routing",
    "RoutingOutput",
    "create_routing",
    "list_routings",
    "register_routing",
    "DynamicRouting",
]
