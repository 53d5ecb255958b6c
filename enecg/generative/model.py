"""A label-conditional 1-D diffusion model of multi-lead ECG, built on diffusers.

:class:`ECGDiffusion` wraps a :class:`diffusers.UNet1DModel` in its temporal-ResNet form (every residual block
adds a timestep embedding). The condition -- a task's multi-hot (or one-hot) labels, and optionally age and sex --
goes through a small MLP to an embedding of the same size that is added to the timestep embedding, so every block
sees it. Training drops the condition for a fraction of the examples (an "unconditioned" flag is set instead), so
one network gives both conditional and unconditional noise predictions: sampling may use classifier-free
guidance, and the anomaly score can use either.

Noise is added with a :class:`diffusers.DDPMScheduler` (training) and removed with a
:class:`diffusers.DDIMScheduler` (sampling, few steps). Both take the spec's noise schedule (``beta_schedule``:
diffusers' ``linear`` or ``squaredcos_cap_v2``, the cosine schedule) and what the network predicts
(``prediction_type``: the noise, ``epsilon``, or the velocity ``v_prediction`` of Salimans & Ho); the
:data:`PREDICTION_TARGETS` table holds, per prediction type, the training target and the clean-signal estimate. Signals are in mV divided by ``signal_scale`` (a global
amplitude, measured on the training part), so the model keeps lead amplitudes relative to each other.

A saved model is a Hub-ready folder: ``model.safetensors``, ``config.json`` (:class:`DiffusionSpec`),
``README.md`` (model card) and ``metrics.json``; :func:`load_diffusion` reads it from a folder or a Hub ID.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet1DModel
from safetensors.torch import load_file, save_file
from torch import nn

from enecg.contract import InputContract, apply_contract_array
from enecg.data.schema import SYNTHETIC_PREFIX, is_synthetic  # noqa: F401  (re-exported)
from enecg.generative.base import card_text, multi_hot, register_generative
from enecg.record import ECGRecord
from enecg.utils.config import ConfigError, ConfigMixin, decode
from enecg.utils.files import write_text_atomic

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
METRICS_FILE = "metrics.json"
# Marks a config.json as ours (a Hub repo of another kind fails with one line, not a KeyError later).
MODEL_TYPE = "enecg-ecg-diffusion"
# Noise schedules of diffusers' DDPM/DDIM schedulers that the model accepts (cosine: less signal destroyed at
# low noise levels, the usual choice for small models and short training).
BETA_SCHEDULES = ("linear", "squaredcos_cap_v2")


@dataclass(frozen=True)
class PredictionTarget:
    """What the network is trained to predict, and how a clean signal is read back from that prediction.

    ``target(scheduler, clean, noise, t)`` is the training target; ``clean_estimate(noisy, prediction, a)`` the
    one-step estimate of the clean signal, ``a`` being the cumulative alpha of each record's timestep."""

    target: Callable[[DDPMScheduler, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    clean_estimate: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# Keyed by diffusers' ``prediction_type`` names (the schedulers take the same key when sampling).
PREDICTION_TARGETS: dict[str, PredictionTarget] = {
    "epsilon": PredictionTarget(
        target=lambda scheduler, clean, noise, t: noise,
        clean_estimate=lambda noisy, eps, a: (noisy - (1 - a).sqrt() * eps) / a.sqrt(),
    ),
    "v_prediction": PredictionTarget(
        target=lambda scheduler, clean, noise, t: scheduler.get_velocity(clean, noise, t),
        clean_estimate=lambda noisy, v, a: a.sqrt() * noisy - (1 - a).sqrt() * v,
    ),
}


@dataclass
class DiffusionSpec(ConfigMixin):
    """Everything that rebuilds a saved model (``config.json``); set by training from the data and config.

    Read through :mod:`enecg.utils.config`: ``from_dict`` refuses a mapping of another model type first, then
    decodes strictly (an unknown key or a wrong type names the file and the key)."""

    config_name: ClassVar[str] = "diffusion config"

    task: str = field(metadata={"help": "Label set (task column) the model is conditioned on."})
    task_type: str = field(metadata={"help": "multilabel | multiclass"})
    label_names: list[str] = field(metadata={"help": "Labels of the task, in condition-vector order."})
    leads: list[str] = field(metadata={"help": "Leads generated, in channel order."})
    fs: float = field(metadata={"help": "Sampling rate of generated records, Hz."})
    length: int = field(metadata={"help": "Samples per generated record."})
    use_age_sex: bool = field(default=True, metadata={"help": "Age and sex are part of the condition."})
    block_out_channels: list[int] = field(
        default_factory=lambda: [32, 64, 128], metadata={"help": "UNet channels per resolution level."}
    )
    condition_hidden: int = field(default=64, metadata={"help": "Hidden width of the condition MLP."})
    train_timesteps: int = field(default=1000, metadata={"help": "DDPM noise levels in training."})
    sample_steps: int = field(default=50, metadata={"help": "DDIM steps when sampling."})
    signal_scale: float = field(
        default=1.0, metadata={"help": "mV per model unit (std of training signals)."}
    )
    prediction_type: str = field(
        default="epsilon",
        metadata={"help": "What the network predicts: epsilon (the noise) or v_prediction (the velocity)."},
    )
    beta_schedule: str = field(
        default="linear",
        metadata={"help": "diffusers noise schedule: linear or squaredcos_cap_v2 (cosine)."},
    )
    clip_range: float = field(
        default=5.0,
        metadata={"help": "DDIM clips each clean-signal estimate to +-this (model units; 0: no clipping)."},
    )
    source: str = field(default="", metadata={"help": "Dataset the model was trained on (for the card)."})
    model_type: str = MODEL_TYPE

    def __post_init__(self) -> None:
        channels = list(self.block_out_channels)
        # Group norm with 8 groups; each level but the last halves the length.
        if len(channels) < 2 or any(c % 8 for c in channels):
            raise ValueError(f"block_out_channels {channels}: two or more levels, each a multiple of 8")
        if self.length % 2 ** (len(channels) - 1):
            raise ValueError(
                f"length {self.length} must be divisible by 2**{len(channels) - 1} (UNet levels)"
            )
        if self.prediction_type not in PREDICTION_TARGETS:
            raise ValueError(f"prediction_type {self.prediction_type!r}: one of {sorted(PREDICTION_TARGETS)}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule {self.beta_schedule!r}: one of {list(BETA_SCHEDULES)}")
        if self.task_type not in ("multilabel", "multiclass"):
            raise ValueError(
                f"task {self.task!r} is {self.task_type}; a generative model needs labels "
                "(multilabel or multiclass)"
            )

    @property
    def condition_dim(self) -> int:
        # labels + unconditioned flag (+ age, sex and their two missing flags)
        return len(self.label_names) + 1 + (4 if self.use_age_sex else 0)

    def contract(self) -> InputContract:
        """How a real record is brought to the model's rate, leads and length (first window, zero-padded)."""
        return InputContract(fs=self.fs, leads=tuple(self.leads), length=self.length)

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None) -> DiffusionSpec:
        """Build from a saved ``config.json`` mapping; ``source`` (the file) is named by every error."""
        # Checked before the keys: another kind of model (a Hub repo of another library) fails with this one line.
        model_type = data.get("model_type") if isinstance(data, dict) else None
        if model_type != MODEL_TYPE:
            raise ConfigError(
                f"{source or cls.config_name}: not an enecg ECG diffusion model (model_type {model_type!r})"
            )
        return decode(cls, data, source or cls.config_name)


@register_generative
class ECGDiffusion(nn.Module):
    """Conditional noise predictor + schedulers; see the module docstring."""

    kind = "diffusion"  # generative model kind (enecg.generative.base)

    def __init__(self, spec: DiffusionSpec) -> None:
        super().__init__()
        self.spec = spec
        leads, channels = len(spec.leads), list(spec.block_out_channels)
        # The condition is embedded to the size of the timestep embedding and added to it (a forward hook on the
        # UNet's time MLP): every residual block of the UNet sees label + noise level, as in class-conditional
        # image diffusion, rather than only the first layer.
        self.condition_mlp = nn.Sequential(
            nn.Linear(spec.condition_dim, spec.condition_hidden),
            nn.SiLU(),
            nn.Linear(spec.condition_hidden, channels[0]),
        )
        # diffusers' temporal 1-D UNet (ResNet blocks with a timestep embedding in each; Janner et al.'s Diffuser).
        self.unet = UNet1DModel(
            sample_size=spec.length,
            in_channels=leads,
            out_channels=leads,
            down_block_types=("DownResnetBlock1D",) * len(channels),
            up_block_types=("UpResnetBlock1D",) * (len(channels) - 1),
            mid_block_type="MidResTemporalBlock1D",
            out_block_type="OutConv1DBlock",
            block_out_channels=tuple(channels),
            act_fn="mish",
            layers_per_block=1,
            norm_num_groups=8,
            time_embedding_type="positional",
            flip_sin_to_cos=False,
            freq_shift=1,
            use_timestep_embedding=True,
        )
        self._condition_embedding: torch.Tensor | None = None
        self.unet.time_mlp.register_forward_hook(self._add_condition)
        self.train_scheduler = DDPMScheduler(
            num_train_timesteps=spec.train_timesteps,
            beta_schedule=spec.beta_schedule,
            prediction_type=spec.prediction_type,
            clip_sample=False,
        )

    # ------------------------------------------------------------------ condition
    def condition(
        self,
        labels: torch.Tensor | None,
        batch: int,
        age: torch.Tensor | None = None,
        sex: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The condition vector ``(B, condition_dim)``. ``labels`` is ``(B, K)`` multi-hot (NaN = unknown, read
        as 0); None or ``drop`` True gives the unconditioned vector (zeros + flag)."""
        spec, device = self.spec, self._device()
        k = len(spec.label_names)
        parts = [torch.zeros(batch, k, device=device) if labels is None else torch.nan_to_num(labels.float())]
        dropped = (
            torch.ones(batch, device=device, dtype=torch.bool)
            if labels is None
            else (torch.zeros(batch, device=device, dtype=torch.bool) if drop is None else drop.bool())
        )
        if spec.use_age_sex:
            age = torch.full((batch,), math.nan, device=device) if age is None else age.float().to(device)
            sex = torch.full((batch,), math.nan, device=device) if sex is None else sex.float().to(device)
            # Age in centuries keeps the input near unit scale; missing values read as 0 with a flag.
            parts += [
                torch.nan_to_num(age / 100.0)[:, None],
                torch.nan_to_num(sex)[:, None],
                age.isnan().float()[:, None],
                sex.isnan().float()[:, None],
            ]
        vector = torch.cat(parts, dim=1).to(device)
        vector = torch.where(dropped[:, None], torch.zeros_like(vector), vector)
        return torch.cat([vector[:, :k], dropped.float()[:, None], vector[:, k:]], dim=1)

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Predicted noise for ``noisy`` ``(B, leads, length)`` at ``timesteps`` ``(B,)`` given ``condition``."""
        self._condition_embedding = self.condition_mlp(condition)
        try:
            return self.unet(noisy, timesteps).sample
        finally:
            self._condition_embedding = None

    def _add_condition(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if self._condition_embedding is None:
            raise RuntimeError("call ECGDiffusion(...), not its UNet directly: the condition is missing")
        return output + self._condition_embedding.to(output.dtype)

    def loss(self, clean: torch.Tensor, condition: torch.Tensor, generator: torch.Generator | None = None):
        """DDPM loss of a batch of clean (scaled) signals: MSE to the spec's prediction target."""
        noise = torch.randn(clean.shape, generator=generator, device=clean.device)
        t = torch.randint(
            0, self.spec.train_timesteps, (clean.shape[0],), generator=generator, device=clean.device
        )
        noisy = self.train_scheduler.add_noise(clean, noise, t)
        target = PREDICTION_TARGETS[self.spec.prediction_type].target(self.train_scheduler, clean, noise, t)
        return nn.functional.mse_loss(self(noisy, t, condition), target)

    # ------------------------------------------------------------------ sampling
    def label_vector(self, labels: list[str] | tuple[str, ...]) -> torch.Tensor:
        """Multi-hot ``(K,)`` for label names; an unknown one is a one-line ValueError."""
        return torch.from_numpy(multi_hot(self.spec.label_names, self.spec.task, labels))

    @torch.no_grad()
    def sample(
        self,
        labels: list[str] | tuple[str, ...] | None,
        n: int,
        *,
        seed: int = 0,
        steps: int | None = None,
        guidance_scale: float = 1.0,
        age: float | None = None,
        sex: float | None = None,
        batch_size: int = 64,
    ) -> np.ndarray:
        """``n`` records ``(n, leads, length)`` in mV with these labels (None: unconditioned).

        Deterministic for a seed (noise is drawn on the CPU). ``guidance_scale`` > 1 applies classifier-free
        guidance: ``eps_u + s * (eps_c - eps_u)``."""
        if n < 1:
            raise ValueError(f"--n must be at least 1, got {n}")
        vectors = None if labels is None else self.label_vector(labels)[None].expand(n, -1).numpy()
        return self.sample_conditions(
            vectors,
            n,
            ages=None if age is None else np.full(n, float(age)),
            sexes=None if sex is None else np.full(n, float(sex)),
            seed=seed,
            steps=steps,
            guidance_scale=guidance_scale,
            batch_size=batch_size,
        )

    @torch.no_grad()
    def sample_conditions(
        self,
        labels: np.ndarray | None,
        n: int,
        *,
        ages: np.ndarray | None = None,
        sexes: np.ndarray | None = None,
        seed: int = 0,
        steps: int | None = None,
        guidance_scale: float = 1.0,
        batch_size: int = 64,
    ) -> np.ndarray:
        """``n`` records, record ``i`` conditioned on row ``i`` of ``labels`` ``(n, K)`` (multi-hot; None:
        unconditioned) and of ``ages``/``sexes`` (NaN or None: unknown). Returns mV ``(n, leads, length)``."""
        device = self._device()
        # Training signals sit within about +-2.5 model units: clipping the clean estimate far outside that keeps
        # an undertrained model's sampling from diverging and never touches a plausible ECG.
        scheduler = DDIMScheduler(
            num_train_timesteps=self.spec.train_timesteps,
            beta_schedule=self.spec.beta_schedule,
            prediction_type=self.spec.prediction_type,
            clip_sample=self.spec.clip_range > 0,
            clip_sample_range=self.spec.clip_range or 1.0,
        )
        scheduler.set_timesteps(steps or self.spec.sample_steps)
        generator = torch.Generator().manual_seed(seed)
        out = []
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            rows = slice(start, start + b)

            cond = self.condition(
                None if labels is None else _rows(labels, rows).to(device),
                b,
                _rows(ages, rows),
                _rows(sexes, rows),
            )
            uncond = self.condition(None, b)
            x = torch.randn((b, len(self.spec.leads), self.spec.length), generator=generator).to(device)
            for t in scheduler.timesteps:
                ts = torch.full((b,), int(t), device=device, dtype=torch.long)
                eps = self(x, ts, cond)
                if labels is not None and guidance_scale != 1.0:
                    eps_u = self(x, ts, uncond)
                    eps = eps_u + guidance_scale * (eps - eps_u)
                x = scheduler.step(eps, t, x).prev_sample
            out.append(x.float().cpu().numpy())
        return np.concatenate(out) * self.spec.signal_scale

    # ------------------------------------------------------------------ reconstruction
    def prepare(self, records: list[ECGRecord]) -> torch.Tensor:
        """Records -> scaled model input ``(B, leads, length)`` (resampled, leads picked, first window)."""
        contract = self.spec.contract()
        windows = [
            apply_contract_array(r.signal, r.fs, r.leads, contract, source=r.source).windows[0]
            for r in records
        ]
        return torch.from_numpy(np.stack(windows)).float() / self.spec.signal_scale

    @torch.no_grad()
    def denoising_error(
        self,
        clean: torch.Tensor,
        *,
        noise_levels: tuple[float, ...] = (0.1, 0.2, 0.3),
        labels: torch.Tensor | None = None,
        seed: int = 0,
    ) -> torch.Tensor:
        """Per-record mean squared error of the one-step clean-signal estimate from noised copies, averaged over
        ``noise_levels`` (fractions of the training timesteps). A record unlike the training distribution is
        reconstructed worse. ``labels`` None: the unconditioned prediction."""
        device = self._device()
        clean = clean.to(device)
        b = clean.shape[0]
        generator = torch.Generator().manual_seed(seed)
        cond = self.condition(labels, b)
        alphas = self.train_scheduler.alphas_cumprod.to(device)
        errors = []
        for level in noise_levels:
            t = torch.full(
                (b,), int(level * (self.spec.train_timesteps - 1)), device=device, dtype=torch.long
            )
            # One noise draw shared by every record: a record's error does not depend on its batch or position.
            noise = torch.randn((1, *clean.shape[1:]), generator=generator).to(device).expand_as(clean)
            noisy = self.train_scheduler.add_noise(clean, noise, t)
            a = alphas[t][:, None, None]
            estimate = PREDICTION_TARGETS[self.spec.prediction_type].clean_estimate(
                noisy, self(noisy, t, cond), a
            )
            errors.append(((estimate - clean) ** 2).mean(dim=(1, 2)))
        return torch.stack(errors).mean(dim=0).cpu()

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------ generative model kind (base.py)
    @classmethod
    def load_folder(cls, folder: Path) -> ECGDiffusion:
        """The model saved in a local folder."""
        return load_diffusion(folder)

    @classmethod
    def recipe_schema(cls) -> type:
        """The recipe's config class (:class:`~enecg.generative.train.GenerativeConfig`)."""
        from enecg.generative.train import GenerativeConfig  # train.py builds on this module

        return GenerativeConfig

    @classmethod
    def train_config(cls, config: Any) -> Path:
        """Train from a decoded recipe; the saved folder."""
        from enecg.generative.train import train_diffusion  # train.py builds on this module

        return train_diffusion(config)

    def anomaly_scores(self, records: list[ECGRecord], **options: Any) -> np.ndarray:
        """Denoising error per record (:func:`enecg.generative.anomaly.score_anomaly` with ``options``)."""
        from enecg.generative.anomaly import score_anomaly  # anomaly.py builds on this module

        return score_anomaly(self, records, **options)

    def card(self, metrics: dict[str, Any]) -> str:
        """The model card for these metrics."""
        return model_card(self.spec, metrics)


def _rows(values: np.ndarray | None, rows: slice) -> torch.Tensor | None:
    return None if values is None else torch.as_tensor(np.asarray(values[rows], np.float32))


# ---------------------------------------------------------------------- save / load


def save_diffusion(
    model: ECGDiffusion, folder: str | os.PathLike, metrics: dict[str, Any] | None = None, card: str = ""
) -> Path:
    """Write the Hub-ready folder (weights, config, card, metrics); returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    write_text_atomic(folder / CONFIG_FILE, json.dumps(model.spec.to_dict(), indent=2))
    write_text_atomic(folder / METRICS_FILE, json.dumps(metrics or {}, indent=2, default=str))
    write_text_atomic(folder / CARD_FILE, card or model_card(model.spec, metrics or {}))
    return folder


def model_card(spec: DiffusionSpec, metrics: dict[str, Any]) -> str:
    """A Hub model card: what the model generates, how it was trained, and its evaluation (when recorded)."""
    description = (
        f"Conditional 1-D diffusion model (diffusers UNet1DModel, DDPM training, DDIM sampling) of "
        f"{len(spec.leads)}-lead ECG at {spec.fs:g} Hz, {spec.length} samples, conditioned on the labels "
        f"{spec.label_names} ({spec.task_type}){' and age/sex' if spec.use_age_sex else ''}. "
        f"Trained on the training part of `{spec.source}` only."
    )
    return card_text(
        f"ECG diffusion model: {spec.task}",
        description,
        ["ecg", "diffusion", "synthetic-data", "enecg"],
        metrics,
        "`from enecg.generative import load_diffusion; load_diffusion('<folder or Hub ID>')`",
        "Training",
    )


def resolve_folder(source: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder as is, else a Hub ID downloaded with ``snapshot_download`` (cached)."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists() or str(source).count("/") != 1:
        raise FileNotFoundError(f"{source}: neither a model folder nor a Hub ID (owner/name)")
    import huggingface_hub
    from huggingface_hub import constants

    try:
        return Path(
            huggingface_hub.snapshot_download(
                str(source),
                revision=revision,
                allow_patterns=[WEIGHTS_FILE, CONFIG_FILE, METRICS_FILE, CARD_FILE],
                endpoint=constants.ENDPOINT,  # read at call time: honours a switched endpoint
            )
        )
    except Exception as exc:  # every Hub failure becomes one line naming the repo
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileNotFoundError(f"{source}: cannot download the model from the Hub ({first})") from None


def load_diffusion(source: str | os.PathLike, revision: str | None = None) -> ECGDiffusion:
    """Load a saved model from a folder or a Hub ID (strict: every weight present, none extra); eval mode."""
    folder = resolve_folder(source, revision)
    config = folder / CONFIG_FILE
    if not config.is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG_FILE}; not a saved ECG diffusion model")
    spec = DiffusionSpec.from_dict(json.loads(config.read_text()), str(config))
    model = ECGDiffusion(spec)
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
    model.name = str(source)  # type: ignore[attr-defined]  # recorded in synthetic records' source
    return model.eval()
