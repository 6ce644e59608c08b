"""What every method owes the caller besides a correct map (issue 2 §3): no parameter gradients,
no hooks left behind (also when something raises half-way), no memory growth over many calls,
the constant-map rule (zeros, flagged, no NaN), and input/option checking."""

from __future__ import annotations

import gc
import re

import pytest
import torch
from torch import nn

from opticam_core import METHODS, explain, method_options
from opticam_core.hooks import hook_count
from opticam_core.maps import constant_maps, finish, normalize
from opticam_core.methods import method_spec
from opticam_core.options import OptionsError

from . import _toys

#: Small settings so that every method runs in milliseconds on the toys.
#: Cheap settings; LIME's default quickshift makes one superpixel of a 32×32 toy image (a
#: correctly constant map), so a smaller kernel gives it several.
FAST = {"opticam": {"iterations": 3}, "extremal": {"iterations": 2},
        "lime": {"num_samples": 50, "quickshift_kernel_size": 1.5}}
#: Methods that serve only some models (the attention methods: timm ViT/DeiT blocks); the tiny
#: CNN is refused by them (tests/test_attention.py), so they run here on the tiny ViT only.
RESTRICTED = [m for m in METHODS if method_spec(m).requires is not None]
CAMS = [m for m in METHODS if m not in ("fakecam", "extremal", *RESTRICTED)]  # maps computed from the model


def run(bundle, x, t, method, **options):
    return explain(bundle, x, t, method, **{**FAST.get(method, {}), **options})


@pytest.fixture(scope="module")
def batch():
    return _toys.images(2, seed=11, dtype=torch.float32), _toys.targets(2, seed=11)


def _bundles():
    return {"cnn": _toys.cnn_bundle(dtype=torch.float32), "vit": _toys.vit_bundle(dtype=torch.float32)}


@pytest.fixture(scope="module")
def bundles():
    return _bundles()


# --------------------------------------------------------------------------------------------
# No parameter gradients


@pytest.mark.parametrize("kind", ["cnn", "vit"])
@pytest.mark.parametrize("method", METHODS)
def test_no_parameter_gradient_frozen(bundles, batch, kind, method):
    bundle = bundles[kind]
    x, t = batch
    if not method_spec(method).serves(bundle):
        with pytest.raises(ValueError, match="accepts"):
            run(bundle, x, t, method)
        assert all(p.grad is None and not p.requires_grad for p in bundle.model.parameters())
        return
    res = run(bundle, x, t, method)
    assert res.maps.shape == (2, *x.shape[-2:]) and not res.maps.requires_grad
    assert res.maps.min() >= 0 and res.maps.max() <= 1
    assert not bundle.model.training
    for name, p in bundle.model.named_parameters():
        assert p.grad is None and not p.requires_grad, name


@pytest.mark.parametrize("method", METHODS)
def test_no_parameter_gradient_even_when_parameters_require_grad(batch, method):
    """A caller may hand over an unfrozen network: methods use autograd.grad on what they need,
    never .backward(), so no .grad appears on any parameter all the same."""
    for bundle in _bundles().values():
        if not method_spec(method).serves(bundle):
            continue
        bundle.model.requires_grad_(True)
        x, t = batch
        run(bundle, x, t, method)
        assert all(p.grad is None for p in bundle.model.parameters())


def test_freeze_contract_of_bundles(bundles):
    for bundle in bundles.values():
        assert not bundle.model.training
        assert not any(p.requires_grad for p in bundle.model.parameters())


# --------------------------------------------------------------------------------------------
# Memory and hooks over many calls


def _tensor_count() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


def test_hundred_calls_leave_memory_and_hooks_flat(bundles, batch):
    bundle = bundles["cnn"]
    x, t = batch
    keys = [*CAMS]
    options = {k: FAST.get(k, {}) for k in keys}
    for _ in range(10):  # warm-up: allocator pools, lazy imports, caches
        explain(bundle, x, t, keys, **options)
    tensors, rss = _tensor_count(), _rss_bytes()
    for _ in range(100):
        out = explain(bundle, x, t, keys, **options)
        assert hook_count(bundle.model) == 0
    del out
    grown_tensors = _tensor_count() - tensors
    grown_rss = _rss_bytes() - rss
    assert grown_tensors <= 0, grown_tensors
    assert grown_rss < 16 * 2**20, f"RSS grew by {grown_rss / 2**20:.1f} MiB over 100 calls"


def test_hooks_flat_on_transformer(bundles, batch):
    bundle = bundles["vit"]
    x, t = batch
    keys = [*CAMS, *RESTRICTED]
    for _ in range(20):
        explain(bundle, x, t, keys, **{k: FAST.get(k, {}) for k in keys})
        assert hook_count(bundle.model) == 0


# --------------------------------------------------------------------------------------------
# Hooks come off after an exception raised inside a method


class Bomb(nn.Module):
    """Identity that raises on its `fuse`-th call once armed (fuse=1: the first call)."""

    def __init__(self):
        super().__init__()
        self.fuse = None
        self.calls = 0

    def arm(self, fuse: int | None):
        self.fuse, self.calls = fuse, 0

    def forward(self, x):
        self.calls += 1
        if self.fuse is not None and self.calls >= self.fuse:
            raise RuntimeError("boom")
        return x


@pytest.fixture()
def rigged():
    """tiny_cnn with a Bomb at the start of the head: after the target layer, inside the tail."""
    net = _toys.tiny_cnn(dtype=torch.float32)
    bomb = Bomb()
    net.head.insert(0, bomb)
    bundle = _toys.bundle_for(net, "features.10", tail=net.head, prefix_tokens=None)
    assert bundle.tail is not None
    return bundle, bomb


@pytest.mark.parametrize("method, fuse, options", [
    ("gradcam", 1, {}),                                   # the shared forward/backward
    ("scorecam", 1, {}),                                  # the features forward
    ("scorecam", 3, {"batch_size": 3}),                   # a masked chunk, half-way
    ("ablationcam", 3, {"batch_size": 3}),                # the tail, half-way
    ("ablationcam", 3, {"batch_size": 3, "use_tail": False}),  # a hooked full forward, half-way
    ("opticam", 4, {"iterations": 10}),                   # iteration 3 of 10
    (["gradcam", "scorecam", "opticam"], 2, {}),          # several methods sharing passes
])
def test_hooks_removed_after_exception(rigged, batch, method, fuse, options):
    bundle, bomb = rigged
    x, t = batch
    keys = [method] if isinstance(method, str) else method
    reference = {k: explain(bundle, x, t, k, **{**FAST.get(k, {}), **options}).maps for k in keys}
    assert hook_count(bundle.model) == 0
    bomb.arm(fuse)
    with pytest.raises(RuntimeError, match="boom"):
        if isinstance(method, str):
            explain(bundle, x, t, method, **{**FAST.get(method, {}), **options})
        else:
            explain(bundle, x, t, method, **{k: {**FAST.get(k, {}), **options} for k in keys})
    assert hook_count(bundle.model) == 0
    bomb.arm(None)
    for k in keys:  # the model works as before: nothing was left replaced or captured
        torch.testing.assert_close(explain(bundle, x, t, k, **{**FAST.get(k, {}), **options}).maps, reference[k])


@pytest.mark.parametrize("method, options", [
    ("scorecam", {"batch_size": 0}), ("ablationcam", {"batch_size": 0}), ("ablationcam", {"batch_size": -2}),
    ("ablationcam", {"batch_size": 0, "use_tail": False}),
])
def test_bad_chunk_size_fails_cleanly(bundles, batch, method, options):
    """Found by this test: the tail path of Ablation-CAM took batch_size=0 as 'default' and a
    negative one as 'no chunks', returning all-zero weights without a word."""
    bundle = bundles["cnn"]
    x, t = batch
    with pytest.raises(ValueError, match="batch_size"):
        explain(bundle, x, t, method, **options)
    assert hook_count(bundle.model) == 0


def test_hooks_removed_when_the_layer_output_is_not_a_tensor(batch):
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Conv2d(3, 4, 3, padding=1)
            self.pair = Pair()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            a, _ = self.pair(self.body(x))
            return self.fc(a.mean((2, 3)))

    bundle = _toys.bundle_for(Net(), "pair", tail=None, prefix_tokens=None)
    x, t = batch
    for method in ("gradcam", "scorecam"):
        with pytest.raises(TypeError, match="not a tensor"):
            explain(bundle, x, [0, 1], method)
        assert hook_count(bundle.model) == 0


# --------------------------------------------------------------------------------------------
# The constant-map rule


@pytest.fixture(scope="module")
def dead():
    """tiny_cnn whose target layer outputs zeros everywhere (last conv silenced, BN shifted below 0)."""
    net = _toys.tiny_cnn(dtype=torch.float32)
    conv, bn = net.features[8], net.features[9]
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        bn.running_mean.zero_()
        bn.bias.fill_(-1.0)
    return _toys.bundle_for(net, "features.10", tail=net.head, prefix_tokens=None)


@pytest.mark.parametrize("method", CAMS)
def test_constant_layer_gives_zero_maps_flagged(dead, batch, method):
    x, t = batch
    res = run(dead, x, t, method)
    assert torch.isfinite(res.maps).all()
    assert (res.maps == 0).all()
    assert res.extras["constant"].dtype == torch.bool and res.extras["constant"].all()
    for name, value in res.extras.items():
        if value.is_floating_point() and name != "objective_history":
            assert torch.isfinite(value).all(), name


@pytest.mark.parametrize("normalization, value", [("range", 0.0), ("max", 0.0), ("sigmoid", 0.5)])
def test_constant_layer_opticam_normalizations(dead, batch, normalization, value):
    """range/max follow the rule (zeros); sigmoid has no division, σ(0) = 1/2 is its honest map."""
    x, t = batch
    res = explain(dead, x, t, "opticam", iterations=4, normalization=normalization)
    assert torch.isfinite(res.maps).all() and (res.maps == value).all()
    assert res.extras["constant"].all()
    assert torch.isfinite(res.extras["objective_history"]).all()


class GatedCNN(_toys.TinyCNN):
    """tiny_cnn whose target layer (`gate`) outputs zeros for an image without spatial structure."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Identity()

    def forward(self, x):
        flat = x.flatten(2).std(-1).amax(1) < 1e-6  # a uniform image, whatever its colour
        return self.head(self.gate(self.features(x) * (~flat).to(x.dtype)[:, None, None, None]))


@pytest.mark.parametrize("method", CAMS)
def test_one_constant_image_does_not_disturb_the_others(batch, method):
    """A uniform grey image next to a real one: only the grey one is flagged and zeroed; the
    real one's map is what it is alone."""
    net = GatedCNN()
    net.load_state_dict(_toys.tiny_cnn(dtype=torch.float32).state_dict())
    bundle = _toys.bundle_for(net.eval(), "gate", tail="auto", prefix_tokens=None)
    x, t = batch
    mixed = torch.cat([x[:1], torch.full_like(x[:1], 0.5)])
    both = run(bundle, mixed, t, method)
    one = run(bundle, x[:1], t[:1], method)
    assert both.extras["constant"].tolist() == [False, True]
    assert torch.isfinite(both.maps).all() and (both.maps[1] == 0).all()
    torch.testing.assert_close(both.maps[:1], one.maps, atol=1e-5, rtol=0)


def test_normalize_rule_units():
    maps = torch.stack([torch.full((4, 4), 3.0), torch.arange(16.0).view(4, 4), torch.zeros(4, 4)])
    out = normalize(maps)
    assert (out[0] == 0).all() and (out[2] == 0).all()
    torch.testing.assert_close(out[1], torch.arange(16.0).view(4, 4) / 15)
    assert constant_maps(maps).tolist() == [True, False, True]
    # tiny but genuine variation of a large map is not "constant" ... and relative noise is
    wobble = torch.full((4, 4), 1000.0)
    wobble[0, 0] += 1e-2
    assert not constant_maps(wobble[None]).item()
    wobble[0, 0] = 1000.0 + 1e-7
    assert constant_maps(wobble[None]).item()
    m, flags = finish(maps[:, :2, :2], (8, 8))
    assert m.shape == (3, 8, 8) and flags.tolist() == [True, False, True]
    assert torch.isfinite(normalize(maps, "max")).all() and (normalize(maps, "max")[2] == 0).all()
    with pytest.raises(ValueError, match="normalization"):
        normalize(maps, "l2")


# --------------------------------------------------------------------------------------------
# Inputs and options


def test_explain_checks_inputs_and_options(bundles, batch):
    bundle = bundles["cnn"]
    x, t = batch
    with pytest.raises(ValueError, match="unknown method"):
        explain(bundle, x, t, "gradcam2")
    with pytest.raises(OptionsError, match="gradcam.iterations: unknown field; allowed: none"):
        explain(bundle, x, t, "gradcam", iterations=3)
    with pytest.raises(ValueError, match="per method"):
        explain(bundle, x, t, ["gradcam", "opticam"], iterations=3)
    with pytest.raises(ValueError, match="twice"):
        explain(bundle, x, t, ["gradcam", "gradcam"])
    with pytest.raises(ValueError, match=r"\[0,1\]"):
        explain(bundle, x * 255, t, "gradcam")
    with pytest.raises(ValueError, match="float"):
        explain(bundle, (x * 255).to(torch.uint8), t, "gradcam")
    with pytest.raises(ValueError, match="targets"):
        explain(bundle, x, [0], "gradcam")
    with pytest.raises(ValueError, match="B×3×H×W"):
        explain(bundle, x[0], t, "gradcam")
    # A bad value names the option, the value and what it accepts, before any pass runs.
    for method, option, bad, expected in [
            ("opticam", "objective", "entropy", "Input should be 'mask', 'diff', 'iomask' or 'iodiff', got 'entropy'"),
            ("opticam", "normalization", "minmax", "got 'minmax' (allowed: one of 'range', 'max', 'sigmoid')"),
            ("opticam", "iterations", "100", "got '100' (allowed: integer ≥ 0)"),
            ("opticam", "iterations", -5, "got -5 (allowed: integer ≥ 0)"),
            ("opticam", "lr", 0, "Input should be greater than 0, got 0"),
            ("opticam", "early_stop", "yes", "Input should be true or false"),
            ("extremal", "reward", "prob", "'logit' or 'contrastive', got 'prob'"),
            ("extremal", "areas", [0.1, 1.5], "areas[1]: Input should be less than 1, got 1.5"),
            ("extremal", "areas", [], "at least 1 item"),
            ("scorecam", "batch_size", 0, "got 0 (allowed: null or integer ≥ 1)")]:
        with pytest.raises(OptionsError, match=re.escape(f"{method}.") + ".*" + re.escape(expected)):
            run(bundle, x, t, method, **{option: bad})
    with pytest.raises(OptionsError) as info:  # every bad option of a call at once
        explain(bundle, x, t, ["opticam", "extremal"], opticam={"lr": -1, "iterations": 1.5}, extremal={"step": 0})
    assert len(info.value.problems) == 3
    assert hook_count(bundle.model) == 0


def test_list_of_methods_returns_in_order_with_per_method_options(bundles, batch):
    bundle = bundles["cnn"]
    x, t = batch
    res = explain(bundle, x, t, ["opticam", "gradcam", "fakecam"], opticam={"iterations": 2})
    assert list(res) == ["opticam", "gradcam", "fakecam"]
    assert (res["opticam"].extras["iterations"] == 2).all()
    assert res["opticam"].options == {**method_options("opticam"), "iterations": 2, "betas": [0.9, 0.999]}
    assert all(r.seconds > 0 for r in res.values())
    fake = res["fakecam"].maps
    assert fake[:, 0, 0].eq(0).all() and fake.sum().item() == fake.numel() - len(x)
