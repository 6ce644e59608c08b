"""The Ray job's throughput against the same work done directly in one process, and its scaling.

    python -m benchmarks.pipeline                       # 32 photos, 1 actor vs in-process
    python -m benchmarks.pipeline --scaling 1 2 4       # also 1, 2, 4 actors sharing the cores on a simulated cluster
    python -m benchmarks.pipeline --contention 0.18     # also in-process beside a background load that size

Both sides run the same `Evaluator` (same methods, metrics, batch size) on the same samples:
in-process it is called batch by batch; in the job it runs in Ray Data actors with reading,
selection and Parquet writing around it. The photos are ../shared/data/imagenet-sample when it
exists (real ImageNet photos), else the demo's packaged photos repeated. Target (issue 4): the
job on one node reaches >= 85% of the in-process images/s. Printed both end to end (with the
job's fixed start-up: Ray's worker processes, the actor importing torch and loading the model)
and per batch in the steady state, which is what a 50,000-image run sees.

When the actor's torch threads fill every core, Ray's own processes (driver, raylet, GCS,
agents: about 0.2 of a core while the job runs) take their time from those threads, and the
threads wait for each other at every parallel op. `--contention F` measures that cost without
Ray: the in-process side again, beside a process that busy-waits F of a core in short bursts.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.job import local_cpus
from pipeline.schema import SAMPLES

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"


def sample_rows(n: int) -> list[dict]:
    if (SHARED / "labels.csv").is_file():
        import csv

        from PIL import Image

        rows = []
        with open(SHARED / "labels.csv") as fh:
            for rec in list(csv.DictReader(fh))[:n]:
                data = (SHARED / rec["file"]).read_bytes()
                with Image.open(SHARED / rec["file"]) as img:
                    w, h = img.size
                rows.append(dict(sample_id=rec["file"], dataset="bench", split="val", image=data,
                                 label=int(rec["class_index"]), label_name=rec["name"], boxes=[], width=w, height=h))
        return rows
    from pipeline.demo.samples import demo_rows

    base = demo_rows()
    return [{**base[i % len(base)], "sample_id": f"{base[i % len(base)]['sample_id']}-{i}", "dataset": "bench"}
            for i in range(n)]


def config(samples: str, output: str, args, actors: int) -> dict:
    return {
        "output": output,
        "datasets": [{"name": "bench", "uri": samples}],
        "models": [{"name": args.model}],
        "methods": {"fakecam": {}, "gradcam": {}, "gradcampp": {}, "opticam": {"iterations": args.iterations}},
        "metrics": {"classification": {}, "insertion_deletion": {"steps": args.steps}},
        "compute": {"batch_size": args.batch, "actors": actors, "cpus_per_actor": args.cpus_per_actor},
        "save_maps": "png",
    }


def in_process(rows, cfg) -> tuple[float, float]:
    from pipeline.config import load_config
    from pipeline.evaluate import Evaluator

    c = load_config(cfg, run_id="inproc")
    t0 = time.perf_counter()
    ev = Evaluator(run_id="inproc", dataset="bench", model={"name": c.models[0].name, "key": c.models[0].key},
                   methods=c.methods, metrics=c.metrics, save_maps=c.save_maps, threads=int(c.compute.cpus_per_actor))
    table = pa.Table.from_pylist(rows, schema=SAMPLES)
    starts = []
    for start in range(0, len(rows), c.compute.batch_size):
        starts.append(time.perf_counter())
        ev(table.slice(start, c.compute.batch_size))
    return time.perf_counter() - t0, per_batch(starts)


def per_batch(starts: list[float]) -> float:
    """Median seconds between consecutive batch starts: the steady state, without start-up
    (loading the model, starting Ray's workers), the last batch's tail, or one batch that a
    noisy neighbour slowed."""
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    return statistics.median(gaps) if gaps else float("nan")


@contextlib.contextmanager
def background_load(fraction: float):
    """A process that busy-waits `fraction` of each 10 ms and sleeps the rest: what Ray's
    daemons look like to the scheduler (short, frequent wake-ups), without Ray."""
    busy, period = 0.010 * fraction, 0.010
    code = ("import time\nwhile True:\n    t = time.perf_counter()\n"
            f"    while time.perf_counter() - t < {busy}: pass\n    time.sleep({period - busy})\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def job_batch_starts(output: str, run_id: str) -> list[float]:
    """Each result row carries its batch's start time (`created`); one actor runs batches in turn."""
    import pyarrow.dataset as pads

    from pipeline import storage
    from pipeline.job import run_uri

    fs, path = storage.filesystem(run_uri(output, run_id))
    created = pads.dataset(path, filesystem=fs, format="parquet", partitioning=None).to_table(columns=["created"])
    return sorted({t.timestamp() for t in created.column("created").to_pylist()})


def ray_job(cfg, run_id: str) -> float:
    from pipeline.config import load_config
    from pipeline.job import run

    t0 = time.perf_counter()
    run(load_config(cfg, run_id=run_id), log=lambda *_: None)
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--iterations", type=int, default=20, help="Opti-CAM iterations")
    p.add_argument("--steps", type=int, default=56, help="insertion/deletion steps")
    p.add_argument("--cpus-per-actor", type=float, default=os.cpu_count() or 1,
                   help="torch threads per actor (and in-process); a local Ray has twice the cores as logical CPUs")
    p.add_argument("--scaling", type=int, nargs="*", default=[], help="actor counts on a simulated cluster")
    p.add_argument("--contention", type=float, default=0.0, metavar="F",
                   help="also run in-process beside a background load of F cores (e.g. 0.18, Ray's own share)")
    args = p.parse_args(argv)

    import ray

    work = Path(tempfile.mkdtemp(prefix="opticam-bench-"))
    try:
        rows = sample_rows(args.images)
        (work / "samples").mkdir()
        pq.write_table(pa.Table.from_pylist(rows, schema=SAMPLES), work / "samples" / "part-0.parquet",
                       row_group_size=args.batch)
        cfg = config(str(work / "samples"), str(work / "out"), args, actors=1)
        base, base_batch = in_process(rows, cfg)
        print(f"{len(rows)} images, {args.model}, batch {args.batch}, methods {list(cfg['methods'])}, "
              f"metrics {list(cfg['metrics'])}")
        print(f"  in-process            {len(rows) / base:7.3f} img/s  ({base:.1f} s; {base_batch:.1f} s per batch)")
        if args.contention:
            with background_load(args.contention):
                loaded, loaded_batch = in_process(rows, cfg)
            print(f"  in-process, {args.contention:.2f}-core background load {len(rows) / loaded:7.3f} img/s  "
                  f"({loaded:.1f} s; {loaded_batch:.1f} s per batch) = {base / loaded:.0%} end to end, "
                  f"{base_batch / loaded_batch:.0%} per batch")
        ray.init(num_cpus=local_cpus(), include_dashboard=False)
        job = ray_job(cfg, "one-actor")
        job_batch = per_batch(job_batch_starts(cfg["output"], "one-actor"))
        print(f"  Ray job, 1 actor      {len(rows) / job:7.3f} img/s  ({job:.1f} s; {job_batch:.1f} s per batch)  "
              f"= {base / job:.0%} of in-process end to end, {base_batch / job_batch:.0%} per batch "
              "(target >= 85%)")
        ray.shutdown()
        if args.scaling:
            from ray.cluster_utils import Cluster

            # The simulated nodes share this machine's cores, so n actors split them (cores / n
            # threads each): throughput should hold at the one-actor figure, and what it loses
            # is the cost of spreading the work. On a real cluster each actor brings its own GPU.
            cores = os.cpu_count() or 1
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
            for _ in range(max(args.scaling)):
                cluster.add_node(num_cpus=max(1, cores // min(args.scaling)))
            cluster.wait_for_nodes()
            ray.init(address=cluster.address)
            for n in args.scaling:
                share = argparse.Namespace(**{**vars(args), "cpus_per_actor": max(1, cores // n)})
                seconds = ray_job(config(str(work / "samples"), str(work / "out"), share, actors=n), f"actors-{n}")
                print(f"  simulated cluster, {n} actor(s) x {share.cpus_per_actor} threads "
                      f"{len(rows) / seconds:7.3f} img/s  ({seconds:.1f} s)")
            ray.shutdown()
            cluster.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
