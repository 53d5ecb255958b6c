"""Distributed training: two real CPU processes (torch.distributed gloo, launched with ``accelerate launch`` and the
shipped ``recipes/accelerate_configs/cpu_ddp_gloo.yaml``) train the same recipe as one process, and end with the
same weights and the same gathered validation/test metrics.

What should be equal, and why. The single-process run uses batch ``2B``; each of the two processes uses ``B``.
Every process draws the same epoch permutation (``EpochShuffleSampler``) and Accelerate gives process ``r`` the
``r``-th batch of each consecutive pair, so optimizer step ``s`` sees exactly the records of the single-process
batch ``s``, split in two halves. DDP averages the two half-batch gradients; that average *is* the full-batch
gradient when each task's loss is a plain mean over equally many labelled records on both halves. The recipe is
chosen so that this holds exactly:

- the first 64 records of each part (``data.max_records``): no training record among them lacks a label (record
  74 is the first without one), and 64 = 4 steps x 16 records, so no batch is short or padded;
- no randomness that depends on the process (dropout 0 in heads and LoRA, a dense gate without noise);
  static task weights and no batch-level auxiliary losses (load balance / entropy are not batch-additive);
- evaluation batches of 32: the single process evaluates batches [0:32], [32:64], the two processes one each,
  so nothing is padded and ``gather_for_metrics`` returns every record once, in order (even the validation loss,
  a per-batch mean, is summed over the same batches).

What still differs is floating-point summation order (two half-batch sums + an all-reduce instead of one sum;
other kernel blocking for other shapes): float32 rounding, ~1e-7 relative per step. Measured here after twelve
AdamW steps: largest weight difference 6e-8, metric differences <= 3e-7 (MAE ~21 years in float32; AUROCs equal).
Tolerances, ~100x that: every trainable tensor within ``atol=1e-5, rtol=1e-4``; every headline metric and
per-epoch log within ``1e-5`` (absolute or relative). That is far below what one different step would cause
(lr 3e-3 moves weights by ~1e-3 per step) and below one swapped pair in an AUROC on 64 records (>= 1/(32*32)),
so a real divergence (wrong sharding, no gradient averaging, a skipped or repeated batch, a wrong scheduler
length) fails. The one logged value that is *not* expected to match is the gate's load-balance term (see
``NOT_BATCH_ADDITIVE``). That two processes really ran is checked from a file each rank writes.

The ``staged`` strategy is run the same way. Its stage 1 trains on the same 64 records and must match as tightly.
Its out-of-fold phases train on patient-disjoint subsets whose sizes are not multiples of the batch: Accelerate
evens out the last batch of a subset by repeating records on one process, so those phases (and the gate fitted on
their predictions) are compared for what must hold — the same folds, every row predicted once, finite logits, the
same phases — and for their final metrics within a stated tolerance, not bit for bit.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from enecg.training.recipe import LightExpertSpec
from enecg.training.trainer import (
    BEST_DIR,
    METRICS_FILE,
    TRAINABLE_WEIGHTS_FILE,
    TRAINER_STATE_FILE,
    latest_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]
GLOO_CONFIG = REPO / "recipes" / "accelerate_configs" / "cpu_ddp_gloo.yaml"
TASKS = ("superclass", "sex", "age")
RECORDS = 64  # per part; the first 64 training records all carry every label
GLOBAL_BATCH = 16
EPOCHS = 3
WEIGHT_ATOL, WEIGHT_RTOL = 1e-5, 1e-4
METRIC_TOL = 1e-5  # absolute and relative
# Logged for monitoring but not additive over records: a function of batch-mean routing fractions, so the mean of
# two half-batch values is not the full-batch value (it has weight 0 here and never reaches the gradient).
NOT_BATCH_ADDITIVE = {"train/gate/load_balance"}
LAUNCH_TIMEOUT_S = 240

# Runs under a launcher or alone: hands over to the training entry point (what ``accelerate launch -m enecg.train``
# runs), which ends a distributed run through its exit path (barrier, destroy the process group, flush,
# ``os._exit``): two-process gloo jobs otherwise abort at interpreter exit about one run in five, after all the work
# is done. Each rank records the Accelerator the trainer actually built. (Not an earlier ``PartialState()`` of our
# own: created first without ``cpu=True``, it would make each launched process a lone rank 0 on a CPU machine.)
DRIVER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from enecg.cli.train import main
    from enecg.training import trainer

    make_accelerator = trainer.make_accelerator

    def recording(*args, **kwargs):
        accelerator = make_accelerator(*args, **kwargs)
        info = {
            "num_processes": accelerator.num_processes,
            "process_index": accelerator.process_index,
            "distributed_type": str(accelerator.distributed_type),
            "backend": accelerator.state.backend,
            "device": str(accelerator.device),
        }
        folder = os.environ["RANK_INFO_DIR"]
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"rank_{accelerator.process_index}.json"), "w") as fh:
            json.dump(info, fh)
        return accelerator

    trainer.make_accelerator = recording
    sys.exit(main(["--config", *sys.argv[1:]]))
    """
)


@pytest.fixture(scope="module")
def setup(ptbxl_training_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from enecg.data.build import load_dataset_dir
    from enecg.training.light_experts import create_light_expert

    dataset_dir = ptbxl_training_dataset
    dataset, meta = load_dataset_dir(dataset_dir)
    root = tmp_path_factory.mktemp("multiprocess")
    experts = {}
    # Two different architectures, briefly pretrained (training part only) so the metrics are not all chance.
    for index, (architecture, task) in enumerate((("SimpleNet", "superclass"), ("ParallelCNN", "age"))):
        spec = LightExpertSpec(
            architecture=architecture,
            width_multiplier=0.25,
            embedding_dim=16,
            pretrain_task=task,
            pretrain_steps=10,
            pretrain_lr=3e-3,
        )
        experts[architecture.lower()] = create_light_expert(
            spec,
            root / architecture,
            name=architecture.lower(),
            train_part=dataset["train"],
            tasks=meta.tasks,
            seed=index,
        )
    recipe = {
        "data": {"path": str(dataset_dir), "max_records": RECORDS, "feature_cache": "on"},
        "experts": [{"name": n, "source": str(p)} for n, p in experts.items()],
        "tasks": [{"name": t} for t in TASKS],
        "model": {
            "heads": {"hidden_sizes": [32], "dropout": 0.0},
            "lora": {"r": 4, "dropout": 0.0},
            "gate": {"hidden_sizes": [16]},
            "strategy": {"name": "joint"},  # the staged run overrides it
        },
        "optim": {
            "epochs": EPOCHS,
            "batch_size": GLOBAL_BATCH,  # the two-process run overrides it with GLOBAL_BATCH // 2
            "eval_batch_size": 32,
            "lr": 3e-3,
            "warmup_steps": 2,
            "early_stopping_patience": None,
            "seed": 11,
        },
        "evaluation": {"bootstrap_resamples": 0},
        "output": {"dir": str(root / "unused"), "checkpoint_every_steps": None, "save_model": False},
        "tracking": {"log_with": []},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (root / "driver.py").write_text(DRIVER)
    return {"root": root}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment(out: Path) -> dict[str, str]:
    return {
        **os.environ,
        "RANK_INFO_DIR": str(out / "ranks"),
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
    }


def _train_single(root: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        str(root / "driver.py"),
        str(root / "recipe.yaml"),
        f"--output.dir={out}",
        *extra,
    ]
    return subprocess.run(
        command, env=_environment(out), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, cwd=REPO
    )


def _train_two_processes(root: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(GLOO_CONFIG),
        "--main_process_port",
        str(_free_port()),  # not the fixed 29500: other jobs on the machine may hold it
        str(root / "driver.py"),
        str(root / "recipe.yaml"),
        f"--output.dir={out}",
        f"--optim.batch_size={GLOBAL_BATCH // 2}",
        *extra,
    ]
    return subprocess.run(
        command, env=_environment(out), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, cwd=REPO
    )


@pytest.fixture(scope="module")
def runs(setup: dict[str, Path]) -> dict[str, Path]:
    root = setup["root"]
    single = _train_single(root, root / "single")
    assert single.returncode == 0, single.stderr[-3000:]
    double = _train_two_processes(root, root / "ddp")
    assert double.returncode == 0, double.stderr[-3000:]
    return {"single": root / "single", "ddp": root / "ddp"}


def _rank_info(run_dir: Path, rank: int) -> dict[str, Any]:
    return json.loads((run_dir / "ranks" / f"rank_{rank}.json").read_text())


def _trainer_state(run_dir: Path) -> dict[str, Any]:
    """The final checkpoint's loop state: steps done and the per-epoch logs (history)."""
    return json.loads((latest_checkpoint(run_dir) / TRAINER_STATE_FILE).read_text())


def test_two_real_gloo_processes_ran(runs: dict[str, Path]) -> None:
    assert _rank_info(runs["single"], 0)["num_processes"] == 1
    assert not (runs["single"] / "ranks" / "rank_1.json").exists()
    ranks = [_rank_info(runs["ddp"], rank) for rank in (0, 1)]
    assert [r["process_index"] for r in ranks] == [0, 1]
    for info in ranks:
        assert info["num_processes"] == 2
        assert info["backend"] == "gloo" and info["device"].startswith("cpu")
        # `distributed_type: MULTI_GPU` + `use_cpu` in the config: Accelerate's DDP over gloo, reported as MULTI_CPU.
        assert info["distributed_type"].endswith("MULTI_CPU")
    # The records were sharded: 4 optimizer steps per epoch, as with one process at twice the batch. (One process
    # alone at the per-process batch would take 8; two unsynchronised processes would each write their own 8.)
    expected_steps = EPOCHS * RECORDS // GLOBAL_BATCH
    assert _trainer_state(runs["ddp"])["global_step"] == _trainer_state(runs["single"])["global_step"]
    assert _trainer_state(runs["ddp"])["global_step"] == expected_steps


def test_trained_weights_match_the_single_process_run(runs: dict[str, Path]) -> None:
    final = latest_checkpoint(runs["single"]).relative_to(runs["single"])
    assert (runs["ddp"] / final).is_dir()  # same checkpoint name: same save index and step
    for relative in (Path(BEST_DIR) / TRAINABLE_WEIGHTS_FILE, final / TRAINABLE_WEIGHTS_FILE):
        single = load_file(str(runs["single"] / relative))
        ddp = load_file(str(runs["ddp"] / relative))
        assert single.keys() == ddp.keys()
        for key in single:
            torch.testing.assert_close(ddp[key], single[key], atol=WEIGHT_ATOL, rtol=WEIGHT_RTOL, msg=key)

    # The weights did train: the comparison is not between two untouched initialisations.
    history = _trainer_state(runs["single"])["history"]
    assert len(history) == EPOCHS
    assert history[-1]["train/loss"] < history[0]["train/loss"]


def test_gathered_metrics_match_the_single_process_run(runs: dict[str, Path]) -> None:
    single = json.loads((runs["single"] / METRICS_FILE).read_text())
    ddp = json.loads((runs["ddp"] / METRICS_FILE).read_text())
    assert single["best_epoch"] == ddp["best_epoch"]
    for part in ("validation", "test"):
        # Every record evaluated exactly once (no padding duplicates, nothing dropped).
        assert single[part]["n_records"] == ddp[part]["n_records"] == RECORDS
        headline_single, headline_ddp = single[part]["headline"], ddp[part]["headline"]
        assert headline_single.keys() == headline_ddp.keys()
        assert {"superclass/macro_auroc", "sex/auroc", "age/mae", "loss"} <= headline_single.keys()
        for key, value in headline_single.items():
            assert headline_ddp[key] == pytest.approx(value, abs=METRIC_TOL, rel=METRIC_TOL), (part, key)

    # Per-epoch logs: training losses (record-weighted over both processes), gate weights, validation metrics.
    history_single = _trainer_state(runs["single"])["history"]
    history_ddp = _trainer_state(runs["ddp"])["history"]
    assert [h["global_step"] for h in history_single] == [h["global_step"] for h in history_ddp]
    for epoch_single, epoch_ddp in zip(history_single, history_ddp):
        assert epoch_single.keys() == epoch_ddp.keys()
        assert NOT_BATCH_ADDITIVE <= epoch_single.keys()
        for key in epoch_single.keys() - NOT_BATCH_ADDITIVE:
            expected = epoch_single[key]
            assert epoch_ddp[key] == pytest.approx(expected, abs=METRIC_TOL, rel=METRIC_TOL), key


# ------------------------------------------------------------------------------------------------ staged

STAGED = ("--model.strategy.name=staged", "--model.strategy.oof_folds=2", "--model.gate.input=embeddings")
STAGED_METRIC_TOL = 0.02  # out-of-fold phases see evened-out (repeated) records on one process


@pytest.fixture(scope="module")
def staged_runs(setup: dict[str, Path]) -> dict[str, Path]:
    root = setup["root"]
    single = _train_single(root, root / "staged-single", *STAGED)
    assert single.returncode == 0, single.stderr[-3000:]
    double = _train_two_processes(root, root / "staged-ddp", *STAGED)
    assert double.returncode == 0, double.stderr[-3000:]
    return {"single": root / "staged-single", "ddp": root / "staged-ddp"}


def test_staged_strategy_with_two_processes(staged_runs: dict[str, Path]) -> None:
    single, ddp = staged_runs["single"], staged_runs["ddp"]
    assert [_rank_info(ddp, rank)["num_processes"] for rank in (0, 1)] == [2, 2]
    # Stage 1 trains every expert's heads on the same 64 records: as tight as the joint run.
    stage1 = sorted(p.relative_to(single) for p in (single / "stage1" / BEST_DIR).rglob(TRAINABLE_WEIGHTS_FILE))
    assert len(stage1) == 6  # 2 experts x 3 task heads, each selected on its own
    for relative in stage1:
        a, b = load_file(str(single / relative)), load_file(str(ddp / relative))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=WEIGHT_ATOL, rtol=WEIGHT_RTOL, msg=key)
    # The same patient-disjoint folds; every training row predicted out of fold exactly once, by both runs.
    folds = [json.loads((run / "oof" / "folds.json").read_text()) for run in (single, ddp)]
    assert folds[0] == folds[1] and len(folds[0]["fold"]) == RECORDS
    for run in (single, ddp):
        logits = load_file(str(run / "oof" / "oof_logits.safetensors"))
        assert set(logits) == set(TASKS)
        assert all(v.shape[0] == RECORDS and bool(torch.isfinite(v).all()) for v in logits.values())
    a, b = json.loads((single / METRICS_FILE).read_text()), json.loads((ddp / METRICS_FILE).read_text())
    assert a["strategy"]["final_phase"] == b["strategy"]["final_phase"] == "gate"
    assert set(a["strategy"]["phases"]) == set(b["strategy"]["phases"]) == {"stage1", "oof_0", "oof_1", "gate"}
    for part in ("validation", "test"):
        assert a[part]["n_records"] == b[part]["n_records"] == RECORDS
        for key in ("superclass/macro_auroc", "sex/auroc"):
            assert b[part]["headline"][key] == pytest.approx(a[part]["headline"][key], abs=STAGED_METRIC_TOL)
