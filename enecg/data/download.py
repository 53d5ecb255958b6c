"""Download PTB-XL from PhysioNet with wfdb (for users with network; recipes call it when the data is missing).

wfdb's ``dl_files`` fetches from ``wfdb.io.download.PN_CONTENT_URL`` (https://physionet.org/content/), resumes
partial files and skips complete ones, so re-running an interrupted download only fetches what is missing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

PTBXL_DB = "ptb-xl"
PTBXL_TABLES = ("ptbxl_database.csv", "scp_statements.csv")


def ptbxl_present(root: str | os.PathLike, rate: int = 100) -> bool:
    """Whether ``root`` already holds PTB-XL's tables and at least one record at ``rate`` Hz."""
    root = Path(root)
    folder = root / ("records100" if rate == 100 else "records500")
    return all((root / t).is_file() for t in PTBXL_TABLES) and any(folder.glob("*/*.hea"))


def download_ptbxl(
    root: str | os.PathLike,
    *,
    rates: Iterable[int] = (100,),
    ecg_ids: Iterable[int] | None = None,
    overwrite: bool = False,
) -> Path:
    """Download PTB-XL's tables and the records at ``rates`` (100 and/or 500 Hz) into ``root``.

    Args:
        ecg_ids: only these records (default: all 21,799). The tables are always downloaded whole.
        overwrite: re-download files that already exist (default: resume / skip complete files).

    Returns the dataset root, laid out as PhysioNet publishes it (``records100/``, ``records500/``, tables).
    """
    import wfdb

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rates = sorted(set(int(r) for r in rates))
    if not rates or any(r not in (100, 500) for r in rates):
        raise ValueError(f"PTB-XL rates are 100 and/or 500 Hz, got {rates}")
    log.info("downloading PTB-XL tables into %s", root)
    wfdb.dl_files(PTBXL_DB, str(root), list(PTBXL_TABLES), keep_subdirs=True, overwrite=overwrite)
    table = pd.read_csv(root / "ptbxl_database.csv", index_col="ecg_id")
    if ecg_ids is not None:
        wanted = sorted(set(int(i) for i in ecg_ids))
        missing = sorted(set(wanted) - set(table.index))
        if missing:
            raise ValueError(f"{root / 'ptbxl_database.csv'}: no ecg_id {missing[:5]}")
        table = table.loc[wanted]
    files: list[str] = []
    for rate in rates:
        column = "filename_lr" if rate == 100 else "filename_hr"
        for stem in table[column]:
            files += [f"{stem}.hea", f"{stem}.dat"]
    log.info("downloading %d PTB-XL record files (%s Hz) into %s", len(files), "+".join(map(str, rates)), root)
    wfdb.dl_files(PTBXL_DB, str(root), files, keep_subdirs=True, overwrite=overwrite)
    return root
