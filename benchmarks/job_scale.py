"""The job's own cost at scale: per-row overhead, the driver's memory, the resume scan.

    python -m benchmarks.job_scale                       # 10,000 and 100,000 samples; 1,000,000 rows
    python -m benchmarks.job_scale --samples 2000 20000 --rows 200000   # scaled down

A synthetic dataset of tiny PNGs (32×32) and a trivial workload (Fake-CAM, the classification
metrics, the tiny timm `test_efficientnet` with random weights at 32×32): the model's work is
small, so what is left is the job's (reading, selecting, Ray Data's blocks and actors, rows,
Parquet). Issue 14's targets:

- overhead ≤ 5 ms per sample beyond the method+metric work. The work is measured in-process
  (the same `Evaluator`, batch by batch, no Ray; before and after the jobs, the less loaded of
  the two kept: the machine is shared). The job's cost per sample two ways: end to end between
  two sizes, (t(large) − t(small)) / (large − small), so that the fixed start-up (Ray's workers,
  the actor loading the model) cancels; and in the steady state, the median gap between batch
  starts (rows carry them, `created`) / batch size. overhead = each − the in-process cost.
- the driver's memory flat in the number of samples: each size runs in a fresh driver process
  (its own local Ray), whose RSS is sampled every 50 ms during `run`; the peak above the RSS
  at its start is compared between the sizes; and beside it the same for Ray Data alone in the
  job's shape (`ray_only`), so that what is Ray's and what is the job's can be told apart.
- resume scan ≤ 30 s over about 1,000,000 result rows: `missing_work` over `result_parts` (the
  rows' key columns, a few dozen files at a time) → the samples left and what each misses, as
  `pipeline.job.run` does before a plan, on rows written directly with pyarrow in many files
  (one per batch, as the job does); with the RSS of this process sampled meanwhile.

The job runs with one actor and one torch thread, as does the in-process side.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.schema import RESULTS, SAMPLES

SIZE = 32
MODEL = {"name": "test_efficientnet", "weights": None, "layer": "bn2"}


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_samples(path: Path, n: int, *, distinct: int = 256, per_file: int = 10_000) -> Path:
    """`n` samples of 32×32 PNGs (`distinct` different images, cycled: encoding 100,000 would
    cost more than the run), in files of `per_file` rows, row groups of 1,000."""
    rng = np.random.default_rng(0)
    pngs = [_png(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(distinct)]
    path.mkdir(parents=True, exist_ok=True)
    for f, start in enumerate(range(0, n, per_file)):
        ids = range(start, min(n, start + per_file))
        cols = {
            "sample_id": pa.array([f"s{i:07d}" for i in ids], pa.string()),
            "dataset": pa.array(["scale"] * len(ids), pa.string()),
            "split": pa.array(["val"] * len(ids), pa.string()),
            "image": pa.array([pngs[i % distinct] for i in ids], SAMPLES.field("image").type),
            "label": pa.array([i % 10 for i in ids], SAMPLES.field("label").type),
            "label_name": pa.array([f"class{i % 10}" for i in ids], pa.string()),
            "boxes": pa.array([[] for _ in ids], SAMPLES.field("boxes").type),
            "width": pa.array([SIZE] * len(ids), SAMPLES.field("width").type),
            "height": pa.array([SIZE] * len(ids), SAMPLES.field("height").type),
        }
        table = pa.table({name: cols[name] for name in SAMPLES.names}, schema=SAMPLES)
        pq.write_table(table, path / f"part-{f:05d}.parquet", row_group_size=1000)
    return path


def config(samples: str, output: str, limit: int | None, batch: int) -> dict:
    return {
        "output": output,
        "datasets": [{"name": "scale", "uri": samples, "limit": limit, "preprocess": {"resize": SIZE}}],
        "models": [dict(MODEL)],
        "methods": {"fakecam": {}},
        "metrics": {"classification": {}},
        "compute": {"batch_size": batch, "actors": 1, "cpus_per_actor": 1},
        "save_maps": "none",
    }


def in_process(samples: Path, n: int, batch: int) -> tuple[float, float]:
    """Seconds per sample of the Evaluator alone (decode, Fake-CAM, metrics, rows), model loaded:
    (over all `n`, the median batch's)."""
    import pyarrow.dataset as pads
    import torch

    from pipeline.evaluate import Evaluator

    torch.set_num_threads(1)
    ev = Evaluator(run_id="inproc", dataset="scale", model={**MODEL, "key": MODEL["name"]},
                   methods={"fakecam": {}}, metrics={"classification": {}}, save_maps="none", threads=1,
                   preprocess={"resize": SIZE}, device="cpu")
    table = pads.dataset(str(samples), format="parquet").head(n)
    ev(table.slice(0, batch))  # warm-up
    times = []
    t0 = time.perf_counter()
    for start in range(0, n - batch + 1, batch):
        t = time.perf_counter()
        ev(table.slice(start, batch))
        times.append(time.perf_counter() - t)
    return (time.perf_counter() - t0) / (len(times) * batch), statistics.median(times) / batch


class PeakRSS:
    """This process's peak RSS while the block runs, sampled every 50 ms (ru_maxrss alone
    would show the start-up's peak)."""

    def __enter__(self):
        self.before = rss()
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def driver(samples: str, out: str, n: int, batch: int) -> dict:
    """One fresh run on `n` samples in this process (a fresh one: its peak RSS is the driver's)."""
    import ray

    from pipeline.config import load_config
    from pipeline.job import local_cpus, run

    cfg = load_config(config(samples, out, n, batch), run_id=f"n{n}")
    ray.init(num_cpus=local_cpus(), include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    with PeakRSS() as memory:
        summary = run(cfg, log=lambda *_: None)
    seconds = time.perf_counter() - t0
    ray.shutdown()
    return {"seconds": seconds, "peak_rss": memory.peak, "rss_before_run": memory.before, "rows": summary.ok,
            "max_rss_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "per_batch": batch_gap(out, f"n{n}")}


class _Echo:
    def __call__(self, batch):
        return batch.select(["sample_id"])


def ray_only(samples: str, out: str, n: int, batch: int) -> dict:
    """Ray Data alone, in the job's shape (read `n` samples, blocks of one batch, one actor,
    write), none of the job's own code: what Ray's driver keeps per block."""
    import ray
    from ray.data import ActorPoolStrategy

    from pipeline.job import local_cpus

    ray.init(num_cpus=local_cpus(), include_dashboard=False, log_to_driver=False)
    with PeakRSS() as memory:
        ds = ray.data.read_parquet(samples, partitioning=None).select_columns(["sample_id"]).limit(n)
        ds = ds.repartition(target_num_rows_per_block=batch)
        ds = ds.map_batches(_Echo, batch_size=batch, batch_format="pyarrow", compute=ActorPoolStrategy(size=1),
                            num_cpus=1)
        ds.write_parquet(os.path.join(out, f"ray-only-{n}"))
    ray.shutdown()
    return {"peak_rss": memory.peak, "rss_before_run": memory.before}


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def batch_gap(out: str, run_id: str) -> float:
    """Median seconds between consecutive batches' starts (rows carry their batch's start time,
    `created`; one actor runs the batches in turn): the steady state, start-up excluded."""
    import pyarrow.dataset as pads

    from pipeline.job import run_uri

    created = pads.dataset(run_uri(out, run_id), format="parquet", partitioning=None).to_table(columns=["created"])
    starts = sorted({t.timestamp() for t in created.column("created").to_pylist()})
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    return statistics.median(gaps) if gaps else float("nan")


def job(samples: Path, out: Path, n: int, batch: int, what: str = "driver") -> dict:
    """`driver` (or `ray_only`) in a fresh Python process (its own local Ray), so that each
    size's peak RSS is its own."""
    code = (f"import json, sys; from benchmarks.job_scale import {what}; "
            f"print('RESULT', json.dumps({what}({str(samples)!r}, {str(out)!r}, {n}, {batch})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"{what} on {n} samples failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def write_results(root: Path, samples: int, methods: int, per_file: int) -> int:
    """samples × methods rows of RESULTS, `per_file` rows a file (the job writes one per batch)."""
    root.mkdir(parents=True, exist_ok=True)
    names = [f"m{j}" for j in range(methods)]
    now = int(time.time() * 1e6)
    rows = 0
    ids = [f"s{i:07d}" for i in range(samples)]
    flat_ids = np.repeat(np.array(ids, dtype=object), methods)
    flat_methods = np.tile(np.array(names, dtype=object), samples)
    total = len(flat_ids)
    for f, start in enumerate(range(0, total, per_file)):
        stop = min(total, start + per_file)
        k = stop - start
        cols = {"sample_id": pa.array(flat_ids[start:stop], pa.string()),
                "method": pa.array(flat_methods[start:stop], pa.string()),
                "dataset": pa.array(["scale"] * k, pa.string()), "model": pa.array(["m"] * k, pa.string()),
                "target": pa.array(["label"] * k, pa.string()), "created": pa.array([now] * k, pa.int64()).cast(RESULTS.field("created").type)}
        arrays = []
        for field in RESULTS:
            if field.name in cols:
                arrays.append(cols[field.name].cast(field.type))
            elif pa.types.is_floating(field.type):
                arrays.append(pa.array(np.random.default_rng(f).random(k), pa.float64()).cast(field.type))
            else:
                arrays.append(pa.nulls(k, field.type))
        pq.write_table(pa.Table.from_arrays(arrays, schema=RESULTS), root / f"part-{f:05d}.parquet")
        rows += k
    return rows


def resume_scan(samples: Path, results: Path, n: int, methods: int) -> tuple[float, int, int]:
    """(seconds, samples left, the peak RSS rise in bytes) of finding what is missing, as `run` does."""
    from pipeline.config import DatasetSpec
    from pipeline.job import missing_work, result_parts

    t0 = time.perf_counter()
    with PeakRSS() as memory:
        todo = missing_work(DatasetSpec(name="scale", uri=str(samples), limit=n), str(samples),
                            [f"m{j}" for j in range(methods + 1)],  # one method more: every sample misses it
                            result_parts(str(results)))
    seconds = time.perf_counter() - t0
    return seconds, len(todo), memory.peak - memory.before


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, nargs=2, default=[10_000, 100_000], metavar=("SMALL", "LARGE"),
                   help="the two job sizes (the overhead is their difference; the memory is compared)")
    p.add_argument("--batch", type=int, default=256, help="the job's batch size")
    p.add_argument("--inproc", type=int, default=5000, help="samples the in-process side runs")
    p.add_argument("--rows", type=int, default=1_000_000, help="result rows the resume scan reads")
    p.add_argument("--methods", type=int, default=10, help="methods per sample in those rows")
    p.add_argument("--skip-job", action="store_true", help="only the resume scan")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    small, large = sorted(args.samples)
    work = Path(tempfile.mkdtemp(prefix="opticam-scale-"))
    try:
        t0 = time.perf_counter()
        n_samples = max(large, -(-args.rows // args.methods))
        samples = write_samples(work / "samples", n_samples)
        print(f"{n_samples:,} samples of {SIZE}×{SIZE} PNG written in {time.perf_counter() - t0:.1f} s")

        if not args.skip_job:
            first = in_process(samples, min(args.inproc, small), args.batch)
            runs = {n: job(samples, work / "out", n, args.batch) for n in (small, large)}
            again = in_process(samples, min(args.inproc, small), args.batch)
            # the machine is shared: the less loaded of the two in-process measurements is the work's cost
            per, per_batch = min(first[0], again[0]), min(first[1], again[1])
            print(f"in-process Evaluator (Fake-CAM + classification, {MODEL['name']} at {SIZE}×{SIZE}, "
                  f"batch {args.batch}, 1 thread): {per * 1e3:.2f} ms per sample overall, {per_batch * 1e3:.2f} ms "
                  f"in the median batch (before the jobs {first[0] * 1e3:.2f}/{first[1] * 1e3:.2f}, after "
                  f"{again[0] * 1e3:.2f}/{again[1] * 1e3:.2f})")
            for n, r in runs.items():
                print(f"job on {n:>9,} samples: {r['seconds']:8.1f} s ({n / r['seconds']:7.1f} samples/s), "
                      f"{r['rows']:,} rows; steady state {r['per_batch'] / args.batch * 1e3:.2f} ms per sample; "
                      f"driver RSS {r['rss_before_run'] / 2**20:.0f} MiB at the start of the run, peak "
                      f"{r['peak_rss'] / 2**20:.0f} MiB (+{(r['peak_rss'] - r['rss_before_run']) / 2**20:.0f} MiB)")
            marginal = (runs[large]["seconds"] - runs[small]["seconds"]) / (large - small)
            steady = runs[large]["per_batch"] / args.batch
            rise = {n: r["peak_rss"] - r["rss_before_run"] for n, r in runs.items()}
            growth = (rise[large] - rise[small]) / (large - small)
            print(f"job per sample between the two sizes: {marginal * 1e3:.2f} ms (end to end, the start-up "
                  f"cancelled); in the steady state {steady * 1e3:.2f} ms")
            print(f"overhead beyond the in-process work: {(marginal - per) * 1e3:.2f} ms per sample end to end, "
                  f"{(steady - per_batch) * 1e3:.2f} ms in the steady state (target ≤ 5 ms)")
            print(f"driver RSS rise during the run: +{rise[small] / 2**20:.0f} MiB at {small:,} samples, "
                  f"+{rise[large] / 2**20:.0f} MiB at {large:,}: {growth:,.0f} bytes per sample")
            ray_rise = {}
            for n in (small, large):
                r = job(samples, work / "out", n, args.batch, what="ray_only")
                ray_rise[n] = r["peak_rss"] - r["rss_before_run"]
            ray_growth = (ray_rise[large] - ray_rise[small]) / (large - small)
            print(f"Ray Data alone in the job's shape (read, {args.batch}-row blocks, one actor, write): "
                  f"+{ray_rise[small] / 2**20:.0f} MiB at {small:,}, +{ray_rise[large] / 2**20:.0f} MiB at "
                  f"{large:,}: {ray_growth:,.0f} bytes per sample, {ray_growth * args.batch / 1024:.0f} KB per "
                  f"block; the job's own: {growth - ray_growth:,.0f} bytes per sample")

        methods = args.methods
        n = -(-args.rows // methods)
        t0 = time.perf_counter()
        rows = write_results(work / "results", n, methods, per_file=args.batch * methods)
        print(f"{rows:,} result rows ({n:,} samples × {methods} methods) in "
              f"{len(list((work / 'results').iterdir())):,} files written in {time.perf_counter() - t0:.1f} s")
        seconds, left, rise = resume_scan(samples, work / "results", n, methods)
        print(f"resume scan: {seconds:.1f} s ({left:,} samples with work left; target ≤ 30 s); this process's "
              f"RSS rose by {rise / 2**20:.0f} MiB at its peak")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
