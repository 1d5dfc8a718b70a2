"""Identifiers in text: values of the datasets' screening indexes (in common spellings) and
direct identifiers found by the recognizers. Findings say where and what kind, never what."""

from __future__ import annotations

import bisect
import hmac
import re
import unicodedata

import numpy as np

from .index import KINDS, MIN_VALUE_CHARS, normalize_identifier
from .model import BLOCK, REVIEW, RULE_DATASET_IDENTIFIER, RULE_DIRECT_IDENTIFIER, Collector
from .recognizers import (_DATE_IN_TEXT_RE, KIND_DESCRIPTIONS, find_identifiers, parse_date,
                          texts_with_identifiers)

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
        #: Runs (see ``scan_dataset_identifiers``) known to hold no indexed value, per
        #: ``max_words``: a run seen again (a log's "val_loss", a table's labels) costs a
        #: set lookup.
        self.clean_runs: dict[int, set[str]] = {}
        #: What short texts seen before hold (see ``_MEMO_MAX_CHARS``), for this screen.
        self.memo: dict[tuple, object] = {}
        #: Texts in which neither text rule can find anything, per ``max_words`` (see
        #: :func:`prescreen`): ``scan_text`` returns at once for them.
        self.clean_texts: dict[int, set[str]] = {}

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


# ASCII byte classes for finding runs without a regex pass: token characters (letters and
# digits), one-character gaps (a joiner, a space, a tab), and the first characters of the
# two-character gaps ("  ", ", ", "; ").
_TOKEN_BYTES = np.array([chr(i).isascii() and chr(i).isalnum() for i in range(256)])
_GAP1_BYTES = np.array([chr(i) in "-._/: \t" for i in range(256)])
_GAP2_FIRST = np.array([chr(i) in " ,;" for i in range(256)])
#: Texts from this many characters on have their runs found by array operations.
_ARRAY_RUNS_MIN = 512
# Every date a candidate is made of holds a four-digit year (six digits alone are skipped)
# that starts the date (not after a digit or a dot), follows a space (month names), or
# ends a day and month written with separators; each test is far cheaper than the scan.
# (Both start with a character set, and so skip fast to where a year may be; the
# lookbehinds look back from the year.)
_YEAR_START_RE = re.compile(r"(?:19|20)(?<![\d.]\d\d)\d\d")
_YEAR_ENDING_RE = re.compile(
    r"[-./](?:19|20)(?:(?<=\d[-./]\d[-./]\d\d)|(?<=\d[-./]\d\d[-./]\d\d))\d\d")


# In ASCII text, the same tests first as substring searches over the bytes mapped to
# classes (digits as 0, - / as -, the dot kept, the rest as a space): four digits after a
# space or a - (or at the start), or a day and a month with separators before them.
_DATE_CLASSES = bytes(0x30 if chr(i).isdigit() else 0x2D if chr(i) in "-/" else
                      0x2E if chr(i) == "." else 0x20 for i in range(256))
_DATE_SHAPES = (b" 0000", b"-0000") + tuple(
    b"0" + a + month + b + b"0000" for a in (b".", b"-") for b in (b".", b"-")
    for month in (b"0", b"00"))


def _may_hold_date(text: str) -> bool:
    """False when ``text`` holds no date that ``_dates_in`` could yield (a necessary test)."""
    if not ("19" in text or "20" in text):
        return False
    if text.isascii():
        shapes = text.encode("ascii").translate(_DATE_CLASSES)
        if not (shapes.startswith(b"0000") or any(s in shapes for s in _DATE_SHAPES)):
            return False
    return bool(_YEAR_START_RE.search(text) or _YEAR_ENDING_RE.search(text))


def _long_runs(text: str) -> list[str]:
    """The runs of an ASCII ``text`` (as ``_RUN_RE`` finds them: tokens joined by exactly
    one gap of ``-._/:``, one or two spaces, a tab, ``, `` or ``; ``) that hold at least
    ``MIN_VALUE_CHARS`` token characters, found with array operations."""
    raw = np.frombuffer(b" " + text.encode("ascii") + b"  ", np.uint8)  # (padded)
    tok = _TOKEN_BYTES.take(raw)
    edges = np.flatnonzero(tok[1:] != tok[:-1])  # token i is raw[edges[2i]+1:edges[2i+1]+1]
    if not edges.size:
        return []
    starts, ends = edges[0::2], edges[1::2]  # (text offsets: the padding shifts by one)
    before = ends[:-1]
    gap = starts[1:] - before
    first = raw.take(before + 1)
    joined = ((gap == 1) & _GAP1_BYTES.take(first)) | (
        (gap == 2) & _GAP2_FIRST.take(first) & (raw.take(before + 2) == 0x20))
    cut = np.flatnonzero(~joined)  # a run ends at token k (and at the last token)
    tails = np.empty(cut.size + 1, np.intp)
    tails[:-1], tails[-1] = cut, starts.size - 1
    heads = np.empty(cut.size + 1, np.intp)
    heads[0], heads[1:] = 0, cut + 1
    lengths = ends - starts
    total = lengths.cumsum()
    long = np.flatnonzero(total[tails] - total[heads] + lengths[heads] >= MIN_VALUE_CHARS)
    if not long.size:
        return []
    return [text[a:b] for a, b in zip(starts[heads[long]].tolist(), ends[tails[long]].tolist())]


def _may_hold_value(value: str) -> bool:
    """Whether a run is long enough to hold an indexed value (else it is skipped whole)."""
    if len(value) < 12 and value.isascii():
        return len(value.translate(_NO_GAPS)) >= MIN_VALUE_CHARS
    # (casefold may lengthen a word: ß → ss)
    return len(value) >= MIN_VALUE_CHARS or len(value.casefold()) >= MIN_VALUE_CHARS


#: At most this many runs are remembered as clean per screen (then new ones are windowed).
_CLEAN_RUNS_MAX = 1 << 18


def _any_run_hits(text: str, probe: IndexProbe, max_words: int) -> bool:
    """Whether some run of an ASCII text may hold an indexed value: runs already known to
    hold none are skipped, the others are windowed once and remembered when clean."""
    clean = probe.clean_runs.setdefault(max_words, set())
    runs = _long_runs(text) if len(text) >= _ARRAY_RUNS_MIN else _RUN_RE.findall(text)
    for value in set(runs).difference(clean):
        if _may_hold_value(value):
            found: dict[str, int] = {}
            _scan_run(0, value, probe.kind, max_words, found)
            if found:
                return True
        if len(clean) < _CLEAN_RUNS_MAX:
            clean.add(value)
    return False


#: Texts up to this many characters (a cell's source, ``<Figure size …>``, a short table)
#: are screened once per screen however often they come again; their findings are the
#: same, at their own location.
_MEMO_MAX_CHARS = 4096
_MEMO_MAX_TEXTS = 1 << 16  # (then texts are screened each time, as before)


def _dataset_hits(text: str, probe: IndexProbe, max_words: int) -> dict[str, int]:
    """The first position of each kind of indexed value in an NFKC ``text``."""
    hits: dict[str, int] = {}
    # Candidates never cross a break between tokens, so only runs of tokens joined by a
    # joiner or a space are windowed; a run too short to hold an indexed value is skipped
    # whole (most numbers and words of a log or a table). An ASCII text whose runs hold
    # no indexed value (the usual case) is ruled out by the runs seen before and, when
    # long, by array operations; where one does, the positions come from the scan below.
    if not text.isascii() or _any_run_hits(text, probe, max_words):
        for run in _RUN_RE.finditer(text):
            value = run.group()
            if _may_hold_value(value):
                _scan_run(run.start(), value, probe.kind, max_words, hits)
    for start, _end, candidates in _dates_in(text) if _may_hold_date(text) else ():
        for c in candidates:
            kind = probe.kind(c)
            if kind:
                hits.setdefault(kind, start)
                break
    return hits


def scan_dataset_identifiers(text: str, probe: IndexProbe, col: Collector, location: str,
                             *, lines: bool = True) -> None:
    """Block on any screening-index value in ``text`` (case and separators ignored)."""
    if not probe or not text:
        return
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    max_words = max(1, col.config.max_window_words)
    if len(text) <= _MEMO_MAX_CHARS:
        key = ("dataset", max_words, text)
        hits = probe.memo.get(key)
        if hits is None:
            hits = _dataset_hits(text, probe, max_words)
            if len(probe.memo) < _MEMO_MAX_TEXTS:
                probe.memo[key] = hits
    else:
        hits = _dataset_hits(text, probe, max_words)
    for kind, pos in hits.items():
        where = f"{location} line {_line_of(text, pos)}" if lines else location
        col.add(RULE_DATASET_IDENTIFIER, BLOCK, where,
                f"{KIND_WORDS.get(kind, kind)} of the dataset appears here")


def scan_direct_identifiers(text: str, col: Collector, location: str, *,
                            lines: bool = True, memo: dict | None = None) -> None:
    """Recognizers (RRN, phone, e-mail, date of birth, names): block or review by confidence.
    ``memo`` (a dict kept for one screen) holds the matches of short texts seen before."""
    if not text:
        return
    cfg = col.config
    for offset in range(0, len(text), _CHUNK):
        piece = text[offset:offset + _CHUNK + 64]
        if memo is not None and len(piece) <= _MEMO_MAX_CHARS:
            key = ("direct", cfg.review_confidence, piece)
            matches = memo.get(key)
            if matches is None:
                matches = find_identifiers(piece, min_confidence=cfg.review_confidence)
                if len(memo) < _MEMO_MAX_TEXTS:
                    memo[key] = matches
        else:
            matches = find_identifiers(piece, min_confidence=cfg.review_confidence)
        for m in matches:
            severity = BLOCK if m.confidence >= cfg.block_confidence else REVIEW
            pos = offset + m.start
            where = f"{location} line {_line_of(text, pos)}" if lines else location
            col.add(RULE_DIRECT_IDENTIFIER, severity, where,
                    f"looks like {KIND_DESCRIPTIONS.get(m.kind, m.kind)} "
                    f"(confidence {m.confidence:.2f})")


# Characters outside ASCII that no text rule reads as a letter, a digit, white space, a
# separator or part of a name, and that NFKC leaves alone or spells in ASCII: the ellipsis
# (NFKC: "..."), box drawing and block elements (progress bars). A text with no other
# non-ASCII character is pre-screened as ASCII with them spelt "..." and "?".
_NOT_PLAIN_RE = re.compile("[^\x00-\x7f\u2026\u2500-\u259f]")
#: At most this many texts are remembered as clean per screen (then they are scanned).
_CLEAN_TEXTS_MAX = 1 << 20
#: Texts are pre-screened together up to about this many characters at a time.
_PRESCREEN_BATCH = 1 << 22


def prescreen(texts, probe: IndexProbe, config) -> None:
    """Find, in one pass over many texts joined (a notebook's cell sources and text
    outputs), those in which neither text rule can find anything, and remember them in
    ``probe.clean_texts``, so that :func:`scan_text` returns at once for each of them.

    Only necessary conditions are tested, located in the joined text and mapped back to
    the texts they lie in: the recognizers' (:func:`~.recognizers.texts_with_identifiers`),
    runs of tokens that may hold an indexed value (runs already known to be clean are
    skipped, the others are windowed once), and the year tests of the date scan. Texts are
    joined by a NUL character, which no rule reads as part of anything, so no run, shape
    or year spans two texts. A text that any condition marks, or that holds characters
    outside ASCII other than those of ``_NOT_PLAIN_RE``, is left to ``scan_text`` whole:
    its findings, their locations and lines are what they were. Findings never come from
    here."""
    max_words = max(1, config.max_window_words)
    clean = probe.clean_texts.setdefault(max_words, set())
    originals, spelt, size = [], [], 0
    for text in dict.fromkeys(texts):
        if not text or text in clean:
            continue
        if not text.isascii():
            if _NOT_PLAIN_RE.search(text):
                continue
            spelt.append(text.replace("\u2026", "...").encode("ascii", "replace").decode())
        else:
            spelt.append(text)
        originals.append(text)
        size += len(spelt[-1]) + 1
        if size >= _PRESCREEN_BATCH:  # (the array operations' memory stays bounded)
            _prescreen(originals, spelt, probe, max_words, clean)
            originals, spelt, size = [], [], 0
    if originals:
        _prescreen(originals, spelt, probe, max_words, clean)


def _prescreen(originals: list[str], spelt: list[str], probe: IndexProbe, max_words: int,
               clean: set[str]) -> None:
    """``prescreen`` of some texts (``spelt``: each in ASCII)."""
    joined = "\x00".join(spelt)
    starts, at = [], 0
    for text in spelt:
        starts.append(at)
        at += len(text) + 1
    marked = texts_with_identifiers(joined, starts)
    if probe:
        known = probe.clean_runs.setdefault(max_words, set())
        for value in set(_long_runs(joined)).difference(known):
            found: dict[str, int] = {}
            _scan_run(0, value, probe.kind, max_words, found)
            if found:
                marked.update(k for k, text in enumerate(spelt) if value in text)
            elif len(known) < _CLEAN_RUNS_MAX:
                known.add(value)
        if _may_hold_date(joined):
            for year in (_YEAR_START_RE, _YEAR_ENDING_RE):
                pos = 0
                while (m := year.search(joined, pos)) is not None:
                    k = bisect.bisect_right(starts, m.start()) - 1
                    marked.add(k)
                    pos = starts[k + 1] if k + 1 < len(starts) else len(joined)
    for k, text in enumerate(originals):
        if k not in marked and len(clean) < _CLEAN_TEXTS_MAX:
            clean.add(text)


def scan_text(text: str, probe: IndexProbe, col: Collector, location: str) -> None:
    clean = probe.clean_texts.get(max(1, col.config.max_window_words))
    if clean and text in clean:
        return
    scan_dataset_identifiers(text, probe, col, location)
    scan_direct_identifiers(text, col, location, memo=probe.memo)
