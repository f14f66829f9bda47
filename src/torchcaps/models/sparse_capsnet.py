"""Sparse unsupervised capsules (Rawlinson, Ahmed, Kowadlo 2018, arXiv 1804.06094).

The CapsNet of Sabour et al. 2017 with its class capsules replaced by *latent* capsules and
no labels: the network is trained by reconstruction alone. Label masking, which in the
supervised network lets the decoder see only the true class capsule, is replaced by a rank
mask that lets it see mostly the few capsules that won the routing for this image, and a
boosting rule keeps every latent capsule winning now and then (lifetime sparsity)::

    Conv1        256 x 9x9, stride 1, ReLU, valid     (B, 1, 40, 40) -> (B, 256, 32, 32)
    PrimaryCaps  32 types x 8D, 9x9, stride 2, squash -> (B, 4608, 8)    (12 x 12 x 32)
    LatentCaps   16 x 16D, dynamic routing (3 iters)  -> poses (B, 16, 16), couplings (B, 4608, 16)
    Mask         rank mask of the boosted routing mass -> (B, 16)
    Decoder      FC 512 ReLU -> 1024 ReLU -> 1600 sigmoid on (poses * mask) flattened
    Loss         sum of squared pixel errors per image, mean over the batch

Letter legend: ``b`` batch, ``i`` primary (child) capsules, ``j`` latent (parent) capsules,
``t`` primary capsule types, ``n`` grid positions (``i = t n``), ``d`` pose.

Sparsening, per image (with ``J`` latent capsules and boost ``w_j``):

    m_j    = routing mass of latent capsule j           (see "score" below)
    r_j    = rank of w_j m_j among the J capsules       (0: the largest; ties: lower j first)
    mask_j = exp(-12 r_j / (J - 1)), set to 0 where it is below 0.01

With ``J = 16`` the mask is ``exp(-0.8 r)``: 1, 0.449, 0.202, 0.091, 0.041, 0.018 for ranks 0
to 5, and 0 from rank 6 on, so six capsules reach the decoder, the winner at full strength.
The mask is a constant of the forward pass (ranks have no gradient); gradients reach the
encoder through the masked poses.

Lifetime sparsity (training mode only; ``win_rate``, ``boost`` and ``boost_steps`` are
buffers, so they are checkpointed and a resumed run continues them exactly):

    f_j    = share of this batch's images whose rank-0 capsule is j
    e_j    = f_j on the first update (e = 0), else 0.99 e_j + 0.01 f_j
    every 50 training steps:  w_j += 0.1 if e_j < 0.03;  w_j -= 0.1 if e_j > 0.12;  w_j = max(w_j, 1)

What was checked in the authors' release (Cerenaut/sparse-unsupervised-capsules,
``models/layers/layers.py``, ``models/capsule_model.py``, ``models/model.py``,
``experiment.py``); the paper itself could be read only as its abstract:

* defaults (``experiment.default_hparams``): 16 latent capsules of 16 atoms, 32 primary
  types, ``padding='VALID'``, 3 routing iterations, no leaky routing, ``mask_type=
  'weighted-routing'``, ``unsupervised=True``, ``ema_decay=0.99``, ``boost_step=50``,
  ``boost_factor=0.1``, ``target_min_freq=0.03``, ``target_max_freq=0.12``,
  ``boosting=True``; Adam at 1e-3 decayed continuously by 0.96 every 2,000 steps with a
  floor of 1e-6; batch 128; 30,000 steps in the README's commands (``--shift=6 --pad=6``
  for the 40x40 affNIST training set).
* the mask (``create_weighted_routing_mask``): ``steepness_factor=12``,
  ``clip_threshold=0.01`` (the code comment says 0.1, the value is 0.01); the score is
  multiplied by the boost *before* ranking; ranks come from a double ``top_k`` (the
  inverse of the descending sort; ``top_k`` puts the lower index first on ties).
* the win-rate average (``winning_frequency``, ``moving_average``): wins are rank 0; the
  average starts at zero and takes the first batch's rates as they are (the release tests
  "all zero"); it is updated on every pass through the mask, i.e. once per training step.
* boosting (``boosting_op``, run by ``train_experiment`` after step ``i`` when
  ``(i + 1) % 50 == 0``): add 0.1 below 0.03, subtract 0.1 above 0.12, then ``max(1, w)``
  for every capsule; boosts start at 1. So the rule only ever lifts starved capsules and
  brings them back down to 1, never below.
* the score (``calculate_routing_coefficients``): the couplings ``c_ij`` of the last
  routing iteration are reshaped to ``[B, dim, dim, 32, J]`` (``dim = sqrt(I / 32)``),
  maximised over the axis of size 32 and summed over the rest. The docstring reads this as
  "the strongest primary type at each position, summed over positions", but the release
  orders primary capsules type-major (``transpose([0, 1, 3, 4, 2])`` then reshape: index
  ``t * n_pos + position``, the same order as :func:`~torchcaps.layers.primary.
  channels_to_capsules`), so the axis of size 32 actually runs over 32 *consecutive*
  capsules of that order (neighbouring positions of one type, the groups straddling type
  boundaries where ``n_pos`` is not a multiple of 32). ``score="release"`` (the default)
  computes exactly that; ``score="per_position"`` computes the docstring's reading (max over
  the types at each position); ``score="sum"`` the plain total ``sum_i c_ij``.
* the decoder (``reconstruction``): FC 512 ReLU, 1024 ReLU, pixels sigmoid, on the masked
  embedding flattened; the unsupervised loss is the per-image sum of squared errors averaged
  over the batch, without the supervised network's 0.0005 weight (``balance_factor`` is
  skipped when ``unsupervised``).
* the codes (``eval_experiment``/``classifier.py``): the latent capsules before masking,
  flattened to ``J * D = 256`` features, classified by scikit-learn's ``SVC`` (RBF,
  ``C=100``, ``gamma=0.1``, ``tol=1e-3``) or a one-vs-rest logistic regression
  (``C=100``, liblinear).
* initialisation (``variables.py``): truncated normals (cut at two standard deviations):
  conv1 std 0.05, primary and latent capsule weights std 0.1, decoder weights std 0.1;
  every bias 0.1 (latent capsules: a per-parent bias before the squash). ``init="release"``
  reproduces this; ``init="torch"`` keeps PyTorch's defaults (and ``CapsLinear``'s 0.01).

Not verified, or different here:

* the ablation without sparsening: the paper's abstract reports that training without
  masking loses capsule qualities; ``sparsening=False`` feeds every latent capsule unmasked
  to the decoder (the release's ``mask_type='none'``) and neither averages nor boosts.
* the release's squash has no epsilon; here :func:`torchcaps.functional.squash` adds
  ``1e-8`` under the square root (finite gradients at zero).
* the release also updates the win-rate average on evaluation passes (the mask is part of
  every graph it runs); here only training-mode forwards update the statistics.
* a batch that the engine skips (``nonfinite="skip"``) has already counted in the
  statistics. In a distributed run every rank updates the statistics from its own share
  of the batch and rank 0's buffers are broadcast before every forward (as batch-norm
  running statistics).

Shapes:

    ==============  ================  ============================================
    images          (B, C, H, W)      in [0, 1]
    poses           (B, J, D)         latent capsules v_j
    couplings       (B, I, J)         c_ij of the last iteration, sum to 1 over J
    scores          (B, J) float64    boosted routing mass w_j m_j
    ranks           (B, J) int64      0 = the largest score
    mask            (B, J)            poses' dtype
    reconstruction  (B, C, H, W)      decoder output
    codes           (B, J * D)        :meth:`SparseCapsNet.encode`
    win_rate, boost (J,) float64      buffers
    ==============  ================  ============================================
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..layers import CapsLinear, CapsuleDecoder, PrimaryCaps
from ._base import shape_error
from ._registry import register_model

__all__ = ["SparseCapsNet", "SparseCapsOutput", "sparse_capsnet", "routing_mass", "rank_mask",
           "win_rates", "update_win_rate", "update_boost", "SCORES", "INITS"]

#: how a latent capsule's routing mass is scored (see the module docstring)
SCORES = ("release", "per_position", "sum")
#: initialisations: the release's truncated normals, or PyTorch's defaults
INITS = ("release", "torch")


class SparseCapsOutput(NamedTuple):
    """What :class:`SparseCapsNet` returns (``scores``, ``ranks``, ``mask``: None without
    sparsening)."""

    poses: torch.Tensor  # (B, J, D)
    couplings: torch.Tensor  # (B, I, J)
    scores: torch.Tensor | None  # (B, J) float64, boosted routing mass
    ranks: torch.Tensor | None  # (B, J) int64
    mask: torch.Tensor | None  # (B, J)
    reconstruction: torch.Tensor  # (B, C, H, W)


# ----------------------------------------------------------------------------- functional


def routing_mass(couplings: torch.Tensor, num_types: int, score: str = "release") -> torch.Tensor:
    """Each latent capsule's routing mass per image, ``(B, I, J)`` -> ``(B, J)`` float64.

    Args:
        couplings: ``c_ij`` with children in type-major order (``t * N + n``).
        num_types: primary capsule types ``T`` (``I`` must be a multiple of it).
        score: ``"release"``: max over each run of ``T`` consecutive children, summed over
            the runs (the release's arithmetic); ``"per_position"``: max over the ``T``
            types at each grid position, summed over positions; ``"sum"``: ``sum_i c_ij``.
    """
    b, i, j = couplings.shape
    if i % num_types:
        raise ValueError(f"{i} child capsules are not a whole number of {num_types} types")
    c = couplings.detach().double()
    if score == "release":
        return c.view(b, i // num_types, num_types, j).amax(2).sum(1)  # (B, I/T, T, J) -> (B, J)
    if score == "per_position":
        return c.view(b, num_types, i // num_types, j).amax(1).sum(1)  # (B, T, N, J) -> (B, J)
    if score == "sum":
        return c.sum(1)
    raise ValueError(f"score must be one of {SCORES}, got {score!r}")


def rank_mask(scores: torch.Tensor, steepness: float = 12.0,
              clip: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, ranks)`` of scores ``(B, J)``: ``exp(-steepness r / (J - 1))``, 0 below ``clip``.

    Rank 0 is the largest score; equal scores rank the lower index first.
    """
    j = scores.shape[1]
    if j < 2:
        raise ValueError(f"the rank mask needs at least 2 capsules, got {j}")
    order = torch.argsort(scores, dim=1, descending=True, stable=True)  # (B, J): capsule at rank r
    ranks = torch.argsort(order, dim=1)  # (B, J): rank of capsule j (the inverse permutation)
    mask = torch.exp(ranks.double() * (-steepness / (j - 1)))  # (B, J) float64
    return mask.masked_fill(mask < clip, 0.0), ranks


def win_rates(ranks: torch.Tensor) -> torch.Tensor:
    """Share of the batch's images each capsule wins (rank 0): ``(B, J)`` -> ``(J,)`` float64."""
    return (ranks == 0).double().mean(0)


def update_win_rate(win_rate: torch.Tensor, rates: torch.Tensor, decay: float) -> torch.Tensor:
    """The release's moving average: ``rates`` as they are while the average is all zero,
    else ``decay * win_rate + (1 - decay) * rates``."""
    fresh = win_rate.abs().sum() == 0
    return torch.where(fresh, rates, decay * win_rate + (1.0 - decay) * rates)


def update_boost(boost: torch.Tensor, win_rate: torch.Tensor, step: float, low: float,
                 high: float, floor: float = 1.0) -> torch.Tensor:
    """One boosting update: ``+step`` below ``low``, ``-step`` above ``high``, then ``>= floor``."""
    boost = boost + step * (win_rate < low).to(boost.dtype) - step * (win_rate > high).to(boost.dtype)
    return boost.clamp_min(floor)


# ----------------------------------------------------------------------------- model


def _trunc_normal_(t: torch.Tensor, std: float) -> None:
    """TensorFlow's ``truncated_normal_initializer``: normal, redrawn beyond two stds."""
    nn.init.trunc_normal_(t, std=std, a=-2 * std, b=2 * std)


class SparseCapsNet(nn.Module):
    """Sabour et al.'s CapsNet trained without labels, with rank-mask sparsening.

    Args:
        in_shape: image shape ``(C, H, W)`` (the affNIST protocol: ``(1, 40, 40)``).
        conv_channels: channels of the first convolution (256).
        primary_types: primary capsule types ``T`` (32).
        primary_dim: primary capsule dimension (8).
        latent_caps: latent capsules ``J`` (16).
        latent_dim: latent capsule dimension ``D`` (16).
        routing_iterations: dynamic routing iterations (3).
        routing_kwargs: other options of the dynamic routing (default: the release's
            per-parent bias, initialised to 0.1, no leaky routing).
        decoder_hidden: widths of the decoder's hidden layers (512, 1024).
        sparsening: mask the latent capsules by rank before decoding; ``False`` decodes them
            all unmasked (the ablation).
        boosting: apply the boosting updates (with ``sparsening``).
        score: how the routing mass is scored: ``"release"``, ``"per_position"``, ``"sum"``.
        steepness: the mask's ``exp(-steepness r / (J - 1))`` (12).
        clip: mask values below this are set to 0 (0.01).
        ema_decay: decay of the win-rate average (0.99).
        boost_every: training steps between boosting updates (50).
        boost_step: boost change per update (0.1).
        min_win_rate, max_win_rate: below the first a capsule is boosted, above the second
            it is deboosted (0.03, 0.12); boosts never fall below 1.
        init: ``"release"`` (the release's truncated normals and 0.1 biases) or ``"torch"``.

    Shape:
        images ``(B, C, H, W)`` -> :class:`SparseCapsOutput` (see the module docstring).
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int] = (1, 40, 40),
        conv_channels: int = 256,
        primary_types: int = 32,
        primary_dim: int = 8,
        latent_caps: int = 16,
        latent_dim: int = 16,
        routing_iterations: int = 3,
        routing_kwargs: dict | None = None,
        decoder_hidden: tuple[int, ...] = (512, 1024),
        sparsening: bool = True,
        boosting: bool = True,
        score: str = "release",
        steepness: float = 12.0,
        clip: float = 0.01,
        ema_decay: float = 0.99,
        boost_every: int = 50,
        boost_step: float = 0.1,
        min_win_rate: float = 0.03,
        max_win_rate: float = 0.12,
        init: str = "release",
    ) -> None:
        super().__init__()
        self.in_shape = tuple(int(v) for v in in_shape)
        c, h, w = self.in_shape
        if h < 17 or w < 17:  # 9x9 convolution, then 9x9 stride-2 primary capsules
            raise shape_error("sparse_capsnet", self.in_shape,
                              f"input {h}x{w} is too small (needs at least 17x17)")
        if not (isinstance(latent_caps, int) and latent_caps >= 2):
            raise ValueError(f"latent_caps must be an integer >= 2 (the rank mask divides by "
                             f"J - 1), got {latent_caps!r}")
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if not (isinstance(boost_every, int) and boost_every >= 1):
            raise ValueError(f"boost_every must be a positive integer, got {boost_every!r}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}")
        if not (steepness > 0 and 0 <= clip < 1 and boost_step >= 0
                and 0 <= min_win_rate <= max_win_rate <= 1):
            raise ValueError("need steepness > 0, 0 <= clip < 1, boost_step >= 0 and "
                             "0 <= min_win_rate <= max_win_rate <= 1")
        self.sparsening, self.boosting, self.score = bool(sparsening), bool(boosting), score
        self.steepness, self.clip, self.ema_decay = float(steepness), float(clip), float(ema_decay)
        self.boost_every, self.boost_step = boost_every, float(boost_step)
        self.min_win_rate, self.max_win_rate = float(min_win_rate), float(max_win_rate)
        self.latent_caps, self.latent_dim = latent_caps, latent_dim

        self.conv1 = nn.Conv2d(c, conv_channels, kernel_size=9)
        self.primary = PrimaryCaps(conv_channels, primary_types, primary_dim, kernel_size=9,
                                   stride=2)
        n_primary = self.primary.num_capsules(h - 8, w - 8)
        kwargs = {"bias": True, "bias_init": 0.1, **(routing_kwargs or {})}
        kwargs.setdefault("iterations", routing_iterations)
        self.latent = CapsLinear(n_primary, primary_dim, latent_caps, latent_dim, "dynamic", kwargs)
        self.decoder = CapsuleDecoder(latent_caps, latent_dim, self.in_shape, tuple(decoder_hidden))
        # lifetime-sparsity state: buffers, so checkpoints and resumes carry it
        self.register_buffer("win_rate", torch.zeros(latent_caps, dtype=torch.float64))
        self.register_buffer("boost", torch.ones(latent_caps, dtype=torch.float64))
        self.register_buffer("boost_steps", torch.zeros((), dtype=torch.int64))
        if init == "release":
            self._release_init()

    def _release_init(self) -> None:
        _trunc_normal_(self.conv1.weight, 0.05)
        _trunc_normal_(self.primary.conv.weight, 0.1)
        _trunc_normal_(self.latent.weight, 0.1)
        for layer in (self.conv1, self.primary.conv, *self.decoder.net):
            if isinstance(layer, nn.Linear):
                _trunc_normal_(layer.weight, 0.1)
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                nn.init.constant_(layer.bias, 0.1)

    # ------------------------------------------------------------------ encoder
    def latent_capsules(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Poses ``(B, J, D)`` and couplings ``(B, I, J)``; no side effects."""
        if images.dim() != 4 or tuple(images.shape[1:]) != self.in_shape:
            raise ValueError(f"expected images (B, {', '.join(map(str, self.in_shape))}), "
                             f"got {tuple(images.shape)}")
        x = torch.relu(self.conv1(images))  # (B, 256, H-8, W-8)
        u = self.primary(x)  # (B, I, 8), type-major
        routed = self.latent(u)  # poses (B, J, D), couplings (B, I, J)
        return routed.poses, routed.couplings

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Codes for a downstream classifier: the unmasked latent capsules, ``(B, J * D)``."""
        return self.latent_capsules(images)[0].flatten(1)

    # ------------------------------------------------------------------ sparsening
    def sparsen(self, couplings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(scores, ranks, mask)`` of one batch under the current boosts (no side effects)."""
        scores = routing_mass(couplings, self.primary.num_types, self.score) * self.boost  # (B, J)
        mask, ranks = rank_mask(scores, self.steepness, self.clip)
        return scores, ranks, mask

    @torch.no_grad()
    def update_statistics(self, ranks: torch.Tensor) -> None:
        """One training step's update of the win-rate average and (every ``boost_every``
        steps, when boosting) of the boosts."""
        self.win_rate.copy_(update_win_rate(self.win_rate, win_rates(ranks), self.ema_decay))
        self.boost_steps.add_(1)
        if self.boosting:
            due = self.boost_steps % self.boost_every == 0  # a tensor: no host sync
            boosted = update_boost(self.boost, self.win_rate, self.boost_step, self.min_win_rate,
                                   self.max_win_rate)
            self.boost.copy_(torch.where(due, boosted, self.boost))

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor) -> SparseCapsOutput:
        poses, couplings = self.latent_capsules(images)
        if not self.sparsening:
            ones = poses.new_ones(poses.shape[:2])  # (B, J): every capsule reaches the decoder
            return SparseCapsOutput(poses, couplings, None, None, None, self.decoder(poses, ones))
        with torch.no_grad():
            scores, ranks, mask = self.sparsen(couplings)
            if self.training:
                self.update_statistics(ranks)
        mask = mask.to(poses.dtype)
        recon = self.decoder(poses, mask)  # decodes (poses * mask) flattened
        return SparseCapsOutput(poses, couplings, scores, ranks, mask, recon)

    @staticmethod
    def loss(out: SparseCapsOutput, images: torch.Tensor) -> torch.Tensor:
        """Sum of squared pixel errors per image, averaged over the batch (in float32)."""
        err = out.reconstruction.float() - images.float()
        return err.pow(2).flatten(1).sum(1).mean()

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters: total, encoder (convolutions and capsules) and decoder."""
        dec = sum(p.numel() for p in self.decoder.parameters())
        total = sum(p.numel() for p in self.parameters())
        return {"total": total, "encoder": total - dec, "decoder": dec}

    def extra_repr(self) -> str:
        return (f"in_shape={self.in_shape}, sparsening={self.sparsening}, "
                f"boosting={self.boosting}, score={self.score!r}")


@register_model(task="unsupervised")
def sparse_capsnet(**kwargs) -> SparseCapsNet:
    """The release's network at 40x40: 16 latent capsules x 16D; see :class:`SparseCapsNet`."""
    return SparseCapsNet(**kwargs)

