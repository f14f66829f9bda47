"""Generative adversarial pairs: a DCGAN baseline and three capsule GANs, for 28x28 digits.

Letter legend: ``B`` batch, ``Z`` latent size, ``K`` classes, ``C, H, W`` image channels and
size, ``J`` top (class or latent) capsules, ``E`` their pose size, ``P = H/4 * W/4`` grid
positions of the part capsules, ``T`` part-capsule types, ``D`` part pose size, ``I``
primary capsules of a capsule discriminator.

Every builder takes ``image_shape=(C, H, W)``, ``latent_dim`` and ``num_classes`` (0: an
unconditional model) and returns a :class:`GANPair`. A pair generates images in
``[-1, 1]`` (tanh output; real images are scaled to the same range for training) and
scores images with its discriminator; its two losses are those of its discriminator's kind.

=========================  ======================  ==========================  ===========
builder                    generator               discriminator               loss
=========================  ======================  ==========================  ===========
``dcgan``                  DCGAN                   DCGAN                       BCE
``capsule_gan``            DCGAN                   CapsNet, one capsule        margin
``capsule_generator_gan``  capsules -> deconvs     DCGAN                       BCE
``capsule_both_gan``       capsules -> deconvs     CapsNet, one capsule        margin
=========================  ======================  ==========================  ===========

Parameter counts at the defaults (1x28x28, ``latent_dim=100``; the test suite checks them).
The largest pair has 1.4x the parameters of the smallest; the capsule discriminator costs
about twice the DCGAN discriminator's multiply-adds (13M against 6.6M per image)::

    =========================  ==========  =============  ==========  ==================
    model                      generator   discriminator  total       total, K=10 classes
    =========================  ==========  =============  ==========  ==================
    dcgan                        759,681       138,689       898,370          1,007,746
    capsule_gan                  759,681       408,256     1,167,937          1,278,881
    capsule_generator_gan        584,737       138,689       723,426            732,290
    capsule_both_gan             584,737       408,256       992,993          1,003,425
    =========================  ==========  =============  ==========  ==================

DCGAN (Radford, Metz, Chintala 2016, arXiv 1511.06434). What we follow, as quoted from the
paper's training details (checked through a public write-up that quotes them verbatim):
weights drawn from N(0, 0.02), LeakyReLU slope 0.2 in the discriminator, ReLU in the
generator with a tanh output, batch normalisation everywhere except the generator's output
and the discriminator's input layer, Adam at 2e-4 with beta1 = 0.5 (the training
defaults of ``torchcaps gan train``). Sized here for 28x28 (the paper's nets are 64x64):

    generator      z (B, Z) -> Linear -> (B, 2w, H/4, W/4), BN, ReLU
                   -> ConvT 4x4 s2 -> (B, w, H/2, W/2), BN, ReLU
                   -> ConvT 4x4 s2 -> (B, C, H, W), tanh                       (w = 64)
    discriminator  (B, C, H, W) -> Conv 4x4 s2 -> (B, w, H/2, W/2), LeakyReLU
                   -> Conv 4x4 s2 -> (B, 2w, H/4, W/4), BN, LeakyReLU
                   -> flatten -> Linear -> logit (B,)

Class-conditional variant (``num_classes > 0``), in the manner of the conditional GAN of
Mirza & Osindero 2014: the generator's input is ``z`` concatenated with a learned label
embedding ``(B, 16)``; the discriminator sees a learned per-class ``H x W`` map as one more
input channel. The losses are unchanged.

CapsuleGAN (Jaiswal, AbdAlmageed, Wu, Natarajan 2018, arXiv 1802.06167). Verified from the
paper's abstract (the body could not be read here): the discriminator is a capsule network
instead of a CNN, and the GAN objective "incorporates the CapsNet margin loss". The rest
is this project's reading: the discriminator is CapsNet (Sabour et al. 2017) cut down to
CPU size, ending in ONE output capsule whose length ``|v|`` is the probability that the
image is real, and the margin loss ``L_M(|v|, T) = T max(0, m+ - |v|)^2 + lambda (1 - T)
max(0, |v| - m-)^2`` (``m+ = 0.9, m- = 0.1, lambda = 0.5``) replaces binary cross-entropy:

    discriminator  minimise  L_M(D(x), T=1) + L_M(D(G(z)), T=0)
    generator      minimise  L_M(D(G(z)), T=1)         (the non-saturating form)

as we recall the paper's Eq. (the form of the objective could not be checked here). The
network: Conv 9x9 (32) LeakyReLU -> PrimaryCaps 16 types x 8D, 9x9 s2 (6x6x16 = 576
capsules) -> CapsLinear to one 16D capsule with dynamic routing (3 iterations), its vote
matrices drawn from N(0, 0.05^2) (CapsNet: 0.01; see :class:`CapsuleDiscriminator`). Note: with
a single parent the routing softmax over parents is identically 1, so the couplings never
change and routing reduces to the plain sum of the votes, whatever the number of
iterations; this is a property of the one-capsule design. ``routing_kwargs={"leaky":
True}`` (the official CapsNet code's leaky routing: an extra "none of the above" logit)
makes the couplings of each primary capsule a learned, input-dependent gate. A
conditional capsule discriminator takes the label as the DCGAN one does, as an extra
learned input channel.

Capsule generator (Marusaki & Watanabe 2020, arXiv 2003.08047, "Capsule GAN Using Capsule
Network for Generator Architecture"). Verified from the abstract only (the paper's body was
not reachable here): it proposes two ways to use capsules in the generator, (1) feeding the
generator with the DigitCaps layer of the discriminator and (2) "the reverse operation of
the recognition process in Capsule Network", and compares against a CNN GAN and a GAN with
a capsule discriminator only, on MNIST, Fashion-MNIST and colour images. The architecture
below is THIS PROJECT'S INTERPRETATION of approach (2), not the paper's network:

    z (B, Z) -> Linear -> top capsules (B, J, E), squash        (J = 10, E = 16)
       conditional: J = K class capsules, all but the label's masked to zero (as the
       CapsNet decoder masks the class capsules)
    -> whole-to-part capsule layer (:class:`PartCaps`): at every position p of an
       H/4 x W/4 grid, each top capsule j votes for each part type t,
       u_hat[p, j, t] = g W[p, j, t] u_j, and dynamic routing (3 iterations) with the top
       capsules as children and the T part types as parents gives the part poses
       (B, P, T, D) (T = 8, D = 8): recognition run backwards, the wholes choosing which
       parts they explain at each position
    -> part poses as a feature map (B, T*D, H/4, W/4) (channel t*D + d, the inverse of
       PrimaryCaps' regrouping), BN, ReLU
    -> ConvT 4x4 s2 -> (B, w, H/2, W/2), BN, ReLU -> ConvT 4x4 s2 -> (B, C, H, W), tanh

The vote gain ``g`` (20) is a constant: the squash is nearly flat (``|v| ~ |s|^2``) for
short vectors and only one (conditional) or ten top capsules vote, each at coupling 1/8
at first, so votes of ``W u`` with a small ``W`` give part poses whose variance is far
below batch normalisation's epsilon (measured at initialisation, conditional: part
lengths 4e-5 with ``g = 1``, 0.1 with ``g = 20``; unconditional: 5e-4 and 0.6). ``W``
starts at N(0, 0.05^2), so that Adam's steps stay relative to its size, while ``g W``
starts at unit scale. The linear map to the top capsules keeps PyTorch's default
initialisation (their lengths start near 0.85); the transposed convolutions and batch
norms take DCGAN's. The capsule generator is paired with the DCGAN discriminator
(``capsule_generator_gan``) or with the capsule discriminator (``capsule_both_gan``).

Distributed training: a pair is trained in one process (see :mod:`torchcaps.train.gan`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as tf

from .._validate import check_tensor
from ..functional import capsule_length, margin_loss, squash
from ..layers import CapsLinear, PrimaryCaps
from ..routing import create_routing
from ._registry import register_model

__all__ = [
    "GANPair",
    "DCGANGenerator",
    "DCGANDiscriminator",
    "CapsuleDiscriminator",
    "CapsuleGenerator",
    "PartCaps",
    "dcgan_init",
    "dcgan",
    "capsule_gan",
    "capsule_generator_gan",
    "capsule_both_gan",
    "GAN_MODELS",
]

#: the registered generative pairs, in the order of the module docstring's table
GAN_MODELS = ("dcgan", "capsule_gan", "capsule_generator_gan", "capsule_both_gan")
_LEAK = 0.2  # LeakyReLU slope of the discriminators (Radford et al.)
_EMBED = 16  # size of the generator's label embedding in conditional models


def _shape(image_shape) -> tuple[int, int, int]:
    if len(image_shape) != 3 or any(int(s) != s or s < 1 for s in image_shape):
        raise ValueError(f"image_shape must be three positive sizes (C, H, W), got {image_shape!r}")
    c, h, w = (int(s) for s in image_shape)
    if h % 4 or w % 4:
        raise ValueError(f"image_shape {c}x{h}x{w}: the generators upsample twice by 2, so H "
                         "and W must be multiples of 4")
    return c, h, w


def _check_sizes(latent_dim, num_classes) -> None:
    if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim < 1:
        raise ValueError(f"latent_dim must be a positive integer, got {latent_dim!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be an integer >= 0 (0: unconditional), got {num_classes!r}")


def dcgan_init(module: nn.Module) -> None:
    """Radford et al.'s initialisation: conv, transposed-conv and linear weights from
    N(0, 0.02), biases 0; batch-norm scales from N(1, 0.02), shifts 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class _LabelMap(nn.Module):
    """A learned ``H x W`` map per class, the extra input channel of a conditional
    discriminator. Shape: labels ``(B,)`` -> ``(B, 1, H, W)``."""

    def __init__(self, num_classes: int, h: int, w: int) -> None:
        super().__init__()
        self.h, self.w = h, w
        self.embed = nn.Embedding(num_classes, h * w)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embed(labels).view(-1, 1, self.h, self.w)


def _with_label_channel(label_map: _LabelMap | None, images: torch.Tensor,
                        labels: torch.Tensor | None) -> torch.Tensor:
    if label_map is None:
        return images
    return torch.cat([images, label_map(labels).to(images.dtype)], dim=1)  # (B, C+1, H, W)


def _upsampler(in_channels: int, width: int, out_channels: int) -> nn.Sequential:
    """Two 4x4 stride-2 transposed convolutions: ``(B, in, h, w)`` -> ``(B, out, 4h, 4w)``."""
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, width, 4, 2, 1, bias=False),  # (B, w, 2h, 2w)
        nn.BatchNorm2d(width), nn.ReLU(),
        nn.ConvTranspose2d(width, out_channels, 4, 2, 1), nn.Tanh(),  # (B, C, 4h, 4w)
    )


# ---------------------------------------------------------------------- generators
class DCGANGenerator(nn.Module):
    """DCGAN generator for ``H x W`` images, ``H, W`` multiples of 4 (module docstring).

    Args:
        image_shape: ``(C, H, W)``.
        latent_dim: ``Z``.
        num_classes: ``K``; > 0 concatenates a learned label embedding to ``z``.
        width: channels ``w`` at ``H/2``; ``2w`` at ``H/4``.

    Shape:
        ``z (B, Z)``, labels ``(B,)`` -> images ``(B, C, H, W)`` in ``[-1, 1]``.
    """

    def __init__(self, image_shape=(1, 28, 28), latent_dim: int = 100, num_classes: int = 0,
                 width: int = 64) -> None:
        super().__init__()
        c, h, w = _shape(image_shape)
        self.grid = (h // 4, w // 4)
        self.embed = nn.Embedding(num_classes, _EMBED) if num_classes else None
        n_in = latent_dim + (_EMBED if num_classes else 0)
        self.project = nn.Linear(n_in, 2 * width * self.grid[0] * self.grid[1], bias=False)
        self.bn = nn.BatchNorm2d(2 * width)
        self.up = _upsampler(2 * width, width, c)
        dcgan_init(self)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(labels).to(z.dtype)], dim=1)  # (B, Z + 16)
        x = self.project(z).view(z.shape[0], -1, *self.grid)  # (B, 2w, H/4, W/4)
        return self.up(torch.relu(self.bn(x)))  # (B, C, H, W)


class PartCaps(nn.Module):
    """Whole-to-part capsules: top capsules vote for the part capsules of a grid.

    At each of the ``P`` grid positions, top capsule ``j`` votes
    ``u_hat[b, p, j, t] = gain * W[p, j, t] @ u[b, j]`` for part type ``t``; each position is
    one routing problem (children: the ``J`` top capsules; parents: the ``T`` part types),
    and all ``B * P`` of them are routed in one call. This project's interpretation of
    "the reverse operation of the recognition process" (Marusaki & Watanabe 2020).

    Args:
        in_caps, in_dim: ``J`` top capsules of ``E`` values.
        grid: ``(h, w)`` of the part grid.
        types, dim: ``T`` part types of ``D`` values.
        routing: a registered routing name ("dynamic").
        routing_kwargs: options of the routing (``iterations`` etc.).
        gain: the constant vote gain ``g`` (see the module docstring).
        init_std: standard deviation of the initial ``W``.

    Shape:
        ``u (B, J, E)`` -> part poses ``(B, P, T, D)`` and couplings ``(B, P, J, T)``
        (summing to 1 over ``T`` for dynamic routing).
    """

    def __init__(self, in_caps: int, in_dim: int, grid: tuple[int, int], types: int, dim: int,
                 routing: str = "dynamic", routing_kwargs: dict | None = None,
                 gain: float = 20.0, init_std: float = 0.05) -> None:
        super().__init__()
        self.in_caps, self.in_dim, self.types, self.dim = in_caps, in_dim, types, dim
        self.grid = (int(grid[0]), int(grid[1]))
        positions = self.grid[0] * self.grid[1]
        self.gain = float(gain)
        self.weight = nn.Parameter(torch.randn(positions, in_caps, types * dim, in_dim) * init_std)
        self.routing = create_routing(routing, num_parents=types, parent_dim=dim,
                                      **(routing_kwargs or {}))

    def forward(self, u: torch.Tensor):
        check_tensor(u, "PartCaps input", ("B", self.in_caps, self.in_dim), finite=False)
        b = u.shape[0]
        p = self.weight.shape[0]
        # (B, J, E) x (P, J, T*D, E) -> (B, P, J, T*D): every top capsule's votes at every position
        votes = torch.einsum("bje,pjke->bpjk", u, self.weight) * self.gain
        votes = votes.reshape(b * p, self.in_caps, self.types, self.dim)  # (B*P, J, T, D)
        out = self.routing(votes)  # poses (B*P, T, D), couplings (B*P, J, T)
        poses = out.poses.view(b, p, self.types, self.dim)
        return poses, out.couplings.view(b, p, self.in_caps, self.types)

    def extra_repr(self) -> str:
        return (f"in_caps={self.in_caps}, in_dim={self.in_dim}, grid={self.grid}, "
                f"types={self.types}, dim={self.dim}, gain={self.gain}")


class CapsuleGenerator(nn.Module):
    """Capsule generator: top capsules -> part capsules on a grid -> transposed convolutions.

    This project's interpretation of Marusaki & Watanabe 2020 (see the module docstring).

    Args:
        image_shape: ``(C, H, W)``.
        latent_dim: ``Z``.
        num_classes: ``K``; > 0: ``K`` class capsules, all but the label's masked to zero.
        top_caps: ``J`` latent capsules of an unconditional generator (10).
        top_dim: ``E`` (16, the size of CapsNet's class capsules).
        part_types, part_dim: ``T`` and ``D`` of the part capsules (8, 8).
        width: channels of the middle transposed convolution (64).
        routing_iterations: of the whole-to-part routing (3).
        routing_kwargs: other options of the dynamic routing.
        gain: vote gain of :class:`PartCaps`.

    Shape:
        ``z (B, Z)``, labels ``(B,)`` -> images ``(B, C, H, W)`` in ``[-1, 1]``.
    """

    def __init__(self, image_shape=(1, 28, 28), latent_dim: int = 100, num_classes: int = 0,
                 top_caps: int = 10, top_dim: int = 16, part_types: int = 8, part_dim: int = 8,
                 width: int = 64, routing_iterations: int = 3, routing_kwargs: dict | None = None,
                 gain: float = 20.0) -> None:
        super().__init__()
        c, h, w = _shape(image_shape)
        self.num_classes = num_classes
        self.top_caps = num_classes or top_caps
        self.top_dim = top_dim
        self.top = nn.Linear(latent_dim, self.top_caps * top_dim)
        kwargs = {"iterations": routing_iterations, **(routing_kwargs or {})}
        self.parts = PartCaps(self.top_caps, top_dim, (h // 4, w // 4), part_types, part_dim,
                              "dynamic", kwargs, gain=gain)
        self.bn = nn.BatchNorm2d(part_types * part_dim)
        self.up = _upsampler(part_types * part_dim, width, c)
        dcgan_init(self.bn)
        dcgan_init(self.up)

    def top_capsules(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The squashed top capsules ``(B, J, E)``, masked to the label's in a conditional model."""
        u = squash(self.top(z).view(z.shape[0], self.top_caps, self.top_dim))  # (B, J, E)
        if self.num_classes:
            mask = tf.one_hot(labels.long(), self.num_classes).to(u.dtype)  # (B, K)
            u = u * mask.unsqueeze(-1)
        return u

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        u = self.top_capsules(z, labels)
        poses, _ = self.parts(u)  # (B, P, T, D)
        b, p, t, d = poses.shape
        gh, gw = self.parts.grid
        # (B, h, w, T, D) -> (B, T, D, h, w) -> channels t*D + d: PrimaryCaps' regrouping, inverted
        x = poses.view(b, gh, gw, t, d).permute(0, 3, 4, 1, 2).reshape(b, t * d, gh, gw)
        return self.up(torch.relu(self.bn(x)))  # (B, C, H, W)


# ---------------------------------------------------------------------- discriminators
class DCGANDiscriminator(nn.Module):
    """DCGAN discriminator (module docstring); scores are logits.

    Args:
        image_shape: ``(C, H, W)``.
        num_classes: ``K``; > 0 adds a learned per-class input channel.
        width: channels ``w`` at ``H/2``; ``2w`` at ``H/4``.

    Shape:
        images ``(B, C, H, W)``, labels ``(B,)`` -> logits ``(B,)``.
    """

    kind = "logit"

    def __init__(self, image_shape=(1, 28, 28), num_classes: int = 0, width: int = 64) -> None:
        super().__init__()
        c, h, w = _shape(image_shape)
        self.label_map = _LabelMap(num_classes, h, w) if num_classes else None
        c_in = c + (1 if num_classes else 0)
        self.features = nn.Sequential(
            nn.Conv2d(c_in, width, 4, 2, 1), nn.LeakyReLU(_LEAK),  # (B, w, H/2, W/2)
            nn.Conv2d(width, 2 * width, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(_LEAK),  # (B, 2w, H/4, W/4)
        )
        self.out = nn.Linear(2 * width * (h // 4) * (w // 4), 1)
        dcgan_init(self.features)
        dcgan_init(self.out)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = self.features(_with_label_channel(self.label_map, images, labels))
        return self.out(x.flatten(1)).squeeze(1)  # (B,)


class CapsuleDiscriminator(nn.Module):
    """CapsNet discriminator with one output capsule (CapsuleGAN); scores are its lengths.

    Args:
        image_shape: ``(C, H, W)``, ``H, W >= 17``.
        num_classes: ``K``; > 0 adds a learned per-class input channel.
        conv_channels: channels of the 9x9 convolution (32; CapsNet: 256).
        primary_types, primary_dim: primary capsules (16 x 8D; CapsNet: 32 x 8D).
        out_dim: size of the output capsule (16).
        routing_iterations: dynamic-routing iterations (3).
        routing_kwargs: other routing options (``leaky``, ``bias``, ``detach_inner``).
        init_std: of the normal initialisation of the vote matrices (0.05; CapsNet: 0.01).
            With one parent every vote enters the output at coupling 1 and the output is
            squashed once: at 0.01 the output lengths start near 0.07 for real digits and
            0.001 for a fresh generator's grey images, where the squash is flat
            (``|v| ~ |s|^2``) and the margin loss has almost no gradient; at 0.05 they
            start between 0.3 and 0.6.

    Shape:
        images ``(B, C, H, W)``, labels ``(B,)`` -> lengths ``(B,)`` in ``[0, 1)``.
    """

    kind = "length"

    def __init__(self, image_shape=(1, 28, 28), num_classes: int = 0, conv_channels: int = 32,
                 primary_types: int = 16, primary_dim: int = 8, out_dim: int = 16,
                 routing_iterations: int = 3, routing_kwargs: dict | None = None,
                 init_std: float = 0.05) -> None:
        super().__init__()
        c, h, w = _shape(image_shape)
        if h < 17 or w < 17:
            raise ValueError(f"image_shape {c}x{h}x{w}: the capsule discriminator needs at least "
                             "17x17 (9x9 convolution, then 9x9 stride-2 primary capsules)")
        self.label_map = _LabelMap(num_classes, h, w) if num_classes else None
        self.conv = nn.Conv2d(c + (1 if num_classes else 0), conv_channels, 9)
        self.primary = PrimaryCaps(conv_channels, primary_types, primary_dim, kernel_size=9, stride=2)
        kwargs = {"iterations": routing_iterations, **(routing_kwargs or {})}
        self.caps = CapsLinear(self.primary.num_capsules(h - 8, w - 8), primary_dim, 1, out_dim,
                               "dynamic", kwargs, init_std=init_std)

    def capsule(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The output capsule ``(B, out_dim)``."""
        x = tf.leaky_relu(self.conv(_with_label_channel(self.label_map, images, labels)), _LEAK)
        u = self.primary(x)  # (B, I, 8), I = 576 at 28x28
        return self.caps(u).poses[:, 0]  # (B, 1, 16) -> (B, 16)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return capsule_length(self.capsule(images, labels))  # (B,)


# ---------------------------------------------------------------------- the pair
class GANPair(nn.Module):
    """A generator and a discriminator trained against each other.

    Args:
        generator: ``(z, labels) -> images`` in ``[-1, 1]``.
        discriminator: ``(images, labels) -> scores (B,)``; its ``kind`` (``"logit"`` or
            ``"length"``) selects the losses: binary cross-entropy on logits, or the margin
            loss on capsule lengths (CapsuleGAN).
        image_shape, latent_dim, num_classes: what the generator makes and takes.
        margin: ``(m+, m-, lambda)`` of the margin loss (Sabour et al.: 0.9, 0.1, 0.5).

    The losses (``B`` real and ``B`` generated images per step):

        logits   D: BCE(D(x), 1) + BCE(D(G(z)), 0)      G: BCE(D(G(z)), 1)
        lengths  D: L_M(D(x), 1) + L_M(D(G(z)), 0)      G: L_M(D(G(z)), 1)

    each term a batch mean; the generator's is the non-saturating form of Goodfellow et
    al. 2014 (and of CapsuleGAN's practice, module docstring).
    """

    def __init__(self, generator: nn.Module, discriminator: nn.Module, image_shape=(1, 28, 28),
                 latent_dim: int = 100, num_classes: int = 0,
                 margin: tuple[float, float, float] = (0.9, 0.1, 0.5)) -> None:
        super().__init__()
        _check_sizes(latent_dim, num_classes)
        if getattr(discriminator, "kind", None) not in ("logit", "length"):
            raise ValueError("the discriminator must declare kind = 'logit' or 'length'")
        self.generator, self.discriminator = generator, discriminator
        self.image_shape = _shape(image_shape)
        self.latent_dim, self.num_classes = latent_dim, num_classes
        self.kind = discriminator.kind
        self.margin = tuple(float(m) for m in margin)
        #: the pixel range of generated images (and of the real images they are trained on)
        self.output_range = (-1.0, 1.0)

    # ------------------------------------------------------------------ checks
    def _labels(self, labels: torch.Tensor | None, b: int) -> torch.Tensor | None:
        if not self.num_classes:
            if labels is not None:
                raise ValueError("labels were given to an unconditional model (num_classes=0)")
            return None
        if labels is None:
            raise ValueError(f"this model is class-conditional ({self.num_classes} classes): "
                             "pass labels")
        if labels.shape != (b,) or labels.is_floating_point():
            raise ValueError(f"labels must be integer class indices of shape ({b},), got "
                             f"{labels.dtype} {tuple(labels.shape)}")
        if b and not torch.compiler.is_compiling() and (
                int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes})")
        return labels

    # ------------------------------------------------------------------ passes
    def generate(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Images ``(B, C, H, W)`` in ``[-1, 1]`` from latents ``(B, Z)``."""
        check_tensor(z, "z", ("B", self.latent_dim), finite=False)
        return self.generator(z, self._labels(labels, z.shape[0]))

    def discriminate(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Scores ``(B,)``: logits, or capsule lengths in ``[0, 1)``."""
        check_tensor(images, "images", ("B", *self.image_shape), finite=False)
        return self.discriminator(images, self._labels(labels, images.shape[0]))

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor | None = None,
                mode: str = "generate") -> torch.Tensor:
        """``mode="generate"``: :meth:`generate` on latents; ``"discriminate"``:
        :meth:`discriminate` on images (one entry point, so that a compiled or wrapped
        module serves both)."""
        if mode == "generate":
            return self.generate(inputs, labels)
        if mode == "discriminate":
            return self.discriminate(inputs, labels)
        raise ValueError(f"mode must be 'generate' or 'discriminate', got {mode!r}")

    def real_probability(self, scores: torch.Tensor) -> torch.Tensor:
        """How sure the discriminator is that an image is real: ``sigmoid(logit)`` or the
        capsule length; a score is called "real" above 0.5."""
        return torch.sigmoid(scores) if self.kind == "logit" else scores

    # ------------------------------------------------------------------ losses
    def _margin(self, lengths: torch.Tensor, target: float) -> torch.Tensor:
        m_pos, m_neg, lam = self.margin
        t = torch.full_like(lengths, target).unsqueeze(1)  # (B, 1)
        return margin_loss(lengths.unsqueeze(1), t, m_pos, m_neg, lam)

    def _term(self, scores: torch.Tensor, target: float) -> torch.Tensor:
        if self.kind == "logit":
            return tf.binary_cross_entropy_with_logits(scores, torch.full_like(scores, target))
        return self._margin(scores, target)

    def discriminator_loss(self, real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
        """The discriminator's loss on the scores of real and generated images."""
        return self._term(real_scores, 1.0) + self._term(fake_scores, 0.0)

    def generator_loss(self, fake_scores: torch.Tensor) -> torch.Tensor:
        """The generator's (non-saturating) loss on the scores of its images."""
        return self._term(fake_scores, 1.0)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, n: int, labels: torch.Tensor | None = None,
               generator: torch.Generator | None = None, batch_size: int = 256) -> torch.Tensor:
        """``n`` images in ``[0, 1]`` ``(n, C, H, W)``, in eval mode, from ``N(0, I)`` latents
        drawn with ``generator`` (the global RNG when None). A conditional model needs
        ``labels (n,)``."""
        was = self.training
        self.eval()
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, generator=generator)
        out = []
        try:
            for i in range(0, n, batch_size):
                lab = None if labels is None else labels[i:i + batch_size].to(device)
                out.append(self.generate(z[i:i + batch_size].to(device), lab).float().cpu())
        finally:
            self.train(was)
        x = torch.cat(out) if out else torch.empty(0, *self.image_shape)
        return ((x + 1.0) / 2.0).clamp_(0.0, 1.0)

    def parameter_counts(self) -> dict[str, int]:
        """``{"generator": ..., "discriminator": ..., "total": ...}``."""
        g = sum(p.numel() for p in self.generator.parameters())
        d = sum(p.numel() for p in self.discriminator.parameters())
        return {"generator": g, "discriminator": d, "total": g + d}


# ---------------------------------------------------------------------- builders
_CAPS_G_KEYS = {"top_caps", "top_dim", "part_types", "part_dim", "gain", "g_width",
                "g_routing_iterations", "g_routing_kwargs"}
_CAPS_D_KEYS = {"conv_channels", "primary_types", "primary_dim", "out_dim", "routing_iterations",
                "routing_kwargs", "init_std"}


def _split(kwargs: dict, allowed: set[str], model: str) -> None:
    unknown = sorted(set(kwargs) - allowed - {"margin"})
    if unknown:
        raise TypeError(f"{model} got unexpected arguments {unknown}; it takes image_shape, "
                        f"latent_dim, num_classes, {', '.join(sorted(allowed | {'margin'}))}")


def _dcgan_g(shape, latent_dim, num_classes, kw):
    return DCGANGenerator(shape, latent_dim, num_classes, kw.get("g_width", 64))


def _dcgan_d(shape, num_classes, kw):
    return DCGANDiscriminator(shape, num_classes, kw.get("d_width", 64))


def _caps_g(shape, latent_dim, num_classes, kw):
    return CapsuleGenerator(shape, latent_dim, num_classes, top_caps=kw.get("top_caps", 10),
                            top_dim=kw.get("top_dim", 16), part_types=kw.get("part_types", 8),
                            part_dim=kw.get("part_dim", 8), width=kw.get("g_width", 64),
                            routing_iterations=kw.get("g_routing_iterations", 3),
                            routing_kwargs=kw.get("g_routing_kwargs"), gain=kw.get("gain", 20.0))


def _caps_d(shape, num_classes, kw):
    return CapsuleDiscriminator(shape, num_classes, conv_channels=kw.get("conv_channels", 32),
                                primary_types=kw.get("primary_types", 16),
                                primary_dim=kw.get("primary_dim", 8), out_dim=kw.get("out_dim", 16),
                                routing_iterations=kw.get("routing_iterations", 3),
                                routing_kwargs=kw.get("routing_kwargs"),
                                init_std=kw.get("init_std", 0.05))


def _pair(name, g, d, image_shape, latent_dim, num_classes, kw, allowed):
    _check_sizes(latent_dim, num_classes)
    _split(kw, allowed, name)
    shape = _shape(image_shape)
    margin = tuple(kw.get("margin", (0.9, 0.1, 0.5)))
    return GANPair(g(shape, latent_dim, num_classes, kw), d(shape, num_classes, kw), shape,
                   latent_dim, num_classes, margin)


@register_model(task="generation")
def dcgan(image_shape=(1, 28, 28), latent_dim: int = 100, num_classes: int = 0, **kwargs) -> GANPair:
    """DCGAN (Radford et al. 2016) for 28x28: 898,370 parameters. Options: ``g_width``,
    ``d_width`` (64)."""
    return _pair("dcgan", _dcgan_g, _dcgan_d, image_shape, latent_dim, num_classes, kwargs,
                 {"g_width", "d_width"})


@register_model(task="generation")
def capsule_gan(image_shape=(1, 28, 28), latent_dim: int = 100, num_classes: int = 0,
                **kwargs) -> GANPair:
    """CapsuleGAN (Jaiswal et al. 2018): DCGAN generator, one-capsule CapsNet discriminator,
    margin loss; 1,167,937 parameters. Options: ``g_width`` and the capsule
    discriminator's (``conv_channels``, ``primary_types``, ``primary_dim``, ``out_dim``,
    ``routing_iterations``, ``routing_kwargs``), ``margin``."""
    return _pair("capsule_gan", _dcgan_g, _caps_d, image_shape, latent_dim, num_classes, kwargs,
                 {"g_width"} | _CAPS_D_KEYS)


@register_model(task="generation")
def capsule_generator_gan(image_shape=(1, 28, 28), latent_dim: int = 100, num_classes: int = 0,
                          **kwargs) -> GANPair:
    """Capsule generator (this project's interpretation of Marusaki & Watanabe 2020) with the
    DCGAN discriminator; 723,426 parameters. Options: ``top_caps``, ``top_dim``,
    ``part_types``, ``part_dim``, ``gain``, ``g_width``, ``g_routing_iterations``,
    ``g_routing_kwargs``, ``d_width``."""
    return _pair("capsule_generator_gan", _caps_g, _dcgan_d, image_shape, latent_dim, num_classes,
                 kwargs, _CAPS_G_KEYS | {"d_width"})


@register_model(task="generation")
def capsule_both_gan(image_shape=(1, 28, 28), latent_dim: int = 100, num_classes: int = 0,
                     **kwargs) -> GANPair:
    """Capsule generator and one-capsule CapsNet discriminator (margin loss); 992,993
    parameters. Options: those of ``capsule_generator_gan``'s generator and of
    ``capsule_gan``'s discriminator."""
    return _pair("capsule_both_gan", _caps_g, _caps_d, image_shape, latent_dim, num_classes,
                 kwargs, _CAPS_G_KEYS | _CAPS_D_KEYS)
