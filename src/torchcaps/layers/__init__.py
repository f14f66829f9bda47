"""Capsule layers."""

from .cluster import ClusterConvCaps
from .conv import ConvCaps2d, conv_capsule_votes
from .conv2d import Conv2d
from .decoder import CapsuleDecoder, mask_capsules
from .linear import CapsLinear
from .local import LocalConvCaps, LocalDeconvCaps, local_capsule_votes, local_capsule_votes_loop
from .losses import MarginLoss, ReconstructionLoss
from .matrix import ClassMatCaps, ConvMatCaps, MatrixCapsules, PrimaryMatCaps
from .primary import (
    RESTRAINTS,
    CapsuleRestraint,
    GateRestraint,
    PowerRestraint,
    PrimaryCaps,
    TopKRestraint,
    channels_to_capsules,
    create_restraint,
)
from .residual import CapsStack
from .squash import SQUASHES, CapsuleLength, Squash
from .subspace import SubspaceCaps, SubspaceConvCaps

__all__ = [
    "Conv2d",
    "CapsStack",
    "SubspaceCaps",
    "SubspaceConvCaps",
    "ClassMatCaps",
    "ClusterConvCaps",
    "ConvCaps2d",
    "conv_capsule_votes",
    "ConvMatCaps",
    "MatrixCapsules",
    "PrimaryMatCaps",
    "CapsLinear",
    "LocalConvCaps",
    "LocalDeconvCaps",
    "local_capsule_votes",
    "local_capsule_votes_loop",
    "CapsuleDecoder",
    "CapsuleLength",
    "MarginLoss",
    "PrimaryCaps",
    "CapsuleRestraint",
    "PowerRestraint",
    "TopKRestraint",
    "GateRestraint",
    "RESTRAINTS",
    "create_restraint",
    "ReconstructionLoss",
    "SQUASHES",
    "Squash",
    "channels_to_capsules",
    "mask_capsules",
]
