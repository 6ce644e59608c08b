"""What a plan still has to compute, as the driver works it out before the Ray stages: the
selected samples and, per sample, the (method, target) rows it misses. In Arrow (no Python
object per sample: the driver's memory stays small at a million samples), so checked here
against a plain-Python statement of the same rule on random states of a run."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks.job_scale import write_results
from pipeline import job
from pipeline.config import DatasetSpec
from pipeline.job import existing_rows, missing_work, result_parts, select_samples, todo_rows
from pipeline.schema import todo_entry
from tests._samples import photo_rows, write_samples


def reference(selected, methods, targets, done_rows):
    have = {(sid, todo_entry(m, t or "label")) for sid, m, t in done_rows}
    out = {}
    for sid in selected:
        missing = [todo_entry(m, t) for m in methods for t in targets if (sid, todo_entry(m, t)) not in have]
        if missing:
            out[sid] = ",".join(missing)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_missing_work_is_the_plain_rule(tmp_path, seed):
    rng = np.random.default_rng(seed)
    rows = photo_rows(40, size=(8, 8), seed=seed)
    rng.shuffle(rows)
    samples = str(write_samples(tmp_path / "s", rows))
    methods = ["fakecam", "gradcam", "gradcam:eps"][: 1 + seed % 3]
    targets = ("label", "top1", "least")[: 1 + seed % 2 + (seed > 3)]
    ids = sorted(r["sample_id"] for r in rows)
    # Done rows: a random share of every (sample, method, target), some of methods or targets
    # the config does not ask for, some of samples outside the selection, and old rows
    # without a target (null = the label), in random order.
    universe = [(s, m, t) for s in ids + ["zz-gone"] for m in methods + ["other"] for t in ("label", "top1", "least", "top2")]
    done_rows = [k for k in universe if rng.random() < [0.0, 0.5, 0.9, 1.0, 0.3, 0.7][seed]]
    done_rows = [(s, m, None if t == "label" and rng.random() < 0.3 else t) for s, m, t in done_rows]
    rng.shuffle(done_rows)
    done = pa.table({"sample_id": pa.array([r[0] for r in done_rows], pa.string()),
                     "method": pa.array([r[1] for r in done_rows], pa.string()),
                     "target": pa.array([r[2] for r in done_rows], pa.string())})
    limit = [None, 25][seed % 2]
    dataset = DatasetSpec(name="toy", uri=samples, limit=limit)
    selected = select_samples(dataset, samples).to_pylist()
    assert selected == ids[:limit]
    todo = missing_work(dataset, samples, methods, done, targets)
    expected = reference(selected, methods, targets, done_rows)
    assert dict(zip(todo.column("sample_id").to_pylist(), todo.column("todo").to_pylist())) == expected
    assert todo.column("sample_id").to_pylist() == sorted(expected)
    assert todo_rows(todo) == sum(len(v.split(",")) for v in expected.values())


def test_duplicate_sample_ids_are_refused_by_name(tmp_path):
    rows = photo_rows(5, size=(8, 8))
    rows[3]["sample_id"] = rows[1]["sample_id"]
    samples = str(write_samples(tmp_path / "s", rows))
    with pytest.raises(ValueError, match=f"not unique.*{rows[1]['sample_id']}"):
        select_samples(DatasetSpec(name="toy", uri=samples), samples)


def test_ids_sort_by_code_point_as_python_does(tmp_path):
    rows = photo_rows(6, size=(8, 8))
    for row, sid in zip(rows, ["b", "a", "Z", "é", "ä0", "10"]):
        row["sample_id"] = sid
    samples = str(write_samples(tmp_path / "s", rows))
    assert select_samples(DatasetSpec(name="toy", uri=samples), samples).to_pylist() == sorted(["b", "a", "Z", "é", "ä0", "10"])


def test_parts_of_a_few_files_find_what_the_whole_table_finds(tmp_path, monkeypatch):
    samples = str(write_samples(tmp_path / "s", photo_rows(30, size=(8, 8))))
    results = tmp_path / "results"
    write_results(results, 30, 3, per_file=7)  # ids s0000000…: none is selected
    ids = select_samples(DatasetSpec(name="toy", uri=samples), samples).to_pylist()
    # rename the rows' samples into the selection, skipping some, so that work is left
    for k, file in enumerate(sorted(results.iterdir())):
        table = pq.read_table(file)
        mapped = [ids[int(s[1:])] if (int(s[1:]) + k) % 4 else "elsewhere" for s in table.column("sample_id").to_pylist()]
        pq.write_table(table.set_column(table.schema.get_field_index("sample_id"), "sample_id", pa.array(mapped)), file)
    monkeypatch.setattr(job, "FILES_PER_PART", 2)
    parts = list(result_parts(str(results)))
    assert len(parts) == 7 and sum(len(p) for p in parts) == 90  # 13 files of 7 rows (the last 6), two a part
    dataset = DatasetSpec(name="toy", uri=samples)
    whole = missing_work(dataset, samples, ["m0", "m1", "m2", "m3"], existing_rows(str(results)))
    assert missing_work(dataset, samples, ["m0", "m1", "m2", "m3"], result_parts(str(results))).equals(whole)
    assert 0 < todo_rows(whole) - 30 < 90  # every sample misses m3; some miss more
