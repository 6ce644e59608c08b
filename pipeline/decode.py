"""Decoding and preprocessing, a CPU stage of its own before the model actors.

In the job (`pipeline.job.evaluate_plan`) `decode_batch` runs as Ray Data tasks between the
todo filter and the `Evaluator` actors, so a GPU never waits while its actor decodes JPEGs: the
streaming executor runs both stages at once, and the actor receives blocks that already hold the
network's input. Per sample the block then carries, instead of the encoded `image` and the
original `boxes`:

- `pixels`: the preprocessed image, C×H×W float32 (`PIXEL_DTYPE`) in [0,1], as raw bytes
  (H×W: the plan's geometry); null where the sample failed;
- `boxes_px`: the boxes in the preprocessed image's pixels, m×4 flattened (`transform_boxes`);
- `boxes_dropped`: the boxes the crop left with no area;
- `decode_error`: why the sample could not be prepared (null when it could); the actor turns it
  into rows with `error` set, as it does for a sample it decodes itself.

float32, not uint8: the Evaluator decodes raw samples into float32 as well, so the two paths
give the same rows bit for bit (and the same as runs made before this stage existed). Rounding
the resized image to uint8 (at most 1/510 per pixel) is not negligible (`benchmarks/decode_stage.py`,
EfficientNet-Lite0, 8 ImageNet photos): p moved by up to 0.021 and insertion by up to 0.035 on
one photo, and Opti-CAM's optimisation reached other maps (correlation down to 0.71, o moved by
up to 0.39); what uint8 saves is 0.45 MB per image of object-store traffic (18.4 vs 4.6 MiB per
batch of 32), next to ~12 ms of CPU per image for decoding.

One function, `prepare_sample`, prepares a sample for both paths: `Evaluator.prepare` calls it on
raw samples (the tests and in-process runs), `decode_batch` here.
"""

from __future__ import annotations

import warnings
from typing import Mapping

import numpy as np
import pyarrow as pa
import torch

from opticam_core.transforms import preprocess, transform_boxes

from .images import decode_image
from .storage import redact

#: The dtype of the prepared pixels in the blocks.
PIXEL_DTYPE = np.float32
#: Columns the stage adds (and `image`, `boxes`: the columns it replaces).
PREPARED = pa.schema([("pixels", pa.binary()), ("boxes_px", pa.list_(pa.float32())),
                      ("boxes_dropped", pa.int64()), ("decode_error", pa.string())])
REPLACED = ("image", "boxes")

_ERROR_LIMIT = 2000  # characters of an error message kept in a row


def short_text(text: str) -> str:
    """An error message as a row keeps it: redacted, at most `_ERROR_LIMIT` characters."""
    # rows are shared and published: an S3 error can quote a credential or a signed URL
    return redact(text)[:_ERROR_LIMIT]


def short_error(err: BaseException) -> str:
    return short_text(f"{type(err).__name__}: {err}")


def geometry(model: Mapping, preprocess_spec: Mapping | None = None) -> dict:
    """`resize` and `size` of a plan's preprocessing, without loading the model: the dataset's
    `preprocess` when given, else the model's default (`opticam_core.models.recipe`), the same
    that the actor's `load_model` applies."""
    if preprocess_spec:
        from .preprocess import PreprocessSpec

        k = PreprocessSpec.model_validate(dict(preprocess_spec)).kwargs()
        return {"resize": k["resize"], "size": tuple(k["size"])}
    from opticam_core.models import recipe

    r = recipe(model["name"], weights=model.get("weights", "default"), checkpoint=model.get("checkpoint"),
               num_classes=model.get("num_classes"), layer=model.get("layer"),
               normalize=model.get("normalize", True))
    return {"resize": r.resize, "size": tuple(r.input_size)}


def prepare_sample(data: bytes | None, boxes, *, resize, size) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Encoded bytes and their boxes (dicts x0, y0, x1, y1 in original pixels) → (float32 3×h×w
    in [0,1], the boxes m×4 in its pixels, the boxes dropped). Raises on a bad sample."""
    if data is None or len(data) == 0:
        raise ValueError("empty image bytes")
    raw = decode_image(data)
    x = preprocess(raw, resize=resize, size=size)
    if not torch.isfinite(x).all():
        raise ValueError("image has non-finite pixel values")
    coords = [[b["x0"], b["y0"], b["x1"], b["y1"]] for b in (boxes or [])]
    if any(not np.isfinite(c).all() for c in coords):
        raise ValueError("box with non-finite coordinates")
    kept, dropped = transform_boxes(coords, raw.shape[1], raw.shape[2], resize=resize, size=size)
    return x, kept, dropped


def decode_batch(batch: pa.Table, *, resize, size) -> pa.Table:
    """The Ray Data stage: `image` and `boxes` → `pixels`, `boxes_px`, `boxes_dropped`,
    `decode_error` (see the module's docstring); every other column passes through, and every
    row stays (a sample that fails keeps its row, with the error)."""
    images = batch.column("image").to_pylist()
    boxes = batch.column("boxes").to_pylist() if "boxes" in batch.column_names else [None] * batch.num_rows
    pixels, boxes_px, dropped, errors = [], [], [], []
    for data, bxs in zip(images, boxes):
        try:
            x, kept, n_dropped = prepare_sample(data, bxs, resize=resize, size=size)
        except Exception as err:  # one bad sample must not cost the batch
            pixels.append(None)
            boxes_px.append(None)
            dropped.append(None)
            errors.append(short_error(err))
            continue
        pixels.append(x.numpy().astype(PIXEL_DTYPE, copy=False).tobytes())
        boxes_px.append(kept.reshape(-1).tolist())
        dropped.append(int(n_dropped))
        errors.append(None)
    out = batch.drop_columns([c for c in REPLACED if c in batch.column_names])
    for field, values in zip(PREPARED, (pixels, boxes_px, dropped, errors)):
        out = out.append_column(field, pa.array(values, type=field.type))
    return out


def is_prepared(table: pa.Table) -> bool:
    return "pixels" in table.column_names


def unpack(table: pa.Table, size) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None],
                                           list[int | None], list[str | None]]:
    """A prepared table's samples: (images 3×h×w float32 or None, boxes m×4 or None, boxes
    dropped, errors). A `pixels` value of the wrong length (a block prepared for another
    geometry) becomes that sample's error."""
    h, w = (size, size) if isinstance(size, int) else size
    expected = 3 * h * w * np.dtype(PIXEL_DTYPE).itemsize
    errors = table.column("decode_error").to_pylist()
    images, boxes = [], []
    for i, (data, flat) in enumerate(zip(_views(table.column("pixels")), table.column("boxes_px").to_pylist())):
        if errors[i] is not None or data is None:
            errors[i] = errors[i] or "ValueError: no prepared pixels"
            images.append(None)
            boxes.append(None)
            continue
        if data.nbytes != expected:
            errors[i] = (f"ValueError: prepared pixels of {data.nbytes} bytes, expected {expected} "
                         f"(3×{h}×{w} {np.dtype(PIXEL_DTYPE).name})")
            images.append(None)
            boxes.append(None)
            continue
        with warnings.catch_warnings():  # read-only shared memory: only read, then stacked (copied)
            warnings.filterwarnings("ignore", message=".*not writable.*")
            images.append(torch.from_numpy(data.view(PIXEL_DTYPE).reshape(3, h, w)))
        boxes.append(torch.tensor(flat or [], dtype=torch.float32).reshape(-1, 4))
    return images, boxes, table.column("boxes_dropped").to_pylist(), errors


def _views(column: pa.ChunkedArray) -> list[np.ndarray | None]:
    """Per row, a read-only uint8 view of a binary column's value (None where null), without
    copying: the actor reads blocks from Ray's shared memory, and bytes objects would copy every
    image once more on the actor's thread (the GPU's path). Stacking copies them once."""
    out = []
    for chunk in column.chunks:
        _validity, offsets, data = chunk.buffers()
        wide = pa.types.is_large_binary(chunk.type)  # Arrow may widen the column when blocks merge
        bounds = np.frombuffer(offsets, dtype=np.int64 if wide else np.int32)
        bounds = bounds[chunk.offset:chunk.offset + len(chunk) + 1]
        values = np.frombuffer(data, dtype=np.uint8) if data is not None else np.empty(0, np.uint8)
        valid = chunk.is_valid().to_numpy(zero_copy_only=False)
        out += [values[bounds[i]:bounds[i + 1]] if valid[i] else None for i in range(len(chunk))]
    return out


__all__ = ["PIXEL_DTYPE", "PREPARED", "decode_batch", "geometry", "is_prepared", "prepare_sample", "short_error",
           "short_text", "unpack"]
