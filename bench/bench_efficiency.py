"""Efficiency Score table of the light CNN experts (with and without age/sex) and their ensemble.

Runs ``enecg efficiency`` (:func:`enecg.training.efficiency_benchmark.run_efficiency_benchmark`) on a recipe
(default ``recipes/efficiency_benchmark.yaml``: PTB-XL sample, official strat folds) and copies its results
document into ``bench/results/efficiency.json``; the HTML report stays in the run's output folder. Usage:

    python bench/bench_efficiency.py [--recipe RECIPE.yaml] [--quick] [--out bench/results/efficiency.json]
                                     [--key=value recipe overrides ...]

``--quick`` checks the pipeline (one architecture, one epoch); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from enecg.cli.seeds import load_seed_recipe
from enecg.training.efficiency_benchmark import run_efficiency_benchmark
from enecg.utils.files import write_text_atomic

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO / "recipes" / "efficiency_benchmark.yaml"
DEFAULT_OUT = REPO / "bench" / "results" / "efficiency.json"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="efficiency recipe YAML")
    parser.add_argument("--quick", action="store_true", help="pipeline check only")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="results JSON")
    args, overrides = parser.parse_known_args(argv)
    recipe = load_seed_recipe("efficiency", args.recipe, overrides, quick=args.quick)
    start = time.perf_counter()
    document = run_efficiency_benchmark(recipe)
    document["bench"] = {
        "command": "python bench/bench_efficiency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "total_s": time.perf_counter() - start,
        "report": str(Path(recipe.output.dir) / "report.html"),
        "quick": args.quick,
    }
    write_text_atomic(Path(args.out), json.dumps(document, indent=2, sort_keys=True, allow_nan=False))
    for row in document["rows"]:
        print(
            f"{row['name']:<34} params {row['params']:>9,}  {row['latency_ms']:7.2f} ms  {row['memory_mb']:6.1f} MB  "
            f"AUROC {row['auroc'] if row['auroc'] is None else round(row['auroc'], 3)}  "
            f"score {row['efficiency_score'] if row['efficiency_score'] is None else round(row['efficiency_score'], 1)}"
        )
    return document


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
