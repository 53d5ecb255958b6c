"""ECG-specific augmentations for self-supervised pretraining, as batched torch ops on ``(B, leads, T)``.

Every op takes the batch and a :class:`torch.Generator` (all randomness comes from it, so a seeded generator gives
the same output on every run), keeps shape and dtype, and draws its parameters independently per record.
:class:`ECGAugment` composes them: each op is applied to each record with its own probability, in a fixed order
(the order of :data:`AUGMENTATION_ORDER`).

The ops model the nuisances a real recording carries (after Kiyasseh et al. 2021, CLOCS, and the ECG-FM / fairseq-
signals perturbations): gain differences (amplitude scaling), broadband noise (Gaussian noise at a target SNR),
respiration / electrode motion (baseline wander: low-frequency sinusoids), mains interference (50/60 Hz powerline
sinusoids), electrodes off (lead dropout: whole leads zeroed), transient artefacts (time masking: zeroed spans)
and an unaligned start (time shift with zero fill). Amplitudes of the additive ops are relative to each lead's
RMS, so they behave the same on mV signals and on z-scored windows.

Powerline interference is synthesised as the sampled sinusoid ``sin(2 pi f t + phase)`` at the window's rate: at
100 Hz a 60 Hz hum aliases to 40 Hz and a 50 Hz hum sits at Nyquist (an alternating +-amplitude pattern), which is
what such interference looks like in a signal digitised at that rate without an analogue notch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from enecg.utils.config import ConfigMixin

AUGMENTATION_ORDER = (
    "time_shift",
    "amplitude_scale",
    "baseline_wander",
    "powerline",
    "noise",
    "lead_dropout",
    "time_mask",
)
_EPS = 1e-12


def _uniform(
    low: float, high: float, shape: tuple[int, ...], generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Float32 uniform draws in ``[low, high)`` from ``generator`` (on its own device), moved to ``device``."""
    u = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return (low + (high - low) * u).to(device)


def _check_batch(x: torch.Tensor) -> None:
    if x.ndim != 3:
        raise ValueError(f"augmentations expect a batch (B, leads, T), got shape {tuple(x.shape)}")


def _lead_rms(x: torch.Tensor) -> torch.Tensor:
    """Float32 RMS per record and lead ``(B, leads, 1)`` (float32 even for bf16 input: its sums lose precision)."""
    return x.float().pow(2).mean(dim=-1, keepdim=True).sqrt()


def amplitude_scale(
    x: torch.Tensor, generator: torch.Generator, scale_range: tuple[float, float] = (0.8, 1.25)
) -> torch.Tensor:
    """Multiply each record by one factor drawn log-uniformly from ``scale_range`` (gain differences)."""
    _check_batch(x)
    low, high = scale_range
    if not 0 < low <= high:
        raise ValueError(f"amplitude scale range must satisfy 0 < low <= high, got {scale_range}")
    log_scale = _uniform(math.log(low), math.log(high), (x.shape[0], 1, 1), generator, x.device)
    return x * log_scale.exp().to(x.dtype)


def gaussian_noise(
    x: torch.Tensor, generator: torch.Generator, snr_db: float | tuple[float, float] = (15.0, 30.0)
) -> torch.Tensor:
    """Add white Gaussian noise so that each lead has the given signal-to-noise ratio (in dB).

    ``snr_db`` is a fixed value or a range drawn uniformly per record. The noise power of each lead is its own
    mean power ``mean(x**2)`` divided by ``10 ** (snr_db / 10)``; an all-zero lead (missing or dropped) gets none.
    """
    _check_batch(x)
    low, high = (snr_db, snr_db) if isinstance(snr_db, (int, float)) else snr_db
    snr = _uniform(float(low), float(high), (x.shape[0], 1, 1), generator, x.device)
    noise_rms = _lead_rms(x) / torch.pow(10.0, snr / 20.0)  # amplitude ratio = 10 ** (dB / 20)
    noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return x + (noise.to(x.device) * noise_rms).to(x.dtype)


def baseline_wander(
    x: torch.Tensor,
    generator: torch.Generator,
    fs: float,
    amplitude: float = 0.3,
    frequency_range: tuple[float, float] = (0.05, 0.5),
    n_components: int = 2,
) -> torch.Tensor:
    """Add a sum of ``n_components`` slow sinusoids (respiration, electrode motion) to every lead.

    Frequencies are drawn in ``frequency_range`` (Hz) per record and component, phases uniformly, and each
    component's amplitude uniformly in ``[0, amplitude]`` times the lead's RMS (a different weight per lead: leads
    see the same motion through different electrodes)."""
    _check_batch(x)
    batch, leads, length = x.shape
    t = torch.arange(length, device=x.device, dtype=torch.float32) / float(fs)
    freq = _uniform(*frequency_range, (batch, 1, n_components, 1), generator, x.device)
    phase = _uniform(0.0, 2 * math.pi, (batch, 1, n_components, 1), generator, x.device)
    weight = _uniform(0.0, amplitude, (batch, leads, n_components, 1), generator, x.device)
    wander = (weight * torch.sin(2 * math.pi * freq * t + phase)).sum(dim=2)  # (B, leads, T)
    return x + (wander * _lead_rms(x)).to(x.dtype)


def powerline(
    x: torch.Tensor,
    generator: torch.Generator,
    fs: float,
    amplitude: float = 0.2,
    frequencies: tuple[float, ...] = (50.0, 60.0),
) -> torch.Tensor:
    """Add mains interference: a sinusoid at one of ``frequencies`` (chosen per record) with a random phase and
    an amplitude uniform in ``[0, amplitude]`` times each lead's RMS. See the module docstring on aliasing."""
    _check_batch(x)
    batch, leads, length = x.shape
    t = torch.arange(length, device=x.device, dtype=torch.float32) / float(fs)
    choice = torch.randint(len(frequencies), (batch,), generator=generator, device=generator.device)
    freq = torch.tensor(frequencies, dtype=torch.float32)[choice.cpu()].to(x.device).view(batch, 1, 1)
    phase = _uniform(0.0, 2 * math.pi, (batch, 1, 1), generator, x.device)
    weight = _uniform(0.0, amplitude, (batch, leads, 1), generator, x.device)
    hum = weight * torch.sin(2 * math.pi * freq * t + phase)
    return x + (hum * _lead_rms(x)).to(x.dtype)


def lead_dropout(x: torch.Tensor, generator: torch.Generator, rate: float = 0.25) -> torch.Tensor:
    """Zero whole leads, each independently with probability ``rate``; at least one lead of a record is kept."""
    _check_batch(x)
    batch, leads, _ = x.shape
    u = torch.rand((batch, leads), generator=generator, device=generator.device)
    drop = u < rate
    # Keep the lead with the largest draw where every lead would go: an all-zero input carries nothing to learn.
    all_dropped = drop.all(dim=1)
    keep = torch.nn.functional.one_hot(u.argmax(dim=1), leads).bool() & all_dropped.unsqueeze(1)
    drop = (drop & ~keep).to(x.device)
    return x.masked_fill(drop.unsqueeze(-1), 0.0)


def time_mask(
    x: torch.Tensor, generator: torch.Generator, max_fraction: float = 0.1, n_spans: int = 1
) -> torch.Tensor:
    """Zero ``n_spans`` spans across all leads, each of a length uniform in ``[0, max_fraction * T]``."""
    _check_batch(x)
    batch, _, length = x.shape
    span = (_uniform(0.0, max_fraction, (batch, n_spans), generator, x.device) * length).long()
    start = (_uniform(0.0, 1.0, (batch, n_spans), generator, x.device) * (length - span + 1)).long()
    t = torch.arange(length, device=x.device)
    masked = ((t >= start.unsqueeze(-1)) & (t < (start + span).unsqueeze(-1))).any(dim=1)  # (B, T)
    return x.masked_fill(masked.unsqueeze(1), 0.0)


def time_shift(x: torch.Tensor, generator: torch.Generator, max_fraction: float = 0.1) -> torch.Tensor:
    """Shift each record in time by up to ``max_fraction * T`` samples either way; vacated samples are zero
    (a crop of a slightly different part of the recording, without wrapping the end round to the start)."""
    _check_batch(x)
    batch, _, length = x.shape
    max_shift = int(max_fraction * length)
    if max_shift == 0:
        return x
    shift = torch.randint(-max_shift, max_shift + 1, (batch,), generator=generator, device=generator.device)
    source = torch.arange(length).unsqueeze(0) - shift.cpu().unsqueeze(1)  # output t reads input t - shift
    valid = (source >= 0) & (source < length)
    index = source.clamp(0, length - 1).to(x.device)
    shifted = torch.gather(x, 2, index.unsqueeze(1).expand(-1, x.shape[1], -1))
    return shifted.masked_fill(~valid.to(x.device).unsqueeze(1), 0.0)


def random_crop(x: torch.Tensor, generator: torch.Generator, length: int) -> torch.Tensor:
    """Crop each record to ``length`` samples at a random offset: ``(B, leads, T) -> (B, leads, length)``.

    Not part of :class:`ECGAugment` (it changes the shape); for windows cut longer than the encoder's input."""
    _check_batch(x)
    total = x.shape[-1]
    if not 0 < length <= total:
        raise ValueError(f"random_crop: length must be in [1, {total}], got {length}")
    offset = torch.randint(0, total - length + 1, (x.shape[0],), generator=generator, device=generator.device)
    index = offset.cpu().unsqueeze(1) + torch.arange(length).unsqueeze(0)
    return torch.gather(x, 2, index.to(x.device).unsqueeze(1).expand(-1, x.shape[1], -1))


@dataclass
class AugmentConfig(ConfigMixin):
    """Probabilities and strengths of the pretraining augmentations (per record; a probability of 0 turns an op
    off). The defaults are moderate perturbations of the kinds found in clinical recordings.

    ``from_dict`` / ``to_dict`` come from :class:`~enecg.utils.config.ConfigMixin` (typed, strict)."""

    config_name: ClassVar[str] = "augmentation"

    time_shift_p: float = field(default=0.5, metadata={"help": "Probability of a random time shift."})
    time_shift_max_fraction: float = field(
        default=0.1, metadata={"help": "Largest shift as a fraction of the window (zero fill, no wrap)."}
    )
    amplitude_scale_p: float = field(default=0.5, metadata={"help": "Probability of amplitude scaling."})
    amplitude_scale_range: tuple[float, float] = field(
        default=(0.8, 1.25), metadata={"help": "Gain factor range (log-uniform)."}
    )
    baseline_wander_p: float = field(default=0.3, metadata={"help": "Probability of baseline wander."})
    baseline_wander_amplitude: float = field(
        default=0.3, metadata={"help": "Largest wander amplitude per component, relative to the lead RMS."}
    )
    baseline_wander_frequency: tuple[float, float] = field(
        default=(0.05, 0.5), metadata={"help": "Wander frequency range in Hz."}
    )
    powerline_p: float = field(default=0.2, metadata={"help": "Probability of powerline interference."})
    powerline_amplitude: float = field(
        default=0.2, metadata={"help": "Largest hum amplitude relative to the lead RMS."}
    )
    powerline_frequencies: tuple[float, ...] = field(
        default=(50.0, 60.0), metadata={"help": "Mains frequencies in Hz (one chosen per record)."}
    )
    noise_p: float = field(default=0.5, metadata={"help": "Probability of additive Gaussian noise."})
    noise_snr_db: tuple[float, float] = field(
        default=(15.0, 30.0), metadata={"help": "Signal-to-noise ratio range in dB (uniform per record)."}
    )
    lead_dropout_p: float = field(default=0.3, metadata={"help": "Probability of lead dropout for a record."})
    lead_dropout_rate: float = field(
        default=0.25, metadata={"help": "Per-lead drop probability when lead dropout applies."}
    )
    time_mask_p: float = field(default=0.3, metadata={"help": "Probability of zeroing spans in time."})
    time_mask_max_fraction: float = field(
        default=0.1, metadata={"help": "Longest zeroed span as a fraction of the window."}
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):  # YAML / JSON give lists
                value = tuple(float(v) for v in value)
                object.__setattr__(self, f.name, value)
            if f.name.endswith("_p") and not 0.0 <= value <= 1.0:
                raise ValueError(f"augmentation: {f.name} must be a probability in [0, 1], got {value}")
        for name in ("amplitude_scale_range", "baseline_wander_frequency", "noise_snr_db"):
            value = getattr(self, name)
            if len(value) != 2 or value[0] > value[1]:
                raise ValueError(
                    f"augmentation: {name} must be a (low, high) pair with low <= high, got {value}"
                )
        if not 0.0 <= self.lead_dropout_rate < 1.0:
            raise ValueError(
                f"augmentation: lead_dropout_rate must be in [0, 1), got {self.lead_dropout_rate}"
            )
        for name in ("time_shift_max_fraction", "time_mask_max_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"augmentation: {name} must be in [0, 1), got {getattr(self, name)}")
        if not self.powerline_frequencies:
            raise ValueError("augmentation: powerline_frequencies must name at least one frequency")


class ECGAugment:
    """The composed augmentation: ``augment(x, generator) -> x'`` with each op applied per record with its own
    probability, in :data:`AUGMENTATION_ORDER`.

    Ops are computed for the whole batch and kept only for the records drawn (``torch.where``), so the cost does
    not depend on the draws and the calls stay vectorised.
    """

    def __init__(self, config: AugmentConfig, fs: float) -> None:
        self.config = config
        self.fs = float(fs)

    def _ops(self) -> list[tuple[str, float, Any]]:
        c = self.config
        ops = {
            "time_shift": (c.time_shift_p, lambda x, g: time_shift(x, g, c.time_shift_max_fraction)),
            "amplitude_scale": (
                c.amplitude_scale_p,
                lambda x, g: amplitude_scale(x, g, c.amplitude_scale_range),
            ),
            "baseline_wander": (
                c.baseline_wander_p,
                lambda x, g: baseline_wander(
                    x, g, self.fs, c.baseline_wander_amplitude, c.baseline_wander_frequency
                ),
            ),
            "powerline": (
                c.powerline_p,
                lambda x, g: powerline(x, g, self.fs, c.powerline_amplitude, c.powerline_frequencies),
            ),
            "noise": (c.noise_p, lambda x, g: gaussian_noise(x, g, c.noise_snr_db)),
            "lead_dropout": (c.lead_dropout_p, lambda x, g: lead_dropout(x, g, c.lead_dropout_rate)),
            "time_mask": (c.time_mask_p, lambda x, g: time_mask(x, g, c.time_mask_max_fraction)),
        }
        return [(name, *ops[name]) for name in AUGMENTATION_ORDER]

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        _check_batch(x)
        for _, probability, op in self._ops():
            if probability <= 0.0:
                continue
            chosen = torch.rand((x.shape[0],), generator=generator, device=generator.device) < probability
            if not bool(chosen.any()):
                continue
            x = torch.where(chosen.to(x.device).view(-1, 1, 1), op(x, generator), x)
        return x


__all__ = [
    "AUGMENTATION_ORDER",
    "AugmentConfig",
    "ECGAugment",
    "amplitude_scale",
    "baseline_wander",
    "gaussian_noise",
    "lead_dropout",
    "powerline",
    "random_crop",
    "time_mask",
    "time_shift",
]
