"""Jupyter notebooks: every cell source, output, attachment, widget state and metadata,
and base64 strings decoded to look for embedded data and images."""

from __future__ import annotations

import base64
import binascii
import json
import re

from . import embedded
from .model import BLOCK, REVIEW, RULE_EMBEDDED_DATA, RULE_MALFORMED, Collector
from .tables import check_table, html_tables, text_tables
from .text import prescreen, scan_text
from .textbytes import scan_text_bytes

_IMAGE_MIMES = ("image/png", "image/jpeg", "image/gif")
_B64_RE = re.compile(r"[A-Za-z0-9+/\s]+={0,2}\s*")
_DATA_URI_RE = re.compile(r"data:[\w/+.-]*(?:;[\w.+-]+=[^;,\s\"'<>]*)*;base64,"
                          r"([A-Za-z0-9+/=\s]{16,})")
_B64_SEGMENT_RE = re.compile(r"[A-Za-z0-9+/]*={0,2}")
#: How each image format ends: a payload with more in it than one image is read as text too.
_IMAGE_ENDS = {embedded.PNG: b"IEND\xaeB`\x82", embedded.JPEG: b"\xff\xd9", embedded.GIF: b";"}


def _text(value) -> str:
    if isinstance(value, list):
        return "".join(v if isinstance(v, str) else json.dumps(v) for v in value)
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


_TEXT_MIMES = ("text/html", "text/plain", "text/markdown", "text/latex", "image/svg+xml")


def _texts(cells: list) -> list[str]:
    """The texts that the walk hands to the text rules most often (cell sources, streams,
    text outputs), gathered ahead so that they are pre-screened together (see
    :func:`~.text.prescreen`)."""
    out = []
    for cell in cells:
        if not isinstance(cell, dict):
            continue
        out.append(_text(cell.get("source", "")))
        outputs = cell.get("outputs")
        for output in outputs if isinstance(outputs, list) else ():
            if not isinstance(output, dict):
                continue
            if output.get("output_type") == "stream":
                out.append(_text(output.get("text", "")))
                continue
            data = output.get("data")
            if isinstance(data, dict):
                out += [_text(value) for mime, value in data.items() if mime in _TEXT_MIMES]
    return out


def _b64(value: str) -> bytes | None:
    try:
        return base64.b64decode(value, validate=False)
    except (binascii.Error, ValueError):
        return None


class NotebookScreen:
    def __init__(self, col: Collector, probe, screen_nested):
        self.col = col
        self.probe = probe
        self.screen_nested = screen_nested  # (bytes, location, name, only_known) -> bool
        self._streams: dict | None = None  # a cell's stream texts, read as one for text bytes

    def run(self, text: str) -> None:
        col = self.col
        try:
            nb = json.loads(text)
        except (ValueError, RecursionError) as err:
            col.add(RULE_MALFORMED, BLOCK, "notebook", f"not valid JSON ({type(err).__name__})")
            scan_text(text, self.probe, col, "notebook text")
            return
        if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
            col.add(RULE_MALFORMED, BLOCK, "notebook", "not a notebook (no list of cells)")
            self.walk(nb, "notebook")
            return
        try:  # only spares work: a text it leaves out is scanned as before
            prescreen(_texts(nb["cells"]), self.probe, col.config)
        except Exception:  # noqa: BLE001 - the text rules below still see every text
            pass
        self.walk(nb.get("metadata", {}), "notebook metadata")
        for i, cell in enumerate(nb["cells"], 1):
            where = f"cell {i}"
            if not isinstance(cell, dict):
                col.add(RULE_MALFORMED, BLOCK, where, "a cell that is not an object")
                continue
            # markdown cells may paste images as data URIs
            self.scan(_text(cell.get("source", "")), f"{where} source")
            self.walk(cell.get("metadata", {}), f"{where} metadata")
            attachments = cell.get("attachments") or {}
            if isinstance(attachments, dict):
                for a, bundle in enumerate(attachments.values(), 1):
                    self.bundle(bundle, f"{where} attachment {a}")
            outputs = cell.get("outputs") or []
            if not isinstance(outputs, list):
                col.add(RULE_MALFORMED, BLOCK, where, "outputs that are not a list")
                continue
            self._streams = {}
            for k, out in enumerate(outputs, 1):
                self.output(out, f"{where} output {k}")
            # bytes printed in pieces may be split over several stream outputs
            for name, parts in self._streams.items():
                loc = parts[0][0] if len(parts) == 1 else \
                    f"{where} {name} (outputs {parts[0][1]}–{parts[-1][1]})"
                self.text_bytes("".join(text for _, _, text in parts), loc, skip_data_uris=True)
            self._streams = None
        for key in nb:
            if key not in ("cells", "metadata", "nbformat", "nbformat_minor"):
                self.walk(nb[key], f"notebook field {key!r}"[:60])

    def output(self, out, where: str) -> None:
        col = self.col
        if not isinstance(out, dict):
            col.add(RULE_MALFORMED, BLOCK, where, "an output that is not an object")
            return
        size = sum(len(v) if isinstance(v, str) else sum(map(len, v)) if isinstance(v, list)
                   and all(isinstance(x, str) for x in v) else 0
                   for v in [out.get("text", "")] + list((out.get("data") or {}).values()))
        if size > col.config.max_output_bytes:
            col.add(RULE_MALFORMED, BLOCK, where,
                    f"a huge output ({size} characters, limit {col.config.max_output_bytes})")
        kind = out.get("output_type")
        if kind == "stream":
            name = str(out.get("name", "stream"))
            text = _text(out.get("text", ""))
            self.scan(text, f"{where} {name}", tables="text",
                      text_bytes=self._streams is None)
            if self._streams is not None:
                self._streams.setdefault(name, []).append(
                    (f"{where} {name}", where.rsplit(" ", 1)[-1], text))
        elif kind == "error":
            text = _text(out.get("traceback", [])) + "\n" + _text(out.get("evalue", ""))
            scan_text(text, self.probe, col, f"{where} error")
            self.text_bytes(text, f"{where} error")
        else:
            self.bundle(out.get("data") or {}, where)
        self.walk(out.get("metadata", {}), f"{where} metadata")

    def bundle(self, bundle, where: str) -> None:
        if not isinstance(bundle, dict):
            self.walk(bundle, where)
            return
        for mime, value in bundle.items():
            loc = f"{where} {mime}"
            if mime in _IMAGE_MIMES:
                data = _b64(_text(value))
                if data is None:
                    self.col.add(RULE_MALFORMED, BLOCK, loc, "an image that is not valid base64")
                else:
                    self.screen_nested(data, loc, mime.replace("/", "."))
            elif mime == "text/html":
                self.scan(_text(value), loc, tables="html")
            elif mime in ("text/plain", "text/markdown", "text/latex", "image/svg+xml"):
                self.scan(_text(value), loc, tables="text" if mime == "text/plain" else None)
            else:
                self.walk(value, loc)

    def scan(self, text: str, where: str, *, tables: str | None = None,
             text_bytes: bool = True) -> None:
        """Text rules over ``text``, its tables (``"html"`` or ``"text"``), then the files in
        its data URIs. A payload that holds a known kind of file (an image, an array, an
        archive …) is screened as that file, and the text rules skip it: base64 is no text."""
        uris = self._data_uris(text, where) if "base64," in text else []
        scanned = text
        if any(start < end for start, end, _data, _loc in uris):
            pieces, done = [], 0
            for start, end, _data, _loc in uris:
                pieces.append(text[done:start])
                done = end
            scanned = "".join(pieces) + text[done:]
        scan_text(scanned, self.probe, self.col, where)
        if tables:
            found = html_tables(text) if tables == "html" else text_tables(text)
            for t, table in enumerate(found, 1):
                check_table(table, self.col, f"{where} table {t}")
        for _start, _end, data, loc in uris:
            if not self.screen_nested(data, loc, "", only_known=True):
                self.unknown_payload(data, loc)
        if text_bytes:
            self.text_bytes(text, where, skip_data_uris=True)

    def text_bytes(self, text: str, where: str, **options) -> None:
        """Bytes written as text (base64, hex, bytes reprs, numeric dumps): textbytes.py."""
        scan_text_bytes(text, self.col, where,
                        lambda data, loc: self.screen_nested(data, loc, "", only_known=True),
                        lambda decoded, loc: scan_text(decoded, self.probe, self.col, loc),
                        **options)

    def unknown_payload(self, data: bytes, where: str) -> None:
        """A data URI of no known kind of file: its text under the text rules; binary the
        screen cannot read is a finding."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self.col.add(RULE_EMBEDDED_DATA, REVIEW, where,
                         "a data: URI of binary content the screen cannot read")
            return
        scan_text(text, self.probe, self.col, where)

    @staticmethod
    def _data_uris(text: str, where: str) -> list:
        """(start, end, bytes, location) of each data URI payload (base64 that decodes);
        ``start == end`` unless the payload is exactly one whole image (its base64 and
        nothing after it but white space): only that span is kept from the text rules."""
        out = []
        for n, m in enumerate(_DATA_URI_RE.finditer(text), 1):
            data = _b64(m.group(1))
            if not data:
                continue
            kind = embedded.sniff(data)
            start = end = m.start(1)
            payload = _B64_SEGMENT_RE.match(text, start)
            if kind in _IMAGE_ENDS and data.endswith(_IMAGE_ENDS[kind]) and \
                    not text[payload.end():m.end(1)].strip():
                end = payload.end()
            out.append((start, end, data, f"{where} data URI {n}"))
        return out

    def walk(self, value, where: str) -> None:
        """Any JSON value (metadata, widget state, JSON outputs): its text and its base64."""
        strings: list[str] = []
        stack = [value]
        while stack:
            v = stack.pop()
            if isinstance(v, dict):
                strings.extend(str(k) for k in v)
                stack.extend(v.values())
            elif isinstance(v, list):
                stack.extend(v)
            elif isinstance(v, str):
                strings.append(v)
        plain = []
        for s in strings:
            if len(s) >= self.col.config.min_base64_chars and _B64_RE.fullmatch(s):
                data = _b64(s)
                if data and self.screen_nested(data, f"{where} base64 string", "",
                                               only_known=True):
                    continue
            plain.append(s)
        if plain:
            scan_text("\n".join(plain), self.probe, self.col, where)
            self.text_bytes("\n".join(plain), where)
