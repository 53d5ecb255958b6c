"""Shared test setup.

Hugging Face libraries read their environment when first imported, so offline mode and a private cache are set
here, before any test module imports them: no test may touch the network or the user's real cache.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_HF_HOME = tempfile.mkdtemp(prefix="enecg-tests-hf-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_CACHE"] = str(Path(_HF_HOME) / "hub")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """``../shared/data`` next to the repository, or ``$ENECG_DATA_DIR``."""
    return Path(os.environ.get("ENECG_DATA_DIR", REPO_ROOT.parent / "shared" / "data")).resolve()


def parity_dir() -> Path:
    """``../shared/fixtures/parity``, or ``$ENECG_PARITY_DIR``."""
    return Path(os.environ.get("ENECG_PARITY_DIR", REPO_ROOT.parent / "shared" / "fixtures" / "parity")).resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared ECG data not found at {path} (set ENECG_DATA_DIR to run data tests)")
    return path


@pytest.fixture(scope="session")
def ptbxl_dir(data_dir: Path) -> Path:
    path = data_dir / "ptbxl500"
    if not (path / "ptbxl_database.csv").is_file():
        pytest.skip(f"PTB-XL sample not found at {path}")
    return path


@pytest.fixture(scope="session")
def cinc_dir(data_dir: Path) -> Path:
    path = data_dir / "cinc"
    if not path.is_dir():
        pytest.skip(f"CinC sample not found at {path}")
    return path


TRAINING_TASKS = ("superclass", "sex", "age")


@pytest.fixture(scope="session")
def ptbxl_training_dataset(ptbxl_dir: Path) -> Path:
    """The PTB-XL sample at 100 Hz with the training tests' tasks, prepared once in a fixed temp folder shared by
    the training, feature-cache, resume and multi-process tests (prepare_ptbxl's cache key decides on rebuilds)."""
    from enecg.data.ptbxl import PtbxlOptions, prepare_ptbxl

    out = Path(tempfile.gettempdir()) / "enecg-tests" / "ptbxl500-100hz-training"
    prepare_ptbxl(ptbxl_dir, out, PtbxlOptions(rate=100, tasks=TRAINING_TASKS))
    return out


@pytest.fixture(scope="module")
def single_torch_thread():
    """Tiny heads on 2 shared cores: OpenMP threading costs more than it gains (and tests run side by side)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps process-wide state: each training run in a test process starts from a clean one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)
