"""ILSVRC2012 validation images with their localization boxes.

Images: any tree holding ``ILSVRC2012_val_XXXXXXXX.<ext>`` files (flat, or sorted into wnid
folders), or Kaggle's challenge root (``ILSVRC/Data/CLS-LOC/val``). Annotations, from ``--boxes``
or found in SRC: the per-image PASCAL-VOC XML files (a folder of ``ILSVRC2012_val_*.xml``, or the
devkit's ``ILSVRC2012_bbox_val_v3.tgz``), or Kaggle's ``LOC_val_solution.csv``. Class indices are
the positions of the wnids in sorted order (the torchvision / timm convention); names come from
``--classes`` (``LOC_synset_mapping.txt`` format ``wnid name, name`` or bare wnids), Kaggle's
``LOC_synset_mapping.txt`` in SRC, or timm's packaged ImageNet metadata. An image's label is the
class of its boxes; boxes stay in original pixels, exactly as annotated.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
import re
import tarfile
import xml.etree.ElementTree as ET
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from pipeline import storage
from pipeline.datasets.sources import (
    Box,
    Candidate,
    IngestError,
    Listing,
    read_lines,
    walk,
)

STEM = re.compile(r"^ILSVRC2012_val_\d{8}$")
WNID = re.compile(r"^n\d{8}$")
_NOT_IMAGES = {".xml", ".csv", ".txt", ".json", ".tgz", ".tar", ".gz"}
KAGGLE_IMAGES = "ILSVRC/Data/CLS-LOC/val"
KAGGLE_XML = "ILSVRC/Annotations/CLS-LOC/val"
KAGGLE_CSV = "LOC_val_solution.csv"
KAGGLE_SYNSETS = "LOC_synset_mapping.txt"

Objects = list[tuple[str, Box]]  # (wnid, box) per annotated object


def parse_xml(data: bytes) -> tuple[Objects, tuple[int, int] | None]:
    """Objects and (width, height) from one PASCAL-VOC style annotation file."""
    root = ET.fromstring(data)
    size = None
    w, h = root.findtext("size/width"), root.findtext("size/height")
    if w and h:
        size = (int(float(w)), int(float(h)))
    objects = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        name = (obj.findtext("name") or "").strip()
        if bb is None or not name:
            continue
        objects.append((name, tuple(float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))))
    return objects, size


def parse_solution_csv(data: bytes) -> dict[str, Objects]:
    """Kaggle's ``LOC_val_solution.csv``: ``ImageId,PredictionString`` with ``wnid x0 y0 x1 y1``
    repeated per box."""
    reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
    if reader.fieldnames is None or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
        raise IngestError(f"expected header ImageId,PredictionString, got {reader.fieldnames}")
    out: dict[str, Objects] = {}
    for line, row in enumerate(reader, start=2):
        tokens = (row["PredictionString"] or "").split()
        if len(tokens) % 5:
            raise IngestError(f"{KAGGLE_CSV} line {line}: PredictionString is not groups of 'wnid x0 y0 x1 y1'")
        objects = []
        for i in range(0, len(tokens), 5):
            try:
                objects.append((tokens[i], tuple(float(t) for t in tokens[i + 1:i + 5])))
            except ValueError:
                raise IngestError(f"{KAGGLE_CSV} line {line}: non-numeric corner in {tokens[i:i + 5]}") from None
        out[row["ImageId"].strip()] = objects
    return out


def _read_xml_dir(uris: list[str]) -> dict[str, tuple[Objects, tuple[int, int] | None]]:
    def one(uri):
        try:
            return uri, parse_xml(storage.read_bytes(uri)), None
        except (ET.ParseError, ValueError, TypeError) as e:
            return uri, None, e

    out, bad = {}, []
    with ThreadPoolExecutor(16) as pool:
        for uri, parsed, err in pool.map(one, uris):
            if parsed is None:
                bad.append(f"{posixpath.basename(uri)}: {err}")
            else:
                out[posixpath.splitext(posixpath.basename(uri))[0]] = parsed
    if bad:
        raise IngestError(f"{len(bad)} unreadable XML annotations, e.g. {bad[:3]}")
    return out


def _read_xml_tar(uri: str) -> dict[str, tuple[Objects, tuple[int, int] | None]]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(uri)), mode="r:*") as tar:
        for member in tar:
            name = posixpath.basename(member.name)
            stem, ext = posixpath.splitext(name)
            if member.isfile() and ext == ".xml" and STEM.match(stem):
                out[stem] = parse_xml(tar.extractfile(member).read())
    return out


def read_annotations(src: str, boxes: str | None, files: list[str]) -> tuple[dict, str]:
    """``stem -> (objects, size or None)`` and a word on where they came from."""
    if boxes:
        if boxes.lower().endswith(".csv"):
            return {k: (v, None) for k, v in parse_solution_csv(storage.read_bytes(boxes)).items()}, boxes
        if re.search(r"\.(tgz|tar|tar\.gz)$", boxes.lower()):
            return _read_xml_tar(boxes), boxes
        if storage.isdir(boxes):
            xml = [u for u in storage.find(boxes) if u.endswith(".xml") and STEM.match(posixpath.basename(u)[:-4])]
            if not xml:
                raise IngestError(f"no ILSVRC2012_val_*.xml files under --boxes {storage.redact(boxes)}")
            return _read_xml_dir(xml), boxes
        raise IngestError(f"--boxes {storage.redact(boxes)}: expected LOC_val_solution.csv, a folder of XML files or a .tgz of them")
    csv_uri = storage.join(src, KAGGLE_CSV)
    if storage.exists(csv_uri):
        return {k: (v, None) for k, v in parse_solution_csv(storage.read_bytes(csv_uri)).items()}, csv_uri
    kaggle_xml = storage.join(src, KAGGLE_XML)
    if storage.isdir(kaggle_xml):
        return read_annotations(src, kaggle_xml, files)
    xml = [storage.join(src, f) for f in files if f.endswith(".xml") and STEM.match(posixpath.basename(f)[:-4])]
    if xml:
        return _read_xml_dir(xml), "XML files in SRC"
    raise IngestError(f"no annotations found in {storage.redact(src)}: pass --boxes LOC_val_solution.csv, "
                      "a folder of ILSVRC2012_val_*.xml files, or ILSVRC2012_bbox_val_v3.tgz")


def read_synsets(src: str, classes: str | None) -> tuple[list[str], dict[str, str]]:
    """(sorted wnids, wnid -> readable name)."""
    uri = classes or storage.join(src, KAGGLE_SYNSETS)
    if classes or storage.exists(uri):
        names = {}
        for ln in read_lines(uri):
            wnid, _, name = ln.partition(" ")
            if not WNID.match(wnid):
                raise IngestError(f"{storage.redact(uri)}: {wnid!r} is not a WordNet id (nXXXXXXXX)")
            names[wnid] = name.strip()
        if any(not n for n in names.values()):
            fallback = _timm_names()
            names = {w: n or fallback.get(w, w) for w, n in names.items()}
        return sorted(names), names
    names = _timm_names()
    return sorted(names), names


def _timm_names() -> dict[str, str]:
    """wnid -> lemmas for the 1000 ILSVRC classes, from the metadata files timm ships (what
    ``timm.data.ImageNetInfo`` reads), read directly so that ingest does not import torch."""
    import importlib.util

    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise IngestError("ImageNet class names need --classes (LOC_synset_mapping.txt) or the timm package")
    info = os.path.join(list(spec.submodule_search_locations)[0], "data", "_info")
    try:
        with open(os.path.join(info, "imagenet_synsets.txt"), encoding="utf-8") as f:
            wnids = f.read().split()
        with open(os.path.join(info, "imagenet_synset_to_lemma.txt"), encoding="utf-8") as f:
            lemmas = dict(csv.reader(f.read().splitlines(), delimiter="\t"))
    except OSError:  # a timm that keeps them elsewhere: ask it
        from timm.data import ImageNetInfo

        meta = ImageNetInfo()
        return {meta.index_to_label_name(i): meta.index_to_description(i) for i in range(meta.num_classes())}
    return {w: lemmas[w] for w in wnids}


def list_imagenet(src: str, *, split: str = "val", classes: str | None = None, boxes: str | None = None) -> Listing:
    kaggle_images = storage.join(src, KAGGLE_IMAGES)
    images_root = kaggle_images if storage.isdir(kaggle_images) else src
    files, junk = walk(images_root)
    ignored = list(junk)
    images = {}
    for rel in files:
        stem, ext = posixpath.splitext(posixpath.basename(rel))
        if STEM.match(stem) and ext.lower() not in _NOT_IMAGES:
            if stem in images:
                ignored.append(rel)  # a second copy of the same image
            else:
                images[stem] = rel
        elif not (ext.lower() == ".xml" and STEM.match(stem)):
            ignored.append(rel)
    if not images:
        raise IngestError(f"no ILSVRC2012_val_XXXXXXXX images under {storage.redact(images_root)}")
    annotations, where = read_annotations(src, boxes, files if images_root == src else [])
    wnids, names = read_synsets(src, classes)
    index = {w: i for i, w in enumerate(wnids)}
    candidates, skipped, warnings = [], [], []
    mixed = 0
    for stem in sorted(images):
        rel = images[stem]
        objects, size = annotations.get(stem, (None, None))
        if not objects:
            skipped.append({"path": rel, "reason": f"no annotated object in {where}" if objects is not None else f"not in {where}"})
            continue
        counts = Counter(w for w, _ in objects)
        wnid = counts.most_common(1)[0][0]
        if len(counts) > 1:
            mixed += 1
        if wnid not in index:
            skipped.append({"path": rel, "reason": f"class {wnid} is not in the class list"})
            continue
        candidates.append(Candidate(
            uri=storage.join(images_root, rel), sample_id=stem, split=split, label=index[wnid],
            label_name=names[wnid], boxes=tuple(b for w, b in objects if w == wnid), size_hint=size))
    if mixed:
        warnings.append(f"{mixed} images have boxes of several classes: labelled with the most frequent, other boxes dropped")
    missing = len(set(annotations) - set(images))
    if missing:
        warnings.append(f"{missing} annotated images are not among the images found")
    return Listing(candidates=candidates, classes=[names[w] for w in wnids], class_keys=wnids,
                   skipped=skipped, ignored=ignored, warnings=warnings)
