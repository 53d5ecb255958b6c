"""Generative ECG models: a label-conditional diffusion model (diffusers 1-D UNet, DDPM training, DDIM sampling),
its training loop, synthetic WFDB records, anomaly scores from reconstruction error, and evaluation of samples.

Layer: beside ``training``/``pretraining`` (imports data, experts, evaluation; never training/pretraining).
"""

from enecg.generative.model import DiffusionSpec, ECGDiffusion, load_diffusion, save_diffusion
from enecg.generative.train import GenerativeConfig, train_diffusion

__all__ = [
    "DiffusionSpec",
    "ECGDiffusion",
    "GenerativeConfig",
    "load_diffusion",
    "save_diffusion",
    "train_diffusion",
]
