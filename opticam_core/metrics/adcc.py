"""ADCC (Poppi et al., CVPRW 2021) as its authors' code computes it (aimagelab/ADCC,
`metrics/adcc.py`, `average_drop.py`, `coherency.py`, `complexity.py`), batched.

Per image x, with c the class predicted on x and S = S(x) its map for c:

    AD         = max(0, p − o) / p, p = the top-1 probability on x, o = the probability of c on x ⊙ S
    Coherency  = (PCC(S(x), S(x ⊙ S(x))) + 1) / 2, the method re-run for c on the masked image
    Complexity = Σ|S| / (H·W)
    ADCC       = 3 / (1/Coherency + 1/(1 − Complexity) + 1/(1 − AD))    (harmonic mean; ↑ better)

Which class. The authors' example makes S(x) for the prediction (`classidx=None` → argmax), the
re-run in `coherency` always uses the prediction, and so does AD unless a `target_class_idx` is
passed (then o is for that class while p stays the top-1 probability, a mix we do not copy).
`target="pred"` (default) follows that: the row's map (made for the row's target class, the
label) is used where the prediction is that class, and S(x) is made again for the prediction
where it is not (one extra run of the method on those images only). `target="label"` uses the
row's map and class throughout: p and o of that class, the re-run for it.

Edge cases. Their PCC is `scipy.stats.pearsonr` and a map with a NaN gives Coherency 0. In their
pipeline (TorchCAM's min–max normalisation) a constant map becomes NaN; ours are zeros (the
methods' `constant`), so a constant S(x) or S(x ⊙ S(x)) gives Coherency 0 here (pearsonr would
give NaN for a constant, non-NaN map). A component equal to 0 (Coherency 0, Complexity 1, or
AD 1) makes ADCC 0, the harmonic mean's limit: their code gets 0 from a torch `inf` for
Complexity 1 but raises ZeroDivisionError on the Python floats of Coherency 0 or AD 1. A re-run
that failed (NaN map from `batch.rerun`) makes the image's values NaN, with the reason in
`metric_error`.

Space: x ⊙ S is taken in [0,1] pixels, as every other metric here and as the Opti-CAM code hands
images to its model (normalisation inside); the ADCC example multiplies normalised tensors.
Probabilities are float64 log-softmax of the logits.

Cost: one forward (x ⊙ S) and one run of the method per image, plus one run for the images whose
prediction is not the row's class under `target="pred"`.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..cost import Cost
from ..fields import PerImage
from ._forward import class_log_probs
from .classification import check_batch, clean_logits_of, drop_terms
from .registry import Metric, MetricBatch, register_group


def coherency(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(PCC(a, b) + 1) / 2 per row of two B×H×W maps (float64); 0 where either map is constant,
    NaN where either has a NaN."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    am, bm = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    r = (am * bm).sum(1) / (am.square().sum(1) * bm.square().sum(1)).sqrt()
    value = (r.clamp(-1, 1) + 1) / 2
    constant = (a.amax(1) == a.amin(1)) | (b.amax(1) == b.amin(1))
    nan = torch.isnan(a).any(1) | torch.isnan(b).any(1)
    return torch.where(nan, float("nan"), torch.where(constant, 0.0, value))


def harmonic_adcc(coherency: torch.Tensor, complexity: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """3 / (1/Coherency + 1/(1 − Complexity) + 1/(1 − AD)); 0 where a component is 0."""
    parts = torch.stack([coherency, 1 - complexity, 1 - drop]).double()
    value = 3 / (1 / parts).sum(0)  # a 0 component: 1/0 = inf, 3/inf = 0
    return torch.where(torch.isnan(parts).any(0), float("nan"), value)


def adcc(bundle, rerun, images: torch.Tensor, maps: torch.Tensor, targets, *,
         clean_logits: torch.Tensor | None = None,
         target: Literal["pred", "label"] = "pred") -> dict[str, torch.Tensor]:
    """{adcc, adcc_coherency, adcc_complexity, adcc_drop} per image (B, float64) for maps S
    (B×H×W) made for `targets` by the method `rerun(images, targets) -> maps` runs again; see
    the module docstring. target: "pred" (the authors' code: the class predicted on x) or
    "label" (the class the maps were made for)."""
    home = images.device
    images, maps, targets = check_batch(bundle, images, maps, targets)
    with torch.no_grad():
        logits = clean_logits_of(bundle, images, clean_logits)
    cls = logits.argmax(1) if target == "pred" else targets
    S = maps.clone()
    other = (cls != targets).nonzero().flatten()
    if len(other):
        S[other] = rerun(images[other], cls[other]).to(S)
    ok = torch.isfinite(S).flatten(1).all(1)
    with torch.no_grad():
        p = class_log_probs(logits, cls).exp()  # for "pred": the top-1 probability
        masked = images * S[:, None].to(images.dtype)
        o = torch.full_like(p, float("nan"))
        if ok.any():
            o[ok] = class_log_probs(bundle.model(masked[ok]), cls[ok]).exp()
    again = torch.full_like(S, float("nan"))
    if ok.any():
        again[ok] = rerun(masked[ok], cls[ok]).to(S)
    with torch.no_grad():
        drop = drop_terms(p, o)  # Average Drop's own term, on ADCC's class
        complexity = S.double().abs().flatten(1).mean(1)
        coh = coherency(S, again)
        out = {"adcc": harmonic_adcc(coh, complexity, drop), "adcc_coherency": coh,
               "adcc_complexity": complexity, "adcc_drop": drop}
    return {k: v.to(home) for k, v in out.items()}


def _cost(options) -> Cost:
    if options.target == "label":
        return Cost(forwards=1, reruns=1)
    return Cost(forwards=1, reruns=2, note="S(x) re-made only where the prediction is not the row's class")


@register_group(
    "adcc", options_from=adcc, skip=("clean_logits",), calls_method=True, cost=_cost,
    fields=(PerImage("adcc", "float64", "ADCC: 3 / (1/Coherency + 1/(1 − Complexity) + 1/(1 − AD)) (Poppi et al.)"),
            PerImage("adcc_coherency", "float64", "(PCC(S(x), S(x ⊙ S(x))) + 1) / 2, the method re-run on x ⊙ S"),
            PerImage("adcc_complexity", "float64", "Σ|S| / (H·W)"),
            PerImage("adcc_drop", "float64", "max(0, p − o) / p of ADCC's class (the prediction by default)")),
    metrics=(Metric("ADCC", "ADCC (harmonic mean of coherency, 1 − complexity, 1 − AD)", higher_is_better=True),
             Metric("Coherency", "ADCC's coherency", higher_is_better=True),
             Metric("Complexity", "ADCC's complexity", higher_is_better=False)))
def _adcc(batch: MetricBatch, **options) -> dict[str, torch.Tensor]:
    return adcc(batch.bundle, batch.rerun, batch.images, batch.maps, batch.made_for, clean_logits=batch.logits,
                **options)


__all__ = ["adcc", "coherency", "harmonic_adcc"]
