"""PTB-XL download through wfdb's real PhysioNet download path, against a loopback server that serves the same
layout as physionet.org (``content/ptb-xl/`` page with the version, ``files/ptb-xl/1.0.3/...``)."""

from __future__ import annotations

import hashlib
import http.server
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from enecg.data.download import download_ptbxl, ptbxl_present


class _PhysioNetHandler(http.server.BaseHTTPRequestHandler):
    root: Path  # set on the subclass: a folder holding ptb-xl/1.0.3/...

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def _body(self) -> bytes | None:
        path = self.path.split("?")[0]
        if path.rstrip("/") == "/content/ptb-xl":
            return b"<html><body><p>Version: 1.0.3</p></body></html>"
        if path.rstrip("/") == "/content/ptb-xl/1.0.3":
            return b"<html>PTB-XL 1.0.3</html>"
        match = re.fullmatch(r"/files/(ptb-xl/1\.0\.3/.+)", path)
        if match:
            file = (self.root / match.group(1)).resolve()
            if self.root.resolve() in file.parents and file.is_file():
                return file.read_bytes()
        return None

    def _send(self, head_only: bool) -> None:
        body = self._body()
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, end = 0, len(body) - 1
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if ranged:
            start = int(ranged.group(1))
            end = int(ranged.group(2)) if ranged.group(2) else end
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
        else:
            self.send_response(200)
        chunk = body[start:end + 1]
        self.send_header("Content-Length", str(len(chunk)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if not head_only:
            self.wfile.write(chunk)

    def do_GET(self) -> None:
        self._send(head_only=False)

    def do_HEAD(self) -> None:
        self._send(head_only=True)


@pytest.fixture()
def fake_physionet(ptbxl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Serve a 3-record PTB-XL on 127.0.0.1 and point wfdb's PhysioNet URLs at it."""
    import wfdb
    from wfdb.io import download

    served = tmp_path / "served" / "ptb-xl" / "1.0.3"
    served.mkdir(parents=True, exist_ok=True)
    (served / "scp_statements.csv").write_bytes((ptbxl_dir / "scp_statements.csv").read_bytes())
    # A consistent 3-record PTB-XL: the table lists exactly the records served.
    lines = (ptbxl_dir / "ptbxl_database.csv").read_text().splitlines(keepends=True)
    (served / "ptbxl_database.csv").write_text("".join(lines[:4]))
    for rate_dir, suffix in (("records100", "lr"), ("records500", "hr")):
        for i in (1, 2, 3):
            for ext in ("hea", "dat"):
                rel = Path(rate_dir) / "00000" / f"{i:05d}_{suffix}.{ext}"
                (served / rel).parent.mkdir(parents=True, exist_ok=True)
                (served / rel).write_bytes((ptbxl_dir / rel).read_bytes())
    handler = type("Handler", (_PhysioNetHandler,), {"root": tmp_path / "served"})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(download, "PN_CONTENT_URL", f"{base}/content/")
    previous = download.config.db_index_url
    wfdb.set_db_index_url(f"{base}/files/")
    try:
        yield tmp_path / "served" / "ptb-xl" / "1.0.3"
    finally:
        wfdb.set_db_index_url(previous)
        server.shutdown()
        server.server_close()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_ptbxl_subset_matches_source(fake_physionet: Path, tmp_path: Path) -> None:
    out = tmp_path / "ptbxl"
    assert not ptbxl_present(out)
    download_ptbxl(out, rates=(100,), ecg_ids=[1, 3])
    assert ptbxl_present(out, 100) and not ptbxl_present(out, 500)
    for rel in ("ptbxl_database.csv", "records100/00000/00001_lr.dat", "records100/00000/00003_lr.hea"):
        assert _digest(out / rel) == _digest(fake_physionet / rel), rel
    assert not (out / "records100/00000/00002_lr.dat").exists()
    # Resuming: a truncated file is completed, complete files are kept.
    dat = out / "records100/00000/00001_lr.dat"
    dat.write_bytes(dat.read_bytes()[:100])
    download_ptbxl(out, rates=(100, 500), ecg_ids=[1, 3])
    assert _digest(dat) == _digest(fake_physionet / "records100/00000/00001_lr.dat")
    assert ptbxl_present(out, 500)


def test_download_rejects_bad_arguments(fake_physionet: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="100 and/or 500"):
        download_ptbxl(tmp_path / "x", rates=(250,))
    with pytest.raises(ValueError, match="no ecg_id"):
        download_ptbxl(tmp_path / "y", ecg_ids=[999999])


def test_download_cli(fake_physionet: Path, tmp_path: Path) -> None:
    from enecg.cli import main

    assert main(["data", "download", "ptbxl", "--out", str(tmp_path / "cli"), "--ecg-ids", "1-2"]) == 0
    assert ptbxl_present(tmp_path / "cli", 100)
    assert (tmp_path / "cli" / "records100/00000/00002_lr.hea").is_file()


def test_recipe_downloads_missing_ptbxl_then_prepares(fake_physionet: Path, tmp_path: Path) -> None:
    from enecg.training.data import load_training_dataset
    from enecg.training.recipe import DataSection

    section = DataSection(path=str(tmp_path / "prepared"), prepare_from=str(tmp_path / "raw"), rate=100,
                          download=True)
    dataset, meta = load_training_dataset(section)
    assert len(dataset["test"]) + len(dataset["train"]) + len(dataset["validation"]) == 3
    assert sum(meta.splits.values()) == 3 and meta.source == "ptbxl"
    assert ptbxl_present(tmp_path / "raw", 100)
    # Without `download`, a missing copy is a clear error, not a silent empty dataset.
    with pytest.raises((FileNotFoundError, ValueError)):
        load_training_dataset(DataSection(path=str(tmp_path / "p2"), prepare_from=str(tmp_path / "none")))
