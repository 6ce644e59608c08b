"""Precision (fp32 / tf32 / bf16) and compiled passes (`opticam_core.precision`): fp32 is today's
computation bit for bit, bf16 runs only the network in bfloat16 (maps, optimiser state and the
metrics' probabilities stay float), tf32's flags come back, bad values are named, and the run
config records the precision in the fingerprint."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

from opticam_core import explain
from opticam_core.methods import extremal as extremal_module
from opticam_core.methods import opticam as opticam_module
from opticam_core.metrics import compute
from opticam_core.precision import (
    CompileUnavailable,
    active,
    cuda_tf32,
    precision,
    same_precision,
)
from pipeline.config import ConfigError, load_config
from pipeline.fingerprint import changes, conflict_message, fingerprints
from tests import _toys as T
from tests._samples import TOY_METRICS, TOY_MODEL, photo_rows, toy_config

B = 4


@pytest.fixture(scope="module")
def toy():
    """A float32 toy CNN (autocast leaves float64 alone) and its inputs."""
    return T.cnn_bundle(dtype=torch.float32), T.images(B, dtype=torch.float32), T.targets(B)


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


FAST = {"gradcam": {}, "scorecam": {}, "ablationcam": {}, "opticam": {"iterations": 10},
        "extremal": {"iterations": 10}, "fakecam": {}}


# ------------------------------------------------------------------------------------------
# fp32 and tf32: nothing changes


@pytest.mark.parametrize("name", ["fp32", "tf32"])
def test_fp32_and_cpu_tf32_are_todays_computation_bit_for_bit(toy, name):
    bundle, x, t = toy
    before = dict(bundle.model.__dict__)
    for method, opts in FAST.items():
        ref = explain(bundle, x, t, method, **opts)
        got = explain(bundle, x, t, method, precision=name, **opts)
        assert torch.equal(ref.maps, got.maps), method
        for k, v in ref.extras.items():
            assert torch.equal(v, got.extras[k]) or (v.is_floating_point() and torch.equal(v.isnan(), got.extras[k].isnan())
                                                     and torch.equal(v.nan_to_num(), got.extras[k].nan_to_num())), (method, k)
    maps = ref.maps
    a = compute(bundle, x, t, maps, which=["classification", "insertion_deletion"])
    b = compute(bundle, x, t, maps, which=["classification", "insertion_deletion"], precision=name)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with precision(name, bundle.model):  # the model is not even touched
        assert dict(bundle.model.__dict__) == before


# ------------------------------------------------------------------------------------------
# bf16: the network in bfloat16, the rest in float32


def test_bf16_runs_the_network_in_bfloat16_and_hands_back_float32_logits(toy):
    bundle, x, _ = toy
    seen = []
    conv = bundle.model.net.features[0]
    handle = conv.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    try:
        with precision("bf16", bundle.model):
            logits = bundle.model(x)
        plain = bundle.model(x)
    finally:
        handle.remove()
    assert seen == [torch.bfloat16, torch.float32]  # autocast inside, and gone after the context
    assert logits.dtype == torch.float32 and plain.dtype == torch.float32
    assert not torch.equal(logits, plain) and torch.allclose(logits, plain, atol=0.05 * plain.abs().max())
    assert "forward" not in bundle.model.__dict__


@pytest.mark.parametrize("method", ["gradcam", "scorecam", "ablationcam", "opticam", "extremal"])
def test_bf16_maps_are_float32_and_close_to_fp32(toy, method):
    bundle, x, t = toy
    ref = explain(bundle, x, t, method, **FAST[method])
    got = explain(bundle, x, t, method, precision="bf16", **FAST[method])
    assert got.maps.dtype == torch.float32 and got.maps.shape == ref.maps.shape
    assert torch.isfinite(got.maps).all() and got.maps.min() >= 0 and got.maps.max() <= 1
    assert not torch.equal(got.maps, ref.maps)  # bf16 really ran
    for k, v in got.extras.items():
        assert not v.is_floating_point() or v.dtype == torch.float32, (method, k, v.dtype)
    # Ablation-CAM divides the drop of one logit by the logit: (y − y_k)/y, differences of about
    # bf16's rounding of y on this toy (README "Precision"). Every other method stays close.
    assert corr(got.maps, ref.maps) > (0.5 if method == "ablationcam" else 0.9), method


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_every_method_runs_under_bf16_on_the_models_it_serves(kind):
    """Each method's own passes (LRP included) take bf16 activations into float32 math."""
    from opticam_core.methods import METHODS, method_spec

    bundle = T.cnn_bundle(dtype=torch.float32) if kind == "cnn" else T.vit_bundle(dtype=torch.float32)
    x, t = T.images(2, seed=4, dtype=torch.float32), T.targets(2, seed=4)
    cheap = {"opticam": {"iterations": 3}, "extremal": {"iterations": 2}, "lime": {"num_samples": 20}}
    for key in METHODS:
        if method_spec(key).serves(bundle):
            res = explain(bundle, x, t, key, precision="bf16", **cheap.get(key, {}))
            assert res.maps.dtype == torch.float32 and torch.isfinite(res.maps).all(), key


def test_opticam_parameters_and_adam_state_stay_float32_under_bf16(toy, monkeypatch):
    bundle, x, t = toy
    dtypes = []
    step = opticam_module.CompactingAdam.step

    def spy(self, grad):
        dtypes.append((self.u.dtype, self.m.dtype, self.v.dtype, grad.dtype))
        return step(self, grad)

    monkeypatch.setattr(opticam_module.CompactingAdam, "step", spy)
    out = explain(bundle, x, t, "opticam", iterations=5, precision="bf16")
    assert dtypes and set(dtypes) == {(torch.float32,) * 4}
    assert out.extras["objective_history"].dtype == torch.float32
    assert out.extras["objective"].dtype == torch.float32


def test_extremal_parameters_and_momentum_stay_float32_under_bf16(toy, monkeypatch):
    bundle, x, t = toy
    dtypes = []
    step = extremal_module._MomentumSGD.step

    def spy(self, params, grad):
        new = step(self, params, grad)
        dtypes.append((params.dtype, grad.dtype, self.velocity.dtype, new.dtype))
        return new

    monkeypatch.setattr(extremal_module._MomentumSGD, "step", spy)
    out = explain(bundle, x, t, "extremal", iterations=4, precision="bf16")
    assert dtypes and set(dtypes) == {(torch.float32,) * 4}
    assert out.extras["reward_history"].dtype == torch.float32


def test_bf16_metrics_keep_float64_probabilities_close_to_fp32(toy):
    bundle, x, t = toy
    maps = explain(bundle, x, t, "gradcam").maps
    which = ["classification", "insertion_deletion"]
    a = compute(bundle, x, t, maps, which=which)
    b = compute(bundle, x, t, maps, which=which, precision="bf16")
    for k in ("p", "o", "insertion", "deletion"):
        assert b[k].dtype == torch.float64, k
        assert not torch.equal(a[k], b[k]) and torch.allclose(a[k], b[k], atol=0.03), k
    assert b["insertion_curve"].dtype == torch.float32


def test_ablationcam_tail_runs_in_the_precision_of_the_clean_logit(toy):
    # Its weights subtract the tail's logit from the clean forward's: both in bf16, not one each.
    bundle, x, _ = toy
    feats = bundle.model.net.features(((x - bundle.model.mean) / bundle.model.std))
    with precision("bf16", bundle.model):
        with same_precision(bundle.model):
            assert bundle.tail(feats).dtype == torch.bfloat16
    with same_precision(bundle.model):
        assert bundle.tail(feats).dtype == torch.float32


# ------------------------------------------------------------------------------------------
# Nesting: the re-runs of a metric group inherit its precision; a copy is not patched for good


def test_nested_default_inherits_and_a_conflicting_setting_is_refused(toy):
    bundle, x, t = toy
    assert active() is None
    with precision("bf16", bundle.model):
        assert active() == ("bf16", False)
        inner = explain(bundle, x, t, "gradcam")  # default = as the enclosing context
        with pytest.raises(ValueError, match="inside an open precision 'bf16'"):
            explain(bundle, x, t, "gradcam", precision="tf32")
        twin = copy.deepcopy(bundle.model)  # the sanity check's randomised copies are made so
        assert type(twin).forward.__get__(twin) == twin.forward and "net" in twin._modules
        assert twin(x).dtype == torch.float32
    assert active() is None and "forward" not in bundle.model.__dict__
    assert torch.equal(inner.maps, explain(bundle, x, t, "gradcam", precision="bf16").maps)
    assert not torch.equal(inner.maps, explain(bundle, x, t, "gradcam").maps)


def test_context_restores_the_model_after_an_error(toy):
    bundle, x, _ = toy
    with pytest.raises(RuntimeError, match="boom"):
        with precision("bf16", bundle.model):
            raise RuntimeError("boom")
    assert "forward" not in bundle.model.__dict__ and active() is None
    assert bundle.model(x).dtype == torch.float32


# ------------------------------------------------------------------------------------------
# tf32 flags


def test_tf32_sets_the_cuda_flags_only_inside_and_restores_them_even_on_error():
    m, c = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        with precision("tf32", device="cuda"):  # the flags can be set without a GPU
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        with pytest.raises(KeyError):
            with cuda_tf32():
                raise KeyError("x")
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        with precision("tf32", device="cpu"):  # a CPU has no TF32: nothing is touched
            assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = m, c


# ------------------------------------------------------------------------------------------
# Bad values


def test_bad_values_name_the_option(toy):
    bundle, x, t = toy
    with pytest.raises(ValueError, match=r"unknown precision 'fp16'; valid: 'fp32', 'tf32', 'bf16'"):
        explain(bundle, x, t, "gradcam", precision="fp16")
    with pytest.raises(ValueError, match="unknown precision"):
        compute(bundle, x, t, torch.rand(B, T.TOY_SIZE, T.TOY_SIZE), precision="half")
    with pytest.raises(ValueError, match="compile must be true or false"):
        explain(bundle, x, t, "gradcam", compile="yes")


def test_config_validates_precision_and_compile(tmp_path):
    cfg = toy_config("demo", str(tmp_path))
    assert load_config(cfg).compute.precision == "fp32" and load_config(cfg).compute.compile is False
    for bad in ({"precision": "fp16"}, {"compile": "yes"}):
        with pytest.raises(ConfigError, match="compute" if "precision" in bad else "compile"):
            load_config({**cfg, "compute": {**cfg["compute"], **bad}})
    ok = load_config({**cfg, "compute": {**cfg["compute"], "precision": "bf16", "compile": True}})
    assert ok.compute.precision == "bf16" and ok.compute.compile is True


def test_a_changed_precision_is_refused_like_any_change(tmp_path):
    cfg = toy_config("demo", str(tmp_path))
    plain = fingerprints(load_config(cfg))
    explicit = fingerprints(load_config({**cfg, "compute": {**cfg["compute"], "precision": "fp32"}}))
    assert changes(plain, explicit) == []  # the default written out is no change (older runs stay valid)
    bf16 = fingerprints(load_config({**cfg, "compute": {**cfg["compute"], "precision": "bf16"}}))
    found = changes(plain, bf16)
    assert {c.field for c in found} == {"compute.precision"} and len(found) == len(plain)
    assert "compute.precision: None -> 'bf16'" in conflict_message("r", found)
    assert {c.field for c in changes(bf16, plain)} == {"compute.precision"}
    compiled = fingerprints(load_config({**cfg, "compute": {**cfg["compute"], "compile": True}}))
    assert changes(plain, compiled) == []  # float rounding only, like another batch size


def test_evaluator_runs_the_batch_in_the_run_precision():
    from pipeline.evaluate import Evaluator
    from tests.test_evaluate import table

    methods = {"gradcam": {}, "opticam": {"iterations": 2}}
    kw = dict(run_id="r", dataset="toy", model=TOY_MODEL, methods=methods, metrics=TOY_METRICS, device="cpu")
    rows = table(photo_rows(2))
    a = Evaluator(**kw)(rows).to_pandas()
    b = Evaluator(**kw, precision="bf16")(rows).to_pandas()
    assert a["error"].isna().all() and b["error"].isna().all()
    assert not (a["o"] == b["o"]).all()
    assert ((a["o"] - b["o"]).abs() < 0.05).all()
    with pytest.raises(ValueError, match="unknown precision"):
        Evaluator(**kw, precision="fp8")


# ------------------------------------------------------------------------------------------
# compile


def test_compile_without_a_compiler_fails_naming_the_option(toy, monkeypatch):
    bundle, x, t = toy
    monkeypatch.setattr("opticam_core.precision.shutil.which", lambda _name: None)
    with pytest.raises(CompileUnavailable, match="compile: .*C\\+\\+ compiler.*compile: false"):
        explain(bundle, x, t, "opticam", iterations=2, compile=True)
    assert "forward" not in bundle.model.__dict__


def test_compile_runs_hook_free_passes_compiled_and_captures_eagerly(toy, monkeypatch):
    # torch.compile stood in by a recorder: the plumbing, without minutes of compilation.
    bundle, x, t = toy
    calls = []

    def fake_compile(fn, **_):
        def compiled(*a, **k):
            calls.append(a[0].shape[0])
            return fn(*a, **k)
        return compiled

    monkeypatch.setattr("opticam_core.precision.torch.compile", fake_compile)
    ref = explain(bundle, x, t, "opticam", iterations=3)
    got = explain(bundle, x, t, "opticam", iterations=3, compile=True)
    assert torch.equal(ref.maps, got.maps)
    # 3 steps + the final evaluation compiled; the feature capture (a hook) ran eagerly.
    assert calls == [B] * 4


@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(c) for c in ("cc", "gcc", "g++", "clang")),
                    reason="torch.compile needs a C++ compiler for the CPU (the option then fails, tested above)")
def test_compiled_passes_match_eager(toy):
    # Real torch.compile: minutes of compilation on a loaded 2-core machine.
    bundle, x, t = toy
    for method in ("opticam", "scorecam", "extremal"):
        ref = explain(bundle, x, t, method, **FAST[method])
        got = explain(bundle, x, t, method, compile=True, **FAST[method])
        assert torch.allclose(ref.maps, got.maps, atol=1e-4), method
    maps = ref.maps
    a = compute(bundle, x, t, maps, which={"insertion_deletion": {"steps": 8}})
    b = compute(bundle, x, t, maps, which={"insertion_deletion": {"steps": 8}}, compile=True)
    assert torch.allclose(a["insertion"], b["insertion"], atol=1e-5)
