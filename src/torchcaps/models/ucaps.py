"""3D-UCaps (Nguyen, Hua, Le, MICCAI 2021) and its self-supervised pretraining (SS-3DCapsNet).

3D-UCaps is a U-Net whose contracting path is made of 3D convolutional capsules with
locally-constrained dynamic routing and whose expanding path is an ordinary 3D CNN. Sizes for
a ``(B, C, D, H, W)`` input of side ``S`` (a multiple of 8), with the official iSeg-2017
configuration (``C = 2``, ``K = 4``); "types x atoms" for capsule grids:

    stem      conv 5^3 16, conv 5^3 32 dil 2, conv 5^3 64 dil 2 (tanh)   (B, 64, S^3)
    primary   local caps 3^3, 1 x 64 -> 16 x 4, 1 iteration             (B, 16, S^3, 4)      skip 1
    encoder   local caps 3^3, 3 iterations, strides 2,1,2,1,2,1:
              16 x 8 (S/2), 16 x 8 (S/2)                                                     skip 2
               8 x 16 (S/4), 8 x 16 (S/4)                                                    skip 3
               8 x 32 (S/8), K x 64 (S/8): the class capsules, lengths -> margin loss
    decoder   up 2 (transposed conv 2^3) 256, cat skip 3 (384), conv 3^3 128
              up 2 128, cat skip 2 (256), conv 3^3 64
              up 2 64, cat skip 1 (128) -> 1^3 conv K (logits)
                                        -> 1^3 convs 64, 128, C + sigmoid (reconstruction)

Every "conv" of the stem and decoder is conv (no bias) -> instance norm (no affine) -> PReLU
(one slope), MONAI's ``Convolution`` block; the third stem block ends in tanh instead. A
capsule grid enters the decoder as channels ``type * atoms + atom``.

Capsule layers are :class:`~torchcaps.layers.local.LocalConvCaps`: each child type convolves
its ``3^3`` window into one vote per parent type and each position routes its ``T`` child types
to its ``C`` parent types (couplings: softmax over parent types),

    u_hat_c|t = W * u_t        s_c = sum_t c_tc u_hat_c|t + beta_c        v_c = squash(s_c)

with the kernel ``W`` shared by every child type (``share_weight=True``, the iSeg setting:
``--share_weight`` defaults to 1 in the official ``UCaps3D.add_model_specific_args``), padding
1, weights drawn from ``N(0, 0.1^2)`` and ``beta`` initialised to 0.1 as in the official code.

Loss, as the official ``UCaps3D.losses`` with the defaults of ``train.py`` and
``scripts/train_ucaps_iseg.sh`` (``--margin_loss_weight 0.1``, ``--cls_loss CE``,
``--rec_loss_weight 0.1``, no class weights)::

    L = 0.1 * L_margin + L_CE + 0.1 * L_rec

* ``L_margin``: on the class-capsule lengths ``|v_k|`` at ``S/8`` against the one-hot labels
  downsampled by trilinear interpolation (``align_corners=False``, scale 1/8: each target is
  the mean of the 2^3 central voxels of its 8^3 block, so boundary blocks get soft targets in
  ``{0, 1/8, ..., 1}``). Official form with ``margin=0.2, downweight=0.5``:
  ``0.5 T relu(0.7 - |v|)^2 + 0.25 (1 - T) relu(|v| - 0.3)^2``, summed over classes and
  averaged over batch and positions, i.e. half the Sabour margin loss with ``m+ = 0.7``,
  ``m- = 0.3``, ``lambda = 0.5``.
* ``L_CE``: MONAI ``DiceCELoss(softmax=True, to_onehot_y=True, lambda_dice=0)`` on the logits
  (``cls_loss="dice_ce"`` or ``"dice"`` choose the official alternatives).
* ``L_rec``: squared error of the reconstruction on the foreground voxels (``label > 0``),
  summed over channels and voxels, divided by the number of foreground voxels, averaged over
  the batch.

Parameter count: 3,367,274 for ``ucaps3d(in_channels=2, num_classes=4)``. Checked against the
official module (``module/ucaps.py`` with ``layers.py``, MONAI blocks) built with
``in_channels=2, out_channels=4, share_weight=True``: 3,368,362, and the difference, 1,088, is
exactly the convolution biases of its seven capsule layers (below). Neither the paper's
abstract nor the official README reports a count. With the official weights copied in, one
routing iteration everywhere and those biases set to zero, the logits of the two models agree
to 1e-6 (float32), which checks the wiring (paddings, dilations, skips, channel order).

Deviations from the official code, both in the shared capsule layer:

* routing agreement is the dot product ``u_hat . v`` (Sabour et al.); 3D-UCaps adds the
  cosine similarity ``cos(u_hat, s)`` to the routing logits;
* the vote convolution has no bias; the official ``nn.Conv3d`` of each capsule layer has
  one (``C * D_out`` values added to every vote, besides the routing bias ``beta``).

Also: the squash divides by ``sqrt(|s|^2 + 1e-8)`` instead of ``|s| + 1e-12``, and the
reconstruction is computed in every forward pass (the official model only in training).

**Self-supervised pretraining (SS-3DCapsNet, Tran, Ly, Hua, Le, ISBI 2022, arXiv 2201.05905).**
What could be established: the abstract says the capsule network is pre-trained on a pretext
task "optimized by self-reconstruction", to improve the weight initialisation, and that the
network is the 3D-UCaps-style U-Net (3D capsule encoder, 3D CNN decoder). The official
repository (UARK-AICV/SS-3DCapsNet) holds only a README ("Code and usage instruction will be
available soon"); the body of the paper (which transformations, their parameters, the loss,
which weights are transferred) could not be read. **The pretext below is therefore this
project's interpretation**: the whole network reconstructs the original volume, through its
reconstruction branch, from a transformed copy (:func:`pretext_batch`: random flips, a random
90-degree rotation, one zeroed cuboid), with a mean squared error (:func:`pretext_loss`).
Only the encoder is meant to transfer (:meth:`UCaps3D.encoder_state_dict`, the parameters
under ``stem.``, ``primary.`` and ``encoder.``); the pretext model must be built with the
fine-tuning ``in_channels`` and ``num_classes``, since the last capsule layer has ``K`` types.

Letter legend: ``B`` batch, ``C`` image channels, ``K`` classes, ``S`` spatial sizes
``(D, H, W)``, ``T`` capsule types, ``A`` atoms (pose dimension).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as caps_f
from .._validate import check_tensor
from ..layers.local import LocalConvCaps
from ._registry import register_model
from .segmentation import SegmentationModel, SegmentationOutput, check_labels

__all__ = ["UCaps3D", "ucaps3d", "ucaps_margin_loss", "masked_reconstruction_loss", "pretext_batch",
           "pretext_loss", "ENCODER_PREFIXES", "PRETEXT_TRANSFORMS"]

#: parameter-name prefixes of the capsule encoder (what self-supervised pretraining transfers)
ENCODER_PREFIXES = ("stem.", "primary.", "encoder.")
#: the transformations :func:`pretext_batch` can apply
PRETEXT_TRANSFORMS = ("flip", "rotate", "mask")
_CLS_LOSSES = {"ce": "cross_entropy", "dice_ce": "dice_ce", "dice": "dice"}


def _conv_block(c_in: int, c_out: int, kernel_size: int, dilation: int = 1,
                act: str = "prelu") -> nn.Sequential:
    """MONAI's default ``Convolution``: conv (no bias) -> instance norm -> PReLU (or tanh)."""
    pad = dilation * (kernel_size // 2)  # "same" size at stride 1
    return nn.Sequential(
        nn.Conv3d(c_in, c_out, kernel_size, padding=pad, dilation=dilation, bias=False),
        nn.InstanceNorm3d(c_out),  # affine=False, no running statistics
        nn.PReLU() if act == "prelu" else nn.Tanh(),
    )


def _to_channels(poses: torch.Tensor) -> torch.Tensor:
    """Capsule grid ``(B, T, *S, A)`` -> feature map ``(B, T*A, *S)``, channel ``t*A + a``."""
    return poses.movedim(-1, 2).flatten(1, 2)


class UCaps3D(SegmentationModel):
    """3D-UCaps: capsule encoder, CNN decoder with skips, masked reconstruction branch.

    The defaults are the paper's (official iSeg-2017) configuration; the width options exist
    to build small models for tests.

    Args:
        in_channels: image channels ``C`` (2 for iSeg's T1 + T2).
        num_classes: classes ``K`` with background (4 for iSeg); the last capsule layer has
            ``K`` types.
        spatial_dims: must be 3 (accepted so that generic code may pass it).
        stem_channels: the three stem convolutions (16, 32, 64).
        primary_types, primary_atoms: primary capsules (16 x 4).
        encoder_types: types of the first five encoder layers (16, 16, 8, 8, 8); the sixth
            has ``num_classes``.
        encoder_atoms: atoms of the six encoder layers (8, 8, 16, 16, 32, 64).
        decoder_channels: outputs of the three 2x upsamplings (256, 128, 64).
        fuse_channels: outputs of the 3^3 convolutions after the first two (128, 64).
        recon_channels: hidden 1^3 convolutions of the reconstruction branch (64, 128).
        routing_iterations: encoder routing iterations (3; the primary capsules use 1).
        share_weight: one vote kernel for all child types of a layer (True for iSeg).
        margin_weight: weight of the margin loss (0.1).
        recon_weight: weight of the masked reconstruction loss (0.1).
        cls_loss: ``"ce"`` (official iSeg default), ``"dice_ce"`` or ``"dice"``; MONAI's
            ``DiceCELoss``.

    Shape:
        images ``(B, C, D, H, W)``, sizes multiples of 8 -> :class:`SegmentationOutput` with
        logits ``(B, K, D, H, W)``, reconstruction ``(B, C, D, H, W)`` in ``(0, 1)`` and
        ``aux["lengths"]`` ``(B, K, D/8, H/8, W/8)``, the class-capsule lengths.
    """

    def __init__(
        self,
        in_channels: int = 2,
        num_classes: int = 4,
        spatial_dims: int = 3,
        stem_channels: tuple[int, int, int] = (16, 32, 64),
        primary_types: int = 16,
        primary_atoms: int = 4,
        encoder_types: tuple[int, ...] = (16, 16, 8, 8, 8),
        encoder_atoms: tuple[int, ...] = (8, 8, 16, 16, 32, 64),
        decoder_channels: tuple[int, int, int] = (256, 128, 64),
        fuse_channels: tuple[int, int] = (128, 64),
        recon_channels: tuple[int, int] = (64, 128),
        routing_iterations: int = 3,
        share_weight: bool = True,
        margin_weight: float = 0.1,
        recon_weight: float = 0.1,
        cls_loss: str = "ce",
    ) -> None:
        if spatial_dims != 3:
            raise ValueError(f"UCaps3D is a 3D model (spatial_dims=3), got spatial_dims={spatial_dims!r}")
        super().__init__(in_channels, num_classes, spatial_dims=3, size_multiple=8)
        if len(stem_channels) != 3 or len(encoder_types) != 5 or len(encoder_atoms) != 6:
            raise ValueError("UCaps3D needs 3 stem_channels, 5 encoder_types and 6 encoder_atoms, got "
                             f"{len(stem_channels)}, {len(encoder_types)} and {len(encoder_atoms)}")
        if len(decoder_channels) != 3 or len(fuse_channels) != 2 or len(recon_channels) != 2:
            raise ValueError("UCaps3D needs 3 decoder_channels, 2 fuse_channels and 2 recon_channels")
        if cls_loss not in _CLS_LOSSES:
            raise ValueError(f"cls_loss must be one of {tuple(_CLS_LOSSES)}, got {cls_loss!r}")
        self.margin_weight, self.recon_weight, self.cls_loss = margin_weight, recon_weight, cls_loss
        c1, c2, c3 = stem_channels
        self.stem = nn.Sequential(
            _conv_block(in_channels, c1, 5),
            _conv_block(c1, c2, 5, dilation=2),
            _conv_block(c2, c3, 5, dilation=2, act="tanh"),
        )
        self.primary = self._caps(1, c3, primary_types, primary_atoms, stride=1, iterations=1,
                                  share_weight=share_weight)
        types = (*encoder_types, num_classes)
        self.encoder = nn.ModuleList()
        t_in, a_in = primary_types, primary_atoms
        for i, (t, a) in enumerate(zip(types, encoder_atoms)):
            self.encoder.append(self._caps(t_in, a_in, t, a, stride=2 if i % 2 == 0 else 1,
                                           iterations=routing_iterations, share_weight=share_weight))
            t_in, a_in = t, a
        # decoder: skip k is the capsule grid at S / 2^(k-1), flattened to channels
        skip1 = primary_types * primary_atoms
        skip2 = encoder_types[1] * encoder_atoms[1]
        skip3 = encoder_types[3] * encoder_atoms[3]
        u1, u2, u3 = decoder_channels
        f1, f2 = fuse_channels
        self.up1 = nn.ConvTranspose3d(num_classes * encoder_atoms[5], u1, 2, stride=2)
        self.fuse1 = _conv_block(u1 + skip3, f1, 3)
        self.up2 = nn.ConvTranspose3d(f1, u2, 2, stride=2)
        self.fuse2 = _conv_block(u2 + skip2, f2, 3)
        self.up3 = nn.ConvTranspose3d(f2, u3, 2, stride=2)
        self.head = nn.Conv3d(u3 + skip1, num_classes, 1)
        r1, r2 = recon_channels
        self.reconstruct = nn.Sequential(
            nn.Conv3d(u3 + skip1, r1, 1), nn.ReLU(),
            nn.Conv3d(r1, r2, 1), nn.ReLU(),
            nn.Conv3d(r2, in_channels, 1), nn.Sigmoid(),
        )

    @staticmethod
    def _caps(t_in: int, a_in: int, t_out: int, a_out: int, stride: int, iterations: int,
              share_weight: bool) -> LocalConvCaps:
        layer = LocalConvCaps(t_in, a_in, t_out, a_out, kernel_size=3, stride=stride, padding=1,
                              spatial_dims=3, routing_iterations=iterations,
                              share_weight=share_weight, bias=True, bias_init=0.1)
        nn.init.normal_(layer.weight, std=0.1)  # the official init (not truncated)
        return layer

    # ------------------------------------------------------------------ forward
    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The capsule encoder: ``[primary, skip 2, skip 3, class capsules]``, each a grid
        ``(B, T, *S', A)`` at ``S``, ``S/2``, ``S/4``, ``S/8``."""
        x = self.stem(images)  # (B, 64, *S)
        u = x.movedim(1, -1).unsqueeze(1)  # one capsule type of 64 atoms: (B, 1, *S, 64)
        grids = [self.primary(u).poses]  # (B, 16, *S, 4)
        x = grids[0]
        for i, layer in enumerate(self.encoder):  # strides 2, 1, 2, 1, 2, 1
            x = layer(x).poses
            if i % 2 == 1:  # (B, 16, *S/2, 8), (B, 8, *S/4, 16), (B, K, *S/8, 64)
                grids.append(x)
        return grids

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> SegmentationOutput:
        self.check_input(images, labels)
        primary, skip2, skip3, classes = self.encode(images)
        lengths = caps_f.capsule_length(classes)  # (B, K, *S/8, 64) -> (B, K, *S/8)
        x = self.up1(_to_channels(classes))  # (B, K*64, *S/8) -> (B, 256, *S/4)
        x = self.fuse1(torch.cat([x, _to_channels(skip3)], dim=1))  # (B, 384, *S/4) -> (B, 128, .)
        x = self.up2(x)  # (B, 128, *S/2)
        x = self.fuse2(torch.cat([x, _to_channels(skip2)], dim=1))  # (B, 256, *S/2) -> (B, 64, .)
        x = self.up3(x)  # (B, 64, *S)
        x = torch.cat([x, _to_channels(primary)], dim=1)  # (B, 128, *S)
        return SegmentationOutput(logits=self.head(x), reconstruction=self.reconstruct(x),
                                  aux={"lengths": lengths})

    # ------------------------------------------------------------------ loss
    def loss(self, out: SegmentationOutput, images: torch.Tensor,
             labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``margin_weight * margin + classification + recon_weight * masked reconstruction``.

        Returns:
            the scalar loss and its detached parts ``margin``, ``cross_entropy`` (or
            ``dice_ce`` / ``dice``) and ``reconstruction``, each before weighting.
        """
        check_labels(labels, images, self.num_classes)
        labels = labels.long()
        margin = ucaps_margin_loss(out.aux["lengths"], labels)
        cls = _classification_loss(self.cls_loss)(out.logits, labels.unsqueeze(1))
        rec = masked_reconstruction_loss(out.reconstruction, images, labels)
        total = self.margin_weight * margin + cls + self.recon_weight * rec
        return total, {"margin": margin.detach(), _CLS_LOSSES[self.cls_loss]: cls.detach(),
                       "reconstruction": rec.detach()}

    # ------------------------------------------------------------------ pretraining
    def pretext(self, images: torch.Tensor) -> SegmentationOutput:
        """Self-reconstruction pass (this project's reading of SS-3DCapsNet): the whole network
        on a transformed volume; ``out.reconstruction`` is compared with the original volume
        by :func:`pretext_loss`. Same computation as :meth:`forward` without labels."""
        return self.forward(images)

    def pretext_loss(self, out: SegmentationOutput,
                     targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """See :func:`pretext_loss`."""
        return pretext_loss(out, targets)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's entries of :meth:`state_dict` (names under :data:`ENCODER_PREFIXES`)."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(ENCODER_PREFIXES)}

    def load_encoder_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy a pretrained encoder into this model; other entries of ``state_dict`` (a
        whole pretext model's, say) are ignored.

        Raises:
            KeyError: an encoder entry is missing.
            ValueError: an entry has another shape (the pretext model was built with other
                widths, ``in_channels`` or ``num_classes``).
        """
        own = self.encoder_state_dict()
        missing = [k for k in own if k not in state_dict]
        if missing:
            raise KeyError(f"the state dict lacks {len(missing)} encoder entries of UCaps3D, e.g. "
                           f"{missing[0]!r}")
        for k, v in own.items():
            if tuple(state_dict[k].shape) != tuple(v.shape):
                raise ValueError(f"encoder entry {k!r} has shape {tuple(state_dict[k].shape)}, this "
                                 f"model needs {tuple(v.shape)} (build the pretext model with the "
                                 "same widths, in_channels and num_classes)")
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(state_dict[k])


def ucaps_margin_loss(lengths: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """3D-UCaps' margin loss on downsampled labels (see the module docstring).

    Args:
        lengths: class-capsule lengths ``(B, K, *S')``.
        labels: class indices ``(B, *S)``, ``S`` a multiple of ``S'``.

    Returns:
        ``0.5 * margin_loss(m+ = 0.7, m- = 0.3, lambda = 0.5)`` averaged over batch and positions.
    """
    k = lengths.shape[1]
    onehot = F.one_hot(labels.long(), k).movedim(-1, 1).to(lengths.dtype)  # (B, K, *S)
    targets = F.interpolate(onehot, size=lengths.shape[2:], mode="trilinear",
                            align_corners=False)  # (B, K, *S'), soft at object boundaries
    flat_len = lengths.movedim(1, -1).reshape(-1, k)  # (B * prod(S'), K)
    flat_t = targets.movedim(1, -1).reshape(-1, k)
    return 0.5 * caps_f.margin_loss(flat_len, flat_t, m_pos=0.7, m_neg=0.3, lambda_neg=0.5)


def masked_reconstruction_loss(reconstruction: torch.Tensor, images: torch.Tensor,
                               labels: torch.Tensor) -> torch.Tensor:
    """Squared error on foreground voxels (``label > 0``), summed over channels and voxels,
    divided by the foreground voxel count (+1e-8), averaged over the batch (official form)."""
    mask = (labels > 0).unsqueeze(1).to(images.dtype)  # (B, 1, *S)
    sq = ((reconstruction - images) * mask).pow(2).flatten(1).sum(dim=1)  # (B,)
    return (sq / (mask.flatten(1).sum(dim=1) + 1e-8)).mean()


def _classification_loss(kind: str) -> nn.Module:
    try:
        from monai.losses import DiceCELoss
    except ImportError as e:  # pragma: no cover - monai is a test dependency
        raise ImportError("UCaps3D's loss uses MONAI's DiceCELoss: pip install 'torchcaps[medical]'") from e
    if kind == "ce":
        return DiceCELoss(softmax=True, to_onehot_y=True, lambda_dice=0.0)
    if kind == "dice":
        return DiceCELoss(softmax=True, to_onehot_y=True, lambda_ce=0.0)
    return DiceCELoss(softmax=True, to_onehot_y=True)


# ---------------------------------------------------------------------- pretext task
def pretext_batch(
    volumes: torch.Tensor,
    generator: torch.Generator,
    transforms: tuple[str, ...] = PRETEXT_TRANSFORMS,
    mask_fraction: tuple[float, float] = (0.125, 0.5),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pretext examples: transformed volumes and the originals to reconstruct.

    This project's interpretation of SS-3DCapsNet's self-reconstruction pretext (the paper's
    transformations could not be verified; see the module docstring). Per volume, in order:

    * ``"flip"``: each spatial axis flipped with probability 1/2;
    * ``"rotate"``: a rotation by ``k * 90`` degrees (``k`` uniform in 0..3) in one of the
      three axis planes (uniform); in a plane whose two sizes differ only ``k`` = 0 or 2;
    * ``"mask"``: one cuboid set to zero, each side uniform in ``mask_fraction`` of the axis
      (at least one voxel), placed uniformly inside the volume.

    Every volume draws the same number of values (11 uniforms) from ``generator`` whatever
    the transforms and sizes, so a run that restores the generator state makes the same
    examples.

    Args:
        volumes: ``(B, C, D, H, W)`` float volumes (in ``[0, 1]`` for the sigmoid
            reconstruction).
        generator: the source of randomness (any device).
        transforms: a subset of :data:`PRETEXT_TRANSFORMS`.
        mask_fraction: ``(low, high)`` side of the cuboid as a fraction of each axis.

    Returns:
        ``(inputs, targets)``, both ``(B, C, D, H, W)``; ``targets`` is a copy of ``volumes``.
    """
    check_tensor(volumes, "volumes", ("B", "C", "D", "H", "W"))
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    unknown = [t for t in transforms if t not in PRETEXT_TRANSFORMS]
    if unknown:
        raise ValueError(f"unknown pretext transforms {unknown}; choose from {PRETEXT_TRANSFORMS}")
    lo_f, hi_f = mask_fraction
    if not 0 < lo_f <= hi_f <= 1:
        raise ValueError(f"mask_fraction must satisfy 0 < low <= high <= 1, got {mask_fraction}")
    b = volumes.shape[0]
    draws = torch.rand(b, 11, generator=generator, device=generator.device).tolist()
    planes = ((1, 2), (1, 3), (2, 3))  # axis pairs of one volume (C, D, H, W)
    inputs = []
    for x, r in zip(volumes, draws):
        if "flip" in transforms:
            axes = [a + 1 for a in range(3) if r[a] < 0.5]
            if axes:
                x = x.flip(axes)
        if "rotate" in transforms:
            k, plane = min(int(r[3] * 4), 3), planes[min(int(r[4] * 3), 2)]
            if x.shape[plane[0]] != x.shape[plane[1]]:
                k = 2 * (k // 2)  # 0 or 180 degrees keep a non-square plane's shape
            if k:
                x = torch.rot90(x, k, plane)
        if "mask" in transforms:
            x = x.clone()
            box = []
            for a, n in enumerate(x.shape[1:]):
                lo = max(1, round(lo_f * n))
                hi = max(lo, round(hi_f * n))
                side = min(lo + int(r[5 + a] * (hi - lo + 1)), hi)
                start = min(int(r[8 + a] * (n - side + 1)), n - side)
                box.append(slice(start, start + side))
            x[(slice(None), *box)] = 0
        inputs.append(x)
    return torch.stack(inputs).contiguous(), volumes.clone()


def pretext_loss(out: SegmentationOutput | torch.Tensor,
                 targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean squared error between the reconstruction and the original volumes.

    Args:
        out: a :class:`SegmentationOutput` (its ``reconstruction``) or the reconstruction.
        targets: the original volumes from :func:`pretext_batch`.

    Returns:
        the loss and ``{"reconstruction": loss.detach()}``.
    """
    rec = out.reconstruction if isinstance(out, SegmentationOutput) else out
    if rec is None:
        raise ValueError("the model output has no reconstruction; the pretext task needs one")
    check_tensor(targets, "targets", tuple(rec.shape))
    loss = F.mse_loss(rec, targets)
    return loss, {"reconstruction": loss.detach()}


@register_model(task="segmentation")
def ucaps3d(in_channels: int = 1, num_classes: int = 2, **kwargs) -> UCaps3D:
    """3D-UCaps (Nguyen et al. 2021); ``in_channels=2, num_classes=4`` is the official iSeg-2017
    model, 3,367,274 parameters."""
    return UCaps3D(in_channels=in_channels, num_classes=num_classes, **kwargs)

