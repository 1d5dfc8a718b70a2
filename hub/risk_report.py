"""The disclosure-risk report that model weights need before they may leave the zone.

Trained weights can memorise their training data: a model may reproduce a patient's image
or reveal that a person was in the cohort (membership inference). The screen cannot judge
that, so a request holding weights can only be approved with a short report by the
requester, which the reviewers read and which leaves with the weights. The airlock checks
its form, not its truth: every field present and non-empty, the cohort size a whole number.

Two spellings, told apart by the file name::

    risk.json   {"model_type": "DenseNet121 2D classifier",
                 "training_data": "cxr-demo, frontal X-rays, 2019-2021",
                 "cohort_size": 480,
                 "memorisation": "…",
                 "intended_use": "…"}

    risk.md     ## Model type
                DenseNet121 2D classifier
                ## Training data
                …
                ## Cohort size
                480 patients
                ## Memorisation and membership inference
                …
                ## Intended use
                …

Pure: bytes in, fields out (or :class:`~medzone_hub.errors.InvalidInput` with one line).
"""

from __future__ import annotations

import json
import re

from .errors import InvalidInput

#: (JSON key, Markdown heading) of every field a report must fill in, in this order.
FIELDS = (
    ("model_type", "Model type"),
    ("training_data", "Training data"),
    ("cohort_size", "Cohort size"),
    ("memorisation", "Memorisation and membership inference"),
    ("intended_use", "Intended use"),
)
#: A report is a page or two of prose; anything bigger is something else.
MAX_BYTES = 256 * 1024
JSON_SUFFIXES = (".json",)
MARKDOWN_SUFFIXES = (".md", ".markdown")

_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$")
_NUMBER = re.compile(r"\d[\d,\u202f\u00a0 ]*")


def _field_of_heading(title: str) -> str | None:
    """The field a Markdown heading introduces (British or American spelling alike)."""
    words = " ".join(title.lower().replace("-", " ").split())
    if words.startswith("model type"):
        return "model_type"
    if words.startswith("training data"):
        return "training_data"
    if words.startswith("cohort size"):
        return "cohort_size"
    if words.startswith(("memorisation", "memorization", "membership")):
        return "memorisation"
    if words.startswith("intended use"):
        return "intended_use"
    return None


def _markdown_fields(text: str) -> dict[str, str]:
    fields: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        match = _HEADING.match(line)
        if match:
            current = _field_of_heading(match.group(1))
            if current is not None:
                fields.setdefault(current, [])
            continue
        if current is not None:
            fields[current].append(line)
    return {key: "\n".join(lines).strip() for key, lines in fields.items()}


def _cohort_size(value, where: str) -> int:
    if isinstance(value, bool):
        value = None
    if isinstance(value, str):
        match = _NUMBER.search(value)
        value = int(re.sub(r"\D", "", match.group())) if match else None
    if not isinstance(value, int) or value < 1:
        raise InvalidInput(f"{where}: the cohort size must be a whole number of people "
                           "(at least 1)")
    return value


def _filled(key: str, value) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    # A JSON report may give the cohort size as a number; every other field is text.
    return key == "cohort_size" and value is not None and not isinstance(value, (dict, list))


def parse_risk_report(name: str, data: bytes) -> dict[str, str | int]:
    """The report's fields (``cohort_size`` as an int); :class:`InvalidInput` if it does not count.

    *name* (the file's name) picks the spelling: ``.json``, or ``.md``/``.markdown``.
    """
    lower = name.lower()
    if not lower.endswith(JSON_SUFFIXES + MARKDOWN_SUFFIXES):
        raise InvalidInput(f"disclosure-risk report {name}: write it as a .md or .json file "
                           "(see docs/airlock.md)")
    if len(data) > MAX_BYTES:
        raise InvalidInput(f"disclosure-risk report {name}: {len(data)} bytes, more than "
                           f"{MAX_BYTES}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidInput(f"disclosure-risk report {name}: not UTF-8 text") from None
    if lower.endswith(JSON_SUFFIXES):
        try:
            raw = json.loads(text)
        except ValueError:
            raise InvalidInput(f"disclosure-risk report {name}: not valid JSON") from None
        if not isinstance(raw, dict):
            raise InvalidInput(f"disclosure-risk report {name}: expected a JSON object with "
                               f"the keys {', '.join(k for k, _ in FIELDS)}")
        labels = {key: key for key, _ in FIELDS}
    else:
        raw = _markdown_fields(text)
        labels = {key: f"'## {heading}'" for key, heading in FIELDS}
    missing = [labels[key] for key, _ in FIELDS if not _filled(key, raw.get(key))]
    if missing:
        raise InvalidInput(f"disclosure-risk report {name} does not fill in "
                           f"{', '.join(missing)} (see docs/airlock.md)")
    fields: dict[str, str | int] = {key: raw[key].strip() for key, _ in FIELDS
                                    if key != "cohort_size"}
    fields["cohort_size"] = _cohort_size(raw["cohort_size"], f"disclosure-risk report {name}")
    return {key: fields[key] for key, _ in FIELDS}
