"""The job's decode stage (`pipeline.decode`): what it costs, and whether its blocks could carry
uint8 instead of float32 pixels.

    python -m benchmarks.decode_stage                 # 8 photos, one CPU thread
    python -m benchmarks.decode_stage --photos 16

1. Decode and preprocess speed per photo on one CPU thread (the ImageNet sample JPEGs, the
   default geometry Resize 256 → CenterCrop 224): how many CPUs the stage needs per GPU.
2. Block cost: bytes per batch of 32 and the Arrow IPC round trip of such a block (what Ray's
   object store does between the stage and an actor), float32 vs uint8.
3. What rounding the preprocessed image to uint8 would change: on EfficientNet-Lite0 (real
   weights), per method, the Pearson correlation of the maps made from the uint8-rounded input
   vs the float32 input, and the largest difference of the classification metrics' p and o
   (AD/AG/AI's inputs) and of the insertion/deletion AUCs (56 steps, for CPU time; Opti-CAM at
   50 iterations).

Measured 2026-12-02 on the 2-core dev machine, other processes running (8 photos, one thread):
decode 5.7 ms + preprocess 5.9 ms per photo (86 photos/s per CPU); a block of 32 is 18.4 MiB
float32 / 4.6 MiB uint8. uint8 rounding (max |Δpixel| 1/510) moved Grad-CAM's and Score-CAM's
maps little (correlation ≥ 0.998) but p by up to 0.021 and insertion by up to 0.035 on one photo,
and Opti-CAM's maps a lot (correlation down to 0.71, |Δo| up to 0.39): the blocks stay float32.

Reads ../shared/data/imagenet-sample (benchmarks may; tests may not).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from opticam_core import explain, load_model
from opticam_core.metrics import compute
from opticam_core.transforms import preprocess
from pipeline.images import decode_image

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"
METHODS = {"gradcam": {}, "scorecam": {}, "opticam": {"iterations": 50}}


def photos(n: int) -> list[tuple[bytes, int]]:
    with open(SAMPLE / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    step = max(1, len(rows) // n)
    return [((SAMPLE / r["file"]).read_bytes(), int(r["class_index"])) for r in rows[::step][:n]]


def decode_speed(data: list[bytes]) -> tuple[float, float]:
    """Median ms per photo: decode, then preprocess."""
    dec, pre = [], []
    for d in data * 3:
        t0 = time.perf_counter()
        raw = decode_image(d)
        t1 = time.perf_counter()
        preprocess(raw)
        t2 = time.perf_counter()
        dec.append(t1 - t0)
        pre.append(t2 - t1)
    return 1e3 * statistics.median(dec), 1e3 * statistics.median(pre)


def block_cost(x: torch.Tensor, batch: int = 32) -> dict:
    out = {}
    for name, dtype in (("float32", np.float32), ("uint8", np.uint8)):
        one = x[0].numpy()
        one = np.round(one * 255).astype(np.uint8) if dtype == np.uint8 else one.astype(np.float32)
        table = pa.table({"pixels": pa.array([one.tobytes()] * batch, pa.binary())})
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as w:
                w.write_table(table)
            back = pa.ipc.open_stream(sink.getvalue()).read_all()
            np.frombuffer(back.column("pixels")[0].as_py(), dtype=dtype)
            times.append(time.perf_counter() - t0)
        out[name] = (table.nbytes / 2**20, 1e3 * statistics.median(times))
    return out


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)

    items = photos(args.photos)
    dec, pre = decode_speed([d for d, _ in items])
    print(f"decode {dec:.1f} ms + preprocess {pre:.1f} ms per photo on one CPU thread "
          f"({1e3 / (dec + pre):.0f} photos/s per CPU)")

    x = torch.stack([preprocess(decode_image(d)) for d, _ in items])
    labels = torch.tensor([c for _, c in items])
    for name, (mib, ms) in block_cost(x).items():
        print(f"block of 32, {name}: {mib:.1f} MiB, Arrow IPC round trip {ms:.1f} ms")

    q = torch.round(x * 255) / 255  # what a uint8 block would give the actor
    print(f"uint8 rounding: max |Δpixel| {float((q - x).abs().max()):.5f}, mean {float((q - x).abs().mean()):.5f}")
    bundle = load_model("efficientnet_lite0")
    metrics = {"classification": {}, "insertion_deletion": {"steps": 56}}  # 56 steps: CPU time
    print(f"{'method':<10} {'corr mean':>9} {'corr min':>9} {'max|Δp|':>9} {'max|Δo|':>9} {'max|ΔI|':>9} "
          f"{'max|ΔD|':>9} {'mean|ΔI|':>9} {'mean|ΔD|':>9}")
    for method, options in METHODS.items():
        maps_f = explain(bundle, x, labels, method, **options).maps
        maps_q = explain(bundle, q, labels, method, **options).maps
        corr = [pearson(a, b) for a, b in zip(maps_f, maps_q)]
        vf = compute(bundle, x, labels, maps_f, which=metrics)
        vq = compute(bundle, q, labels, maps_q, which=metrics)
        d = {k: (vf[k].double() - vq[k].double()).abs() for k in ("p", "o", "insertion", "deletion")}
        print(f"{method:<10} {np.nanmean(corr):9.5f} {np.nanmin(corr):9.5f} {float(d['p'].max()):9.2e} "
              f"{float(d['o'].max()):9.2e} {float(d['insertion'].max()):9.2e} {float(d['deletion'].max()):9.2e} "
              f"{float(d['insertion'].mean()):9.2e} {float(d['deletion'].mean()):9.2e}")


if __name__ == "__main__":
    main()
