"""The two Parquet contracts (DESIGN.md): samples (what ingest writes and the job reads) and
results (one row per sample × model × method, what the job writes and the report reads)."""

from __future__ import annotations

import pyarrow as pa

from opticam_core.metrics.fields import FIELDS

BOX = pa.struct([("x0", pa.float32()), ("y0", pa.float32()), ("x1", pa.float32()), ("y1", pa.float32())])

SAMPLES = pa.schema([
    ("sample_id", pa.string()),      # unique within a dataset
    ("dataset", pa.string()),
    ("split", pa.string()),
    ("image", pa.binary()),          # the encoded file, bytes unchanged
    ("label", pa.int64()),
    ("label_name", pa.string()),
    ("boxes", pa.list_(BOX)),        # original pixel coordinates; empty when none
    ("width", pa.int32()),
    ("height", pa.int32()),
])

#: Rows per Parquet row group in sample shards: small, so Ray can split a read across actors.
SAMPLES_ROW_GROUP = 256

_KINDS = {"float": pa.float64(), "int": pa.int64(), "bool": pa.bool_(), "floats": pa.list_(pa.float32())}

IDENTIFIERS = [
    ("run_id", pa.string()),
    ("dataset", pa.string()),
    ("split", pa.string()),
    ("sample_id", pa.string()),
    ("model", pa.string()),          # the model's key in the run config (e.g. resnet50, kvasir-r50)
    ("layer", pa.string()),
    ("method", pa.string()),
]

RESULTS = pa.schema(
    IDENTIFIERS
    + [("label_name", pa.string())]
    + [(name, _KINDS[kind]) for name, (kind, _doc) in FIELDS.items()]
    + [
        ("options", pa.string()),    # the method's options as JSON (what produced the row)
        ("seconds", pa.float64()),   # method time per image (its batch's time / batch size)
        ("error", pa.string()),      # null when the row is fine
        ("map_png", pa.binary()),    # the map as an 8-bit grayscale PNG, when saved
        ("created", pa.timestamp("us", tz="UTC")),
    ]
)

#: The columns that identify a row; a run holds each combination once.
ROW_KEY = ("dataset", "sample_id", "model", "method")
