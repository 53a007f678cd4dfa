"""Swin encoder (Microsoft layout) and relative-position-table resizing: shapes, hand computations, key layout."""
import math
import re

import pytest
import torch
import torch.nn.functional as F

import common
from common import SwinTransformer, resize_rel_pos_table

TINY = dict(embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))


def tiny(img_size, window_size, **kw):
    """A Swin with widths 8/16/32/64, deterministic weights."""
    torch.manual_seed(0)
    return SwinTransformer(img_size=img_size, window_size=window_size, **{**TINY, **kw}).eval()


# ----------------------------------------------------------------------------- shapes

@pytest.mark.parametrize('res,window', [(128, 4), (224, 7)])
def test_forward_shapes(res, window):
    m = tiny(res, window, num_classes=5)
    imgs = torch.randn(2, 3, res, res)
    final, outs = m.forward_features(imgs, stages=True)
    G = res // 4
    assert final.shape == (2, (G // 8) ** 2, 64)
    assert [o.shape for o in outs] == [(2, (G // 2 ** s) ** 2, 8 * 2 ** s) for s in range(4)]
    assert torch.allclose(final, m.norm(outs[-1]))  # stage outputs are taken before the final norm
    assert m(imgs).shape == (2, 5)
    m.head = None
    assert torch.allclose(m(imgs), final.mean(1))


def test_window_clamp_no_shift_in_small_stage():
    m = tiny(128, 4)  # stage grids 32/16/8/4: the last stage is one unshifted 4x4 window
    sd = m.state_dict()
    assert 'layers.3.blocks.1.attn_mask' not in sd and 'layers.3.blocks.0.attn_mask' not in sd
    assert sd['layers.2.blocks.1.attn_mask'].shape == (4, 16, 16)
    assert set(sd['layers.2.blocks.1.attn_mask'].unique().tolist()) == {0.0, -100.0}
    assert 'layers.2.blocks.0.attn_mask' not in sd
    m = tiny(64, 4)  # grids 16/8/4/2: the last stage clamps to a 2x2 window, table (2*2-1)^2 = 9 rows
    last = m.layers[3].blocks[1]
    assert last.attn.window == 2 and last.shift == 0 and last.attn_mask is None
    assert last.attn.relative_position_bias_table.shape == (9, 4)
    assert m.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 4, 64)


# ----------------------------------------------------------------------------- attention by hand

def dense_block(blk, x, G, w, s):
    """The same block as one dense attention over all G*G tokens, masked by hand to the shifted windows."""
    B, L, C = x.shape
    attn = blk.attn
    nH = attn.num_heads
    d = C // nH
    i = torch.arange(L) // G
    j = torch.arange(L) % G
    pi, pj = (i - s) % G, (j - s) % G  # coordinates after the cyclic roll by -s
    di, dj = i[:, None] - i[None], j[:, None] - j[None]  # query minus key, in image coordinates
    same_window = (pi[:, None] // w == pi[None] // w) & (pj[:, None] // w == pj[None] // w)
    no_wrap = (pi[:, None] - pi[None] == di) & (pj[:, None] - pj[None] == dj)  # neighbours in the image too
    allowed = same_window & no_wrap  # (L, L)
    rows = (di.clamp(-w + 1, w - 1) + w - 1) * (2 * w - 1) + dj.clamp(-w + 1, w - 1) + w - 1
    bias = attn.relative_position_bias_table[rows].permute(2, 0, 1)  # (nH, L, L)
    h = blk.norm1(x)
    q, k, v = (h @ attn.qkv.weight.T + attn.qkv.bias).view(B, L, 3, nH, d).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) / math.sqrt(d) + bias
    a = logits.masked_fill(~allowed, float('-inf')).softmax(-1)  # (B, nH, L, L)
    y = (a @ v).transpose(1, 2).reshape(B, L, C) @ attn.proj.weight.T + attn.proj.bias
    x = x + y
    h = blk.norm2(x)
    return x + F.gelu(h @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias) @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias


@pytest.mark.parametrize('b', [0, 1])
def test_window_attention_equals_dense_masked_attention(b):
    m = tiny(32, 4, embed_dim=16, num_heads=(2, 2, 2, 2))  # stage 0: grid 8, window 4, 4 windows
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)  # large weights so a wrong mask or bias changes the output visibly
    blk = m.layers[0].blocks[b]
    assert (blk.attn.window, blk.shift) == (4, 2 * b)
    x = torch.randn(2, 64, 16)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), dense_block(blk, x, 8, 4, blk.shift), atol=1e-5, rtol=1e-5)


def test_relative_position_index_w2():
    m = tiny(32, 2)  # stage 0: grid 8, window 2
    want = torch.tensor([[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]])  # (dy+1)*3 + (dx+1)
    idx = m.layers[0].blocks[0].attn.relative_position_index
    assert idx.dtype == torch.long and torch.equal(idx, want)


# ----------------------------------------------------------------------------- key layout

def test_swin_base_keys_on_meta():
    with torch.device('meta'):
        enc = SwinTransformer(img_size=128, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                              window_size=4)
        ft = SwinTransformer(img_size=224, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                             window_size=7, num_classes=1000)
    sd = enc.state_dict()
    # 24 blocks x 14 + 11 masks + 3 merges x 3 + patch embed 4 + norm 2 (FastMIM's 417 minus its 55 extras)
    assert len(sd) == 362
    block = r'layers\.(\d)\.blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)'
    patterns = [block, r'layers\.(\d)\.blocks\.(\d+)\.attn\.relative_position_(bias_table|index)',
                r'layers\.(\d)\.blocks\.(\d+)\.attn_mask',
                r'layers\.[012]\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)',
                r'patch_embed\.(proj|norm)\.(weight|bias)', r'norm\.(weight|bias)']
    assert all(any(re.fullmatch(p, k) for p in patterns) for k in sd)
    masks = sorted(k for k in sd if k.endswith('attn_mask'))
    assert masks == sorted([f'layers.{s}.blocks.1.attn_mask' for s in (0, 1)]
                           + [f'layers.2.blocks.{b}.attn_mask' for b in range(1, 18, 2)])
    assert [tuple(sd[f'layers.{s}.blocks.1.attn_mask'].shape) for s in range(3)] == [(64, 16, 16), (16, 16, 16),
                                                                                     (4, 16, 16)]
    assert sd['layers.3.blocks.1.attn.relative_position_bias_table'].shape == (49, 32)
    assert sd['layers.0.blocks.0.attn.relative_position_index'].shape == (16, 16)
    assert 'layers.3.downsample.reduction.weight' not in sd and 'layers.0.downsample.reduction.bias' not in sd
    assert sd['layers.0.downsample.reduction.weight'].shape == (256, 512)
    sd = ft.state_dict()  # the official fine-tune layout at 224/window 7 (interop.md §6: 364 with fc_norm + head)
    assert len(sd) == 364 and sd['head.weight'].shape == (1000, 1024)
    assert [tuple(sd[f'layers.{s}.blocks.1.attn_mask'].shape) for s in range(3)] == [(64, 49, 49), (16, 49, 49),
                                                                                     (4, 49, 49)]
    assert 'layers.3.blocks.1.attn_mask' not in sd
    assert sd['layers.0.blocks.0.attn.relative_position_bias_table'].shape == (169, 4)


# ----------------------------------------------------------------------------- patch merging

def test_merge_orders():
    x = torch.randn(2, 64, 8)  # stage 0 tokens of a 32-px input: grid 8, C 8
    ds = tiny(32, 4).layers[0].downsample
    with torch.no_grad():
        ds.norm.weight.normal_()
        ds.norm.bias.normal_()
    y = ds(x, 8)
    g = x.view(2, 8, 8, 8)
    hand = torch.cat([g[:, 0::2, 0::2], g[:, 1::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 1::2]], -1).view(2, 16, 32)
    torch.testing.assert_close(y, ds.reduction(ds.norm(hand)))  # Swin: TL, BL, TR, BR
    other = tiny(32, 4).layers[0].downsample
    other.load_state_dict(ds.state_dict())
    other.offsets = ((0, 0), (0, 1), (1, 0), (1, 1))  # LocalMIM's pre-training order TL, TR, BL, BR
    assert not torch.allclose(other(x, 8), y)


# ----------------------------------------------------------------------------- resolution changes

def test_set_resolution_steps():
    m = tiny(128, 4)
    table = m.layers[0].blocks[0].attn.relative_position_bias_table
    for res, w in ((160, 5), (192, 6)):
        m.set_resolution(res, w)
        assert m.forward_features(torch.randn(1, 3, res, res)).shape == (1, (res // 32) ** 2, 64)
        if res == 160:
            assert all(b.attn.relative_position_bias_table.shape == (81, b.attn.num_heads)
                       for s in m.layers for b in s.blocks)
            assert m.layers[3].blocks[1].attn_mask is None  # grid 5 = window 5: clamped, unshifted
    # a new Parameter, the old one resized twice; the old one keeps its shape (and its autograd/DDP hooks)
    resized = m.layers[0].blocks[0].attn.relative_position_bias_table
    assert resized is not table and table.shape == (49, 1) and resized.shape == (121, 1)
    twice = common.resize_rel_pos_table(common.resize_rel_pos_table(table.detach(), 9), 11)
    assert torch.equal(resized.detach(), twice)
    assert resized.stride() == (1, 1)  # as its gradient's: DDP would copy a (1, 121)-strided one into its bucket
    fresh = tiny(192, 6)  # a model built at 192/w6 has the same buffers and keys as the resized one
    sd, ref = m.state_dict(), fresh.state_dict()
    assert sd.keys() == ref.keys()
    for k in ref:
        if k.endswith(('attn_mask', 'relative_position_index')):
            assert torch.equal(sd[k], ref[k]), k
        assert sd[k].shape == ref[k].shape, k


def test_bad_resolution_and_window():
    with pytest.raises(ValueError, match=r'res 130 is not divisible by the Swin output stride 32; '
                                         r'use a multiple of 32'):
        tiny(130, 4)
    with pytest.raises(ValueError, match='window 7 does not divide stage grid 32 at res 128; use --window-size 4'):
        tiny(128, 7)
    m = tiny(128, 4)
    with pytest.raises(ValueError, match='window 7 does not divide'):
        m.set_resolution(128, 7)
    assert m.img_size == 128 and m.layers[0].blocks[0].attn.window == 4  # a refused change leaves the model as it was
    with pytest.raises(ValueError, match='call set_resolution'):
        m.forward_features(torch.randn(1, 3, 96, 96))


def test_drop_path_and_xavier():
    m = tiny(32, 4, drop_path=0.5)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), m(x))  # eval: no drop
        m.train()
        torch.manual_seed(1)
        a = m(x)
        torch.manual_seed(2)
        assert not torch.allclose(a, m(x))
    m.apply(common.init_weights)  # FastMIM's and LocalMIM's pre-training re-init
    qkv = m.layers[0].blocks[0].attn.qkv
    bound = math.sqrt(6 / (8 + 24))
    assert qkv.bias.abs().max() == 0 and qkv.weight.abs().max() <= bound and qkv.weight.abs().max() > bound / 2


# ----------------------------------------------------------------------------- table resizing

def test_resize_identity_and_errors():
    t = torch.randn(49, 4)
    out = resize_rel_pos_table(t, 7)
    assert torch.equal(out, t) and out is not t
    assert torch.equal(resize_rel_pos_table(t, 7, mode='geometric'), t)
    with pytest.raises(ValueError, match='4 heads but the model has 8'):
        resize_rel_pos_table(t, 13, num_heads=8)
    with pytest.raises(ValueError, match='rows'):
        resize_rel_pos_table(torch.randn(50, 4), 13)
    with pytest.raises(ValueError, match='mode'):
        resize_rel_pos_table(t, 13, mode='nearest')


def test_resize_bicubic_3_to_5():
    base = torch.tensor([[1.0, 2.0, 1.0], [2.0, 5.0, 2.0], [1.0, 2.0, 1.0]])  # symmetric under flips and transpose
    t = torch.stack([base, -3 * base], -1).view(9, 2)  # two heads
    out = resize_rel_pos_table(t, 5).view(5, 5, 2)
    want = F.interpolate(t.T.reshape(1, 2, 3, 3), size=(5, 5), mode='bicubic', align_corners=False)
    torch.testing.assert_close(out, want[0].permute(1, 2, 0))
    torch.testing.assert_close(out[2, 2], torch.tensor([5.0, -15.0]))  # the centre maps onto the source centre
    for g in (out.flip(0), out.flip(1), out.transpose(0, 1)):
        torch.testing.assert_close(g, out)
    assert torch.allclose(resize_rel_pos_table(torch.full((9, 3), 0.7), 5), torch.full((25, 3), 0.7))


def test_resize_geometric_3_to_5_replicates_edges():
    # src 3: the only source offsets are 0, ±1 (1 + … has one term, q plays no part), targets -2..2; beyond ±1
    # the value is held, as interp2d and timm do, so 3x3 -> 5x5 is edge replication
    base = torch.arange(9.0).view(3, 3)
    out = resize_rel_pos_table(base.reshape(9, 1), 5, mode='geometric').view(5, 5)
    torch.testing.assert_close(out, F.pad(base[None, None], (1, 1, 1, 1), mode='replicate')[0, 0])


def test_resize_geometric_7_to_13():
    # 1 + q + q^2 = 13 // 2 = 6  ->  q = (sqrt(21) - 1) / 2; source offsets 0, ±1, ±(1 + q), ±6
    q = (math.sqrt(21) - 1) / 2
    x = torch.tensor([-6.0, -1 - q, -1.0, 0.0, 1.0, 1 + q, 6.0])
    t = torch.stack([x[:, None].expand(7, 7), x[:, None] * x[None, :]], -1).reshape(49, 2)  # dy and dy*dx
    out = resize_rel_pos_table(t, 13, mode='geometric').view(13, 13, 2)
    d = torch.arange(13.0) - 6
    # bilinear interpolation reproduces 1, x, y and xy exactly, so the result is dy and dy*dx at integer offsets
    torch.testing.assert_close(out[..., 0], d[:, None].expand(13, 13), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[..., 1], d[:, None] * d[None, :], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[6, 6], torch.zeros(2))


def test_shifted_window_attention_runs_sdpa_on_4d_with_the_mask_broadcast_over_the_batch(monkeypatch):
    # CUDA's fused SDPA kernels take 4-D q, k, v only (a 5-D call falls back to the math path, which
    # keeps the fp32 attention probabilities for backward); the mask must not be copied per image
    m = tiny(32, 4, embed_dim=16, num_heads=(2, 2, 2, 2))  # stage 0: grid 8, window 4, 4 windows
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    blk = m.layers[0].blocks[1]
    calls, sdpa = [], F.scaled_dot_product_attention

    def record(q, k, v, attn_mask=None, **kw):
        calls.append((q.shape, attn_mask.numel()))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)
    monkeypatch.setattr(F, 'scaled_dot_product_attention', record)
    x = torch.randn(3, 64, 16)
    with torch.no_grad():
        out = blk(x)
    nW, nH, N = 4, 2, 16
    assert [(len(s), n) for s, n in calls] == [(4, nW * nH * N * N)]  # not 3 images x that
    torch.testing.assert_close(out, dense_block(blk, x, 8, 4, 2), atol=1e-5, rtol=1e-5)  # fp32 round-off
