"""The licence of a shared ensemble: the most restrictive of its experts' licences, with the reason.

An ensemble's predictions depend on every expert's weights, and its LoRA adapters are derivatives of them, so the
shared model can only be offered under terms that satisfy every expert's licence at once. For the licences met in
practice this is the most restrictive one, by this ordering (ids as on the Hub,
https://huggingface.co/docs/hub/repositories-licenses)::

    cc0-1.0 / unlicense            public domain
    < mit / bsd-2-clause / bsd-3-clause   permissive
    < apache-2.0                   permissive, plus patent and NOTICE terms
    < cc-by-4.0                    attribution and "indicate changes" on the weights themselves
    < cc-by-sa-4.0 / gpl-3.0       share-alike (copyleft)
    < cc-by-nc-4.0                 non-commercial
    < cc-by-nc-sa-4.0              non-commercial and share-alike

Some combinations have no honest single answer, and get ``license: other`` with a ``license_name`` naming the
licences, so that a person reviews them before sharing: two different share-alike licences, or a share-alike
licence next to a more restrictive one (share-alike demands the same licence for derivatives: CC BY-SA and CC BY-NC
cannot both hold), no-derivatives licences (sharing adapters of such weights may not be allowed at all), two
different licences of the same rank (MIT and BSD), and licences this module does not know.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

OTHER = "other"


@dataclass(frozen=True)
class Licence:
    """One known licence: Hub id, display name, restrictiveness rank and the terms that matter for combining."""

    id: str
    name: str
    rank: int = field(
        metadata={"help": "Restrictiveness: higher ranks impose every lower rank's obligations."}
    )
    url: str
    share_alike: bool = False
    non_commercial: bool = False
    no_derivatives: bool = False


_CC = "https://creativecommons.org/licenses"
KNOWN_LICENCES: dict[str, Licence] = {
    lic.id: lic
    for lic in (
        Licence("cc0-1.0", "CC0 1.0", 0, "https://creativecommons.org/publicdomain/zero/1.0/"),
        Licence("unlicense", "The Unlicense", 0, "https://unlicense.org/"),
        Licence("mit", "MIT", 1, "https://opensource.org/license/mit"),
        Licence("bsd-2-clause", "BSD 2-Clause", 1, "https://opensource.org/license/bsd-2-clause"),
        Licence("bsd-3-clause", "BSD 3-Clause", 1, "https://opensource.org/license/bsd-3-clause"),
        Licence("apache-2.0", "Apache 2.0", 2, "https://www.apache.org/licenses/LICENSE-2.0"),
        Licence("cc-by-4.0", "CC BY 4.0", 3, f"{_CC}/by/4.0/"),
        Licence("cc-by-sa-4.0", "CC BY-SA 4.0", 4, f"{_CC}/by-sa/4.0/", share_alike=True),
        Licence("gpl-3.0", "GPL 3.0", 4, "https://www.gnu.org/licenses/gpl-3.0.html", share_alike=True),
        Licence("cc-by-nc-4.0", "CC BY-NC 4.0", 5, f"{_CC}/by-nc/4.0/", non_commercial=True),
        Licence(
            "cc-by-nc-sa-4.0",
            "CC BY-NC-SA 4.0",
            6,
            f"{_CC}/by-nc-sa/4.0/",
            share_alike=True,
            non_commercial=True,
        ),
        Licence("cc-by-nd-4.0", "CC BY-ND 4.0", 7, f"{_CC}/by-nd/4.0/", no_derivatives=True),
        Licence(
            "cc-by-nc-nd-4.0",
            "CC BY-NC-ND 4.0",
            8,
            f"{_CC}/by-nc-nd/4.0/",
            non_commercial=True,
            no_derivatives=True,
        ),
    )
}

# Spellings met in model cards and specs -> Hub ids.
_ALIASES = {
    "apache-2": "apache-2.0",
    "apache": "apache-2.0",
    "apache-license-2.0": "apache-2.0",
    "mit-license": "mit",
    "cc0": "cc0-1.0",
    "cc-by": "cc-by-4.0",
    "cc-by-nc": "cc-by-nc-4.0",
    "cc-by-sa": "cc-by-sa-4.0",
    "cc-by-nc-sa": "cc-by-nc-sa-4.0",
    "gpl-3": "gpl-3.0",
    "gplv3": "gpl-3.0",
}


def normalize_licence_id(licence: str) -> str:
    """``'CC BY-NC 4.0'`` -> ``'cc-by-nc-4.0'``; ``'Apache 2.0'`` -> ``'apache-2.0'`` (unknown ids pass through)."""
    slug = re.sub(r"[\s_]+", "-", licence.strip().lower())
    return _ALIASES.get(slug, slug)


def licence_display_name(licence: str) -> str:
    """Display name of a licence id (``'CC BY-NC 4.0'``), or the id itself when unknown."""
    known = KNOWN_LICENCES.get(normalize_licence_id(licence))
    return known.name if known else licence


@dataclass(frozen=True)
class LicenceDecision:
    """The licence metadata of a combined model and the sentence that justifies it.

    ``license`` is a Hub licence id, or ``"other"`` with ``license_name`` (a slug naming the licences involved).
    ``decided_by`` names the components whose licence decided it (all of them for ``"other"``).
    """

    license: str
    display_name: str
    reason: str
    decided_by: tuple[str, ...]
    license_name: str | None = None
    license_link: str | None = None

    @property
    def needs_review(self) -> bool:
        """True for ``license: other``: the combination has no single standard licence."""
        return self.license == OTHER


def most_restrictive_licence(
    components: Mapping[str, str] | Iterable[tuple[str, str]], *, kind: str = "expert"
) -> LicenceDecision:
    """The licence a model combining ``components`` (name -> licence id) must carry, with the reason.

    Args:
        components: e.g. ``{"HuBERT-ECG base": "cc-by-nc-4.0", "ECGFounder": "mit"}``.
        kind: what the components are, for the reason sentence (``"expert"``).

    Raises:
        ValueError: no components, or a component without a licence.
    """
    pairs = list(components.items() if isinstance(components, Mapping) else components)
    if not pairs:
        raise ValueError(f"cannot choose a licence: no {kind} licences given")
    for name, licence in pairs:
        if not isinstance(licence, str) or not licence.strip():
            raise ValueError(
                f"{kind} {name!r} has no licence: set one (e.g. 'mit', 'cc-by-nc-4.0') in its spec"
            )
    named = [(name, normalize_licence_id(licence)) for name, licence in pairs]
    ids = sorted({lid for _, lid in named})
    listing = "; ".join(f"{name}: {licence_display_name(lid)}" for name, lid in named)

    def other(problem: str) -> LicenceDecision:
        return LicenceDecision(
            license=OTHER,
            display_name="other (" + ", ".join(licence_display_name(i) for i in ids) + ")",
            reason=f"{problem} Review the licences before sharing ({listing}).",
            decided_by=tuple(name for name, _ in named),
            license_name="-and-".join(ids),
        )

    unknown = [lid for lid in ids if lid not in KNOWN_LICENCES]
    if unknown:
        return other(f"enecg cannot order the licence(s) {', '.join(unknown)} against the others.")
    terms = [KNOWN_LICENCES[lid] for lid in ids]
    no_derivatives = [t for t in terms if t.no_derivatives]
    if no_derivatives and len(ids) > 1:
        return other(
            f"{no_derivatives[0].name} forbids sharing derivatives, and adapters trained on those weights may be one."
        )
    top_rank = max(t.rank for t in terms)
    top = [t for t in terms if t.rank == top_rank]
    if len(top) > 1:
        return other(f"{' and '.join(t.name for t in top)} are different licences of the same strictness.")
    winner = top[0]
    for t in terms:
        if t.share_alike and t.id != winner.id:
            return other(
                f"{t.name} is share-alike (derivatives must keep it) but {winner.name} is more restrictive: "
                "no single licence satisfies both."
            )

    deciders = tuple(name for name, lid in named if lid == winner.id)
    if len(ids) == 1:
        reason = f"{winner.name} because every {kind} is licensed {winner.name}."
    else:
        who = _join(deciders)
        verb = "is" if len(deciders) == 1 else "are"
        reason = (
            f"{winner.name} because {who} {verb} in the ensemble and {winner.name} is the most restrictive of the "
            f"{kind}s' licences ({listing}): the ensemble's predictions and adapters derive from every {kind}'s "
            "weights, so its terms apply to the whole."
        )
    return LicenceDecision(
        license=winner.id,
        display_name=winner.name,
        reason=reason,
        decided_by=deciders,
        license_link=winner.url,
    )


def _join(names: Iterable[str]) -> str:
    items = list(names)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


__all__ = [
    "KNOWN_LICENCES",
    "OTHER",
    "Licence",
    "LicenceDecision",
    "licence_display_name",
    "most_restrictive_licence",
    "normalize_licence_id",
]
