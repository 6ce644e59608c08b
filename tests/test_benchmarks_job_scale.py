"""`python -m benchmarks.job_scale`'s building blocks at a small size (the job itself is not run
here: tests/test_job.py covers it): its samples and result rows are what the job reads."""

from __future__ import annotations

import pyarrow.dataset as pads

from benchmarks import job_scale
from pipeline.job import existing_rows
from pipeline.schema import RESULTS, SAMPLES


def test_samples_and_rows_are_what_the_job_reads(tmp_path):
    samples = job_scale.write_samples(tmp_path / "samples", 250, distinct=3, per_file=100)
    table = pads.dataset(str(samples), format="parquet").to_table()
    assert table.schema.equals(SAMPLES) and table.num_rows == 250
    assert len(set(table.column("sample_id").to_pylist())) == 250
    assert len(list(samples.iterdir())) == 3

    rows = job_scale.write_results(tmp_path / "results", 200, 4, per_file=96)
    assert rows == 800 and len(list((tmp_path / "results").iterdir())) == 9
    assert pads.dataset(str(tmp_path / "results"), format="parquet").schema.equals(RESULTS)
    done = existing_rows(str(tmp_path / "results"))
    assert done.num_rows == 800 and set(done.column("target").to_pylist()) == {"label"}

    seconds, left, rise = job_scale.resume_scan(samples, tmp_path / "results", 200, 4)
    assert left == 200 and seconds > 0 and rise >= 0  # every sample misses the one method more
