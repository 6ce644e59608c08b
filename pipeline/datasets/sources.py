"""What an adapter hands to the writer: the list of files that should become samples, each with
its label and boxes already resolved, plus what it chose not to take and why."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

from pipeline import storage

Box = tuple[float, float, float, float]

#: Folders and files that archive tools and OSes add and that are never samples.
_JUNK_DIRS = {"__MACOSX", "@eaDir", "$RECYCLE.BIN", "System Volume Information"}


class IngestError(Exception):
    """A problem with the input or the options that stops ingest before anything is written."""


@dataclass(frozen=True)
class Candidate:
    uri: str                      # where the bytes are read from (local path or URI)
    sample_id: str
    split: str
    label: int
    label_name: str
    boxes: tuple[Box, ...] = ()
    size_hint: tuple[int, int] | None = None  # (width, height) the annotation claims, checked on read


@dataclass
class Listing:
    candidates: list[Candidate]
    classes: list[str]                               # label index -> label_name
    class_keys: list[str] | None = None              # label index -> key (ImageNet wnid), when distinct
    skipped: list[dict] = field(default_factory=list)  # images not taken: {"path", "reason"}
    ignored: list[str] = field(default_factory=list)   # files that are not candidate images at all
    warnings: list[str] = field(default_factory=list)


def is_junk(rel: str) -> bool:
    """Hidden files, AppleDouble ``._x`` files and archive-tool folders."""
    return any(part.startswith(".") or part in _JUNK_DIRS for part in rel.split("/"))


def walk(root: str) -> tuple[list[str], list[str]]:
    """All files below ``root`` as sorted ``/``-relative paths: (kept, junk)."""
    fs, base = storage.fsspec_filesystem(root)
    if not fs.isdir(base):
        raise IngestError(f"{storage.redact(root)} is not a directory")
    base = base.rstrip("/")
    kept, junk = [], []
    for path in sorted(fs.find(base, withdirs=False, detail=False)):
        rel = path[len(base) + 1:] if path.startswith(base + "/") else posixpath.basename(path)
        (junk if is_junk(rel) else kept).append(rel)
    return kept, junk


def read_lines(uri: str) -> list[str]:
    """Non-empty, non-comment lines of a small text file (UTF-8, BOM tolerated)."""
    text = storage.read_bytes(uri).decode("utf-8-sig")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def apply_limit(listing: Listing, limit: int | None) -> Listing:
    """Keep the first ``limit`` candidates in sample_id order (deterministic, whatever the listing
    order of the store)."""
    listing.candidates.sort(key=lambda c: c.sample_id)
    if limit is not None:
        listing.candidates = listing.candidates[: max(0, limit)]
    return listing
