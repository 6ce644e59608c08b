"""No credential leaves the evaluation job in text. Runs with recognisable fake AWS credentials in
the environment (and, in one, in a URI) fail on S3; then every place text goes is searched: the
job's log, the error the user sees, the driver's stdout/stderr (where Ray forwards worker output),
the Ray session's log files, the rows, the manifests and the report."""

from __future__ import annotations

import traceback
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from pipeline import evaluate, storage
from pipeline.cli import main as opticam
from pipeline.config import load_config
from pipeline.job import MANIFEST, run, run_uri
from pipeline.schema import SAMPLES
from tests._peers import require
from tests._samples import (
    TOY_MODEL,
    awkward_rows,
    photo_rows,
    toy_config,
    write_samples,
)
from tests.s3server import ACCESS_KEY, SECRET_KEY

ray = require("ray")

SESSION_TOKEN = "opticam-fake-session-token-5d8e11c07a"
URL_KEY = "AKIAOPTICAMURL000042"
URL_SECRET = "opticam-url-password-91be3f"
SECRETS = (ACCESS_KEY, SECRET_KEY, SESSION_TOKEN, URL_KEY, URL_SECRET)


def leaks(text: str | bytes) -> list[str]:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return [s for s in SECRETS if s in text]


@pytest.fixture(scope="module")
def session_dir(s3_server):
    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_SESSION_TOKEN", SESSION_TOKEN)  # before Ray starts: the workers hold it too
    ctx = ray.init(num_cpus=4, include_dashboard=False)
    yield Path(ctx.address_info["session_dir"])
    ray.shutdown()
    mp.undo()


def failed_run(spec: dict, run_id: str) -> dict[str, str]:
    """Run `spec`, which must fail; the job's log and the error as `opticam run` prints it."""
    log: list[str] = []
    with pytest.raises(Exception) as failure:
        run(load_config(spec, run_id=run_id), log=log.append)
    return {f"{run_id} log": "\n".join(log), f"{run_id} error": "".join(traceback.format_exception(failure.value))}


@pytest.mark.slow
def test_no_secret_in_any_output_of_failed_s3_runs(session_dir, s3_prefix, tmp_path, capfd):
    local = write_samples(tmp_path / "toy", photo_rows(3) + awkward_rows(), row_group=4)
    good = storage.join(s3_prefix, "samples", "toy")
    storage.write_bytes(storage.join(good, "part-00000.parquet"), (local / "part-00000.parquet").read_bytes())
    out = storage.join(s3_prefix, "out")
    seen = {}

    # the first dataset is evaluated and written, the second is in a bucket S3 does not have
    spec = toy_config(good, out, methods={"fakecam": {}})
    spec["datasets"].append({"name": "gone", "uri": "s3://opticam-no-such-bucket/samples/toy", "limit": None})
    seen.update(failed_run(spec, "half"))
    assert "FileNotFoundError: opticam-no-such-bucket/samples/toy" in seen["half error"]

    # credentials written into a URI, as some tools take them (S3 would quote them back)
    spec = toy_config(f"s3://{URL_KEY}:{URL_SECRET}@opticam-test/samples/toy", out, methods={"fakecam": {}})
    seen.update(failed_run(spec, "in-uri"))
    assert "s3://***@opticam-test/samples/toy" in seen["in-uri error"]

    fs, path = storage.filesystem(run_uri(out, "half"))
    rows = pads.dataset(path, filesystem=fs, format="parquet", partitioning=None).to_table()
    assert rows.num_rows == len(photo_rows(3) + awkward_rows()) and rows.column("error").null_count < rows.num_rows
    seen["rows"] = str(rows.drop_columns(["map_png"]).to_pylist())
    seen["half manifest"] = storage.read_text(storage.join(run_uri(out, "half"), MANIFEST))
    # the URI with credentials is refused when the config is read, before any work
    assert not storage.exists(storage.join(run_uri(out, "in-uri"), MANIFEST))
    report = tmp_path / "report"
    assert opticam(["report", run_uri(out, "half"), "--bootstrap", "5", "--out", str(report)]) == 0
    seen.update({f"report {f.name}": f.read_bytes() for f in report.rglob("*") if f.is_file()})
    assert any(name.endswith(".html") for name in seen)

    captured = capfd.readouterr()
    seen["stdout"], seen["stderr"] = captured.out, captured.err
    logs = [f for f in (session_dir / "logs").rglob("*") if f.is_file()]
    assert any(f.name.startswith("worker-") for f in logs)
    seen.update({f"ray {f.relative_to(session_dir)}": f.read_bytes() for f in logs})
    found = {where: leaks(text) for where, text in seen.items() if leaks(text)}
    assert not found, found


def test_a_failing_method_leaves_no_secret_in_its_rows(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_SESSION_TOKEN", SESSION_TOKEN)

    def failing(*args, **kwargs):
        raise OSError(f"GET https://b.s3.amazonaws.com/k?X-Amz-Credential={URL_KEY}%2F20260101&X-Amz-Signature=9f3a "
                      f"failed (secret {SECRET_KEY}, token {SESSION_TOKEN}, via s3://{URL_KEY}:{URL_SECRET}@b/k)")

    monkeypatch.setattr(evaluate, "explain", failing)
    ev = evaluate.Evaluator(run_id="r", dataset="toy", model=TOY_MODEL, methods={"gradcam": {}}, metrics={},
                            device="cpu")
    errors = ev(pa.Table.from_pylist(photo_rows(2), schema=SAMPLES)).column("error").to_pylist()
    assert len(errors) == 2 and all(e and e.startswith("OSError: GET https://b.s3.amazonaws.com/k") for e in errors)
    assert not leaks(str(errors)), errors


def test_credentials_in_an_s3_uri_are_refused_without_being_quoted():
    with pytest.raises(ValueError) as refused:
        storage.read_bytes(f"s3://{URL_KEY}:{URL_SECRET}@opticam-test/samples/part-00000.parquet")
    assert "s3://***@opticam-test/samples/part-00000.parquet" in str(refused.value)
    assert not leaks(str(refused.value))
