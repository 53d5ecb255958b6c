"""Canonical ECG lead names.

Files spell leads many ways (``AVL``, ``aVL``, ``avl``, ``MLII``, ``V5``, ``ECG1``). enecg compares leads only
through :func:`canonical_lead_name`, so a contract's lead order can be matched against any record's header.
"""

from __future__ import annotations

STANDARD_12_LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")

# Upper-cased spelling -> canonical spelling. Limb leads are case sensitive in print (aVR), files are not.
_ALIASES: dict[str, str] = {name.upper(): name for name in STANDARD_12_LEADS}
_ALIASES.update(
    {
        "D1": "I",
        "D2": "II",
        "D3": "III",
        "LEAD I": "I",
        "LEAD II": "II",
        "LEAD III": "III",
        "-AVR": "-aVR",
        "MLII": "MLII",
        "ML2": "MLII",
        "MLI": "MLI",
        "MLIII": "MLIII",
    }
)


def canonical_lead_name(name: str) -> str:
    """Return the canonical spelling of a lead name (``'AVL'`` -> ``'aVL'``, ``'v1'`` -> ``'V1'``).

    Unknown names are returned stripped but otherwise unchanged (``'ECG1'`` stays ``'ECG1'``): whether an unknown
    lead is acceptable is the contract's decision, not the reader's.
    """
    key = " ".join(name.strip().split()).upper()
    return _ALIASES.get(key, name.strip())


def is_known_lead(name: str) -> bool:
    """Whether ``name`` is a lead enecg knows (the standard 12 or a Holter modified lead)."""
    return " ".join(name.strip().split()).upper() in _ALIASES
