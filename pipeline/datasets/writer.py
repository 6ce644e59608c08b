"""One shard of samples: read the files, check that each decodes, write the good ones as one
Parquet file with row groups of at most ``row_group`` rows, and say what was skipped.

A shard's name depends only on its index, so a retried or repeated task overwrites the same file
and a row can never be written twice. The same function runs in a thread or as a Ray task.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.datasets.sources import Candidate
from pipeline.images import load, open_image
from pipeline.schema import SAMPLES

SHARD_NAME = "part-{:05d}.parquet"
SHARD_PATTERN = r"part-\d{5}\.parquet"
REPORT_NAME = "_ingest.json"
CHECKS = ("decode", "header")


def _leaves(schema: pa.Schema) -> list[str]:
    """Leaf column paths as Parquet names them (the boxes list -> boxes.list.element.x0, ...)."""
    out = []
    for f in schema:
        if pa.types.is_list(f.type) and pa.types.is_struct(f.type.value_type):
            out += [f"{f.name}.list.element.{sub.name}" for sub in f.type.value_type]
        else:
            out.append(f.name)
    return out


_LEAVES = _leaves(SAMPLES)
_SMALL_COLUMNS = [c for c in _LEAVES if c != "image"]


class BadImage(Exception):
    pass


def inspect_image(data: bytes, check: str = "decode") -> tuple[int, int, str]:
    """(width, height, PIL mode) of encoded image bytes; raises BadImage when the evaluation's
    decoder would refuse its header (unidentifiable, above the pixel limit).

    ``decode`` also decodes the pixels, so a truncated or corrupt body is caught here and not in
    the evaluation; JPEGs decode at 1/8 scale (libjpeg still reads every block), which makes this
    cheap. Size is the stored size, before any EXIF orientation."""
    try:
        with open_image(data) as im:
            width, height = im.size
            mode = im.mode
            if check == "decode":
                if im.format == "JPEG":
                    im.draft(im.mode, (max(1, width // 8), max(1, height // 8)))
                load(im)
    except ValueError as e:
        raise BadImage(str(e)) from None
    if width < 1 or height < 1:
        raise BadImage(f"empty image {width}x{height}")
    return width, height, mode


@dataclass
class ShardResult:
    index: int
    name: str | None            # file name inside the output, None when no row was good
    rows: int = 0
    bad: list[dict] = field(default_factory=list)      # {"path", "sample_id", "reason"}
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _table(rows: list[dict]) -> pa.Table:
    columns = {f.name: [r[f.name] for r in rows] for f in SAMPLES}
    return pa.Table.from_pydict(columns, schema=SAMPLES)


def write_shard(index: int, candidates: list[Candidate], output: str, dataset: str,
                row_group: int, check: str = "decode") -> ShardResult:
    start = time.perf_counter()
    name = SHARD_NAME.format(index)
    result = ShardResult(index=index, name=None)
    fs, out_path = storage.filesystem(storage.join(output, name))
    writer = None
    try:
        for lo in range(0, len(candidates), row_group):
            rows = []
            for c in candidates[lo:lo + row_group]:
                try:
                    data = storage.read_bytes(c.uri)
                except Exception as e:  # unreadable file: reported like an undecodable one
                    result.bad.append({"path": storage.redact(c.uri), "sample_id": c.sample_id,
                                       "reason": storage.redact(f"read failed: {type(e).__name__}: {e}")})
                    continue
                try:
                    width, height, _ = inspect_image(data, check)
                except BadImage as e:
                    result.bad.append({"path": storage.redact(c.uri), "sample_id": c.sample_id, "reason": str(e)})
                    continue
                if c.size_hint is not None and c.size_hint != (width, height):
                    result.warnings.append(f"{c.sample_id}: annotation says {c.size_hint[0]}x{c.size_hint[1]}, "
                                           f"image is {width}x{height}")
                rows.append({
                    "sample_id": c.sample_id, "dataset": dataset, "split": c.split, "image": data,
                    "label": c.label, "label_name": c.label_name,
                    "boxes": [{"x0": b[0], "y0": b[1], "x1": b[2], "y1": b[3]} for b in c.boxes],
                    "width": width, "height": height,
                })
            if not rows:
                continue
            if writer is None:
                storage.makedirs(output)
                writer = pq.ParquetWriter(
                    out_path, SAMPLES, filesystem=fs,
                    # images are already compressed: no codec, no dictionary, no min/max statistics
                    # (which would copy two images per row group into the footer)
                    compression={c: ("none" if c == "image" else "zstd") for c in _LEAVES},
                    use_dictionary=["dataset", "split", "label_name"],
                    write_statistics=_SMALL_COLUMNS,
                )
            writer.write_table(_table(rows), row_group_size=row_group)
            result.rows += len(rows)
    finally:
        if writer is not None:
            writer.close()
    if writer is not None:
        result.name = name
    else:  # a shard with no good image leaves no file (a stale one from an earlier run goes)
        storage.rm(storage.join(output, name))
    result.seconds = time.perf_counter() - start
    return result
