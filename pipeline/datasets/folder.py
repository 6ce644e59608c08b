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


#: The paper's Kvasir split (App. E): 6,000 / 1,000 / 1,000 of the 8,000 images.
KVASIR_SPLIT = {"train": 6000, "val": 1000, "test": 1000}


def split_counts(sizes: dict[str, float], n: int, *, option: str = "--split-sizes") -> dict[str, int]:
    """Sizes as image counts (integers, at most `n` in all) or as fractions of `n` (numbers
    below 1, at most 1 in all) → counts."""
    values = list(sizes.values())
    if any(v < 0 for v in values):
        raise IngestError(f"{option}: sizes must be >= 0, got {values}")
    if all(float(v).is_integer() and v >= 1 or v == 0 for v in values):
        counts = {k: int(v) for k, v in sizes.items()}
        if sum(counts.values()) > n:
            raise IngestError(f"{option}: {'+'.join(map(str, counts.values()))} = {sum(counts.values())} images "
                              f"asked for, only {n} listed")
        return counts
    if sum(values) > 1 + 1e-9:
        raise IngestError(f"{option}: fractions must add up to at most 1, got {values}")
    counts = {k: int(math.floor(v * n + 1e-9)) for k, v in sizes.items()}
    return counts


def stratified_split(candidates: list[Candidate], counts: dict[str, int], seed: int) -> tuple[list[Candidate], int]:
    """Assign `counts[name]` candidates to each split, every class in proportion to its size
    (largest remainders, so each split's total is exact), the members drawn by `seed` from the
    candidates in sample_id order (so the listing order of the store never matters). Returns the
    candidates with their split set, in sample_id order, and how many were left out (when the
    counts add up to fewer than the candidates)."""
    import random
    from dataclasses import replace

    by_class: dict[int, list[Candidate]] = defaultdict(list)
    for c in sorted(candidates, key=lambda c: c.sample_id):
        by_class[c.label].append(c)
    total = sum(len(v) for v in by_class.values())
    room = {k: len(v) for k, v in by_class.items()}
    take: dict[str, dict[int, int]] = {}
    for name, size in counts.items():
        quota = {k: size * len(v) / total if total else 0 for k, v in by_class.items()}
        got = {k: min(room[k], int(math.floor(q))) for k, q in quota.items()}
        # the images still owed go to the classes with the largest remainders, where room is left
        for k in sorted(quota, key=lambda k: (-(quota[k] - math.floor(quota[k])), k)):
            if sum(got.values()) >= size:
                break
            if got[k] < room[k]:
                got[k] += 1
        for k in sorted(room, key=lambda k: -room[k]):  # rounding left a class short: fill from the fullest
            while sum(got.values()) < size and got[k] < room[k]:
                got[k] += 1
        for k in got:
            room[k] -= got[k]
        take[name] = got
    out = []
    for k, members in by_class.items():
        order = list(members)
        random.Random(f"{seed}:{k}").shuffle(order)
        at = 0
        for name in counts:
            out += [replace(c, split=name) for c in order[at:at + take[name][k]]]
            at += take[name][k]
    out.sort(key=lambda c: c.sample_id)
    return out, total - len(out)
