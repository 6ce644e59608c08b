"""The attention methods, read from a timm ViT/DeiT's attention (PAPER.md §2, Chefer et al.'s code):

- `rawatt` (RawAtt): the class token's attention row in the last block (Chefer's `last_layer_attn`).
- `rollout` (Rollout, Abnar & Zuidema 2020): attention rolled out through all blocks.
- `tibav` (TIBAV, Chefer et al. CVPR 2021 `transformer_attribution`): LRP relevance × gradient of
  each block's attention, rolled out; class-specific. The LRP rules: `transformer_lrp`.

RawAtt and Rollout are class-agnostic. All three take the class token's row without the prefix
tokens (class, and distillation/register tokens where the model has them: timm's
`num_prefix_tokens`), reshape it to the patch grid (14×14 at 224 with 16-px patches), upsample
bilinearly and min–max normalise (`maps.finish`, with the constant-map rule).

They apply to timm ViT/DeiT-style networks only (`ATTENTION_BLOCKS`); `explain` refuses any other
with a ModelError naming the models they accept, and a run config pairing them is refused at
`--check`. The attention probabilities are captured by hooks on the blocks a method reads, whose
fused kernel is off only while it runs (`transformer_lrp.unfused`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated

import annotated_types as at
import torch

from ..cost import Cost
from ..maps import finish
from ..models import ModelError
from ..options import Bool, Float, Int, NonNegativeInt, PositiveFloat
from . import transformer_lrp as lrp
from .base import Context
from .registry import Requirement, register

#: The αβ rule's α: β = α − 1 ≥ 0.
Alpha = Annotated[Float, at.Ge(1)]


def _serves(bundle) -> bool:
    return lrp.attention_modules(lrp.network(bundle.model)) is not None


def _serves_recipe(recipe) -> bool | None:
    from ..models import BUILTIN

    cfg = BUILTIN.get(recipe.name)
    if cfg is not None:
        return cfg.source == "timm" and cfg.tokens is not None
    return _arch_serves(recipe.name)


@lru_cache(maxsize=64)
def _arch_serves(name: str) -> bool | None:
    """For a model that is not a built-in: build its architecture on the meta device (no weights,
    no memory, a fraction of a second) and look. None when neither library knows the name."""
    from ..models import meta_network

    try:
        net = meta_network(name)  # torchvision's networks come first, as in load_model: none has timm attention
    except Exception:  # an architecture that cannot be built on meta: tell when it is loaded
        return None
    if net is None:
        return None
    return lrp.attention_modules(net) is not None


ATTENTION_BLOCKS = Requirement(
    name="attention blocks (timm ViT/DeiT)",
    accepts="vit_base_patch16_224, deit_base_patch16_224 and other timm ViT/DeiT models "
            "(timm Attention in `blocks`, with a class token)",
    serves=_serves,
    serves_recipe=_serves_recipe,
)


def _attention(ctx: Context):
    net = lrp.network(ctx.model)
    attns = lrp.attention_modules(net)
    if attns is None:  # explain checks first; this guards direct calls
        raise ModelError(f"{ATTENTION_BLOCKS.name} needed; it accepts {ATTENTION_BLOCKS.accepts}")
    return net, attns


def _block(option: str, value: int, depth: int) -> int:
    if not -depth <= value < depth:
        raise ValueError(f"{option}={value}, but the model has {depth} blocks (valid: {-depth}…{depth - 1})")
    return value % depth


def _maps(ctx: Context, net, row: torch.Tensor):
    """Class-token row B×N → maps B×H×W in [0,1] and the constant flags."""
    prefix = int(net.num_prefix_tokens)
    patches = row[:, prefix:]
    grid = tuple(getattr(getattr(net, "patch_embed", None), "grid_size", ()) or ())
    if len(grid) != 2 or grid[0] * grid[1] != patches.shape[1]:
        side = int(round(patches.shape[1] ** 0.5))
        if side * side != patches.shape[1]:
            raise ModelError(f"{patches.shape[1]} patch tokens do not form the model's patch grid")
        grid = (side, side)
    maps, constant = finish(patches.reshape(len(row), *grid), ctx.size)
    return maps, {"constant": constant}


def _head_mean(probs: torch.Tensor) -> torch.Tensor:
    # Chefer clamps at 0 before the mean; softmax outputs are never negative, so it changes nothing.
    return lrp.head_mean(probs)


def _class_row_head_mean(probs: torch.Tensor) -> torch.Tensor:
    return lrp.head_mean(probs[:, :, :1])[:, 0]


@register("rawatt", name="RawAtt", family="attention", rank=72, requires=ATTENTION_BLOCKS, cost=Cost(forwards=1))
def rawatt(ctx: Context, *, block: Int = -1):
    """RawAtt: A = the attention probabilities of block `block` (default the last), mean over
    heads; the class token's row without the prefix tokens. Class-agnostic.

    Model evaluations per image: one forward (no backward); the block read runs timm's unfused
    attention path, the others keep the fused kernel.
    """
    net, attns = _attention(ctx)
    i = _block("block", block, len(attns))
    with torch.no_grad(), lrp.attention_probabilities([attns[i]], _class_row_head_mean) as seen:
        ctx.model(ctx.images)
    return _maps(ctx, net, seen[0])


@register("rollout", name="Rollout", family="attention", rank=74, requires=ATTENTION_BLOCKS, cost=Cost(forwards=1))
def rollout(ctx: Context, *, start_layer: NonNegativeInt = 0, renormalize: Bool = True):
    """Rollout (Abnar & Zuidema, as Chefer's `generate_rollout`): per block Â = mean_heads(A) + I,
    rows renormalised to sum 1, joint = Â_L ⋯ Â_start; the class token's row. Class-agnostic.

    start_layer: the first block rolled out (0: all). renormalize: False leaves Â = Ā + I as is.
    Model evaluations per image: one forward (no backward); blocks from start_layer run timm's
    unfused attention path, the ones below keep the fused kernel.
    """
    net, attns = _attention(ctx)
    first = _block("start_layer", start_layer, len(attns))
    with torch.no_grad(), lrp.attention_probabilities(attns[first:], _head_mean) as seen:
        ctx.model(ctx.images)
    return _maps(ctx, net, lrp.rollout_row(seen, renormalize=renormalize))


#: One forward, one backward (down to block start_layer: at most a whole one), and the LRP pass,
#: about three forwards' worth of matrix products (the docstring), counted as forwards.
TIBAV_COST = Cost(forwards=1 + 3, backwards=1, note="LRP pass ≈ 3 forwards, counted as forwards")


@register("tibav", name="TIBAV", paper_name="TIBAV", family="attention", rank=76, requires=ATTENTION_BLOCKS,
          cost=TIBAV_COST)
def tibav(ctx: Context, *, start_layer: NonNegativeInt = 0, alpha: Alpha = 1.0,
          eps: PositiveFloat = lrp.EPS, renormalize: Bool = False):
    """TIBAV (Chefer et al.'s `transformer_attribution`): per block Ā = mean_heads(clamp≥0(∂y_c/∂A ⊙ R_A)),
    R_A the LRP relevance of the attention probabilities for class c (the target); then
    joint = (Ā_L + I) ⋯ (Ā_start + I) and the class token's row.

    start_layer: the first block rolled out (Chefer's default 0; their evaluation scripts pass 1).
    alpha: the LRP αβ rule's α (β = α − 1; Chefer's 1). eps: their safe_divide stabiliser.
    renormalize: their `transformer_attribution` rolls out *without* renormalising rows (unlike
    their Rollout baseline); True renormalises as Rollout does.
    Model evaluations per image: one forward (blocks from start_layer unfused and recorded), one
    backward from y_c to the attention of block start_layer, and one LRP pass down to it: per
    Linear one product |x|·|W|ᵀ and two relevance products, i.e. about three forwards' worth of
    matrix products, which no implementation of these rules avoids (the floor one forward +
    backward is about two).
    """
    net, attns = _attention(ctx)
    lrp.check_lrp_ready(net)
    first = _block("start_layer", start_layer, len(attns))
    with lrp.record(net, first) as rec, torch.enable_grad():
        logits = ctx.model(ctx.images)
    score = logits.gather(1, ctx.targets[:, None]).sum()
    wanted = range(first, len(attns))
    grads = torch.autograd.grad(score, [rec.blocks[i].attn for i in wanted])
    for i in wanted:
        rec.blocks[i].attn = lrp.full_precision(rec.blocks[i].attn.detach())
    del logits, score
    rel = lrp.relevance(net, rec, ctx.targets, alpha=alpha, eps=eps)
    with torch.no_grad():
        cams = [lrp.head_mean((g * rel.attn[i]).clamp_min_(0)) for g, i in zip(grads, wanted)]
        return _maps(ctx, net, lrp.rollout_row(cams, renormalize=renormalize))
