"""Speed of GradientSHAP batched across photos against Captum's `GradientShap` one photo at a time.

    python -m benchmarks.gradshap_speed                       # 8 photos, n_samples 5, 5 repeats: 2-4 min on 2 cores
    python -m benchmarks.gradshap_speed --threads 1 --repeats 9       # steadier when others share the cores
    python -m benchmarks.gradshap_speed --images 16 --samples 20 --repeats 7 --device cuda

EfficientNet-Lite0 with its real weights, real photos (the ImageNet sample, --data; the photos of
scikit-image where it is absent), the black baseline, stdevs 0 (Captum's defaults otherwise).
Contenders, interleaved in rotating order (A, B, C, B, C, A…) `--repeats` times so that another
process's load falls on all of them:

    ours     explain(..., "gradshap"): all photos' samples in chunks, one forward + backward each
    captum   captum.attr.GradientShap(model).attribute, one photo after the other (n_samples rows)
    floor    n_samples forwards + backwards to the input per photo, in the method's chunks:
             what the algorithm cannot avoid

Printed: each repeat's seconds per photo and its ratios ours / captum (target ≤ 1) and
ours / floor, then their median and spread (min–max).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks._stats import interleaved, spread
from opticam_core import explain, load_model
from opticam_core.chunking import loop_chunk
from opticam_core.methods.gradshap import CPU_CHUNK, GPU_CHUNK

from .extremal_quality import DATA, load_photo, photos

SKIMAGE = ("chelsea", "coffee", "astronaut", "rocket", "cat", "motorcycle_left", "immunohistochemistry")


def skimage_batch(count: int) -> torch.Tensor:
    import skimage.data
    import torchvision.transforms.v2.functional as TF

    out = []
    for k in range(count):
        img = torch.from_numpy(getattr(skimage.data, SKIMAGE[k % len(SKIMAGE)])().copy())
        img = img.permute(2, 0, 1)[:3]
        out.append(TF.center_crop(TF.resize(img, [256], antialias=True), [224, 224]).float() / 255)
    return torch.stack(out)


def captum_all(model, x, labels, n_samples):
    from captum.attr import GradientShap

    gs = GradientShap(model)
    black = torch.zeros_like(x[:1])
    for i, label in enumerate(labels):
        gs.attribute(x[i:i + 1], baselines=black, n_samples=n_samples, stdevs=0.0, target=label)


def floor(model, rows, row_labels, chunk):
    """Forwards + backwards to the input of `rows` (each photo n_samples times), `chunk` at a time
    (the method's own chunk: on a CPU the cost per image depends on it)."""
    for start in range(0, len(rows), chunk):
        xi = rows[start:start + chunk].clone().requires_grad_(True)
        torch.autograd.grad(model(xi).gather(1, row_labels[start:start + chunk, None]).sum(), xi)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--samples", type=int, default=5, help="n_samples (default: Captum's 5)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=None, help="ours: pairs per forward (default: the method's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's); 1 is steadier on a machine others share")
    p.add_argument("--data", type=Path, default=DATA)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bundle = load_model("efficientnet_lite0").to(device)
    if (args.data / "labels.csv").is_file():
        chosen = photos(args.data, args.images)
        x = torch.stack([load_photo(args.data / f) for f, _ in chosen]).to(device)
        labels = torch.tensor([label for _, label in chosen], device=device)
        source = str(args.data)
    else:
        x = skimage_batch(args.images).to(device)
        with torch.no_grad():
            labels = bundle.model(x).argmax(1)
        source = "skimage.data"
    B, n = len(x), args.samples
    chunk = loop_chunk(bundle.model, x, CPU_CHUNK, GPU_CHUNK, args.batch_size, total=B * n, copies=5,
                       grad=True)  # the method's own
    rows, row_labels = x.repeat_interleave(n, 0), labels.repeat_interleave(n)

    contenders = {
        "ours": lambda: explain(bundle, x, labels, "gradshap", n_samples=n, batch_size=args.batch_size),
        "captum": lambda: captum_all(bundle.model, x, labels.tolist(), n),
        "floor": lambda: floor(bundle.model, rows, row_labels, chunk),
    }
    print(f"EfficientNet-Lite0, {B} photos ({source}), n_samples {n}, black baseline, {device}, "
          f"torch threads {torch.get_num_threads()}, {chunk} pairs per forward")
    for fn in contenders.values():  # warm-up: allocator, lazy imports, oneDNN/cuDNN kernels
        fn()

    def row(r, times, _cpu):
        last = {c: times[c][-1] for c in contenders}
        print(f"{r:>6}  {'  '.join(f'{last[c]:8.3f}s' for c in contenders)}                "
              f"{last['ours'] / last['captum']:11.3f}  {last['ours'] / last['floor']:10.3f}")

    print(f"\nrepeat  {'  '.join(f'{c:>9}' for c in contenders)}   (s per photo)  ours/captum  ours/floor")
    times, _ = interleaved(contenders, args.repeats, per=B, rotate=True, device=device, after_repeat=row)
    vs_peer = [o / c for o, c in zip(times["ours"], times["captum"])]
    vs_floor = [o / f for o, f in zip(times["ours"], times["floor"])]
    print(f"ours / captum: median {spread(vs_peer)}   (target <= 1: batched at least as fast per photo)")
    print(f"ours / floor:  median {spread(vs_floor)}")


if __name__ == "__main__":
    main()
