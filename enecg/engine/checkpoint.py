"""Checkpoint folders of the training loops: written complete or not at all, the newest few kept.

A checkpoint is ``<folder>/checkpoint_NNNNN-step_SSSSSSS`` (save index, optimizer step): ``accelerator.save_state``
(model, optimizer, registered schedulers, RNG states) plus the loop's ``trainer_state.json`` and whatever the loop
adds, written into ``.tmp-<name>`` and renamed when complete, so a run killed mid-save leaves no half checkpoint
that a resume could pick.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from enecg.utils.files import write_text_atomic

if TYPE_CHECKING:
    from accelerate import Accelerator

TRAINER_STATE_FILE = "trainer_state.json"
CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)-step_(\d+)$")


def checkpoint_name(save_index: int, global_step: int) -> str:
    """``checkpoint_NNNNN-step_SSSSSSS``: sorted by save index, the optimizer step readable."""
    return f"checkpoint_{save_index:05d}-step_{global_step:07d}"


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints (renamed from staging, with a trainer state), oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = CHECKPOINT_RE.match(path.name)
        if match and (path / TRAINER_STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def read_trainer_state(path: Path, state_class: type) -> dict[str, Any]:
    """The fields of a checkpoint's ``trainer_state.json`` for the dataclass ``state_class``; errors name the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable trainer state ({exc})") from None
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(state_class)})
    if unknown:
        raise ValueError(f"{path}: unknown trainer-state keys {unknown} (written by another enecg version?)")
    return data


def write_checkpoint(
    accelerator: Accelerator,
    folder: Path,
    name: str,
    state_json: str,
    *,
    keep: int,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Save the accelerator's state and ``state_json`` as ``folder/name`` (atomically) on every process's call;
    ``extra(staging)`` writes more files on the main process; only the newest ``keep`` checkpoints stay."""
    staging = folder / f".tmp-{name}"
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    target = folder / name
    if accelerator.is_main_process:
        if extra is not None:
            extra(staging)
        write_text_atomic(staging / TRAINER_STATE_FILE, state_json)
        if target.exists():  # only after a crash between two saves of the same index
            shutil.rmtree(target)
        staging.rename(target)  # complete checkpoints appear atomically
        for old in complete_checkpoints(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


__all__ = [
    "CHECKPOINT_RE",
    "TRAINER_STATE_FILE",
    "checkpoint_name",
    "complete_checkpoints",
    "write_checkpoint",
]
