"""Reading timm's Vision Transformers for the attention methods: the attention probabilities, and
layer-wise relevance (LRP) down to them, without editing timm.

Capture
-------
timm's `Attention` materialises its softmax weights only on its unfused path (`fused_attn`
False: q·kᵀ → softmax → `attn_drop` → ·v); `F.scaled_dot_product_attention` never exposes them.
`unfused` turns the fused kernel off on exactly the blocks a method reads and puts each block's
own setting back on exit, also on error, so every other block and every other method keeps it.
A forward hook on `attn_drop` (a Dropout: in eval it returns its input tensor itself) then sees
the probabilities, B×heads×N×N with rows summing to 1. `record` adds forward hooks on the
modules whose inputs and outputs the LRP rules need. All hooks are removed on exit.

LRP rules (Chefer, Gur & Wolf, CVPR 2021; their `modules/layers_ours.py` on their copy of timm's
ViT, here applied to timm's own modules). Relevance starts as the one-hot of the target class at
the logits (1, not the logit's value). sd(a, b) is their `safe_divide`: a / (b + ε) where b ≠ 0,
else 0 (ε = 1e-9, added whatever b's sign).

- Linear (head, qkv, proj, fc1, fc2): the αβ rule, bias ignored. With contributions
  z_oi = x_i·W_oi, R_i = Σ_o [α·z_oi⁺·sd(R_o, Σ_i z_oi⁺) − β·z_oi⁻·sd(R_o, Σ_i z_oi⁻)], β = α − 1;
  Chefer's α = 1 makes it the z⁺ rule. Conserves Σ R where every output carrying relevance has a
  positive contribution (otherwise that output's relevance is dropped, as in theirs).
- Products of two activations, A·V and q·kᵀ: LRP-0 (input × gradient of the product) to each
  operand, which gives each the full relevance, then halved: with S = sd(R, A·V),
  R_A = A ⊙ (S·Vᵀ)/2 and R_V = V ⊙ (Aᵀ·S)/2; with S = sd(R_A, q·kᵀ), R_q = q ⊙ (S·k)/2 and
  R_k = k ⊙ (Sᵀ·q)/2, on the unscaled q (1/√d cancels in the rule).
- Residual add u + f(u): LRP-0 shares a = u ⊙ sd(R, u+f), b = f ⊙ sd(R, u+f), each then rescaled
  so the two operands split Σ R in the ratio |Σ a| : |Σ b|. Chefer's sums run over the batch
  of one image; here they run per image, which is their code run one image at a time.
- Branch (the block input feeds both the residual and the norm): R = u ⊙ (sd(R₁, u) + sd(R₂, u)).
- Token selection (the head reads the class token; DeiT-distilled also the distillation token):
  R_t = x_t ⊙ sd(R, x_t) on the selected tokens, zero on the others.
- DeiT-distilled head (head(x_cls) + head_dist(x_dist))/2: one Linear on the concatenated tokens
  with weights [W_head, W_dist]/2 (Chefer's code has no distilled model; this is the αβ rule on the
  layer the head is).
- LayerNorm (norm1, norm2, the final norm, fc_norm, q/k norms, the optional norms inside the
  attention and the MLP), softmax, GELU/ReLU, dropout, LayerScale and drop-path (identity in
  eval): relevance passes unchanged.

Chefer's `transformer_attribution` reads, per block, the relevance of the attention
probabilities (R_A, the halved share above) and the gradient ∂y_c/∂A.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from ..models import ModelError

#: Chefer's `safe_divide` stabiliser.
EPS = 1e-9
#: A Linear output whose positive contributions are below this share of its absolute ones is
#: recomputed term by term (see `linear_rule`).
_RISKY_SHARE = 0.05


# --------------------------------------------------------------------------------------------
# What the methods accept


def network(model: nn.Module) -> nn.Module:
    """The timm network inside a bundle's `Normalized` wrapper (or the network itself)."""
    return getattr(model, "net", model)


def attention_modules(net: nn.Module) -> list[nn.Module] | None:
    """The timm `Attention` of every block, or None when `net` is not a timm ViT/DeiT-style
    network with a class token (the attention methods read the class token's row)."""
    from timm.layers import Attention

    blocks = getattr(net, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        return None
    attns = [getattr(b, "attn", None) for b in blocks]
    if not all(isinstance(a, Attention) for a in attns):
        return None
    if getattr(net, "cls_token", None) is None or int(getattr(net, "num_prefix_tokens", 0) or 0) < 1:
        return None
    return attns


def check_lrp_ready(net: nn.Module) -> None:
    """ModelError unless every layer between the attention and the logits has a rule above."""
    from timm.layers import Attention, Mlp
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import Block, VisionTransformer

    problems = []
    distilled = isinstance(net, VisionTransformerDistilled)
    if not isinstance(net, VisionTransformer) or (
            type(net).forward_head not in (VisionTransformer.forward_head, VisionTransformerDistilled.forward_head)):
        problems.append(f"a timm VisionTransformer head, not {type(net).__name__}")
    elif not distilled and (net.global_pool != "token" or getattr(net, "attn_pool", None) is not None):
        problems.append(f"class-token pooling (global_pool='token'), not {net.global_pool!r}")
    heads = [getattr(net, "head", None)] + ([getattr(net, "head_dist", None)] if distilled else [])
    if not all(isinstance(h, nn.Linear) for h in heads):
        problems.append("a Linear classifier head")
    for i, blk in enumerate(getattr(net, "blocks", [])):
        attn, mlp = getattr(blk, "attn", None), getattr(blk, "mlp", None)
        if type(blk).forward is not Block.forward:
            problems.append(f"timm's pre-norm Block in blocks.{i}, not {type(blk).__name__}")
        elif type(attn).forward is not Attention.forward or getattr(attn, "gate", None) is not None:
            problems.append(f"timm's ungated Attention in blocks.{i}")
        elif (type(mlp).forward is not Mlp.forward or not isinstance(mlp.fc1, nn.Linear)
              or not isinstance(mlp.fc2, nn.Linear)):
            problems.append(f"timm's Mlp with Linear layers in blocks.{i}, not {type(mlp).__name__}")
        if len(problems) > 2:
            break
    if problems:
        raise ModelError("TIBAV's LRP rules need " + "; ".join(problems)
                         + " (vit_base_patch16_224, deit_base_patch16_224 and DeiT-distilled qualify)")


# --------------------------------------------------------------------------------------------
# Capture


@contextmanager
def unfused(attns: list[nn.Module]) -> Iterator[None]:
    """Switch timm's fused attention kernel off on `attns` only; each gets its own value back."""
    saved = [a.fused_attn for a in attns]
    try:
        for a in attns:
            a.fused_attn = False
        yield
    finally:
        for a, value in zip(attns, saved):
            a.fused_attn = value


def _hook(stack: ExitStack, module: nn.Module, fn: Callable) -> None:
    stack.callback(module.register_forward_hook(fn).remove)


@contextmanager
def attention_probabilities(attns: list[nn.Module],
                            reduce: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[list]:
    """A list that the next forward fills with `reduce(A)` per attention module in `attns`
    (A: B×heads×N×N softmax probabilities). Reducing in the hook keeps one B×N×N map per
    block instead of every head's."""
    seen: list = [None] * len(attns)

    def keep(i):
        def hook(_m, _inputs, output):
            with torch.autocast(output.device.type, enabled=False):  # the hook runs inside a bf16 forward
                seen[i] = reduce(full_precision(output))
        return hook

    with ExitStack() as stack:
        stack.enter_context(unfused(attns))
        for i, a in enumerate(attns):
            _hook(stack, a.attn_drop, keep(i))
        yield seen
    if any(s is None for s in seen):
        raise RuntimeError("a captured attention block did not run its unfused path; "
                           "the attention probabilities were not seen")


@dataclass
class BlockRecord:
    """One block's tensors for the rules, detached except `attn` (∂y/∂A is taken through it)."""

    x_in: torch.Tensor | None = None     # block input u (residual operand of add 1)
    n1: torch.Tensor | None = None       # norm1 output = qkv input
    qkv: torch.Tensor | None = None      # qkv output (v is read from it)
    q: torch.Tensor | None = None        # after q_norm, before the 1/√d scale: B×H×N×D
    k: torch.Tensor | None = None
    attn: torch.Tensor | None = None     # softmax probabilities B×H×N×N
    o: torch.Tensor | None = None        # proj input (A·V with heads merged)
    proj: torch.Tensor | None = None
    b1: torch.Tensor | None = None       # attention branch as added (after ls1)
    x_mid: torch.Tensor | None = None    # after add 1 = norm2 input
    fc1_in: torch.Tensor | None = None
    fc1: torch.Tensor | None = None
    fc2_in: torch.Tensor | None = None
    fc2: torch.Tensor | None = None
    b2: torch.Tensor | None = None       # MLP branch as added (after ls2)
    x_out: torch.Tensor | None = None


@dataclass
class Recording:
    first: int                                   # blocks[first:] are recorded
    blocks: dict[int, BlockRecord] = field(default_factory=dict)
    tokens: torch.Tensor | None = None           # final norm output, B×N×C
    head: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # name → (input, output)


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """The LRP pass runs in float32 with the layers' float32 weights, also when the forward ran
    under bf16 autocast (`precision="bf16"`): half-precision recordings are widened."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _store(rec, inp: str | None = None, out: str | None = None, graph: bool = False):
    def hook(_m, inputs, output):
        if inp is not None:
            setattr(rec, inp, full_precision(inputs[0].detach()))
        if out is not None:
            setattr(rec, out, output if graph else full_precision(output.detach()))
    return hook


@contextmanager
def record(net: nn.Module, first: int) -> Iterator[Recording]:
    """Hooks recording what the LRP rules need from blocks[first:] and the head, for one forward.

    The input of blocks[first] becomes a leaf that requires grad, so that a frozen network
    builds the autograd graph from there on (∂y/∂A of the recorded blocks) and no lower."""
    rec = Recording(first)
    blocks = list(net.blocks)
    with ExitStack() as stack:
        stack.enter_context(unfused([b.attn for b in blocks[first:]]))
        leaf = blocks[first].register_forward_pre_hook(
            lambda _m, args: (args[0].detach().requires_grad_(True), *args[1:]))
        stack.callback(leaf.remove)
        for i in range(first, len(blocks)):
            blk, r = blocks[i], rec.blocks.setdefault(i, BlockRecord())
            attn, mlp = blk.attn, blk.mlp
            _hook(stack, blk, _store(r, "x_in", "x_out"))
            _hook(stack, attn.qkv, _store(r, "n1", "qkv"))
            _hook(stack, attn.q_norm, _store(r, out="q"))
            _hook(stack, attn.k_norm, _store(r, out="k"))
            _hook(stack, attn.attn_drop, _store(r, out="attn", graph=True))
            _hook(stack, attn.proj, _store(r, "o", "proj"))
            _hook(stack, blk.ls1, _store(r, out="b1"))
            _hook(stack, blk.norm2, _store(r, "x_mid"))
            _hook(stack, mlp.fc1, _store(r, "fc1_in", "fc1"))
            _hook(stack, mlp.fc2, _store(r, "fc2_in", "fc2"))
            _hook(stack, blk.ls2, _store(r, out="b2"))
        _hook(stack, net.norm, _store(rec, out="tokens"))
        for name in ("head", "head_dist"):
            if isinstance(getattr(net, name, None), nn.Module):
                _hook(stack, getattr(net, name), _keep_head(rec, name))
        yield rec


def _keep_head(rec: Recording, name: str):
    def hook(_m, inputs, output):
        rec.head[name] = (full_precision(inputs[0].detach()), full_precision(output.detach()))
    return hook


# --------------------------------------------------------------------------------------------
# The rules (module docstring); every sum that the add rule takes is per image.


def sd(a: torch.Tensor, b: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Chefer's `safe_divide`: a / (b + ε) where b ≠ 0, else 0 (ε where b + ε is exactly 0)."""
    den = b + eps
    den.masked_fill_(den == 0, eps)
    return (a / den).masked_fill_(b == 0, 0)


def linear_rule(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                R: torch.Tensor, *, alpha: float = 1.0, eps: float = EPS) -> torch.Tensor:
    """The αβ rule for y = x·Wᵀ + b (b ignored, as in Chefer's), from the layer's x and y.

    The sums of positive and negative contributions come without forming them: with
    P = |x|·|W|ᵀ and y0 = y − b, Σ_i z⁺ = (y0 + P)/2 and Σ_i z⁻ = (y0 − P)/2, one product where
    the parts take two. Where a sum is under 5% of P (+|b|), rounding in y0 could dominate it,
    so those tokens' sums are recomputed from the parts (x⁺·W⁺ᵀ + x⁻·W⁻ᵀ): rare in wide layers,
    and exactly 0 where an output has no contribution of that sign. The relevance
    R_i = x_i·Σ_o S_o·W±_oi, with W⁺ where x_i > 0 and W⁻ where x_i < 0, is then exact whatever S
    is: a term meets an exact zero wherever its contribution has the other sign. So S = R/(Σz⁺ + ε)
    needs no mask where Σz⁺ = 0 (safe_divide's 0 there multiplies only zeros too).
    """
    shape = x.shape
    x, y, R = x.reshape(-1, shape[-1]), y.reshape(-1, y.shape[-1]), R.reshape(-1, R.shape[-1])
    wp = weight.clamp(min=0)
    wn = weight - wp
    P = x.abs() @ (wp - wn).T
    b = torch.zeros_like(y[0]) if bias is None else bias
    # den = Σz⁺ + ε = (y − b + P)/2 + ε, in two passes; risky: Σz⁺ ≤ τ·(P + |b|)
    den = torch.add(eps - b / 2, y, alpha=0.5).add_(P, alpha=0.5)
    risky = torch.add(den, P, alpha=-_RISKY_SHARE).le(eps + _RISKY_SHARE * b.abs())
    if alpha != 1:
        twice_n = y - b - P                            # 2·Σz⁻
        risky |= -twice_n <= 2 * _RISKY_SHARE * (P + b.abs())
    rows = risky.any(-1).nonzero()[:, 0]
    if len(rows):  # exact where the shortcut could not be trusted
        xp = x[rows].clamp(min=0)
        xn = x[rows] - xp
        den[rows] = (xp @ wp.T + xn @ wn.T).add_(eps)
        if alpha != 1:
            twice_n[rows] = 2 * (xp @ wn.T + xn @ wp.T)
    pos = x > 0
    s = R / den                                        # Σz⁺ ≥ 0, so den > 0
    out = torch.where(pos, s @ wp, s @ wn).mul_(x)
    if alpha != 1:
        s = sd(R, twice_n.mul_(0.5), eps)
        out = out.mul_(alpha).sub_(torch.where(pos, s @ wn, s @ wp).mul_(x), alpha=alpha - 1)
    return out.view(shape)


def linear_module_rule(layer: nn.Linear, x: torch.Tensor, y: torch.Tensor, R: torch.Tensor, *,
                       alpha: float, eps: float) -> torch.Tensor:
    return linear_rule(x, y, layer.weight, layer.bias, R, alpha=alpha, eps=eps)


def add_rule(u: torch.Tensor, f: torch.Tensor, z: torch.Tensor, R: torch.Tensor,
             eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add z = u + f: (R_u, R_f), splitting Σ R per image in the ratio |Σ a| : |Σ b|."""
    s = sd(R, z, eps)
    a, b = u * s, f * s
    dims = tuple(range(1, R.dim()))
    a_sum, b_sum, total = a.sum(dims), b.sum(dims), R.sum(dims)
    both = a_sum.abs() + b_sum.abs()
    shape = (-1,) + (1,) * len(dims)
    a.mul_(sd(sd(a_sum.abs(), both, eps) * total, a_sum, eps).view(shape))
    b.mul_(sd(sd(b_sum.abs(), both, eps) * total, b_sum, eps).view(shape))
    return a, b


def branch_rule(u: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Two uses of u: their relevances summed (Chefer's Clone), u·(sd(r₁, u) + sd(r₂, u)).
    Where u = 0 that is 0, which u·(r₁ + r₂)/(u + ε) gives without a mask."""
    den = u + eps
    den.masked_fill_(den == 0, eps)
    return (r1 + r2).mul_(u).div_(den)


def product_rules(a: torch.Tensor, b: torch.Tensor, R: torch.Tensor, eps: float = EPS,
                  z: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """z = a·b (batched matmul; pass it when the forward already has it): LRP-0 to each operand,
    halved: (R_a, R_b)."""
    s = sd(R, a @ b if z is None else z, eps)
    halve_s = s.numel() < a.numel() + b.numel()  # halve the smaller side
    if halve_s:
        s.mul_(0.5)
    ra, rb = (s @ b.transpose(-1, -2)).mul_(a), (a.transpose(-1, -2) @ s).mul_(b)
    return (ra, rb) if halve_s else (ra.mul_(0.5), rb.mul_(0.5))


# --------------------------------------------------------------------------------------------
# The pass


@dataclass
class Relevance:
    attn: dict[int, torch.Tensor]        # block → R_A, B×H×N×N
    block_in: dict[int, torch.Tensor]    # block → R at its input (blocks above the first one read)
    top: torch.Tensor                    # R at the last block's output (after the head and the final norm)


def _head_relevance(net: nn.Module, rec: Recording, targets: torch.Tensor, *, alpha: float,
                    eps: float) -> tuple[torch.Tensor, int]:
    """R at the final norm's output tokens, and how many leading tokens carry it."""
    names = [n for n in ("head", "head_dist") if n in rec.head]
    heads = [getattr(net, n) for n in names]
    x = torch.cat([rec.head[n][0] for n in names], dim=1)
    y = sum(rec.head[n][1] for n in names) / len(heads)
    weight = torch.cat([h.weight for h in heads], dim=1) / len(heads)
    biases = [h.bias for h in heads if h.bias is not None]
    bias = sum(biases) / len(heads) if biases else None
    onehot = torch.zeros_like(y)
    onehot[torch.arange(len(targets), device=y.device), targets] = 1
    r = linear_rule(x, y, weight, bias, onehot, alpha=alpha, eps=eps)
    tokens = rec.tokens
    R = torch.zeros_like(tokens)
    for t, part in enumerate(r.split(tokens.shape[-1], dim=1)):
        R[:, t] = tokens[:, t] * sd(part, tokens[:, t], eps)
    return R, len(heads)


def _block_relevance(blk: nn.Module, r: BlockRecord, R: torch.Tensor, rows: int | None, down: bool, *,
                     alpha: float, eps: float) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(R at the block input or None when not `down`, R_A). rows: only the first `rows` tokens
    carry relevance at the output (the last block, below the head): the per-token layers and
    the queries run on those alone."""
    attn = blk.attn
    B, N, C = r.x_in.shape
    H, D = attn.num_heads, attn.head_dim
    t = slice(None) if rows is None else slice(0, rows)
    n = N if rows is None else rows
    R = R[:, t]
    a, b = add_rule(r.x_mid[:, t], r.b2[:, t], r.x_out[:, t], R, eps)
    m = linear_module_rule(blk.mlp.fc2, r.fc2_in[:, t], r.fc2[:, t], b, alpha=alpha, eps=eps)
    m = linear_module_rule(blk.mlp.fc1, r.fc1_in[:, t], r.fc1[:, t], m, alpha=alpha, eps=eps)
    R = branch_rule(r.x_mid[:, t], a, m, eps)
    a, b = add_rule(r.x_in[:, t], r.b1[:, t], r.x_mid[:, t], R, eps)
    ro = linear_module_rule(attn.proj, r.o[:, t], r.proj[:, t], b, alpha=alpha, eps=eps)
    ro = ro.reshape(B, n, H, D).transpose(1, 2)
    A = r.attn[:, :, t]
    v = r.qkv.reshape(B, N, 3, H, D)[:, :, 2].transpose(1, 2)
    # proj's input is A·V with the heads merged, unless a norm sits between them
    av = r.o[:, t].reshape(B, n, H, D).transpose(1, 2) if isinstance(attn.norm, nn.Identity) else None
    RA, Rv = product_rules(A, v, ro, eps, z=av)
    if rows is not None:
        RA = torch.cat([RA, RA.new_zeros(B, H, N - n, N)], dim=2)
    if not down:
        return None, RA
    Rq, Rk = product_rules(r.q[:, :, t], r.k.transpose(-1, -2), RA[:, :, t], eps)
    Rk = Rk.transpose(-1, -2)
    if rows is not None:
        Rq = torch.cat([Rq, Rq.new_zeros(B, H, N - n, D)], dim=2)
        a = torch.cat([a, a.new_zeros(B, N - n, C)], dim=1)
    Rqkv = torch.stack([Rq, Rk, Rv], dim=2).permute(0, 3, 2, 1, 4).reshape(B, N, 3 * H * D)
    R = linear_module_rule(attn.qkv, r.n1, r.qkv, Rqkv, alpha=alpha, eps=eps)
    return branch_rule(r.x_in, a, R, eps), RA


@torch.no_grad()
def relevance(net: nn.Module, rec: Recording, targets: torch.Tensor, *, alpha: float = 1.0,
              eps: float = EPS) -> Relevance:
    """R_A of blocks[rec.first:] for class `targets`, from one recorded forward."""
    R, rows = _head_relevance(net, rec, targets, alpha=alpha, eps=eps)
    out = Relevance(attn={}, block_in={}, top=R)
    last = len(net.blocks) - 1
    for i in range(last, rec.first - 1, -1):
        R, out.attn[i] = _block_relevance(net.blocks[i], rec.blocks[i], R, rows if i == last else None,
                                          down=i > rec.first, alpha=alpha, eps=eps)
        if R is not None:
            out.block_in[i] = R
    return out


def head_mean(t: torch.Tensor) -> torch.Tensor:
    """B×H×n×N → B×n×N, the mean over heads as one matrix product with a row of 1/H: on a CPU a
    third of the time of `mean(1)`, whose strided reduction is slow."""
    B, H = t.shape[:2]
    w = torch.full((1, 1, H), 1.0 / H, dtype=t.dtype, device=t.device)
    return torch.matmul(w, t.reshape(B, H, -1)).view(B, *t.shape[2:])


def rollout_row(mats: list[torch.Tensor], *, renormalize: bool) -> torch.Tensor:
    """Row 0 of M_L ⋯ M_1 with M = Ā + I (rows renormalised to sum 1 if asked), mats in block
    order. Taken as e₀ᵀ·M_L·…·M_1 from the top: vector–matrix products instead of N×N×N ones."""
    eye = torch.eye(mats[0].shape[-1], dtype=mats[0].dtype, device=mats[0].device)

    def aug(m):
        m = m + eye
        return m / m.sum(-1, keepdim=True) if renormalize else m

    row = aug(mats[-1])[:, 0]
    for m in reversed(mats[:-1]):
        row = torch.bmm(row[:, None], aug(m))[:, 0]
    return row
