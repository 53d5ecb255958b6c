"""Self-supervised pretraining of an in-house encoder: :class:`PretrainConfig` and :func:`pretrain`.

``pretrain(config)`` reads unlabelled records (a prepared dataset's parts, or a folder of WFDB records), applies
the input contract in the collate function (vectorised per batch), augments two adjacent segments of each record,
optimises the objective(s) of :mod:`enecg.pretraining.objectives` on the engine's
:class:`~enecg.engine.Trainer` with ``accelerate`` (one process, or several under ``accelerate launch`` /
``torchrun``; mixed precision as configured; warm-up + cosine schedule), and saves the *encoder only* as an
in-house expert folder (:func:`~enecg.experts.inhouse.save_inhouse_expert`, family ``light``) on the main process.
The projection head and the decoder are pretraining-only and are dropped. ``enecg.load_expert(folder)`` (or the
Hub ID after uploading the folder) then gives a frozen expert whose contract is the one trained with: fixed-length
windows cut as ``segments`` and averaged per record, like ECG-FM.

``metrics.json`` in the folder records the objective, the final losses (mean of the last ``log_every`` steps over
all processes), the first ones, the steps, the records seen and skipped, and the full pretraining config.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, get_args

import torch
from torch import nn
from torch.utils.data import DataLoader

from enecg.contract import InputContract, Scaling
from enecg.engine.trainer import Trainer, TrainerArguments
from enecg.experts.families.light import ARCHITECTURES, LightCNNConfig
from enecg.experts.family import get_family
from enecg.experts.inhouse import EXPERT_SPEC_FILE, save_inhouse_expert
from enecg.leads import STANDARD_12_LEADS
from enecg.pretraining.augment import AugmentConfig, ECGAugment
from enecg.pretraining.data import SegmentPairCollator, open_records
from enecg.pretraining.objectives import OBJECTIVES, SelfSupervisedModel, span_mask
from enecg.utils.config import ConfigMixin, decode

logger = logging.getLogger(__name__)

FAMILY = "light"
MIXED_PRECISION = ("no", "bf16", "fp16")
_TUPLE_FIELDS = ("splits", "leads", "bandpass", "mask_ratio")


@dataclass
class PretrainConfig(ConfigMixin):
    """Everything a pretraining run needs (``recipes/pretrain_ssl.yaml`` documents each key).

    Read through :mod:`enecg.utils.config` (``from_dict``, ``load_config``): unknown keys and wrong types are
    errors naming the source and the dotted key (``augmentation.noise_p``); ``to_dict`` writes lists, what
    ``metrics.json`` holds as ``pretraining_config``."""

    config_name: ClassVar[str] = "pretraining config"

    # --- data
    data: str = field(
        metadata={"help": "A prepared enecg dataset folder (labels are ignored) or a folder of WFDB records."}
    )
    splits: tuple[str, ...] = field(
        default=("train",), metadata={"help": "Dataset parts to read (ignored for a record folder)."}
    )
    max_records: int | None = field(
        default=None, metadata={"help": "Use only the first N records (quick runs); null: all."}
    )
    # --- encoder
    architecture: str = field(
        default="SimpleNet", metadata={"help": f"Light encoder: one of {sorted(ARCHITECTURES)}."}
    )
    width_multiplier: float = field(default=1.0, metadata={"help": "Scales every layer's channel count."})
    embedding_dim: int = field(default=128, metadata={"help": "Size of the expert's embedding."})
    # --- input contract (saved with the expert)
    fs: float = field(default=100.0, metadata={"help": "Sampling rate in Hz the encoder sees."})
    leads: tuple[str, ...] = field(
        default=STANDARD_12_LEADS, metadata={"help": "Leads in the encoder's order."}
    )
    window_length: int = field(
        default=500,
        metadata={"help": "Samples per window (500 = 5 s at 100 Hz); records are cut into adjacent windows."},
    )
    scaling: str = field(
        default="zscore_lead", metadata={"help": f"Per-window scaling, one of {list(get_args(Scaling))}."}
    )
    bandpass: tuple[float, float] | None = field(
        default=None, metadata={"help": "Band-pass (low, high) Hz applied by the contract; null: none."}
    )
    # --- objective
    objective: str = field(default="combined", metadata={"help": f"One of {list(OBJECTIVES)}."})
    cmsc_weight: float = field(default=1.0, metadata={"help": "Weight of the CMSC loss (combined)."})
    reconstruction_weight: float = field(
        default=1.0, metadata={"help": "Weight of the masked-reconstruction loss (combined)."}
    )
    temperature: float = field(default=0.1, metadata={"help": "InfoNCE temperature."})
    projection_dim: int = field(
        default=128, metadata={"help": "Output size of the contrastive projection head."}
    )
    use_patient_ids: bool = field(
        default=False, metadata={"help": "Records of the same patient in a batch are positives too."}
    )
    mask_ratio: tuple[float, float] = field(
        default=(0.15, 0.25), metadata={"help": "Range of the fraction of samples masked per window."}
    )
    mask_span_s: float = field(default=0.2, metadata={"help": "Length of each masked span in seconds."})
    decoder_channels: int = field(default=64, metadata={"help": "Channels of the reconstruction decoder."})
    # --- augmentation
    augment: bool = field(default=True, metadata={"help": "Augment the segments (false: raw windows)."})
    augmentation: AugmentConfig = field(
        default_factory=AugmentConfig,
        metadata={"help": "Augmentation probabilities and strengths (see enecg.pretraining.augment)."},
    )
    # --- optimisation
    batch_size: int = field(default=64, metadata={"help": "Records per batch and process."})
    epochs: int = field(default=10, metadata={"help": "Passes over the records (when max_steps is null)."})
    max_steps: int | None = field(default=None, metadata={"help": "Optimizer steps; overrides epochs."})
    lr: float = field(default=1e-3, metadata={"help": "Peak learning rate (AdamW)."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    warmup_fraction: float = field(
        default=0.05,
        metadata={"help": "Fraction of the steps with a linear warm-up; then cosine decay to 0."},
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0: off)."})
    mixed_precision: str = field(default="no", metadata={"help": f"One of {list(MIXED_PRECISION)}."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    seed: int = field(default=0, metadata={"help": "Seed of weights, batches, augmentations and masks."})
    log_every: int = field(
        default=10, metadata={"help": "Steps between log lines (and the final-loss window)."}
    )
    # --- output
    output_dir: str = field(default="runs/pretrain-ssl", metadata={"help": "Expert folder to write."})
    name: str = field(
        default="enecg-ssl-simplenet", metadata={"help": "Expert name (e.g. the Hub repo name)."}
    )
    license: str = field(default="apache-2.0", metadata={"help": "Licence id of the saved weights."})
    overwrite: bool = field(
        default=False,
        metadata={"help": "Replace an expert already in output_dir (else refuse before training)."},
    )

    def __post_init__(self) -> None:
        for name in _TUPLE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, list):  # YAML / JSON give lists
                setattr(self, name, tuple(value))
        if isinstance(self.splits, str):
            self.splits = (self.splits,)
        if isinstance(self.augmentation, dict):
            self.augmentation = AugmentConfig.from_dict(self.augmentation)
        if not str(self.data):
            raise ValueError("pretraining config: 'data' (dataset or record folder) is required")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"pretraining config: architecture {self.architecture!r} not in {sorted(ARCHITECTURES)}"
            )
        if self.objective not in OBJECTIVES:
            raise ValueError(f"pretraining config: objective {self.objective!r} not in {list(OBJECTIVES)}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"pretraining config: mixed_precision {self.mixed_precision!r} not in {list(MIXED_PRECISION)} "
                '(quote "no" in YAML, where a bare no means false)'
            )
        if self.batch_size < 2:
            raise ValueError(
                f"pretraining config: batch_size must be >= 2 (negatives), got {self.batch_size}"
            )
        for name in ("epochs", "log_every", "window_length", "embedding_dim", "projection_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"pretraining config: {name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"pretraining config: max_steps must be >= 1 or null, got {self.max_steps}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(
                f"pretraining config: warmup_fraction must be in [0, 1), got {self.warmup_fraction}"
            )
        if self.mask_span_samples < 1 or self.mask_span_samples > self.window_length:
            raise ValueError(
                f"pretraining config: mask_span_s={self.mask_span_s} gives {self.mask_span_samples} samples at "
                f"{self.fs:g} Hz; it must be between 1 sample and the window ({self.window_length})"
            )

    # ------------------------------------------------------------------ derived

    @property
    def mask_span_samples(self) -> int:
        return round(self.mask_span_s * self.fs)

    def contract(self) -> InputContract:
        """The input contract of pretraining and of the saved expert: fixed windows, cut as adjacent segments
        (all of a record's windows averaged at inference), missing leads zero-filled, flat leads zeroed."""
        return InputContract(
            fs=self.fs,
            leads=self.leads,
            length=self.window_length,
            long_records="segments",
            aggregation="mean",
            short_records="pad",
            missing_leads="zero_fill",
            bandpass=self.bandpass,
            scaling=self.scaling,  # type: ignore[arg-type]  # validated by InputContract
            zero_constant_leads=True,
        )

    def encoder_config(self) -> LightCNNConfig:
        """The saved expert's build config (no demographics: pretraining sees signals only)."""
        return LightCNNConfig(
            architecture=self.architecture,
            in_leads=len(self.leads),
            input_length=self.window_length,
            fs=self.fs,
            width_multiplier=self.width_multiplier,
            embedding_dim=self.embedding_dim,
        )

    # ------------------------------------------------------------------ (de)serialisation

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None) -> PretrainConfig:
        """Build from a mapping (a recipe, ``metrics.json``'s ``pretraining_config``) through the config engine.

        One upgrade first: a single part name as ``splits`` (``splits: train``, ``--splits=train``), which the
        hand-written reader before the engine accepted, becomes a one-item list."""
        if isinstance(data, dict) and isinstance(data.get("splits"), str):
            data = {**data, "splits": [data["splits"]]}
        return decode(cls, data, source or cls.config_name)


def _warmup_cosine(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def freeze_unused_parameters(encoder: nn.Module, embed: Any, leads: int, length: int) -> list[str]:
    """Set ``requires_grad=False`` on the encoder parameters its embedding does not use (e.g. the light models'
    standalone classifier) and return their names.

    Found with one probe forward/backward in eval mode (which leaves BatchNorm statistics alone). Distributed
    data parallel needs it: a parameter that never gets a gradient stalls its gradient reduction."""
    was_training = encoder.training
    encoder.eval()
    probe = torch.zeros(2, leads, length)
    embed(encoder, probe).sum().backward()
    unused = [name for name, p in encoder.named_parameters() if p.requires_grad and p.grad is None]
    for name, p in encoder.named_parameters():
        p.grad = None
        if name in unused:
            p.requires_grad_(False)
    encoder.train(was_training)
    return unused


def _check_output(config: PretrainConfig) -> Path:
    out = Path(config.output_dir)
    if (out / EXPERT_SPEC_FILE).exists() and not config.overwrite:
        raise ValueError(f"{out}: already holds an expert ({EXPERT_SPEC_FILE}); set overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    return out


def pretrain(config: PretrainConfig) -> Path:
    """Run self-supervised pretraining and save the encoder as an in-house expert; returns the folder.

    Launch with ``python``/``enecg pretrain`` for one process or ``accelerate launch`` for several (each process
    draws its own batches of ``batch_size`` records, so InfoNCE negatives stay within a process's batch). Logs (and a tqdm bar) come from the main
    process only; only the main process writes.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    out = _check_output(config)
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    set_seed(config.seed)
    contract = config.contract()
    records = open_records(config.data, config.splits, config.max_records)
    if len(records) < config.batch_size:
        raise ValueError(
            f"{config.data}: {len(records)} record(s) is fewer than one batch of {config.batch_size}; lower batch_size"
        )
    loader = DataLoader(
        records,
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=True,  # InfoNCE's difficulty depends on the batch size: keep it constant
        collate_fn=SegmentPairCollator(contract),
        num_workers=config.num_workers,
        generator=torch.Generator().manual_seed(config.seed),
    )
    family = get_family(FAMILY)
    encoder_config = config.encoder_config()
    encoder = family.build(encoder_config.to_dict())
    frozen = freeze_unused_parameters(encoder, family.embed, len(config.leads), config.window_length)
    if frozen and accelerator.is_main_process:
        logger.info("not trained (unused by the embedding, saved as initialised): %s", ", ".join(frozen))
    model = SelfSupervisedModel(
        encoder,
        family.embed,
        embedding_dim=config.embedding_dim,
        leads=len(config.leads),
        length=config.window_length,
        objective=config.objective,  # type: ignore[arg-type]  # validated in PretrainConfig
        cmsc_weight=config.cmsc_weight,
        reconstruction_weight=config.reconstruction_weight,
        temperature=config.temperature,
        projection_dim=config.projection_dim,
        decoder_channels=config.decoder_channels,
    )
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
    )
    augment = ECGAugment(config.augmentation, config.fs) if config.augment else None
    generator = torch.Generator(device=accelerator.device)
    generator.manual_seed(config.seed * 1009 + accelerator.process_index)  # distinct draws per process
    use_mask = config.objective in ("reconstruction", "combined")
    records_seen = torch.zeros((), dtype=torch.long, device=accelerator.device)
    records_skipped = torch.zeros((), dtype=torch.long, device=accelerator.device)

    def compute_loss(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        first, second = batch["first"], batch["second"]
        with torch.no_grad():
            if augment is not None:
                first, second = augment(first, generator), augment(second, generator)
            mask = (
                span_mask(
                    first.shape[0],
                    first.shape[-1],
                    generator,
                    ratio_range=config.mask_ratio,
                    span=config.mask_span_samples,
                )
                if use_mask
                else None
            )
        groups = batch["groups"] if config.use_patient_ids else None
        records_seen.add_(batch["n_records"])
        records_skipped.add_(batch["n_skipped"])
        return model(first, second, groups, mask)

    trainer = Trainer(
        model,
        optimizer,
        loader,
        compute_loss,
        TrainerArguments(
            max_steps=config.max_steps,
            epochs=config.epochs,
            max_grad_norm=config.max_grad_norm if config.max_grad_norm > 0 else None,
            log_every=config.log_every,
            progress_desc="pretrain",
        ),
        accelerator=accelerator,
        scheduler=lambda optimizer, total: torch.optim.lr_scheduler.LambdaLR(
            optimizer, _warmup_cosine(int(config.warmup_fraction * total), total)
        ),
    )
    if trainer.steps_per_epoch == 0:
        raise ValueError(f"{config.data}: no full batch per process; lower batch_size or add records")
    started = time.monotonic()
    state = trainer.train()
    history = [{k: round(v, 6) for k, v in logs.items() if k != "step"} for logs in state.log_history]
    seen = int(accelerator.reduce(records_seen, reduction="sum").item())
    skipped = int(accelerator.reduce(records_skipped, reduction="sum").item())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        metrics = {
            "objective": config.objective,
            "final": history[-1] if history else {},
            "first": history[0] if history else {},
            "steps": state.global_step,
            "records_seen": seen,
            "records_skipped": skipped,
            "unique_records": len(records),
            "num_processes": accelerator.num_processes,
            "seconds": round(time.monotonic() - started, 1),
            "pretraining_config": config.to_dict(),
        }
        save_inhouse_expert(
            trainer.unwrapped.encoder,  # type: ignore[arg-type]
            family=FAMILY,
            config=encoder_config,
            contract=contract,
            folder=out,
            name=config.name,
            license=config.license,
            metrics=metrics,
            description=_description(config, metrics),
        )
        logger.info("saved the pretrained encoder to %s", out)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


def _description(config: PretrainConfig, metrics: dict[str, Any]) -> str:
    objective = {
        "cmsc": "CMSC contrastive coding of adjacent segments",
        "reconstruction": "masked-span reconstruction",
        "combined": f"CMSC (x{config.cmsc_weight:g}) + masked-span reconstruction (x{config.reconstruction_weight:g})",
    }[config.objective]
    return (
        f"In-house {config.architecture} encoder (width x{config.width_multiplier:g}, {config.embedding_dim}-d), "
        f"self-supervised with {objective} on {metrics['unique_records']} unlabelled records from "
        f"{Path(config.data).name} ({metrics['steps']} steps, {metrics['records_seen']} records seen, final loss "
        f"{metrics['final'].get('loss', float('nan')):.4f}); the classifier head is untrained."
    )


__all__ = ["MIXED_PRECISION", "PretrainConfig", "freeze_unused_parameters", "pretrain"]
