"""Cross-dataset label matching (PTB-XL SCP statements <-> CinC SNOMED CT classes) and its evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from enecg.data.build import load_dataset_dir
from enecg.data.cinc import CINC2021_SCORED, CincOptions, dx_task, parse_classes, prepare_cinc
from enecg.data.ptbxl import PtbxlOptions, ScpStatements, ptbxl_tasks
from enecg.data.schema import DatasetMeta, TaskInfo
from enecg.evaluation.cross_dataset import (
    evaluate_cross_dataset,
    label_findings,
    plan_cross_dataset,
    task_label_names,
)
from enecg.evaluation.metrics import BootstrapConfig, OperatingPoint
from enecg.evaluation.task_eval import evaluate_task


@pytest.fixture(scope="module")
def ptbxl_meta(ptbxl_dir: Path) -> DatasetMeta:
    statements = ScpStatements.read(ptbxl_dir / "scp_statements.csv")
    return DatasetMeta(source="ptbxl", tasks=ptbxl_tasks(statements, PtbxlOptions()))


def cinc_meta(classes: str = "cinc2021") -> DatasetMeta:
    return DatasetMeta(
        source="cinc", tasks=[dx_task(parse_classes(classes), classes)], options={"classes": classes}
    )


def pairs(plan, key: str) -> dict[str, str]:
    match = next(m for m in plan.matches if m.key == key)
    return {p.model_label: p.target_label for p in match.pairs}


def test_ptbxl_model_on_cinc(ptbxl_meta: DatasetMeta) -> None:
    plan = plan_cross_dataset(ptbxl_meta, cinc_meta(), "ptbxl-cinc")
    assert {m.key for m in plan.matches} == {"rhythm", "form", "subclass"}  # superclass: NORM/MI not scored
    assert pairs(plan, "rhythm") == {
        "SR": "NSR",
        "AFIB": "AF",
        "AFLT": "AFL",
        "STACH": "STach",
        "SBRAD": "SB",
        "SARRH": "SA",
        "PACE": "PR",
    }
    assert pairs(plan, "form") == {
        "PAC": "PAC|SVPB",
        "PVC": "PVC|VPB",
        "LPR": "LPR",
        "LNGQT": "LQT",
        "QWAVE": "QAb",
        "INVT": "TInv",
        "LVOLT": "LQRSV",
    }
    assert pairs(plan, "subclass") == {
        "CLBBB": "CLBBB|LBBB",
        "CRBBB": "CRBBB|RBBB",
        "IRBBB": "IRBBB",
        "IVCD": "NSIVCB",
    }
    # Indices point at the right columns on both sides.
    rhythm = next(m for m in plan.matches if m.key == "rhythm")
    model_names = ptbxl_meta.task("rhythm").names
    target_names = cinc_meta().task("dx").names
    for pair, i, j in zip(rhythm.pairs, rhythm.model_index, rhythm.target_index):
        assert model_names[i] == pair.model_label and target_names[j] == pair.target_label
    # Restricting the model's tasks restricts the plan.
    assert [m.key for m in plan_cross_dataset(ptbxl_meta, cinc_meta(), "ptbxl-cinc", ["rhythm"]).matches] == [
        "rhythm"
    ]


def test_cinc_model_on_ptbxl(ptbxl_meta: DatasetMeta) -> None:
    """The other direction: a model trained on the CinC classes, evaluated on PTB-XL's tasks."""
    plan = plan_cross_dataset(cinc_meta(), ptbxl_meta, "ptbxl-cinc")
    assert {m.key for m in plan.matches} == {"dx/rhythm", "dx/form", "dx/subclass"}
    assert pairs(plan, "dx/rhythm")["AF"] == "AFIB"
    assert pairs(plan, "dx/subclass") == {
        "CLBBB|LBBB": "CLBBB",
        "CRBBB|RBBB": "CRBBB",
        "IRBBB": "IRBBB",
        "NSIVCB": "IVCD",
    }


def test_split_classes_are_ambiguous(ptbxl_meta: DatasetMeta) -> None:
    # PVC and VPB as two classes: both stand for PTB-XL's PVC, so neither is paired (and it is said why).
    plan = plan_cross_dataset(ptbxl_meta, cinc_meta("PVC=427172004,VPB=17338001,AF=164889003"), "ptbxl-cinc")
    assert {m.key for m in plan.matches} == {"rhythm"}
    assert pairs(plan, "rhythm") == {"AFIB": "AF"}
    assert any("PVC" in note and "ambiguous" in note for note in plan.notes)
    # A class mixing two findings maps to neither.
    mixed = cinc_meta("AFX=164889003|164890007")
    assert label_findings(mixed, mixed.task("dx"), "ptbxl-cinc") == {}
    empty = plan_cross_dataset(ptbxl_meta, mixed, "ptbxl-cinc")
    assert not empty.matches and empty.notes


def test_identity_map_and_errors(ptbxl_meta: DatasetMeta) -> None:
    plan = plan_cross_dataset(ptbxl_meta, ptbxl_meta, "identity", ["superclass"])
    assert pairs(plan, "superclass") == {n: n for n in ("NORM", "MI", "STTC", "CD", "HYP")}
    with pytest.raises(ValueError, match="unknown label map"):
        plan_cross_dataset(ptbxl_meta, cinc_meta(), "snomed-icd")
    wfdb = DatasetMeta(source="wfdb", tasks=[TaskInfo("dx", "multilabel", ["A"])])
    with pytest.raises(ValueError, match="no rule for datasets of source 'wfdb'"):
        plan_cross_dataset(ptbxl_meta, wfdb, "ptbxl-cinc")
    # Binary tasks: the dataset names both classes, the model predicts the positive one.
    assert task_label_names(TaskInfo("sex", "binary", ["male", "female"])) == ["female"]
    assert task_label_names(TaskInfo("af", "binary", [])) == ["af"]


def test_evaluate_cross_dataset_arrays(ptbxl_meta: DatasetMeta) -> None:
    plan = plan_cross_dataset(ptbxl_meta, cinc_meta(), "ptbxl-cinc", ["rhythm"])
    match = plan.matches[0]
    rng = np.random.default_rng(0)
    k_model, k_target = len(ptbxl_meta.task("rhythm").names), len(cinc_meta().task("dx").names)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = (rng.random((n, k_model)) < 0.3).astype(float)
        return y, np.clip(0.4 * y + 0.6 * rng.random((n, k_model)), 0, 1)

    src_y, src_p = split(80)
    val_y, val_p = split(60)
    tgt_y = (rng.random((50, k_target)) < 0.3).astype(float)
    tgt_y[3] = np.nan  # an unlabelled record
    tgt_p = rng.random((50, k_model))
    boot = BootstrapConfig(n_resamples=15)
    point = OperatingPoint("max_f1")
    results = evaluate_cross_dataset(
        plan,
        target_true={"dx": tgt_y},
        target_pred={"rhythm": tgt_p},
        target_groups=None,
        source_true={"rhythm": src_y},
        source_pred={"rhythm": src_p},
        source_groups=None,
        source_val_true={"rhythm": val_y},
        source_val_pred={"rhythm": val_p},
        operating_point=point,
        bootstrap=boot,
        source_name="src",
        target_name="tgt",
    )
    assert set(results) == {"src", "tgt"}
    expected = evaluate_task(
        "multilabel",
        match.label_names,
        tgt_y[:, match.target_index],
        tgt_p[:, match.model_index],
        val_true=val_y[:, match.model_index],
        val_pred=val_p[:, match.model_index],
        operating_point=point,
        bootstrap=boot,
    )
    external = results["tgt"]["rhythm"]
    assert external["metrics"] == expected["metrics"] and external["thresholds"] == expected["thresholds"]
    # Thresholds are fitted once, on the source validation split, and used for both rows.
    assert external["thresholds"] == results["src"]["rhythm"]["thresholds"]
    assert [(p["model_label"], p["target_label"]) for p in external["label_pairs"]] == [
        (p.model_label, p.target_label) for p in match.pairs
    ]
    only_target = evaluate_cross_dataset(
        plan,
        target_true={"dx": tgt_y},
        target_pred={"rhythm": tgt_p},
        target_groups=None,
        bootstrap=boot,
        target_name="tgt",
    )
    assert set(only_target) == {"tgt"}
    assert only_target["tgt"]["rhythm"]["operating_point"]["fitted_on"] == "default 0.5"


def test_prepared_cinc_sample_carries_the_shared_classes(
    ptbxl_meta: DatasetMeta, cinc_dir: Path, tmp_path: Path
) -> None:
    """On the real CinC sample, the paired target columns hold the expected positives."""
    prepare_cinc(cinc_dir, tmp_path / "cinc", CincOptions())
    dataset, meta = load_dataset_dir(tmp_path / "cinc")
    plan = plan_cross_dataset(ptbxl_meta, meta, "ptbxl-cinc", ["rhythm"])
    rhythm = plan.matches[0]
    labels = np.concatenate([np.asarray(dataset[part]["dx"], dtype=float) for part in dataset])
    assert len(labels) == 127
    positives = {
        p.model_label: int(np.nansum(labels[:, j])) for p, j in zip(rhythm.pairs, rhythm.target_index)
    }
    assert positives == {"SR": 45, "AFIB": 4, "AFLT": 7, "STACH": 30, "SBRAD": 29, "SARRH": 6, "PACE": 2}
    assert [c.name for c in CINC2021_SCORED] == meta.task("dx").names


def test_shared_tasks_pair_by_name(ptbxl_meta: DatasetMeta) -> None:
    """superclass (CinC: derived from SNOMED CT codes), sex and age pair by name under the ptbxl-cinc map."""
    from enecg.data.cinc import SUPERCLASS_TASK
    from enecg.data.targets import AGE_TASK, SEX_TASK

    cinc = DatasetMeta(
        source="cinc",
        tasks=[dx_task(parse_classes("cinc2021"), "cinc2021"), SUPERCLASS_TASK, AGE_TASK, SEX_TASK],
        options={"classes": "cinc2021"},
    )
    plan = plan_cross_dataset(ptbxl_meta, cinc, "ptbxl-cinc")
    assert pairs(plan, "superclass") == {n: n for n in ("NORM", "MI", "STTC", "CD", "HYP")}
    assert pairs(plan, "sex") == {"female": "female"} and pairs(plan, "age") == {"age": "age"}
    assert next(m for m in plan.matches if m.key == "age").task_type == "regression"
    # The SCP <-> SNOMED statement matches are still there (superclass NORM/MI also against dx, where they map).
    assert {"rhythm", "form", "subclass"} <= {m.key for m in plan.matches}
    # And the other direction, and with the identity map (age included).
    back = plan_cross_dataset(cinc, ptbxl_meta, "ptbxl-cinc", ["superclass", "sex", "age"])
    assert {m.key for m in back.matches} == {"superclass", "sex", "age"}
    identity = plan_cross_dataset(ptbxl_meta, ptbxl_meta, "identity", ["sex", "age"])
    assert {m.key for m in identity.matches} == {"sex", "age"}


def test_evaluate_age_and_sex_across_datasets(ptbxl_meta: DatasetMeta) -> None:
    from enecg.data.targets import AGE_TASK, SEX_TASK

    target = DatasetMeta(source="wfdb", tasks=[AGE_TASK, SEX_TASK])
    plan = plan_cross_dataset(ptbxl_meta, target, "ptbxl-cinc", ["age", "sex"])
    rng = np.random.default_rng(1)
    age_true = rng.uniform(20, 90, 40)
    age_true[5] = np.nan
    sex_true = (rng.random(40) < 0.5).astype(float)
    results = evaluate_cross_dataset(
        plan,
        target_true={"age": age_true, "sex": sex_true},
        target_pred={"age": age_true + rng.normal(0, 5, 40), "sex": np.clip(sex_true * 0.6 + 0.2, 0, 1)},
        target_groups=None,
        bootstrap=BootstrapConfig(n_resamples=10),
        target_name="tgt",
    )
    assert results["tgt"]["age"]["type"] == "regression"
    assert results["tgt"]["age"]["metrics"]["mae"] < 10
    assert results["tgt"]["sex"]["metrics"]["per_label"]["female"]["auroc"] == 1.0


def test_cinc_sample_superclass_pairs_with_ptbxl_superclass(
    ptbxl_meta: DatasetMeta, cinc_dir: Path, tmp_path: Path
) -> None:
    """On the real CinC sample: a PTB-XL superclass model finds the CinC superclass labels, with positives."""
    prepare_cinc(cinc_dir, tmp_path / "cinc", CincOptions())
    dataset, meta = load_dataset_dir(tmp_path / "cinc")
    plan = plan_cross_dataset(ptbxl_meta, meta, "ptbxl-cinc", ["superclass", "sex", "age"])
    keys = {m.key: m for m in plan.matches}
    assert {"superclass", "sex", "age"} <= set(keys)
    match = keys["superclass"]
    labels = np.concatenate([np.asarray(dataset[part]["superclass"], dtype=float) for part in dataset])
    positives = {p.model_label: int(np.nansum(labels[:, j])) for p, j in zip(match.pairs, match.target_index)}
    assert positives["NORM"] == 0  # no Challenge code means "normal ECG"
    assert all(positives[name] > 0 for name in ("MI", "STTC", "CD", "HYP")), positives
