"""Extremal perturbation: the pieces against hand-computed values, the optimisation against the
properties its definition implies, the batch against single images, and the whole against
TorchRay itself where it is installed."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.extremal_quality import torchray_extremal
from opticam_core import explain
from opticam_core.methods.extremal import (
    AreaRegulariser,
    SmoothMasks,
    gaussian_blur,
    perturb,
    perturbation_pyramid,
)
from opticam_core.models import ModelBundle, Normalized, freeze
from tests._peers import require

# Small generator settings for the slower properties (defaults: step 7, sigma 21).
FINE = dict(step=4, sigma=8.0)


def wrap(net: nn.Module, size, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)) -> ModelBundle:
    model = Normalized(net, mean, std)
    if not any(True for _ in model.parameters()):
        model.register_parameter("anchor", nn.Parameter(torch.zeros(1)))  # bundles find their device from a parameter
    return ModelBundle("toy", freeze(model), "net", input_size=tuple(size))


def cnn(size=(32, 32), seed=0, classes=5) -> ModelBundle:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 5, padding=2), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, classes),
    )
    return wrap(net, size)


class RegionEnergy(nn.Module):
    """Logit 0: high-frequency energy inside `region`; logit 1: outside it. Blur removes that
    energy, so the image keeps logit 0 exactly when the region is kept."""

    def __init__(self, region: torch.Tensor):
        super().__init__()
        self.register_buffer("region", region.float())

    def forward(self, x):
        detail = x - F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        energy = detail.pow(2).sum(1)
        inside = (energy * self.region).sum((1, 2)) / self.region.sum()
        outside = (energy * (1 - self.region)).sum((1, 2)) / (1 - self.region).sum()
        return 10 * torch.stack([inside, outside], 1)


def region_model(size=32):
    # A square region, symmetric under the horizontal flip of the jitter.
    region = torch.zeros(size, size, dtype=torch.bool)
    region[6:14, 12:20] = True
    return wrap(RegionEnergy(region), (size, size), (0.0,) * 3, (1.0,) * 3), region


# --------------------------------------------------------------------------------------------
# The pieces, by hand


def test_blur_is_a_normalised_gaussian_with_zero_padding():
    sigma = 2.0
    img = torch.zeros(1, 1, 21, 21)
    img[0, 0, 10, 10] = 1
    half = math.ceil(4 * sigma)
    k = torch.tensor([math.exp(-i * i / (2 * sigma ** 2)) for i in range(-half, half + 1)])
    k = k / k.sum()
    expected = torch.zeros(21, 21)
    expected[10 - half:10 + half + 1, 10 - half:10 + half + 1] = torch.outer(k, k)
    assert torch.allclose(gaussian_blur(img, sigma)[0, 0], expected, atol=1e-7)
    # Zero padding: mass near a border leaks out (TorchRay's imsmooth darkens borders).
    corner = torch.zeros(1, 1, 21, 21)
    corner[0, 0, 0, 0] = 1
    assert gaussian_blur(corner, sigma).sum() == pytest.approx(float(k[half:].sum()) ** 2, rel=1e-5)
    assert torch.equal(gaussian_blur(img, 0.0), img)


def test_pyramid_runs_from_most_perturbed_to_the_image():
    torch.manual_seed(1)
    x = torch.rand(2, 3, 24, 24)
    pyr = perturbation_pyramid(x)  # blur, 8 levels, σ_max 20
    assert pyr.shape == (2, 8, 3, 24, 24)
    assert torch.equal(pyr[:, -1], x)
    assert torch.allclose(pyr[:, 0], gaussian_blur(x, 20.0), atol=1e-6)
    assert torch.allclose(pyr[:, 4], gaussian_blur(x, 20.0 * (1 - 4 / 7)), atol=1e-6)
    # Each level keeps more detail than the one before.
    detail = (pyr - pyr.mean((-1, -2), keepdim=True)).pow(2).mean((0, 2, 3, 4))
    assert torch.all(detail[1:] > detail[:-1])
    fade = perturbation_pyramid(x, num_levels=5, kind="fade")
    for level in range(5):
        assert torch.allclose(fade[:, level], x * level / 4)


def test_perturb_interpolates_between_levels():
    torch.manual_seed(2)
    x = torch.rand(2, 3, 16, 16)
    pyr = perturbation_pyramid(x)
    ones = torch.ones(2, 1, 16, 16)
    assert torch.equal(perturb(pyr, ones)[:, 0], x)  # a mask of ones preserves the image
    assert torch.equal(perturb(pyr, 0 * ones)[:, 0], pyr[:, 0])
    assert torch.allclose(perturb(pyr, 0.5 * ones)[:, 0], (pyr[:, 3] + pyr[:, 4]) / 2, atol=1e-6)
    m = torch.rand(2, 3, 16, 16)  # three masks per image
    pos = m * 7
    lo = pos.floor().long()
    frac = (pos - lo)[:, :, None]
    levels = pyr[:, None].expand(2, 3, 8, 3, 16, 16)
    pick = lambda idx: levels.gather(2, idx[:, :, None, None].expand(2, 3, 1, 3, 16, 16)).squeeze(2)
    expected = (1 - frac) * pick(lo) + frac * pick((lo + 1).clamp(max=7))
    assert torch.allclose(perturb(pyr, m), expected, atol=1e-6)


@pytest.mark.parametrize("ops", ["chunked", "reference"])
def test_smooth_mask_of_one_parameter_by_hand(ops):
    gen = SmoothMasks((64, 64))  # step 7, sigma 21, coldness 20
    assert gen.grid == [10, 10] and gen.full == [106, 106]
    params = torch.zeros(1, 1, 10, 10)
    run = gen.reference if ops == "reference" else gen
    assert run(params)[1].abs().max() == 0
    params[0, 0, 4, 5] = 1.0  # centred on image pixel (28, 35)
    mask = run(params)[0][0, 0]
    # Within 20 px of the node every pixel pools it with K − 1 = 80 zero neighbours.
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    d = ((yy - 28) ** 2 + (xx - 35) ** 2).sqrt()
    w = torch.exp(-2 * (d / 21 - 0.5).clamp(min=0) ** 2)
    expected = w * torch.exp(20 * w) / (torch.exp(20 * w) + 80)
    near = d <= 20
    assert torch.allclose(mask[near], expected[near], rtol=1e-5, atol=1e-7)
    assert mask[28, 35] == pytest.approx(math.exp(20) / (math.exp(20) + 80), rel=1e-6)


def test_kernel_weights_are_periodic_with_the_step():
    # The default generator pools one pixel phase at a time with the weights of the first
    # step×step pixels: right only if TorchRay's per-pixel weights repeat with the step and pixel
    # (a + step·i, b + step·j) reads cell (i, j).
    for shape, options in (((224, 224), {}), ((40, 52), dict(step=5, sigma=11.0))):
        gen = SmoothMasks(shape, **options)
        s, (h, w) = gen.step, gen.full
        for a, b in ((0, 0), (s - 1, 2), (3, s - 1)):
            tiled = gen.phase_weight[a * s + b][:, None, None]
            assert torch.equal(gen.weight[0, :, a::s, b::s], tiled.expand(-1, len(range(a, h, s)), len(range(b, w, s))))
        cells = F.interpolate(torch.arange(gen.mid[0], dtype=torch.float32)[None, None], size=gen.up[0], mode="nearest")
        assert torch.equal(cells[0, 0, :h].long(), torch.arange(h) // s)


@pytest.mark.parametrize("options", [{}, dict(step=4, sigma=8.0), dict(step=5, sigma=11.0, coldness=200.0)])
def test_phase_pooling_equals_torchray_operations(options):
    # coldness 200 takes the exact per-pixel shift (in base 2, the cell-wise one would underflow).
    torch.manual_seed(3)
    gen = SmoothMasks((40, 52), **options)
    params = torch.rand(3, 1, *gen.grid)
    gm, gf = torch.rand(3, 1, 40, 52), torch.rand(3, 1, *gen.full)

    def run(fn):
        p = params.clone().requires_grad_(True)
        mask, full = fn(p)
        (grad,) = torch.autograd.grad((mask * gm).sum() + (full * gf).sum(), p)
        return mask, full, grad

    ref = run(gen.reference)
    # Blocks of one element (one row, one phase each), of a few phases, and the default budget.
    for budget in (1, 5000, None):
        got = run(lambda p: gen(p, budget=budget))
        # exp2 and the shift round differently from TorchRay's softmax: ~3e-6 apart.
        assert torch.allclose(got[0], ref[0], atol=1e-5) and torch.allclose(got[1], ref[1], atol=1e-5)
        assert torch.allclose(got[2], ref[2], rtol=1e-5, atol=2e-5 * ref[2].abs().max())


def test_area_term_ranks_as_the_sort_does():
    torch.manual_seed(8)
    areas, pixels = [0.1, 0.3], 500
    full = torch.rand(2 * 2, 1, 20, 25)  # 2 images × 2 areas, distinct values

    def term(exact, values):
        m = values.clone().requires_grad_(True)
        r = AreaRegulariser(pixels, areas, exact=exact)(m, 300.0)
        return r.detach(), torch.autograd.grad(r.sum(), m)[0]

    (sorted_r, sorted_g), (ranked_r, ranked_g) = term(True, full), term(False, full)
    assert torch.allclose(ranked_r, sorted_r, rtol=1e-6) and torch.equal(ranked_g, sorted_g)
    # By hand: r = 0 on the round-down((1 − a)·N) smallest values, 1 on the others.
    for row, area in enumerate(areas * 2):
        zeros = int(pixels * (1 - area))
        step = (full[row].flatten() >= full[row].flatten().sort()[0][zeros]).float()
        assert sorted_r[row].item() == pytest.approx(-300 * ((full[row].flatten() - step) ** 2).mean().item(), rel=1e-6)
    # Ties (the first masks are full of them) go either way, but never against the order.
    tied = (full * 4).round() / 4
    r, g = term(False, tied)
    assert torch.allclose(r, term(True, tied)[0], rtol=1e-6)
    target = tied.flatten(1) + g.flatten(1) * pixels / (2 * 300)  # −∂r/∂m = 2w/N·(m − step)
    for row, area in enumerate(areas * 2):
        ones = target[row] > 0.5
        assert ones.sum() == pixels - int(pixels * (1 - area))
        assert tied.flatten(1)[row][ones].min() >= tied.flatten(1)[row][~ones].max()


# --------------------------------------------------------------------------------------------
# The optimisation


def test_area_constraint_is_met_for_two_areas():
    bundle = cnn((32, 32))
    torch.manual_seed(4)
    x = torch.rand(2, 3, 32, 32)
    e = explain(bundle, x, [0, 3], "extremal", areas=[0.1, 0.3], iterations=200, **FINE)
    # `area`: fraction of the margin-inclusive mask above 0.5, what the regulariser ranks. The
    # smooth masks' soft edges sit a little outside the step (0.109 and 0.34 here, converged).
    target = torch.tensor([[0.1, 0.3]])
    assert torch.all((e.extras["area"] - target).abs() <= 0.15 * target)
    assert e.extras["masks"].shape == (2, 2, 32, 32)
    assert torch.all(e.extras["area_in_image"][:, 0] < e.extras["area_in_image"][:, 1])
    # The regulariser's own measure: the sorted mask went from far to close to its 0/1 step
    # (what remains are the soft edges).
    mse_start = -e.extras["regul_history"][..., 0] / 300
    mse_end = -e.extras["regul"] / (300 * 1.0035 ** 199)
    assert torch.all(mse_start > 0.4) and torch.all(mse_end < 0.1 * mse_start)


@pytest.mark.parametrize("variant", ["preserve", "delete"])
def test_mask_finds_the_region_the_class_depends_on(variant):
    bundle, region = region_model(32)
    torch.manual_seed(5)
    x = torch.rand(2, 3, 32, 32)
    e = explain(bundle, x, [0, 0], "extremal", areas=[0.08], iterations=150, variant=variant, **FINE)
    inside, outside = e.maps[:, region].mean(1), e.maps[:, ~region].mean(1)
    with torch.no_grad():
        clean = bundle.model(x)[:, 0]
        blurred = bundle.model(perturbation_pyramid(x)[:, 0])[:, 0]
    assert torch.all(blurred < 0.2 * clean)
    reward, history = e.extras["reward"][:, 0], e.extras["reward_history"][:, 0]
    if variant == "preserve":
        # Keeping the region keeps the detail: the mask is ~1 there and low elsewhere.
        assert torch.all(inside > 0.9) and torch.all(outside < 0.25)
        # The reward starts near the clean logit (the first mask is close to ones), falls as
        # the area constraint bites, then rises again as the mask settles on the region.
        assert torch.all(history[:, 0] > 0.75 * clean)
        assert torch.all(history.amin(1) < history[:, 0] - 0.1 * clean)
        assert torch.all(reward > 0.8 * clean)
        assert torch.all(reward > history.amin(1) + 0.1 * clean)
    else:
        # Half-way up the blur pyramid the detail is gone already, so deleting the region takes
        # a mask of ~0.5 there; it still stands well above the rest, and the logit is gone.
        assert torch.all(inside > 2 * outside)
        assert torch.all(-reward < 0.05 * clean)


def test_batch_gives_each_image_its_own_trajectory():
    bundle = cnn((32, 32), seed=1)
    torch.manual_seed(6)
    x, y = torch.rand(3, 3, 32, 32), torch.tensor([0, 4, 2])
    batch = explain(bundle, x, y, "extremal", areas=[0.1, 0.3], iterations=30)
    for i in range(3):
        alone = explain(bundle, x[i:i + 1], y[i:i + 1], "extremal", areas=[0.1, 0.3], iterations=30)
        assert torch.allclose(batch.extras["masks"][i], alone.extras["masks"][0], atol=1e-6)
        assert torch.allclose(batch.extras["reward_history"][i], alone.extras["reward_history"][0], atol=1e-6)
    # Each area also follows its own trajectory: asked alone, area 0.3 gives the same mask.
    single = explain(bundle, x, y, "extremal", areas=0.3, iterations=30)
    assert "masks" not in single.extras
    assert torch.allclose(single.maps, batch.extras["masks"][:, 1], atol=1e-6)
    # Several areas: the map is the mean of the masks, not renormalised.
    assert torch.allclose(batch.maps, batch.extras["masks"].mean(1))
    assert batch.maps.shape == (3, 32, 32) and batch.extras["reward"].shape == (3, 2)
    assert torch.allclose(batch.extras["objective"], batch.extras["reward"].mean(1))
    assert torch.equal(batch.extras["iterations"], torch.full((3,), 30))
    assert all(v.shape[0] == 3 for v in batch.extras.values())
    assert not batch.extras["constant"].any()
    assert all(p.grad is None for p in bundle.model.parameters())


def test_constant_map_is_flagged_and_zero():
    class Darkness(nn.Module):
        def forward(self, x):  # logit 0 rises as the image darkens; logit 1 ignores the image
            return torch.stack([-x.mean((1, 2, 3)), 0 * x.mean((1, 2, 3))], 1)

    bundle = wrap(Darkness(), (32, 32), (0.0,) * 3, (1.0,) * 3)
    x = torch.rand(2, 3, 32, 32)
    # One huge step towards black empties mask 0; mask 1 keeps its (non-constant) start.
    e = explain(bundle, x, [0, 1], "extremal", iterations=2, perturbation="fade", regul_weight=0.0, lr=1e4)
    assert e.extras["constant"].tolist() == [True, False]
    assert torch.all(e.maps[0] == 0) and e.maps[1].min() > 0.9 and e.maps[1].max() <= 1


def test_options_are_validated():
    bundle = cnn((16, 16))
    x = torch.rand(1, 3, 16, 16)
    bad = [
        (dict(variant="keep"), "extremal.variant: Input should be 'preserve', 'delete' or 'dual', got 'keep'"),
        (dict(areas=[]), r"extremal.areas: Value should have at least 1 item"),
        (dict(areas=[0.1, 1.0]), r"extremal.areas\[1\]: Input should be less than 1, got 1.0 \(allowed: number in \(0, 1\)\)"),
        (dict(areas=0.0), r"extremal.areas\[0\]: Input should be greater than 0, got 0.0"),
        (dict(areas=[-0.2]), r"extremal.areas\[0\]: Input should be greater than 0, got -0.2"),
        (dict(perturbation="noise"), "extremal.perturbation: Input should be 'blur' or 'fade', got 'noise'"),
        (dict(reward="prob"), "extremal.reward: Input should be 'logit' or 'contrastive', got 'prob'"),
        (dict(iterations=0), r"extremal.iterations: Input should be greater than or equal to 1, got 0"),
        (dict(num_levels=1), "extremal.num_levels: Input should be greater than or equal to 2, got 1"),
        (dict(step=0), "extremal.step: Input should be greater than or equal to 1, got 0"),
        (dict(momentum=1.0), r"extremal.momentum: Input should be less than 1, got 1.0 \(allowed: number in \[0, 1\)\)"),
        (dict(max_iter=5), "extremal.max_iter: unknown field"),
    ]
    for options, message in bad:
        with pytest.raises(ValueError, match=message):
            explain(bundle, x, [0], "extremal", **options)


# --------------------------------------------------------------------------------------------
# TorchRay itself


def torchray_masks(bundle, x, targets, nudged=False, **kw):
    """TorchRay's masks and history, one image at a time; `nudged`: with its mask kernel's weights
    moved up by one ulp (what a change of float rounding does to it)."""
    require("torchray.attribution.extremal_perturbation")
    with torchray_extremal(nudged) as extremal_perturbation:
        out = [extremal_perturbation(bundle.model, x[i:i + 1], int(t), **kw) for i, t in enumerate(targets)]
    masks = torch.stack([m[:, 0] for m, _ in out])
    hist = torch.stack([h for _, h in out])  # B×A×(reward, regul)×T
    return masks, hist


@pytest.mark.parametrize("case", [
    dict(),
    dict(variant="delete", jitter=False),
    dict(variant="dual", perturbation="fade"),
    dict(reward="contrastive", num_levels=5, step=5, sigma=11.0),
])
def test_same_masks_as_torchray(case):
    ep = require("torchray.attribution.extremal_perturbation")
    bundle = cnn((40, 40), seed=2)
    torch.manual_seed(7)
    x, y = torch.rand(2, 3, 40, 40), [1, 3]
    case = dict(case)
    reward = case.pop("reward", "logit")
    reward_func = ep.simple_reward if reward == "logit" else ep.contrastive_reward
    areas = [0.1] if reward == "contrastive" else [0.1, 0.3]  # TorchRay's contrastive reward assumes one area
    T = 25
    ref, hist = torchray_masks(bundle, x, y, areas=areas, max_iter=T, reward_func=reward_func, **case)
    ours = explain(bundle, x, y, "extremal", areas=areas, iterations=T, reward=reward, torchray_ops=True, **case)
    masks = ours.extras.get("masks", ours.maps[:, None])
    # Bit for bit at TorchRay's defaults; other settings reorder a few float operations.
    assert torch.allclose(masks, ref, atol=0 if not case and reward == "logit" else 1e-5, rtol=0)
    assert torch.allclose(ours.extras["reward_history"], hist[:, :, 0], atol=1e-5, rtol=1e-5)
    assert torch.allclose(ours.extras["regul_history"], hist[:, :, 1], atol=1e-4, rtol=1e-5)
    # The default path rounds differently (base-2 phase pooling) and orders the first masks'
    # exact ties otherwise (topk, where TorchRay runs an unstable sort); the optimisation
    # amplifies both. So it is held to TorchRay as TorchRay is held to itself: the first mask
    # (no step yet) within rounding; after 3 steps (masks down from ~1 to ~0.7) no further from
    # TorchRay than twice TorchRay's own drift when its kernel weights move by one ulp (measured:
    # 0.5-0.95 times that drift in these four cases, 2e-4 to 1.4e-3).
    fast = explain(bundle, x, y, "extremal", areas=areas, iterations=1, reward=reward, **case)
    ref1, _ = torchray_masks(bundle, x, y, areas=areas, max_iter=1, reward_func=reward_func, **case)
    assert torch.allclose(fast.extras.get("masks", fast.maps[:, None]), ref1, atol=1e-5, rtol=0)
    fast = explain(bundle, x, y, "extremal", areas=areas, iterations=3, reward=reward, **case)
    ref3, _ = torchray_masks(bundle, x, y, areas=areas, max_iter=3, reward_func=reward_func, **case)
    nudged3, _ = torchray_masks(bundle, x, y, nudged=True, areas=areas, max_iter=3, reward_func=reward_func, **case)
    drift = (nudged3 - ref3).abs().max()
    assert drift > 1e-4  # the nudge did reorder the ties
    assert (fast.extras.get("masks", fast.maps[:, None]) - ref3).abs().max() <= 2 * drift
