"""`opticam finetune`'s training throughput on Ray Train against the same loop in one process.

    python -m benchmarks.finetune_speed                          # 1 worker × 1 thread vs 1 process × 1 thread
    python -m benchmarks.finetune_speed --workers 2 --threads 2  # 2 DDP workers × 1 thread vs 1 process × 2 threads

Both sides run `pipeline.finetune.train.run` (the same loop, model, samples, batch size, seed):
in-process with a `LocalSession` (world size 1, no DDP, no Ray), and through the driver
(`pipeline.finetune.driver.finetune`: TorchTrainer, DDP over gloo when there are several
workers, a checkpoint to disk per epoch). The samples are generated (stripes per class, like the
tests) and ingested with `opticam ingest`. Printed per side, over the epochs after the first
(warm-up): the training phase's images/s (what each loop measures around its steps) and the
whole epoch's (train images / the time from one epoch's start to the next: validation and the
checkpoint included). Target (issue 13): Ray Train >= 85 % of the in-process images/s on one node.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_samples(root: Path, n_per_class: int, classes: int, size: int) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pipeline.datasets.driver import IngestOptions, ingest
    from tests.test_finetune import encoded, stripes

    rng = np.random.default_rng(0)
    src = root / "raw"
    for c in range(classes):
        (src / f"class{c}").mkdir(parents=True)
        for i in range(n_per_class):
            img = stripes(c, classes, rng, size=size)
            (src / f"class{c}" / f"{i:04d}.png").write_bytes(encoded(img))
    out = str(root / "samples")
    ingest(IngestOptions("folder", str(src), out, split_sizes={"train": 0.8, "val": 0.1, "test": 0.1}),
           log=lambda *_: None)
    return out


def config(samples: str, output: str, args, workers: int, threads: int):
    from pipeline.finetune.config import parse_config

    return parse_config({
        "name": "bench", "output": output, "data": samples, "seed": 0,
        "model": {"name": args.model, "weights": None, "num_classes": args.classes, "layer": args.layer},
        "preprocess": {"resize": args.size},
        "stages": [{"train": "all", "lr": 0.01, "epochs": args.epochs, "batch_size": args.batch_size}],
        "compute": {"workers": workers, "cpus_per_worker": threads},
    })


def rates(history: list[dict]) -> tuple[float, float]:
    """(training-phase images/s, whole-epoch images/s), medians over the epochs after the first."""
    steady = history[1:] or history
    train = statistics.median(h["images_per_s"] for h in steady)
    walls = [b["started"] - a["started"] for a, b in zip(history, history[1:])]
    walls = walls[1:] or walls  # the first epoch warms up
    return train, history[0]["images"] / statistics.median(walls)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in all, on each side (default 1)")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--layer", default="layer4")
    p.add_argument("--size", type=int, default=64, help="images are size×size (default 64)")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--per-class", type=int, default=80, help="images per class (80 %% train)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    if args.threads % args.workers:
        p.error("--threads must split evenly across --workers")

    import torch

    from pipeline.finetune.driver import finetune
    from pipeline.finetune.train import LocalSession, run

    with tempfile.TemporaryDirectory() as tmp:
        samples = make_samples(Path(tmp), args.per_class, args.classes, args.size)

        torch.set_num_threads(args.threads)
        local = LocalSession("cpu")
        t0 = time.perf_counter()
        run(config(samples, f"{tmp}/local", args, 1, args.threads), local, log=lambda *_: None)
        local_seconds = time.perf_counter() - t0
        local_train, local_whole = rates(local.state["history"])

        import ray

        ray.init(num_cpus=max(args.threads, args.workers), include_dashboard=False)
        t0 = time.perf_counter()
        metrics = finetune(config(samples, f"{tmp}/ray", args, args.workers, args.threads // args.workers),
                           log=lambda *_: None)
        ray_seconds = time.perf_counter() - t0
        ray.shutdown()
        ray_train, ray_whole = rates(metrics["epochs"])

    n = metrics["epochs"][0]["images"]
    print(f"{args.model} at {args.size}×{args.size}, {n} training images per epoch, batch {args.batch_size}, "
          f"{args.epochs} epochs; {os.cpu_count()} cores on this machine")
    print(f"in-process, {args.threads} thread(s):        train {local_train:7.1f} images/s, "
          f"whole epoch {local_whole:7.1f} images/s ({local_seconds:.0f} s in all)")
    print(f"Ray Train, {args.workers} worker(s) × {args.threads // args.workers} thread(s): train {ray_train:7.1f} images/s, "
          f"whole epoch {ray_whole:7.1f} images/s ({ray_seconds:.0f} s in all, Ray start-up included)")
    print(f"ratio (Ray Train / in-process): train {ray_train / local_train:.0%}, whole epoch {ray_whole / local_whole:.0%} "
          "(target >= 85 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
