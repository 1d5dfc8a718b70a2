"""Identifiers in text: values of the datasets' screening indexes (in common spellings) and
direct identifiers found by the recognizers. Findings say where and what kind, never what."""

from __future__ import annotations

import hmac
import re
import unicodedata

from .index import KINDS, MIN_VALUE_CHARS, normalize_identifier
from .model import BLOCK, REVIEW, RULE_DATASET_IDENTIFIER, RULE_DIRECT_IDENTIFIER, Collector
from .recognizers import _DATE_IN_TEXT_RE, KIND_DESCRIPTIONS, find_identifiers, parse_date

KIND_WORDS = {"patient_id": "a patient identifier", "accession": "an accession number",
              "uid": "a DICOM UID", "date": "a date", "text": "header text"}

_TOKEN_RE = re.compile(r"[^\W_]+")
_MAX_VALUE_CHARS = 72  # longer candidates are not identifiers (UIDs are ≤64)
_MAX_RUN_TOKENS = 24  # a no-space run (a UID, a path) is also tried whole up to this length
_MONTHS = {m: i + 1 for i, m in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"))}
#: Text beyond this many characters (per piece) is screened in chunks of this size.
_CHUNK = 1 << 20


class IndexProbe:
    """Fast membership over one or more indexes for already-normalised values."""

    def __init__(self, indexes):
        self._indexes = list(indexes)
        self._fast = []
        for ix in self._indexes:
            hasher = getattr(ix, "_hasher", None)
            key = getattr(hasher, "_values", None)
            values = getattr(ix, "_values", None)
            if isinstance(key, bytes) and isinstance(values, dict) and \
                    hmac.digest(key, b"probe", "sha256")[:16].hex() == hasher.value("probe"):
                self._fast.append((key, values))
            else:
                self._fast.append(None)
        self._cache: dict[str, str | None] = {}

    def __bool__(self) -> bool:
        return bool(self._indexes)

    def kind(self, normalized: str) -> str | None:
        """The kind under which the normalised value is indexed (any index), or None."""
        try:
            return self._cache[normalized]
        except KeyError:
            pass
        found = None
        for ix, fast in zip(self._indexes, self._fast):
            if fast is None:
                found = ix.contains(normalized)
            else:
                digest = hmac.digest(fast[0], normalized.encode("utf-8"), "sha256")[:16].hex()
                found = next((k for k in KINDS if digest in fast[1][k]), None)
            if found:
                break
        self._cache[normalized] = found
        return found


_JOINERS = frozenset("-._/:")
_DECIMAL_RE = re.compile(r"[-+]?\d+(?:[.,]\d+)?(?:e[-+]?\d+)?%?", re.I)


def _numeric_candidate(raw: str, norm: str) -> str | None:
    """The normalised form of an all-digit candidate, or None when no index could hold it
    (a plain decimal number); dates become YYYYMMDD."""
    if raw[:2] in ("19", "20") or (len(raw) >= 8 and raw[-4:-2] in ("19", "20")):
        day = parse_date(raw)
        if day is not None:
            return f"{day:%Y%m%d}"
    if _DECIMAL_RE.fullmatch(raw) and not raw.isdigit():
        return None
    return norm


def _normalized(raw: str) -> str:
    """normalize_identifier for a candidate that is already NFKC: dates as YYYYMMDD."""
    if raw[:1].isdigit() and raw[:2] in ("19", "20") and parse_date(raw) is not None:
        return normalize_identifier(raw)
    return "".join(_TOKEN_RE.findall(raw)).casefold()


def _dates_in(text: str):
    """(start, end, YYYYMMDD candidates) for dates written with spaces or month names."""
    for m in _DATE_IN_TEXT_RE.finditer(text):
        s = m.group()
        if s.isdigit() and len(s) == 6:
            continue
        parts = re.findall(r"\d+|[A-Za-z]+", s)
        nums = [p for p in parts if p.isdigit()]
        words = [p for p in parts if not p.isdigit()]
        cands = []
        if words:
            month = _MONTHS.get(words[0][:3].lower())
            year = next((n for n in nums if len(n) == 4), None)
            day = next((n for n in nums if len(n) <= 2), None)
            if month and year and day:
                cands.append((int(year), month, int(day)))
        elif len(nums) == 3:
            a, b, c = (int(n) for n in nums)
            if len(nums[0]) == 4:
                cands.append((a, b, c))
            else:  # D/M/Y or M/D/Y: try both
                cands += [(c, b, a), (c, a, b)]
        out = [f"{y:04d}{mo:02d}{d:02d}" for y, mo, d in cands if 1 <= mo <= 12 and 1 <= d <= 31]
        if out:
            yield m.start(), m.end(), out


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def scan_dataset_identifiers(text: str, probe: IndexProbe, col: Collector, location: str,
                             *, lines: bool = True) -> None:
    """Block on any screening-index value in ``text`` (case and separators ignored)."""
    if not probe or not text:
        return
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    max_words = max(1, col.config.max_window_words)
    hits: dict[str, int] = {}

    def hit(kind: str, pos: int) -> None:
        hits.setdefault(kind, pos)

    tokens = [(m.start(), m.end()) for m in _TOKEN_RE.finditer(text)]
    n = len(tokens)
    # gap class after token i: 1 = a joiner (one of - . _ / :), 2 = a space, 0 = a break
    gaps = []
    for i in range(n - 1):
        gap = text[tokens[i][1]:tokens[i + 1][0]]
        if len(gap) == 1 and gap in _JOINERS:
            gaps.append(1)
        elif gap in (" ", "  ", "\t", ", ", "; "):
            gaps.append(2)
        else:
            gaps.append(0)
    gaps.append(0)
    kind_of = probe.kind
    words = [text[a:b] for a, b in tokens]
    folded = [w.casefold() for w in words]
    has_letter = [not w.isdigit() for w in words]
    for i in range(n):
        start = tokens[i][0]
        spaces = 0
        j = i
        norm = ""
        while True:
            norm += folded[j]
            if len(norm) > _MAX_VALUE_CHARS:
                break
            if len(norm) >= MIN_VALUE_CHARS:
                if norm.isdigit():
                    raw = text[start:tokens[j][1]]
                    candidate = _numeric_candidate(raw, norm)
                else:
                    candidate = norm
                if candidate:
                    kind = kind_of(candidate)
                    if kind:
                        hit(kind, start)
            g = gaps[j]
            if not g or j - i + 1 >= _MAX_RUN_TOKENS:
                break
            if g == 2:
                # IDs and header text written with spaces: words with letters only join
                if not (has_letter[j] and has_letter[j + 1]):
                    break
                spaces += 1
                if spaces >= max_words:
                    break
            j += 1
    for start, _end, candidates in _dates_in(text):
        for c in candidates:
            kind = probe.kind(c)
            if kind:
                hit(kind, start)
                break
    for kind, pos in hits.items():
        where = f"{location} line {_line_of(text, pos)}" if lines else location
        col.add(RULE_DATASET_IDENTIFIER, BLOCK, where,
                f"{KIND_WORDS.get(kind, kind)} of the dataset appears here")


def scan_direct_identifiers(text: str, col: Collector, location: str, *,
                            lines: bool = True) -> None:
    """Recognizers (RRN, phone, e-mail, date of birth, names): block or review by confidence."""
    if not text:
        return
    cfg = col.config
    for offset in range(0, len(text), _CHUNK):
        piece = text[offset:offset + _CHUNK + 64]
        for m in find_identifiers(piece, min_confidence=cfg.review_confidence):
            severity = BLOCK if m.confidence >= cfg.block_confidence else REVIEW
            pos = offset + m.start
            where = f"{location} line {_line_of(text, pos)}" if lines else location
            col.add(RULE_DIRECT_IDENTIFIER, severity, where,
                    f"looks like {KIND_DESCRIPTIONS.get(m.kind, m.kind)} "
                    f"(confidence {m.confidence:.2f})")


def scan_text(text: str, probe: IndexProbe, col: Collector, location: str) -> None:
    scan_dataset_identifiers(text, probe, col, location)
    scan_direct_identifiers(text, col, location)
