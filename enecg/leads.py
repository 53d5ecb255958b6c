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


def parse_lead_aliases(items: list[str] | None) -> dict[str, str]:
    """``["MLII=II"]`` -> ``{"MLII": "II"}`` (canonical names); ``ValueError`` naming a malformed item or an
    unknown target lead."""
    aliases: dict[str, str] = {}
    for item in items or []:
        source, sep, target = item.partition("=")
        if not sep or not source.strip() or not target.strip():
            raise ValueError(f"lead alias {item!r}: expected FROM=TO, e.g. MLII=II")
        target = canonical_lead_name(target.strip())
        if not is_known_lead(target):
            raise ValueError(f"lead alias {item!r}: {target!r} is not a known lead name")
        aliases[canonical_lead_name(source.strip())] = target
    return aliases
