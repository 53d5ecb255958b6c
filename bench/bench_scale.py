"""How time and memory grow with the corpus: ``data prepare``, ``enecg embed`` and a cached training epoch at
2,000 / 5,000 / 20,000 records (and the 500-record sample as the memory baseline), and how embedding scales with
processes.

The corpus is PTB-XL-shaped and generated from the 500-record sample (``$ENECG_DATA_DIR/ptbxl500``): record ``i``
is source record ``i mod 500`` (100 Hz) with a new ``ecg_id`` and ``patient_id`` (source patient id x 1000 + copy
number, so copies of one patient stay together and splits stay patient-disjoint) and small documented
perturbations, so no two records are byte-identical: amplitude x (1 + U(-2 %, 2 %)) per lead, Gaussian noise of
5 uV, and a circular shift of up to 0.2 s. Records are written as WFDB (``wfdb.wrsamp``, 16-bit, gain 1000/mV)
with a ``ptbxl_database.csv``, so the real builder (``enecg data prepare ptbxl``) runs on them. ``strat_fold`` is
kept from the source record.

Every step runs as the real command in a fresh subprocess; its wall time and peak RSS (``VmHWM``; the peak above
the process's RSS right after its imports, via ``/proc/self/clear_refs``; and the peak of anonymous memory,
``RssAnon`` sampled every 20 ms, which leaves out the file-backed pages of memory-mapped Arrow data) are recorded. Steps:

* ``prepare``: ``enecg data prepare ptbxl --rate 100`` over the corpus;
* ``embed_light``: ``enecg embed`` with an in-house SimpleNet (width 0.25) on every record;
* ``embed_fm``: ``enecg embed`` with HuBERT-ECG small at its published full size (random weights: no weights are
  reachable here), capped at ``--fm-records`` records per part;
* ``train_cached``: ``enecg train`` (one epoch, heads + gate on the light expert) reading the filled cache.

Process scaling (``--scaling-size``): ``enecg embed`` with 1 process x 1 thread, 2 processes x 1 thread (gloo,
``accelerate launch``) and 1 process x 2 threads, for the light expert and the FM, each on a fresh cache. Results
go to ``bench/results/scale.json``. Usage::

    python bench/bench_scale.py                         # sizes 2000,5000,20000 (+ 500 baseline); ~20 min here
    python bench/bench_scale.py --sizes 2000 --quick    # pipeline check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import wfdb

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from enecg.utils.files import write_text_atomic  # noqa: E402

GLOO_CONFIG = REPO / "recipes" / "accelerate_configs" / "cpu_ddp_gloo.yaml"
SOURCE_RATE = 100
AMPLITUDE_JITTER = 0.02
NOISE_MV = 0.005
MAX_SHIFT_S = 0.2

# Runs a command in this process after its imports, with the RSS high-water mark reset, and prints the peaks.
MEASURE = r"""
import json, os, resource, runpy, sys, threading, time
import torch, datasets, enecg.cli  # the imports every step pays
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
# Anonymous memory (heap, tensors) apart from file-backed pages: reading a memory-mapped Arrow dataset maps its
# pages into RSS (reclaimable page cache, not memory the process holds). The kernel keeps no high-water mark
# for it, so a thread samples it every 20 ms.
peak_anon = [0.0]
def sample():
    while True:
        peak_anon[0] = max(peak_anon[0], status("RssAnon:") or 0.0)
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
try:
    open("/proc/self/clear_refs", "w").write("5")
    reset = True
except OSError:
    reset = False
base = status("VmRSS:")
module, args = sys.argv[1], sys.argv[2:]
sys.argv = [module, *args]
start = time.perf_counter()
code = 0
try:
    runpy.run_module(module, run_name="__main__")
except SystemExit as exc:
    code = exc.code or 0
peak_anon[0] = max(peak_anon[0], status("RssAnon:") or 0.0)
out = {"seconds": time.perf_counter() - start, "peak_rss_mb": status("VmHWM:"), "baseline_rss_mb": base,
       "peak_anon_mb": peak_anon[0], "hwm_reset": reset, "exit": code}
out["peak_above_imports_mb"] = out["peak_rss_mb"] - base if reset else None
print("MEASURED " + json.dumps(out))
sys.exit(code)
"""


def make_corpus(source: Path, n: int, out: Path, seed: int = 0) -> Path:
    """A PTB-XL-shaped folder of ``n`` records generated from ``source`` (see the module docstring)."""
    if (out / "ptbxl_database.csv").is_file():
        return out
    table = pd.read_csv(source / "ptbxl_database.csv", index_col="ecg_id")
    rng = np.random.default_rng(seed)
    rows = []
    signals: dict[int, tuple[np.ndarray, list[str]]] = {}
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for i in range(n):
        src_id = table.index[i % len(table)]
        copy = i // len(table)
        src = table.loc[src_id]
        if src_id not in signals:
            record = wfdb.rdrecord(str(source / src["filename_lr"]))
            signals[src_id] = (record.p_signal.astype(np.float64), list(record.sig_name))
        signal, leads = signals[src_id]
        scale = 1.0 + rng.uniform(-AMPLITUDE_JITTER, AMPLITUDE_JITTER, size=(1, signal.shape[1]))
        shift = int(rng.integers(0, int(MAX_SHIFT_S * SOURCE_RATE) + 1))
        new = np.roll(signal * scale, shift, axis=0) + rng.normal(0.0, NOISE_MV, size=signal.shape)
        new = np.nan_to_num(new)
        ecg_id = i + 1
        name = f"{ecg_id:05d}_lr"
        folder = staging / "records100" / f"{(ecg_id // 1000) * 1000:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        wfdb.wrsamp(
            name, fs=SOURCE_RATE, units=["mV"] * len(leads), sig_name=leads, p_signal=new, fmt=["16"] * len(leads),
            adc_gain=[1000.0] * len(leads), baseline=[0] * len(leads), write_dir=str(folder),
        )
        row = src.to_dict()
        row.update(
            ecg_id=ecg_id,
            patient_id=float(int(src["patient_id"]) * 1000 + copy),
            filename_lr=f"records100/{folder.name}/{name}",
            filename_hr=f"records500/{folder.name}/{ecg_id:05d}_hr",
        )
        rows.append(row)
    pd.DataFrame(rows).set_index("ecg_id").to_csv(staging / "ptbxl_database.csv")
    shutil.copy(source / "scp_statements.csv", staging / "scp_statements.csv")
    os.replace(staging, out)
    return out


def measure(module: str, args: list[str], *, threads: int = 1, cwd: Path | None = None) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, module, *args], env=env, cwd=cwd, capture_output=True, text=True
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("MEASURED ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{done.stdout[-1500:]}\n{done.stderr[-3000:]}")
    return {**json.loads(lines[-1][len("MEASURED ") :]), **_embed_report(done.stdout)}


def _embed_report(stdout: str) -> dict[str, Any]:
    """``enecg embed`` prints ``processes: N, S s``: S is embed_dataset's own time (experts loaded, records
    embedded, table written), without interpreter start, imports or the launcher."""
    for line in stdout.splitlines():
        if line.startswith("processes: "):
            count, seconds = line[len("processes: ") :].split(", ")
            return {"processes": int(count), "embed_seconds": float(seconds.rstrip(" s"))}
    return {}


CEILING = """
import time, torch
torch.set_num_threads(1)
torch.manual_seed(0)
x, w = torch.randn(256, 1024), torch.randn(1024, 1024)
start = time.perf_counter()
for _ in range(300):
    x @ w
print(time.perf_counter() - start)
"""


def machine_ceiling(repeats: int = 3) -> dict[str, Any]:
    """What this machine gives a perfectly parallel job, measured beside the expert runs: one process doing a
    fixed fp32 matmul load alone, then two processes each doing the same load at once. The ratio
    (two-process wall time) / (2 x one-process time) is the best 2-process / 1-process ratio any embedding
    could reach here at that moment: 0.5 on two idle cores, higher when other work shares them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def one_process() -> float:
        done = subprocess.run([sys.executable, "-c", CEILING], env=env, capture_output=True, text=True, check=True)
        return float(done.stdout.strip())

    ratios = []
    for _ in range(repeats):
        alone = one_process()
        procs = [subprocess.Popen([sys.executable, "-c", CEILING], env=env, stdout=subprocess.PIPE, text=True)
                 for _ in range(2)]
        together = max(float(p.communicate()[0].strip()) for p in procs)
        ratios.append(together / (2 * alone))
    return {"ratio_2proc_over_1proc": sorted(ratios)[len(ratios) // 2], "repeats": ratios,
            "load_average": os.getloadavg(), "workload": "300 fp32 matmuls 256x1024 @ 1024x1024, 1 thread"}


def launch_two(module_args: list[str]) -> dict[str, Any]:
    """``accelerate launch`` on 2 gloo processes (1 thread each): wall time of the whole launch."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(REPO),
           "HF_HUB_OFFLINE": "1"}
    accelerate = Path(sys.executable).with_name("accelerate")
    start = time.perf_counter()
    done = subprocess.run(
        [str(accelerate), "launch", "--config_file", str(GLOO_CONFIG), "-m", *module_args],
        env=env, capture_output=True, text=True,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0 or "processes: 2" not in done.stdout:
        raise RuntimeError(f"2-process launch failed:\n{done.stdout[-1500:]}\n{done.stderr[-3000:]}")
    return {"seconds": seconds, **_embed_report(done.stdout)}


def write_experts(root: Path, parity_dir: Path) -> dict[str, Path]:
    """The light expert (SimpleNet, width 0.25) and HuBERT-ECG small at full size (random weights) as folders."""
    import torch
    from safetensors.torch import save_file

    from enecg.contract import InputContract
    from enecg.experts.families.light import LightCNNConfig, build_light_model
    from enecg.experts.family import get_family
    from enecg.experts.inhouse import save_inhouse_expert
    from enecg.leads import STANDARD_12_LEADS

    sys.path.insert(0, str(REPO / "bench"))
    from bench_experts import CASES, load_config

    folders = {"light": root / "light", "fm": root / "hubert-ecg-small"}
    if not (folders["light"] / "config.json").is_file():
        torch.manual_seed(0)
        config = LightCNNConfig(architecture="SimpleNet", width_multiplier=0.25, embedding_dim=64)
        contract = InputContract(fs=100.0, leads=STANDARD_12_LEADS, length=1000, scaling="zscore_lead")
        save_inhouse_expert(build_light_model(config), family="light", config=config, contract=contract,
                            folder=folders["light"], name="light")
    if not (folders["fm"] / "config.json").is_file():
        # The published HuBERT-ECG layout (config.json naming model_type + model.safetensors), random weights:
        # the folder loads by detection, as a downloaded checkpoint would.
        case = next(c for c in CASES if c.name == "hubert-ecg-small")
        config, _, _ = load_config(case, parity_dir, False)
        config = {**config, "model_type": "hubert_ecg"}
        torch.manual_seed(0)
        model = get_family("hubert_ecg").build(config)
        folders["fm"].mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folders["fm"] / "model.safetensors"))
        write_text_atomic(folders["fm"] / "config.json", json.dumps(config, indent=2))
    return folders


def train_recipe(dataset: Path, expert: Path, cache: Path, out: Path) -> Path:
    recipe = {
        "data": {"path": str(dataset), "feature_cache": "on", "cache_dir": str(cache)},
        "experts": [{"name": "light", "source": str(expert)}],
        "tasks": [{"name": "superclass"}, {"name": "sex"}],
        "model": {"heads": {"hidden_sizes": [64]}, "gate": {"input": "global"}},
        "optim": {"epochs": 1, "batch_size": 64, "lr": 1e-3, "seed": 0},
        "evaluation": {"report": False},
        "output": {"dir": str(out)},
    }
    path = out.parent / f"{out.name}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(recipe))
    return path


def epoch_timing(run: Path, records: int) -> dict[str, Any]:
    """The training epoch's own time, from the run's ``summary.json``: the summed step time of its training
    micro-batches (loader wait included), without start-up, evaluation or the report; per corpus record."""
    summary = json.loads((run / "summary.json").read_text())
    wait = summary.get("data_wait") or {}
    steps = wait.get("step_seconds")
    out: dict[str, Any] = {"epoch_step_seconds": steps, "data_wait_share": wait.get("data_wait_share")}
    if steps is not None:
        out["epoch_ms_per_train_record"] = 1000.0 * steps / records
    return out


def marginal_costs(sizes_block: dict[str, Any], sizes: list[int], baseline: int) -> dict[str, Any]:
    """Per-record cost with the fixed start-up taken out: (t(n) - t(baseline)) / (n - baseline) for each size, and
    each figure divided by the one at the smallest size (the "flat within +-20 %" target reads these ratios)."""
    out: dict[str, Any] = {}
    for step in ("prepare", "embed_light", "train_cached"):
        base = sizes_block[str(baseline)][step]
        field = "embed_seconds" if step == "embed_light" else "seconds"
        ms = {
            str(n): 1000.0 * (sizes_block[str(n)][step][field] - base[field]) / (n - baseline)
            for n in sizes if n > baseline and sizes_block[str(n)][step].get(field) is not None
        }
        first = ms[str(min(sizes))] if str(min(sizes)) in ms else None
        out[step] = {"ms_per_record": ms, "vs_smallest": {k: v / first for k, v in ms.items()} if first else {}}
    epoch = {str(n): sizes_block[str(n)]["train_cached"].get("epoch_ms_per_train_record") for n in sizes}
    if all(v is not None for v in epoch.values()):
        first = epoch[str(min(sizes))]
        out["train_epoch_in_process"] = {"ms_per_record": epoch, "vs_smallest": {k: v / first for k, v in epoch.items()}}
    return out


def per_record(entry: dict[str, Any], n: int) -> dict[str, Any]:
    return {**entry, "records": n, "ms_per_record": 1000.0 * entry["seconds"] / max(n, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2000,5000,20000", help="Corpus sizes (comma list).")
    parser.add_argument("--baseline", type=int, default=500, help="Size of the memory baseline corpus.")
    parser.add_argument("--fm-records", type=int, default=32, help="Records per part for the FM embed step.")
    parser.add_argument("--scaling-size", type=int, default=2000, help="Corpus size of the process-scaling runs.")
    parser.add_argument("--quick", action="store_true", help="Tiny sizes: checks the pipeline only.")
    parser.add_argument("--scaling-only", action="store_true",
                        help="Only the process-scaling runs (and the machine's own ceiling); merged into --out.")
    parser.add_argument("--work-dir", help="Scratch folder (default: a temporary one, removed).")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "scale.json"))
    args = parser.parse_args()
    data_dir = Path(os.environ.get("ENECG_DATA_DIR", REPO.parent / "shared" / "data"))
    parity_dir = Path(os.environ.get("ENECG_PARITY_DIR", REPO.parent / "shared" / "fixtures" / "parity"))
    source = data_dir / "ptbxl500"
    if not (source / "ptbxl_database.csv").is_file():
        sys.exit(f"bench_scale: no PTB-XL sample at {source} (set ENECG_DATA_DIR)")
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        sizes, args.baseline, args.fm_records, args.scaling_size = [120], 60, 4, 120
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="enecg-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    experts = write_experts(work / "experts", parity_dir)
    results: dict[str, Any] = {
        "schema_version": 1,
        "what": "time and peak RSS of prepare, embed and a cached epoch as the corpus grows; embed process scaling",
        "corpus": {
            "source": "PTB-XL 500-record sample, 100 Hz",
            "perturbations": {"amplitude_jitter": AMPLITUDE_JITTER, "noise_mv": NOISE_MV, "max_shift_s": MAX_SHIFT_S},
        },
        "quick": args.quick,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "sizes": {},
    }
    for n in [] if args.scaling_only else [args.baseline, *sizes]:
        corpus = make_corpus(source, n, work / f"corpus-{n}")
        dataset = work / f"dataset-{n}"
        cache = work / f"cache-{n}"
        steps: dict[str, Any] = {}
        steps["prepare"] = per_record(
            measure("enecg.cli", ["data", "prepare", "ptbxl", "--root", str(corpus), "--out", str(dataset),
                                  "--rate", "100", "--workers", "1"]), n)
        steps["embed_light"] = per_record(
            measure("enecg.cli", ["embed", str(dataset), "--experts", f"light={experts['light']}", "--cache-dir",
                                  str(cache), "--out", str(work / f"table-{n}"), "--no-progress"]), n)
        fm_n = min(n, args.fm_records)
        steps["embed_fm"] = per_record(
            measure("enecg.cli", ["embed", str(dataset), "--experts", f"fm={experts['fm']}", "--cache-dir",
                                  str(cache), "--max-records", str(fm_n), "--batch-size", "8", "--no-progress"]),
            3 * fm_n)
        recipe = train_recipe(dataset, experts["light"], cache, work / f"run-{n}")
        steps["train_cached"] = per_record(measure("enecg.cli", ["train", str(recipe)]), n)
        steps["train_cached"].update(epoch_timing(work / f"run-{n}", n))
        results["sizes"][str(n)] = steps
        print(n, {k: (round(v["seconds"], 1), round(v["peak_rss_mb"]), round(v["peak_anon_mb"])) for k, v in steps.items()}, flush=True)

    # Process scaling on one corpus, fresh caches.
    n = args.scaling_size
    dataset = work / f"dataset-{n}"
    if not dataset.exists():
        make_corpus(source, n, work / f"corpus-{n}")
        measure("enecg.cli", ["data", "prepare", "ptbxl", "--root", str(work / f"corpus-{n}"), "--out",
                              str(dataset), "--rate", "100", "--workers", "1"])
    scaling: dict[str, Any] = {}
    for label, expert, extra in (
        ("light", experts["light"], []),
        ("fm", experts["fm"], ["--max-records", str(4 * args.fm_records), "--batch-size", "8"]),
    ):
        base = ["enecg.embed", str(dataset), "--experts", f"{label}={expert}", "--no-progress", *extra]
        runs = {
            "1proc_1thread": measure(base[0], [*base[1:], "--cache-dir", str(work / f"s-{label}-1")], threads=1),
            "2proc_1thread": launch_two([*base, "--cache-dir", str(work / f"s-{label}-2")]),
            "1proc_2threads": measure(base[0], [*base[1:], "--cache-dir", str(work / f"s-{label}-t")], threads=2),
        }
        one = runs["1proc_1thread"]
        scaling[label] = {
            "runs": runs,
            "ratio_2proc_over_1proc": runs["2proc_1thread"]["embed_seconds"] / one["embed_seconds"],
            "ratio_2threads_over_1thread": runs["1proc_2threads"]["embed_seconds"] / one["embed_seconds"],
            "ratio_2proc_over_1proc_whole_command": runs["2proc_1thread"]["seconds"] / one["seconds"],
            "note": "ratios of embed_dataset's own time (expert loading + embedding); the whole-command ratio adds "
            "interpreter start, imports, accelerate launch and the gloo rendezvous",
        }
        print("scaling", label, {k: round(v["embed_seconds"], 1) for k, v in runs.items()}, flush=True)
    results["scaling"] = {"size": n, "machine_ceiling": machine_ceiling(), **scaling}
    if args.scaling_only:
        # Keep the size sweep of the last full run; replace only the scaling block.
        previous = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
        merged = {**previous, "scaling": results["scaling"], "scaling_machine": results["machine"]}
        write_text_atomic(Path(args.out), json.dumps(merged, indent=2) + "\n")
        print(f"wrote {args.out} (scaling only)")
        return

    base = results["sizes"][str(args.baseline)]
    largest = results["sizes"][str(max(sizes))]
    results["ratios"] = {
        f"peak_rss_{max(sizes)}_over_{args.baseline}": {
            step: largest[step]["peak_rss_mb"] / base[step]["peak_rss_mb"] for step in base
        },
        f"peak_anon_{max(sizes)}_over_{args.baseline}": {
            step: largest[step]["peak_anon_mb"] / base[step]["peak_anon_mb"] for step in base
        },
        f"peak_above_imports_{max(sizes)}_over_{args.baseline}": {
            step: (largest[step]["peak_above_imports_mb"] or float("nan"))
            / max(base[step]["peak_above_imports_mb"] or float("nan"), 1e-9)
            for step in base
        },
        "ms_per_record_vs_smallest": {
            step: {
                str(size): results["sizes"][str(size)][step]["ms_per_record"]
                / results["sizes"][str(min(sizes))][step]["ms_per_record"]
                for size in sizes
            }
            for step in ("prepare", "embed_light", "train_cached")
        },
        "marginal_ms_per_record": marginal_costs(results["sizes"], sizes, args.baseline),
    }
    write_text_atomic(Path(args.out), json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
