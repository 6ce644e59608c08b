"""The attention methods (RawAtt, Rollout, TIBAV) against plain per-image references written out
here from the weights, the LRP rules on hand-computed numbers and by what they conserve, and the
contract with the caller: ViT/DeiT only (a clear error, a refused run config), hooks and timm's
fused-attention switch left as found, also after an error.

The references recompute every block of a timm ViT from its parameters, one image at a time, and
write each LRP rule with its contributions spelled out (z_oi = x_i·W_oi, c_ijd = A_ij·V_jd, …),
where the method uses batched shortcuts (|x|·|W|ᵀ, S·Vᵀ, vector–matrix rollout).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from opticam_core import ModelError, explain
from opticam_core.hooks import hook_count
from opticam_core.methods import method_spec
from opticam_core.methods import transformer_lrp as lrp
from opticam_core.models import recipe
from opticam_core.options import OptionsError

from . import _toys

ATTENTION = ("rawatt", "rollout", "tibav")


# --------------------------------------------------------------------------------------------
# Toy transformers


def _toy_net(*, act=nn.GELU, distilled=False, init_values=None, qk_norm=False, inner_norms=False, seed=1,
             depth=2, embed_dim=16, num_heads=2):
    """A two-block timm ViT like `_toys.tiny_vit`, with the variants the rules must handle."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    cls = VisionTransformerDistilled if distilled else VisionTransformer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = cls(img_size=_toys.TOY_SIZE, patch_size=8, num_classes=_toys.NUM_CLASSES, embed_dim=embed_dim,
                  depth=depth, num_heads=num_heads, mlp_ratio=2.0, act_layer=act, init_values=init_values,
                  qk_norm=qk_norm, scale_attn_norm=inner_norms, scale_mlp_norm=inner_norms)
        with torch.no_grad():
            for p in net.parameters():
                if p.dim() >= 2:
                    p.mul_(8.0)
            for h in [net.head] + ([net.head_dist] if distilled else []):
                nn.init.normal_(h.weight, std=1.0)
                nn.init.normal_(h.bias, std=0.1)
            for m in net.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0.0, 0.3)
            for m in net.blocks.modules():  # timm starts biases at 0; the rules must ignore them
                if isinstance(m, nn.Linear) and m.bias is not None:
                    m.bias.normal_(0.0, 0.5)
            if init_values is not None:
                for blk in net.blocks:
                    blk.ls1.gamma.uniform_(0.3, 1.5)
                    blk.ls2.gamma.uniform_(0.3, 1.5)
    return net.double().eval()


def _bundle(net, name="toy"):
    return _toys.bundle_for(net, "blocks.1.norm1", name=name, tail=None)


VARIANTS = {
    "relu": lambda: _toys.vit_bundle(),
    "gelu_layerscale_norms": lambda: _bundle(_toy_net(init_values=1.0, qk_norm=True, inner_norms=True), "gelu"),
    "distilled": lambda: _bundle(_toy_net(distilled=True, seed=2), "distilled"),
}


@pytest.fixture(scope="module")
def bundles():
    return {k: make() for k, make in VARIANTS.items()}


@pytest.fixture(scope="module")
def batch():
    return _toys.images(3, seed=5), _toys.targets(3, seed=5)


# --------------------------------------------------------------------------------------------
# The per-image reference: the forward from the parameters, then each rule spelled out


def _ln(x, m):
    return F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)


def _lin(x, m):
    return x @ m.weight.T + m.bias


def _scale(ls, x):
    return x * ls.gamma if hasattr(ls, "gamma") else x


def reference_forward(bundle, image):
    """One image through every block, from the parameters. Returns the logits and, per block,
    its activations; the attention probabilities keep their graph (for ∂y/∂A)."""
    net = bundle.model.net
    x = ((image - bundle.model.mean[0]) / bundle.model.std[0])[None]
    with torch.no_grad():
        u = net.norm_pre(net._pos_embed(net.patch_embed(x)))[0]          # N×C, below all that is explained
    u = u.clone().requires_grad_(True)
    blocks = []
    for blk in net.blocks:
        at = blk.attn
        N, C = u.shape
        H, D = at.num_heads, at.head_dim
        r = {"u": u}
        r["n1"] = _ln(u, blk.norm1)
        r["qkv"] = _lin(r["n1"], at.qkv)
        q, k, v = r["qkv"].view(N, 3, H, D).permute(1, 2, 0, 3)            # each H×N×D
        if isinstance(at.q_norm, nn.LayerNorm):
            q, k = _ln(q, at.q_norm), _ln(k, at.k_norm)
        r["q"], r["k"], r["v"] = q, k, v
        r["A"] = torch.softmax((q @ k.transpose(1, 2)) * at.scale, dim=-1)  # H×N×N
        r["o"] = (r["A"] @ v).transpose(0, 1).reshape(N, C)
        if isinstance(at.norm, nn.LayerNorm):
            r["o"] = _ln(r["o"], at.norm)
        r["p"] = _lin(r["o"], at.proj)
        r["b1"] = _scale(blk.ls1, r["p"])
        r["mid"] = u + r["b1"]
        r["n2"] = _ln(r["mid"], blk.norm2)
        r["h"] = _lin(r["n2"], blk.mlp.fc1)
        r["g"] = blk.mlp.act(r["h"])
        if isinstance(blk.mlp.norm, nn.LayerNorm):
            r["g"] = _ln(r["g"], blk.mlp.norm)
        r["f"] = _lin(r["g"], blk.mlp.fc2)
        r["b2"] = _scale(blk.ls2, r["f"])
        u = r["out"] = r["mid"] + r["b2"]
        blocks.append(r)
    final = _ln(u, net.norm)
    heads = [net.head] + ([net.head_dist] if hasattr(net, "head_dist") else [])
    logits = sum(_lin(final[t], h) for t, h in enumerate(heads)) / len(heads)
    return logits, blocks, final


def sdiv(a, b, eps=1e-9):
    """a / (b + ε), 0 where b = 0 (the stabiliser of Chefer's rules)."""
    return torch.where(b != 0, a / (b + eps), torch.zeros_like(a))


def ref_linear(x, W, R, alpha=1.0):
    """T×I inputs, O×I weights, T×O relevance → T×I, from the T×O×I contributions."""
    z = x[:, None, :] * W[None]
    zp, zn = z.clamp(min=0), z.clamp(max=0)
    act = (zp * sdiv(R, zp.sum(2))[..., None]).sum(1)
    inh = (zn * sdiv(R, zn.sum(2))[..., None]).sum(1)
    return alpha * act - (alpha - 1) * inh


def ref_add(u, f, R):
    z = u + f
    a, b = u * sdiv(R, z), f * sdiv(R, z)
    sa, sb = a.sum(), b.sum()
    share_a = sdiv(sa.abs(), sa.abs() + sb.abs()) * R.sum()
    share_b = sdiv(sb.abs(), sa.abs() + sb.abs()) * R.sum()
    return a * sdiv(share_a, sa), b * sdiv(share_b, sb)


def ref_branch(u, r1, r2):
    return u * (sdiv(r1, u) + sdiv(r2, u))


def ref_attn_times_v(A, V, R):
    """Per head: c_ijd = A_ij·V_jd, z_id = Σ_j c_ijd; each operand gets Σ c·R/z, halved."""
    c = A[:, :, :, None] * V[:, None, :, :]                       # H×i×j×d
    share = c * sdiv(R, c.sum(2))[:, :, None, :]
    return share.sum(3) / 2, share.sum(1) / 2                      # R_A: H×i×j, R_V: H×j×d


def ref_q_times_k(q, k, R):
    """Per head: c_ijd = q_id·k_jd, z_ij = Σ_d c_ijd."""
    c = q[:, :, None, :] * k[:, None, :, :]                        # H×i×j×d
    share = c * sdiv(R, c.sum(3))[..., None]
    return share.sum(2) / 2, share.sum(1) / 2


def reference_relevance(bundle, image, target, *, alpha=1.0, first=0):
    """R_A per block (H×N×N) and R at each block input, for one image, by the rules spelled out."""
    net = bundle.model.net
    _, blocks, final = reference_forward(bundle, image)
    with torch.no_grad():
        heads = [net.head] + ([net.head_dist] if hasattr(net, "head_dist") else [])
        x = torch.cat([final[t] for t in range(len(heads))])[None]
        W = torch.cat([h.weight for h in heads], dim=1) / len(heads)
        onehot = torch.zeros(1, W.shape[0], dtype=x.dtype)
        onehot[0, target] = 1
        r = ref_linear(x, W, onehot, alpha)[0]
        R = torch.zeros_like(final)
        for t in range(len(heads)):
            R[t] = final[t] * sdiv(r[t * final.shape[1]:(t + 1) * final.shape[1]], final[t])
        RA, R_in = {}, {}
        for i in reversed(range(first, len(blocks))):
            b = {k: v.detach() for k, v in blocks[i].items()}
            at, mlp = net.blocks[i].attn, net.blocks[i].mlp
            H, N, D = b["v"].shape
            res, mlp_r = ref_add(b["mid"], b["b2"], R)
            mlp_r = ref_linear(b["g"], mlp.fc2.weight, mlp_r, alpha)       # ls2, act, mlp.norm: identity
            mlp_r = ref_linear(b["n2"], mlp.fc1.weight, mlp_r, alpha)      # norm2: identity
            R = ref_branch(b["mid"], res, mlp_r)
            res, att_r = ref_add(b["u"], b["b1"], R)
            att_r = ref_linear(b["o"], at.proj.weight, att_r, alpha)       # ls1, attn.norm: identity
            RA[i], Rv = ref_attn_times_v(b["A"], b["v"], att_r.view(N, H, D).transpose(0, 1))
            if i == first:
                break
            Rq, Rk = ref_q_times_k(b["q"], b["k"], RA[i])                 # softmax: identity
            Rqkv = torch.stack([Rq, Rk, Rv]).permute(2, 0, 1, 3).reshape(N, 3 * H * D)
            R = R_in[i] = ref_branch(b["u"], res, ref_linear(b["n1"], at.qkv.weight, Rqkv, alpha))
    return RA, R_in


def _up_minmax(cam, size):
    up = F.interpolate(cam[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return (up - up.min()) / (up.max() - up.min())


def _grid(net, row):
    side = int(math.isqrt(row.numel() - net.num_prefix_tokens))
    return row[net.num_prefix_tokens:].reshape(side, side)


def _chefer_rollout(mats, renormalize):
    """Their `compute_rollout_attention` on one image: the full N×N joint, later blocks on the left."""
    aug = [m + torch.eye(m.shape[-1], dtype=m.dtype) for m in mats]
    if renormalize:
        aug = [m / m.sum(-1, keepdim=True) for m in aug]
    joint = aug[0]
    for m in aug[1:]:
        joint = m @ joint
    return joint[0]


def reference_map(bundle, image, target, method, *, block=-1, start_layer=0, renormalize=None, alpha=1.0):
    net = bundle.model.net
    logits, blocks, _ = reference_forward(bundle, image)
    if method == "rawatt":
        row = blocks[block]["A"].detach().clamp(min=0).mean(0)[0]
    elif method == "rollout":
        mats = [b["A"].detach().mean(0) for b in blocks[start_layer:]]
        row = _chefer_rollout(mats, True if renormalize is None else renormalize)
    else:
        grads = torch.autograd.grad(logits[target], [b["A"] for b in blocks[start_layer:]])
        RA, _ = reference_relevance(bundle, image, target, alpha=alpha, first=start_layer)
        mats = [(g * RA[i]).clamp(min=0).mean(0) for g, i in zip(grads, range(start_layer, len(blocks)))]
        row = _chefer_rollout(mats, False if renormalize is None else renormalize)
    return _up_minmax(_grid(net, row), tuple(image.shape[-2:]))


# --------------------------------------------------------------------------------------------
# The reference itself is the network


@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_forward_is_the_network(bundles, batch, variant):
    bundle = bundles[variant]
    x, _ = batch
    for i in range(len(x)):
        logits, blocks, _ = reference_forward(bundle, x[i])
        torch.testing.assert_close(logits.detach(), bundle.model(x[i:i + 1])[0], rtol=1e-10, atol=1e-10)
        for b in blocks:
            torch.testing.assert_close(b["A"].detach().sum(-1), torch.ones(b["A"].shape[:2], dtype=torch.float64))


# --------------------------------------------------------------------------------------------
# Parity with the per-image references


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("method, options", [
    ("rawatt", {}), ("rawatt", {"block": 0}),
    ("rollout", {}), ("rollout", {"start_layer": 1}), ("rollout", {"renormalize": False}),
    ("tibav", {}), ("tibav", {"start_layer": 1}), ("tibav", {"alpha": 2.0}), ("tibav", {"renormalize": True}),
])
def test_maps_match_the_per_image_reference(bundles, batch, variant, method, options):
    bundle = bundles[variant]
    x, t = batch
    res = explain(bundle, x, t, method, **options)
    assert res.maps.shape == x[:, 0].shape and not res.extras["constant"].any()
    for i in range(len(x)):
        ref = reference_map(bundle, x[i], int(t[i]), method, **options)
        torch.testing.assert_close(res.maps[i], ref, rtol=0, atol=1e-9)


def test_tibav_is_class_specific_and_the_others_are_not(bundles, batch):
    bundle = bundles["relu"]
    x, t = batch
    other = (t + 1) % _toys.NUM_CLASSES
    for method in ("rawatt", "rollout"):
        assert torch.equal(explain(bundle, x, t, method).maps, explain(bundle, x, other, method).maps)
    assert not torch.allclose(explain(bundle, x, t, "tibav").maps, explain(bundle, x, other, "tibav").maps)


@pytest.mark.parametrize("variant", VARIANTS)
def test_relevance_of_each_attention_matches_the_reference(bundles, batch, variant):
    """The R_A the method reads, block by block, and R at each block input, before any clamp."""
    bundle = bundles[variant]
    net = bundle.model.net
    x, t = batch
    with lrp.record(net, 0) as rec:
        bundle.model(x)
    rel = lrp.relevance(net, rec, t)
    for i in range(len(x)):
        RA, R_in = reference_relevance(bundle, x[i], int(t[i]))
        assert set(rel.attn) == set(RA) == {0, 1} and set(rel.block_in) == set(R_in) == {1}
        for b in RA:
            torch.testing.assert_close(rel.attn[b][i], RA[b], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(rel.block_in[1][i], R_in[1], rtol=1e-9, atol=1e-12)


def test_batched_equals_one_image_at_a_time(bundles, batch):
    bundle = bundles["distilled"]
    x, t = batch
    for method in ATTENTION:
        whole = explain(bundle, x, t, method).maps
        for i in range(len(x)):
            torch.testing.assert_close(whole[i:i + 1], explain(bundle, x[i:i + 1], t[i:i + 1], method).maps,
                                       rtol=0, atol=1e-12)


def test_distillation_token_is_dropped_with_the_class_token(bundles, batch):
    bundle = bundles["distilled"]
    assert bundle.model.net.num_prefix_tokens == 2
    x, t = batch
    seen = {}
    with lrp.attention_probabilities(lrp.attention_modules(bundle.model.net), lambda a: a) as probs:
        bundle.model(x)
    last = probs[-1].mean(1)[:, 0]                           # B×(2+16)
    seen["rawatt"] = last[:, 2:].reshape(-1, 4, 4)
    res = explain(bundle, x, t, "rawatt").maps
    expected = torch.stack([_up_minmax(m, x.shape[-2:]) for m in seen["rawatt"]])
    torch.testing.assert_close(res, expected, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------
# The rules on numbers one can check by hand, and what they conserve


def test_linear_rule_by_hand():
    """x = (1, −2), W = [[1, 1], [−1, 2]]: output 0 has contributions (1, −2), output 1 has
    (−1, −4), no positive one. z⁺ (α = 1): R = (R₀, 0); output 1's relevance is dropped.
    α = 2, β = 1: output 0 adds 2·(R₀, 0) − (0, R₀); output 1 adds −(R₁/5, 4R₁/5)."""
    x = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    W = torch.tensor([[1.0, 1.0], [-1.0, 2.0]], dtype=torch.float64)
    R = torch.tensor([[3.0, 10.0]], dtype=torch.float64)
    y = x @ W.T
    z1 = lrp.linear_rule(x, y, W, None, R)
    torch.testing.assert_close(z1, torch.tensor([[3.0 * 1 / (1 + 1e-9), 0.0]], dtype=torch.float64))
    z2 = lrp.linear_rule(x, y, W, None, R, alpha=2.0)
    expected = torch.tensor([[6.0 - 2.0, -3.0 - 8.0]], dtype=torch.float64)
    torch.testing.assert_close(z2, expected, rtol=1e-8, atol=0)


def test_add_branch_and_product_rules_by_hand():
    # add: u = (1, 3), f = (1, −1), z = (2, 2), R = (4, 2): a = (2, 3), b = (2, −1); Σa = 5, Σb = 1,
    # so the operands get 6·5/6 = 5 and 6·1/6 = 1: a unchanged, b unchanged.
    u, f = torch.tensor([[1.0, 3.0]]), torch.tensor([[1.0, -1.0]])
    a, b = lrp.add_rule(u.double(), f.double(), (u + f).double(), torch.tensor([[4.0, 2.0]]).double(), eps=0.0)
    torch.testing.assert_close(a, torch.tensor([[2.0, 3.0]]).double())
    torch.testing.assert_close(b, torch.tensor([[2.0, -1.0]]).double())
    # f = (−3, −1): z = (−2, 2), R/z = (−2, 1), a = (−2, 3), b = (6, −1): Σa = 1, Σb = 5 of ΣR = 6,
    # shares 6·1/6 = 1 and 6·5/6 = 5: both unchanged, though a has a negative entry.
    f2 = torch.tensor([[-3.0, -1.0]]).double()
    a, b = lrp.add_rule(u.double(), f2, u.double() + f2, torch.tensor([[4.0, 2.0]]).double(), eps=0.0)
    torch.testing.assert_close(a, torch.tensor([[-2.0, 3.0]]).double())
    torch.testing.assert_close(b, torch.tensor([[6.0, -1.0]]).double())
    # f = (1, −4): z = (2, −1), R/z = (2, −2), a = (2, −6), b = (2, 8): Σa = −4, Σb = 10, |Σa| : |Σb| = 2 : 5,
    # so a is rescaled to sum 6·2/7 and b to 6·5/7.
    f3 = torch.tensor([[1.0, -4.0]]).double()
    a, b = lrp.add_rule(u.double(), f3, u.double() + f3, torch.tensor([[4.0, 2.0]]).double(), eps=0.0)
    torch.testing.assert_close(a, torch.tensor([[2.0, -6.0]]).double() * (12 / 7) / -4)
    torch.testing.assert_close(b, torch.tensor([[2.0, 8.0]]).double() * (30 / 7) / 10)
    # branch: the two relevances add up (u ≠ 0)
    torch.testing.assert_close(lrp.branch_rule(u.double(), a, b, eps=0.0), a + b)
    # product: [a b]·[c d]ᵀ = ac + bd with (a, b) = (1, 2), (c, d) = (3, 1): z = 5, R = 10;
    # each operand gets input × gradient × R/z, halved: R_left = (1·3, 2·1)·2/2 = (3, 2)
    left = torch.tensor([[[1.0, 2.0]]]).double()
    right = torch.tensor([[[3.0], [1.0]]]).double()
    Rl, Rr = lrp.product_rules(left, right, torch.tensor([[[10.0]]]).double(), eps=0.0)
    torch.testing.assert_close(Rl, torch.tensor([[[3.0, 2.0]]]).double())
    torch.testing.assert_close(Rr, torch.tensor([[[3.0], [2.0]]]).double())


def test_linear_shortcut_equals_the_contributions_even_where_degenerate():
    """float32, wide and narrow layers, with rows whose positive contributions vanish: the
    shortcut (|x|·|W|ᵀ) must agree with the contribution form, and drop what it drops."""
    gen = torch.Generator().manual_seed(0)
    for T, I, O in [(5, 64, 48), (7, 8, 6)]:
        x = torch.randn(T, I, generator=gen).relu()                  # non-negative, like ReLU/GELU outputs
        W = torch.randn(O, I, generator=gen)
        W[0] = -W[0].abs()                                           # output 0: no positive contribution
        W[1] = -W[1].abs()
        W[1, 0] = 1e-4                                               # output 1: a tiny positive share
        x[:, 0] = 1.0
        b = torch.randn(O, generator=gen)
        R = torch.randn(T, O, generator=gen)
        y = x @ W.T + b
        for alpha in (1.0, 2.0):
            ours = lrp.linear_rule(x, y, W, b, R, alpha=alpha)
            ref = ref_linear(x.double(), W.double(), R.double(), alpha)
            torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("variant", VARIANTS)
def test_relevance_is_conserved_through_every_block(bundles, batch, variant):
    """Every rule here conserves Σ R per image (z⁺ wherever an output has a positive contribution),
    so the one-hot's 1 arrives whole at the head's tokens and at every block input, and each
    attention gets half of what its branch got, the other half going to V."""
    bundle = bundles[variant]
    net = bundle.model.net
    x, t = batch
    with lrp.record(net, 0) as rec:
        bundle.model(x)
    rel = lrp.relevance(net, rec, t)
    one = torch.ones(len(x), dtype=torch.float64)
    torch.testing.assert_close(rel.top.sum((1, 2)), one, rtol=1e-7, atol=0)
    torch.testing.assert_close(rel.block_in[1].sum((1, 2)), one, rtol=1e-7, atol=0)
    for i in (0, 1):
        # R_A + R_V = the relevance of A·V = that of the attention branch (proj conserves)
        blk = rec.blocks[i]
        R_out = rel.top if i == 1 else rel.block_in[1]
        res, mlp = lrp.add_rule(blk.x_mid, blk.b2, blk.x_out, R_out)
        assert torch.isfinite(rel.attn[i]).all()
        mid = res + lrp.linear_module_rule(net.blocks[i].mlp.fc1, blk.fc1_in, blk.fc1,
                                           lrp.linear_module_rule(net.blocks[i].mlp.fc2, blk.fc2_in, blk.fc2, mlp,
                                                                  alpha=1.0, eps=lrp.EPS), alpha=1.0, eps=lrp.EPS)
        torch.testing.assert_close(mid.sum((1, 2)), one, rtol=1e-7, atol=0)
        _, branch = lrp.add_rule(blk.x_in, blk.b1, blk.x_mid, lrp.branch_rule(blk.x_mid, res, mid - res))
        torch.testing.assert_close(rel.attn[i].sum((1, 2, 3)), branch.sum((1, 2)) / 2, rtol=1e-7, atol=1e-12)


def test_twelve_block_deit_conserves_and_maps_to_its_patch_grid():
    """A random-weight timm DeiT-Ti (12 blocks, GELU, 197 tokens, 224 px): the real geometry."""
    import timm

    torch.manual_seed(0)
    net = timm.create_model("deit_tiny_patch16_224", pretrained=False).double().eval()
    bundle = _toys.bundle_for(net, "blocks.11.norm1", name="deit_tiny", tail=None)
    bundle.input_size = (224, 224)
    x = _toys.images(1, size=224, seed=2)
    t = torch.tensor([3])
    with torch.no_grad():
        logits = bundle.model(x)
    with lrp.record(net, 0) as rec:
        unfused = bundle.model(x)
    torch.testing.assert_close(unfused, logits, rtol=1e-12, atol=1e-12)
    rel = lrp.relevance(net, rec, t)
    for i, R in rel.block_in.items():
        torch.testing.assert_close(R.sum(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-6, atol=0, msg=str(i))
    res = explain(bundle, x, t, list(ATTENTION))
    for r in res.values():
        assert r.maps.shape == (1, 224, 224) and r.maps.min() == 0 and r.maps.max() == 1
    with torch.no_grad():
        assert torch.equal(logits, bundle.model(x))  # the fused kernel back, the same bits


# --------------------------------------------------------------------------------------------
# The contract with callers


def test_a_cnn_is_refused_naming_the_models_accepted(batch):
    x, t = batch
    for method in ATTENTION:
        with pytest.raises(ModelError) as info:
            explain(_toys.cnn_bundle(), x, t, method)
        msg = str(info.value)
        assert msg.startswith(f"{method} needs attention blocks (timm ViT/DeiT), which 'tiny_cnn' does not have")
        assert "vit_base_patch16_224, deit_base_patch16_224" in msg


def test_a_vit_without_class_token_is_refused_and_tibav_needs_a_token_head(batch):
    from timm.models.vision_transformer import VisionTransformer

    x, t = batch
    gap = VisionTransformer(img_size=32, patch_size=8, num_classes=6, embed_dim=16, depth=2, num_heads=2,
                            class_token=False, global_pool="avg").double().eval()
    with pytest.raises(ModelError, match="rawatt needs attention blocks"):
        explain(_toys.bundle_for(gap, "blocks.1.norm1", tail=None), x, t, "rawatt")
    avg = VisionTransformer(img_size=32, patch_size=8, num_classes=6, embed_dim=16, depth=2, num_heads=2,
                            global_pool="avg").double().eval()
    bundle = _toys.bundle_for(avg, "blocks.1.norm1", tail=None)
    explain(bundle, x, t, "rollout")  # the class token's attention exists
    with pytest.raises(ModelError, match=r"class-token pooling \(global_pool='token'\), not 'avg'"):
        explain(bundle, x, t, "tibav")
    assert hook_count(bundle.model) == 0


@pytest.mark.parametrize("name, expected", [
    ("vit_base_patch16_224", True), ("vit_b", True), ("deit_base_patch16_224", True),
    ("resnet50", False), ("vgg16", False), ("efficientnet_lite0", False),
    ("deit_tiny_patch16_224", True), ("deit_base_distilled_patch16_224", True),
    ("vit_relpos_base_patch16_224", False),       # timm, but its attention is not timm's Attention
    ("vit_base_patch16_siglip_gap_224", False),   # no class token
    ("vit_b_16", False),                          # torchvision's ViT: load_model builds that one
    ("no_such_model", None),
])
def test_the_requirement_is_told_from_the_recipe(name, expected):
    assert method_spec("rawatt").requires.serves_recipe(recipe(name)) is expected
    assert method_spec("rawatt").requires is method_spec("tibav").requires is method_spec("rollout").requires


def test_run_config_pairing_rawatt_with_resnet50_is_refused_at_check():
    from pipeline.config import ConfigError, load_config

    base = {"output": "/tmp/out", "datasets": [{"name": "imagenet-val", "uri": "s3://b/samples/"}],
            "methods": {"gradcam": {}, "rawatt": {}, "tibav": {"start_layer": 1}}}
    with pytest.raises(ConfigError) as info:
        load_config({**base, "models": [{"name": "resnet50"}, {"name": "vit_b"}]})
    msg = str(info.value)
    assert ("methods.rawatt: needs attention blocks (timm ViT/DeiT), which models[0] ('resnet50') does not have; "
            "it accepts vit_base_patch16_224, deit_base_patch16_224") in msg
    assert "methods.tibav: needs attention blocks" in msg and "models[1]" not in msg
    cfg = load_config({**base, "models": [{"name": "resnet50", "methods": ["gradcam"]}, {"name": "vit_b"}]})
    assert [m for _, _, m in cfg.plans()][:2] == [["gradcam"], ["gradcam", "rawatt", "tibav"]]


def test_options_are_checked(bundles, batch):
    bundle = bundles["relu"]
    x, t = batch
    with pytest.raises(OptionsError, match="tibav.alpha"):
        explain(bundle, x, t, "tibav", alpha=0.5)
    with pytest.raises(OptionsError, match="rollout.start_layer"):
        explain(bundle, x, t, "rollout", start_layer=-1)
    with pytest.raises(ValueError, match=r"start_layer=2, but the model has 2 blocks"):
        explain(bundle, x, t, "tibav", start_layer=2)
    with pytest.raises(ValueError, match=r"block=-3, but the model has 2 blocks"):
        explain(bundle, x, t, "rawatt", block=-3)
    assert hook_count(bundle.model) == 0


def test_uniform_attention_gives_constant_maps_flagged(batch):
    """q = k = 0: every attention row is uniform, so RawAtt's and Rollout's patch columns are equal."""
    net = _toy_net(seed=3)
    with torch.no_grad():
        for blk in net.blocks:
            C = blk.attn.qkv.in_features
            blk.attn.qkv.weight[:2 * C] = 0
            blk.attn.qkv.bias[:2 * C] = 0
    bundle = _bundle(net)
    x, t = batch
    for method in ("rawatt", "rollout"):
        res = explain(bundle, x, t, method)
        assert res.extras["constant"].all() and (res.maps == 0).all()


def _attention_calls(monkeypatch):
    """Count fused-kernel calls (the unfused path never makes one)."""
    calls = []
    fused = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    return calls


@pytest.mark.parametrize("method, options, fused_blocks", [
    ("rawatt", {}, 1), ("rawatt", {"block": 0}, 1), ("rollout", {}, 0), ("rollout", {"start_layer": 1}, 1),
    ("tibav", {}, 0), ("tibav", {"start_layer": 1}, 1), ("gradcam", {}, 2),
])
def test_the_fused_kernel_stays_where_no_method_needs_the_weights(bundles, batch, monkeypatch, method, options,
                                                                  fused_blocks):
    bundle = bundles["relu"]
    attns = lrp.attention_modules(bundle.model.net)
    assert all(a.fused_attn for a in attns)
    calls = _attention_calls(monkeypatch)
    x, t = batch
    explain(bundle, x, t, method, **options)
    assert len(calls) == fused_blocks
    assert all(a.fused_attn for a in attns) and hook_count(bundle.model) == 0


def test_a_model_set_to_the_unfused_path_stays_so(batch):
    bundle = _toys.vit_bundle()
    attns = lrp.attention_modules(bundle.model.net)
    attns[0].fused_attn = False
    x, t = batch
    for method in ATTENTION:
        explain(bundle, x, t, method)
        assert [a.fused_attn for a in attns] == [False, True]


class Bomb(nn.Module):
    """Identity until armed; then raises on its call."""

    def __init__(self):
        super().__init__()
        self.armed = False

    def forward(self, x):
        if self.armed:
            raise RuntimeError("boom")
        return x


@pytest.mark.parametrize("method", ATTENTION)
def test_hooks_come_off_and_fused_is_restored_after_an_error(batch, method):
    net = _toy_net(seed=4)
    bomb = Bomb()
    net.blocks[1].mlp.drop2 = bomb                       # raises in the last block, after the captures began
    bundle = _bundle(net)
    attns = lrp.attention_modules(net)
    x, t = batch
    before = explain(bundle, x, t, method).maps
    bomb.armed = True
    with pytest.raises(RuntimeError, match="boom"):
        explain(bundle, x, t, method)
    assert hook_count(bundle.model) == 0 and all(a.fused_attn for a in attns)
    bomb.armed = False
    torch.testing.assert_close(explain(bundle, x, t, method).maps, before, rtol=0, atol=0)


def test_no_parameter_gradient_even_on_an_unfrozen_network(batch):
    bundle = _toys.vit_bundle()
    bundle.model.requires_grad_(True)
    x, t = batch
    for method in ATTENTION:
        explain(bundle, x, t, method)
    assert all(p.grad is None for p in bundle.model.parameters())


def test_many_calls_leave_no_tensors_and_no_hooks_behind(batch):
    import gc

    def tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))

    bundle = _toys.vit_bundle(dtype=torch.float32)
    x, t = batch
    x = x.float()
    for _ in range(3):
        explain(bundle, x, t, list(ATTENTION))
    before = tensors()
    for _ in range(20):
        out = explain(bundle, x, t, list(ATTENTION))
        assert hook_count(bundle.model) == 0
    del out
    assert tensors() <= before
