"""`opticam ingest {imagenet,chestxray,kvasir,folder} SRC --output URI [...]`."""

from __future__ import annotations

import argparse
import sys

from pipeline import storage
from pipeline.schema import SAMPLES_ROW_GROUP

EPILOG = """\
layouts:
  imagenet   ILSVRC2012 val images (flat, in wnid folders, or Kaggle's challenge root); boxes from
             --boxes LOC_val_solution.csv | a folder of ILSVRC2012_val_*.xml | ILSVRC2012_bbox_val_v3.tgz
             (or found in SRC); classes in sorted-wnid order, names from --classes
             (LOC_synset_mapping.txt format), LOC_synset_mapping.txt in SRC, or timm. split: val
  chestxray  chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg; NORMAL=0, PNEUMONIA=1; split from
             the folder, --split keeps one
  kvasir     Kvasir v2: SRC/<class>/*.jpg, 8 classes in sorted order. split: the paper's 6000 train /
             1000 val / 1000 test, class-stratified, drawn by --split-seed (other sizes: --split-sizes);
             --split {train,val,test} keeps one part (the same part as in a full ingest), --split all:
             no split, every image under `all`
  folder     SRC/<class>/<image>, classes sorted or from --classes (one name per line);
             --boxes CSV with header path,x0,y0,x1,y1 (path relative to SRC, one row per box). split: all,
             or --split-sizes like kvasir (then --split keeps one part)

output: OUTPUT/part-NNNNN.parquet (samples schema) + OUTPUT/_ingest.json (counts, bad files).
An existing output is refused unless --overwrite, which replaces an earlier ingest.
S3: s3://bucket/prefix/ with the usual AWS credentials; AWS_ENDPOINT_URL for MinIO and the like.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.datasets.driver import DEFAULT_RAY_THRESHOLD, KINDS

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("kind", choices=KINDS, help="the dataset's layout")
    parser.add_argument("src", metavar="SRC", help="the downloaded dataset's folder (local path or s3:// URI)")
    parser.add_argument("--output", "-o", required=True, metavar="URI", help="folder for the Parquet shards (local or s3://)")
    parser.add_argument("--name", help="value of the dataset column (default: the kind; folder: SRC's name)")
    parser.add_argument("--classes", metavar="FILE", help="class list (see layouts)")
    parser.add_argument("--boxes", metavar="CSV", help="boxes (imagenet: CSV, XML folder or .tgz; folder: CSV)")
    parser.add_argument("--split", metavar="S", help="split name to record (chestxray, and kvasir/folder with a seeded split: the split to keep)")
    parser.add_argument("--split-sizes", metavar="TRAIN,VAL,TEST", type=_split_sizes,
                        help="a seeded, class-stratified train/val/test split: image counts (kvasir default "
                             "6000,1000,1000) or fractions (0.75,0.125,0.125)")
    parser.add_argument("--split-seed", type=int, default=0, metavar="N", help="the split's seed (default 0)")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N images in sample_id order")
    parser.add_argument("--workers", type=int, metavar="N", help="parallel shards (default: CPU count)")
    parser.add_argument("--row-group", type=int, default=SAMPLES_ROW_GROUP, metavar="N",
                        help=f"rows per Parquet row group, at most (default {SAMPLES_ROW_GROUP})")
    parser.add_argument("--shard-size", type=int, metavar="N", help="rows per Parquet file (default 4 row groups)")
    parser.add_argument("--ray-threshold", type=int, default=DEFAULT_RAY_THRESHOLD, metavar="N",
                        help=f"use Ray tasks from N images on, threads below (default {DEFAULT_RAY_THRESHOLD}; 0: always Ray)")
    parser.add_argument("--check", choices=("decode", "header"), default="decode",
                        help="decode every image (default) or only read its header")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier ingest in --output")


def main(args: argparse.Namespace) -> int:
    from pipeline.datasets.driver import IngestOptions, ingest, summary
    from pipeline.datasets.sources import IngestError

    opts = IngestOptions(
        kind=args.kind, src=args.src, output=args.output, name=args.name, split=args.split,
        classes=args.classes, boxes=args.boxes, limit=args.limit, workers=args.workers,
        row_group=args.row_group, shard_size=args.shard_size, ray_threshold=args.ray_threshold,
        overwrite=args.overwrite, check=args.check, split_sizes=args.split_sizes, split_seed=args.split_seed,
    )
    try:
        report = ingest(opts)
    except IngestError as e:
        print(f"opticam ingest: error: {storage.redact(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if not _storage_error(e):
            raise
        # storage problems (missing bucket, no credentials, permissions): say what, no traceback
        print(f"opticam ingest: error: {storage.redact(f'{type(e).__name__}: {e}')}", file=sys.stderr)
        return 1
    print(summary(report))
    if report["failures"]:
        return 1
    return 0 if report["counts"]["written"] else 1


def _split_sizes(text: str) -> dict[str, float]:
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3 or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected three sizes TRAIN,VAL,TEST (counts or fractions), got {text!r}")
    return dict(zip(("train", "val", "test"), values))


def _storage_error(e: Exception) -> bool:
    if isinstance(e, OSError):
        return True
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return False
    return isinstance(e, (BotoCoreError, ClientError))
