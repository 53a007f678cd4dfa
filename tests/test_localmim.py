"""localmim.py: level geometry, HOG targets by hand, per-level weights, Swin on visible tokens against a dense
reference and against the standard Swin, the quirks, learning, official keys, runs and the command line."""
import math

import pytest
import torch
import torch.nn.functional as F

import common
import finetune
import localmim as lm
from test_common import bins_of, edge_images, hog_oracle, log_rows, on_bin_edge


def tiny_vit(**kw):
    cfg = dict(img_size=64, patch_size=16, embed_dim=32, depth=8, num_heads=2, decoder_embed_dim=32,
               decoder_num_heads=2)
    cfg.update(kw)
    return lm.LocalMIMViT(**cfg)


def tiny_swin(**kw):
    cfg = dict(img_size=128, patch_size=4, embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4,
               decoder_embed_dim=16, decoder_num_heads=2, hog_nbins=9)
    cfg.update(kw)
    return lm.LocalMIMSwin(**cfg)


def fit(m, imgs, mask, lr, steps):
    """AdamW on a fixed batch and mask -> (first loss, last loss)."""
    opt = torch.optim.AdamW(m.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = m(imgs, mask)['loss']
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses[0], losses[-1]


# ----------------------------------------------------------------------------- geometry

@pytest.mark.parametrize('depth, patch, res, ids, cells', [
    (8, 16, 64, [1, 3, 5, 7], [4, 8, 16, 32]),
    (12, 16, 224, [1, 3, 9, 11], [4, 8, 16, 32]),
    (24, 8, 64, [1, 3, 21, 23], [2, 4, 8, 16]),
])
def test_vit_levels_regions_and_output_grids(depth, patch, res, ids, cells):
    with torch.device('meta'):
        m = lm.LocalMIMViT(res, patch, 32, depth, 2, decoder_embed_dim=32, decoder_num_heads=2)
    assert m.ids == ids and m.cells == cells
    G = res // patch
    out_grids = [math.isqrt(d.pos_embed.shape[1] - 1) * s for d, s in zip(m.decoder, lm.VIT_SCALES)]
    assert out_grids == [4 * G, 2 * G, G, G // 2] == [res // c for c in cells]


@pytest.mark.parametrize('kw, msg', [
    (dict(depth=6), 'depth >= 7'),
    (dict(patch_size=14, img_size=56), 'divisible by 4'),
    (dict(img_size=48), 'twice the patch'),
])
def test_vit_shapes_that_cannot_work_are_clear_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        tiny_vit(**kw)


def test_swin_levels_at_224_and_the_batch_shared_mask():
    with torch.device('meta'):
        m = lm.LocalMIMSwin(224, 4, 8, (2, 2, 2, 2), (1, 2, 2, 4), 7, decoder_embed_dim=16, decoder_num_heads=2)
    assert [d.grid for d in m.decoder] == [28, 14, 7, 7] and m.cells == [8, 16, 32, 32]
    assert [d.embed.out_features for d in m.decoder] == [8, 16, 16, 16]
    imgs = torch.zeros(3, 3, 224, 224)
    mask = m.unit_mask(imgs, keys=torch.tensor([5, 6, 7]))
    assert mask.shape == (3, 7, 7) and int(mask[0].sum()) == 37 and (mask == mask[:1]).all()  # int(.75*49)+1
    assert not torch.equal(mask[0], m.unit_mask(imgs, keys=torch.tensor([6, 5, 7]))[0])  # the first key decides
    with pytest.raises(ValueError, match='identical rows'):
        m.unit_mask(imgs, torch.stack([mask[0], ~mask[0], mask[0]]))
    with pytest.raises(ValueError, match='larger --res'):
        tiny_swin(img_size=64)


# ----------------------------------------------------------------------------- HOG targets

def hog_cell(img, nbins=9, cell=8, hog_enc=None):
    """Level target of a (3, H, W) image at one cell size -> (cells, 3*nbins)."""
    enc = hog_enc or [lm.HOGConv(False)]
    return lm.hog_levels(img[None], nbins, [cell], enc)[0][0]


def test_hog_edges_by_hand():
    img = torch.zeros(3, 16, 16)
    img[0, :, 4:] = 3.0  # red: vertical edge; green: horizontal edge; blue: flat
    img[1, 4:, :] = 2.0
    h = hog_cell(img)  # (4 cells, 27), raster cells, [R bins | G bins | B bins]
    assert h.shape == (4, 27)
    for c in (0, 2):  # the left cells hold the vertical edge (columns 3-4), the top cells the horizontal one
        assert torch.allclose(h[c, :9], F.one_hot(torch.tensor(4), 9).float())
    for c in (1, 3):
        assert torch.allclose(h[c, :9], torch.zeros(9))
    assert torch.allclose(h[0, 9:18], F.one_hot(torch.tensor(0), 9).float())
    assert torch.allclose(h[:, 18:], torch.zeros(4, 9))
    # 18 bins: angle -pi/2 is the edge of bins 8 and 9; exact: atan2(gx < 0, 0) = -pi/2, -9 % 18 = 9
    assert torch.allclose(hog_cell(img, 18)[0, :18], F.one_hot(torch.tensor(9), 18).float())
    ramp = (torch.arange(16.0)[:, None] + torch.arange(16.0)[None]).expand(3, 16, 16)
    assert int(hog_cell(ramp)[0, :9].argmax()) == 2 and int(hog_cell(ramp, 18)[0, :18].argmax()) == 4


def test_hog_bias_is_used_and_saved():
    torch.manual_seed(0)
    enc = lm.HOGConv(True)
    b0, b1 = enc.conv.bias.tolist()
    assert abs(b0) <= 1 / 3 and abs(b1) <= 1 / 3 and not enc.conv.bias.requires_grad
    h = hog_cell(torch.zeros(3, 16, 16), 9, 8, [enc])  # a flat image: only the bias makes gradients
    k = math.floor(math.atan2(b0, b1) / math.pi * 9) % 9
    assert torch.allclose(h, F.one_hot(torch.tensor(k), 9).float().repeat(4, 3))
    assert 'conv.bias' in enc.state_dict()


def test_pooled_hog_equals_the_per_level_oracle():
    # seeded: 1 of 300 random draws put a strong gradient within fp32 round-off of a bin edge, where
    # the fp32 code and the fp64 oracle bin it differently; this draw keeps them all far from edges
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 64, 64)
    fast = lm.hog_levels(imgs, 9, [4, 8, 16, 32], [lm.HOGConv(False) for _ in range(4)])
    for t, cell in zip(fast, [4, 8, 16, 32]):
        ref = F.normalize(hog_oracle(imgs, 9, cell).view(2, 3, 9, 64 // cell, 64 // cell), dim=2)
        assert torch.allclose(t, ref.flatten(1, 2).flatten(2).transpose(1, 2), atol=1e-6)
    # with the bias: the official layer (the frozen conv with its bias, per colour) gives the gradients;
    # dyadic images and biases make every gradient exact in fp32, so both paths agree to the bit
    imgs = torch.randint(-64, 64, (2, 3, 64, 64)).float() / 16
    fast = lm.hog_levels(imgs, 9, [4, 8, 16, 32], [lm.HOGConv(False) for _ in range(4)])
    biased = [lm.HOGConv(True) for _ in range(4)]
    for k, enc in enumerate(biased):
        enc.conv.bias.data = torch.tensor([k + 1.0, -0.5 * k - 0.25])
    slow = lm.hog_levels(imgs, 9, [4, 8, 16, 32], biased)
    for t, cell, enc in zip(slow, [4, 8, 16, 32], biased):
        g = enc.conv(imgs.view(6, 1, 64, 64)).view(2, 3, 2, 64, 64)  # (B, colour, gx|gy, H, W)
        ref = common.hog_from_gradients(g[:, :, 0], g[:, :, 1], 9, cell, 'mean')
        assert torch.equal(t, ref.flatten(2).transpose(1, 2))
        assert not torch.allclose(t, fast[[4, 8, 16, 32].index(cell)], atol=1e-3)


def official_form_gradients(imgs, bias=None):
    """gx, gy (B, 3, H, W) by the conv call of Haoqing-Wang/LocalMIM
    ViT/models_mim.py:HOGLayer.forward, written here in that form: each colour as its own
    (B, 1, H, W) image (MaskedAutoencoderViT.HOG) through Conv2d(1, 2, 3, reflect, bias)."""
    conv = torch.nn.Conv2d(1, 2, 3, padding=1, padding_mode='reflect', bias=bias is not None)
    kx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
    conv.weight.data = torch.stack([kx, kx.t()])[:, None]  # (2, 1, 3, 3)
    if bias is not None:
        conv.bias.data = bias.clone()
    with torch.no_grad():
        g = [conv(imgs[:, c:c + 1]) for c in range(3)]  # 3 x (B, 2, H, W)
    return torch.stack([t[:, 0] for t in g], 1), torch.stack([t[:, 1] for t in g], 1)


def official_form_cells(gx, gy, nbins, pool):
    """The rest of HOGLayer.forward, per colour: a per-pixel histogram (B, nbins, H, W),
    AvgPool2d(pool), L2; colours concatenated -> (B, (H/pool)*(W/pool), 3*nbins)."""
    out = []
    for c in range(3):
        mag = torch.stack([gx[:, c], gy[:, c]], 1).norm(dim=1)  # (B, H, W)
        B, H, W = mag.shape
        hist = torch.zeros(B, nbins, H, W).scatter_(1, bins_of(gx[:, c:c + 1], gy[:, c:c + 1], nbins),
                                                    mag[:, None])  # (B, nbins, H, W)
        out.append(F.normalize(F.avg_pool2d(hist, pool), dim=1))  # (B, nbins, H/pool, W/pool)
    return torch.cat(out, 1).flatten(2).transpose(1, 2)


def test_hog_targets_are_the_official_per_colour_layer():
    imgs = edge_images()  # flat regions and axis-aligned edges, where round-off decides bins
    # ViT-B: 9 bins, cells 4-32 px; Swin-B (and ViT-L): 18 bins and the frozen random bias
    for nbins, cells, bias in [(9, [4, 8, 16, 32], False), (18, [8, 16, 32, 32], True)]:
        torch.manual_seed(0)
        enc = [lm.HOGConv(bias) for _ in cells]
        for t, cell, layer in zip(lm.hog_levels(imgs, nbins, cells, enc), cells, enc):
            ref = official_form_cells(*official_form_gradients(imgs, layer.conv.bias), nbins, cell)
            # the same conv call makes the same gradients, hence the same bin at every pixel; left:
            # the magnitude (1 ulp) and the cell means in another order (<= 1024 terms) of unit
            # vectors, ~1e-6. A pixel in the other bin moves its cell by up to 1.0 (the test below)
            assert torch.allclose(t, ref, rtol=0, atol=1e-5), (nbins, cell)


def test_bins_on_edges_follow_the_official_rounding():
    imgs = edge_images()
    gx_zero, gy_zero = on_bin_edge(imgs)
    assert gx_zero.float().mean() > 0.1 and gy_zero.float().mean() > 0.1  # 18 bins: both are edges
    gx, gy = lm.HOGConv()(imgs)
    ox, oy = official_form_gradients(imgs)
    for nbins in (9, 18):
        assert torch.equal(bins_of(gx, gy, nbins), bins_of(ox, oy, nbins))  # integers of the same call
        # those pixels rounded to +-1e-30 instead: cells move by up to 1.0, 1e5 x the tolerance above
        up, down = (official_form_cells(torch.where(gx_zero, s, ox), torch.where(gy_zero, s, oy), nbins, 4)
                    for s in (1e-30, -1e-30))
        assert (up - down).abs().max() > 0.5


# ----------------------------------------------------------------------------- per-level weights and loss

def test_level_weights_and_batch_normalised_loss():
    m = tiny_vit(img_size=32, patch_size=16, depth=7)  # G = 2: one 2x2 block of patches
    mask = torch.tensor([[True, False, False, False]])
    w = m.level_weights(mask)
    assert [t.shape[1] for t in w] == [64, 16, 4, 1]
    assert w[3].tolist() == [[0.25]]  # the mean of the 2x2 block
    assert w[2].tolist() == [[1.0, 0.0, 0.0, 0.0]]
    assert torch.equal(w[1].view(4, 4)[:2, :2], torch.ones(2, 2)) and w[1].sum() == 4
    pred, target = torch.randn(2, 16, 27), torch.randn(2, 16, 27)
    weight = torch.rand(2, 16)
    one = lm.level_loss(pred, target, weight)
    two = lm.level_loss(pred.repeat(2, 1, 1), target.repeat(2, 1, 1), weight.repeat(2, 1))
    assert torch.allclose(one, two)
    by_hand = (((pred - target) ** 2).mean(-1) * weight).sum() / weight.sum()
    assert torch.allclose(one, by_hand)
    exact = torch.where(weight[..., None] > 0.5, target, pred)
    assert lm.level_loss(exact, target, (weight > 0.5).float()) == 0  # visible positions do not count


def test_vit_forward_is_the_sum_of_four_levels_and_learns():
    torch.manual_seed(0)
    m = tiny_vit()
    imgs = torch.randn(4, 3, 64, 64)
    g = torch.Generator().manual_seed(0)
    mask = torch.stack([torch.randperm(16, generator=g) < 12 for _ in range(4)])
    out = m(imgs, mask)
    assert torch.equal(out['mask'], mask) and len(out['loss_per_level']) == 4
    assert torch.allclose(out['loss'], sum(out['loss_per_level']))
    assert [t.shape[1] for t in out['target']] == [256, 64, 16, 4]
    first, last = fit(m, imgs, mask, 1e-3, 25)
    assert last < 0.8 * first
    uneven = mask.clone()
    uneven[0] = True
    with pytest.raises(ValueError, match='same masked count'):
        m(imgs, uneven)


# ----------------------------------------------------------------------------- Swin on the visible tokens

def dense_reference(m, imgs, unit_mask):
    """Quirks off, by brute force: every block attends over all visible tokens (raster order) with a -inf mask
    between different (shifted) windows and the bias of true offsets; merges by standard Swin on the full grid."""
    enc, g = m.encoder, m.units
    x = enc.patch_embed(imgs)  # (B, G*G, C)
    G = int(x.shape[1] ** 0.5)
    latents = []
    for s, stage in enumerate(enc.layers):
        u = G // g
        tok_vis = ~common.upsample_mask(unit_mask[:1], u).flatten()  # (G*G,)
        ids = tok_vis.nonzero().squeeze(1)
        rc = torch.stack([ids // G, ids % G], 1)  # (N, 2)
        for blk in stage.blocks:
            w, sh = blk.attn.window, blk.shift
            wid = (rc + (w - sh) % w) // w
            same = (wid[:, None] == wid[None]).all(-1)  # (N, N)
            rel = rc[:, None] - rc[None] + w - 1
            idx = (rel[..., 0] * (2 * w - 1) + rel[..., 1]).clamp(0, (2 * w - 1) ** 2 - 1)
            bias = blk.attn.relative_position_bias_table[idx].permute(2, 0, 1)  # (nH, N, N)
            bias = bias.masked_fill(~same, float('-inf'))
            h = blk.norm1(x[:, ids])
            B, N, C = h.shape
            q, k, v = blk.attn.qkv(h).view(B, N, 3, blk.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
            a = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias).softmax(-1)
            y = x[:, ids] + blk.attn.proj((a @ v).transpose(1, 2).reshape(B, N, C))
            y = y + blk.mlp(blk.norm2(y))
            x = x.index_copy(1, ids, y)
        if stage.downsample is not None:
            x = stage.downsample(x, G)
            G //= 2
        u = G // g
        keep = (~common.upsample_mask(unit_mask[:1], u).flatten()).nonzero().squeeze(1)
        latents.append(enc.norm[s](x[:, keep]))  # raster order
    return latents


def to_raster(latent, pos):
    return latent[:, torch.argsort(pos)]


def test_swin_quirks_off_equals_dense_windowed_attention_over_visible_tokens():
    torch.manual_seed(0)
    m = tiny_swin(official_quirks=False)
    imgs = torch.randn(2, 3, 128, 128)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask.view(-1)[[0, 2, 5, 6, 7, 9, 12, 15]] = True  # irregular: windows hold different visible counts
    mask = mask.expand(2, 4, 4)
    vis = (~mask[0]).flatten().nonzero().squeeze(1)
    with torch.no_grad():
        latents, positions = m.forward_encoder(imgs, vis)
        ref = dense_reference(m, imgs, mask)
    for z, p, r in zip(latents, positions, ref):
        assert torch.allclose(to_raster(z, p), r, atol=1e-5)


def test_swin_quirks_off_without_masking_is_the_standard_swin():
    torch.manual_seed(0)
    m = tiny_swin(official_quirks=False)
    std = common.SwinTransformer(128, 4, 8, (2, 2, 2, 2), (1, 2, 2, 4), 4)
    std.load_state_dict({k[8:]: v for k, v in m.state_dict().items() if k.startswith('encoder.')
                         and '.norm.' not in k[7:14]}, strict=False)
    for mod in std.modules():
        if isinstance(mod, torch.nn.LayerNorm):
            mod.eps = 1e-6
    imgs = torch.randn(2, 3, 128, 128)
    everything = torch.zeros(4, 4, dtype=torch.bool)
    with torch.no_grad():
        latents, positions = m.forward_encoder(imgs, torch.arange(16))
        final, outs = std.forward_features(imgs, stages=True, final_norm=False)
        merged = [stage.downsample(o, 32 >> s) for s, (stage, o) in enumerate(zip(std.layers[:3], outs))]
    for k, ref in enumerate(merged + [final]):
        assert torch.allclose(to_raster(latents[k], positions[k]), m.encoder.norm[k](ref), atol=1e-5)
    out = m(imgs, everything.expand(2, 4, 4))  # no masked unit: every level loss is 0 (nothing to predict)
    assert out['loss'].item() == 0.0


def test_swin_official_quirks_change_only_the_stages_after_the_first_merge():
    torch.manual_seed(0)
    clean = tiny_swin(official_quirks=False)
    quirky = tiny_swin(official_quirks=True)
    sd = common.permute_merge(clean.state_dict())  # the same weights seen through the official merge order
    quirky.load_state_dict(sd)
    imgs = torch.randn(2, 3, 128, 128)
    vis = torch.tensor([1, 3, 4, 8, 10, 11, 13, 14])
    with torch.no_grad():
        a, _ = clean.forward_encoder(imgs, vis)
        b, _ = quirky.forward_encoder(imgs, vis)
    assert torch.allclose(a[0], b[0], atol=1e-6)  # stage 0 + its merge: only the merge order differs, undone
    assert not torch.allclose(a[1], b[1], atol=1e-4)  # stage 1 windows and biases use the mixed-up coordinates


def official_coords(unit_mask, g):
    """The official bookkeeping, step by step (Swin/models_mim.py forward_features and PatchMerging.forward):
    blocked-order visibility, then after each merge the raster coordinates of the new grid indexed by it."""
    u = 8
    H = g * u
    coords = torch.stack(torch.meshgrid(torch.arange(H), torch.arange(H), indexing='ij'), -1).reshape(1, H * H, 2)
    mask = unit_mask.reshape(1, g, 1, g, 1).expand(-1, -1, u, -1, u).reshape(1, -1)
    mask = mask.view(1, g, u, g, u).permute(0, 1, 3, 2, 4).reshape(1, -1)
    coords = coords.view(1, g, u, g, u, 2).permute(0, 1, 3, 2, 4, 5).reshape(1, -1, 2)
    vis = ~mask
    out = [coords[vis].reshape(-1, 2)]
    for _ in range(3):
        ratio = H // g
        new = vis.view(1, -1, ratio // 2, 2, ratio // 2, 2).sum(dim=(3, 5)) > 0
        H //= 2
        raster = torch.stack(torch.meshgrid(torch.arange(H), torch.arange(H), indexing='ij')).reshape(1, 2, -1)
        out.append(raster.transpose(2, 1)[new.reshape(1, -1)].reshape(-1, 2))
        vis = new.reshape(1, -1)
    return out


def test_swin_quirk_coordinates_are_the_official_ones():
    m = tiny_swin(img_size=224, window_size=7)
    g = torch.Generator().manual_seed(0)
    unit_mask = torch.randperm(49, generator=g) <= 36
    vis = (~unit_mask).nonzero().squeeze(1)
    official = official_coords(unit_mask, 7)
    ours = [m.attention_coords(vis, s) for s in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(ours, official))
    m.official_quirks = False
    clean = [m.attention_coords(vis, s) for s in range(4)]
    assert torch.equal(clean[0], ours[0]) and torch.equal(clean[3], ours[3])
    assert not torch.equal(clean[1], ours[1]) and not torch.equal(clean[2], ours[2])


def test_swin_learns_with_hog_and_pixel_targets():
    for target in ('hog', 'pixel'):
        torch.manual_seed(0)
        m = tiny_swin(target=target)
        imgs = F.interpolate(torch.randn(2, 3, 8, 8), size=128, mode='bilinear')  # smooth: pixels are learnable
        out = m(imgs, keys=torch.tensor([3, 4]))
        assert [p.shape[1] for p in out['pred']] == [256, 64, 16, 16]
        assert out['pred'][0].shape[-1] == (27 if target == 'hog' else 192)
        first, last = fit(m, imgs, out['mask'], 1e-2, 15)
        assert last < 0.85 * first, target


# ----------------------------------------------------------------------------- official checkpoints

def test_official_key_sets_and_from_official_round_trip(tmp_path):
    with torch.device('meta'):
        vit = lm.LocalMIMViT(224, **common.VIT_PRESETS['vit_base'])
        swin = lm.LocalMIMSwin(224, 4, **common.SWIN_PRESETS['swin_base'])
        pix = lm.LocalMIMSwin(224, 4, target='pixel', **common.SWIN_PRESETS['swin_base'])
    assert (len(vit.state_dict()), len(swin.state_dict()), len(pix.state_dict())) == (248, 445, 437)
    assert vit.state_dict()['decoder.0.pred.4.weight'].shape == (27, 64, 1, 1)
    assert swin.state_dict()['decoder.0.pos_embed'].shape == (1, 784, 64)
    assert not any('attn_mask' in k for k in swin.state_dict())
    torch.manual_seed(0)
    src = tiny_swin()
    torch.save({'model': {'module.' + k: v for k, v in src.state_dict().items()}, 'epoch': 3},
               tmp_path / 'official.pth')
    torch.manual_seed(1)
    dst = tiny_swin()
    dst.load_state_dict(lm.from_official(common.load_file(str(tmp_path / 'official.pth'))), strict=True)
    imgs = torch.randn(2, 3, 128, 128)
    assert torch.equal(dst(imgs, keys=torch.tensor([1, 2]))['loss'], src(imgs, keys=torch.tensor([1, 2]))['loss'])
    with pytest.raises(RuntimeError, match='hog_enc'):
        tiny_swin(hog_bias=False).load_state_dict(lm.from_official(src.state_dict()))


# ----------------------------------------------------------------------------- command line and runs

def test_official_readme_arguments_give_the_official_recipe():
    args = lm.get_args(['--batch_size', '256', '--model', 'MIM_vit_base_patch16', '--hog_nbins', '9',
                        '--mask_ratio', '0.75', '--epochs', '1600', '--warmup_epochs', '40', '--blr', '2e-4',
                        '--weight_decay', '0.05', '--data_path', '.', '--output_dir', 'x', '--auto_resume'])
    assert (args.model, args.hog_nbins, args.hog_bias, args.min_lr, args.res) == ('vit_base', 9, False, 1e-6, 224)
    args = lm.get_args(['--model', 'mim_swin_base_patch4_win7', '--target', 'HOG', '--hog_nbins', '18',
                        '--hog_bias', '--data_path', '.', '--save_freq', '20'])
    assert (args.model, args.target, args.hog_bias, args.window_size, args.blr, args.epochs, args.min_lr) == (
        'swin_base', 'hog', True, 7, 1e-4, 400, 0.0)
    win14 = lm.get_args(['--model', 'mim_swin_base_patch4_win14', '--data_path', '.'])
    assert (win14.model, win14.window_size) == ('swin_base_win14', 14)
    with torch.device('meta'):
        assert lm.build_model(win14).encoder.layers[0].blocks[0].attn.window == 14
    large = lm.get_args(['--model', 'MIM_vit_large_patch16', '--data_path', '.'])
    assert (large.accum_iter, large.batch_size, large.hog_nbins, large.hog_bias, large.blr) == (4, 128, 18, True, 1.5e-4)
    assert lm.get_args(['--model', 'vit_large', '--data_path', '.', '--accum_iter', '2']).accum_iter == 2


def test_run_writes_per_level_logs_checkpoints_and_pictures(tmp_path):
    out = tmp_path / 'vit'
    lm.main(['--output-dir', str(out), '--num-workers', '0', '--synthetic-size', '32', '--batch-size', '16',
             '--res', '64', '--epochs', '2', '--warmup-epochs', '1', '--log-freq', '1', '--decoder-dim', '32',
             '--decoder-heads', '2', '--save-freq', '1'])
    rows = log_rows(out / 'log.jsonl')
    assert len(rows) == 4 and all(math.isclose(r['loss'], sum(r[f'loss_per_level_{k}'] for k in range(4)),
                                               rel_tol=1e-5) for r in rows)
    ckpt = torch.load(out / 'checkpoint-1.pth', weights_only=True)
    assert ckpt['step'] == 4 and 'hog_enc.0.conv.weight' in ckpt['model']
    assert (out / 'picture-1.png').exists()


def test_swin_run_with_hog_bias_saves_the_bias(tmp_path):
    out = tmp_path / 'swin'
    lm.main(['--output-dir', str(out), '--model', 'swin_tiny', '--num-workers', '0', '--synthetic-size', '8',
             '--batch-size', '4', '--res', '96', '--window-size', '3', '--epochs', '1', '--warmup-epochs', '1',
             '--log-freq', '1', '--decoder-dim', '16', '--decoder-heads', '2'])
    ckpt = torch.load(out / 'checkpoint-last.pth', weights_only=True)
    assert ckpt['args']['hog_bias'] and ckpt['step'] == 2 and (out / 'picture-0.png').exists()
    torch.manual_seed(5)  # the run used seed 0: another seed draws other biases
    model = lm.build_model(lm.get_args(['--model', 'swin_tiny', '--res', '96', '--window-size', '3',
                                        '--decoder-dim', '16', '--decoder-heads', '2']))
    assert not torch.equal(model.hog_enc[0].conv.bias, ckpt['model']['hog_enc.0.conv.bias'])
    common.load_model_state(model, ckpt['model'])  # the saved bias reproduces the run's targets
    assert torch.equal(model.hog_enc[0].conv.bias, ckpt['model']['hog_enc.0.conv.bias'])


@pytest.mark.parametrize('argv, msg', [
    (['--model', 'vit_tiny', '--target', 'pixel'], 'HOG only'),
    (['--model', 'swin_tiny', '--res', '64', '--window-size', '2'], 'larger --res'),
    (['--model', 'swin_tiny', '--res', '96', '--window-size', '4'], 'window 4 does not divide'),
    (['--mask-ratio', '1.5'], 'out of range'),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        lm.main(['--output-dir', str(tmp_path), '--num-workers', '0', *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith('error: ') and msg in err and err.count('\n') == 1


def test_finetune_loaders_take_our_checkpoints():
    """ViT: norm.3 serves as the final norm (linear probe, k-NN); Swin: `encoder.` stripped, as the official
    fine-tuning loader, which also keeps the pre-training merge order (localmim.md §7)."""
    torch.manual_seed(0)
    m = tiny_vit()
    vit = common.VisionTransformer(64, 16, 32, 8, 2)
    missing, unexpected = common.load_encoder(vit, {'model': m.state_dict()}, log=lambda *a: None)
    assert missing == [] and all(k.startswith(('decoder.', 'hog_enc.', 'norm.')) for k in unexpected)
    imgs = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(vit.forward_features(imgs), m.forward_encoder(imgs, None)[3], atol=1e-6)
    s = tiny_swin()
    swin = finetune.SwinClassifier(128, 4, 8, (2, 2, 2, 2), (1, 2, 2, 4), 4, num_classes=10,
                                   head_norm='pool_norm')
    missing, unexpected = common.load_encoder(swin, {'model': s.state_dict()}, fresh=('head', 'norm'),
                                              level_norm=False, log=lambda *a: None)
    assert [k for k in missing if not k.endswith(common.REBUILT_BUFFERS)] == ['head.bias', 'head.weight',
                                                                             'norm.bias', 'norm.weight']
    assert {k.split('.')[0] for k in unexpected} == {'decoder', 'hog_enc', 'norm'}
    assert torch.equal(swin.layers[2].downsample.reduction.weight, s.encoder.layers[2].downsample.reduction.weight)


# ---------------------------------------------------------------- Swin and HOG: no avoidable work

def padded_block(blk, x, index, inverse, bias_index, pad):
    """The former localmim.visible_block, as a reference: qkv and proj on every padded slot."""
    B, N, C = x.shape
    attn, (nW, M) = blk.attn, index.shape
    h = blk.norm1(x)
    h = torch.cat([h, h.new_zeros(B, 1, C)], dim=1)[:, index.flatten()]  # (B, nW*M, C), pads 0
    nH = attn.num_heads
    qkv = attn.qkv(h).view(B, nW, M, 3, nH, -1).permute(3, 0, 1, 4, 2, 5)  # 3 x (B, nW, nH, M, d)
    qkv = qkv.reshape(3, B, nW * nH, M, -1)  # 3 x (B, nW*nH, M, d)
    bias = attn.relative_position_bias_table[bias_index].permute(0, 3, 1, 2)  # (nW, nH, M, M)
    bias = bias.masked_fill(pad[:, None, None], float('-inf')).to(qkv.dtype)
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2],
                                         attn_mask=bias.reshape(nW * nH, M, M))
    out = out.view(B, nW, nH, M, -1).transpose(2, 3).reshape(B, nW * M, C)  # (B, nW*M, C)
    x = x + attn.proj(out)[:, inverse]  # (B, N, C)
    return x + blk.mlp(blk.norm2(x))


def test_swin_visible_only_linears_equal_the_padded_slot_path(monkeypatch):
    torch.manual_seed(0)
    m = tiny_swin()  # official quirks on
    imgs = torch.randn(2, 3, 128, 128)
    mask = torch.zeros(16, dtype=torch.bool)
    mask[[0, 2, 5, 6, 7, 9, 12, 15]] = True
    mask = mask.view(1, 4, 4).expand(2, 4, 4)
    vis = (~mask[0]).flatten().nonzero().squeeze(1)
    pads = [lm.window_groups(m.attention_coords(vis, s), 4, shift)[3].sum().item()
            for s in range(3) for shift in (0, 2)]
    assert pads[1] > 0 and pads[2] > 0  # windows hold different visible counts: padded slots
    runs = []
    for block in (lm.visible_block, padded_block):
        monkeypatch.setattr(lm, 'visible_block', block)
        out = m(imgs, mask)
        out['loss'].backward()
        grads = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
        runs.append((out, grads))
        m.zero_grad(set_to_none=True)
    (new, new_grads), (old, old_grads) = runs
    # the same GEMMs over fewer rows (the padded rows added exact zeros to the weight gradients)
    # may block their sums differently: fp32 round-off, ~1e-8 here at gradients up to ~0.4; a
    # padded slot leaking into a window would move predictions and gradients by ~1e-2
    for a, b in zip(new['pred'], old['pred']):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert torch.allclose(new['loss'], old['loss'], rtol=1e-6)
    assert new_grads.keys() == old_grads.keys()
    for k in new_grads:
        assert torch.allclose(new_grads[k], old_grads[k], rtol=1e-5, atol=1e-6), k


def test_swin_encoder_flops_are_linear_layers_on_visible_tokens_only():
    """Forward FLOPs of the encoder, by hand: per block 24 N C^2 (qkv 3, proj 1, MLP 8: C^2 per
    token, 2 FLOPs per multiply-add) plus 4 nW M^2 C of attention over the padded windows."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    m = tiny_swin()
    vis = torch.tensor([1, 3, 4, 8, 10, 11, 13, 14])
    visible = padded = 2 * 32 * 32 * 8 * 3 * 4 * 4  # batch 1: patch embedding, G0 = 32, C = 8
    for s, stage in enumerate(m.encoder.layers):
        coords, C = m.attention_coords(vis, s), 8 << s
        N = len(coords)
        for blk in stage.blocks:
            nW, M = lm.window_groups(coords, blk.attn.window, blk.shift)[0].shape
            attn = 4 * nW * M * M * C  # q k^T and weights @ v
            visible += 24 * N * C * C + attn
            padded += 2 * (4 * nW * M + 8 * N) * C * C + attn  # qkv and proj on nW*M slots
        if stage.downsample is not None:
            visible += 4 * N * C * C  # N/4 tokens, 4C -> 2C
            padded += 4 * N * C * C
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as count:
        m.forward_encoder(torch.randn(1, 3, 128, 128), vis)
    assert count.get_total_flops() == visible and padded > 1.1 * visible
