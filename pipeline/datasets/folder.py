"""ImageFolder-style trees: ``SRC/<class name>/<image>`` (images may sit deeper inside the class
folder). Classes are the sorted folder names unless a class list file gives the order.

Boxes CSV (optional, ``--boxes``): a header line ``path,x0,y0,x1,y1`` and one row per box, ``path``
relative to SRC with ``/`` separators (e.g. ``cat/0001.jpg``), corners in original pixels; an
image may have several rows, images without rows get no boxes. Extra columns are ignored.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict

from pipeline import storage
from pipeline.datasets.sources import (
    Box,
    Candidate,
    IngestError,
    Listing,
    read_lines,
    walk,
)

BOX_COLUMNS = ("path", "x0", "y0", "x1", "y1")


def read_class_list(uri: str) -> list[str]:
    """One class name per line, in label order (blank lines and ``#`` comments skipped)."""
    names = read_lines(uri)
    if not names:
        raise IngestError(f"class list {storage.redact(uri)} is empty")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise IngestError(f"class list {storage.redact(uri)} repeats {dup[:5]}")
    return names


def read_boxes_csv(uri: str) -> dict[str, list[Box]]:
    """``path -> [(x0, y0, x1, y1), ...]`` from the boxes CSV described in the module docstring."""
    text = storage.read_bytes(uri).decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in BOX_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise IngestError(f"boxes CSV {storage.redact(uri)} lacks columns {missing}; expected header {','.join(BOX_COLUMNS)}")
    boxes: dict[str, list[Box]] = defaultdict(list)
    for line, row in enumerate(reader, start=2):
        try:
            box = tuple(float(row[c]) for c in BOX_COLUMNS[1:])
        except (TypeError, ValueError):
            raise IngestError(f"boxes CSV {storage.redact(uri)} line {line}: corners must be numbers, got {row}") from None
        if not all(math.isfinite(v) for v in box):
            raise IngestError(f"boxes CSV {storage.redact(uri)} line {line}: corners must be finite, got {row}")
        path = row["path"].strip().replace("\\", "/")
        while path.startswith("./"):
            path = path[2:]
        boxes[path].append(box)  # type: ignore[arg-type]
    return dict(boxes)


def list_folder(src: str, *, split: str = "all", classes_file: str | None = None,
                boxes_csv: str | None = None) -> Listing:
    files, junk = walk(src)
    ignored = list(junk)
    by_class: dict[str, list[str]] = defaultdict(list)
    for rel in files:
        if "/" in rel:
            by_class[rel.split("/", 1)[0]].append(rel)
        else:
            ignored.append(rel)  # a file at the top level belongs to no class
    warnings: list[str] = []
    if classes_file:
        classes = read_class_list(classes_file)
        for name in sorted(set(by_class) - set(classes)):
            warnings.append(f"folder {name!r} is not in the class list; its {len(by_class[name])} files are ignored")
            ignored.extend(by_class[name])
    else:
        classes = sorted(by_class)
    if not classes:
        raise IngestError(f"no class folders with files under {storage.redact(src)} (expected SRC/<class>/<image>)")
    boxes = read_boxes_csv(boxes_csv) if boxes_csv else {}
    index = {name: i for i, name in enumerate(classes)}
    candidates = []
    for name in classes:
        for rel in by_class.get(name, []):
            candidates.append(Candidate(uri=storage.join(src, rel), sample_id=rel, split=split, label=index[name],
                                        label_name=name, boxes=tuple(boxes.get(rel, ()))))
    taken = {c.sample_id for c in candidates}
    unmatched = sorted(set(boxes) - taken)
    if unmatched:
        warnings.append(f"{len(unmatched)} paths in the boxes CSV match no image, e.g. {unmatched[:5]}")
    inverted = sum(1 for bs in boxes.values() for b in bs if b[2] < b[0] or b[3] < b[1])
    if inverted:
        warnings.append(f"{inverted} boxes in the boxes CSV have x1 < x0 or y1 < y0 (kept as given)")
    return Listing(candidates=candidates, classes=classes, ignored=ignored, warnings=warnings)


#: Kvasir v2's eight classes (folder names of kvasir-dataset-v2), in label order.
KVASIR_CLASSES = [
    "dyed-lifted-polyps", "dyed-resection-margins", "esophagitis", "normal-cecum",
    "normal-pylorus", "normal-z-line", "polyps", "ulcerative-colitis",
]


def list_kvasir(src: str, *, split: str = "all", classes_file: str | None = None) -> Listing:
    """Kvasir v2: one folder per class; SRC may be the folder holding the eight class folders or
    the directory the archive was unpacked into (one ``kvasir-dataset-v2/`` inside)."""
    root = src
    fs, path = storage.fsspec_filesystem(src)
    entries = [e for e in fs.ls(path, detail=True) if not e["name"].rstrip("/").rsplit("/", 1)[-1].startswith((".", "__MACOSX"))]
    dirs = [e for e in entries if e["type"] == "directory"]
    if len(dirs) == 1 and len(entries) == 1:
        root = storage.join(src, dirs[0]["name"].rstrip("/").rsplit("/", 1)[-1])
    listing = list_folder(root, split=split, classes_file=classes_file)
    if not classes_file and listing.classes != KVASIR_CLASSES:
        listing.warnings.append(f"Kvasir v2 has 8 classes {KVASIR_CLASSES}; found {len(listing.classes)}: {listing.classes}")
    return listing
