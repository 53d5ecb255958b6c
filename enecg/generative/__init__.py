"""Generative ECG models: a label-conditional diffusion model (diffusers 1-D UNet, DDPM training, DDIM sampling),
its training loop, a beat-template model (kind ``beat``: median beats + rhythm, scikit-learn), synthetic WFDB
records, anomaly scores from reconstruction error, and evaluation of samples. Model kinds are registered by name
(:mod:`enecg.generative.base`); :func:`load_generative` loads any of them.

Layer: beside ``training``/``pretraining`` (imports data, experts, evaluation; never training/pretraining).
"""

from enecg.generative.base import GenerativeModel, load_generative, register_generative, train_from_recipe
from enecg.generative.beat import BeatConfig, BeatModel, BeatSpec, train_beat
from enecg.generative.model import DiffusionSpec, ECGDiffusion, load_diffusion, save_diffusion
from enecg.generative.train import GenerativeConfig, train_diffusion

__all__ = [
    "BeatConfig",
    "BeatModel",
    "BeatSpec",
    "DiffusionSpec",
    "ECGDiffusion",
    "GenerativeConfig",
    "GenerativeModel",
    "load_diffusion",
    "load_generative",
    "register_generative",
    "save_diffusion",
    "train_beat",
    "train_diffusion",
    "train_from_recipe",
]
