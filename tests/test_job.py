"""The Ray Data job on a local Ray: rows streamed out exactly once, resume after crashes and
config changes, limits, and S3 in and out (a real S3 endpoint on 127.0.0.1)."""

from __future__ import annotations

import collections
import json

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.config import load_config
from pipeline.job import plan_uri, run, run_uri
from tests._peers import require
from tests._samples import (
    TOY_METHODS,
    awkward_rows,
    photo_rows,
    toy_config,
    write_samples,
)
from tests.s3server import ACCESS_KEY, SECRET_KEY

ray = require("ray")


@pytest.fixture(scope="module")
def local_ray(s3_server):  # the S3 fixture first: workers must inherit its environment
    ray.init(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def read_rows(uri: str, columns=None):
    fs, path = storage.filesystem(uri)
    return pads.dataset(path, filesystem=fs, format="parquet", partitioning=None).to_table(columns=columns).to_pandas()


def keys(df):
    return collections.Counter(zip(df.dataset, df.sample_id, df.model, df.method))


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("samples")
    return str(write_samples(root / "toy", photo_rows(10) + awkward_rows(), row_group=3))


def test_run_writes_each_row_once_and_resumes(local_ray, samples, tmp_path):
    cfg = load_config(toy_config(samples, str(tmp_path / "out"), batch_size=4), run_id="r1")
    summary = run(cfg, log=lambda *_: None)
    n_samples = 10 + len(awkward_rows())
    assert summary.computed == n_samples * len(TOY_METHODS)
    df = read_rows(run_uri(cfg.output, "r1"))
    assert len(df) == n_samples * len(TOY_METHODS)
    assert set(keys(df).values()) == {1}
    # the failures are rows, counted in the summary
    failed = df[df.error.notna()].sample_id.unique()
    assert sorted(failed) == ["bad_label", "empty", "garbage", "nan_tiff"]
    assert summary.failed == 4 * len(TOY_METHODS) and summary.ok == len(df) - summary.failed
    assert "rows succeeded" in summary.table() and "failed" in summary.table()
    manifest = json.loads((tmp_path / "out" / "run=r1" / "_run.json").read_text())
    assert manifest["status"] == "finished" and manifest["config"]["datasets"][0]["uri"] == samples
    assert manifest["rows_failed"] == summary.failed

    # the same run id again: nothing to do
    again = run(cfg, log=lambda *_: None)
    assert again.computed == 0 and len(read_rows(run_uri(cfg.output, "r1"))) == len(df)

    # a method added to the config: only its rows are computed
    more = load_config(toy_config(samples, str(tmp_path / "out"),
                                  methods={**TOY_METHODS, "layercam": {}}), run_id="r1")
    added = run(more, log=lambda *_: None)
    assert added.computed == n_samples
    df2 = read_rows(run_uri(cfg.output, "r1"))
    assert len(df2) == n_samples * (len(TOY_METHODS) + 1) and set(keys(df2).values()) == {1}
    # rows computed earlier were not recomputed
    old = df.set_index(["sample_id", "method"]).created
    new = df2.set_index(["sample_id", "method"]).created.loc[old.index]
    assert (old == new).all()


def test_retry_failed_recomputes_exactly_the_failed_rows(local_ray, samples, tmp_path):
    cfg = load_config(toy_config(samples, str(tmp_path / "out"), methods={"fakecam": {}}), run_id="r4")
    run(cfg, log=lambda *_: None)
    before = read_rows(run_uri(cfg.output, "r4")).set_index("sample_id")
    failed = sorted(before.index[before.error.notna()])
    assert failed == ["bad_label", "empty", "garbage", "nan_tiff"]
    summary = run(cfg, retry_failed=True, log=lambda *_: None)
    assert summary.computed == len(failed)
    after = read_rows(run_uri(cfg.output, "r4"))
    assert set(keys(after).values()) == {1} and len(after) == len(before)
    after = after.set_index("sample_id")
    redone = after.created != before.created.loc[after.index]
    assert sorted(after.index[redone]) == failed  # the others were not touched
    assert after.loc[failed].error.notna().all()  # these samples fail for good, once each


def test_lost_and_half_written_files_are_recomputed(local_ray, samples, tmp_path):
    cfg = load_config(toy_config(samples, str(tmp_path / "out"), batch_size=3), run_id="r2")
    run(cfg, log=lambda *_: None)
    dest = plan_uri(cfg.output, "r2", "toy", "test_efficientnet")
    files = sorted(f for f in storage.find(dest) if f.endswith(".parquet"))
    assert len(files) >= 2  # several batches → several files
    lost = read_rows(files[0], columns=["sample_id", "method"])
    storage.rm(files[0])
    # a writer killed mid-file leaves a truncated file: unreadable, so it is removed and redone
    data = storage.read_bytes(files[1])
    truncated = read_rows(files[1], columns=["sample_id", "method"])
    storage.write_bytes(files[1], data[: len(data) // 2])
    summary = run(cfg, log=lambda *_: None)
    assert summary.computed == len(lost) + len(truncated)
    df = read_rows(dest)
    assert len(df) == (10 + len(awkward_rows())) * len(TOY_METHODS) and set(keys(df).values()) == {1}


def test_limit_takes_the_first_samples_by_id(local_ray, samples, tmp_path):
    cfg = load_config(toy_config(samples, str(tmp_path / "out"), limit=3, methods={"fakecam": {}}), run_id="r3")
    run(cfg, log=lambda *_: None)
    df = read_rows(run_uri(cfg.output, "r3"))
    ids = sorted(r["sample_id"] for r in photo_rows(10) + awkward_rows())[:3]
    assert sorted(df.sample_id) == ids


def test_samples_from_and_results_to_s3(local_ray, s3_server, s3_prefix, tmp_path):
    local = write_samples(tmp_path / "toy", photo_rows(5, seed=3), row_group=2)
    samples_uri = storage.join(s3_prefix, "samples", "toy")
    storage.write_bytes(storage.join(samples_uri, "part-00000.parquet"),
                        (local / "part-00000.parquet").read_bytes())
    out = storage.join(s3_prefix, "runs")
    cfg = load_config(toy_config(samples_uri, out, methods={"fakecam": {}, "gradcam": {}}), run_id="s3run")
    summary = run(cfg, log=lambda *_: None)
    assert summary.ok == 10 and summary.failed == 0
    df = read_rows(run_uri(out, "s3run"))
    assert len(df) == 10 and set(keys(df).values()) == {1}
    stored = s3_server.keys(storage.split_uri(run_uri(out, "s3run"))[1].split("/", 1)[1])
    assert any(k.endswith(".parquet") and "dataset=toy/model=test_efficientnet/" in k for k in stored)
    assert any(k.endswith("_run.json") for k in stored)
    # no credential in what the job wrote
    manifest = storage.read_text(storage.join(run_uri(out, "s3run"), "_run.json"))
    assert ACCESS_KEY not in manifest and SECRET_KEY not in manifest
    table = pq.read_table(storage.filesystem(storage.join(run_uri(out, "s3run")))[1],
                          filesystem=storage.filesystem(out)[0], partitioning=None)
    assert ACCESS_KEY not in str(table.to_pylist())
