"""Experts: published ECG foundation models loaded by Hub ID behind their input contracts.

``load_expert("hubert-ecg-small")`` (a bundled spec name), ``load_expert("Edoardo-BS/hubert-ecg-small")`` (a Hub
ID), ``load_expert("/path/to/folder")`` or ``load_expert("hf-hub:ORG/NAME@REV")`` return a frozen :class:`Expert`.
"""

from enecg.experts.expert import Expert, PreparedBatch, build_expert, load_expert
from enecg.experts.resolve import ExpertLoadError, ResolvedExpert, resolve_expert
from enecg.experts.spec import SPEC_FILENAME, Spec, SpecError, bundled_spec, bundled_specs

__all__ = [
    "SPEC_FILENAME",
    "Expert",
    "ExpertLoadError",
    "PreparedBatch",
    "ResolvedExpert",
    "Spec",
    "SpecError",
    "build_expert",
    "bundled_spec",
    "bundled_specs",
    "load_expert",
    "resolve_expert",
]
