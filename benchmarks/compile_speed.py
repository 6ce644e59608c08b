"""torch.compile (the `compile` option) against eager, on the CPU: EfficientNet-Lite0, 8 photos.

    python -m benchmarks.compile_speed          # one thread; minutes: each graph compiles first

Times the Opti-CAM step (forward + backward, 5 iterations) and the insertion/deletion chunks
(no-grad forwards, 8 steps), eager and compiled (after the first, compiling call, which is
reported apart), and the largest difference of the results.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from opticam_core import explain, load_model
from opticam_core.metrics import compute, preprocess


def photos() -> torch.Tensor:
    import skimage.data as data

    x = torch.stack([preprocess(torch.from_numpy(getattr(data, n)().copy()).permute(2, 0, 1))
                     for n in ("chelsea", "coffee", "astronaut", "rocket")])
    return torch.cat([x, x.flip(3)])


def timed(fn, n=2):
    ts, out = [], None
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    b = load_model("efficientnet_lite0")
    x = photos()
    t = b.model(x).argmax(1)
    maps = explain(b, x, t, "gradcam").maps
    which = {"insertion_deletion": {"steps": 8}}
    cases = [("Opti-CAM, 5 iterations", lambda c: explain(b, x, t, "opticam", iterations=5, compile=c).maps),
             ("insertion/deletion, 8 steps", lambda c: compute(b, x, t, maps, which=which, compile=c)["insertion"])]
    for label, fn in cases:
        fn(False)
        eager, ref = timed(lambda: fn(False))
        t0 = time.perf_counter()
        fn(True)
        first = time.perf_counter() - t0
        compiled, got = timed(lambda: fn(True))
        print(f"{label}: eager {eager:.2f} s, compiled {compiled:.2f} s ({compiled / eager:.2f}×), first compiled "
              f"call {first:.0f} s, max |Δ| {float((ref - got).abs().max()):.1e}", flush=True)


if __name__ == "__main__":
    main()
