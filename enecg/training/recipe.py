"""Training recipes: one YAML file + ``--key=value`` overrides, parsed into typed dataclasses.

A recipe has the sections ``data``, ``experts``, ``tasks``, ``model``, ``optim``, ``evaluation``, ``output``,
``hub`` and ``tracking`` (see :class:`Recipe`; ``enecg train --help-recipe`` prints every key with its help).
Command-line overrides use dotted keys and YAML values, as in alignment-handbook / trl recipes::

    enecg train recipes/ptbxl_light_ensemble.yaml --optim.lr=3e-4 --model.gate.top_k=1 --experts.0.revision=abc

Every key is checked against the dataclasses: an unknown key (in the file or on the command line) or a value of
the wrong type is an error naming the key and where it came from, never silently ignored. The ensemble's own
settings (``model.heads``, ``model.lora``, ``model.gate``) are the :mod:`enecg.ensemble.config` dataclasses
themselves, so a recipe can set anything the ensemble supports and nothing else.

The typed decoding, the overrides and the help text are :mod:`enecg.utils.config`, the one configuration engine
of the package (its docstring says why not draccus or ``HfArgumentParser``); this module holds the recipe schema.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from enecg.ensemble.config import GateSettings, HeadSettings, LoraSettings
from enecg.leads import STANDARD_12_LEADS
from enecg.utils import config
from enecg.utils.config import ConfigError, config_help, decode, load_config

FeatureCacheMode = Literal["auto", "on", "off"]
MixedPrecision = Literal["no", "fp16", "bf16"]


RecipeError = (
    ConfigError  # a recipe that cannot be used; the message names the file (or command line) and key
)


# ------------------------------------------------------------------------------------------------- sections


@dataclass
class LightExpertSpec:
    """How to create an in-house light CNN expert when its folder does not exist yet (see
    :mod:`enecg.training.light_experts`). Created experts are pretrained on the run's training parts only."""

    architecture: str = field(
        default="SimpleNet",
        metadata={"help": "AttiaNet | DeepResidualCNN | ParallelCNN | ParallelCNNew | SimpleNet."},
    )
    width_multiplier: float = field(default=1.0, metadata={"help": "Scales every layer's channel count."})
    embedding_dim: int = field(default=128, metadata={"help": "Size of the expert's embedding."})
    fs: float = field(default=100.0, metadata={"help": "Sampling rate of the expert's input contract (Hz)."})
    input_length: int = field(default=1000, metadata={"help": "Samples per input window."})
    leads: list[str] = field(
        default_factory=lambda: list(STANDARD_12_LEADS), metadata={"help": "Input leads, in order."}
    )
    scaling: str = field(
        default="zscore_lead", metadata={"help": "Contract scaling: none | zscore_lead | zscore_record | ..."}
    )
    use_demographics: bool = field(
        default=False, metadata={"help": "Fuse age and sex into the embedding (the light models' option)."}
    )
    pretrain_task: str | None = field(
        default=None,
        metadata={"help": "Dataset task used for supervised pretraining (null: random initialisation)."},
    )
    pretrain_steps: int = field(default=0, metadata={"help": "Supervised pretraining steps (0: none)."})
    pretrain_lr: float = field(default=1e-3, metadata={"help": "Pretraining learning rate (AdamW)."})
    pretrain_batch_size: int = field(default=32, metadata={"help": "Pretraining batch size."})

    def __post_init__(self) -> None:
        if self.pretrain_steps < 0:
            raise ValueError("create.pretrain_steps must be >= 0")
        if self.pretrain_steps > 0 and not self.pretrain_task:
            raise ValueError("create.pretrain_steps > 0 needs create.pretrain_task")


@dataclass
class SyntheticSection:
    """Generated records (``enecg generate``) that join every run's training part, never validation or test.

    ``enecg train`` samples them before training (:func:`enecg.generative.augment.materialize_synthetic`), writes
    them under ``<output.dir>/synthetic`` and pools that dataset like ``extra_train``."""

    model: str = field(metadata={"help": "Generative model folder or Hub ID (enecg generate train)."})
    per_label: dict[str, int] = field(
        default_factory=dict, metadata={"help": "Records to generate per label, e.g. {HYP: 200}."}
    )
    seed: int = field(default=0, metadata={"help": "Sampling seed (same seed, same records)."})
    guidance_scale: float = field(default=1.0, metadata={"help": "Classifier-free guidance when sampling."})
    steps: int | None = field(default=None, metadata={"help": "DDIM steps (null: the model's default)."})

    def __post_init__(self) -> None:
        if not self.per_label or any(not isinstance(n, int) or n < 1 for n in self.per_label.values()):
            raise ValueError(
                f"data.synthetic.per_label needs label: count >= 1 entries, got {self.per_label}"
            )


@dataclass
class DataSection:
    """Which prepared dataset (``enecg data prepare``) and which of its parts to use."""

    path: str = field(metadata={"help": "Folder of a prepared enecg dataset (enecg_dataset.json + Arrow)."})
    prepare_from: str | None = field(
        default=None,
        metadata={
            "help": "PTB-XL folder: when `path` holds no dataset, build it there with prepare_ptbxl "
            "(options: rate, kfold)."
        },
    )
    rate: int = field(default=100, metadata={"help": "prepare_from: PTB-XL sampling rate (100 or 500)."})
    download: bool = field(
        default=False,
        metadata={
            "help": "prepare_from: download PTB-XL from PhysioNet with wfdb into that folder when it is missing "
            "(needs network; resumable)."
        },
    )
    train_parts: list[str] = field(
        default_factory=lambda: ["train"], metadata={"help": "Hold-out: the parts trained on."}
    )
    validation_part: str = field(
        default="validation", metadata={"help": "Hold-out: part for early stopping / model selection."}
    )
    test_part: str | None = field(
        default="test", metadata={"help": "Hold-out: part evaluated once at the end (null: none)."}
    )
    kfold: int | None = field(
        default=None,
        metadata={
            "help": "k-fold cross-validation over the dataset's fold_0..fold_{k-1} parts: fold i is the test "
            "part of run i, fold i+1 its validation part, the rest its training parts."
        },
    )
    folds: list[int] | None = field(
        default=None, metadata={"help": "k-fold: run only these folds (null: all)."}
    )
    max_records: int | None = field(
        default=None, metadata={"help": "Use only the first N records of each part (quick runs, tests)."}
    )
    extra_train: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Other prepared datasets whose records all join every run's training part (never validation "
            "or test), e.g. the CinC sample with its `superclass` task; they must carry the recipe's tasks."
        },
    )
    synthetic: SyntheticSection | None = field(
        default=None,
        metadata={
            "help": "Augment the training part with generated records: {model: ID, per_label: {HYP: 200}} "
            "(enecg train samples them first; they never reach validation or test)."
        },
    )
    feature_cache: FeatureCacheMode = field(
        default="auto",
        metadata={
            "help": "'auto': cache frozen experts' embeddings when the ensemble allows it (no LoRA on expert "
            "layers); 'on': require it; 'off': run the experts on every batch."
        },
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Feature cache folder (default: <output.dir>/feature_cache)."}
    )
    num_workers: int = field(
        default=0,
        metadata={
            "help": "DataLoader workers preparing records (contracts) for uncached training and evaluation and "
            "for the feature-cache fill; host memory is pinned when the device is CUDA."
        },
    )
    persistent_workers: bool = field(
        default=False,
        metadata={
            "help": "Keep the DataLoader workers alive between epochs instead of starting them for every pass "
            "(only with num_workers > 0)."
        },
    )
    prefetch_factor: int | None = field(
        default=None,
        metadata={
            "help": "Batches each worker prepares ahead (null: torch's default, 2; only with num_workers > 0)."
        },
    )

    def __post_init__(self) -> None:
        if self.kfold is not None and self.kfold < 3:
            raise ValueError(
                f"data.kfold must be >= 3 (test, validation and training folds), got {self.kfold}"
            )
        if self.max_records is not None and self.max_records < 1:
            raise ValueError("data.max_records must be >= 1 or null")
        if self.num_workers < 0:
            raise ValueError("data.num_workers must be >= 0")
        if self.prefetch_factor is not None and self.prefetch_factor < 1:
            raise ValueError("data.prefetch_factor must be >= 1 or null")


@dataclass
class ExpertSection:
    """One frozen expert of the ensemble."""

    name: str = field(metadata={"help": "Key of the expert in the ensemble (letters, digits, '_', '-')."})
    source: str = field(
        metadata={
            "help": "Hub ID (ORG/NAME), bundled spec name, hf-hub:/local-dir: name or a local expert folder."
        }
    )
    revision: str | None = field(
        default=None, metadata={"help": "Hub revision (branch, tag or commit); resolved to a commit sha."}
    )
    spec: str | None = field(
        default=None,
        metadata={
            "help": "Adapter spec (bundled name or spec file) where the repo holds several models, e.g. "
            "ecgfounder-12lead for PKUDigitalHealth/ECGFounder (null: the repo's default)."
        },
    )
    create: LightExpertSpec | None = field(
        default=None,
        metadata={"help": "Create an in-house light expert in the folder `source` when it does not exist."},
    )


@dataclass
class TaskSection:
    """One task trained jointly; `name` is a label column of the dataset."""

    name: str = field(metadata={"help": "Task (label column) of the dataset, e.g. superclass, sex, age."})
    loss_weight: float = field(default=1.0, metadata={"help": "Static weight of this task's loss."})
    regression_loss: Literal["mse", "huber"] = field(
        default="mse", metadata={"help": "Regression: loss on normalised targets."}
    )
    huber_delta: float = field(
        default=1.0, metadata={"help": "Regression: Huber threshold (normalised units)."}
    )
    normalize_target: bool = field(
        default=True,
        metadata={"help": "Regression: train on (y - mean) / std with mean and std of the training parts."},
    )


@dataclass
class StrategySettings:
    """How the ensemble is trained (:mod:`enecg.training.strategies`).

    ``joint``: heads, LoRA and gate train together on the gated mixture's loss (plus ``heads.expert_loss_weight``
    times each expert's own loss). ``staged`` (stacking done right): stage 1 trains every expert's heads on that
    expert's own loss, all experts at once, each selected and early-stopped on its own validation score (each
    reaches what it would alone); stage 2 freezes the heads and fits the gate on *out-of-fold* predictions of the
    training part (heads retrained on K-1 patient-disjoint folds predict the K-th), so the gate learns how the
    experts err on records they did not train on, and the validation part stays clean for model selection;
    optional stage 3 fine-tunes everything jointly at a lower learning rate, kept only if validation improves.
    """

    name: str = field(default="joint", metadata={"help": "Registered strategy: joint | staged."})
    oof_folds: int = field(
        default=5,
        metadata={
            "help": "staged: patient-disjoint folds of the training part for the out-of-fold predictions."
        },
    )
    gate_epochs: int | None = field(
        default=None, metadata={"help": "staged: epochs of the gate fit (null: optim.epochs)."}
    )
    gate_lr: float | None = field(
        default=None, metadata={"help": "staged: learning rate of the gate fit (null: optim.lr)."}
    )
    finetune_epochs: int = field(
        default=0,
        metadata={
            "help": "staged: epochs of the optional stage 3, joint fine-tuning of heads, LoRA and gate (0: "
            "none); its result is kept only if the validation selection metric improves."
        },
    )
    finetune_lr_scale: float = field(
        default=0.1, metadata={"help": "staged: stage 3 learning rate = optim.lr x this."}
    )

    def __post_init__(self) -> None:
        if self.oof_folds < 2:
            raise ValueError(f"model.strategy.oof_folds must be >= 2, got {self.oof_folds}")
        if self.gate_epochs is not None and self.gate_epochs < 1:
            raise ValueError("model.strategy.gate_epochs must be >= 1 or null")
        if self.gate_lr is not None and not self.gate_lr > 0:
            raise ValueError("model.strategy.gate_lr must be > 0 or null")
        if self.finetune_epochs < 0:
            raise ValueError("model.strategy.finetune_epochs must be >= 0")
        if not self.finetune_lr_scale > 0:
            raise ValueError("model.strategy.finetune_lr_scale must be > 0")


@dataclass
class ModelSection:
    """The ensemble's trainable parts (the :mod:`enecg.ensemble.config` settings) and how they are trained."""

    heads: HeadSettings = field(default_factory=HeadSettings, metadata={"help": "Per-expert task heads."})
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={"help": "LoRA (peft) settings."})
    gate: GateSettings = field(default_factory=GateSettings, metadata={"help": "Mixture-of-experts gate."})
    task_weighting: Literal["static", "uncertainty"] = field(
        default="static",
        metadata={"help": "'static' loss weights, or learned 'uncertainty' weighting (Kendall et al. 2018)."},
    )
    strategy: StrategySettings = field(
        default_factory=StrategySettings,
        metadata={"help": "Training strategy (joint | staged) and its settings."},
    )


@dataclass
class OptimSection:
    """Optimisation, schedule, precision and model selection."""

    seed: int = field(default=42, metadata={"help": "Seed of initialisation, shuffling and dropout."})
    epochs: int = field(default=10, metadata={"help": "Training epochs (passes over the training parts)."})
    max_steps: int | None = field(
        default=None, metadata={"help": "Stop after this many optimizer steps (null: epochs decide)."}
    )
    batch_size: int = field(default=32, metadata={"help": "Per-process training batch size."})
    eval_batch_size: int = field(default=64, metadata={"help": "Per-process evaluation batch size."})
    lr: float = field(default=1e-3, metadata={"help": "Peak learning rate (AdamW)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    lr_scheduler: str = field(
        default="cosine",
        metadata={
            "help": "transformers scheduler name: linear | cosine | constant | constant_with_warmup ..."
        },
    )
    warmup_steps: int = field(default=0, metadata={"help": "Learning-rate warm-up optimizer steps."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per optimizer step."}
    )
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Gradient clipping (null: none)."})
    mixed_precision: MixedPrecision | None = field(
        default=None,
        metadata={"help": "no | fp16 | bf16; null: from the accelerate config / `accelerate launch` flags."},
    )
    selection_metric: str = field(
        default="mean_headline",
        metadata={
            "help": "Validation metric for early stopping and the best checkpoint: 'mean_headline' (mean of "
            "the tasks' headline metrics: macro AUROC, AUROC, -MAE/std), 'loss', or '<task>/<metric>'."
        },
    )
    early_stopping_patience: int | None = field(
        default=5, metadata={"help": "Stop after this many epochs without improvement (null: never)."}
    )
    repeats: int = field(
        default=1,
        metadata={"help": "Repeated runs with seeds seed, seed+1, ... (everything re-initialised)."},
    )

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "gradient_accumulation_steps", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"optim.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("optim.max_steps must be >= 1 or null")
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError("optim.warmup_steps must be >= 0")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ValueError("optim.early_stopping_patience must be >= 1 or null")


@dataclass
class EvaluationSection:
    """Final evaluation of the selected model (validation fits thresholds, test reports)."""

    bootstrap_resamples: int = field(
        default=1000, metadata={"help": "Patient-level bootstrap resamples for CIs (0: none)."}
    )
    operating_point: Literal["max_f1", "sensitivity"] = field(
        default="max_f1", metadata={"help": "How thresholds are chosen on validation."}
    )
    target_sensitivity: float = field(default=0.9, metadata={"help": "operating_point='sensitivity' target."})
    report: bool = field(
        default=True,
        metadata={
            "help": "After training, evaluate the saved model on the test part (enecg evaluate: report.json + "
            "report.html with figures) and put the results in its model card."
        },
    )
    report_examples: int = field(default=4, metadata={"help": "Example records rendered in the report."})


@dataclass
class OutputSection:
    """Where runs write, checkpointing and resuming."""

    dir: str = field(metadata={"help": "Output folder (checkpoints, logs, metrics, model/)."})
    resume: str = field(
        default="auto",
        metadata={
            "help": "'auto': resume from the last complete checkpoint in the output folder; 'never'; or the "
            "path of a checkpoint folder."
        },
    )
    checkpoint_every_steps: int | None = field(
        default=500, metadata={"help": "Also checkpoint every N optimizer steps (null: epoch ends only)."}
    )
    keep_checkpoints: int = field(default=2, metadata={"help": "Most recent checkpoints kept per run."})
    save_model: bool = field(
        default=True, metadata={"help": "Save the selected model with save_pretrained into <run>/model."}
    )

    def __post_init__(self) -> None:
        if self.checkpoint_every_steps is not None and self.checkpoint_every_steps < 1:
            raise ValueError("output.checkpoint_every_steps must be >= 1 or null")
        if self.keep_checkpoints < 1:
            raise ValueError("output.keep_checkpoints must be >= 1")


@dataclass
class HubSection:
    """Publishing the saved model (main process only, after training)."""

    push: bool = field(default=False, metadata={"help": "Push <run>/model to the Hub at the end."})
    repo_id: str | None = field(default=None, metadata={"help": "Target model repo ORG/NAME."})
    private: bool = field(default=True, metadata={"help": "Create the repo private."})
    revision: str | None = field(default=None, metadata={"help": "Branch to push to (default main)."})

    def __post_init__(self) -> None:
        if self.push and not self.repo_id:
            raise ValueError("hub.push needs hub.repo_id")


@dataclass
class TrackingSection:
    """Experiment trackers (Accelerate's `log_with`)."""

    log_with: list[str] = field(
        default_factory=lambda: ["tensorboard"],
        metadata={"help": "Accelerate trackers: tensorboard (default), trackio, wandb, ...; [] for none."},
    )
    project_name: str = field(default="enecg", metadata={"help": "Tracker project / run name prefix."})
    log_every_steps: int = field(
        default=10, metadata={"help": "Log training losses every N optimizer steps."}
    )


@dataclass
class Recipe:
    """A complete training recipe."""

    data: DataSection = field(metadata={"help": "Dataset and parts."})
    experts: list[ExpertSection] = field(metadata={"help": "The frozen experts, in gate order."})
    tasks: list[TaskSection] = field(metadata={"help": "Tasks trained jointly."})
    output: OutputSection = field(metadata={"help": "Output folder, checkpoints, resuming."})
    model: ModelSection = field(default_factory=ModelSection, metadata={"help": "Heads, LoRA, gate."})
    optim: OptimSection = field(default_factory=OptimSection, metadata={"help": "Optimisation."})
    evaluation: EvaluationSection = field(
        default_factory=EvaluationSection, metadata={"help": "Final evaluation."}
    )
    hub: HubSection = field(default_factory=HubSection, metadata={"help": "Publishing."})
    tracking: TrackingSection = field(default_factory=TrackingSection, metadata={"help": "Trackers."})

    def __post_init__(self) -> None:
        if not self.experts:
            raise ValueError("experts: at least one expert is needed")
        if not self.tasks:
            raise ValueError("tasks: at least one task is needed")
        for kind, names in (
            ("expert", [e.name for e in self.experts]),
            ("task", [t.name for t in self.tasks]),
        ):
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValueError(f"duplicate {kind} names {duplicates}")
        if self.hub.push and (self.data.kfold is not None or self.optim.repeats > 1):
            raise ValueError(
                "hub.push publishes one model: it needs a single hold-out run (no kfold, repeats=1)"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping (``parse_recipe_dict(recipe.to_dict())`` gives an equal recipe)."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """``section.key -> value`` with scalar values (lists/dicts as text), for trackers' hyper-parameters."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value and prefix.count(".") < 3:
                for key, inner in value.items():
                    walk(f"{prefix}.{key}" if prefix else str(key), inner)
            elif value is None or isinstance(value, (bool, int, float, str)):
                out[prefix] = "null" if value is None else value
            else:
                out[prefix] = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()

        walk("", self.to_dict())
        return out


# ------------------------------------------------------------------------------------------------- parsing


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe YAML file and apply ``--key=value`` overrides (command-line style).

    Raises :class:`RecipeError` naming the file (or the command line) and the offending key.
    """
    return load_config(path, Recipe, overrides)


def parse_recipe_dict(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Build a :class:`Recipe` from a mapping; errors name ``source`` and the key."""
    return decode(Recipe, data, source)


def apply_overrides(
    data: dict[str, Any], overrides: list[str] | tuple[str, ...], schema: type | None = None
) -> dict[str, Any]:
    """A copy of ``data`` with dotted-key overrides set; keys unknown to ``schema`` (default :class:`Recipe`)
    are errors naming the flag."""
    return config.apply_overrides(data, overrides, schema or Recipe)


def recipe_help(schema: type | None = None) -> str:
    """Every key of ``schema`` (default :class:`Recipe`) with its type, default and help text
    (``enecg train --help-recipe``)."""
    return config_help(schema or Recipe, skip=("enecg_version",))
