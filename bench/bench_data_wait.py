"""How long a training step waits for its batch, and what DataLoader workers buy ``enecg embed``.

On the PTB-XL 500-record sample prepared at 500 Hz (``$ENECG_DATA_DIR/ptbxl500``), with the bench experts of
``bench_scale.py`` (an in-house SimpleNet, width 0.25, contract 100 Hz / 10 s / z-score per lead; HuBERT-ECG small
at its published full size with random weights), every contract here resamples 500 Hz records:

* **Data-wait share of a training step** (``RunResult.data_wait``, :mod:`enecg.training.loop`): seconds the
  loop was blocked fetching micro-batches / their whole time (fetch + forward + backward + optimizer step), summed
  over the run's training steps. Three trainings of the light-expert ensemble (heads + gate; tasks superclass and
  sex; ``--epochs`` epochs, batch ``--batch-size``, seed 0, run in this process with one torch thread):
  ``cache`` (the feature cache, filled before training; batches are tensor slices), ``raw_0_workers`` (the
  contract is applied per batch in the main process, the frozen expert runs every step) and ``raw_2_workers``
  (the same with 2 persistent DataLoader workers). Repeated ``--repeats`` times, interleaved; the median share
  is reported.
* **``enecg embed`` wall time with 0 vs 2 workers** (fresh cache each; ``measure`` from ``bench_scale.py``: a
  fresh subprocess with ``OMP_NUM_THREADS=1``): the light expert on every record (3 parts, batch 64) and the FM
  on ``--fm-records`` records per part (batch 8). ``embed_seconds`` is ``embed_dataset``'s own time (experts
  loaded, records embedded), ``seconds`` the whole command. Interleaved, ``--repeats`` times; medians reported.
  The two caches are compared bit for bit.

Targets (issue 11): data-wait share from the cache <= 5 %; from raw records with 2 workers: reported.
Results go to ``bench/results/data_wait.json``::

    python bench/bench_data_wait.py            # ~5 min on 2 cores
    python bench/bench_data_wait.py --quick    # pipeline check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_scale import measure, write_experts  # noqa: E402

from enecg.utils.files import write_text_atomic  # noqa: E402

MODES = {
    "cache": {"feature_cache": "on"},
    "raw_0_workers": {"feature_cache": "off", "num_workers": 0},
    "raw_2_workers": {"feature_cache": "off", "num_workers": 2, "persistent_workers": True},
}


def train_once(
    dataset: Path, expert: Path, work: Path, mode: str, args: argparse.Namespace, repeat: int
) -> dict:
    """One training of the light-expert ensemble; its data-wait totals and the run's headline metric."""
    from enecg.training.recipe import parse_recipe_dict
    from enecg.training.trainer import train

    out = work / f"train-{mode}-{repeat}"
    recipe = parse_recipe_dict(
        {
            "data": {"path": str(dataset), "cache_dir": str(work / "train-cache"), **MODES[mode]},
            "experts": [{"name": "light", "source": str(expert)}],
            "tasks": [{"name": "superclass"}, {"name": "sex"}],
            "model": {"heads": {"hidden_sizes": [64]}, "gate": {"input": "global"}},
            "optim": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": 1e-3, "seed": 0},
            "evaluation": {"report": False, "bootstrap_resamples": 0},
            "output": {"dir": str(out), "checkpoint_every_steps": None, "save_model": False},
            "tracking": {"log_with": []},
        }
    )
    run = train(recipe).run
    return {**run.data_wait, "validation": run.validation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="Training epochs per run.")
    parser.add_argument("--batch-size", type=int, default=32, help="Training batch size.")
    parser.add_argument("--fm-records", type=int, default=32, help="Records per part for the FM embed runs.")
    parser.add_argument("--repeats", type=int, default=2, help="Interleaved repeats of every measurement.")
    parser.add_argument(
        "--quick", action="store_true", help="1 epoch, 1 repeat, 8 FM records: pipeline check."
    )
    parser.add_argument("--work-dir", help="Scratch folder (default: a temporary one).")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "data_wait.json"))
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.repeats, args.fm_records = 1, 1, 8
    import torch

    torch.set_num_threads(1)
    data_dir = Path(os.environ.get("ENECG_DATA_DIR", REPO.parent / "shared" / "data"))
    parity_dir = Path(os.environ.get("ENECG_PARITY_DIR", REPO.parent / "shared" / "fixtures" / "parity"))
    source = data_dir / "ptbxl500"
    if not (source / "ptbxl_database.csv").is_file():
        sys.exit(f"bench_data_wait: no PTB-XL sample at {source} (set ENECG_DATA_DIR)")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="enecg-data-wait-"))
    work.mkdir(parents=True, exist_ok=True)
    experts = write_experts(work / "experts", parity_dir)
    dataset = work / "dataset-500hz"
    from enecg.data.ptbxl import PtbxlOptions, prepare_ptbxl

    prepare_ptbxl(source, dataset, PtbxlOptions(rate=500))
    results: dict[str, Any] = {
        "schema_version": 1,
        "what": "data-wait share of a training step (cache, raw records with 0 and 2 workers); enecg embed wall "
        "time with 0 vs 2 DataLoader workers",
        "dataset": "PTB-XL 500-record sample at 500 Hz (train 353 / validation 81 / test 66 in this sample)",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work_dir")},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads_main": torch.get_num_threads(),
            "load_average_start": os.getloadavg(),
        },
    }

    # Training: the data-wait share per mode (interleaved repeats).
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):
        for mode in MODES:
            runs[mode].append(train_once(dataset, experts["light"], work, mode, args, repeat))
            print(mode, repeat, round(runs[mode][-1]["data_wait_share"], 3), flush=True)
    results["training"] = {
        mode: {
            "data_wait_share_median": statistics.median(r["data_wait_share"] for r in entries),
            "step_ms_median": statistics.median(
                1000 * r["step_seconds"] / r["micro_batches"] for r in entries
            ),
            "data_wait_ms_per_step_median": statistics.median(
                1000 * r["data_wait_seconds"] / r["micro_batches"] for r in entries
            ),
            "runs": entries,
        }
        for mode, entries in runs.items()
    }
    same = [r["validation"] for r in runs["raw_0_workers"]] == [
        r["validation"] for r in runs["raw_2_workers"]
    ]
    results["training"]["raw_workers_same_validation_metrics"] = same

    # enecg embed: 0 vs 2 workers, fresh caches, interleaved.
    embeds: dict[str, Any] = {}
    for label, extra in (
        ("light", ["--batch-size", "64"]),
        ("fm", ["--max-records", str(args.fm_records), "--batch-size", "8"]),
    ):
        timed: dict[int, list[dict[str, Any]]] = {0: [], 2: []}
        for repeat in range(args.repeats):
            for workers in (0, 2):
                cache = work / f"embed-{label}-{workers}-{repeat}"
                timed[workers].append(
                    measure(
                        "enecg.cli",
                        [
                            "embed",
                            str(dataset),
                            "--experts",
                            f"{label}={experts[label]}",
                            "--cache-dir",
                            str(cache),
                            "--no-progress",
                            "--num-workers",
                            str(workers),
                            *extra,
                        ],
                    )
                )
                print(
                    "embed", label, workers, repeat, round(timed[workers][-1]["embed_seconds"], 1), flush=True
                )
        medians = {w: statistics.median(r["embed_seconds"] for r in timed[w]) for w in timed}
        embeds[label] = {
            "records": 500 if label == "light" else 3 * args.fm_records,
            "embed_seconds_median": {f"{w}_workers": s for w, s in medians.items()},
            "ratio_2_workers_over_0": medians[2] / medians[0],
            "same_cache_bits": _same_cache(work / f"embed-{label}-0-0", work / f"embed-{label}-2-0"),
            "runs": {f"{w}_workers": entries for w, entries in timed.items()},
        }
    results["embed"] = embeds
    results["machine"]["load_average_end"] = os.getloadavg()
    share = results["training"]["cache"]["data_wait_share_median"]
    results["targets"] = {"cache_data_wait_share_le_0.05": {"value": share, "met": share <= 0.05}}
    write_text_atomic(Path(args.out), json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(json.dumps({k: results[k] for k in ("targets",)}, indent=1))
    print(f"wrote {args.out}")


def _same_cache(a: Path, b: Path) -> bool:
    """Two feature caches hold the same shards (names, record lists) and the same embedding bits."""
    from safetensors.torch import load_file

    files_a = sorted(p.relative_to(a) for p in a.rglob("shard-*"))
    if files_a != sorted(p.relative_to(b) for p in b.rglob("shard-*")) or not files_a:
        return False
    for name in files_a:
        if name.suffix == ".safetensors":
            if not load_file(str(a / name))["embeddings"].equal(load_file(str(b / name))["embeddings"]):
                return False
        elif json.loads((a / name).read_text())["records"] != json.loads((b / name).read_text())["records"]:
            return False
    return True


if __name__ == "__main__":
    main()
