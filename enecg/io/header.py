"""WFDB header (``.hea``) reading: strict text decoding, record-line normalisation, wfdb's own field parser.

``wfdb.rdheader`` is not used directly because it (a) decodes headers as ASCII while *ignoring* bad bytes, (b)
rejects the record line of many PhysioNet/CinC Challenge (Georgia, CPSC, Chapman) headers
(``E07500.mat 12 500 5000 05-May-2020 09:49:17``: a file name as record name and a ``DD-Mon-YYYY`` date) or,
worse, silently mis-reads it (``A0689 12 500 5000 12-May-2020 12:33:59`` parses as base time ``00:00:12``), and
(c) silently falls back to 250 Hz when the sampling-frequency field is not a number, and (d) reads only the
digits before an exponent (``3.6e2`` becomes 3.6 Hz). Here the text is decoded as
strict UTF-8 (a leading byte-order mark is dropped), the record line is normalised to WFDB syntax (only when it is not already valid, so well-formed
headers go through unchanged), the numeric fields are checked, and the normalised lines are handed to wfdb's
header parser, so every field means exactly what ``wfdb.rdheader`` would make of a well-formed header.
"""

from __future__ import annotations

import datetime
import decimal
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import wfdb
from wfdb.io import _header
from wfdb.io.header import HeaderSyntaxError, parse_header_content, rx_record, rx_signal

from enecg.record import RecordError

logger = logging.getLogger(__name__)

# Signal-file extensions a record line's name field sometimes carries (CinC headers): stripped from record names.
_SIGNAL_FILE_SUFFIXES = (".mat", ".dat")
_NUMBER = re.compile(r"^[+]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_WFDB_TIME = re.compile(r"^\d{1,2}(:\d{1,2}){0,2}(\.\d{1,6})?$")
_WFDB_DATE = re.compile(r"^\d{1,2}/\d{1,2}/\d{4}$")
# wfdb's table of signal-line fields (type, default when empty), read once: wfdb looks it up with pandas ``.loc``
# for every field of every signal line, which makes header parsing most of ``wfdb.rdrecord``'s time.
_SIGNAL_SPECS: dict[str, tuple[tuple[type, ...], object]] = {
    name: (row["allowed_types"], row["read_default"])
    for name, row in _header.SIGNAL_SPECS[["allowed_types", "read_default"]].to_dict("index").items()
}
# Non-WFDB date spellings seen in PhysioNet/CinC Challenge headers.
_OTHER_DATE_FORMATS = ("%d-%b-%Y", "%Y-%m-%d", "%d-%m-%Y")


@dataclass
class WfdbHeader:
    """A parsed single-segment WFDB header.

    Attributes:
        path: the ``.hea`` file.
        record: a ``wfdb.Record`` holding the header fields (no signal), as ``wfdb.rdheader`` would return it.
        comments: the comment lines, without the leading ``#``.
        record_line_normalised: whether the record line had to be rewritten to WFDB syntax.
    """

    path: Path
    record: wfdb.Record
    comments: list[str] = field(default_factory=list)
    record_line_normalised: bool = False

    @property
    def signal_files(self) -> list[str]:
        """Distinct signal file names, in header order."""
        return list(dict.fromkeys(self.record.file_name))


def read_header_text(path: Path) -> str:
    """The header text, decoded as strict UTF-8 (a header with other bytes is refused, not silently cleaned)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RecordError(path, "header file not found") from None
    except OSError as exc:
        raise RecordError(path, f"cannot read header: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8-sig")  # a leading byte-order mark (some Windows editors write one) is dropped
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 1].hex()
        raise RecordError(path, f"header is not UTF-8 text (byte 0x{bad} at offset {exc.start})") from None


def normalise_record_line(line: str, path: Path) -> str:
    """Return ``line`` in WFDB record-line syntax, checking the fields that wfdb would silently misread.

    ``NAME N_SIG FS[/COUNTER[(BASE)]] [N_SAMPLES [TIME [DATE]]]``. A file-name suffix on ``NAME`` is removed;
    ``DD-Mon-YYYY`` style dates become ``DD/MM/YYYY``; tokens that are neither a time nor a date are dropped (they
    carry no signal information). A well-formed line is returned unchanged.
    """
    tokens = line.split()
    if len(tokens) < 2:
        raise RecordError(path, f"record line {line.strip()!r} has no signal count")
    name = tokens[0]
    if "/" in name:
        raise RecordError(path, "multi-segment records are not supported (record line names segments)")
    for suffix in _SIGNAL_FILE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    if not tokens[1].isdigit():
        raise RecordError(path, f"signal count {tokens[1]!r} in the record line is not a whole number")
    if len(tokens) < 3:
        # WFDB would assume 250 Hz: for ECG that silently gives wrong time axes, so refuse.
        raise RecordError(path, "record line gives no sampling frequency")
    fs_token = tokens[2]
    fs_text, slash, counter = fs_token.partition("/")
    if not _NUMBER.match(fs_text) or float(fs_text) <= 0:
        raise RecordError(path, f"sampling frequency {fs_text!r} in the record line is not a positive number")
    if "e" in fs_text.lower():
        # wfdb's record-line regex has no exponent: it would read "3.6e2" as 3.6 Hz. Write it out in full.
        fs_token = _plain_decimal(fs_text) + slash + counter
    out = [name, tokens[1], fs_token]
    rest = tokens[3:]
    if rest:
        if not rest[0].isdigit():
            raise RecordError(path, f"sample count {rest[0]!r} in the record line is not a whole number")
        out.append(rest[0])
        rest = rest[1:]
    time_token = next((t for t in rest if _WFDB_TIME.match(t)), None)
    date_token = next((t for t in rest if _WFDB_DATE.match(t)), None)
    if date_token is None:
        date_token = next((d for d in (_parse_other_date(t) for t in rest) if d), None)
    dropped = [t for t in rest if t != time_token and t != date_token and not _parse_other_date(t)]
    if dropped:
        logger.debug("%s: ignoring record-line tokens %s", path, dropped)
    if time_token:
        out.append(time_token)
        if date_token:
            out.append(date_token)
    normalised = " ".join(out)
    return line.strip() if normalised == " ".join(line.split()) else normalised


def _plain_decimal(text: str) -> str:
    """``3.6e2`` -> ``360``, ``2.5E-1`` -> ``0.25``: the same number without an exponent."""
    return format(decimal.Decimal(text).normalize(), "f")


def declared_fs(record_line: str) -> float:
    """The sampling frequency a record line declares (the number before any ``/counter``)."""
    return float(record_line.split()[2].partition("/")[0])


def _parse_other_date(token: str) -> str | None:
    for fmt in _OTHER_DATE_FORMATS:
        try:
            return datetime.datetime.strptime(token, fmt).strftime("%d/%m/%Y")
        except ValueError:
            continue
    return None


def parse_signal_lines(signal_lines: list[str]) -> dict[str, list]:
    """Signal-line fields, with wfdb's regex, field table and rules (same result as wfdb's own parser)."""
    fields: dict[str, list] = {name: [None] * len(signal_lines) for name in _SIGNAL_SPECS}
    for ch, line in enumerate(signal_lines):
        match = rx_signal.match(line)
        if match is None:
            raise HeaderSyntaxError(f"invalid syntax in signal line {line!r}")
        values = match.groupdict()
        for name, (types, default) in _SIGNAL_SPECS.items():
            text = values[name]
            if text == "":
                value = default
                if name == "baseline" and values["adc_zero"] != "":
                    value = int(values["adc_zero"])  # a missing baseline defaults to the ADC zero
            elif types is _header.int_types:
                value = int(text)
            elif types is _header.float_types:
                value = float(text)
                if name == "adc_gain" and value == 0:
                    value = 200.0  # WFDB: gain 0 means the default gain
            else:
                value = text
            fields[name][ch] = value
    return fields


def read_header(path: str | Path) -> WfdbHeader:
    """Read and check a single-segment WFDB header. Raises :class:`RecordError` naming the file and the problem."""
    path = Path(path)
    text = read_header_text(path)
    lines, comment_lines = parse_header_content(text)
    comments = [line.strip(" \t#") for line in comment_lines]  # as wfdb.rdheader
    if not lines:
        raise RecordError(path, "header has no record line")
    record_line = normalise_record_line(lines[0], path)
    normalised = record_line != lines[0].strip()
    signal_lines = lines[1:]
    n_declared = int(record_line.split()[1])
    if n_declared == 0:
        raise RecordError(path, "record has no signals (signal count 0)")
    if n_declared != len(signal_lines):
        raise RecordError(
            path,
            f"record line declares {n_declared} signals but the header has {len(signal_lines)} signal lines",
        )
    if rx_record.match(record_line) is None:
        raise RecordError(path, f"invalid record line {lines[0].strip()!r}")
    try:
        record_fields = _header._parse_record_line(record_line)
        signal_fields = parse_signal_lines(signal_lines)
    except (HeaderSyntaxError, ValueError) as exc:
        raise RecordError(path, f"invalid header: {exc}") from None
    if record_fields.get("fs") != declared_fs(record_line):
        # Never a silently different rate: wfdb's parser must read exactly the number written.
        raise RecordError(
            path, f"sampling frequency {record_line.split()[2]!r} cannot be read exactly (read as {record_fields.get('fs')})"
        )
    record = wfdb.Record()
    for name, values in signal_fields.items():
        setattr(record, name, values)
    for name, value in record_fields.items():
        if name != "n_seg":
            setattr(record, name, value)
    record.comments = comments
    if any(not f for f in record.file_name):
        raise RecordError(path, "a signal line names no signal file")
    return WfdbHeader(path=path, record=record, comments=comments, record_line_normalised=normalised)
