"""Runs inside the *official* Mantis environment (``mantis-tsfm`` + torch, no enecg): builds official models from
a JSON job list, saves each in the published layout and records the official outputs for fixed inputs.

Usage: ``python tests/mantis_official.py JOBS.json OUT_DIR``. ``JOBS.json`` is a list of
``{"name", "cls" ("MantisV1" | "Mantis8M" | "MantisV2"), "kwargs", "runtime", "seed", "length", "batch",
"channels", "config_json"}`` (``runtime``: the instance arguments of the V1/V2 ``from_pretrained``;
``config_json``: optional, written over the saved config.json before the official reload).
For each job ``OUT_DIR/<name>/`` receives ``config.json`` + ``model.safetensors`` (``save_pretrained``, the
files ``from_pretrained`` reads), ``input.npy`` (batch, channels, length), ``expected_network.npy`` (the
network on channel 0, eval mode), ``expected_transform.npy`` (``MantisTrainer.transform``: every channel,
concatenated) and ``keys.json`` (the state-dict keys, shapes and dtypes in order). ``OUT_DIR/versions.json``
names the package and torch versions. Kept free of enecg imports on purpose (a different environment).
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch


def run_job(job: dict, out: Path) -> None:
    import mantis.architecture as arch
    from mantis.trainer import MantisTrainer

    torch.manual_seed(job["seed"])
    cls = getattr(arch, job["cls"])
    network = cls(device="cpu", **job["kwargs"]).eval()
    folder = out / job["name"]
    network.save_pretrained(str(folder))
    if job.get("config_json") is not None:
        # A published config.json verbatim (e.g. MantisPlus's, with keys the 1.1.0 classes do not take).
        (folder / "config.json").write_text(json.dumps(job["config_json"], indent=2))
    # Reload through the official loader, so what is compared is what from_pretrained gives for these files.
    if job["cls"] == "Mantis8M":
        loaded = cls.from_pretrained(str(folder), device="cpu")
    else:
        loaded = cls(device="cpu", **job.get("runtime", {})).from_pretrained(str(folder))
    loaded.eval()
    rng = np.random.default_rng(job["seed"])
    # Mixed amplitudes (mV-like and much larger) so every scale of the scalar encoders is exercised.
    x = rng.standard_normal((job["batch"], job["channels"], job["length"])).astype(np.float32)
    x *= rng.choice([0.05, 1.0, 30.0], size=(job["batch"], job["channels"], 1)).astype(np.float32)
    x += rng.uniform(-2, 2, size=(job["batch"], job["channels"], 1)).astype(np.float32)
    np.save(folder / "input.npy", x)
    with torch.no_grad():
        network_out = loaded(torch.from_numpy(x[:, :1]))
    np.save(folder / "expected_network.npy", network_out.numpy())
    trainer = MantisTrainer(device="cpu", network=loaded)
    np.save(
        folder / "expected_transform.npy", np.asarray(trainer.transform(x, batch_size=4), dtype=np.float32)
    )
    keys = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in loaded.state_dict().items()]
    (folder / "keys.json").write_text(json.dumps(keys))


def main() -> None:
    jobs_path, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    for job in json.loads(jobs_path.read_text()):
        run_job(job, out)
    versions = {"mantis-tsfm": version("mantis-tsfm"), "torch": torch.__version__}
    (out / "versions.json").write_text(json.dumps(versions))


if __name__ == "__main__":
    main()
