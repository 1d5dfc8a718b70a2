"""Where every byte of an image or a PDF is: the pixels, harmless markers, metadata, or
something after the end. Pure parsing (stdlib only): nothing is decoded to pixels here.

An image's layout says which of its bytes the pixel checks cannot see: metadata blocks
(text, EXIF, comments, application blocks), blocks the screen does not know, and bytes after
the format's end marker. A PDF's streams are decoded here (Flate, ASCIIHex, ASCII85, LZW,
RunLength) so that the text and embedded-data rules read what a viewer would show."""

from __future__ import annotations

import base64
import binascii
import re
import struct
import zlib
from dataclasses import dataclass, field

#: Severities, as in ``model`` (kept as plain strings to keep this module standalone).
REVIEW, BLOCK = "review", "block"


@dataclass
class Extra:
    """Bytes of an image the pixel checks do not see: ``label`` names the block (never its
    content); ``data`` is its payload, to be screened as text and for embedded files."""

    label: str
    data: bytes


@dataclass
class Layout:
    end: int  # the offset just after the format's end marker
    extras: list[Extra] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (severity, detail)

    def trailer(self, data: bytes) -> bytes:
        return data[self.end:]


# --- PNG -----------------------------------------------------------------------------------

#: Chunks that only say how to show the pixels: fixed, small and free of text.
PNG_HARMLESS = {b"pHYs": 9, b"gAMA": 4, b"cHRM": 32, b"sRGB": 1, b"tIME": 7, b"bKGD": 6,
                b"tRNS": 256 * 2, b"sBIT": 4, b"hIST": 512}
PNG_CRITICAL = (b"IHDR", b"PLTE", b"IDAT", b"IEND")
#: tEXt keywords whose short printable value is harmless (matplotlib writes ``Software``).
PNG_TEXT_KEYS = ("Software", "Creation Time", "Title")
PNG_TEXT_MAX = 120
#: An embedded ICC profile (iCCP) is harmless when it is a well-formed profile this small.
ICC_MAX_BYTES = 64 * 1024
_PRINTABLE = re.compile(rb"[\x20-\x7e]*")


def _inflate(data: bytes, limit: int) -> bytes | None:
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error:
        return None
    if len(out) > limit or not d.eof:
        return None
    return out


def _icc_ok(profile: bytes | None) -> bool:
    return (profile is not None and len(profile) >= 132 and profile[36:40] == b"acsp"
            and struct.unpack(">I", profile[:4])[0] == len(profile))


def png_layout(data: bytes, *, max_text_bytes: int,
               text_keys: tuple[str, ...] = PNG_TEXT_KEYS) -> Layout:
    pos, n = 8, len(data)
    out = Layout(end=n)
    seen_idat = idat_done = False
    while True:
        if pos + 12 > n:
            out.problems.append((BLOCK, "a PNG that ends before its IEND chunk"))
            out.end = n
            return out
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if length > n - pos - 12:
            out.problems.append((BLOCK, "a PNG chunk longer than the file"))
            out.end = n
            return out
        name = ctype.decode("latin-1")
        if not name.isalpha() or not name.isascii():
            out.problems.append((BLOCK, "a PNG chunk with a malformed type"))
            out.end = n
            return out
        pos += 12 + length
        if ctype == b"IDAT":
            if idat_done:
                out.problems.append((REVIEW, "PNG image data split by other chunks"))
            seen_idat = True
            continue
        if seen_idat:
            idat_done = True
        if ctype == b"IEND":
            out.end = pos
            return out
        if ctype in PNG_CRITICAL:
            continue
        if ctype in PNG_HARMLESS and length <= PNG_HARMLESS[ctype]:
            continue
        if ctype == b"tEXt":
            key, _, value = body.partition(b"\x00")
            if key.decode("latin-1") in text_keys and len(value) <= PNG_TEXT_MAX \
                    and _PRINTABLE.fullmatch(value):
                out.extras.append(Extra("", body))  # harmless, still read by the text rules
                continue
            out.extras.append(Extra(f"PNG text chunk (tEXt {_key(key)})", value))
            continue
        if ctype == b"zTXt":
            key, _, rest = body.partition(b"\x00")
            text = _inflate(rest[1:], max_text_bytes)
            if text is None:
                out.problems.append((REVIEW, f"a compressed PNG text chunk (zTXt {_key(key)}) "
                                             "the screen cannot decompress"))
                text = rest[1:]
            out.extras.append(Extra(f"PNG compressed text chunk (zTXt {_key(key)})", text))
            continue
        if ctype == b"iTXt":
            key, _, rest = body.partition(b"\x00")
            compressed = rest[:1] == b"\x01"
            rest = rest[2:]
            _lang, _, rest = rest.partition(b"\x00")
            _tkey, _, text = rest.partition(b"\x00")
            if compressed:
                inflated = _inflate(text, max_text_bytes)
                if inflated is None:
                    out.problems.append((REVIEW, f"a compressed PNG text chunk (iTXt "
                                                 f"{_key(key)}) the screen cannot decompress"))
                else:
                    text = inflated
            out.extras.append(Extra(f"PNG international text chunk (iTXt {_key(key)})",
                                    _lang + b"\n" + _tkey + b"\n" + text))
            continue
        if ctype == b"iCCP":
            _key_, _, rest = body.partition(b"\x00")
            profile = _inflate(rest[1:], ICC_MAX_BYTES)
            if _icc_ok(profile):
                out.extras.append(Extra("", profile))  # harmless; searched for files only
                continue
            out.extras.append(Extra("a PNG colour profile (iCCP) that is not a small, "
                                    "well-formed ICC profile", profile or rest))
            continue
        if ctype == b"eXIf":
            out.extras.append(Extra("PNG EXIF metadata (eXIf)", body))
            continue
        label = "an animated PNG's frames (not screened)" if ctype in (b"acTL", b"fcTL", b"fdAT") \
            else f"a PNG chunk the screen does not know ({name})"
        out.extras.append(Extra(label, body))


def _key(key: bytes) -> str:
    text = key[:40].decode("latin-1")
    return repr(text) if text.isprintable() else "with an unprintable keyword"


# --- JPEG ----------------------------------------------------------------------------------

_JPEG_MARKER = re.compile(rb"\xff[\x01-\xcf\xd8-\xfe]")  # not stuffing, fill or a restart
_JPEG_STANDALONE = set(range(0xD0, 0xD8)) | {0x01, 0xD8}
_JPEG_STRUCTURE = {0xC4, 0xCC, 0xDB, 0xDD, 0xDC, 0xDE, 0xDF} | {
    m for m in range(0xC0, 0xD0) if m not in (0xC4, 0xC8, 0xCC)}


def jpeg_layout(data: bytes) -> Layout:
    n = len(data)
    out = Layout(end=n)
    pos = 2
    while True:
        while pos < n and data[pos] == 0xFF and pos + 1 < n and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes
        if pos + 2 > n or data[pos] != 0xFF:
            out.problems.append((BLOCK, "a JPEG that ends before its end marker (or whose "
                                        "segments cannot be followed)"))
            return out
        marker = data[pos + 1]
        if marker == 0xD9:
            out.end = pos + 2
            return out
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if pos + 4 > n:
            out.problems.append((BLOCK, "a JPEG segment cut short"))
            return out
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        body = data[pos + 4:pos + 2 + length]
        if length < 2 or pos + 2 + length > n:
            out.problems.append((BLOCK, "a JPEG segment longer than the file"))
            return out
        pos += 2 + length
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next marker
            m = _JPEG_MARKER.search(data, pos)
            if m is None:
                out.problems.append((BLOCK, "a JPEG scan without an end marker"))
                return out
            pos = m.start()
            continue
        if marker in _JPEG_STRUCTURE:
            continue
        if marker == 0xE0 and body[:5] == b"JFIF\x00" and length == 16 and body[12:14] == b"\0\0":
            continue  # JFIF header without a thumbnail
        if marker == 0xEE and body[:5] == b"Adobe" and length == 14:
            continue  # Adobe colour-transform marker
        if marker == 0xE2 and body[:12] == b"ICC_PROFILE\x00" and body[12:14] == b"\x01\x01" \
                and len(body) - 14 <= ICC_MAX_BYTES and _icc_ok(body[14:]):
            out.extras.append(Extra("", body[14:]))  # one small well-formed ICC profile
            continue
        if marker == 0xFE:
            out.extras.append(Extra("a JPEG comment (COM)", body))
        elif 0xE0 <= marker <= 0xEF:
            ident = body[:body.find(b"\x00")] if b"\x00" in body[:32] else b""
            what = ident.decode("latin-1") if ident and ident.isascii() and \
                ident.decode().isprintable() else "?"
            out.extras.append(Extra(f"JPEG application data (APP{marker - 0xE0} {what!r})",
                                    body))
        else:
            out.extras.append(Extra(f"a JPEG segment the screen does not know "
                                    f"(0xFF{marker:02X})", body))


# --- GIF -----------------------------------------------------------------------------------

def _sub_blocks(data: bytes, pos: int) -> tuple[bytes, int]:
    """The concatenated data sub-blocks from ``pos`` and the offset after their terminator;
    raises IndexError when the file ends first."""
    parts = []
    while True:
        size = data[pos]
        if size == 0:
            return b"".join(parts), pos + 1
        if pos + 1 + size > len(data):
            raise IndexError
        parts.append(data[pos + 1:pos + 1 + size])
        pos += 1 + size


def gif_layout(data: bytes) -> Layout:
    n = len(data)
    out = Layout(end=n)
    try:
        flags = data[10]
        pos = 13 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0)
        while True:
            block = data[pos]
            if block == 0x3B:
                out.end = pos + 1
                return out
            if block == 0x2C:  # image descriptor, local colour table, LZW data
                flags = data[pos + 9]
                pos += 10 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0)
                _, pos = _sub_blocks(data, pos + 1)
                continue
            if block != 0x21:
                out.problems.append((BLOCK, "a GIF block the screen does not know"))
                return out
            label = data[pos + 1]
            body, pos = _sub_blocks(data, pos + 2)
            if label == 0xF9 and len(body) == 4:  # graphic control: delay, transparency
                continue
            if label == 0xFF and body[:11] in (b"NETSCAPE2.0", b"ANIMEXTS1.0") and \
                    len(body) == 14 and body[11] == 1:
                continue  # the loop count of an animation
            what = {0xFE: "a GIF comment extension", 0x01: "a GIF plain-text extension",
                    0xFF: "a GIF application extension"}.get(
                label, f"a GIF extension the screen does not know (0x{label:02X})")
            out.extras.append(Extra(what, body))
    except IndexError:
        out.problems.append((BLOCK, "a GIF that ends before its trailer"))
        return out


def image_layout(kind: str, data: bytes, *, max_text_bytes: int,
                 text_keys: tuple[str, ...] = PNG_TEXT_KEYS) -> Layout:
    if kind == "png":
        return png_layout(data, max_text_bytes=max_text_bytes, text_keys=text_keys)
    if kind == "jpeg":
        return jpeg_layout(data)
    return gif_layout(data)


# --- files hidden anywhere in a payload -----------------------------------------------------

_MAGIC = re.compile(rb"DICM|PK\x03\x04|\x1f\x8b\x08|\x93NUMPY|\x89HDF\r\n|n\+1\x00|ni1\x00|"
                    rb"\x89PNG\r\n|%PDF-|BZh[1-9]1AY|\xfd7zXZ\x00|7z\xbc\xaf|Rar!\x1a")
_SHIFT = {b"DICM": 128, b"n+1\x00": 344, b"ni1\x00": 344}


def embedded_starts(data: bytes, limit: int = 32) -> list[int]:
    """Offsets where a file (DICOM, zip, gzip, NumPy, HDF5, NIfTI, PNG, PDF, bzip2, xz, 7z,
    rar) may start inside ``data``, by magic bytes; at most ``limit``."""
    out = []
    for m in _MAGIC.finditer(data):
        start = m.start() - _SHIFT.get(m.group(), 0)
        if start >= 0:
            out.append(start)
            if len(out) >= limit:
                break
    return out


_RUNS = re.compile(rb"[\x20-\x7e\t\r\n]{6,}")


def readable_text(data: bytes) -> str:
    """What the text rules read of a payload: UTF-8 text as it is; of binary, its runs of at
    least 6 printable ASCII characters (as ``strings`` shows them), so that compressed or
    pixel bytes read as Latin-1 never look like a name or a number."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "\n".join(m.group().decode("ascii") for m in _RUNS.finditer(data))
    if "\x00" in text:
        return "\n".join(m.group().decode("ascii") for m in _RUNS.finditer(data))
    return text


_B64_RUN = re.compile(rb"[A-Za-z0-9+/=\r\n \t]{64,}")
_B64_TOKEN = re.compile(rb"[A-Za-z0-9+/]{64,}={0,2}")


def base64_runs(data: bytes, limit: int = 16) -> list[bytes]:
    """Bytes decoded from base64 in ``data``: each unbroken token of at least 64 base64
    characters, and each longer run that spans lines or spaces, tried at its four
    alignments (text glued in front of it shifts where the base64 starts)."""
    out = []

    def decode(run: bytes) -> None:
        run = run[:len(run) - len(run) % 4]
        try:
            out.append(base64.b64decode(run))
        except (binascii.Error, ValueError):
            pass

    for m in _B64_TOKEN.finditer(data):
        decode(m.group())
        if len(out) >= limit:
            return out
    for m in _B64_RUN.finditer(data):
        run = re.sub(rb"[\s=]", b"", m.group())
        if len(run) < 64 or _B64_TOKEN.fullmatch(m.group()):
            continue
        for shift in range(4):
            decode(run[shift:])
        if len(out) >= limit:
            break
    return out


# --- PDF -----------------------------------------------------------------------------------

class DecodeError(Exception):
    """A stream the screen cannot decode; the message names the filter."""


class Budget:
    """The bytes that decoding may still produce (a decompression bomb stops here)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.left = limit

    def take(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise OverflowError


def _flate(data: bytes, budget: Budget) -> bytes:
    d = zlib.decompressobj()
    out = bytearray()
    try:
        chunk = d.decompress(data, 1 << 20)
        while True:
            budget.take(len(chunk))
            out += chunk
            if not d.unconsumed_tail:
                break
            chunk = d.decompress(d.unconsumed_tail, 1 << 20)
        tail = d.flush()
    except zlib.error:
        raise DecodeError("FlateDecode") from None
    budget.take(len(tail))
    out += tail
    if not d.eof and not out:
        raise DecodeError("FlateDecode")
    return bytes(out)


def _ascii_hex(data: bytes) -> bytes:
    text = re.sub(rb"\s", b"", data).split(b">", 1)[0]
    if len(text) % 2:
        text += b"0"
    try:
        return binascii.unhexlify(text)
    except (binascii.Error, ValueError):
        raise DecodeError("ASCIIHexDecode") from None


def _ascii85(data: bytes) -> bytes:
    text = re.sub(rb"\s", b"", data)
    if text.startswith(b"<~"):
        text = text[2:]
    text = text.split(b"~>", 1)[0]
    try:
        return base64.a85decode(text)
    except (ValueError, binascii.Error):
        raise DecodeError("ASCII85Decode") from None


def _lzw(data: bytes, budget: Budget) -> bytes:
    out = bytearray()
    table = [bytes([i]) for i in range(256)] + [b"", b""]
    bits, width, buf, prev = 0, 9, 0, None
    for byte in data:
        buf = (buf << 8) | byte
        bits += 8
        while bits >= width:
            bits -= width
            code = (buf >> bits) & ((1 << width) - 1)
            buf &= (1 << bits) - 1
            if code == 256:
                table, width, prev = table[:258], 9, None
                continue
            if code == 257:
                return bytes(out)
            if code < len(table):
                entry = table[code]
                if prev is not None:
                    table.append(prev + entry[:1])
            elif prev is not None and code == len(table):
                entry = prev + prev[:1]
                table.append(entry)
            else:
                raise DecodeError("LZWDecode")
            budget.take(len(entry))
            out += entry
            prev = entry
            if len(table) + 1 >= (1 << width) and width < 12:  # early change
                width += 1
    return bytes(out)


def _run_length(data: bytes, budget: Budget) -> bytes:
    out = bytearray()
    pos, n = 0, len(data)
    while pos < n:
        length = data[pos]
        if length == 128:
            break
        if length < 128:
            piece = data[pos + 1:pos + 2 + length]
            pos += 2 + length
        else:
            piece = data[pos + 1:pos + 2] * (257 - length)
            pos += 2
        budget.take(len(piece))
        out += piece
    return bytes(out)


_FILTER_NAMES = {"AHx": "ASCIIHexDecode", "A85": "ASCII85Decode", "LZW": "LZWDecode",
                 "Fl": "FlateDecode", "RL": "RunLengthDecode", "DCT": "DCTDecode"}


def decode_stream(raw: bytes, filters: list[str], budget: Budget) -> bytes:
    """``raw`` through ``filters`` in order; DCTDecode must be last and leaves a JPEG as it
    is. DecodeError for any other filter (JPX, JBIG2, CCITTFax, Crypt) or broken data;
    OverflowError when the budget runs out."""
    data = raw
    for i, name in enumerate(filters):
        name = _FILTER_NAMES.get(name, name)
        if name == "FlateDecode":
            data = _flate(data, budget)
        elif name == "ASCIIHexDecode":
            data = _ascii_hex(data)
        elif name == "ASCII85Decode":
            data = _ascii85(data)
        elif name == "LZWDecode":
            data = _lzw(data, budget)
        elif name == "RunLengthDecode":
            data = _run_length(data, budget)
        elif name == "DCTDecode" and i == len(filters) - 1:
            return data
        else:
            raise DecodeError(name)
    return data


_STREAM = re.compile(rb"stream(?:\r\n|\n|\r)")
_OBJ = re.compile(rb"\d+\s+\d+\s+obj\b")
_FILTER = re.compile(rb"/Filter\s*(\[[^\]]*\]|/[^\s/\[\]<>()]+)")
_NAME = re.compile(rb"/([^\s/\[\]<>()]+)")
_LENGTH = re.compile(rb"/Length\s+(\d+)\b(?!\s+\d+\s+R)")


@dataclass
class Stream:
    number: int
    dictionary: bytes
    start: int
    end: int  # of the raw data, before ``endstream``
    filters: list[str]

    @property
    def is_image(self) -> bool:
        return re.search(rb"/Subtype\s*/Image\b", self.dictionary) is not None

    @property
    def is_attachment(self) -> bool:
        return re.search(rb"/Type\s*/EmbeddedFile\b", self.dictionary) is not None


def pdf_streams(data: bytes) -> list[Stream]:
    out = []
    pos = 0
    for m in _STREAM.finditer(data):
        if m.start() < pos:
            continue
        head = data[max(0, m.start() - 4096):m.start()]
        if not head.rstrip().endswith(b">>"):
            continue  # the word "stream" in text, not a stream keyword
        objs = list(_OBJ.finditer(head))
        dictionary = head[objs[-1].end():] if objs else head
        start = m.end()
        end = -1
        length = _LENGTH.search(dictionary)
        if length:
            end = start + int(length.group(1))
            if not re.match(rb"\s*endstream", data[end:end + 32]):
                end = -1
        if end < 0:
            end = data.find(b"endstream", start)
            if end < 0:
                end = len(data)
            while end > start and data[end - 1:end] in (b"\n", b"\r"):
                end -= 1
        f = _FILTER.search(dictionary)
        filters = [n.decode("latin-1") for n in _NAME.findall(f.group(1))] if f else []
        out.append(Stream(len(out) + 1, dictionary, start, end, filters))
        pos = end
    return out


def _number(pattern: bytes, dictionary: bytes) -> int | None:
    m = re.search(pattern, dictionary)
    return int(m.group(1)) if m else None


def _png_chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(
        ">I", zlib.crc32(ctype + body) & 0xFFFFFFFF)


def pdf_image_png(stream: Stream, pixels: bytes) -> bytes | None:
    """An image XObject's decoded pixels as a PNG, for the pixel checks: 8 bits per
    component, DeviceGray, DeviceRGB or Indexed over DeviceRGB with the palette inline (what
    matplotlib writes), with or without PNG predictors; None for anything else."""
    d = stream.dictionary
    width = _number(rb"/Width\s+(\d+)", d)
    height = _number(rb"/Height\s+(\d+)", d)
    if _number(rb"/BitsPerComponent\s+(\d+)", d) != 8 or not width or not height:
        return None
    palette = b""
    if re.search(rb"/ColorSpace\s*/DeviceGray", d):
        ctype, colors = 0, 1
    elif re.search(rb"/ColorSpace\s*/DeviceRGB", d):
        ctype, colors = 2, 3
    else:
        m = re.search(rb"/ColorSpace\s*\[\s*/Indexed\s*/DeviceRGB\s+(\d+)\s*", d)
        token = _LITERAL.match(d, m.end()) if m else None
        if token is None or token.group(1) is not None:
            return None
        palette = _literal(token.group())[:3 * (int(m.group(1)) + 1)]
        if not palette or len(palette) % 3:
            return None
        ctype, colors = 3, 1
    row = width * colors
    if (_number(rb"/Predictor\s+(\d+)", d) or 1) >= 10:
        if len(pixels) < height * (row + 1):
            return None
        filtered = pixels[:height * (row + 1)]
    else:
        if len(pixels) < height * row:
            return None
        filtered = b"".join(b"\0" + pixels[r * row:(r + 1) * row] for r in range(height))
    return (b"\x89PNG\r\n\x1a\n"
            + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, ctype, 0, 0, 0))
            + (_png_chunk(b"PLTE", palette) if palette else b"")
            + _png_chunk(b"IDAT", zlib.compress(filtered, 1)) + _png_chunk(b"IEND", b""))


def pdf_skeleton(data: bytes, streams: list[Stream]) -> bytes:
    """The PDF up to its last ``%%EOF`` without its streams' data: objects, dictionaries,
    xref, trailer."""
    last = data.rfind(b"%%EOF")
    data = data[:last] if last >= 0 else data
    pieces, done = [], 0
    for s in streams:
        pieces.append(data[done:s.start])
        done = s.end
    pieces.append(data[done:])
    return b"\n".join(pieces)


def pdf_after_end(data: bytes) -> bytes:
    """Bytes after the last ``%%EOF`` other than white space (an appended file)."""
    end = data.rfind(b"%%EOF")
    if end < 0:
        return b""
    rest = data[end + 5:]
    return rest if rest.strip(b"\r\n\t \x00") else b""


_STRING_OPS = re.compile(rb"(\[(?:[^\]\\]|\\.)*\]\s*TJ|\((?:[^()\\]|\\.|\((?:[^()\\]|\\.)*\))*\)"
                         rb"\s*(?:Tj|'|\"))|(BT\b|ET\b)", re.S)
_LITERAL = re.compile(rb"\((?:[^()\\]|\\.|\((?:[^()\\]|\\.)*\))*\)|<[0-9A-Fa-f\s]*>|"
                      rb"(-?\d+(?:\.\d*)?)", re.S)
_ESCAPES = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"b": b"\b", b"f": b"\f"}


def _literal(token: bytes) -> bytes:
    if token[:1] == b"<":
        hexdigits = re.sub(rb"\s", b"", token[1:-1])
        try:
            return binascii.unhexlify(hexdigits + b"0" * (len(hexdigits) % 2))
        except binascii.Error:
            return b""
    body = token[1:-1]

    def unescape(m):
        c = m.group(1)
        if c[:1].isdigit():
            return bytes([int(c, 8) & 0xFF])
        return _ESCAPES.get(c, c if c != b"\n" else b"")

    return re.sub(rb"\\([0-7]{1,3}|.)", unescape, body, flags=re.S)


def content_text(stream: bytes) -> str:
    """The strings a content stream shows (``Tj``, ``TJ``, ``'``, ``"``), joined as a viewer
    would: the pieces of one ``TJ`` array together (small kerning numbers dropped, a large
    gap as a space), one line per text object."""
    if b"T" not in stream:
        return ""
    lines, line = [], []
    for m in _STRING_OPS.finditer(stream):
        if m.group(2):
            if line:
                lines.append(b"".join(line))
                line = []
            continue
        for t in _LITERAL.finditer(m.group(1)):
            if t.group(1) is not None:
                if float(t.group(1)) < -200:
                    line.append(b" ")
                continue
            line.append(_literal(t.group()))
    if line:
        lines.append(b"".join(line))
    return b"\n".join(lines).decode("latin-1")


__all__ = ["Budget", "DecodeError", "Extra", "Layout", "Stream", "base64_runs", "content_text",
           "decode_stream", "embedded_starts", "image_layout", "pdf_after_end", "pdf_image_png",
           "pdf_skeleton",
           "pdf_streams", "readable_text"]
