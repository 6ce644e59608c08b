"""`opticam report` on runs stored in S3 (a real moto server on 127.0.0.1, see tests/s3server.py):
the layout is found by listing, rows and samples are read through s3fs, `--against previous`
looks among the runs under the same s3:// root."""

from __future__ import annotations

from datetime import datetime, timezone

from pipeline.cli import main as opticam
from pipeline.report import open_run, previous_run, read_rows
from tests._runs import make_run


def test_report_reads_runs_from_s3(tmp_path, s3_prefix):  # noqa: F811
    from pipeline.storage import fsspec_filesystem

    local = tmp_path / "out"
    kw = dict(datasets={"imagenet-val": 6}, models=("resnet50",), methods=("gradcam", "opticam"), steps=4, iterations=4)
    root = s3_prefix.rstrip("/")
    old = make_run(local, "old", started=datetime(2026, 1, 1, tzinfo=timezone.utc), samples_root=tmp_path / "samples", **kw)
    new = make_run(local, "new", started=datetime(2026, 1, 2, tzinfo=timezone.utc), samples_root=tmp_path / "samples", **kw)
    fs, path = fsspec_filesystem(root)
    for spec in (old, new):
        fs.put(str(spec.path), f"{path}/run={spec.run_id}", recursive=True)
    # the samples too, and the manifest pointing at them there
    fs.put(str(tmp_path / "samples" / "imagenet-val"), f"{path}/samples/imagenet-val", recursive=True)
    manifest = new.manifest
    manifest["config"]["datasets"][0]["uri"] = f"{root}/samples/imagenet-val"
    import json

    fs.pipe_file(f"{path}/run=new/_run.json", json.dumps(manifest).encode())

    run = open_run(f"{root}/run=new")
    assert run.remote and run.run_id == "new" and len(run.files) == 1
    rows = read_rows(run)
    assert len(rows) == 6 * 2 and set(rows["dataset"]) == {"imagenet-val"}
    assert open_run(root).run_id == "new"
    assert previous_run(run).run_id == "old"

    out = tmp_path / "report"
    rc = opticam(["report", f"{root}/run=new", "--against", "previous", "--out", str(out), "--bootstrap", "5",
                  "--grid-images", "2", "--threshold", "1000"])
    assert rc == 0
    assert (out / "index.html").is_file() and (out / "comparison.csv").is_file()
    assert (out / "figures" / "maps_imagenet-val_resnet50.png").is_file()
    # the photo came from the samples in S3: the grid's first column is not blank
    import numpy as np
    from PIL import Image

    with Image.open(out / "figures" / "maps_imagenet-val_resnet50.png") as im:
        px = np.asarray(im.convert("RGB"), dtype=float)
    assert (px[45:140, 30:150].min(-1) > 245).mean() < 0.2  # white = "image unavailable"
