"""`benchmarks.precision` runs end to end on two real photos (its own folder format), so the
benchmark behind the README's precision figures does not rot."""

from __future__ import annotations

import csv
import re

import skimage.data
import torch
from PIL import Image

from benchmarks import precision as bench


def test_split_precision_run_on_two_photos(tmp_path, capsys):
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["file", "class_index"])
        w.writeheader()
        for name, label in (("chelsea", 285), ("coffee", 967)):
            Image.fromarray(getattr(skimage.data, name)()).save(tmp_path / f"{name}.png")
            w.writerow({"file": f"{name}.png", "class_index": label})
    bench.main(["--photos", "2", "--batch", "2", "--methods", "fakecam", "--precisions",
                "fp32,bf16/fp32,tf32-emulated,fp32-ulp", "--resamples", "10", "--folder", str(tmp_path)])
    sections = dict(re.findall(r"\nfakecam (\S+): (.*?)(?=\n\n|\Z)", capsys.readouterr().out, flags=re.S))
    assert list(sections) == ["bf16/fp32", "tf32-emulated", "fp32-ulp"]
    deltas = {name: dict(re.findall(r"Δ(AD|AG|AI|I|D) +([-+][0-9.]+)", text)) for name, text in sections.items()}
    # Fake-CAM's maps do not depend on the network, and the metrics ran in fp32 as the reference:
    # every number is the same (with the metrics in bf16, I and D move)
    assert "map corr mean 1.0000" in sections["bf16/fp32"] and "identical maps 2/2" in sections["bf16/fp32"]
    assert deltas["bf16/fp32"] == {k: "+0.000" for k in ("AD", "AG", "AI", "I", "D")}
    # the others change the network's numerics (or its input) by a hair: tiny, but not nothing
    for name in ("tf32-emulated", "fp32-ulp"):
        assert set(deltas[name]) == {"AD", "AG", "AI", "I", "D"} and abs(float(deltas[name]["I"])) < 1


def test_tf32_rounding_is_to_the_nearest_10_bit_mantissa():
    x = torch.randn(10_000, dtype=torch.float32) * torch.logspace(-20, 20, 10_000)
    r = bench.tf32_round(x)
    assert not (r.view(torch.int32) & 0x1FFF).any()  # 13 of float32's 23 mantissa bits dropped
    # nearest: no value on TF32's grid is closer (the neighbours one TF32 ulp away on each side)
    ulp = torch.ldexp(torch.ones_like(x), torch.frexp(r)[1] - 11)
    err = (r.double() - x.double()).abs()
    assert (err <= ulp.double() / 2).all() and (err <= (x.abs() * 2.0 ** -11).double()).all()
    grid = torch.tensor([1.0, 1 + 2 ** -10, -3.5, 0.0])
    assert torch.equal(bench.tf32_round(grid), grid)
    assert bench.tf32_round(torch.tensor([1 + 2 ** -12])).item() == 1.0
    assert bench.tf32_round(torch.tensor([1 + 3 * 2 ** -12])).item() == 1 + 2 ** -10


def test_emulated_tf32_rounds_both_operands_forward_and_backward_and_restores_the_weights():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5))
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    weights = [p.detach().clone() for p in net.parameters()]
    t = bench.tf32_round
    conv, lin = net[0], net[2]
    c = torch.randn(2, 5)  # the gradient arriving at the logits, off TF32's grid
    with bench.emulated_tf32(net):
        out = net(x)
        (gx,) = torch.autograd.grad((out * c).sum(), x)
    h = torch.nn.functional.conv2d(t(x), t(weights[0]), weights[1]).flatten(1)
    expected = torch.nn.functional.linear(t(h), t(weights[2]), weights[3])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # backward: the gradient meeting each weight is rounded, as are the weights
    g_h = t(c) @ t(weights[2])
    g_x = torch.nn.grad.conv2d_input(x.shape, t(weights[0]), t(g_h.view(2, 4, 6, 6)))
    torch.testing.assert_close(gx, g_x, rtol=0, atol=1e-6)
    assert not torch.equal(out, net(x))  # the plain forward differs from the emulated one
    assert all(torch.equal(p, w) for p, w in zip(net.parameters(), weights))  # restored
    assert not conv._forward_pre_hooks and not lin._forward_hooks
