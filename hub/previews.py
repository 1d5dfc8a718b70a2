"""Which exported files a reviewer can see on the review page, and how.

One rule, used by the airlock (a file the review page cannot show gets a ``review``
finding and the request needs at least :data:`NO_PREVIEW_APPROVALS` approvals) and by the
portal (what it renders for each file):

* ``image``: PNG, JPEG, GIF, shown as the picture;
* ``table``: CSV/TSV, the first rows;
* ``text``: plain text, JSON, Markdown, logs, the first bytes;
* ``notebook``: ``.ipynb``, diffed against the hub's copy of the template that produced it,
  or shown whole (every cell and output) when no template run of the requester wrote it;
* anything else: "no preview — download to inspect".
"""

from __future__ import annotations

import os
from pathlib import PurePosixPath
from urllib.parse import quote

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
               ".gif": "image/gif"}
TABLE_SUFFIXES = frozenset({".csv", ".tsv"})
TEXT_SUFFIXES = frozenset({".txt", ".json", ".md", ".log"})
NOTEBOOK_SUFFIXES = frozenset({".ipynb"})

#: The finding a file the review page cannot preview gets.
NO_PREVIEW_RULE = "no-preview"
NO_PREVIEW_TEXT = "no preview — download to inspect"
#: Approvals a request holding a file without a preview needs, at least.
NO_PREVIEW_APPROVALS = 2


def preview_kind(path: str | os.PathLike) -> str | None:
    """``image``, ``table``, ``text``, ``notebook``, or ``None`` (no preview)."""
    suffix = PurePosixPath(os.fspath(path)).suffix.lower()
    if suffix in IMAGE_TYPES:
        return "image"
    if suffix in TABLE_SUFFIXES:
        return "table"
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in NOTEBOOK_SUFFIXES:
        return "notebook"
    return None


def no_preview_finding(path: str) -> dict[str, str]:
    """The ``review`` finding for a file of a type the review page cannot show."""
    suffix = PurePosixPath(path).suffix.lower() or "(none)"
    return {"rule": NO_PREVIEW_RULE, "severity": "review", "location": path,
            "detail": f"{NO_PREVIEW_TEXT}: the review page cannot show {suffix} files; "
                      f"at least {NO_PREVIEW_APPROVALS} approvals are needed"}


def add_preview_findings(results: list[dict]) -> None:
    """Add :func:`no_preview_finding` to each screen result (``{"path", "verdict",
    "findings"}``) whose file the review page cannot show; a ``pass`` becomes ``review``."""
    for result in results:
        if preview_kind(result["path"]) is not None:
            continue
        if not any(f.get("rule") == NO_PREVIEW_RULE for f in result["findings"]):
            result["findings"].append(no_preview_finding(result["path"]))
        if result["verdict"] == "pass":
            result["verdict"] = "review"


def needs_download(findings) -> bool:
    """Whether *findings* (of one file or several) include the no-preview finding."""
    return any((f.get("rule") if isinstance(f, dict) else getattr(f, "rule", None))
               == NO_PREVIEW_RULE for f in findings or ())


# --- file names in URLs and downloads ----------------------------------------------------

def url_path(rel: str) -> str:
    """*rel* (a POSIX path) quoted for a URL path: each component percent-encoded
    (``#``, ``?``, ``%``, quotes, spaces, non-ASCII), the slashes kept."""
    return "/".join(quote(part, safe="") for part in rel.split("/"))


def content_disposition(name: str, disposition: str = "attachment") -> str:
    """A ``Content-Disposition`` header value for *name* (RFC 6266): an ASCII ``filename``
    fallback (quotes, backslashes, controls and non-ASCII replaced by ``_``) and
    ``filename*=UTF-8''…`` (RFC 5987) carrying the exact name."""
    fallback = "".join(c if 0x20 <= ord(c) < 0x7f and c not in '"\\' else "_" for c in name)
    fallback = fallback.strip() or "download"
    return (f'{disposition}; filename="{fallback}"; '
            f"filename*=UTF-8''{quote(name, safe='')}")


__all__ = [
    "IMAGE_TYPES", "NOTEBOOK_SUFFIXES", "NO_PREVIEW_APPROVALS", "NO_PREVIEW_RULE",
    "NO_PREVIEW_TEXT", "TABLE_SUFFIXES", "TEXT_SUFFIXES", "add_preview_findings",
    "content_disposition", "needs_download", "no_preview_finding", "preview_kind", "url_path",
]
