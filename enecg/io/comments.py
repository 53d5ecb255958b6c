"""Metadata from WFDB header comments (``# Age: 78``, ``#Sex: Female``, ``# Dx: 164889003,59118001``)."""

from __future__ import annotations

import math
from typing import Any

_MALE = {"male", "m"}
_FEMALE = {"female", "f"}


def comment_fields(comments: list[str]) -> dict[str, str]:
    """``Key: value`` comment lines as a dict with lower-cased keys (first occurrence wins)."""
    fields: dict[str, str] = {}
    for line in comments:
        key, sep, value = line.partition(":")
        if sep and key.strip():
            fields.setdefault(key.strip().lower(), value.strip())
    return fields


def parse_age(text: str | None) -> float:
    """Age in years, NaN when absent or not a plausible number (``Unknown``, ``NaN``, negative)."""
    try:
        age = float(text) if text is not None else math.nan
    except ValueError:
        return math.nan
    return age if 0 <= age < 150 else math.nan


def parse_sex(text: str | None) -> float:
    """0 = male, 1 = female (the PTB-XL convention), NaN when absent or anything else."""
    value = (text or "").strip().lower()
    if value in _MALE:
        return 0.0
    if value in _FEMALE:
        return 1.0
    return math.nan


def parse_dx(text: str | None) -> list[str]:
    """SNOMED CT codes from a ``Dx`` comment (comma separated), in order, without blanks or duplicates."""
    codes = [code.strip() for code in (text or "").split(",")]
    return list(dict.fromkeys(code for code in codes if code))


def comment_metadata(comments: list[str]) -> dict[str, Any]:
    """``age`` (float, NaN missing), ``sex`` (float), ``dx`` (list of codes, absent when no ``Dx`` line)."""
    fields = comment_fields(comments)
    meta: dict[str, Any] = {"age": parse_age(fields.get("age")), "sex": parse_sex(fields.get("sex"))}
    if "dx" in fields:
        meta["dx"] = parse_dx(fields["dx"])
    return meta
