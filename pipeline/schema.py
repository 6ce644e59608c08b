"""The two Parquet contracts (DESIGN.md): samples (what ingest writes and the job reads) and
results (one row per sample × model × method, what the job writes and the report reads).

The results' per-image columns are not listed here: they are the fields that the core's metric
groups and methods declare (`opticam_core.fields.per_image_fields`), with the Arrow types named
there, so a new method's extras or a new metric group's fields become columns by registering."""

from __future__ import annotations

import pyarrow as pa

from opticam_core.fields import per_image_fields

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

#: The Arrow type of each stored kind of per-image value (`opticam_core.fields.KINDS`).
ARROW_TYPES = {"float64": pa.float64(), "int64": pa.int64(), "bool": pa.bool_(), "list<float32>": pa.list_(pa.float32())}
FIELDS = per_image_fields()

IDENTIFIERS = [
    ("run_id", pa.string()),
    ("dataset", pa.string()),
    ("split", pa.string()),
    ("sample_id", pa.string()),
    ("model", pa.string()),          # the model's key in the run config (e.g. resnet50, kvasir-r50)
    ("layer", pa.string()),
    ("method", pa.string()),         # the run config's key: a method, or a variant `base:variant`
    ("target", pa.string()),         # the class the map was made for: label, top1, top2, least
]

RESULTS = pa.schema(
    IDENTIFIERS
    + [
        ("label_name", pa.string()),
        ("target_class", pa.int64()),  # the class index of `target` (the label for target=label)
        ("normalized", pa.bool_()),    # False: the model saw [0,1] pixels without mean/std
    ]
    + [(name, ARROW_TYPES[f.kind]) for name, f in FIELDS.items()]
    + [
        ("options", pa.string()),    # the method's options as JSON, defaults filled in (what produced the row)
        ("seconds", pa.float64()),   # method time per image (its batch's time / batch size)
        ("error", pa.string()),      # null when the row is fine
        ("metric_error", pa.string()),  # why a metric group that re-runs the method has NaN values here
        ("map_png", pa.binary()),    # the map as an 8-bit grayscale PNG, when saved
        ("created", pa.timestamp("us", tz="UTC")),
    ]
)

#: The columns that identify a row; a run holds each combination once.
ROW_KEY = ("dataset", "sample_id", "model", "method", "target")

#: What rows written before a column existed mean by its absence (the report reads them so).
DEFAULTS = {"target": "label", "normalized": True}

#: The job's `todo` column (what a sample still misses, travelling with it to the actors): comma-
#: separated entries, `method` for a map of the label, `method|target` for another target.
TODO_SEP = "|"


def todo_entry(method: str, target: str = "label") -> str:
    return method if target == "label" else f"{method}{TODO_SEP}{target}"
