"""Speed of the attention methods over their floors, as ratios measured in one run.

    python -m benchmarks.attention_speed                      # ViT-B/16, batch 8, 5 repeats: ~4 min on 2 cores
    python -m benchmarks.attention_speed --model deit_base_patch16_224 --repeats 7 --device cuda

Random weights (`weights=None`): speed does not depend on them, and nothing is downloaded.
Contenders, interleaved (A, B, C, … A, B, C, …) `--repeats` times so that another process's load
falls on all of them:

    forward   one forward of the batch, no grad, timm's fused attention: RawAtt's and Rollout's floor
    fwd+bwd   one forward + backward of y_c to the input: TIBAV's floor
    rawatt, rollout, tibav   explain(...) with the defaults

Printed: each repeat's seconds and the ratios rawatt/forward, rollout/forward (targets ≤ 1.2) and
tibav/fwd+bwd (target ≤ 1.5), their median and spread (min–max); then TIBAV taken apart (median
of `--repeats` runs): the recorded forward (unfused attention, hooks), the backward to the
attention probabilities, and the LRP pass.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks._stats import interleaved, spread, sync
from opticam_core import explain, load_model
from opticam_core.methods import transformer_lrp as lrp


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    bundle = load_model(args.model, weights=None).to(device)
    model, net = bundle.model, bundle.model.net
    x = torch.rand(args.batch, 3, *bundle.input_size, device=device)
    with torch.no_grad():
        labels = model(x).argmax(1)

    def forward():
        with torch.no_grad():
            model(x)

    def forward_backward():
        xi = x.detach().requires_grad_(True)
        torch.autograd.grad(model(xi).gather(1, labels[:, None]).sum(), xi)

    contenders = {
        "forward": forward,
        "fwd+bwd": forward_backward,
        "rawatt": lambda: explain(bundle, x, labels, "rawatt"),
        "rollout": lambda: explain(bundle, x, labels, "rollout"),
        "tibav": lambda: explain(bundle, x, labels, "tibav"),
    }
    print(f"{args.model} (random weights), batch {args.batch} at {bundle.input_size[0]}, {device}, "
          f"torch threads {torch.get_num_threads()}")
    for fn in contenders.values():  # warm-up: allocator, lazy imports, oneDNN/cuDNN kernels
        fn()

    def row(r, times, _cpu):
        last = {c: times[c][-1] for c in contenders}
        print(f"{r:>6}  {'  '.join(f'{last[c]:7.3f}s' for c in contenders)}        "
              f"{last['rawatt'] / last['forward']:10.3f}  {last['rollout'] / last['forward']:11.3f}  "
              f"{last['tibav'] / last['fwd+bwd']:13.3f}")

    print(f"\nrepeat  {'  '.join(f'{c:>8}' for c in contenders)}   (s)   rawatt/fwd  rollout/fwd  tibav/fwd+bwd")
    times, _ = interleaved(contenders, args.repeats, device=device, after_repeat=row)
    ratio = {m: [a / f for a, f in zip(times[m], times[floor])]
             for m, floor in (("rawatt", "forward"), ("rollout", "forward"), ("tibav", "fwd+bwd"))}
    print(f"rawatt / forward:   median {spread(ratio['rawatt'])}   (target <= 1.2)")
    print(f"rollout / forward:  median {spread(ratio['rollout'])}   (target <= 1.2)")
    print(f"tibav / fwd+bwd:    median {spread(ratio['tibav'])}   (target <= 1.5)")

    parts = {"recorded forward": [], "backward to A": [], "LRP pass": []}
    for _ in range(args.repeats):
        sync(device)
        t0 = time.perf_counter()
        with lrp.record(net, 0) as rec, torch.enable_grad():
            logits = model(x)
        sync(device)
        t1 = time.perf_counter()
        torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), [b.attn for b in rec.blocks.values()])
        sync(device)
        t2 = time.perf_counter()
        for b in rec.blocks.values():
            b.attn = b.attn.detach()
        lrp.relevance(net, rec, labels)
        sync(device)
        t3 = time.perf_counter()
        for name, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
            parts[name].append(dt)
        del rec, logits
    fwd = statistics.median(times["forward"])
    print("\nTIBAV taken apart (median s, and in forwards):")
    for name, values in parts.items():
        m = statistics.median(values)
        print(f"  {name:<17} {m:7.3f}s  {m / fwd:5.2f}×")


if __name__ == "__main__":
    main()
