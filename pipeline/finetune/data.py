"""The samples a fine-tuning run reads: `opticam ingest`'s Parquet (local or s3://), one split.

The driver checks every split before Ray Train starts (`check_splits`: rows exist, labels fit
`num_classes`), reading only the small columns. Each worker then reads the images of its split,
decodes and preprocesses them once into a uint8 tensor held in memory (N×3×S×S bytes: 0.9 GB for
Kvasir's 6,000 training images at 224), so epochs cost only the network. An image that does not
decode is skipped and counted, never fatal.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from opticam_core.transforms import preprocess
from pipeline import storage


class DataError(ValueError):
    """Samples that cannot train the model; the message names the config field."""


def _dataset(uri: str):
    import pyarrow.dataset as pads

    if not storage.exists(uri):
        raise FileNotFoundError(uri)
    fs, path = storage.filesystem(uri)
    return pads.dataset(path, format="parquet", filesystem=fs, exclude_invalid_files=True)


def read_split(uri: str, split: str, columns: list[str]):
    """The rows of `split` in `uri`, sorted by sample_id (the same order on every worker)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    table = _dataset(uri).to_table(columns=list(dict.fromkeys(["sample_id", *columns])),
                                   filter=pads.field("split") == split)
    return table.take(pc.sort_indices(table, [("sample_id", "ascending")]))


def split_names(uri: str) -> list[str]:
    import pyarrow.compute as pc

    return sorted(pc.unique(_dataset(uri).to_table(columns=["split"])["split"]).to_pylist())


def check_splits(config) -> dict[str, dict]:
    """Per split: {rows, classes: counts per label}. Raises DataError naming the field for a
    missing or empty split and for labels outside `model.num_classes`."""
    out, errors = {}, []
    n = config.model.num_classes
    for name in ("train", "val", "test"):
        spec = getattr(config.data, name)
        where = f"data.{name}"
        try:
            table = read_split(spec.uri, spec.split, ["label", "label_name", "dataset"])
        except FileNotFoundError:
            errors.append(f"{where}.uri: no samples at {storage.redact(spec.uri)} (run `opticam ingest` first)")
            continue
        if table.num_rows == 0:
            found = split_names(spec.uri)
            errors.append(f"{where}.split: no samples with split {spec.split!r} in {storage.redact(spec.uri)}; "
                          f"splits there: {found or 'none'}")
            continue
        labels = np.asarray(table["label"].to_numpy(zero_copy_only=False))
        names = table["label_name"].to_pylist()
        bad = np.flatnonzero((labels < 0) | (labels >= n))
        if bad.size:
            i = int(bad[0])
            errors.append(f"{where}: {bad.size} samples have labels outside model.num_classes {n} "
                          f"(e.g. {table['sample_id'][i].as_py()!r}: label {int(labels[i])} {names[i]!r})")
            continue
        out[name] = {"rows": int(table.num_rows), "classes": np.bincount(labels, minlength=n).tolist(),
                     "dataset": ",".join(sorted(set(table["dataset"].to_pylist())))}
    if errors:
        raise DataError("cannot fine-tune on these samples:\n  " + "\n  ".join(errors))
    return out


@dataclass
class Split:
    images: torch.Tensor        # N×3×H×W uint8, preprocessed
    labels: torch.Tensor        # N int64
    sample_ids: list[str]
    skipped: list[dict]         # {"sample_id", "reason"}: did not decode

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _prepare(data: bytes, kwargs: dict) -> torch.Tensor:
    from pipeline.images import decode_image

    x = preprocess(decode_image(data), **kwargs)
    return (x * 255).round_().to(torch.uint8)


def load_split(uri: str, split: str, preprocess_kwargs: dict, *, shard: tuple[int, int] = (0, 1),
               threads: int = 1) -> Split:
    """Decode and preprocess the rows of `split` (only every `shard[1]`-th from `shard[0]`:
    a worker's share of val/test). Undecodable images are skipped and listed."""
    table = read_split(uri, split, ["image", "label"])
    rank, world = shard
    idx = list(range(rank, table.num_rows, world))
    ids = table["sample_id"].to_pylist()
    labels = table["label"].to_pylist()
    images = table["image"]

    def one(i):
        try:
            return _prepare(images[i].as_py(), preprocess_kwargs), None
        except Exception as err:  # a corrupt file costs its image, not the run
            return None, f"{type(err).__name__}: {err}"[:300]

    with ThreadPoolExecutor(max(1, threads)) as pool:  # PIL and torch release the GIL
        done = list(pool.map(one, idx))
    keep = [(i, x) for i, (x, _) in zip(idx, done) if x is not None]
    skipped = [{"sample_id": ids[i], "reason": why} for i, (_, why) in zip(idx, done) if why is not None]
    h, w = preprocess_kwargs["size"]
    stacked = torch.stack([x for _, x in keep]) if keep else torch.empty(0, 3, h, w, dtype=torch.uint8)
    return Split(stacked, torch.tensor([labels[i] for i, _ in keep], dtype=torch.int64),
                 [ids[i] for i, _ in keep], skipped)
