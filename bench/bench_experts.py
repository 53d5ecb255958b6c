"""Forward cost of each native expert port: wall time, FLOPs and achieved FLOP/s against a dense matmul measured in
the same run, and the native port against the official implementation wherever that one runs here.

Every expert is built from its *full-size published config* (the parity manifests
``<parity>/<family>/keys_full_*.json``) with random weights (speed does not depend on weight values), in eval mode
under ``torch.no_grad()``, and fed a random batch of its contract shape. The timed call is ``family.embed(model, x)``,
i.e. exactly what the ensemble runs per expert. Usage:

    python bench/bench_experts.py [--models all|NAME|FAMILY,...] [--large] [--batch-size 4] [--device cpu|cuda]
                                  [--bf16] [--quick] [--out bench/results/experts.json]

``--quick`` swaps every config for a tiny one of the same family (no fixtures needed) and runs one repeat: it checks
the pipeline and the JSON schema, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from enecg.experts.family import ExpertFamily, get_family
from enecg.utils.files import write_text_atomic

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "experts.json"
SCHEMA_VERSION = 1
LOG = logging.getLogger("bench_experts")

# Largest square matmul the reference may use (3 n^2 floats: ~0.8 GB on CPU, ~3.2 GB on a GPU).
MATMUL_MAX_N = {"cpu": 8192, "cuda": 16384}


# ---------------------------------------------------------------------------------------------------------------
# The experts


@dataclass(frozen=True)
class ExpertCase:
    """One benchmarked expert: where its full-size config comes from, its input shape, its official counterpart."""

    name: str = field(metadata={"help": "Benchmark name (the adapter spec's name where one exists)."})
    family: str = field(metadata={"help": "Registered expert family."})
    input_shape: tuple[int, ...] = field(metadata={"help": "Contract shape of one record (without batch)."})
    quick_config: dict[str, Any] = field(metadata={"help": "Tiny config of the same family for --quick."})
    manifest: str | None = field(
        default=None, metadata={"help": "Parity manifest (relative to the parity dir) holding the config."}
    )
    manifest_key: str | None = field(default=None, metadata={"help": "Key of the config in the manifest."})
    config: dict[str, Any] | None = field(
        default=None, metadata={"help": "Full-size config when no manifest exists (in-house models)."}
    )
    large: bool = field(default=False, metadata={"help": "Only run with --large (slow on 2 CPU cores)."})
    official: str | None = field(
        default=None, metadata={"help": "Key of the official-implementation runner, or None."}
    )
    official_reason: str | None = field(
        default=None, metadata={"help": "Why no official implementation runs here (official is None)."}
    )
    official_optional: bool = field(
        default=False,
        metadata={
            "help": "The official package may be absent from the bench environment (its own pins conflict); "
            "then the entry says so instead of failing."
        },
    )


TINY_HUBERT = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "conv_dim": [32] * 5,
    "conv_kernel": [10, 3, 3, 2, 2],
    "conv_stride": [4, 2, 2, 2, 2],
    "conv_bias": False,
    "feat_extract_norm": "group",
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 4,
    "classifier_proj_size": 16,
    "ensemble_length": 1,
    "vocab_sizes": [10],
}
TINY_MOMENT = {
    "model_name": "MOMENT",
    "task_name": "reconstruction",
    "transformer_type": "encoder_only",
    "seq_len": 512,
    "patch_len": 8,
    "patch_stride_len": 8,
    "t5_config": {
        "model_type": "t5",
        "d_model": 32,
        "d_ff": 64,
        "d_kv": 16,
        "num_heads": 2,
        "num_layers": 2,
        "feed_forward_proj": "gated-gelu",
        "vocab_size": 64,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "layer_norm_epsilon": 1e-6,
    },
}
TINY_NET1D = {
    "in_channels": 12,
    "base_filters": 16,
    "ratio": 1,
    "filter_list": [16, 32, 32, 64],
    "m_blocks_list": [1, 1, 1, 1],
    "kernel_size": 16,
    "stride": 2,
    "groups_width": 16,
    "n_classes": 5,
    "use_bn": False,
    "use_do": False,
}
TINY_ECG_FM = {
    "_name": "wav2vec2_cmsc",
    "encoder_layers": 2,
    "encoder_embed_dim": 32,
    "encoder_ffn_embed_dim": 64,
    "encoder_attention_heads": 2,
    "conv_feature_layers": "[(32, 2, 2)] * 4",
    "in_d": 12,
    "conv_pos": 16,
    "conv_pos_groups": 4,
    "apply_mask": True,
    "quantize_targets": True,
    "final_dim": 16,
    "latent_vars": 8,
}

TINY_MANTIS_V1 = {
    "mantis_version": "v1",
    "seq_len": 512,
    "hidden_dim": 32,
    "num_patches": 32,
    "hidden_dim_scalar_enc": 8,
    "transf_depth": 2,
    "transf_num_heads": 2,
    "transf_mlp_dim": 64,
    "transf_dim_head": 16,
    "num_channels": 12,
}
TINY_MANTIS_V2 = {**TINY_MANTIS_V1, "mantis_version": "v2", "kernel_size": 41}
# The published configs (config.json of paris-noah/Mantis-8M and /MantisV2, architecture keys), plus the spec's
# num_channels. MantisPlus has the Mantis-8M architecture, so it costs the same and is not benchmarked twice.
MANTIS_8M = {
    "mantis_version": "v1",
    "seq_len": 512,
    "hidden_dim": 256,
    "num_patches": 32,
    "hidden_dim_scalar_enc": 32,
    "epsilon_scalar_enc": 1.1,
    "transf_depth": 6,
    "transf_num_heads": 8,
    "transf_mlp_dim": 512,
    "transf_dim_head": 128,
    "num_channels": 12,
}
MANTIS_V2 = {
    **{k: v for k, v in MANTIS_8M.items() if k != "seq_len"},
    "mantis_version": "v2",
    "kernel_size": 41,
    "transf_dim_head": 32,
}

_NO_OFFICIAL_NET1D = (
    "the official Net1D is net1d.py in the PKUDigitalHealth/ECGFounder GitHub repository, not a pip package; it "
    "cannot be installed here (PyPI only, no GitHub)"
)
_NO_OFFICIAL_ECG_FM = (
    "the official code is fairseq-signals (GitHub only, needs a fairseq build); it cannot be installed here"
)
_NO_OFFICIAL_LIGHT = "in-house architecture: the paper publishes no code, the native module is the only one"

LIGHT_ARCHITECTURES = ("AttiaNet", "DeepResidualCNN", "ParallelCNN", "ParallelCNNew", "SimpleNet")

CASES: tuple[ExpertCase, ...] = (
    *(
        ExpertCase(
            name=f"hubert-ecg-{size}",
            family="hubert_ecg",
            input_shape=(6000,),  # 12 leads x 500 samples (5 s at 100 Hz), flattened lead-major
            quick_config=TINY_HUBERT,
            manifest=f"hubert_ecg/keys_full_{size}.json",
            manifest_key="config",
            large=size == "large",
            official="transformers_hubert",
        )
        for size in ("small", "base", "large")
    ),
    ExpertCase(
        name="ecgfounder-12lead",
        family="net1d",
        input_shape=(12, 5000),
        quick_config=TINY_NET1D,
        manifest="ecgfounder/keys_full_12lead.json",
        manifest_key="constructor_kwargs",
        official_reason=_NO_OFFICIAL_NET1D,
    ),
    ExpertCase(
        name="ecg-fm-pretrained",
        family="ecg_fm",
        input_shape=(12, 2500),
        quick_config=TINY_ECG_FM,
        manifest="ecgfm/keys_full_pretrained.json",
        manifest_key="model_cfg_full",
        official_reason=_NO_OFFICIAL_ECG_FM,
    ),
    *(
        ExpertCase(
            name=f"moment-1-{size}",
            family="moment",
            input_shape=(12, 512),
            quick_config=TINY_MOMENT,
            manifest=f"moment/keys_full_{size}.json",
            manifest_key="config",
            large=size == "large",
            official="transformers_t5_encoder",
        )
        for size in ("small", "base", "large")
    ),
    *(
        ExpertCase(
            name=name,
            family="mantis",
            input_shape=(12, 512),
            quick_config=quick,
            config=config,
            official="mantis_tsfm",
            official_optional=True,
        )
        for name, config, quick in (
            ("mantis-8m", MANTIS_8M, TINY_MANTIS_V1),
            ("mantisv2", MANTIS_V2, TINY_MANTIS_V2),
        )
    ),
    *(
        ExpertCase(
            name=f"light-{architecture.lower()}",
            family="light",
            input_shape=(12, 1000),
            quick_config={"architecture": architecture, "width_multiplier": 0.25},
            config={"architecture": architecture},  # the default width is the published design
            official_reason=_NO_OFFICIAL_LIGHT,
        )
        for architecture in LIGHT_ARCHITECTURES
    ),
)


def select_cases(selection: str, include_large: bool) -> list[ExpertCase]:
    """``all`` or a comma list of case names and/or family names; large sizes only with ``include_large`` unless
    named explicitly."""
    tokens = [t.strip() for t in selection.split(",") if t.strip()]
    known = {c.name for c in CASES} | {c.family for c in CASES} | {"all"}
    unknown = [t for t in tokens if t not in known]
    if unknown or not tokens:
        raise SystemExit(f"--models: unknown {unknown or selection!r}; choose from {sorted(known)}")
    chosen = []
    for case in CASES:
        named = case.name in tokens
        grouped = "all" in tokens or case.family in tokens
        if named or (grouped and (include_large or not case.large)):
            chosen.append(case)
    return chosen


def default_parity_dir() -> Path:
    return Path(os.environ.get("ENECG_PARITY_DIR", REPO.parent / "shared" / "fixtures" / "parity"))


def load_config(case: ExpertCase, parity_dir: Path, quick: bool) -> tuple[dict[str, Any], str, int | None]:
    """``(config, where it came from, parameter count stated by the manifest or None)``."""
    if quick:
        return dict(case.quick_config), "quick (tiny built-in config)", None
    if case.manifest is None:
        assert case.config is not None
        return dict(case.config), "built-in default config", None
    path = parity_dir / case.manifest
    if not path.is_file():
        raise FileNotFoundError(f"{path}: parity manifest not found (set ENECG_PARITY_DIR or --parity-dir)")
    manifest = json.loads(path.read_text())
    if case.manifest_key not in manifest:
        raise KeyError(f"{path}: no {case.manifest_key!r} entry")
    return dict(manifest[case.manifest_key]), str(path), manifest.get("num_parameters")


# ---------------------------------------------------------------------------------------------------------------
# Measurement


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    times_s: list[float]
    warmup_s: float

    @property
    def median_s(self) -> float:
        return float(np.median(self.times_s))

    def summary(self) -> dict[str, Any]:
        p10, p90 = np.percentile(self.times_s, [10, 90])
        return {
            "median_s": self.median_s,
            "p10_s": float(p10),
            "p90_s": float(p90),
            "repeats": len(self.times_s),
            "warmup_s": self.warmup_s,
        }


@dataclass(frozen=True)
class RepeatPolicy:
    """How many timed repeats: enough to fill ``target_s``, within ``[min_repeats, max_repeats]``."""

    target_s: float = field(metadata={"help": "Seconds of timed repeats to aim for per measurement."})
    min_repeats: int = field(metadata={"help": "At least this many timed repeats."})
    max_repeats: int = field(metadata={"help": "At most this many timed repeats."})
    warmup: int = field(
        default=1, metadata={"help": "Untimed calls before timing (the last sets the count)."}
    )

    def repeats_for(self, single_s: float) -> int:
        wanted = math.ceil(self.target_s / max(single_s, 1e-6))
        return max(self.min_repeats, min(self.max_repeats, wanted))


def _timed_once(fn: Callable[[], Any], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def time_calls(
    calls: dict[str, Callable[[], Any]], device: torch.device, policy: RepeatPolicy
) -> dict[str, Timing]:
    """Warm up each call, then time them *interleaved* (a, b, a, b, ...), synchronising the device around every
    call. Interleaving makes a native/official ratio fair on a shared machine: load that comes and goes hits both
    sides alike instead of whichever ran second. The repeat count fills ``policy.target_s`` with whole rounds."""
    warmup = {name: 0.0 for name in calls}
    for name, fn in calls.items():
        for _ in range(max(1, policy.warmup)):
            warmup[name] = _timed_once(fn, device)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(policy.repeats_for(sum(warmup.values()))):
        for name, fn in calls.items():
            times[name].append(_timed_once(fn, device))
    return {name: Timing(times[name], warmup[name]) for name in calls}


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's FlopCounterMode knows the CUDA attention kernels but not the CPU one that SDPA dispatches to, which would
# silently drop every attention FLOP of a CPU run; its count is the same formula as the CUDA kernels.
_EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops
}


def count_flops(fn: Callable[[], Any]) -> tuple[int, Any]:
    """FLOPs of one call (matmuls, convolutions, attention; 2 per multiply-add) and its output."""
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
    with counter:
        out = fn()
    return int(counter.get_total_flops()), out


def _matmul_seconds(a: torch.Tensor, b: torch.Tensor, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    torch.mm(a, b)
    synchronize(device)
    return time.perf_counter() - start


def matmul_size(device: torch.device, dtype: torch.dtype, target_s: float, quick: bool) -> int:
    """Square size whose ``torch.mm`` takes about ``target_s`` here (a multiple of 128, capped for memory)."""
    if quick:
        return 256
    n_max = MATMUL_MAX_N.get(device.type, MATMUL_MAX_N["cpu"])
    n = 1024
    for _ in range(4):  # time t ~ n^3: rescale from the last measurement until it is in range
        a = torch.randn(n, n, device=device, dtype=dtype)
        _matmul_seconds(a, a, device)  # warm
        seconds = _matmul_seconds(a, a, device)
        new_n = min(n_max, max(128, round(n * (target_s / max(seconds, 1e-6)) ** (1 / 3) / 128) * 128))
        if new_n == n or abs(seconds - target_s) < 0.2 * target_s:
            break
        n = new_n
    return n


def matmul_reference(
    device: torch.device, dtype: torch.dtype, n: int, policy: RepeatPolicy, label: str
) -> dict[str, Any]:
    """Dense ``torch.mm`` throughput (GFLOP/s) of an ``n x n`` product in ``dtype``."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
    timing = time_calls({"mm": lambda: torch.mm(a, b)}, device, policy)["mm"]
    flops = 2 * n**3
    result = {
        "when": label,
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "flops": flops,
        **timing.summary(),
        "gflops": flops / timing.median_s / 1e9,
        "_times": timing.times_s,
    }
    return result


def combine_matmul(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One reference from the runs at the start and end of the bench: the median over all their repeats (the
    machine is shared; both runs are kept so drift shows)."""
    times = [t for run in runs for t in run["_times"]]
    flops = runs[0]["flops"]
    median = float(np.median(times))
    return {
        "n": runs[0]["n"],
        "dtype": runs[0]["dtype"],
        "flops": flops,
        "median_s": median,
        "gflops": flops / median / 1e9,
        "runs": [{k: v for k, v in run.items() if k != "_times"} for run in runs],
    }


# ---------------------------------------------------------------------------------------------------------------
# Official implementations


@dataclass
class OfficialRun:
    """An official implementation ready to time, and the native output its output must match."""

    implementation: str
    scope: str
    forward: Callable[[], torch.Tensor]
    native_output: torch.Tensor
    compared: str
    notes: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = None  # kept alive with the run (the forward closure uses it)


def official_transformers_hubert(
    model: nn.Module, x: torch.Tensor, native_embedding: torch.Tensor
) -> OfficialRun:
    """HuBERT-ECG's official class subclasses ``transformers.HubertModel`` and adds only pretraining heads, so the
    official embedding forward *is* a plain ``HubertModel``: same config, our weights minus the heads."""
    from transformers import HubertConfig, HubertModel

    drop = {
        "ensemble_length",
        "vocab_sizes",
        "model_type",
        "architectures",
        "auto_map",
        "transformers_version",
    }
    config = HubertConfig(**{k: v for k, v in model.config.to_dict().items() if k not in drop})
    config._attn_implementation = model.config._attn_implementation  # same attention kernel on both sides
    official = HubertModel(config).eval().to(x.device)
    heads = ("final_proj.", "label_embedding.")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(heads)}
    official.load_state_dict(state, strict=True)
    return OfficialRun(
        implementation=f"transformers.HubertModel ({official.config._attn_implementation} attention)",
        scope="full embedding forward: HubertModel(input_values=x).last_hidden_state.mean(1)",
        forward=lambda: official(input_values=x).last_hidden_state.mean(dim=1),
        native_output=native_embedding,
        compared="pooled embedding (B, hidden_size)",
        model=official,
    )


@contextlib.contextmanager
def _capture_encoder_call(encoder: nn.Module, captured: dict[str, Any]) -> Iterator[None]:
    def before(_module, args, kwargs):
        captured["inputs_embeds"] = kwargs["inputs_embeds"].detach().clone()
        captured["attention_mask"] = kwargs.get("attention_mask")

    def after(_module, _args, _kwargs, output):
        captured["last_hidden_state"] = output.last_hidden_state.detach().clone()

    handles = [
        encoder.register_forward_pre_hook(before, with_kwargs=True),
        encoder.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def official_transformers_t5_encoder(model: nn.Module, x: torch.Tensor, family: ExpertFamily) -> OfficialRun:
    """MOMENT's official backbone is ``T5EncoderModel(config).get_encoder()`` fed patch embeddings; RevIN,
    patching and pooling around it are elementwise. The official side therefore is ``transformers.T5EncoderModel``
    on the *same* patch embeddings and attention mask our port hands its encoder (captured by a hook), with our
    encoder weights; the native time includes the pre/post-processing, the official time does not."""
    from transformers import T5Config, T5EncoderModel

    captured: dict[str, Any] = {}
    with _capture_encoder_call(model.encoder, captured):
        family.embed(model, x)
    config = T5Config.from_dict(dict(model.config.t5_config))
    official = T5EncoderModel(config).eval().to(x.device)
    official.encoder.load_state_dict(model.encoder.state_dict(), strict=True)
    embeds, mask = captured["inputs_embeds"], captured["attention_mask"]
    return OfficialRun(
        implementation="transformers.T5EncoderModel",
        scope=(
            "encoder only, on the patch embeddings the native port computes (native time also includes RevIN, "
            "patching, patch embedding and pooling)"
        ),
        forward=lambda: official(inputs_embeds=embeds, attention_mask=mask).last_hidden_state,
        native_output=captured["last_hidden_state"],
        compared="encoder last_hidden_state (B*leads, patches, d_model)",
        notes={"encoder_tokens": list(embeds.shape)},
        model=official,
    )


class OfficialUnavailable(RuntimeError):
    """The official package is not importable in this environment (reported in the entry, not a failure)."""


def official_mantis_tsfm(model: nn.Module, x: torch.Tensor, native_embedding: torch.Tensor) -> OfficialRun:
    """The official ``mantis.architecture.MantisV1`` / ``MantisV2`` with our weights, run the way
    ``MantisTrainer.transform`` runs it: every lead through the network on its own, embeddings concatenated.
    mantis-tsfm pins pandas<3/numpy<3, so it is often absent from the bench environment (tests run it in its
    own environment, tests/test_parity_mantis.py)."""
    try:
        import mantis.architecture as official_arch
    except ImportError as exc:
        raise OfficialUnavailable(
            f"mantis-tsfm not importable here ({exc}); install it in this environment to compare"
        ) from exc
    config = model.config.to_dict()
    version, channels = config.pop("mantis_version"), config.pop("num_channels")
    if version == "v2":
        config.pop("seq_len")
        official = official_arch.MantisV2(device=str(x.device), **config)
    else:
        config.pop("kernel_size")
        official = official_arch.MantisV1(device=str(x.device), **config)
    official.load_state_dict(model.state_dict(), strict=True)
    official.eval()
    batch, _, length = x.shape
    flat = x.reshape(batch * channels, 1, length)
    return OfficialRun(
        implementation=f"mantis-tsfm {type(official).__name__}",
        scope="full embedding forward: every lead through the network, per-lead outputs concatenated",
        forward=lambda: official(flat).reshape(batch, -1),
        native_output=native_embedding,
        compared="concatenated per-lead embeddings (B, leads * hidden_dim)",
        model=official,
    )


def build_official(
    case: ExpertCase, model: nn.Module, x: torch.Tensor, family: ExpertFamily, native: torch.Tensor
) -> OfficialRun:
    if case.official == "transformers_hubert":
        return official_transformers_hubert(model, x, native)
    if case.official == "transformers_t5_encoder":
        return official_transformers_t5_encoder(model, x, family)
    if case.official == "mantis_tsfm":
        return official_mantis_tsfm(model, x, native)
    raise ValueError(f"unknown official runner {case.official!r}")


# ---------------------------------------------------------------------------------------------------------------
# One expert


@dataclass(frozen=True)
class BenchSettings:
    device: torch.device = field(metadata={"help": "Device every model and input lives on."})
    batch_size: int = field(metadata={"help": "Records per forward."})
    policy: RepeatPolicy = field(metadata={"help": "Warm-up and repeat counts."})
    bf16: bool = field(default=False, metadata={"help": "Also time the native port under bf16 autocast."})
    official: bool = field(
        default=True, metadata={"help": "Time the official implementation where runnable."}
    )
    quick: bool = field(default=False, metadata={"help": "Tiny configs (schema check only)."})
    parity_dir: Path = field(default_factory=default_parity_dir, metadata={"help": "Parity fixtures root."})
    seed: int = field(default=0, metadata={"help": "Seed of weights and inputs."})


def _per_second(flops: int, seconds: float) -> float:
    return flops / seconds / 1e9


def bench_expert(
    case: ExpertCase, settings: BenchSettings, matmul_gflops: dict[str, float]
) -> dict[str, Any]:
    """Build, count, time (interleaved with the official implementation where one runs) one expert; returns its
    JSON entry. The FLOP-counting call is each side's first warm-up call."""
    device = settings.device
    config, source, params_expected = load_config(case, settings.parity_dir, settings.quick)
    family = get_family(case.family)
    torch.manual_seed(settings.seed)
    start = time.perf_counter()
    model = family.build(config).eval().to(device)
    build_s = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    if params_expected is not None and params != params_expected:
        LOG.warning("%s: %d parameters built, manifest says %d", case.name, params, params_expected)
    generator = torch.Generator().manual_seed(settings.seed)
    x = torch.randn(settings.batch_size, *case.input_shape, generator=generator).to(device)

    def forward() -> torch.Tensor:
        return family.embed(model, x)

    entry: dict[str, Any] = {
        "family": case.family,
        "config_source": source,
        "params": params,
        "params_manifest": params_expected,
        "input_shape": list(x.shape),
        "timed_call": f"{type(family).__name__}.embed(model, x)",
        "build_s": build_s,
    }
    with torch.no_grad():
        flops, native = count_flops(forward)
        entry["output_shape"] = list(native.shape)
        calls: dict[str, Callable[[], Any]] = {"native": forward}
        official: OfficialRun | None = None
        official_out: torch.Tensor | None = None
        entry["official_reason"] = case.official_reason
        if case.official is not None and not settings.official:
            entry["official_reason"] = "skipped (--no-official)"
        elif case.official is not None:
            try:
                official = build_official(case, model, x, family, native)
                official_flops, official_out = count_flops(official.forward)
                calls["official"] = official.forward
            except OfficialUnavailable as exc:
                if not case.official_optional:
                    raise
                LOG.info("%s: %s", case.name, exc)
                entry["official_reason"] = str(exc).splitlines()[0]
                official = None
            except Exception as exc:  # an official stack failing here is reported, not fatal to the bench
                LOG.warning("%s: official implementation failed: %s", case.name, exc)
                entry["official_reason"] = f"failed here: {type(exc).__name__}: {exc}".splitlines()[0]
                official = None
        timings = time_calls(calls, device, settings.policy)
        timing = timings["native"]
        entry |= {"flops": flops, **timing.summary()}
        entry["achieved_gflops"] = _per_second(flops, timing.median_s)
        entry["ratio_to_matmul"] = entry["achieved_gflops"] / matmul_gflops["float32"]
        LOG.info(
            "%s: %.4f s median (%d repeats), %.2f GFLOP, %.1f GFLOP/s = %.2f x matmul",
            case.name,
            timing.median_s,
            len(timing.times_s),
            flops / 1e9,
            entry["achieved_gflops"],
            entry["ratio_to_matmul"],
        )
        entry["official"] = None
        if official is not None and official_out is not None:
            entry["official"] = _official_entry(case, official, official_out, official_flops, timings)
        if settings.bf16:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                bf16 = time_calls({"native": forward}, device, settings.policy)["native"]
            entry["bf16_autocast"] = {
                **bf16.summary(),
                "achieved_gflops": _per_second(flops, bf16.median_s),
                "ratio_to_matmul_bf16": _per_second(flops, bf16.median_s) / matmul_gflops["bfloat16"],
                "speedup_vs_fp32": timing.median_s / bf16.median_s,
            }
    return entry


def _official_entry(
    case: ExpertCase, run: OfficialRun, out: torch.Tensor, flops: int, timings: dict[str, Timing]
) -> dict[str, Any]:
    native, official = timings["native"], timings["official"]
    max_abs_diff = float((out.float() - run.native_output.float()).abs().max())
    entry = {
        "implementation": run.implementation,
        "scope": run.scope,
        "compared": run.compared,
        "max_abs_diff": max_abs_diff,
        "flops": flops,
        **official.summary(),
        "ratio": native.median_s / official.median_s,
        "ratio_definition": "native median_s / official median_s (timed interleaved)",
        **run.notes,
    }
    LOG.info(
        "%s: official %s %.4f s median; native/official = %.3f; max |diff| = %.2e",
        case.name,
        run.implementation,
        official.median_s,
        entry["ratio"],
        max_abs_diff,
    )
    return entry


# ---------------------------------------------------------------------------------------------------------------
# Driver


def machine_info(device: torch.device) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "device": str(device),
        # Other processes may share the cores: the 1-min load average at the start (and end) shows how much.
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = ", ".join(c.name for c in CASES)
    parser.add_argument("--models", default="all", help=f"all, or comma list of names/families ({names})")
    parser.add_argument(
        "--large", action="store_true", help="include the large sizes in 'all'/family selections"
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--bf16", action="store_true", help="also time the native ports under bf16 autocast")
    parser.add_argument("--no-official", action="store_true", help="skip the official implementations")
    parser.add_argument(
        "--quick", action="store_true", help="tiny configs, 1 repeat: pipeline/schema check only"
    )
    parser.add_argument("--target-seconds", type=float, default=4.0, help="timed seconds per measurement")
    parser.add_argument("--min-repeats", type=int, default=3)
    parser.add_argument("--max-repeats", type=int, default=30)
    parser.add_argument("--matmul-seconds", type=float, default=0.5, help="duration of one reference matmul")
    parser.add_argument("--parity-dir", type=Path, default=None, help="parity fixtures (full-size configs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point (``argv`` defaults to ``sys.argv[1:]``); returns the JSON written."""
    args = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run_bench(args, device)
    finally:
        torch.set_num_threads(threads_before)  # main() may run inside another process (the smoke test)


def run_bench(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Run the selected experts between two matmul references and write the JSON; returns it."""
    cases = select_cases(args.models, args.large)
    if args.quick:
        policy = RepeatPolicy(target_s=0.0, min_repeats=1, max_repeats=1)
    else:
        policy = RepeatPolicy(args.target_seconds, args.min_repeats, args.max_repeats)
    settings = BenchSettings(
        device=device,
        batch_size=args.batch_size if not args.quick else 1,
        policy=policy,
        bf16=args.bf16,
        official=not args.no_official,
        quick=args.quick,
        parity_dir=args.parity_dir or default_parity_dir(),
        seed=args.seed,
    )
    started = time.perf_counter()
    machine = machine_info(device)

    dtypes = [torch.float32] + ([torch.bfloat16] if args.bf16 else [])
    matmul_policy = RepeatPolicy(0.0, 1, 1) if args.quick else RepeatPolicy(0.0, 3, 3)
    sizes = {dtype: matmul_size(device, dtype, args.matmul_seconds, args.quick) for dtype in dtypes}
    matmul_runs = {
        dtype: [matmul_reference(device, dtype, sizes[dtype], matmul_policy, "start")] for dtype in dtypes
    }
    gflops = {str(d).removeprefix("torch."): runs[0]["gflops"] for d, runs in matmul_runs.items()}
    LOG.info("matmul reference (start): %s GFLOP/s", {k: round(v, 1) for k, v in gflops.items()})

    models: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for case in cases:
        try:
            models[case.name] = bench_expert(case, settings, gflops)
        except Exception as exc:  # a family not ready (import/build error) must not stop the others
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            LOG.warning("%s: skipped (%s)", case.name, reason)
            skipped[case.name] = reason
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for dtype in dtypes:
        matmul_runs[dtype].append(matmul_reference(device, dtype, sizes[dtype], matmul_policy, "end"))
    machine["load_average_1min_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    references = {str(d).removeprefix("torch."): combine_matmul(runs) for d, runs in matmul_runs.items()}
    # Ratios against the reference over the whole run (start and end), not only the start measurement.
    for entry in models.values():
        entry["ratio_to_matmul"] = entry["achieved_gflops"] / references["float32"]["gflops"]
        if "bf16_autocast" in entry:
            bf16 = entry["bf16_autocast"]
            bf16["ratio_to_matmul_bf16"] = bf16["achieved_gflops"] / references["bfloat16"]["gflops"]

    result = {
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": list(args.argv),
        "machine": machine,
        "settings": {
            "batch_size": settings.batch_size,
            "quick": settings.quick,
            "bf16": settings.bf16,
            "grad": "torch.no_grad(), eval()",
            "target_seconds": policy.target_s,
            "min_repeats": policy.min_repeats,
            "max_repeats": policy.max_repeats,
            "warmup": f"the FLOP-counting call, then {policy.warmup} plain call(s), per side",
            "flop_counter": "torch.utils.flop_counter.FlopCounterMode (2 FLOPs per multiply-add) + CPU SDPA",
        },
        "matmul_reference": references["float32"],
        **({"matmul_reference_bf16": references["bfloat16"]} if args.bf16 else {}),
        "models": models,
        "skipped": skipped,
        "total_s": time.perf_counter() - started,
    }
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    LOG.info(
        "wrote %s (%d models, %d skipped, %.0f s)", args.out, len(models), len(skipped), result["total_s"]
    )
    return result


if __name__ == "__main__":
    main()
