"""Speed of LIME (`lime`): ours, all photos in one batch, against the `lime` package called one
photo after the other, on the same photos with the same samples, and against the floor.

    python -m benchmarks.lime_speed                              # 2 photos, 100 samples, 5 repeats
    python -m benchmarks.lime_speed --samples 1000 --repeats 5   # lime's default sample count
    python -m benchmarks.lime_speed --photos demo --samples 1000 --contenders ours --repeats 1
                                                                 # what LIME would add to the demo

EfficientNet-Lite0 with its real weights, real photos (the ImageNet sample, --data; or the demo's
seven packaged photos, --photos demo), lime_image's defaults but `--samples`. Contenders,
interleaved (A, B, C, A, B, C…) `--repeats` times so that another process's load falls on all of
them:

    ours     explain(…, "lime"): the sampled images of all photos through the network in chunks
    lime     LimeImageExplainer(random_state=0).explain_instance per photo (its batch_size 10,
             softmax probabilities from the same network), the same samples as ours
    floor    samples × one forward per photo, in our chunks: what the method cannot avoid

Printed: each repeat's seconds per photo, wall and this process's CPU time (other processes' load
moves the first far more than the second), the ratios lime / ours (target ≥ 2) and ours / floor,
their median and spread (min–max); then what the floor leaves out: quickshift per photo.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._stats import interleaved, spread
from opticam_core import explain, load_model
from opticam_core.chunking import loop_chunk
from opticam_core.methods.lime_superpixels import segment
from opticam_core.methods.perturbation import CPU_CHUNK, GPU_CHUNK

from .extremal_quality import DATA, load_photo, photos

SEED = 0


def demo_photos() -> tuple[torch.Tensor, torch.Tensor]:
    from opticam_core.transforms import preprocess
    from pipeline.demo.samples import demo_rows
    from pipeline.images import decode_image

    rows = demo_rows()
    x = torch.stack([preprocess(decode_image(r["image"])) for r in rows])
    return x, torch.tensor([r["label"] for r in rows])


def sample_photos(data: Path, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = photos(data, count)
    return torch.stack([load_photo(data / f) for f, _ in chosen]), torch.tensor([label for _, label in chosen])


def lime_per_photo(bundle, x: torch.Tensor, labels: torch.Tensor, samples: int) -> None:
    from lime import lime_image

    lime_image.tqdm = iter  # its per-sample progress bar off: a little faster, and a readable output

    def classifier_fn(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(bundle.model(torch.from_numpy(batch).permute(0, 3, 1, 2)), 1).numpy()

    for image, label in zip(x, labels.tolist()):
        lime_image.LimeImageExplainer(random_state=SEED).explain_instance(
            image.permute(1, 2, 0).numpy(), classifier_fn, labels=(label,), top_labels=None, num_samples=samples)


def floor(bundle, x: torch.Tensor, samples: int) -> None:
    """samples forwards per photo, in the chunks ours uses (the photos themselves stand in)."""
    total = len(x) * samples
    chunk = loop_chunk(bundle.model, x, CPU_CHUNK, GPU_CHUNK, total=total, copies=3.5)  # LIME's own
    with torch.no_grad():
        for start in range(0, total, chunk):
            idx = torch.arange(start, min(start + chunk, total)) % len(x)
            bundle.model(x[idx])


def whole_runs(bundle, x, labels, samples, repeats, names):
    contenders = {
        "ours": lambda: explain(bundle, x, labels, "lime", num_samples=samples, random_state=SEED),
        "lime": lambda: lime_per_photo(bundle, x, labels, samples),
        "floor": lambda: floor(bundle, x, samples),
    }
    contenders = {n: contenders[n] for n in names}
    ratios = [("lime / ours", "lime", "ours"), ("ours / floor", "ours", "floor")]
    ratios = [r for r in ratios if r[1] in contenders and r[2] in contenders]
    print(f"\nseconds per photo, wall (CPU time of this process: less sensitive to other processes' load)\n"
          f"repeat  {'  '.join(f'{k:>16}' for k in contenders)}   " + "  ".join(f"{r[0]:>12}" for r in ratios))

    def row(rep, wall, cpu):
        print(f"{rep:>6}  {'  '.join(f'{wall[k][-1]:6.2f}s ({cpu[k][-1]:6.2f}s)' for k in contenders)}   "
              + "  ".join(f"{wall[a][-1] / wall[b][-1]:12.3f}" for _, a, b in ratios))

    wall, cpu = interleaved(contenders, repeats, per=len(x), after_repeat=row)
    for k in contenders:
        print(f"{k:<13} s/photo, wall: median {spread(wall[k])}   CPU: median {spread(cpu[k])}")
    for label, a, b in ratios:
        target = "   (target >= 2)" if label == "lime / ours" else ""
        print(f"{label:<13} wall: median {spread([p / q for p, q in zip(wall[a], wall[b])])}{target}")
        print(f"{label:<13}  CPU: median {spread([p / q for p, q in zip(cpu[a], cpu[b])])}")


def quickshift_seconds(x: torch.Tensor) -> list[float]:
    out = []
    for image in x.permute(0, 2, 3, 1).numpy():
        t0 = time.perf_counter()
        segment(image, kernel_size=4, max_dist=200, ratio=0.2, sigma=0, convert2lab=True, seed=42)
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2, help="photos from the ImageNet sample")
    p.add_argument("--photos", choices=("sample", "demo"), default="sample")
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--contenders", nargs="+", choices=("ours", "lime", "floor"), default=["ours", "lime", "floor"])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 is steadier beside other load")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = load_model("efficientnet_lite0")
    x, labels = demo_photos() if args.photos == "demo" else sample_photos(args.data, args.images)
    print(f"EfficientNet-Lite0, {len(x)} photos ({args.photos}), {args.samples} samples, CPU, "
          f"torch threads {torch.get_num_threads()}")
    whole_runs(bundle, x, labels, args.samples, args.repeats, args.contenders)
    print(f"quickshift (in ours and lime, not in the floor) s/photo: median {spread(quickshift_seconds(x))}")


if __name__ == "__main__":
    main()
