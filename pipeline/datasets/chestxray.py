"""Kermany et al.'s chest X-rays: ``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg``.

SRC may be the ``chest_xray`` folder or any folder above it. The Kaggle archive holds a second,
nested copy (``chest_xray/chest_xray/...``) and ``__MACOSX`` debris: the shallowest copy is taken
and the others are listed as ignored. The split comes from the folder; ``--split`` keeps one.
"""

from __future__ import annotations

from collections import defaultdict

from pipeline import storage
from pipeline.datasets.sources import Candidate, IngestError, Listing, walk

CLASSES = ["NORMAL", "PNEUMONIA"]
SPLITS = ("train", "val", "test")


def list_chestxray(src: str, *, split: str | None = None) -> Listing:
    if split is not None and split not in SPLITS:
        raise IngestError(f"chestxray splits are {list(SPLITS)}; got --split {split!r}")
    files, junk = walk(src)
    ignored = list(junk)
    copies: dict[str, list[tuple[str, str, str, str]]] = defaultdict(list)  # prefix -> (rel, split, class, id)
    for rel in files:
        parts = rel.split("/")
        for i in range(len(parts) - 2):
            if parts[i] in SPLITS and parts[i + 1] in CLASSES:
                prefix = "/".join(parts[:i])
                copies[prefix].append((rel, parts[i], parts[i + 1], "/".join(parts[i:])))
                break
        else:
            ignored.append(rel)
    if not copies:
        raise IngestError(f"no {{train,val,test}}/{{NORMAL,PNEUMONIA}}/ folders under {storage.redact(src)}")
    chosen = min(copies, key=lambda p: (p.count("/") + (p != ""), p))
    warnings = []
    for prefix, entries in sorted(copies.items()):
        if prefix != chosen:
            warnings.append(f"ignored a second copy of the dataset under {prefix!r} ({len(entries)} files)")
            ignored.extend(rel for rel, *_ in entries)
    candidates = []
    for rel, sp, cls, sample_id in copies[chosen]:
        if split is not None and sp != split:
            continue
        candidates.append(Candidate(uri=storage.join(src, rel), sample_id=sample_id, split=sp,
                                    label=CLASSES.index(cls), label_name=cls))
    return Listing(candidates=candidates, classes=list(CLASSES), ignored=ignored, warnings=warnings)
