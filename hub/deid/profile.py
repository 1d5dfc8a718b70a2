"""The DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile as ``{tag: action}``.

The table is not typed here: it is loaded from the newest machine-readable copy that the
``dicom-anonymizer`` package ships (``dicomfields_<year><letter>``), so a newer edition of the
standard arrives with a package upgrade. Actions are the standard's letters: D (replace with
a dummy), Z (zero length), X (remove), U (replace UIDs consistently) and their combinations
("X/Z", "X/D", "Z/D", "X/Z/D", "X/Z/U*"), which leave the choice to the de-identifier.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from types import MappingProxyType
from typing import Mapping

PROFILE_NAME = "DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile"
TABLE_PACKAGE = "dicomanonymizer.dicom_anonymization_databases"

# dicom-anonymizer's category lists and the action each stands for.
_CATEGORY_ACTIONS = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}

#: The options applied on top of the basic profile (PS3.16 CID 7050), for the DICOM
#: DeidentificationMethodCodeSequence and the manifest.
BASIC_PROFILE_CODE = ("113100", "Basic Application Confidentiality Profile")
OPTION_CODES = (
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    ("113108", "Retain Patient Characteristics Option"),
)


@dataclass(frozen=True)
class RepeatingTag:
    """A table row for a repeating group such as (60xx,4000): matches ``tag & mask == value``."""

    value: int
    mask: int
    action: str


@dataclass(frozen=True)
class BasicProfile:
    name: str
    version: str
    source: str
    actions: Mapping[int, str]
    repeating: tuple[RepeatingTag, ...] = field(default=())

    def action_for(self, tag: int) -> str | None:
        """The table's action for ``tag`` (an int ``0xggggeeee``), or None if it is not listed."""
        action = self.actions.get(int(tag))
        if action is not None:
            return action
        for row in self.repeating:
            if int(tag) & row.mask == row.value:
                return row.action
        return None

    def __len__(self) -> int:
        return len(self.actions) + len(self.repeating)


def _edition_key(module_name: str) -> tuple[int, str] | None:
    m = re.fullmatch(r"dicomfields_(\d{4})([a-z]?)", module_name)
    return (int(m.group(1)), m.group(2)) if m else None


def newest_table_module() -> str:
    """The name of the newest ``dicomfields_*`` table shipped by dicom-anonymizer."""
    package = importlib.import_module(TABLE_PACKAGE)
    editions = [(key, info.name) for info in pkgutil.iter_modules(package.__path__)
                if (key := _edition_key(info.name)) is not None]
    if not editions:
        raise RuntimeError(f"{TABLE_PACKAGE} ships no dicomfields_* table")
    return max(editions)[1]


@lru_cache(maxsize=1)
def basic_profile() -> BasicProfile:
    """The basic profile from dicom-anonymizer's newest table (loaded once)."""
    module_name = newest_table_module()
    table = importlib.import_module(f"{TABLE_PACKAGE}.{module_name}")
    actions: dict[int, str] = {}
    repeating: list[RepeatingTag] = []
    for category, action in _CATEGORY_ACTIONS.items():
        for row in getattr(table, category):
            if len(row) == 2:
                # A tag listed twice keeps its first (the package's canonical) action.
                actions.setdefault((row[0] << 16) | row[1], action)
            else:
                group, element, group_mask, element_mask = row
                repeating.append(RepeatingTag((group << 16) | element,
                                              (group_mask << 16) | element_mask, action))
    version = module_name.removeprefix("dicomfields_")
    source = f"dicom-anonymizer {metadata.version('dicom-anonymizer')} ({module_name})"
    return BasicProfile(PROFILE_NAME, version, source, MappingProxyType(actions),
                        tuple(repeating))


def profile_description() -> dict:
    """What the manifest records about the de-identification that was applied."""
    profile = basic_profile()
    return {
        "name": profile.name,
        "version": profile.version,
        "source": profile.source,
        "attributes": len(profile),
        "options": [meaning for _, meaning in OPTION_CODES],
        "pseudonyms": "keyed HMAC-SHA256 (patient ids, accession numbers, UIDs as 2.25.<int>, "
                      "per-patient date shift); no table of real identities is kept",
    }
