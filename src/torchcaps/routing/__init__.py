"""Routing algorithms behind one interface: votes ``(B, I, J, D)`` -> :class:`RoutingOutput`.

Every algorithm is called as ``routing(votes, activations=None, context=None)`` (see
:mod:`torchcaps.routing.base` and ``docs/routing.md``) and has a functional core
(``dynamic_routing``, ``em_routing``, ``vb_routing``, ...).

============================  =====================================  ================
name                          paper                                  couplings sum to 1 over
============================  =====================================  ================
``dynamic``                   Sabour, Frosst, Hinton 2017            parents
``em``                        Hinton, Sabour, Frosst 2018            parents
``self_attention``            Mazzia et al. 2021 (Efficient-CapsNet) parents
``inverted_attention``        Tsai et al. 2020                       parents
``cluster``                   Zhao & Cheng 2021                      children
``scaled_distance``           Gugglberger et al. 2021 / Peer et al.  parents
``vb``                        De Sousa Ribeiro et al. 2020           parents
============================  =====================================  ================
"""

from .base import (
    Routing,
    RoutingContext,
    RoutingOutput,
    UnsupportedRoutingError,
    create_routing,
    list_routings,
    register_routing,
    routing_options,
)
from .cluster import ClusterRouting, cluster_route
from .dynamic import DynamicRouting, dynamic_routing
from .em import EMRouting, em_routing
from .inverted_attention import InvertedAttentionRouting, inverted_attention_routing
from .scaled_distance import ScaledDistanceRouting, scaled_distance_routing
from .self_attention import SelfAttentionRouting, self_attention_routing
from .vb import VariationalBayesRouting, vb_routing

__all__ = [
    "Routing",
    "RoutingContext",
    "RoutingOutput",
    "UnsupportedRoutingError",
    "create_routing",
    "list_routings",
    "register_routing",
    "routing_options",
    "cluster_route",
    "dynamic_routing",
    "em_routing",
    "inverted_attention_routing",
    "scaled_distance_routing",
    "self_attention_routing",
    "vb_routing",
    "ClusterRouting",
    "DynamicRouting",
    "EMRouting",
    "InvertedAttentionRouting",
    "ScaledDistanceRouting",
    "SelfAttentionRouting",
    "VariationalBayesRouting",
]
