"""Opti-CAM against a plain per-image reference written here from SPEC §3.

The reference optimises one image at a time with `torch.optim.Adam` on u ∈ R^K:
    S = Σ_k softmax(u)_k A_k,  mask = n(up(S)),  F = f(x ⊙ mask)_c  (or −|f(x)_c − F| for `diff`)
maximised by minimising −F, with the documented early-stop and selection rules. The batched
implementation (one hand-written Adam over a shrinking batch) must give the same maps, objectives,
iteration counts and stop flags, for every image, whatever the others do. Everything runs in
float64 so that "the same" can mean 1e-8.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from opticam_core import explain
from opticam_core.hooks import capture

from . import _toys

TOL = dict(atol=1e-8, rtol=1e-8)


def layer_features(bundle, x):
    with torch.no_grad(), capture(bundle.target) as cap:
        bundle.model(x)
    return bundle.features(cap.output)


def reference(bundle, x, c, *, iterations=100, lr=0.1, objective="mask", normalization="range",
              early_stop=False, check_every=None, select="best", activation=None):
    """One image (x: 1×3×H×W, class c), written the slow obvious way. Returns a dict like extras."""
    feats = layer_features(bundle, x)[0]
    if activation == "relu":
        feats = feats.clamp_min(0)
    size = x.shape[-2:]
    with torch.no_grad():
        clean = bundle.model(x)[0, c]
    check_every = check_every or max(1, iterations // 10)

    def mask_of(u):
        s = (torch.softmax(u, 0)[:, None, None] * feats).sum(0)
        up = F.interpolate(s[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        if normalization == "range":
            return (up - up.min()) / (up.max() - up.min())
        if normalization == "max":
            return up / up.max()
        return torch.sigmoid(up)

    def objective_of(u):
        mask = mask_of(u)
        kept = bundle.model(x * mask)[0, c]
        removed = bundle.model(x * (1 - mask))[0, c]  # the image without its salient part
        value = {"mask": kept, "diff": -(clean - kept).abs(), "iomask": kept - removed,
                 "iodiff": -(clean - kept).abs() + (clean - removed).abs()}[objective]
        return value, mask

    u = torch.full((feats.shape[0],), 0.5, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.Adam([u], lr=lr)
    history, best, best_u, stopped, steps = [], -math.inf, None, False, 0
    start = check = None
    for step in range(iterations):
        f, _ = objective_of(u)
        fv = f.item()
        history.append(fv)
        if step == 0:
            start = check = fv
        if fv > best:
            best, best_u = fv, u.detach().clone()
        opt.zero_grad()
        (-f).backward()
        opt.step()
        steps += 1
        if early_stop and (step + 1) % check_every == 0 and step + 1 < iterations:
            if fv < check:
                stopped = True
                break
            check = fv
    with torch.no_grad():
        f_last, mask_last = objective_of(u)
        if select == "best" and iterations > 0:
            if f_last.item() > best:
                best, best_u = f_last.item(), u.detach().clone()
            chosen_f, chosen_mask = best, objective_of(best_u)[1]
        else:
            chosen_f, chosen_mask = f_last.item(), mask_last
            if iterations == 0:
                start = chosen_f
    return {"map": chosen_mask, "objective": chosen_f, "objective_start": start, "iterations": steps,
            "early_stopped": stopped, "history": history, "last": f_last.item()}


def assert_matches_reference(bundle, x, t, exp, **options):
    for i in range(x.shape[0]):
        ref = reference(bundle, x[i:i + 1], int(t[i]), **options)
        torch.testing.assert_close(exp.maps[i], ref["map"], **TOL)
        assert exp.extras["iterations"][i].item() == ref["iterations"], i
        assert exp.extras["early_stopped"][i].item() == ref["early_stopped"], i
        assert exp.extras["objective"][i].item() == pytest.approx(ref["objective"], rel=1e-9, abs=1e-9)
        assert exp.extras["objective_start"][i].item() == pytest.approx(ref["objective_start"], rel=1e-9, abs=1e-9)
        hist = exp.extras["objective_history"][i]
        n = ref["iterations"]
        torch.testing.assert_close(hist[:n], torch.tensor(ref["history"], dtype=hist.dtype), **TOL)
        assert torch.isnan(hist[n:]).all()


@pytest.fixture(scope="module")
def cnn():
    return _toys.cnn_bundle()


@pytest.fixture(scope="module")
def batch():
    return _toys.images(6, seed=0), _toys.targets(6, seed=0)


def test_matches_reference_paper_defaults(cnn, batch):
    x, t = batch
    exp = explain(cnn, x[:3], t[:3], "opticam", iterations=30)
    assert exp.maps.shape == (3, *x.shape[-2:])
    assert_matches_reference(cnn, x[:3], t[:3], exp, iterations=30)
    # the optimisation did something: every image improved on the uniform start
    assert (exp.extras["objective"] > exp.extras["objective_start"] + 1e-3).all()


def test_defaults_are_the_papers():
    from opticam_core import method_options

    opts = method_options("opticam")
    assert (opts["iterations"], opts["lr"], opts["objective"], opts["normalization"], opts["init"]) == (
        100, 0.1, "mask", "range", 0.5)


@pytest.mark.parametrize("normalization", ["range", "max", "sigmoid"])
@pytest.mark.parametrize("objective", ["mask", "diff", "iomask", "iodiff"])
def test_matches_reference_variants(cnn, batch, objective, normalization):
    x, t = batch
    opts = dict(iterations=12, lr=0.2, objective=objective, normalization=normalization)
    exp = explain(cnn, x[:2], t[:2], "opticam", **opts)
    assert_matches_reference(cnn, x[:2], t[:2], exp, **opts)


@pytest.mark.parametrize("select", ["best", "last"])
def test_matches_reference_with_early_stop(cnn, batch, select):
    """Seed 0, lr 0.1, a check every 2 steps: images 3 and 5 stop early, the others run on."""
    x, t = batch
    opts = dict(iterations=20, lr=0.1, early_stop=True, check_every=2, select=select)
    exp = explain(cnn, x, t, "opticam", **opts)
    stopped = exp.extras["early_stopped"]
    assert stopped.any() and not stopped.all(), stopped  # the case under test really happens
    assert (exp.extras["iterations"][stopped] < 20).all()
    assert (exp.extras["iterations"][~stopped] == 20).all()
    assert_matches_reference(cnn, x, t, exp, **opts)


def test_early_stop_of_one_image_leaves_the_others_unchanged(cnn, batch):
    x, t = batch
    opts = dict(iterations=20, lr=0.1, early_stop=True, check_every=2)
    together = explain(cnn, x, t, "opticam", **opts)
    stopped = together.extras["early_stopped"]
    assert stopped.any() and not stopped.all()
    runners = (~stopped).nonzero()[:, 0]
    # the runners alone, without the images that stopped, and without early stopping at all
    alone = explain(cnn, x[runners], t[runners], "opticam", **opts)
    never = explain(cnn, x[runners], t[runners], "opticam", **{**opts, "early_stop": False})
    for other in (alone, never):
        torch.testing.assert_close(together.maps[runners], other.maps, **TOL)
        torch.testing.assert_close(together.extras["objective"][runners], other.extras["objective"], **TOL)
    # and each stopped image is what it would be alone
    for i in stopped.nonzero()[:, 0].tolist():
        one = explain(cnn, x[i:i + 1], t[i:i + 1], "opticam", **opts)
        torch.testing.assert_close(together.maps[i:i + 1], one.maps, **TOL)
        assert one.extras["iterations"].item() == together.extras["iterations"][i].item()


def test_objective_never_ends_below_its_start(cnn, batch):
    """select='best' (default) keeps the best iterate, so even a wild learning rate cannot lose ground."""
    x, t = batch
    for lr in (0.1, 3.0):
        exp = explain(cnn, x, t, "opticam", iterations=15, lr=lr)
        assert (exp.extras["objective"] >= exp.extras["objective_start"]).all()
        hist = exp.extras["objective_history"]
        assert (exp.extras["objective"] >= hist.nan_to_num(-math.inf).amax(1) - 1e-12).all()


def test_best_versus_last(cnn, batch):
    """'best' ≥ 'last' per image (the best is a max over iterates that include the last); with a
    large learning rate they really differ; and each reported objective is the logit of the
    image masked by the map that comes back."""
    x, t = batch
    best = explain(cnn, x, t, "opticam", iterations=15, lr=3.0, select="best")
    last = explain(cnn, x, t, "opticam", iterations=15, lr=3.0, select="last")
    assert (best.extras["objective"] >= last.extras["objective"] - 1e-12).all()
    assert (best.extras["objective"] > last.extras["objective"] + 1e-6).any()
    for exp in (best, last):
        with torch.no_grad():
            masked = cnn.model(x * exp.maps[:, None]).gather(1, t[:, None])[:, 0]
        torch.testing.assert_close(exp.extras["objective"], masked, **TOL)


def test_diff_objective_definition(cnn, batch):
    x, t = batch
    exp = explain(cnn, x, t, "opticam", iterations=10, objective="diff")
    with torch.no_grad():
        clean = cnn.model(x).gather(1, t[:, None])[:, 0]
        masked = cnn.model(x * exp.maps[:, None]).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(exp.extras["objective"], -(clean - masked).abs(), **TOL)
    assert (exp.extras["objective"] <= 0).all()
    assert (exp.extras["objective"] >= exp.extras["objective_start"]).all()


def test_in_out_objectives_definition(cnn, batch):
    """App. F: the in-out objectives also score the image without the map; reported objectives
    are those definitions evaluated on the returned maps."""
    x, t = batch
    with torch.no_grad():
        clean = cnn.model(x).gather(1, t[:, None])[:, 0]
    for objective in ("iomask", "iodiff"):
        exp = explain(cnn, x, t, "opticam", iterations=6, objective=objective)
        with torch.no_grad():
            kept = cnn.model(x * exp.maps[:, None]).gather(1, t[:, None])[:, 0]
            removed = cnn.model(x * (1 - exp.maps[:, None])).gather(1, t[:, None])[:, 0]
        expected = kept - removed if objective == "iomask" else -(clean - kept).abs() + (clean - removed).abs()
        torch.testing.assert_close(exp.extras["objective"], expected, **TOL)
        assert (exp.extras["objective"] >= exp.extras["objective_start"]).all()


def test_normalizations_per_definition(cnn, batch):
    """range: min 0 and max 1 exactly; max: max 1, min > 0 (the ReLU features are positive, so
    no pixel is zeroed); sigmoid: σ(S) ≥ σ(0) = 1/2 for S ≥ 0, never 1. And they differ."""
    x, t = batch
    maps = {n: explain(cnn, x, t, "opticam", iterations=5, normalization=n).maps for n in ("range", "max", "sigmoid")}
    flat = {n: m.flatten(1) for n, m in maps.items()}
    torch.testing.assert_close(flat["range"].amin(1), torch.zeros(len(x), dtype=x.dtype))
    torch.testing.assert_close(flat["range"].amax(1), torch.ones(len(x), dtype=x.dtype))
    torch.testing.assert_close(flat["max"].amax(1), torch.ones(len(x), dtype=x.dtype))
    assert (flat["max"].amin(1) > 0).all()
    assert (flat["sigmoid"] >= 0.5).all() and (flat["sigmoid"] < 1).all()
    assert (flat["max"] - flat["range"]).abs().max() > 1e-3


def test_zero_iterations_is_the_uniform_map(cnn, batch):
    x, t = batch
    exp = explain(cnn, x, t, "opticam", iterations=0)
    feats = layer_features(cnn, x)
    from opticam_core.maps import normalize, upsample

    torch.testing.assert_close(exp.maps, normalize(upsample(feats.mean(1), x.shape[-2:])), **TOL)
    torch.testing.assert_close(exp.extras["objective"], exp.extras["objective_start"])
    assert (exp.extras["iterations"] == 0).all()


def test_vit_matches_reference_with_and_without_relu():
    vit = _toys.vit_bundle()
    x, t = _toys.images(2, seed=5), _toys.targets(2, seed=5)
    for activation in (None, "relu"):
        opts = dict(iterations=8, lr=0.3, activation=activation)
        exp = explain(vit, x, t, "opticam", **opts)
        assert_matches_reference(vit, x, t, exp, **opts)


@pytest.mark.parametrize("bad", [dict(objective="logit"), dict(normalization="minmax"), dict(select="first"),
                                 dict(activation="gelu"), dict(iterations=-1), dict(momentum=0.9)])
def test_bad_options_are_refused(cnn, batch, bad):
    x, t = batch
    with pytest.raises(ValueError) as err:
        explain(cnn, x[:1], t[:1], "opticam", **bad)
    assert list(bad)[0] in str(err.value) or str(list(bad.values())[0]) in str(err.value)
