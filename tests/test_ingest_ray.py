"""Ingest as Ray tasks, and Ray Data reading/writing samples on S3 through pipeline.storage (the
way the evaluation job does). One local Ray for the module, started after the S3 fixture so its
workers inherit the endpoint and credentials."""

from __future__ import annotations

import os

import pyarrow.compute as pc
import pyarrow.dataset as pads
import pytest

from pipeline import storage
from pipeline.datasets import IngestOptions, ingest
from tests._peers import require
from tests.s3server import ACCESS_KEY, SECRET_KEY
from tests.test_ingest import (
    FOLDER_BOXES,
    check_imagenet_rows,
    make_folder,
    make_imagenet,
    put,
    read_rows,
    row_group_sizes,
)

ray = require("ray")


@pytest.fixture(scope="module")
def local_ray(s3_server):
    # 4 logical CPUs on a 2-core machine: Ray Data's own operators must not starve the tasks
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


def test_ray_tasks_write_the_same_shards_as_threads(local_ray, tmp_path):
    src = tmp_path / "pets"
    make_folder(src)
    put(str(tmp_path / "boxes.csv"), FOLDER_BOXES)
    common = dict(boxes=str(tmp_path / "boxes.csv"), row_group=1, shard_size=4)
    via_ray = ingest(IngestOptions("folder", str(src), str(tmp_path / "ray"), ray_threshold=0, **common), log=lambda m: None)
    via_threads = ingest(IngestOptions("folder", str(src), str(tmp_path / "threads"), ray_threshold=10**9, **common),
                         log=lambda m: None)
    assert (via_ray["engine"], via_threads["engine"]) == ("ray", "threads")
    assert read_rows(tmp_path / "ray") == read_rows(tmp_path / "threads")
    assert row_group_sizes(tmp_path / "ray") == row_group_sizes(tmp_path / "threads") == [[1, 1, 1, 1], [1, 1]]
    names = sorted(n for n in os.listdir(tmp_path / "ray") if n.endswith(".parquet"))
    assert names == sorted(n for n in os.listdir(tmp_path / "threads") if n.endswith(".parquet"))
    for name in names:  # deterministic shards: the same bytes whoever wrote them
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "threads" / name).read_bytes()
    for key in ("counts", "bad", "shards", "warnings", "ignored"):
        assert via_ray[key] == via_threads[key]


def test_s3_ingest_then_ray_data_read_and_write(local_ray, s3_prefix, tmp_path, capfd):
    data = make_imagenet(tmp_path / "src")
    samples = storage.join(s3_prefix, "samples/")
    report = ingest(IngestOptions("imagenet", str(tmp_path / "src/val"), samples, boxes=str(tmp_path / "src/bbox_val"),
                                  row_group=1, shard_size=2, ray_threshold=0))
    assert report["engine"] == "ray" and report["counts"]["written"] == 4 and report["counts"]["bad"] == 2
    by_pyarrow = read_rows(samples)
    check_imagenet_rows(by_pyarrow, data)

    # the job's plan in miniature, one Ray Data execution: read through storage.filesystem,
    # map, write rows out to s3:// through the same helper; then read them back without Ray
    fs, path = storage.filesystem(samples)
    results = storage.join(s3_prefix, "results/run=r1/")
    rfs, rpath = storage.filesystem(results)
    ds = ray.data.read_parquet(path, filesystem=fs)
    ds.map_batches(lambda t: t.append_column("width_x2", pc.multiply(t["width"], 2)), batch_format="pyarrow") \
        .write_parquet(rpath, filesystem=rfs)
    assert [u for u in storage.find(results) if u.endswith(".parquet")]
    back = pads.dataset(rpath, filesystem=rfs, format="parquet", partitioning=None).to_table()
    by_ray = {r["sample_id"]: r for r in back.to_pylist()}
    assert set(by_ray) == set(by_pyarrow)
    for sid, r in by_ray.items():
        assert r.pop("width_x2") == 2 * r["width"]
        assert r == by_pyarrow[sid]  # every column, image bytes included, survived Ray both ways

    printed = capfd.readouterr()
    for text in (printed.out, printed.err, storage.read_text(storage.join(samples, "_ingest.json"))):
        assert SECRET_KEY not in text and ACCESS_KEY not in text
