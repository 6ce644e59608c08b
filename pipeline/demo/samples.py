"""The embedded demo's samples: real photos that ship inside installed packages (scikit-image,
scikit-learn, matplotlib), with the ImageNet labels and hand-made boxes of `photos.csv`.

No network: every photo is a file inside a package the project depends on. The image bytes are
the shipped file, unchanged (PNG or JPEG as shipped), so the pixels are the original ones at the
original resolution and the boxes, drawn in those pixels, stay valid.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
from importlib import resources
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..schema import SAMPLES

DATASET = "demo"
SPLIT = "demo"
PHOTOS_CSV = "photos.csv"
#: Rows per row group: the demo has a handful of ~0.3 MB images; one per group lets Ray split the
#: read across as many actors as there are photos.
ROW_GROUP = 1


class DemoPhotoError(RuntimeError):
    """A packaged photo is missing or differs from the one the boxes were drawn on."""


def _photo_table() -> list[dict]:
    """photos.csv's rows (comment lines start with '#'), boxes grouped per photo, file order kept."""
    text = resources.files(__package__).joinpath(PHOTOS_CSV).read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    photos: dict[str, dict] = {}
    for rec in csv.DictReader(lines):
        photo = photos.setdefault(rec["sample_id"], {
            "sample_id": rec["sample_id"], "source": rec["source"], "file": rec["file"],
            "width": int(rec["width"]), "height": int(rec["height"]), "label": int(rec["label"]),
            "wnid": rec["wnid"], "label_name": rec["label_name"], "boxes": [],
        })
        same = ("source", "file", "width", "height", "label", "wnid", "label_name")
        if any(str(photo[k]) != rec[k] for k in same):
            raise DemoPhotoError(f"{PHOTOS_CSV}: the lines of {rec['sample_id']!r} disagree on {same}")
        photo["boxes"].append({k: float(rec[k]) for k in ("x0", "y0", "x1", "y1")})
    return list(photos.values())


def _package_file(package: str, *parts: str) -> Path | None:
    """A file inside an installed package, found without importing it (importing scikit-learn
    costs seconds); None when the package or the file is absent."""
    spec = importlib.util.find_spec(package)
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root, *parts)
        if path.is_file():
            return path
    return None


def _skimage_bytes(name: str) -> bytes:
    path = _package_file("skimage", "data", name)
    if path is not None:
        return path.read_bytes()
    # Newer scikit-image releases may move a photo out of the wheel into its download cache; the
    # loader functions still return the same pixels, which PNG keeps losslessly.
    import skimage.data

    stem = Path(name).stem
    pixels = skimage.data.stereo_motorcycle()[0] if stem == "motorcycle_left" else getattr(skimage.data, stem)()
    return _png(pixels)


def _sklearn_bytes(name: str) -> bytes:
    path = _package_file("sklearn", "datasets", "images", name)
    if path is None:  # a different layout: ask scikit-learn itself
        from sklearn.datasets import load_sample_images

        path = next((Path(f) for f in load_sample_images().filenames if Path(f).name == name), None)
        if path is None:
            raise FileNotFoundError(f"scikit-learn ships no sample image {name!r}")
    return path.read_bytes()


def _matplotlib_bytes(name: str) -> bytes:
    path = _package_file("matplotlib", "mpl-data", "sample_data", name)
    if path is None:
        from matplotlib import cbook

        path = Path(cbook.get_sample_data(name, asfileobj=False))
    return path.read_bytes()


_SOURCES = {"skimage": _skimage_bytes, "sklearn": _sklearn_bytes, "matplotlib": _matplotlib_bytes}


def _png(pixels) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _photo_bytes(photo: dict) -> bytes:
    from PIL import Image

    read = _SOURCES.get(photo["source"])
    if read is None:
        raise DemoPhotoError(f"{photo['sample_id']}: unknown source {photo['source']!r}; known: {sorted(_SOURCES)}")
    try:
        data = read(photo["file"])
    except (OSError, ImportError, AttributeError) as err:
        raise DemoPhotoError(f"{photo['sample_id']}: cannot read {photo['file']} from {photo['source']}: {err}") from err
    size = Image.open(io.BytesIO(data)).size  # header only; the job decodes
    if size != (photo["width"], photo["height"]):
        raise DemoPhotoError(
            f"{photo['sample_id']}: {photo['source']} ships {photo['file']} at {size[0]}x{size[1]}, "
            f"but its boxes were drawn at {photo['width']}x{photo['height']}"
        )
    return data


def demo_rows() -> list[dict]:
    """The demo photos as rows of the samples schema (`pipeline.schema.SAMPLES`)."""
    return [
        {
            "sample_id": photo["sample_id"],
            "dataset": DATASET,
            "split": SPLIT,
            "image": _photo_bytes(photo),
            "label": photo["label"],
            "label_name": photo["label_name"],
            "boxes": photo["boxes"],
            "width": photo["width"],
            "height": photo["height"],
        }
        for photo in _photo_table()
    ]


def write_demo_samples(output_dir: str | os.PathLike) -> Path:
    """Write the demo samples as one Parquet file under `output_dir`; returns its path.

    Written to a temporary name and renamed, so a reader never sees half a file.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "demo-samples.parquet"
    tmp = out / f".demo-samples.parquet.{os.getpid()}.tmp"
    table = pa.Table.from_pylist(demo_rows(), schema=SAMPLES)
    try:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


__all__ = ["demo_rows", "write_demo_samples", "DemoPhotoError", "DATASET", "SPLIT"]
