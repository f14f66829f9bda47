"""Routing algorithms behind one interface: votes ``(B, I, J, D)`` -> :class:`RoutingOutput`.

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

from .base import Routing, RoutingOutput, create_routing, list_routings, register_routing
from .cluster import ClusterRouting
from .dynamic import DynamicRouting
from .em import EMRouting
from .inverted_attention import InvertedAttentionRouting
from .scaled_distance import ScaledDistanceRouting
from .self_attention import SelfAttentionRouting
from .vb import VariationalBayesRouting

__all__ = [
    "Routing",
    "RoutingOutput",
    "create_routing",
    "list_routings",
    "register_routing",
    "ClusterRouting",
    "DynamicRouting",
    "EMRouting",
    "InvertedAttentionRouting",
    "ScaledDistanceRouting",
    "SelfAttentionRouting",
    "VariationalBayesRouting",
]
