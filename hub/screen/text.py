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


# A run of tokens, each joined to the next by one joiner (- . _ / :) or a space (" ", "  ",
# a tab, ", " or "; "): the only places where a candidate spans several tokens.
_RUN_RE = re.compile(r"[^\W_]+(?:(?:[-._/:]|  ?|\t|, |; )[^\W_]+)*")
_NO_GAPS = str.maketrans("", "", "-._/: \t,;")  # a run's token characters, for its length


def _scan_run(offset: int, run: str, kind_of, max_words: int,
              hits: dict[str, int]) -> None:
    """Probe every candidate spelling inside one run: tokens joined whole, up to
    ``_MAX_RUN_TOKENS`` tokens and ``max_words`` words with letters joined by spaces."""
    tokens = [(m.start(), m.end()) for m in _TOKEN_RE.finditer(run)]
    n = len(tokens)
    if n == 1:
        norm = run.casefold()
        if MIN_VALUE_CHARS <= len(norm) <= _MAX_VALUE_CHARS:
            candidate = _numeric_candidate(run, norm) if norm.isdigit() else norm
            if candidate:
                kind = kind_of(candidate)
                if kind:
                    hits.setdefault(kind, offset)
        return
    # gap class after token i: 1 = a joiner, 2 = a space (the run has no other gaps)
    gaps = [1 if tokens[i][1] + 1 == tokens[i + 1][0] and run[tokens[i][1]] in _JOINERS else 2
            for i in range(n - 1)]
    gaps.append(0)
    words = [run[a:b] for a, b in tokens]
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
                    candidate = _numeric_candidate(run[start:tokens[j][1]], norm)
                else:
                    candidate = norm
                if candidate:
                    kind = kind_of(candidate)
                    if kind:
                        hits.setdefault(kind, offset + start)
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


def scan_dataset_identifiers(text: str, probe: IndexProbe, col: Collector, location: str,
                             *, lines: bool = True) -> None:
    """Block on any screening-index value in ``text`` (case and separators ignored)."""
    if not probe or not text:
        return
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    max_words = max(1, col.config.max_window_words)
    hits: dict[str, int] = {}
    # Candidates never cross a break between tokens, so only runs of tokens joined by a
    # joiner or a space are windowed; a run too short to hold an indexed value is skipped
    # whole (most numbers and words of a log or a table).
    for run in _RUN_RE.finditer(text):
        value = run.group()
        if len(value) < 12 and value.isascii():
            if len(value.translate(_NO_GAPS)) < MIN_VALUE_CHARS:
                continue
        elif len(value) < MIN_VALUE_CHARS and len(value.casefold()) < MIN_VALUE_CHARS:
            continue  # (casefold may lengthen a word: ß → ss)
        _scan_run(run.start(), value, probe.kind, max_words, hits)
    for start, _end, candidates in _dates_in(text):
        for c in candidates:
            kind = probe.kind(c)
            if kind:
                hits.setdefault(kind, start)
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
