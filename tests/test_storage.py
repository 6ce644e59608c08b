"""pipeline.storage: one API over local paths and s3:// (against moto's server on 127.0.0.1), the
endpoint variables, pickling into other processes, and redaction of credentials."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from tests.s3server import ACCESS_KEY, SECRET_KEY


def test_split_join_and_kinds(tmp_path):
    assert storage.split_uri("s3://bkt/a/b") == ("s3", "bkt/a/b")
    assert storage.split_uri("file:///tmp/x") == (None, "/tmp/x")
    assert storage.split_uri("rel/dir") == (None, "rel/dir")
    assert storage.join("s3://bkt/pre/", "run=1", "/part.parquet") == "s3://bkt/pre/run=1/part.parquet"
    assert storage.join("s3://bkt", "k") == "s3://bkt/k"
    assert storage.join(str(tmp_path), "a", "b.txt") == os.path.join(str(tmp_path), "a", "b.txt")
    assert storage.is_remote("s3://b/k") and storage.is_s3("s3a://b/k") and not storage.is_remote(str(tmp_path))
    fs, path = storage.filesystem("s3://bkt/pre/")
    assert path == "bkt/pre" and fs.type_name == "py::fsspec+('s3', 's3a')"
    fs, path = storage.filesystem("relative/dir")
    assert fs.type_name == "local" and path == os.path.abspath("relative/dir")


def test_endpoint_precedence(monkeypatch):
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"):
        monkeypatch.delenv(var, raising=False)
    assert storage.endpoint_url() is None and "endpoint_url" not in storage.s3_options()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:9000")
    assert storage.endpoint_url() == "http://generic:9000"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:9000")
    assert storage.s3_options()["endpoint_url"] == "http://s3-only:9000"  # the service-specific one wins
    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")
    assert storage.endpoint_url() is None


def test_redact(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FwoGZXIvYXdzEBYaDH+token+value")
    text = ("failed for s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY@bucket/key "
            "url=https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F2026&X-Amz-Signature=abc123 "
            "and http://admin:minio-pass@minio:9000/b, aws_secret_access_key = hunter2hunter2, "
            '{"secret": "s3cr3t-value"} token FwoGZXIvYXdzEBYaDH+token+value; key ASIAZZZZZZZZZZZZZZZZ')
    out = storage.redact(text)
    for leaked in ("wJalrXUtnFEMI", "AKIAIOSFODNN7EXAMPLE", "abc123", "minio-pass", "hunter2hunter2", "s3cr3t-value",
                   "FwoGZXIvYXdzEBYaDH", "ASIAZZZZZZZZZZZZZZZZ"):
        assert leaked not in out, (leaked, out)
    assert "s3://***@bucket/key" in out and "http://***@minio:9000/b" in out
    # a secret that is not in the environment, with the "/" AWS secrets may hold
    assert storage.redact("s3://AKIDX:ab/cd+ef@bucket/k") == "s3://***@bucket/k"
    assert storage.has_credentials("s3://AKIDX:ab/cd+ef@bucket/k") and storage.has_credentials("s3://me@bucket")
    assert not storage.has_credentials("s3://bucket/dir/a:b@c.parquet")
    plain = "wrote 12 rows to s3://bucket/samples/part-00000.parquet (label_name: tench, Tinca tinca)"
    assert storage.redact(plain) == plain


def _exercise(root: str) -> None:
    """The same sequence on a local folder or an S3 prefix."""
    a, b, c = (storage.join(root, p) for p in ("a.bin", "sub/b.txt", "sub/deep/c.txt"))
    assert not storage.exists(a) and storage.listdir(root) == [] and storage.find(root) == []
    storage.write_bytes(a, b"\x00\x01binary")
    storage.write_text(b, "bee")
    storage.write_text(c, "sea")
    assert storage.read_bytes(a) == b"\x00\x01binary" and storage.read_text(b) == "bee"
    assert storage.exists(a) and storage.exists(storage.join(root, "sub")) and storage.isdir(storage.join(root, "sub"))
    assert storage.listdir(root) == [a, storage.join(root, "sub")]
    assert storage.find(root) == [a, b, c]
    assert storage.glob(storage.join(root, "sub", "**", "*.txt")) == [b, c]
    assert storage.glob(storage.join(root, "*.bin")) == [a]
    storage.rm(storage.join(root, "sub"), recursive=True)
    assert storage.find(root) == [a]
    storage.rm(a)
    storage.rm(a)  # missing is fine by default
    with pytest.raises(FileNotFoundError):
        storage.rm(a, missing_ok=False)
    assert not storage.exists(a)


def test_local_helpers(tmp_path):
    _exercise(str(tmp_path / "store"))


def test_s3_helpers(s3_prefix):
    _exercise(s3_prefix)


def test_listing_sees_objects_written_elsewhere(s3_server, s3_prefix):
    """No stale listing cache: objects put by another client (a Ray worker, say) show at once."""
    bucket, key = s3_prefix[len("s3://"):].split("/", 1)
    assert storage.listdir(s3_prefix) == []
    s3_server.client().put_object(Bucket=bucket, Key=key + "x.parquet", Body=b"1")
    assert storage.listdir(s3_prefix) == [storage.join(s3_prefix, "x.parquet")]
    s3_server.client().put_object(Bucket=bucket, Key=key + "y.parquet", Body=b"2")
    assert storage.find(s3_prefix) == [storage.join(s3_prefix, "x.parquet"), storage.join(s3_prefix, "y.parquet")]
    assert storage.exists(storage.join(s3_prefix, "y.parquet"))


@pytest.mark.parametrize("var", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"])
def test_each_endpoint_variable_suffices(s3_server, s3_prefix, monkeypatch, var):
    """botocore and s3fs (these versions) honour either variable on their own; so does storage."""
    import boto3
    import s3fs

    uri = storage.join(s3_prefix, "hello.txt")
    storage.write_text(uri, "hi")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv(var, s3_server.endpoint)
    assert boto3.client("s3").meta.endpoint_url == s3_server.endpoint
    plain = s3fs.S3FileSystem(skip_instance_cache=True)  # no endpoint argument: from the variable
    assert plain.cat_file(uri[len("s3://"):]) == b"hi"
    assert storage.read_text(uri) == "hi"


def test_pyarrow_parquet_through_filesystem(s3_prefix, tmp_path):
    table = pa.table({"sample_id": ["a", "b", "c"], "image": [b"\xff\xd8", b"", b"xyz"]})
    for root in (s3_prefix, str(tmp_path)):
        fs, path = storage.filesystem(storage.join(root, "t"))
        fs.create_dir(path, recursive=True)
        pq.write_table(table, path + "/part-0.parquet", filesystem=fs, row_group_size=2)
        storage.write_text(storage.join(root, "t", "_meta.json"), "{}")  # skipped by readers: leading _
        back = pads.dataset(path, filesystem=fs, format="parquet").to_table()
        assert back.equals(table)
        assert pq.ParquetFile(fs.open_input_file(path + "/part-0.parquet")).metadata.num_row_groups == 2


def test_filesystem_carries_endpoint_into_other_processes(s3_server, s3_prefix):
    """What a Ray worker does with the filesystem handed to read_parquet: unpickle it in a fresh
    process whose own endpoint variable points at a closed loopback port. It still reaches the
    server (the endpoint travels); credentials come from that process's environment."""
    uri = storage.join(s3_prefix, "far.txt")
    storage.write_text(uri, "over there")
    fs, path = storage.filesystem(uri)
    blob = pickle.dumps((fs, path))
    assert SECRET_KEY.encode() not in blob and ACCESS_KEY.encode() not in blob
    env = dict(os.environ, AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_ENDPOINT_URL_S3="http://127.0.0.1:9")
    code = "import pickle, sys; fs, p = pickle.load(sys.stdin.buffer); sys.stdout.write(fs.open_input_stream(p).read().decode())"
    run = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    assert run.stdout == b"over there"
