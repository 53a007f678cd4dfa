"""common.py: HOG by hand and against a per-bin oracle, masking rules, sin-cos values, attention, schedule."""
import copy
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import common
import fastmim


# ----------------------------------------------------------------------------- HOG


def log_rows(path):
    """The rows of a log.jsonl without the run's 'start' and 'end' events."""
    rows = [json.loads(line) for line in open(path)]
    return [r for r in rows if 'event' not in r]

def hog_oracle(imgs, nbins=9, cell=8, normalize=False):
    """Straightforward per-bin HOG (the test oracle for common.hog): one masked sum per bin and channel."""
    B, C, H, W = imgs.shape
    x = F.pad(imgs.double(), (1, 1, 1, 1), mode='reflect')
    gx = (x[..., :-2, :-2] + 2 * x[..., 1:-1, :-2] + x[..., 2:, :-2]) - (x[..., :-2, 2:] + 2 * x[..., 1:-1, 2:] + x[..., 2:, 2:])
    gy = (x[..., :-2, :-2] + 2 * x[..., :-2, 1:-1] + x[..., :-2, 2:]) - (x[..., 2:, :-2] + 2 * x[..., 2:, 1:-1] + x[..., 2:, 2:])
    mag = torch.sqrt(gx ** 2 + gy ** 2)
    b = torch.floor(torch.atan2(gx, gy) / math.pi * nbins).long() % nbins
    out = torch.zeros(B, C, nbins, H // cell, W // cell, dtype=torch.float64)
    for k in range(nbins):
        m = mag * (b == k)
        out[:, :, k] = m.unfold(2, cell, cell).unfold(3, cell, cell).sum((-1, -2))
    if normalize:
        out = F.normalize(out, dim=2)
    return out.flatten(1, 2).float()


def fixed_mask(B=2, L=16, n=12, seed=0):
    """A reproducible (B, L) bool mask with n masked per row (shared by the MAE-family tests)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(L, generator=g)[:n] for _ in range(B)])
    return torch.zeros(B, L, dtype=torch.bool).scatter(1, ids, True)


def timm_key_to_mmpretrain(key):
    """Inverse of common.mmpretrain_key_to_timm (MAE family): encoder -> backbone., decoder -> neck."""
    parts = key.split('.', 2)
    if parts[0] in ('blocks', 'decoder_blocks') and len(parts) == 3:
        rest = parts[2]
        for old, new in common.MMPRETRAIN_BLOCK:
            if rest.startswith(new):
                rest = old + rest[len(new):]
        return (f'backbone.layers.{parts[1]}.{rest}' if parts[0] == 'blocks'
                else f'neck.decoder_blocks.{parts[1]}.{rest}')
    for ours, theirs in (('norm.', 'backbone.ln1.'), ('fc_norm.', 'backbone.ln2.'),
                         ('decoder_norm.', 'neck.ln1.'),
                         ('patch_embed.proj.', 'backbone.patch_embed.projection.')):
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return ('neck.' if key.startswith(('mask_token', 'decoder_')) else 'backbone.') + key


def timm_vit_to_mmpretrain(sd):
    """Our MAE-family state dict (timm encoder, MAE decoder, MFF proj_*) -> mmpretrain names."""
    return {timm_key_to_mmpretrain(k): v for k, v in sd.items()}


def one_channel(img):
    return common.hog(img[None, None].float(), nbins=9, cell=8, normalize=False)[0]  # (9, Hc, Wc)


def test_hog_vertical_edge_by_hand():
    img = torch.zeros(16, 16)
    img[:, 4:] = 3.0  # a = 0 left of the edge between columns 3 and 4, b = 3 right of it
    h = one_channel(img)
    expect = torch.zeros(9)
    expect[4] = 64 * 3.0  # two edge columns x 8 rows x magnitude 4|a-b|, gradient angle pi/2 -> bin 4
    assert torch.allclose(h[:, 0, 0], expect)


def test_hog_horizontal_edge_and_ramps():
    img = torch.zeros(16, 16)
    img[4:] = 1.0
    # exact: integer pixels and gradients; gx = 0, atan2(0, gy < 0) = pi, floor(9) % 9 = 0
    assert one_channel(img)[:, 0, 0].argmax() == 0 and one_channel(img)[1:, 0, 0].abs().sum() == 0
    y, x = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing='ij')
    for ramp, b in ((y + x, 2), (y - x, 6)):
        h = common.hog(ramp[None, None], normalize=False)[0]
        # cell (1, 1) is interior: every pixel has (gx, gy) = (-8, -8) resp. (8, -8), magnitude 8 sqrt 2, one bin
        expect = torch.zeros(9)
        expect[b] = 64 * 8 * 2 ** 0.5
        assert torch.allclose(h[:, 1, 1], expect)
    assert common.hog(torch.ones(1, 3, 16, 16)).abs().sum() == 0


def test_hog_matches_oracle_non_square():
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 32, 48)
    for norm in (False, True):
        fast = common.hog(imgs, normalize=norm)
        assert fast.shape == (2, 27, 4, 6)
        assert torch.allclose(fast, hog_oracle(imgs, normalize=norm), rtol=1e-5, atol=1e-4)


def test_normalised_hog_energy_is_one_ninth():
    torch.manual_seed(0)
    h = common.hog(torch.randn(2, 3, 32, 32), normalize=True)
    assert torch.allclose((h ** 2).mean(), torch.tensor(1 / 9), atol=1e-6)


def edge_images(n=2, res=64, seed=0):
    """(4n, 3, res, res) normalised as the loader does, of flat regions and axis-aligned edges:
    blocks of random colours, horizontal stripes, vertical stripes, and built-in SyntheticShapes."""
    g = torch.Generator().manual_seed(seed)
    u8 = lambda *s: torch.randint(0, 256, s, generator=g).float()  # noqa: E731
    blocks = u8(n, 3, res // 8, res // 8).repeat_interleave(8, 2).repeat_interleave(8, 3)
    rows = u8(n, 3, res // 4, 1).repeat_interleave(4, 2).expand(n, 3, res, res)
    cols = u8(n, 3, 1, res // 4).repeat_interleave(4, 3).expand(n, 3, res, res)
    data = common.SyntheticShapes('train', 5 * n, res, seed)
    shapes = torch.stack([data[i][0] for i in range(5, 5 * n, 5)] + [data[0][0]]).float()  # mixed classes
    x = torch.cat([blocks, rows, cols, shapes]) / 255  # (4n, 3, res, res)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (common.IMAGENET_MEAN, common.IMAGENET_STD))
    return (x - mean) / std


def on_bin_edge(imgs):
    """Pixels whose exact gradient angle is on a bin edge: (B, C, H, W) bool each, gx_zero where the
    3x3 window's left and right columns are equal and its top and bottom rows are not (gx = 0, a
    horizontal edge: angle 0 or pi, an edge at every nbins), gy_zero the transposed case (angle
    +-pi/2, an edge at even nbins). There the fp32 round-off of the 0 decides the bin."""
    x = F.pad(imgs, (1, 1, 1, 1), mode='reflect')
    lr = x[..., :, :-2] == x[..., :, 2:]  # (B, C, H+2, W): left column == right column
    tb = x[..., :-2, :] == x[..., 2:, :]  # (B, C, H, W+2): top row == bottom row
    gx0 = lr[..., :-2, :] & lr[..., 1:-1, :] & lr[..., 2:, :]  # (B, C, H, W)
    gy0 = tb[..., :-2] & tb[..., 1:-1] & tb[..., 2:]  # (B, C, H, W)
    return gx0 & ~gy0, gy0 & ~gx0


def bins_of(gx, gy, nbins):
    """The hard bin of every pixel, by the official layers' formula."""
    return torch.floor(torch.atan2(gx, gy) / math.pi * nbins).long() % nbins


def test_hog_from_gradients_equals_the_per_pixel_histogram_with_bin_edges():
    g = torch.Generator().manual_seed(0)
    gx, gy = torch.randn(2, 2, 3, 32, 32, generator=g)
    # strong pixels whose angle sits on a bin edge (0, pi/4, pi/2, -pi/4, +-pi): both bin them from
    # the same gx, gy by the same floor, so they land alike; a pixel put in the neighbouring bin
    # would move its 4-px cell's normalised histogram by ~0.5
    edge_x = torch.tensor([0.0, 50.0, 50.0, -50.0, 0.0, -0.0])
    edge_y = torch.tensor([50.0, 50.0, 0.0, 50.0, -50.0, -50.0])
    gx[0, 0, ::4, :6], gy[0, 0, ::4, :6] = edge_x, edge_y
    gx[1, 2], gy[1, 2] = 0.0, 0.0  # a flat colour: all-zero histograms stay zero
    for nbins, cell in [(4, 4), (8, 4), (9, 8), (18, 16), (18, 32)]:
        # the per-pixel histogram (B, C, nbins, H, W), summed per cell by avg_pool2d
        per_pixel = torch.zeros(2, 3, nbins, 32, 32).scatter_(
            2, bins_of(gx, gy, nbins)[:, :, None], torch.sqrt(gx * gx + gy * gy)[:, :, None])
        mean = F.avg_pool2d(per_pixel.flatten(1, 2), cell)  # (B, 3*nbins, H/c, W/c)
        unit = F.normalize(mean.view(2, 3, nbins, 32 // cell, 32 // cell), dim=2).flatten(1, 2)
        # the same magnitudes summed per cell in another order: fp32 round-off of sums of <= 1024
        # positive terms, ~1e-6 relative (CUDA adds in no fixed order)
        for pool, norm, ref in [('mean', True, unit), ('mean', False, mean), ('sum', False, mean * cell ** 2)]:
            out = common.hog_from_gradients(gx, gy, nbins, cell, pool, norm)
            assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6), (nbins, cell, pool, norm)
            assert (out[1, 2 * nbins:] == 0).all()


def test_hog_builds_no_per_pixel_histogram():
    # the largest tensor made is an int64 per pixel and colour (the cell-and-bin index of each
    # magnitude), not the (B, C, nbins, H, W) histogram: 4.5x less at 9 bins, 9x at 18
    largest = []

    class Largest(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            largest.extend(t.untyped_storage().nbytes() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
            return out

    imgs = torch.randn(2, 3, 64, 64)
    with Largest():
        common.hog(imgs, nbins=18, cell=8)
    assert max(largest) <= 8 * imgs.numel() < 18 * 4 * imgs.numel()


def test_official_form_hogs_under_avx2_kernels():
    # each method's HOG equals its official conv call written out in the tests (test_fastmim,
    # test_localmim), here again with oneDNN capped at AVX2 (fixed when torch starts, hence a
    # process): its kernels give other +-1-ulp roundings of an exact 0 for other conv shapes
    # (one (2C, 1, 3, 3) grouped call moved 0.15 % of the bins there), which this CPU may not
    code = ('import conftest, test_fastmim as f, test_localmim as l\n'
            'f.test_hog_target_is_the_official_conv_form(); f.test_bins_on_edges_follow_the_official_rounding()\n'
            'l.test_hog_targets_are_the_official_per_colour_layer(); l.test_bins_on_edges_follow_the_official_rounding()')
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA='AVX2', OMP_NUM_THREADS='1')
    subprocess.run([sys.executable, '-c', code], cwd=os.path.dirname(__file__), env=env,
                   timeout=120, check=True)


@pytest.mark.parametrize('u', [1, 2, 4])
def test_per_token_layout(u):
    G, C = 2, 3
    feat = torch.arange(C * (G * u) ** 2, dtype=torch.float32).view(1, C, G * u, G * u)
    t = fastmim.per_token(feat, u)
    for i in range(G):
        for j in range(G):
            for c in range(C):
                for dy in range(u):
                    for dx in range(u):
                        assert t[0, i * G + j, c * u * u + dy * u + dx] == feat[0, c, i * u + dy, j * u + dx]


# ----------------------------------------------------------------------------- masking

def test_block_mask_counts_rule_and_per_image():
    noise = torch.rand(4, 64)
    m = fastmim.block_mask(noise, 8, 0.75)
    assert m.shape == (4, 8, 8) and (m.flatten(1).sum(1) == 48).all()
    visible = (~m).flatten(1)
    for b in range(4):  # visible = the 16 smallest noise values of the row
        assert set(visible[b].nonzero().flatten().tolist()) == set(noise[b].argsort()[:16].tolist())
    assert not torch.equal(m[0], m[1])
    assert (fastmim.block_mask(torch.rand(3, 16), 4, 0.75).flatten(1).sum(1) == 12).all()
    up = common.upsample_mask(m, 16)
    assert up.shape == (4, 128, 128) and torch.equal(up[:, ::16, ::16], m)


def test_random_masking_and_given_mask():
    noise = torch.rand(3, 16)
    ids_keep, mask, ids_restore = common.random_masking(noise, 0.75)
    assert ids_keep.shape == (3, 4) and (mask.sum(1) == 12).all()
    assert torch.equal(torch.gather(torch.argsort(noise, 1), 1, ids_restore), torch.arange(16).expand(3, 16))
    assert not mask.gather(1, ids_keep).any()
    keep2, mask2, _ = common.ids_from_mask(mask)
    assert torch.equal(keep2, ids_keep.sort(1).values)
    with pytest.raises(ValueError, match='same masked count'):
        common.ids_from_mask(torch.tensor([[True, False], [True, True]]))


def test_token_masking_is_the_one_mae_masking(monkeypatch):
    """One function masks for MAE, LocalMIM's ViT, HPM and Efficient MAE: noise from the keys and random_masking
    (or a given mask as it is); each model's forward goes through it."""
    import efficient_mae
    import hpm
    import localmim
    imgs, keys = torch.zeros(3, 3, 32, 32), torch.arange(3)
    (ids_keep, mask, ids_restore), noise = common.token_masking(imgs, 16, 0.75, keys=keys)
    assert torch.equal(noise, common.sample_noise(3, 16, imgs.device, keys))
    assert all(torch.equal(a, b) for a, b in zip((ids_keep, mask, ids_restore), common.random_masking(noise, 0.75)))
    given, none = common.token_masking(imgs, 16, 0.75, mask=mask)
    assert none is None and all(torch.equal(a, b) for a, b in zip(given, common.ids_from_mask(mask)))
    seen = []
    common.token_masking(imgs, 16, 0.5, keys=keys, policy=lambda n, r: seen.append((n, r)))
    assert torch.equal(seen[0][0], noise) and seen[0][1] == 0.5
    calls, real = [], common.token_masking
    for module in (common, hpm, localmim, efficient_mae):
        def spy(*args, name=module.__name__, **kw):
            calls.append(name)
            return real(*args, **kw)
        monkeypatch.setattr(module, 'token_masking', spy)
    vit = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    dec = dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    for name, model in (('common', common.MaskedAutoencoderViT(**vit, **dec)), ('hpm', hpm.HPM(**vit, **dec)),
                        ('localmim', localmim.LocalMIMViT(**dict(vit, depth=7), **dec)),
                        ('efficient_mae', efficient_mae.EfficientMAE(**vit, **dec))):
        calls.clear()
        model(imgs, keys=keys)
        assert calls == [name], (name, calls)


def test_one_imagenet_mean_std_and_one_sobel_kernel():
    """The normalisation the pictures undo is the one the data applies; LocalMIM's HOG conv holds common's kernel."""
    import localmim
    mean, std = common.data_mean_std()  # outside a run: ImageNet's
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(common.denormalize((x - mean) / std), x, atol=1e-6)  # fp32 round-off of two ops
    crop = common.DecodeCrop(8)
    assert torch.equal(crop.mean, mean[0]) and torch.equal(crop.std, std[0])
    kx = common.sobel_kernel()
    assert torch.equal(localmim.HOGConv().conv.weight, torch.stack([kx, kx.t()])[:, None])
    gx, gy = common.sobel(x)
    padded = F.pad(x, (1, 1, 1, 1), mode='reflect')
    assert torch.allclose(gx[:, :1], F.conv2d(padded[:, :1], kx.view(1, 1, 3, 3)), atol=1e-6)
    assert torch.allclose(gy[:, :1], F.conv2d(padded[:, :1], kx.t().reshape(1, 1, 3, 3)), atol=1e-6)


def test_sample_noise_is_keyed_per_sample():
    a = common.sample_noise(2, 10, 'cpu', torch.tensor([5, 7]))
    b = common.sample_noise(2, 10, 'cpu', torch.tensor([7, 5]))
    assert torch.equal(a[0], b[1]) and not torch.equal(a[0], a[1])


# ----------------------------------------------------------------------------- ViT pieces

def test_sincos_values_and_layout():
    t = common.sincos_pos_embed(8, 3)
    assert t.shape == (10, 8) and (t[0] == 0).all()
    row, col = 1, 2
    w = torch.tensor([1.0, 0.01])
    expect = torch.cat([torch.sin(col * w), torch.cos(col * w), torch.sin(row * w), torch.cos(row * w)])
    assert torch.allclose(t[1 + row * 3 + col], expect)
    vit = common.VisionTransformer(32, 8, 16, 2, 2)
    assert not vit.pos_embed.requires_grad


def test_attention_matches_manual_softmax():
    torch.manual_seed(0)
    att = common.Attention(16, 4)
    x = torch.randn(2, 5, 16)
    qkv = att.qkv(x).view(2, 5, 3, 4, 4).permute(2, 0, 3, 1, 4)
    w = (qkv[0] @ qkv[1].transpose(-1, -2) * 4 ** -0.5).softmax(-1)
    ref = att.proj((w @ qkv[2]).transpose(1, 2).reshape(2, 5, 16))
    assert torch.allclose(att(x), ref, atol=1e-6)


def test_fused_adamw_on_cpu_matches_foreach():
    # the same update within fp32 round-off: weights and moments after 3 steps, rtol 1e-6, atol 1e-9
    torch.manual_seed(0)
    models = [common.VisionTransformer(32, 8, 16, 2, 2)]
    models.append(copy.deepcopy(models[0]))
    args = SimpleNamespace(lr=1e-3, weight_decay=0.05)
    fused = common.make_optimizer(models[0], args, torch.device('cpu'))
    foreach = torch.optim.AdamW(common.param_groups(models[1], 0.05), lr=1e-3, betas=(0.9, 0.95),
                                foreach=True)
    assert fused.defaults['fused'] and fused.defaults['betas'] == (0.9, 0.95)
    assert [g['weight_decay'] for g in fused.param_groups] == [0.05, 0.0]
    for _ in range(3):
        grads = [torch.randn_like(p) for p in models[0].parameters() if p.requires_grad]
        for m, opt in zip(models, (fused, foreach)):
            for p, g in zip([p for p in m.parameters() if p.requires_grad], grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
        for k in ('exp_avg', 'exp_avg_sq'):
            if a.requires_grad:
                torch.testing.assert_close(fused.state[a][k], foreach.state[b][k], rtol=1e-6,
                                           atol=1e-9)


def test_patchify_roundtrip_and_vit_kept_tokens():
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(common.unpatchify(common.patchify(x, 8), 8, 32), x)
    vit = common.VisionTransformer(32, 8, 16, 2, 2)
    ids = torch.tensor([[0, 5], [3, 15]])
    assert vit.forward_features(x, ids).shape == (2, 3, 16)
    assert vit.forward_features(x).shape == (2, 17, 16)


def test_lr_schedule_is_warmup_then_cosine():
    args = SimpleNamespace(lr=1.0, min_lr=0.1, warmup_epochs=2, epochs=10)
    assert common.lr_at(0, args) == 0 and common.lr_at(1, args) == 0.5 and common.lr_at(2, args) == 1.0
    assert math.isclose(common.lr_at(6, args), 0.55) and math.isclose(common.lr_at(10, args), 0.1)


def test_check_divisible_message():
    with pytest.raises(ValueError, match='res 130 is not divisible by patch 16; use a multiple of 16 such as 128'):
        common.check_divisible(130, 16, 'patch')


def test_synthetic_shapes_deterministic_and_labelled():
    ds = common.SyntheticShapes('train', 20, 32, seed=0)
    img, label = ds[3]
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32) and label == 3
    assert len(set(ds.classes)) == 10 and ds.targets == [i % 10 for i in range(20)]
    assert torch.equal(ds[3][0], common.SyntheticShapes('train', 20, 32, seed=0)[3][0])
    assert not torch.equal(ds[3][0], common.SyntheticShapes('val', 20, 32, seed=0)[3][0])
    # an image depends on (seed, split, index) alone: not on the set's size or what was drawn before
    assert torch.equal(ds[13][0], common.SyntheticShapes('train', 50, 32, seed=0)[13][0])
    assert not torch.equal(ds[3][0], common.SyntheticShapes('train', 20, 32, seed=1)[3][0])
    val = common.SyntheticShapes('val', 40, 32, seed=0)
    train = torch.stack([ds[i][0] for i in range(20)]).flatten(1)  # (20, 3*32*32)
    held_out = torch.stack([val[i][0] for i in range(40)]).flatten(1)  # (40, 3*32*32)
    assert not (held_out[:, None] == train[None]).all(-1).any()  # no val image is a train image


def synthetic_batch(split, n, res):
    """The first n built-in images of a split in [0, 1], (n, 3, res, res), and their labels (n,)."""
    ds = common.SyntheticShapes(split, n, res, seed=0)
    return torch.stack([ds[i][0] for i in range(n)]).float() / 255, torch.tensor(ds.targets)


def test_synthetic_shapes_have_edges_in_most_hog_cells():
    """FastMIM's HOG target needs edges: a cell with less gradient than one edge of contrast 0.35
    crossing it is near-empty (a step of contrast c gives two of the cell's 8 columns a Sobel
    magnitude of 4c: a cell mean of c). Measured on 100 images: 23 % near-empty; the previous
    built-in set, flat fields with one flat shape, 89 %."""
    x, _ = synthetic_batch('train', 100, 64)
    gx, gy = common.sobel(x)  # (100, 3, 64, 64) each
    cell = F.avg_pool2d((gx * gx + gy * gy).sqrt(), 8)  # (100, 3, 8, 8) per-colour cell means
    assert (cell < 0.35).float().mean() < 1 / 3


def test_synthetic_shapes_mean_colour_does_not_give_the_label():
    """The label is a shape and a pattern, not a colour: the nearest class mean of the images' mean
    colour (means from 1,000 train images) is near chance on 500 val images. A guesser scores
    10 +- 1.3 %; shapes of different areas leave a trace (12.4 % measured); 16 % is 4.5 sigma
    above chance, where a class-tied colour would score far higher."""
    x, y = synthetic_batch('train', 1000, 32)
    xv, yv = synthetic_batch('val', 500, 32)
    f, fv = x.mean((2, 3)), xv.mean((2, 3))  # (N, 3) mean colour
    centres = torch.stack([f[y == k].mean(0) for k in range(10)])  # (10, 3)
    acc = (torch.cdist(fv, centres).argmin(1) == yv).float().mean()
    assert acc < 0.16


# ----------------------------------------------------------------------------- benchmark, memory, data wait

BENCH = ['--benchmark', '1', '--res', '32', '--batch-size', '2', '--num-workers', '0', '--model', 'vit_tiny']


def test_benchmark_times_with_the_run_s_cuda_settings(monkeypatch):
    # TF32 and cudnn autotuning were set after the --benchmark return: it timed another program
    def flags():
        return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                torch.backends.cudnn.benchmark)

    def set_flags(tf32, cudnn_tf32, autotune):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32, cudnn_tf32
        torch.backends.cudnn.benchmark = autotune
    saved, seen = flags(), {}
    monkeypatch.setattr(common, 'setup_distributed', lambda: (0, 1, torch.device('cuda')))
    monkeypatch.setattr(common, 'benchmark', lambda model, args, device: seen.update(flags=flags()))
    try:
        set_flags(False, False, False)
        fastmim.main(BENCH)
    finally:
        set_flags(*saved)
    assert seen['flags'] == (True, True, True)


def test_benchmark_prints_on_rank_0_only(monkeypatch, capsys):
    monkeypatch.setenv('RANK', '1')  # what torchrun sets on the second process
    row = fastmim.main(BENCH)
    assert capsys.readouterr().out == '' and row['img_per_s'] > 0
    assert row['est_mem_mb'] > 0  # the estimate_memory of the configuration, beside the measured peak


class Linear48(torch.nn.Module):
    """loss = mean(fc(x)^2) on 4 x 4 images (48 inputs): its saved tensors are countable by hand."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(48, 16)
        self.frozen = torch.nn.Parameter(torch.zeros(5), requires_grad=False)

    def forward(self, imgs, keys=None):
        return {'loss': self.fc(imgs.flatten(1)).square().mean()}

    def extra_state(self):
        return {'model_ema': {'w': torch.zeros(10)}, 'best': {'top1': 1.0}}


def test_memory_estimate_equals_the_hand_count():
    m = Linear48()
    est = common.estimate_memory(m, 4, torch.device('cpu'))
    # saved per image: fc's input (48 fp32) and square's input (16 fp32); the weight is a parameter
    # fixed: 784 trainable x 16 B (weight, grad, 2 AdamW moments) + 5 frozen x 4 B + 10 EMA x 4 B
    assert est == {'per_image': (48 + 16) * 4, 'fixed': 784 * 16 + 5 * 4 + 10 * 4}
    bf16 = common.estimate_memory(m, 4, torch.device('cpu'), torch.bfloat16)
    assert bf16['per_image'] == (48 + 16) * 2  # autocast: both saved in bf16


def test_memory_advice_keeps_the_effective_batch_on_a_small_card():
    m = Linear48()
    est = common.estimate_memory(m, 4, torch.device('cpu'))
    card = (est['fixed'] + 300 * est['per_image']) / 0.9  # 90 % of it holds 300 images
    assert common.memory_advice(est, 256, 2, card) is None
    line = common.memory_advice(est, 512, 1, card)
    assert line.startswith('warning: --batch-size 512 needs about') and '\n' not in line
    assert line.endswith('use --batch-size 256 --accum-iter 2 (the same 512 images per step and GPU)')
    assert '--batch-size 256 --accum-iter 3 (the same 768' in common.memory_advice(est, 384, 2, card)
    assert 'even --batch-size 1 does not fit' in common.memory_advice(est, 8, 1, est['fixed'])


def test_timed_adds_the_seconds_blocked_in_the_loader():
    now = [0.0]

    def slow_batches():
        for i in range(3):
            now[0] += 2.0  # the loader blocks 2 s per batch
            yield i
    waited = [0.0]
    for _ in common.timed(slow_batches(), waited, clock=lambda: now[0]):
        now[0] += 5.0  # the step: not waiting
    assert waited == [6.0]


def test_log_rows_carry_the_data_wait_share(tmp_path):
    import time

    class Slow(torch.utils.data.Dataset):
        def __init__(self, base):
            self.base = base

        def __len__(self):
            return len(self.base)

        def __getitem__(self, i):
            time.sleep(0.005)  # every batch keeps the loop waiting at least 16 x 5 ms
            return self.base[i]
    args = fastmim.get_args(['--model', 'vit_tiny', '--res', '32', '--batch-size', '16', '--num-workers', '0',
                             '--decoder-dim', '32', '--max-steps', '2', '--log-freq', '1',
                             '--output-dir', str(tmp_path)])
    common.train(fastmim.build_model(args), args, lambda a: Slow(common.pretrain_dataset(a)))
    rows = log_rows(tmp_path / 'log.jsonl')
    assert len(rows) == 2 and all(0 < r['data_wait'] <= 1 for r in rows)
