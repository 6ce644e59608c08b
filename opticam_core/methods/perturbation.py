"""Score-CAM and Ablation-CAM: channel weights from forward passes of perturbed inputs or features.

Both flatten the batch into (image, channel) pairs and run them in chunks, so images share
forwards and no Python loop runs per image. Pairs whose result is known without a forward are
skipped exactly: a constant channel gives Score-CAM an all-zero mask (the black image, one
forward for the whole batch), and ablating an all-zero channel changes nothing.
"""

from __future__ import annotations

import torch

from ..chunking import run_chunks
from ..cost import Cost, channels
from ..hooks import replace_output
from ..maps import constant_maps, normalize, upsample
from ..options import Bool, PositiveInt
from ..precision import same_precision
from .base import Context
from .gradient import _done, _weighted
from .registry import register

#: Images per forward on a CPU when no batch_size is given: there a forward's time per image
#: grows with the batch (cache pressure), so small chunks are fastest (benchmarks/methods.py).
#: On a CUDA device the chunk comes from its free memory (`opticam_core.chunking`); GPU_CHUNK
#: serves only accelerators that cannot report their memory.
CPU_CHUNK, GPU_CHUNK = 8, 128
#: Bytes of ablated feature copies per tail chunk on the CPU when no batch_size is given.
TAIL_CHUNK_BYTES = 256 * 2**20


def _pick(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, targets[:, None])[:, 0]


def _scorecam_cost(options, info):
    K, note = channels(info)
    return Cost(forwards=K, shared={"forward"},
                note="; ".join(n for n in (note, "+1 black forward per batch with a constant channel; "
                                                 "constant channels skipped") if n))


def _ablationcam_cost(options, info):
    K, note = channels(info)
    tail = info.tail if options.use_tail and info is not None else None
    if tail is None:
        note = "; ".join(n for n in (note, "full forwards (no tail, or unknown: upper bound)") if n)
    else:
        note = "; ".join(n for n in (note, f"tail passes, each {tail:.2%} of a forward") if n)
    return Cost(forwards=K * (1.0 if tail is None else tail), shared={"forward"}, note=note)


@register("scorecam", name="Score-CAM", family="perturbation", rank=30, cost=_scorecam_cost)
def scorecam(ctx: Context, *, batch_size: PositiveInt | None = None, align_corners: Bool = False):
    """Score-CAM: u_k = f(x ⊙ n(up(A_k)))_c, w = softmax_k(u), S = relu(Σ_k w_k A_k).

    The paper's baseline term −f(x_b)_c is the same for every channel of an image, and softmax
    ignores such shifts, so it is not computed. batch_size: masked images per forward (default
    8 on the CPU; on a GPU what its free memory holds, `opticam_core.chunking`). align_corners: the masks' upsampling (pytorch-grad-cam uses True).
    """
    feats = ctx.features()
    B, K = feats.shape[:2]
    scores = torch.empty(B, K, device=feats.device, dtype=ctx.images.dtype)
    flat = constant_maps(feats)
    with torch.no_grad():
        if flat.any():
            black = ctx.model(torch.zeros_like(ctx.images[:1]))[0]
            scores[flat] = black[ctx.targets].unsqueeze(1).expand(B, K)[flat]
        pairs = (~flat).nonzero()

        def score(start: int, stop: int) -> None:
            b, k = pairs[start:stop].unbind(1)
            masks = normalize(upsample(feats[b, k], ctx.size, align_corners=align_corners))
            scores[b, k] = _pick(ctx.model(ctx.images[b] * masks[:, None]), ctx.targets[b])

        # per pair: the image gathered, its mask (a third of an image) and the masked copy
        run_chunks(len(pairs), ctx.chunk(CPU_CHUNK, GPU_CHUNK, batch_size, total=len(pairs), copies=2.5),
                   score, what="Score-CAM")
    return _done(ctx, _weighted(torch.softmax(scores, dim=1), feats))


@register("ablationcam", name="Ablation-CAM", family="perturbation", rank=40, cost=_ablationcam_cost)
def ablationcam(ctx: Context, *, batch_size: PositiveInt | None = None, use_tail: Bool = True):
    """Ablation-CAM: w_k = (y_c − y_c^(k)) / y_c with channel k of the layer output zeroed.

    Where the bundle knows the network after the layer (`bundle.tail`: ResNet, VGG, EfficientNet
    heads), only that tail runs on the ablated features; otherwise a hook replaces the layer's
    output inside full forwards. Transformers ablate an embedding channel in every token.
    batch_size: ablated copies per forward (default: as Score-CAM for full forwards; for the
    tail, as many as fit in TAIL_CHUNK_BYTES on the CPU, in the free memory on a GPU).
    """
    raw = ctx.raw_features()
    feats = ctx.features()
    y = _pick(ctx.logits(), ctx.targets)
    B, K = feats.shape[:2]
    ablated = y[:, None].expand(B, K).clone()
    tokens = ctx.bundle.reshape is not None
    silent = (raw == 0).all(1) if tokens else (raw == 0).flatten(2).all(-1)
    pairs = (~silent).nonzero()
    tail = ctx.bundle.tail if use_tail and not tokens else None

    def zero_channel(out: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        rows = torch.arange(len(k), device=out.device)
        if tokens:
            out[rows, :, k] = 0
        else:
            out[rows, k] = 0
        return out

    with torch.no_grad():
        if tail is not None:
            by_budget = max(1, TAIL_CHUNK_BYTES // (raw[0].numel() * raw.element_size()))

            def ablate(start: int, stop: int) -> None:
                b, k = pairs[start:stop].unbind(1)
                with same_precision(ctx.model):  # as y was computed: a bf16 y minus an fp32 tail is noise
                    ablated[b, k] = _pick(tail(zero_channel(raw[b], k)), ctx.targets[b]).to(ablated.dtype)

            # per pair: the gathered features and their ablated copy, besides the tail's own memory
            chunk = ctx.chunk(by_budget, by_budget, batch_size, total=len(pairs), copies=2, fn=tail, example=raw,
                              what="tail")
        else:
            target = ctx.bundle.target

            def ablate(start: int, stop: int) -> None:
                b, k = pairs[start:stop].unbind(1)
                with replace_output(target, lambda out, k=k: zero_channel(out, k)):
                    ablated[b, k] = _pick(ctx.model(ctx.images[b]), ctx.targets[b])

            # per pair: the gathered image; the layer's ablated copy is within the forward's own
            chunk = ctx.chunk(CPU_CHUNK, GPU_CHUNK, batch_size, total=len(pairs), copies=1)
        run_chunks(len(pairs), chunk, ablate, what="Ablation-CAM")
    weights = (y[:, None] - ablated) / y[:, None]
    return _done(ctx, _weighted(weights, feats))
