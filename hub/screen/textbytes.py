"""Bytes written as text: base64 (one line, wrapped, or printed in pieces), hex strings and
hex dumps (``xxd``, ``hexdump -C``, ``bytes.hex(" ")``), Python ``bytes`` reprs, ``data:``
URIs, and long numeric dumps of pixel arrays (a printed ``tolist()``, an array printed with
the summarisation threshold raised, ``np.savetxt``, a printed DataFrame of pixel values).

What decodes is screened as what it is: a file of a known kind (DICOM, NumPy, PNG, zip …, by
content) through the caller's file screen; zlib-compressed bytes inflated first; raw pixel
bytes (``arr.tobytes()``) and numeric dumps that make a 2-D image are looked up in the
indexes' image fingerprints; UTF-8 text goes under the text rules. A long high-entropy run
that decodes to nothing the screen can read, and a long numeric dump that matches no dataset
image, are a ``review`` finding.

Speed: each character class (base64, numeric, spaced hex) is found by one ``bytes.translate``
and a literal search for its minimum run, so text without such runs costs a few passes at
memory speed; only the runs found are parsed."""

from __future__ import annotations

import binascii
import codecs
import math
import re
import urllib.parse
import zlib
from collections.abc import Callable

import numpy as np

from . import containers, embedded
from .model import BLOCK, REVIEW, RULE_DATASET_IMAGE, RULE_EMBEDDED_DATA, Collector

#: Character classes, as translation tables: a class character becomes ``a``, anything else
#: a space; a run of the class is then a run of ``a``.
_B64_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_"
_NUM_CHARS = b"0123456789.,+-eE[] \t\r\n;"
_HEX_CHARS = b"0123456789abcdefABCDEF :,-\t\r\n"


def _table(chars: bytes) -> bytes:
    return bytes(0x61 if i in chars else 0x20 for i in range(256))


_B64_TABLE, _NUM_TABLE, _HEX_TABLE = map(_table, (_B64_CHARS, _NUM_CHARS, _HEX_CHARS))
_MIN_TOKEN = 16  # a base64/hex token shorter than this is never part of a run
_MIN_NUMERIC_CHARS = 256  # a numeric run shorter than this is not parsed
_MIN_HEX_PAIRS = 32  # spaced hex pairs ("de ad be ef …") shorter than this are not decoded
_MIN_REPR_BYTES = 32  # a bytes repr decoding to fewer bytes is ordinary code
_JOIN_GAP = 12  # base64 pieces separated by at most this much white space and quotes join
_GAP_CHARS = b" \t\r\n'\"(),="
_HEXDIGITS = b"0123456789abcdefABCDEF"
_HASH_LENGTHS = (32, 40, 64, 128)  # md5, sha1, sha256, sha512 in hex
_MAX_LOOKUPS = 8  # image lookups per run (slices of a printed volume are sampled)
_MAX_DECODED = 64 << 20
_NL = b"\n"

_DUMP_START = re.compile(rb"\n[ \t]*(?:0x)?[0-9a-fA-F]{6,8}:?[ \t]+[0-9a-fA-F]{2}")
_DUMP_LINE = re.compile(rb"[ \t]*(?:0x)?([0-9a-fA-F]{6,8}):?[ \t]+"
                        rb"([0-9a-fA-F]{2,4}(?:[ \t]{1,2}[0-9a-fA-F]{2,4})*)")
_BYTES_START = re.compile(rb"(?<![\w'\"])b(['\"])")
_BYTES_NEXT = re.compile(rb"[ \t]*\r?\n?[ \t]*b(['\"])")
_BYTES_BODY = {q: re.compile(rb"(?:[^\\\n" + q + rb"]|\\.)*") for q in (b"'", b'"')}
_DATA_URI = re.compile(rb"data:[\w/+.-]*(?:;[\w.+-]+=[^;,\s\"'<>]*)*(;base64)?,")
_PERCENT_PAYLOAD = re.compile(rb"[^\s\"'<>)]*")
_NUMBER = re.compile(rb"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_ROW = re.compile(rb"\[([^\[\]]*)\]")
_HEX_PAIR_RUN = re.compile(rb"[0-9a-fA-F]{2}(?:[ :,\-\t\r\n]+[0-9a-fA-F]{2})+")


def _runs(classes: bytes, minimum: int):
    """(start, end) of each run of ``a`` at least ``minimum`` long in a class string."""
    needle = b"a" * minimum
    pos = classes.find(needle)
    while pos >= 0:
        end = classes.find(b" ", pos + minimum)
        if end < 0:
            end = len(classes)
        yield pos, end
        pos = classes.find(needle, end)


def _randomness(symbols: bytes, alphabet: int) -> float:
    """Shannon entropy of ``symbols`` over the most an alphabet of that size (or that many
    symbols) could have: about 1 for random base64/hex/bytes, lower for words and padding."""
    if not symbols:
        return 0.0
    counts = np.bincount(np.frombuffer(symbols[:1 << 16], np.uint8), minlength=256)
    p = counts[counts > 0] / min(len(symbols), 1 << 16)
    bits = float(-(p * np.log2(p)).sum())
    return bits / math.log2(max(2, min(alphabet, len(symbols))))


def _b64_decodings(s: bytes) -> list[bytes]:
    """``s`` (base64 or URL-safe base64, padding anywhere removed) at its four alignments."""
    s = s.replace(b"=", b"").translate(bytes.maketrans(b"-_", b"+/"))
    out = []
    for shift in range(4):
        t = s[shift:]
        t = t[:len(t) - 1] if len(t) % 4 == 1 else t + b"=" * (-len(t) % 4)
        if len(t) >= 4:
            try:
                out.append(binascii.a2b_base64(t))
            except (binascii.Error, ValueError):
                pass
    return out


def _hex_decodings(s: bytes) -> list[bytes]:
    out = []
    for shift in range(2):
        t = s[shift:]
        t = t[:len(t) - len(t) % 2]
        try:
            out.append(bytes.fromhex(t.decode("ascii")))
        except ValueError:
            pass
    return out


def _inflate(data: bytes, limit: int) -> bytes | None:
    """zlib-compressed bytes (``zlib.compress(arr.tobytes())``) inflated, within ``limit``."""
    if len(data) < 8 or data[0] & 0x0F != 8 or (data[0] << 8 | data[1]) % 31:
        return None
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, limit)
    except zlib.error:
        return None
    return out or None


def raw_images(data: bytes, min_side: int) -> list[tuple[str, np.ndarray]]:
    """Square images that raw pixel bytes (``arr.tobytes()``, no header) may hold: one per
    dtype whose item count is a square of at least ``min_side`` a side."""
    out = []
    for dtype in ("<u1", "<i2", "<u2", "<f4", "<i4", "<f8", ">i2", ">u2"):
        size = np.dtype(dtype).itemsize
        if len(data) % size:
            continue
        count = len(data) // size
        side = math.isqrt(count)
        if side * side != count or side < min_side:
            continue
        arr = np.frombuffer(data, dtype).reshape(side, side)
        if arr.dtype.kind == "f":
            if not np.isfinite(arr).all() or np.abs(arr).max() > 1e7:
                continue
            arr = arr.astype(np.float64)
        out.append((dtype, arr))
    return out


def numeric_matrices(run: bytes, min_side: int) -> tuple[int, list[np.ndarray]]:
    """(number of values, 2-D arrays) of a numeric dump: rows from the innermost brackets
    (``tolist()``, numpy printing; a volume gives one array per slice), else from lines
    (``np.savetxt``, CSV, a printed DataFrame: its header line and index column dropped),
    else a flat run reshaped to a square."""
    if b"[" in run:
        rows, breaks, last = [], [], None
        for m in _ROW.finditer(run):
            if last is not None and b"]" in run[last:m.start()]:
                breaks.append(len(rows))  # a new parent list: the next slice
            rows.append(_NUMBER.findall(m.group(1)))
            last = m.end()
        n = sum(map(len, rows))
        if len(rows) > 1:
            groups, start = [], 0
            for b in breaks + [len(rows)]:
                groups.append(rows[start:b])
                start = b
            return n, [m for g in groups for m in _matrix(g, min_side)]
        values = rows[0] if rows else _NUMBER.findall(run)
        return len(values), _square(values, min_side)
    lines = [_NUMBER.findall(line) for line in run.split(b"\n")]
    lines = [v for v in lines if v]
    n = sum(map(len, lines))
    if len(lines) >= 2:
        lines = _drop_frame_labels(lines)
        return n, _matrix(lines, min_side)
    return n, _square(lines[0] if lines else [], min_side)


def _consecutive(values: list[bytes], first: int | None = None) -> bool:
    if not all(v.isdigit() for v in values):
        return False
    ints = [int(v) for v in values]
    return (first is None or ints[0] == first) and ints == list(range(ints[0], ints[0] + len(ints)))


def _drop_frame_labels(lines: list[list[bytes]]) -> list[list[bytes]]:
    """A printed DataFrame: a header of column numbers and an index column 0, 1, 2 …"""
    if len(lines) >= 3 and _consecutive(lines[0]) and len(lines[1]) == len(lines[0]) + 1:
        body = lines[1:]
        if _consecutive([row[0] for row in body], 0):
            return [row[1:] for row in body]
    return lines


def _matrix(rows: list[list[bytes]], min_side: int) -> list[np.ndarray]:
    """The rows of the most common length (at least ``min_side`` of them) as one array."""
    if not rows:
        return []
    lengths = np.bincount([len(r) for r in rows])
    width = int(lengths.argmax())
    kept = [r for r in rows if len(r) == width]
    if width < min_side or len(kept) < min_side:
        if len(rows) == 1 or width < 2:
            return _square([v for r in rows for v in r], min_side)
        return []
    return [np.array(kept, dtype=np.float64)]


def _square(values: list[bytes], min_side: int) -> list[np.ndarray]:
    side = math.isqrt(len(values))
    if side < min_side:
        return []
    return [np.array(values[:side * side], dtype=np.float64).reshape(side, side)]


class TextBytes:
    """The rule over one text. ``screen_file(bytes, location) -> bool`` screens bytes of a
    known kind of file (False: not a kind it knows); ``scan_text(text, location)`` runs the
    text rules over decoded text."""

    def __init__(self, col: Collector, screen_file: Callable[[bytes, str], bool],
                 scan_text: Callable[[str, str], None]):
        self.col = col
        self.cfg = col.config
        self.screen_file = screen_file
        self.scan_text = scan_text

    # --- the pass over a text ---------------------------------------------------------

    def scan(self, text: str, where: str, *, skip_data_uris: bool = False,
             numeric_only: bool = False, depth: int = 0) -> None:
        """Every run of bytes written as text in ``text``. ``skip_data_uris``: the caller
        screened base64 ``data:`` URIs already; ``numeric_only``: numeric dumps alone (JSON,
        whose strings the caller scans)."""
        if len(text) < _MIN_TOKEN:
            return
        raw = text.encode("utf-8", "surrogatepass")
        self.raw, self.where, self.depth = raw, where, depth
        self._line_at = (0, 1)  # (position, its line number): lines are counted on from it
        covered: list[tuple[int, int]] = []
        if not numeric_only:
            skip = set()
            if b"data:" in raw:
                for m in _DATA_URI.finditer(raw):
                    if m.group(1):
                        if skip_data_uris:
                            skip.add(m.end())
                    else:
                        self._percent_uri(m)
            if b"\\x" in raw:
                covered += self._bytes_reprs()
            covered += self._dumps()
            covered += self._hex_pairs()
            covered += self._base64(skip)
        self._numeric(covered)

    def _loc(self, pos: int, form: str) -> str:
        at, line = self._line_at
        if pos < at:
            at, line = 0, 1
        line += self.raw.count(_NL, at, pos)
        self._line_at = (pos, line)
        return f"{self.where} line {line} ({form})"

    # --- base64 and hex strings -------------------------------------------------------

    def _base64(self, skip: set[int]) -> list[tuple[int, int]]:
        raw, covered = self.raw, []
        groups: list[list[tuple[int, int]]] = []
        for start, end in _runs(raw.translate(_B64_TABLE), _MIN_TOKEN):
            if groups:
                last = groups[-1][-1][1]
                gap = raw[last:start]
                if len(gap) <= _JOIN_GAP and not gap.strip(_GAP_CHARS) and start not in skip:
                    groups[-1].append((start, end))
                    continue
            groups.append([(start, end)])
        for group in groups:
            if group[0][0] in skip:
                continue
            pieces = [raw[s:e] for s, e in group]
            joined = b"".join(pieces)
            if len(joined) < self.cfg.min_base64_chars:
                continue
            start, end = group[0][0], group[-1][1]
            is_hex = not joined.translate(None, _HEXDIGITS)
            if is_hex and len(pieces) == 1 and len(joined) in _HASH_LENGTHS:
                continue  # one checksum: too short to be a file, and a hash is no leak
            form = "hex" if is_hex else "base64"
            decodings = _hex_decodings(joined) if is_hex else _b64_decodings(joined)
            if self._decoded(decodings, self._loc(start, form)):
                covered.append((start, end))
                continue
            hashes = is_hex and len(pieces) > 1 and all(len(p) in _HASH_LENGTHS for p in pieces)
            if not hashes and len(joined) >= self.cfg.text_bytes_review_chars and \
                    _randomness(joined, 16 if is_hex else 64) >= self.cfg.text_bytes_min_randomness:
                self._review_undecoded(start, form, len(joined))
                covered.append((start, end))
        return covered

    def _review_undecoded(self, start: int, form: str, chars: int) -> None:
        self.col.add(RULE_EMBEDDED_DATA, REVIEW, self._loc(start, form),
                     f"{chars} characters of {form} text that decode to nothing the screen "
                     "can read (bytes written as text?)")

    # --- hex dumps --------------------------------------------------------------------

    def _dumps(self) -> list[tuple[int, int]]:
        raw, covered, pos = self.raw, [], 0
        text = b"\n" + raw
        while True:
            m = _DUMP_START.search(text, pos)
            if m is None:
                return covered
            start = m.start()  # in raw: the start of the line (text has one more byte)
            data, end = self._dump_block(start)
            pos = end + 1
            if len(data) >= 16 and self._decoded([data], self._loc(start, "hex dump")):
                covered.append((start, end))
            elif len(data) * 2 >= self.cfg.text_bytes_review_chars and \
                    _randomness(data, 256) >= self.cfg.text_bytes_min_randomness:
                self._review_undecoded(start, "hex dump", len(data) * 2)
                covered.append((start, end))

    def _dump_block(self, start: int) -> tuple[bytes, int]:
        """The bytes of the hex dump whose first line starts at ``start`` (offsets say where
        each line goes; ``*`` repeats the line before, as hexdump and xxd -a write)."""
        raw = self.raw
        lines, pos, star = [], start, False
        while pos < len(raw):
            nl = raw.find(b"\n", pos)
            nl = len(raw) if nl < 0 else nl
            line = raw[pos:nl]
            if line.strip() == b"*":
                star = True
            else:
                m = _DUMP_LINE.match(line)
                if m is None:
                    break
                lines.append((int(m.group(1), 16), m.group(2), line[m.end():], star))
                star = False
            pos = nl + 1
        end = min(pos, len(raw))
        if not lines:
            return b"", end
        offsets = [o for o, *_ in lines]
        step = offsets[1] - offsets[0] if len(lines) > 1 else 0
        out = bytearray()
        previous = b""
        base = offsets[0]
        for i, (offset, hexpart, rest, starred) in enumerate(lines):
            digits = re.sub(rb"\s+", b"", hexpart)
            if i + 1 < len(lines) and 0 < step <= 64:
                digits = digits[:2 * step]
            else:  # the last line is padded before its text column
                cut = re.search(rb"[ \t]{3,}", hexpart)
                if cut:
                    digits = re.sub(rb"\s+", b"", hexpart[:cut.start()])
            try:
                chunk = bytes.fromhex(digits[:len(digits) - len(digits) % 2].decode("ascii"))
            except ValueError:
                break
            at = offset - base
            if at < len(out) or at > _MAX_DECODED:
                break
            if at > len(out):
                gap = at - len(out)
                fill = previous if starred and previous else b"\0"
                out += (fill * (gap // len(fill) + 1))[:gap]
            out += chunk
            previous = chunk
        return bytes(out), end

    def _hex_pairs(self) -> list[tuple[int, int]]:
        """``bytes.hex(" ")``, ``" ".join(f"{b:02x}" …)``, hexdump without offsets."""
        raw, covered = self.raw, []
        for start, end in _runs(raw.translate(_HEX_TABLE), 3 * _MIN_HEX_PAIRS - 1):
            for m in _HEX_PAIR_RUN.finditer(raw, start, end):
                tokens = re.split(rb"[ :,\-\t\r\n]+", m.group())
                if len(tokens) < _MIN_HEX_PAIRS or any(len(t) != 2 for t in tokens):
                    continue
                data = bytes.fromhex(b"".join(tokens).decode("ascii"))
                loc = self._loc(m.start(), "hex")
                if self._decoded([data], loc):
                    covered.append(m.span())
                    continue
                letters = any(c in b"abcdefABCDEF" for c in m.group())
                if letters and 2 * len(data) >= self.cfg.text_bytes_review_chars and \
                        _randomness(data, 256) >= self.cfg.text_bytes_min_randomness:
                    self._review_undecoded(m.start(), "hex", 2 * len(data))
                    covered.append(m.span())
        return covered

    # --- bytes reprs and percent-encoded data URIs ---------------------------------------

    def _bytes_reprs(self) -> list[tuple[int, int]]:
        raw, covered, pos = self.raw, [], 0
        while True:
            m = _BYTES_START.search(raw, pos)
            if m is None:
                return covered
            body, end = self._repr_body(m)
            pos = max(end, m.end())
            if body.count(b"\\x") < 8:
                continue
            try:
                data = codecs.escape_decode(body)[0]
            except (ValueError, UnicodeDecodeError):
                continue
            if len(data) < _MIN_REPR_BYTES:
                continue
            start = m.start()
            if self._decoded([data], self._loc(start, "bytes repr")):
                covered.append((start, end))
            elif len(body) >= self.cfg.text_bytes_review_chars and \
                    _randomness(data, 256) >= self.cfg.text_bytes_min_randomness:
                self._review_undecoded(start, "bytes repr", len(body))
                covered.append((start, end))

    def _repr_body(self, m) -> tuple[bytes, int]:
        """The escaped body of ``b'…'`` and of the literals that continue it: ``b'…'`` on the
        next lines (bytes printed in pieces) or a literal cut at a line's end."""
        raw, parts = self.raw, []
        quote, pos = m.group(1), m.end()
        for _ in range(1 << 16):
            bm = _BYTES_BODY[quote].match(raw, pos)
            parts.append(bm.group())
            pos = bm.end()
            if pos >= len(raw):
                break
            if raw[pos:pos + 1] == quote:
                pos += 1
                nxt = _BYTES_NEXT.match(raw, pos)
                if nxt is None:
                    break
                quote, pos = nxt.group(1), nxt.end()
                continue
            # cut at the end of a line: the literal goes on at the next non-blank character
            pos += 1
            while pos < len(raw) and raw[pos] in b" \t":
                pos += 1
            if not bm.group():
                break
        return b"".join(parts), pos

    def _percent_uri(self, m) -> None:
        payload = _PERCENT_PAYLOAD.match(self.raw, m.end())
        if len(payload.group()) < self.cfg.min_base64_chars or b"%" not in payload.group():
            return
        data = urllib.parse.unquote_to_bytes(payload.group())
        loc = self._loc(m.start(), "data URI")
        if not self._decoded([data], loc) and len(payload.group()) >= \
                self.cfg.text_bytes_review_chars and not _printable(data):
            self.col.add(RULE_EMBEDDED_DATA, REVIEW, loc,
                         "a data: URI of binary content the screen cannot read")

    # --- what decoded bytes are ---------------------------------------------------------

    def _decoded(self, decodings: list[bytes], where: str) -> bool:
        """True when one of ``decodings`` is something the screen reads (a known file, an
        image of the dataset's, or text; screened as such), else False."""
        for data in decodings:
            if self._known(data, where):
                return True
        limit = min(self.cfg.max_unpacked_bytes, _MAX_DECODED)
        for data in decodings:
            inflated = _inflate(data, limit)
            if inflated is not None and (self._known(inflated, f"{where} zlib")
                                         or self._raw_pixels(inflated, f"{where} zlib")):
                return True
        for data in decodings:
            if self._raw_pixels(data, where):
                return True
        for data in decodings[:1]:
            if _printable(data):
                text = data.decode("utf-8")
                self.scan_text(text, where)
                if self.depth < 2:
                    saved = self.raw, self.where, self.depth, self._line_at
                    self.scan(text, where, depth=self.depth + 1)
                    self.raw, self.where, self.depth, self._line_at = saved
                return True
        return False

    def _known(self, data: bytes, where: str) -> bool:
        if embedded.sniff(data) is not None:
            return self.screen_file(data, where)
        for start in containers.embedded_starts(data, 4):
            if start and embedded.sniff(data[start:]) is not None:
                return self.screen_file(data[start:], f"{where} at byte {start}")
        return False

    def _raw_pixels(self, data: bytes, where: str) -> bool:
        for dtype, arr in raw_images(data, self.cfg.numeric_dump_min_side):
            found = self._lookup(arr)
            if found:
                self.col.add(RULE_DATASET_IMAGE, BLOCK, where,
                             f"raw pixel bytes ({dtype}, {arr.shape[0]}×{arr.shape[1]}) of a "
                             f"dataset image ({found})")
                return True
        return False

    def _lookup(self, arr: np.ndarray) -> str | None:
        """How ``arr`` copies an indexed image, or None (the indexes' own lookup)."""
        if not np.isfinite(arr).all():
            arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
        indexes = [ix for ix in self.col.indexes if getattr(ix, "counts", {}).get("images", 1)]
        if not indexes:
            return None
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, user_api="blas"):  # BLAS threads only spin (see engine)
            candidates = [c for ix in indexes for c in ix.image_candidates(arr)[:1]]
        for best in candidates:
            how = "exact pixel copy" if best.exact else (
                f"detail correlation {best.detail_correlation:.2f}")
            return f"{best.ref}; {how}"
        return None

    # --- numeric dumps ------------------------------------------------------------------

    def _numeric(self, covered: list[tuple[int, int]]) -> None:
        raw, cfg = self.raw, self.cfg
        for start, end in _runs(raw.translate(_NUM_TABLE), _MIN_NUMERIC_CHARS):
            run = raw[start:end]
            if len(run) - len(run.translate(None, b"0123456789")) < 64:
                continue  # white space, rules of dashes
            if any(s < end and start < e and (min(end, e) - max(start, s)) * 2 > end - start
                   for s, e in covered):
                continue  # the digits of a hex dump or base64 already decoded
            n, matrices = numeric_matrices(run, cfg.numeric_dump_min_side)
            where = self._loc(start, "numeric dump")
            step = max(1, math.ceil(len(matrices) / _MAX_LOOKUPS))
            for arr in matrices[::step]:
                found = self._lookup(arr)
                if found:
                    self.col.add(RULE_DATASET_IMAGE, BLOCK, where,
                                 f"{arr.shape[0]}×{arr.shape[1]} numbers printed from a "
                                 f"dataset image ({found})")
                    break
            else:
                image_like = bool(matrices) or b"\n" not in run.strip() or b"[" in run
                if n >= cfg.numeric_dump_review_values and image_like:
                    shape = (f"{matrices[0].shape[0]}×{matrices[0].shape[1]}" if matrices
                             else "no 2-D shape")
                    self.col.add(RULE_EMBEDDED_DATA, REVIEW, where,
                                 f"a dump of {n} numbers ({shape}) that matches no dataset "
                                 "image: array data written as text?")


def _printable(data: bytes) -> bool:
    """UTF-8 text without control characters other than white space."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return not any(ord(c) < 32 and c not in "\t\r\n" for c in text[:4096])


def scan_text_bytes(text: str, col: Collector, where: str, screen_file, scan_text, *,
                    skip_data_uris: bool = False, numeric_only: bool = False) -> None:
    """The rule over ``text`` (see :class:`TextBytes`)."""
    TextBytes(col, screen_file, scan_text).scan(text, where, skip_data_uris=skip_data_uris,
                                                numeric_only=numeric_only)


__all__ = ["TextBytes", "numeric_matrices", "raw_images", "scan_text_bytes"]
