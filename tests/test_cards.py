"""Model cards: metadata the Hub reads, the body a reader needs, and the licence of a combination of experts.

Cards are rendered from real ``evaluate_task`` results (small synthetic predictions, few bootstrap resamples) and
parsed back with ``ModelCard.load``, as the Hub and ``huggingface_hub`` users would read them. Nothing here may
contact a Hub: ``ModelCard.validate`` is made to fail if anything calls it.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import ModelCard

from enecg.evaluation.metrics import BootstrapConfig
from enecg.evaluation.report import headline
from enecg.evaluation.task_eval import evaluate_task
from enecg.hub.cards import (
    DatasetCardInfo,
    EnsembleCardContext,
    EvaluationSummary,
    ExpertCardContext,
    ExpertCardInfo,
    TaskCardInfo,
    TrainingSummary,
    extract_python_snippet,
    render_ensemble_card,
    render_expert_card,
    save_card,
    summarize_contract,
)
from enecg.hub.licenses import (
    KNOWN_LICENCES,
    licence_display_name,
    most_restrictive_licence,
    normalize_licence_id,
)

REPO_ID = "enecg-test/ptbxl-ensemble"
HUBERT_SHA = "3b1a7c0e5f7d2a9b4c6e8f0a1b2c3d4e5f6a7b8c"
FOUNDER_SHA = "9f8e7d6c5b4a39281706f5e4d3c2b1a098765432"
LABELS = ["NORM", "MI", "STTC", "CD"]
HUBERT_CONTRACT = {
    "fs": 100,
    "leads": ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"],
    "length": 500,
    "long_records": "crop_start",
    "bandpass": [0.05, 47],
    "scaling": "minmax_lead",
    "layout": "concat_leads",
}


@pytest.fixture(autouse=True)
def no_hub_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rendering is offline: any call of ModelCard.validate (a Hub request) fails the test."""

    def forbidden(self: ModelCard, repo_type: str | None = None) -> None:
        raise AssertionError(
            "ModelCard.validate() contacts the Hub: only push_folder(validate=True) may call it"
        )

    monkeypatch.setattr(ModelCard, "validate", forbidden)


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    rng = np.random.default_rng(7)
    n = 120
    y = (rng.random((n, len(LABELS))) < 0.3).astype(float)
    p = np.clip(0.45 * y + 0.6 * rng.random((n, len(LABELS))), 0.0, 1.0)
    age = rng.normal(60, 12, n)
    groups = np.repeat(np.arange(n // 2), 2)  # two records per patient
    boot = BootstrapConfig(n_resamples=40, seed=1)
    return {
        "test/superdiagnostic": evaluate_task(
            "multilabel", LABELS, y, p, val_true=y, val_pred=p, test_groups=groups, bootstrap=boot
        ),
        "validation/superdiagnostic": evaluate_task("multilabel", LABELS, y[:60], p[:60], bootstrap=boot),
        "test/age": evaluate_task("regression", ["age"], age, age + rng.normal(0, 6, n), bootstrap=boot),
    }


def experts() -> list[ExpertCardInfo]:
    return [
        ExpertCardInfo(
            name="hubert-ecg-base",
            family="hubert_ecg",
            license="cc-by-nc-4.0",
            hub_id="Edoardo-BS/hubert-ecg-base",
            revision=HUBERT_SHA,
            embedding_dim=768,
            contract=HUBERT_CONTRACT,
            num_parameters=93_100_000,
            citation="@article{coppola2024hubert, title={HuBERT-ECG}}",
        ),
        # As Expert.describe() returns it: extra keys are ignored.
        ExpertCardInfo.from_dict(
            {
                "name": "ecgfounder-12lead",
                "family": "net1d",
                "license": "mit",
                "hub_id": "PKUDigitalHealth/ECGFounder",
                "revision": FOUNDER_SHA,
                "embedding_dim": 1024,
                "contract": {
                    "fs": 500,
                    "leads": HUBERT_CONTRACT["leads"],
                    "length": 5000,
                    "scaling": "zscore_lead",
                },
                "contract_summary": "500 Hz, 12 leads, 5000 samples, crop_start, zscore_lead",
                "source": "hf-hub:PKUDigitalHealth/ECGFounder@" + FOUNDER_SHA,
                "keys": {"dropped": [], "missing": []},
                "frozen": True,
            }
        ),
        ExpertCardInfo(name="light-cnn", family="light", license="apache-2.0", embedding_dim=128),
    ]


def ensemble_context(results: dict[str, dict], **overrides) -> EnsembleCardContext:
    thresholds = results["test/superdiagnostic"]["thresholds"]
    values = dict(
        repo_id=REPO_ID,
        title="PTB-XL superdiagnostic ensemble",
        experts=experts(),
        tasks=[
            TaskCardInfo(
                "superdiagnostic", "multilabel", LABELS, thresholds=thresholds, description="Superclasses"
            ),
            TaskCardInfo("age", "regression", ["age"], unit="years"),
        ],
        datasets=[
            DatasetCardInfo(
                "PTB-XL",
                url="https://physionet.org/content/ptb-xl/1.0.3/",
                license="cc-by-4.0",
                citation="@article{wagner2020ptbxl, title={PTB-XL}}",
            )
        ],
        training=TrainingSummary(
            splits={"train": 17084, "validation": 2146, "test": 2158},
            epochs=20,
            recipe="recipes/ptbxl_superdiagnostic.yaml",
            split_method="strat_fold 1-8 / 9 / 10 (patient-wise)",
        ),
        evaluations=[
            EvaluationSummary(
                "test", {"superdiagnostic": results["test/superdiagnostic"], "age": results["test/age"]}
            ),
            EvaluationSummary("validation", {"superdiagnostic": results["validation/superdiagnostic"]}),
        ],
        gate_mean_weights={
            "superdiagnostic": {"hubert-ecg-base": 0.512, "ecgfounder-12lead": 0.391, "light-cnn": 0.097}
        },
    )
    values.update(overrides)
    return EnsembleCardContext(**values)


def test_ensemble_card_metadata_parses_back(results: dict[str, dict], tmp_path: Path) -> None:
    card = render_ensemble_card(ensemble_context(results))
    loaded = ModelCard.load(save_card(card, tmp_path))
    data = loaded.data
    assert data.library_name == "enecg"
    assert data.base_model == ["Edoardo-BS/hubert-ecg-base", "PKUDigitalHealth/ECGFounder"]
    assert data.get("base_model_relation") == "adapter"
    assert data.license == "cc-by-nc-4.0"  # HuBERT-ECG is non-commercial
    assert data.get("license_name") is None
    assert data.datasets == ["PTB-XL"]
    assert set(data.tags) >= {
        "ecg",
        "electrocardiogram",
        "enecg",
        "lora",
        "peft",
        "mixture-of-experts",
        "medical",
    }
    assert data.metrics == ["roc_auc", "mae"]

    # model-index: the headline metric of every (split, task), with the run's values.
    assert data.model_name == "ptbxl-ensemble"
    found = {(r.dataset_split, r.dataset_config): r for r in data.eval_results}
    assert set(found) == {("test", "superdiagnostic"), ("test", "age"), ("validation", "superdiagnostic")}
    for key, result_key in [
        (("test", "superdiagnostic"), "test/superdiagnostic"),
        (("validation", "superdiagnostic"), "validation/superdiagnostic"),
        (("test", "age"), "test/age"),
    ]:
        _, value, _ = headline(results[result_key])
        assert found[key].metric_value == pytest.approx(value, abs=1e-4)
        assert found[key].dataset_name == "PTB-XL"
    assert found[("test", "superdiagnostic")].metric_type == "roc_auc"
    assert found[("test", "age")].metric_type == "mae"

    # Loading from a string gives the same card.
    assert ModelCard(str(card)).data.to_dict() == data.to_dict()


def test_ensemble_card_body(results: dict[str, dict]) -> None:
    text = render_ensemble_card(ensemble_context(results)).text
    # Experts with their revisions and contracts; the in-house one in the body but not in base_model.
    assert HUBERT_SHA in text and FOUNDER_SHA in text
    assert summarize_contract(HUBERT_CONTRACT) in text
    assert "500 Hz, 12 leads, 5000 samples, crop_start, zscore_lead" in text
    assert "In-house experts" in text and "**light-cnn**" in text
    # Tasks with labels and thresholds.
    thresholds = results["test/superdiagnostic"]["thresholds"]
    assert f"NORM: {thresholds['NORM']:.3f}" in text and "age (years)" in text
    # Results with confidence intervals.
    _, value, ci = headline(results["test/superdiagnostic"])
    assert f"| {value:.3f} | [{ci[0]:.3f}, {ci[1]:.3f}] |" in text
    assert "Per label: superdiagnostic — PTB-XL test" in text
    # Gate, licence with its reason, caveat, training facts, citations.
    assert "| superdiagnostic | 0.512 | 0.391 | 0.097 |" in text
    assert "CC BY-NC 4.0 because hubert-ecg-base is in the ensemble" in text
    assert "Not a medical device" in text
    assert "recipes/ptbxl_superdiagnostic.yaml" in text and "| train | 17084 |" in text
    assert "@article{coppola2024hubert" in text and "@article{wagner2020ptbxl" in text

    snippet = extract_python_snippet(text)
    assert f'Ensemble.from_pretrained("{REPO_ID}")' in snippet
    assert "enecg.read_record(" in snippet
    compile(snippet, "<card snippet>", "exec")  # valid Python


def test_custom_snippet_and_example_record(results: dict[str, dict]) -> None:
    card = render_ensemble_card(
        ensemble_context(results, example_record="data/ptbxl/records500/00000/00001_hr")
    )
    assert 'read_record("data/ptbxl/records500/00000/00001_hr")' in extract_python_snippet(card)
    custom = "from enecg import Ensemble\nmodel = Ensemble.from_pretrained('x/y')\n"
    assert (
        extract_python_snippet(render_ensemble_card(ensemble_context(results, loading_snippet=custom)))
        == custom
    )
    with pytest.raises(ValueError, match="without Markdown fences"):
        render_ensemble_card(ensemble_context(results, loading_snippet="```python\nx = 1\n```"))


def test_card_without_results_or_hub_experts(results: dict[str, dict]) -> None:
    ctx = ensemble_context(
        results,
        experts=[ExpertCardInfo(name="light-cnn", family="light", license="mit")],
        evaluations=[],
        gate_mean_weights={},
        training=None,
    )
    card = ModelCard(str(render_ensemble_card(ctx)))
    assert card.data.get("base_model") is None and "base_model_relation" not in card.data
    assert card.data.get("model-index") is None and card.data.eval_results is None
    assert "model_name" not in card.content  # ModelCardData writes it only next to results
    assert card.data.metrics == ["roc_auc", "mae"]  # what the tasks are judged by
    assert card.data.license == "mit"
    assert "No evaluation results recorded." in card.text


def test_missing_metric_is_left_out_of_model_index(results: dict[str, dict]) -> None:
    broken = {**results["test/superdiagnostic"], "metrics": {"macro": {"auroc": None}, "per_label": {}}}
    card = render_ensemble_card(
        ensemble_context(results, evaluations=[EvaluationSummary("test", {"superdiagnostic": broken})])
    )
    assert card.data.eval_results is None
    assert "| superdiagnostic | 120 | macro AUROC | – |" in card.text


def test_incompatible_licences_give_other_with_a_name(results: dict[str, dict]) -> None:
    mixed = [
        ExpertCardInfo(name="a", family="net1d", license="cc-by-sa-4.0", hub_id="org/a"),
        ExpertCardInfo(name="b", family="moment", license="cc-by-nc-4.0", hub_id="org/b"),
    ]
    card = ModelCard(str(render_ensemble_card(ensemble_context(results, experts=mixed))))
    assert card.data.license == "other"
    assert card.data.license_name == "cc-by-nc-4.0-and-cc-by-sa-4.0"
    assert "share-alike" in card.text and "Review the licences" in card.text


def test_context_errors(results: dict[str, dict]) -> None:
    with pytest.raises(ValueError, match="unknown type 'ranking'"):
        TaskCardInfo("x", "ranking", ["a"])
    twice = [experts()[0], experts()[0]]
    with pytest.raises(ValueError, match="repeated: hubert-ecg-base"):
        render_ensemble_card(ensemble_context(results, experts=twice))
    no_licence = [ExpertCardInfo(name="a", family="light", license="")]
    with pytest.raises(ValueError, match="expert 'a' has no licence"):
        render_ensemble_card(ensemble_context(results, experts=no_licence))
    with pytest.raises(ValueError, match="no experts"):
        render_ensemble_card(ensemble_context(results, experts=[]))


def test_expert_card(results: dict[str, dict], tmp_path: Path) -> None:
    expert = ExpertCardInfo(
        name="light-cnn",
        family="light",
        license="apache-2.0",
        embedding_dim=128,
        num_parameters=412_000,
        contract={"fs": 250, "leads": ["I", "II"], "length": 2500, "scaling": "zscore_lead"},
    )
    ctx = ExpertCardContext(
        repo_id="enecg-test/light-cnn",
        expert=expert,
        architecture="Four residual 1-D conv blocks, global average pooling.",
        architecture_config={"channels": [32, 64, 96, 128], "kernel_size": 7},
        tasks=[TaskCardInfo("rhythm", "multiclass", ["SR", "AF", "OTHER"])],
        datasets=[DatasetCardInfo("CinC 2021", url="https://physionet.org/content/challenge-2021/")],
        evaluations=[EvaluationSummary("test", {"age": results["test/age"]})],
    )
    loaded = ModelCard.load(save_card(render_expert_card(ctx), tmp_path))
    assert loaded.data.library_name == "enecg" and loaded.data.license == "apache-2.0"
    assert loaded.data.get("base_model") is None
    assert {"ecg", "enecg", "light"} <= set(loaded.data.tags) and "lora" not in loaded.data.tags
    assert loaded.data.datasets == ["CinC 2021"]
    assert [r.metric_type for r in loaded.data.eval_results] == ["mae"]
    snippet = extract_python_snippet(loaded)
    assert 'enecg.load_expert("enecg-test/light-cnn")' in snippet
    compile(snippet, "<card snippet>", "exec")
    text = loaded.text
    assert "250 Hz, I, II, 2500 samples" in text and "| kernel_size | 7 |" in text
    assert "Four residual 1-D conv blocks" in text and "Apache 2.0" in text and "Not a medical device" in text


def test_templates_ship_in_the_package() -> None:
    folder = importlib.resources.files("enecg.hub_cards")
    for name in ("ensemble.md", "expert.md"):
        text = folder.joinpath(name).read_text(encoding="utf-8")
        assert text.startswith("---\n{{ card_data }}\n---")
        assert text.count("```python") == 1


# ------------------------------------------------------------------------------------------------- licences


@pytest.mark.parametrize(
    ("licences", "expected"),
    [
        (["mit", "cc-by-nc-4.0"], "cc-by-nc-4.0"),
        (["cc-by-nc-4.0", "cc-by-4.0", "apache-2.0"], "cc-by-nc-4.0"),
        (["cc-by-sa-4.0", "cc-by-4.0", "mit"], "cc-by-sa-4.0"),
        (["cc-by-4.0", "apache-2.0"], "cc-by-4.0"),
        (["mit", "apache-2.0"], "apache-2.0"),
        (["mit", "mit"], "mit"),
        (["cc0-1.0", "mit"], "mit"),
        (["cc-by-nc-sa-4.0", "cc-by-nc-4.0", "mit"], "cc-by-nc-sa-4.0"),
        (["CC BY-NC 4.0", "MIT"], "cc-by-nc-4.0"),
    ],
)
def test_most_restrictive_licence(licences: list[str], expected: str) -> None:
    decision = most_restrictive_licence([(f"expert{i}", lic) for i, lic in enumerate(licences)])
    assert decision.license == expected and not decision.needs_review
    assert decision.display_name == KNOWN_LICENCES[expected].name
    assert decision.license_link == KNOWN_LICENCES[expected].url


@pytest.mark.parametrize(
    ("licences", "problem"),
    [
        (["cc-by-sa-4.0", "cc-by-nc-4.0"], "share-alike"),  # BY-SA and BY-NC cannot both hold
        (["cc-by-sa-4.0", "cc-by-nc-sa-4.0"], "share-alike"),
        (["cc-by-sa-4.0", "gpl-3.0"], "same strictness"),
        (["mit", "bsd-3-clause"], "same strictness"),
        (["mit", "cc-by-nc-nd-4.0"], "derivatives"),
        (["mit", "llama3"], "cannot order"),
    ],
)
def test_non_standard_combinations_are_other(licences: list[str], problem: str) -> None:
    decision = most_restrictive_licence({f"e{i}": lic for i, lic in enumerate(licences)})
    assert decision.license == "other" and decision.needs_review
    assert decision.license_name == "-and-".join(sorted(normalize_licence_id(lic) for lic in licences))
    assert problem in decision.reason


def test_licence_reason_names_the_deciding_experts() -> None:
    decision = most_restrictive_licence(
        {"HuBERT-ECG base": "cc-by-nc-4.0", "HuBERT-ECG small": "cc-by-nc-4.0", "ECGFounder": "mit"}
    )
    assert decision.decided_by == ("HuBERT-ECG base", "HuBERT-ECG small")
    assert decision.reason.startswith(
        "CC BY-NC 4.0 because HuBERT-ECG base and HuBERT-ECG small are in the ensemble"
    )
    single = most_restrictive_licence({"a": "mit"})
    assert single.reason == "MIT because every expert is licensed MIT."
    with pytest.raises(ValueError, match="no expert licences"):
        most_restrictive_licence({})


def test_licence_names() -> None:
    assert normalize_licence_id(" Apache 2.0 ") == "apache-2.0"
    assert normalize_licence_id("cc_by_nc_sa") == "cc-by-nc-sa-4.0"
    assert licence_display_name("cc-by-nc-4.0") == "CC BY-NC 4.0"
    assert licence_display_name("my-licence") == "my-licence"
    ranks = [
        KNOWN_LICENCES[i].rank for i in ("mit", "apache-2.0", "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0")
    ]
    assert ranks == sorted(ranks) and len(set(ranks)) == len(ranks)
