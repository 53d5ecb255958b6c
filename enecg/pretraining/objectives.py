"""Self-supervised objectives for ECG encoders: CMSC contrastive coding, masked reconstruction, and both combined.

**CMSC** (contrastive multi-segment coding; Kiyasseh et al., "CLOCS", ICML 2021; ECG-FM pretrains with it): two
temporally adjacent, non-overlapping segments of one recording show the same heart at almost the same time, so their
embeddings should agree, and disagree with every other recording's. Both segments are augmented, encoded, passed
through a projection head (discarded after pretraining, as in SimCLR) and L2-normalised; the loss is the symmetric
InfoNCE over the cross-segment similarity matrix ``z1 @ z2.T / temperature`` (CLOCS' formulation). When patient
ids are given, every pair of the same patient counts as positive (CLOCS' patient-level positives): the loss of a
row is ``-log(sum over positives / sum over all)``.

**Masked reconstruction** (after ECG-FM's continuous signal masking): contiguous spans covering a random 15-25 %
of the samples are zeroed across all leads, the encoder embeds the masked window, and a light decoder (linear,
then transposed 1-D convolutions) reconstructs the whole window; the mean squared error is taken over the masked
samples only (:func:`masked_mse`), so the encoder cannot score by copying what it sees. Our choice: the decoder
reads the encoder's *embedding* (the vector experts export), not an internal feature map: that works for every
architecture of the family through its public ``embed``, and it trains exactly the representation downstream
heads use. The price is a global bottleneck (the decoder has to rebuild timing from one vector), which is
acceptable for 5-s windows of a quasi-periodic signal.

:class:`SelfSupervisedModel` wraps an encoder with the objective(s) and weights them; its projection head and
decoder are pretraining-only and are not saved with the expert.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import nn
from torch.nn import functional as F

Objective = Literal["cmsc", "reconstruction", "combined"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)
Logs = dict[str, torch.Tensor]
EmbedFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------- contrastive (CMSC)


class ProjectionHead(nn.Module):
    """``Linear(D, D) + ReLU + Linear(D, projection_dim)``: the SimCLR/CLOCS head the contrastive loss sees."""

    def __init__(self, embedding_dim: int, projection_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(embedding_dim, embedding_dim), nn.ReLU(), nn.Linear(embedding_dim, projection_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def info_nce(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float, groups: torch.Tensor | None = None
) -> tuple[torch.Tensor, Logs]:
    """Symmetric InfoNCE between two views ``(B, d)`` (normalised here); row ``i`` of ``z1`` is positive with
    row ``i`` of ``z2`` and, when ``groups (B,)`` is given, with every row of the same group (e.g. patient).

    Returns the loss and logs: ``accuracy`` (fraction of rows whose most similar other-view row is a positive,
    both directions) and the mean cosine similarity of matched pairs and of all other pairs.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(
            f"info_nce needs two (B, d) views of equal shape, got {tuple(z1.shape)}, {tuple(z2.shape)}"
        )
    if z1.shape[0] < 2:
        raise ValueError("info_nce needs a batch of at least 2 records (the others are the negatives)")
    # Float32 whatever the autocast dtype: the logsumexp of B similarities / temperature needs the precision
    # (autocast would run the matmul in bf16/fp16 even on float32 inputs).
    with torch.autocast(device_type=z1.device.type, enabled=False):
        z1 = F.normalize(z1.float(), dim=1)
        z2 = F.normalize(z2.float(), dim=1)
        similarity = z1 @ z2.T
    logits = similarity / temperature
    batch = z1.shape[0]
    eye = torch.eye(batch, dtype=torch.bool, device=z1.device)
    positives = eye if groups is None else groups.view(-1, 1).eq(groups.view(1, -1)).to(z1.device) | eye

    def directed(lg: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss = torch.logsumexp(lg, dim=1) - torch.logsumexp(lg.masked_fill(~pos, float("-inf")), dim=1)
        hit = pos.gather(1, lg.argmax(dim=1, keepdim=True)).squeeze(1)
        return loss.mean(), hit.float().mean()

    loss_12, hit_12 = directed(logits, positives)
    loss_21, hit_21 = directed(logits.T, positives.T)
    loss = (loss_12 + loss_21) / 2
    off_diagonal = similarity.masked_select(~eye)
    logs = {
        "loss": loss.detach(),
        "accuracy": ((hit_12 + hit_21) / 2).detach(),
        "positive_similarity": similarity.diagonal().mean().detach(),
        "negative_similarity": off_diagonal.mean().detach(),
    }
    return loss, logs


class CMSCObjective(nn.Module):
    """CMSC on the embeddings of two adjacent segments: projection head + symmetric InfoNCE."""

    def __init__(self, embedding_dim: int, projection_dim: int = 128, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"CMSC temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.head = ProjectionHead(embedding_dim, projection_dim)

    def forward(
        self, first: torch.Tensor, second: torch.Tensor, groups: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Logs]:
        """``first``/``second``: embeddings ``(B, D)`` of the two segments of each record; ``groups``: optional
        ``(B,)`` integer patient groups (same value = same patient = positive)."""
        return info_nce(self.head(first), self.head(second), self.temperature, groups)


# ---------------------------------------------------------------------- masked reconstruction


def span_mask(
    batch: int,
    length: int,
    generator: torch.Generator,
    *,
    ratio_range: tuple[float, float] = (0.15, 0.25),
    span: int = 20,
) -> torch.Tensor:
    """Bool ``(batch, length)``, True on masked samples: non-overlapping spans of ``span`` samples covering a
    fraction drawn uniformly per record from ``ratio_range`` (rounded to whole spans, at least one span).

    Spans are placed without overlap (so the masked fraction is what was drawn) by choosing ``k`` distinct slots
    among ``length - k * (span - 1)`` and spreading the sorted slots by ``span - 1``; adjacent spans may touch,
    forming longer gaps. Returned on the generator's device."""
    low, high = ratio_range
    if not 0.0 < low <= high < 1.0:
        raise ValueError(f"mask ratio range must satisfy 0 < low <= high < 1, got {ratio_range}")
    if not 1 <= span <= length:
        raise ValueError(f"mask span must be in [1, {length}] samples, got {span}")
    device = generator.device
    ratio = low + (high - low) * torch.rand((batch,), generator=generator, device=device)
    max_spans = length // span
    k = (ratio * length / span).round().long().clamp(1, max_spans)  # (B,)
    slots = length - k * (span - 1)  # (B,) number of admissible slots for each record's k
    positions = torch.arange(length, device=device)
    scores = torch.rand((batch, length), generator=generator, device=device)
    scores = scores.masked_fill(positions.unsqueeze(0) >= slots.unsqueeze(1), float("inf"))
    rank = scores.argsort(dim=1).argsort(dim=1)
    chosen = rank < k.unsqueeze(1)  # k distinct admissible slots per record
    order = chosen.long().cumsum(dim=1) - 1  # j-th chosen slot (ascending)
    starts = positions.unsqueeze(0) + order * (span - 1)
    # Difference array: +1 at each start, -1 at start + span; its running sum is > 0 inside spans.
    delta = torch.zeros((batch, length + 1), dtype=torch.long, device=device)
    delta.scatter_add_(1, torch.where(chosen, starts, length), chosen.long())
    delta.scatter_add_(1, torch.where(chosen, starts + span, length), -chosen.long())
    return delta[:, :length].cumsum(dim=1) > 0


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked time steps only: ``prediction``/``target`` ``(B, leads, T)``, ``mask``
    bool ``(B, T)`` (every lead of a masked step counts). Errors elsewhere do not enter the loss or its gradient."""
    if prediction.shape != target.shape or mask.shape != (target.shape[0], target.shape[-1]):
        raise ValueError(
            f"masked_mse: prediction {tuple(prediction.shape)}, target {tuple(target.shape)} and mask "
            f"{tuple(mask.shape)} must be (B, leads, T), (B, leads, T), (B, T)"
        )
    weights = mask.unsqueeze(1).expand_as(target)
    count = weights.sum()
    if int(count) == 0:
        raise ValueError("masked_mse: the mask selects no samples")
    squared = (prediction.float() - target.float()).pow(2)
    return squared.masked_select(weights).sum() / count


class ReconstructionDecoder(nn.Module):
    """Embedding ``(B, D)`` -> signal ``(B, leads, length)``: ``Linear`` to ``channels x ceil(length / 2**n)``,
    ``n`` transposed-conv stages (stride 2, BN, GELU) doubling the time axis, a ``Conv1d(k=7)`` to the leads, and
    a crop to ``length``. Small on purpose: capacity belongs in the encoder."""

    def __init__(
        self, embedding_dim: int, leads: int, length: int, channels: int = 64, n_upsample: int = 4
    ) -> None:
        super().__init__()
        self.length = length
        self.channels = channels
        self.base_length = math.ceil(length / 2**n_upsample)
        self.expand = nn.Linear(embedding_dim, channels * self.base_length)
        stages: list[nn.Module] = []
        for _ in range(n_upsample):
            stages += [
                nn.ConvTranspose1d(channels, channels, kernel_size=4, stride=2, padding=1),
                nn.BatchNorm1d(channels),
                nn.GELU(),
            ]
        self.upsample = nn.Sequential(*stages)
        self.output = nn.Conv1d(channels, leads, kernel_size=7, padding=3)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        h = self.expand(embedding).view(-1, self.channels, self.base_length)
        return self.output(self.upsample(h))[..., : self.length]


class MaskedReconstructionObjective(nn.Module):
    """Decoder + :func:`masked_mse`: scores how well the embedding of a masked window rebuilds what was masked."""

    def __init__(self, embedding_dim: int, leads: int, length: int, decoder_channels: int = 64) -> None:
        super().__init__()
        self.decoder = ReconstructionDecoder(embedding_dim, leads, length, decoder_channels)

    @staticmethod
    def mask_input(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Zero the masked time steps ``mask (B, T)`` of every lead (zero is the mean of z-scored windows)."""
        return x.masked_fill(mask.to(x.device).unsqueeze(1), 0.0)

    def forward(
        self, masked_embedding: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, Logs]:
        """``masked_embedding``: encoder output for :meth:`mask_input` of ``target``; ``target``: the unmasked
        window ``(B, leads, T)``; ``mask``: bool ``(B, T)``."""
        mask = mask.to(target.device)
        reconstruction = self.decoder(masked_embedding)
        loss = masked_mse(reconstruction, target, mask)
        logs = {"loss": loss.detach(), "masked_fraction": mask.float().mean().detach()}
        return loss, logs


# ---------------------------------------------------------------------- combined


class SelfSupervisedModel(nn.Module):
    """An encoder with its pretraining objective(s).

    ``forward(first, second, groups, mask) -> (loss, logs)``: ``first``/``second`` are the (already augmented)
    adjacent segments ``(B, leads, T)``, ``groups`` optional patient groups, ``mask`` the reconstruction mask
    ``(B, T)``; the reconstruction target is ``first`` itself (what the encoder saw, less the masked spans). All
    inputs go through the encoder in one batch (one BatchNorm statistic for the step). The loss is
    ``cmsc_weight * L_cmsc + reconstruction_weight * L_rec`` over the objectives in use.

    Args:
        encoder: the module being pretrained (the future expert).
        embed: ``embed(encoder, x) -> (B, embedding_dim)``, e.g. the family's ``embed``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        embed: EmbedFn,
        *,
        embedding_dim: int,
        leads: int,
        length: int,
        objective: Objective = "combined",
        cmsc_weight: float = 1.0,
        reconstruction_weight: float = 1.0,
        temperature: float = 0.1,
        projection_dim: int = 128,
        decoder_channels: int = 64,
    ) -> None:
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown pretraining objective {objective!r}; known: {list(OBJECTIVES)}")
        self.encoder = encoder
        self._embed = embed
        self.objective = objective
        self.cmsc_weight = float(cmsc_weight)
        self.reconstruction_weight = float(reconstruction_weight)
        self.cmsc = (
            CMSCObjective(embedding_dim, projection_dim, temperature)
            if objective in ("cmsc", "combined")
            else None
        )
        self.reconstruction = (
            MaskedReconstructionObjective(embedding_dim, leads, length, decoder_channels)
            if objective in ("reconstruction", "combined")
            else None
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._embed(self.encoder, x)

    def forward(
        self,
        first: torch.Tensor,
        second: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Logs]:
        inputs = []
        if self.cmsc is not None:
            if second is None:
                raise ValueError("the CMSC objective needs the second segment of each record")
            inputs += [first, second]
        if self.reconstruction is not None:
            if mask is None:
                raise ValueError("the reconstruction objective needs a mask (B, T)")
            inputs.append(self.reconstruction.mask_input(first, mask))
        embeddings = self.encode(torch.cat(inputs)).split(first.shape[0])
        loss = first.new_zeros((), dtype=torch.float32)
        logs: Logs = {}
        if self.cmsc is not None:
            cmsc_loss, cmsc_logs = self.cmsc(embeddings[0], embeddings[1], groups)
            loss = loss + self.cmsc_weight * cmsc_loss
            logs.update({f"cmsc/{k}": v for k, v in cmsc_logs.items()})
        if self.reconstruction is not None:
            rec_loss, rec_logs = self.reconstruction(embeddings[-1], first, mask)
            loss = loss + self.reconstruction_weight * rec_loss
            logs.update({f"reconstruction/{k}": v for k, v in rec_logs.items()})
        logs["loss"] = loss.detach()
        return loss, logs


__all__ = [
    "OBJECTIVES",
    "CMSCObjective",
    "MaskedReconstructionObjective",
    "ProjectionHead",
    "ReconstructionDecoder",
    "SelfSupervisedModel",
    "info_nce",
    "masked_mse",
    "span_mask",
]
