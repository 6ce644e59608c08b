"""`benchmarks.precision` runs end to end on two real photos (its own folder format), so the
benchmark behind the README's precision figures does not rot."""

from __future__ import annotations

import csv
import re

import skimage.data
from PIL import Image

from benchmarks import precision as bench


def test_split_precision_run_on_two_photos(tmp_path, capsys):
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["file", "class_index"])
        w.writeheader()
        for name, label in (("chelsea", 285), ("coffee", 967)):
            Image.fromarray(getattr(skimage.data, name)()).save(tmp_path / f"{name}.png")
            w.writerow({"file": f"{name}.png", "class_index": label})
    bench.main(["--photos", "2", "--batch", "2", "--methods", "fakecam", "--precisions", "fp32,bf16/fp32",
                "--resamples", "10", "--folder", str(tmp_path)])
    out = capsys.readouterr().out
    # Fake-CAM's maps do not depend on the network, and the metrics ran in fp32 as the reference:
    # every number is the same (with the metrics in bf16, I and D move)
    assert "fakecam bf16/fp32: map corr mean 1.0000" in out and "identical maps 2/2" in out
    deltas = dict(re.findall(r"Δ(AD|AG|AI|I|D) +([-+][0-9.]+)", out))
    assert deltas == {k: "+0.000" for k in ("AD", "AG", "AI", "I", "D")}
