"""Self-supervised pretraining of in-house ECG encoders on unlabelled records.

``pretrain(PretrainConfig(data=..., ...))`` trains a light CNN encoder with CMSC contrastive coding of adjacent
segments and/or masked-span reconstruction (:mod:`~enecg.pretraining.objectives`), with ECG-specific augmentations
(:mod:`~enecg.pretraining.augment`), and saves it as an in-house expert folder that ``enecg.load_expert`` loads
by path, or by Hub ID once uploaded. Command line: ``enecg pretrain --config recipes/pretrain_ssl.yaml``.
"""

from enecg.pretraining.augment import AugmentConfig, ECGAugment
from enecg.pretraining.data import SegmentPairCollator, open_records
from enecg.pretraining.objectives import (
    CMSCObjective,
    MaskedReconstructionObjective,
    SelfSupervisedModel,
    info_nce,
    masked_mse,
    span_mask,
)
from enecg.pretraining.pretrainer import PretrainConfig, pretrain

__all__ = [
    "AugmentConfig",
    "CMSCObjective",
    "ECGAugment",
    "MaskedReconstructionObjective",
    "PretrainConfig",
    "SegmentPairCollator",
    "SelfSupervisedModel",
    "info_nce",
    "masked_mse",
    "open_records",
    "pretrain",
    "span_mask",
]
