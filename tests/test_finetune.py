"""finetune.py and the loading path in common.py: layer decay, resizing, official layouts, timm export, k-NN, runs."""
import argparse
import json
import math
import os
import time

import pytest
import torch
import torch.nn.functional as F

import common
import fastmim
import finetune
import hpm
from common import (MaskedAutoencoderViT, SwinTransformer, VisionTransformer, load_encoder, resize_pos_embed,
                    resize_rel_pos_table, swin_timm_keys)
from test_common import timm_vit_to_mmpretrain

quiet = dict(log=lambda *a, **k: None)


def tiny_vit(**kw):
    """A 2-block, 16-wide ViT at 32 px (patch 8, 16 tokens)."""
    torch.manual_seed(0)
    return VisionTransformer(32, 8, 16, 2, 2, learnable_pos=True, **kw)


def tiny_swin(img=32, window=2, **kw):
    """A two-stage Swin, C = 8, at 32 px (grids 8 and 4); head_norm= gives finetune's classifier."""
    torch.manual_seed(0)
    if 'head_norm' in kw:
        return finetune.SwinClassifier(img, 4, 8, (2, 2), (1, 2), window, **kw)
    return SwinTransformer(img, 4, 8, (2, 2), (1, 2), window, **kw)


# ----------------------------------------------------------------------------- layer decay

def test_vit_layer_decay_groups():
    model = tiny_vit(global_pool='avg', num_classes=5)
    args = argparse.Namespace(weight_decay=0.05, layer_decay=0.5)
    groups = finetune.finetune_groups(model, args)
    where = {id(p): g for g in groups for p in g['params']}
    expected_id = {'cls_token': 0, 'pos_embed': 0, 'patch_embed.proj.weight': 0, 'patch_embed.proj.bias': 0,
                   'blocks.0.attn.qkv.weight': 1, 'blocks.0.norm1.weight': 1, 'blocks.1.mlp.fc2.bias': 2,
                   'fc_norm.weight': 3, 'head.weight': 3, 'head.bias': 3}
    named = dict(model.named_parameters())
    assert len(where) == len(named)  # every parameter in exactly one group
    for name, lid in expected_id.items():
        g = where[id(named[name])]
        decayed = named[name].ndim > 1 and name not in ('cls_token', 'pos_embed')
        assert g['name'] == f'layer_{lid}_{"decay" if decayed else "no_decay"}', name
        assert g['lr_scale'] == pytest.approx(0.5 ** (3 - lid))
        assert g['weight_decay'] == (0.05 if decayed else 0.0)


def test_swin_base_layer_ids_and_groups():
    depths = (2, 2, 18, 2)  # Swin-B: ids 0, 1-2, 3-4, 5-22, 23-24, 25 (interop.md §8)
    lid = lambda n: finetune.swin_layer_id(n, depths)  # noqa: E731
    assert lid('patch_embed.proj.weight') == 0 and lid('mask_token') == 0
    assert [lid(f'layers.0.blocks.{b}.attn.qkv.weight') for b in range(2)] == [1, 2]
    assert [lid(f'layers.1.blocks.{b}.norm1.bias') for b in range(2)] == [3, 4]
    assert [lid(f'layers.2.blocks.{b}.mlp.fc1.weight') for b in range(18)] == list(range(5, 23))
    assert [lid(f'layers.3.blocks.{b}.norm2.weight') for b in range(2)] == [23, 24]
    assert [lid(f'layers.{s}.downsample.reduction.weight') for s in range(3)] == [2, 4, 22]
    assert lid('norm.weight') == lid('fc_norm.bias') == lid('head.weight') == 25
    model = tiny_swin(num_classes=3)  # depths (2, 2): stem 0, blocks 1-4, downsample 2, head 5
    groups = finetune.finetune_groups(model, argparse.Namespace(weight_decay=0.05, layer_decay=0.9))
    by_name = {n: g for g in groups for n, p in model.named_parameters() if any(p is q for q in g['params'])}
    assert by_name['layers.0.downsample.reduction.weight']['name'] == 'layer_2_decay'
    assert by_name['layers.1.blocks.1.attn.relative_position_bias_table']['name'] == 'layer_4_decay'  # FastMIM decays
    assert by_name['head.bias']['name'] == 'layer_5_no_decay' and by_name['head.bias']['lr_scale'] == 1.0
    assert by_name['patch_embed.proj.weight']['lr_scale'] == pytest.approx(0.9 ** 5)


# ----------------------------------------------------------------------------- resizing

def test_pos_embed_resize_keeps_grid_values():
    torch.manual_seed(0)
    pe = torch.randn(1, 1 + 9, 4)
    assert torch.equal(resize_pos_embed(pe, 3), pe)  # identity
    out = resize_pos_embed(pe, 9)  # 3x3 -> 9x9: source centre i sits exactly on target 3i+1
    assert out.shape == (1, 82, 4) and torch.equal(out[:, 0], pe[:, 0])  # cls row kept
    src, dst = pe[0, 1:].view(3, 3, 4), out[0, 1:].view(9, 9, 4)
    for i in range(3):
        for j in range(3):
            assert torch.allclose(dst[3 * i + 1, 3 * j + 1], src[i, j], atol=1e-5)
    cols = torch.arange(3.0).repeat(3).view(1, 9, 1).expand(1, 9, 4)  # varies along columns only
    grid = resize_pos_embed(torch.cat([torch.zeros(1, 1, 4), cols], 1), 6)[0, 1:].view(6, 6, 4)
    assert torch.allclose(grid, grid[:1].expand(6, 6, 4), atol=1e-6)  # rows stay equal: no transpose
    assert (grid[0, 1:, 0] >= grid[0, :-1, 0]).all()


def test_rel_table_resize_3_to_5_known_table():
    table = torch.arange(9.0).view(9, 1) * torch.tensor([[1.0, -2.0]])  # (3*3, 2 heads): value 3*dy + dx
    out = resize_rel_pos_table(table, 5, 'geometric').view(5, 5, 2)
    idx = [0, 0, 1, 2, 2]  # offsets -2..2 on source nodes -1, 0, 1: interior exact, ends hold the edge (interp2d)
    expected = table.view(3, 3, 2)[idx][:, idx]
    assert torch.allclose(out, expected)
    assert torch.equal(resize_rel_pos_table(table, 3, 'geometric'), table)
    smooth = resize_rel_pos_table(table, 5, 'bicubic').view(5, 5, 2)
    assert torch.allclose(smooth[2, 2], table[4])  # bicubic: the centre lands on the source centre
    with pytest.raises(ValueError, match='heads'):  # a head-count mismatch is refused with a clear message
        load_encoder(tiny_swin(), {'model': {**tiny_swin().state_dict(),
                                             'layers.0.blocks.0.attn.relative_position_bias_table': torch.zeros(9, 3)}},
                     **quiet)


# ----------------------------------------------------------------------------- official layouts

def encoder_equal(model, ref_sd, skip=()):
    """Every tensor the model shares with the reference encoder was loaded."""
    own = model.state_dict()
    for k, v in ref_sd.items():
        if k in own and not k.startswith(skip) and not k.endswith(common.REBUILT_BUFFERS):
            assert torch.equal(own[k], v), k


def test_official_vit_layouts_load(tmp_path):
    torch.manual_seed(1)
    mae = MaskedAutoencoderViT(32, 8, 16, 2, 2, decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=1)
    sd = mae.state_dict()
    enc = {k: v for k, v in sd.items() if not k.startswith(('decoder', 'mask_token'))}
    torch.manual_seed(2)
    h = hpm.HPM(32, 8, 16, 2, 2, decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=1)
    ema = {k: v + 1 for k, v in h.state_dict().items()}
    fm = fastmim.FastMIM(VisionTransformer(32, 8, 16, 2, 2), mask_size=16, decoder_dim=32).state_dict()
    local = {k: v for k, v in enc.items() if not k.startswith('norm.')}
    for k in range(4):  # LocalMIM ViT: per-level norms, four decoders, HOG convs (localmim.md §8)
        local.update({f'norm.{k}.weight': torch.randn(16), f'norm.{k}.bias': torch.randn(16),
                      f'decoder.{k}.mask_token': torch.zeros(1, 1, 8),
                      f'hog_enc.{k}.conv.weight': torch.zeros(2, 1, 3, 3)})
    mff = timm_vit_to_mmpretrain({**enc, 'proj_weights': torch.zeros(3, 1, 1, 1),
                                  'proj_layers.0.weight': torch.zeros(16, 16), 'mask_token': sd['mask_token']})
    ns = argparse.Namespace(model='mim_vit_base', input_size=128)
    torch.save({'model': fm, 'args': ns, 'epoch': 1}, tmp_path / 'fastmim.pth')  # pickles a Namespace (interop §7)
    cases = {
        'mae': ({'model': enc}, enc),  # mae_pretrain_vit_*.pth: encoder only
        'mae_full': ({'model': sd}, enc),
        'hpm': ({'epoch': 1, 'state_dict': {f'module.{k}': v for k, v in h.state_dict().items()},
                 'model': 'mae_vit_base_patch16', 'ema_state_dict': ema}, h.state_dict()),
        'fastmim': (common.load_file(tmp_path / 'fastmim.pth'), fm),
        'localmim': ({'model': local, 'optimizer': {}, 'epoch': 1}, local),
        'mff': ({'meta': {}, 'state_dict': mff}, enc),
    }
    recipe = {'mae': 'mae', 'mae_full': 'mae', 'hpm': 'hpm', 'fastmim': 'fastmim', 'localmim': 'localmim', 'mff': 'mff'}
    for name, (obj, ref) in cases.items():
        sd_obj = common.strip_prefix(common.pick_state_dict(obj))
        assert finetune.detect_recipe(obj, sd_obj) == recipe[name], name
        ft = tiny_vit(global_pool='avg', num_classes=10)  # fine-tune model: fresh fc_norm + head
        missing, _ = load_encoder(ft, obj, **quiet)
        assert set(missing) == {'fc_norm.weight', 'fc_norm.bias', 'head.weight', 'head.bias'}, name
        encoder_equal(ft, ref)
        lin = tiny_vit(global_pool='token')  # linear / k-NN encoder: needs the final norm
        missing, _ = load_encoder(lin, obj, **quiet)
        assert missing == [], name
        encoder_equal(lin, ref, skip=('norm.',))
        norm = ref.get('norm.weight', ref.get('norm.3.weight'))  # LocalMIM: the last per-level norm
        assert torch.equal(lin.state_dict()['norm.weight'], norm), name
    lin = tiny_vit(global_pool='token')
    load_encoder(lin, cases['hpm'][0], teacher=True, **quiet)  # --teacher: HPM's EMA weights
    assert torch.equal(lin.state_dict()['blocks.1.attn.qkv.weight'], ema['blocks.1.attn.qkv.weight'])
    broken = {k: v for k, v in enc.items() if k != 'blocks.1.mlp.fc1.weight'}
    with pytest.raises(ValueError, match='blocks.1.mlp.fc1.weight'):
        load_encoder(tiny_vit(global_pool='avg', num_classes=10), {'model': broken}, **quiet)
    ft = VisionTransformer(64, 8, 16, 2, 2, learnable_pos=True, global_pool='avg', num_classes=10)
    load_encoder(ft, {'model': enc}, **quiet)  # 4x4 -> 8x8 grid (FastMIM 128 -> 224 in small)
    assert torch.equal(ft.pos_embed.data, resize_pos_embed(enc['pos_embed'], 8))


def test_official_swin_layouts_load():
    torch.manual_seed(3)
    fm = fastmim.FastMIM(SwinTransformer(64, 4, 8, (2, 2), (1, 2), 2), mask_size=16, decoder_dim=32, decoder_depth=1)
    fsd = fm.state_dict()  # encoder.* (tables 3x3 at window 2, buffers) + mask_token + decoder_*
    assert finetune.detect_recipe({'model': fsd}, fsd) == 'fastmim'
    ft = finetune.SwinClassifier(64, 4, 8, (2, 2), (1, 2), 4, num_classes=10, head_norm='fc_norm')
    missing, unexpected = load_encoder(ft, {'model': fsd}, **quiet)  # window 2 -> 4: tables 3x3 -> 7x7
    assert {k for k in missing if not k.endswith(common.REBUILT_BUFFERS)} == {
        'fc_norm.weight', 'fc_norm.bias', 'head.weight', 'head.bias'}
    assert 'mask_token' in unexpected and 'norm.weight' in unexpected  # FastMIM fine-tuning drops the final norm
    t = 'layers.1.blocks.1.attn.relative_position_bias_table'
    assert torch.equal(ft.state_dict()[t], resize_rel_pos_table(fsd['encoder.' + t], 7, 'geometric'))
    q = 'layers.0.blocks.0.attn.qkv.weight'
    assert torch.equal(ft.state_dict()[q], fsd['encoder.' + q])
    # LocalMIM Swin: encoder.* without attn_mask, per-level encoder.norm.{k}, decoders, HOG convs
    enc = {k: v for k, v in tiny_swin(64, 4).state_dict().items() if not k.endswith('attn_mask') and k != 'norm.weight'
           and k != 'norm.bias'}
    local = {f'encoder.{k}': v for k, v in enc.items()}
    for k in range(4):
        local.update({f'encoder.norm.{k}.weight': torch.randn(16), f'encoder.norm.{k}.bias': torch.randn(16),
                      f'decoder.{k}.mask_token': torch.zeros(1, 1, 4),
                      f'hog_enc.{k}.conv.weight': torch.zeros(2, 1, 3, 3)})
    assert finetune.detect_recipe({'model': local}, local) == 'localmim'
    ft = finetune.SwinClassifier(64, 4, 8, (2, 2), (1, 2), 4, num_classes=10, head_norm='pool_norm')
    missing, _ = load_encoder(ft, {'model': local}, fresh=('norm', 'head'), level_norm=False, **quiet)
    assert {k for k in missing if not k.endswith(common.REBUILT_BUFFERS)} == {
        'norm.weight', 'norm.bias', 'head.weight', 'head.bias'}
    lin = SwinTransformer(64, 4, 8, (2, 2), (1, 2), 4)
    load_encoder(lin, {'model': local}, fresh=(), **quiet)
    assert torch.equal(lin.norm.weight.data, local['encoder.norm.3.weight'])
    # timm layout back into ours
    timm_sd = swin_timm_keys(tiny_swin(64, 4).state_dict(), to_timm=True)
    lin = SwinTransformer(64, 4, 8, (2, 2), (1, 2), 4)
    load_encoder(lin, timm_sd, fresh=(), **quiet)
    encoder_equal(lin, tiny_swin(64, 4).state_dict())


def test_permute_merge_reorders_localmim_merges():
    torch.manual_seed(4)
    pre = SwinTransformer(32, 4, 8, (2, 2), (1, 2), 4)
    for stage in pre.layers[:-1]:  # LocalMIM's pre-training merge order TL, TR, BL, BR
        stage.downsample.offsets = ((0, 0), (0, 1), (1, 0), (1, 1))
    clean = SwinTransformer(32, 4, 8, (2, 2), (1, 2), 4)
    load_encoder(clean, pre.state_dict(), merge_permute=True, fresh=(), **quiet)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(clean.forward_features(x), pre.forward_features(x), atol=1e-5)
    load_encoder(clean, pre.state_dict(), merge_permute=False, fresh=(), **quiet)  # the official loader
    assert not torch.allclose(clean.forward_features(x), pre.forward_features(x), atol=1e-3)


def test_swin_head_norm_layouts():
    x = torch.randn(2, 3, 32, 32)
    m = tiny_swin(num_classes=4, head_norm='pool_norm')
    feats = m.forward_features(x, final_norm=False)
    assert torch.allclose(m(x), m.head(m.norm(feats.mean(1))), atol=1e-6)
    m = tiny_swin(num_classes=4, head_norm='fc_norm')
    assert not any(k.startswith('norm.') for k in m.state_dict()) and 'fc_norm.weight' in m.state_dict()
    assert torch.allclose(m(x), m.head(m.fc_norm(m.forward_features(x)).mean(1)), atol=1e-6)


# ----------------------------------------------------------------------------- timm export

def timm_vit_keys(depth, pool='token'):
    """timm VisionTransformer(num_classes=0) key names (interop.md §2)."""
    keys = {'cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias'}
    keys |= {f'blocks.{i}.{m}.{p}' for i in range(depth) for p in ('weight', 'bias')
             for m in ('norm1', 'attn.qkv', 'attn.proj', 'norm2', 'mlp.fc1', 'mlp.fc2')}
    return keys | ({'norm.weight', 'norm.bias'} if pool == 'token' else {'fc_norm.weight', 'fc_norm.bias'})


def timm_swin_keys(depths):
    """timm >= 0.9 SwinTransformer(num_classes=0) key names: downsample at the start of stages 1.. (interop.md §3)."""
    keys = {'patch_embed.proj.weight', 'patch_embed.proj.bias', 'patch_embed.norm.weight', 'patch_embed.norm.bias',
            'norm.weight', 'norm.bias'}
    for s, d in enumerate(depths):
        for b in range(d):
            keys |= {f'layers.{s}.blocks.{b}.attn.relative_position_bias_table'}
            keys |= {f'layers.{s}.blocks.{b}.{m}.{p}' for p in ('weight', 'bias')
                     for m in ('norm1', 'attn.qkv', 'attn.proj', 'norm2', 'mlp.fc1', 'mlp.fc2')}
        if s:
            keys |= {f'layers.{s}.downsample.norm.weight', f'layers.{s}.downsample.norm.bias',
                     f'layers.{s}.downsample.reduction.weight'}
    return keys


def test_export_timm_key_sets(tmp_path):
    torch.manual_seed(5)
    fm = fastmim.FastMIM(VisionTransformer(32, 8, 16, 2, 2), mask_size=16, decoder_dim=32)
    torch.save({'model': fm.state_dict()}, tmp_path / 'vit.pth')
    out = tmp_path / 'vit_timm.pth'
    spec = finetune.main(['--ckpt', str(tmp_path / 'vit.pth'), '--model', 'vit_tiny', '--patch-size', '8',
                          '--embed-dim', '16', '--depth', '2', '--num-heads', '2', '--export-timm', str(out)])
    sd = torch.load(out, weights_only=True)
    assert set(sd) == timm_vit_keys(2)
    assert sd['pos_embed'].shape == (1, 17, 16) and torch.equal(sd['blocks.1.attn.qkv.weight'],
                                                                fm.state_dict()['blocks.1.attn.qkv.weight'])
    assert json.load(open(tmp_path / 'vit_timm.json')) == spec
    assert spec['model_name'] == 'vit_tiny_patch16_224' and spec['img_size'] == 32  # the checkpoint's own grid
    assert spec['global_pool'] == 'token' and spec['num_classes'] == 0 and spec['num_heads'] == 2
    fs = fastmim.FastMIM(SwinTransformer(64, 4, 8, (2, 2), (1, 2), 2), mask_size=16, decoder_dim=32, decoder_depth=1)
    torch.save({'model': fs.state_dict()}, tmp_path / 'swin.pth')
    spec = finetune.main(['--ckpt', str(tmp_path / 'swin.pth'), '--model', 'swin_tiny', '--embed-dim', '8',
                          '--depth', '2,2', '--num-heads', '1,2', '--res', '64', '--export-timm',
                          str(tmp_path / 'swin_timm.pth')])
    sd = torch.load(tmp_path / 'swin_timm.pth', weights_only=True)
    assert set(sd) == timm_swin_keys((2, 2))
    assert sd['layers.1.downsample.reduction.weight'].shape == (16, 32)  # stage 0's merge, now at stage 1's start
    assert spec['window_size'] == 2 and spec['depths'] == [2, 2] and spec['embed_dim'] == 8
    back = swin_timm_keys(sd, to_timm=False)
    ref = {k[len('encoder.'):]: v for k, v in fs.state_dict().items() if k.startswith('encoder.')}
    assert set(back) == {k for k in ref if not k.endswith(common.REBUILT_BUFFERS)}
    assert all(torch.equal(back[k], ref[k]) for k in back)


# ----------------------------------------------------------------------------- k-NN

def test_knn_separable_features_and_weighted_vote():
    torch.manual_seed(6)
    centres = torch.eye(8)[:4] * 5  # 4 classes on orthogonal directions
    y = torch.arange(4).repeat_interleave(25)
    f = F.normalize(centres[y] + 0.3 * torch.randn(100, 8), dim=1)
    yt = torch.arange(4).repeat(10)
    ft = F.normalize(centres[yt] + 0.3 * torch.randn(40, 8), dim=1)
    for k in (1, 10, 20, 200):
        assert finetune.knn_classify(f, y, ft, yt, k, 0.07, 4) == (100.0, 100.0)
    # the vote is weighted by exp(sim / T): one close neighbour of class 1 beats two far ones of class 0
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    top1, _ = finetune.knn_classify(train, torch.tensor([1, 0, 0]), torch.tensor([[1.0, 0.0]]), torch.tensor([1]), 3)
    assert top1 == 100.0  # exp(1/0.07) > 2 exp(0.6/0.07); a plain majority would say class 0


def test_knn_top5_is_the_official_sort_of_all_classes_cut_at_min_5_k():
    """Hand-computed top-1/top-5 where tied classes decide: the official order and min(5, k) rule.

    Five train points at 1-5 degrees (classes 2, 2, 2, 4, 4), seven test points at 0 degrees with
    labels 2, 4, 0, 1, 3, 5, 7, eight classes. The official order is the voted classes by weight,
    then the classes without a vote in ascending index; top-5 counts its first min(5, k) entries.
    """
    deg = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]).deg2rad()
    train = torch.stack([deg.cos(), deg.sin()], 1)
    train_y = torch.tensor([2, 2, 2, 4, 4])
    test = torch.tensor([[1.0, 0.0]]).expand(7, 2)
    test_y = torch.tensor([2, 4, 0, 1, 3, 5, 7])
    # k 1: order 2 | 0 1 3 4 5 6 7, one entry counted: label 2 hits
    # k 3: the three nearest are class 2: order 2 | 0 1 3 4 5 6 7, three counted: labels 2, 0, 1 hit
    # k 5: class 2 (three votes) > class 4 (two of about the same weight): order 2 4 | 0 1 3 5 6 7,
    #      five counted: labels 2, 4, 0, 1, 3 hit (a topk may fill its three tied slots otherwise)
    # k 10: only five train points, so k 5
    for k, hits5 in ((1, 1), (3, 3), (5, 5), (10, 5)):
        got = finetune.knn_classify(train, train_y, test, test_y, k, 0.07, 8)
        assert got == pytest.approx((100 * 1 / 7, 100 * hits5 / 7)), k


def test_features_are_gathered_in_dataset_order():
    base = common.SyntheticShapes('val', 12, 16, 0)
    loader = torch.utils.data.DataLoader(common.Indexed(base, lambda img: img.float(), [5, 0, 11, 3, 7, 1, 2, 4,
                                                                                          6, 8, 9, 10]), batch_size=5)
    f, y = finetune.extract_features(lambda x: x.flatten(1), loader, torch.device('cpu'), None, 1, 12)
    assert torch.equal(y, torch.tensor(base.targets))
    assert torch.allclose(f[7], F.normalize(base[7][0].float().flatten(), dim=0))


def test_lars_step_by_hand():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = finetune.LARS([w, b], lr=0.1, weight_decay=0.0, momentum=0.9)
    w.grad, b.grad = torch.tensor([[0.0, 2.0]]), torch.tensor([0.5])
    opt.step()  # w: update scaled by 0.001 * |w| / |g| = 0.001 * 5 / 2; b (1-D): plain
    assert torch.allclose(w.data, torch.tensor([[3.0, 4.0 - 0.1 * 0.0025 * 2.0]]))
    assert torch.allclose(b.data, torch.tensor([1.0 - 0.05]))


# ----------------------------------------------------------------------------- runs

TINY = ['--model', 'vit_tiny', '--patch-size', '8', '--embed-dim', '32', '--depth', '2', '--num-heads', '2',
        '--res', '32', '--num-workers', '0', '--synthetic-val-size', '256']


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
    """A tiny FastMIM ViT pre-trained for a few steps through the real loop (our checkpoint layout)."""
    out = tmp_path_factory.mktemp('pre')
    args = fastmim.get_args(['--model', 'vit_tiny', '--res', '32', '--output-dir', str(out), '--num-workers', '0',
                             '--synthetic-size', '128', '--batch-size', '32', '--epochs', '1', '--max-steps', '3'])
    torch.manual_seed(0)
    common.train(fastmim.FastMIM(VisionTransformer(32, 8, 32, 2, 2), mask_size=16, decoder_dim=32), args)
    return str(out / 'checkpoint-last.pth')


def rows(path):
    """The rows of a log.jsonl without the run's 'start' and 'end' events."""
    return [r for r in map(json.loads, open(path)) if 'event' not in r]


def colour_squares(root, n_train=96, n_val=48, res=32):
    """An ImageFolder (train/, val/) of 3 classes: a red, green or blue square on grey noise."""
    g = torch.Generator().manual_seed(0)
    for split, n in (('train', n_train), ('val', n_val)):
        for i in range(n):
            img = (96 + 64 * torch.rand(3, res, res, generator=g)).round().byte()  # (3, res, res)
            s = int(torch.randint(res // 4, res // 2, (1,), generator=g))
            y, x = torch.randint(0, res - s, (2,), generator=g).tolist()
            img[:, y:y + s, x:x + s] = 30
            img[i % 3, y:y + s, x:x + s] = 225
            (root / split / f'c{i % 3}').mkdir(parents=True, exist_ok=True)
            common.write_png(img, root / split / f'c{i % 3}' / f'{i}.png')
    return str(root)


def test_finetune_beats_chance_on_held_out_images(pretrained, tmp_path, capsys):
    """Fine-tune the pre-trained tiny encoder for 48 steps (no mixing/erasing) on an ImageFolder whose classes a
    2-block ViT can learn that fast (the colour of a square); top-1 is measured on its val/ images, never trained on.
    (On the built-in shapes a ViT this small needs far more steps than a test affords: the README comparison.)"""
    data = colour_squares(tmp_path / 'data')
    argv = ['--ckpt', pretrained, *TINY, '--data-path', data, '--output-dir', str(tmp_path / 'o'), '--batch-size',
            '32', '--epochs', '16', '--blr', '4e-2', '--warmup-epochs', '1', '--layer-decay', '1', '--drop-path', '0',
            '--mixup', '0', '--cutmix', '0', '--no-randaug', '--reprob', '0', '--rrc-scale', '1', '1']
    out = finetune.main(argv)
    text = capsys.readouterr().out
    assert 'recipe fastmim' in text and 'missing (fresh): fc_norm.bias, fc_norm.weight, head.bias' in text
    assert f'top1 {out["top1"]:.2f}' in text.splitlines() and f'top5 {out["top5"]:.2f}' in text.splitlines()
    log = rows(tmp_path / 'o' / 'log.jsonl')
    assert log[-1]['top1'] == out['top1'] and log[-1]['mode'] == 'finetune'
    losses = [r['loss'] for r in log if 'loss' in r]
    assert losses[-1] < 0.5 * math.log(3)  # half a guesser's cross-entropy (0.29 here)
    ckpt = torch.load(tmp_path / 'o' / 'checkpoint-last.pth', weights_only=True)
    assert ckpt['step'] == 48 and ckpt['args']['recipe'] == 'fastmim'
    # 48 held-out images, chance 1/3: a guesser gets 16 +- 3.3 right; 32 is 4.9 standard deviations above (all 48 here)
    assert out['top1'] >= 100 * 32 / 48
    assert (tmp_path / 'o' / 'checkpoint-best.pth').is_file()
    finetune.main(argv)  # a finished run says so and stops
    assert 'already finished' in capsys.readouterr().out


def test_linear_and_knn_runs_and_their_summary(pretrained, tmp_path, capsys):
    lin = finetune.main(['--mode', 'linear', '--ckpt', pretrained, *TINY, '--output-dir', str(tmp_path / 'pre' / 'lin'),
                         '--synthetic-size', '128', '--batch-size', '32', '--accum-iter', '1', '--epochs', '1'])
    assert rows(tmp_path / 'pre' / 'lin' / 'log.jsonl')[-1]['top1'] == lin['top1']
    sd = torch.load(tmp_path / 'pre' / 'lin' / 'checkpoint-last.pth', weights_only=True)['model']
    assert {'head.1.weight', 'head.0.running_mean', 'encoder.norm.weight'} <= set(sd)  # BN (no affine) + Linear
    pre = common.pick_state_dict(common.load_file(pretrained))
    assert torch.equal(sd['encoder.blocks.0.attn.qkv.weight'], pre['blocks.0.attn.qkv.weight'])  # frozen
    knn_argv = [*TINY, '--mode', 'knn', '--synthetic-size', '128', '--nb-knn', '1,5']
    knn = finetune.main([*knn_argv, '--ckpt', pretrained, '--output-dir', str(tmp_path / 'pre' / 'knn')])
    text = capsys.readouterr().out
    assert f'top1 {knn["top1"]:.2f}' in text.splitlines() and 'k-NN k=5' in text
    assert (tmp_path / 'pre' / 'knn' / 'knn_features.pth').is_file()
    again = finetune.main([*knn_argv, '--ckpt', pretrained, '--output-dir', str(tmp_path / 'pre' / 'knn')])
    assert 'features from' in capsys.readouterr().out and again == knn  # cached features, same answer
    rand = finetune.main([*knn_argv, '--output-dir', str(tmp_path / 'random' / 'knn')])
    capsys.readouterr()
    table = finetune.main(['--summary', str(tmp_path)])  # the README comparison's table
    assert table.splitlines() == ['| encoder | lin | knn |', '|---|---|---|',
                                  f'| pre | {lin["top1"]:.1f} | {knn["top1"]:.1f} |',
                                  f'| random | - | {rand["top1"]:.1f} |']
    assert capsys.readouterr().out == table + '\n'


def test_summary_shows_the_pretraining_runs_knn_monitor(tmp_path):
    """The comparison loop's table: a pre-training run's first and last k-NN rows beside its
    fine-tune, and '-' for the random-init encoder, which has no pre-training run."""
    def write(path, *rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
        time.sleep(0.01)  # the table orders by file time
    write(tmp_path / 'm' / 'log.jsonl', {'event': 'knn', 'step': 0, 'knn_cls': 12.5, 'knn_avg': 10.0},
          {'step': 8, 'loss': 0.5}, {'event': 'knn', 'step': 16, 'knn_cls': 30.04, 'knn_avg': 41.96})
    write(tmp_path / 'random' / 'finetune' / 'log.jsonl', {'epoch': 1, 'top1': 37.1})
    write(tmp_path / 'm' / 'finetune' / 'log.jsonl', {'epoch': 1, 'top1': 20.0}, {'epoch': 2, 'top1': 49.4})
    assert finetune.main(['--summary', str(tmp_path)]).splitlines() == [
        '| encoder | k-NN cls / avg at init | k-NN cls / avg pre-trained | finetune |',
        '|---|---|---|---|', '| m | 12.5 / 10.0 | 30.0 / 42.0 | 49.4 |', '| random | - | - | 37.1 |']


def test_user_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        finetune.main(['--ckpt', str(tmp_path / 'none.pth'), '--output-dir', str(tmp_path)])
    assert e.value.code == 2 and capsys.readouterr().err.startswith('error: checkpoint')
    with pytest.raises(SystemExit):
        finetune.main([*TINY, '--res', '36', '--output-dir', str(tmp_path)])
    assert 'not divisible by patch 8' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        finetune.main(['--summary', str(tmp_path / 'none')])
    assert 'no <encoder>/<protocol>/log.jsonl under it' in capsys.readouterr().err


def test_resume_equals_uninterrupted(tmp_path):
    """Stop after 3 steps, run the same command again: the weights equal an uninterrupted run (mixup, RandAugment,
    erasing, drop path all on: every random draw is keyed to the sample or the step)."""
    argv = [*TINY, '--synthetic-size', '64', '--batch-size', '16', '--epochs', '2', '--warmup-epochs', '0.5']
    torch.use_deterministic_algorithms(True)  # bit-equal: the same kernels, step for step
    try:
        finetune.main([*argv, '--output-dir', str(tmp_path / 'a')])
        finetune.main([*argv, '--output-dir', str(tmp_path / 'b'), '--max-steps', '3'])
        assert torch.load(tmp_path / 'b' / 'checkpoint-last.pth', weights_only=True)['step'] == 3
        finetune.main([*argv, '--output-dir', str(tmp_path / 'b')])
    finally:
        torch.use_deterministic_algorithms(False)
    a, b = (torch.load(tmp_path / d / 'checkpoint-last.pth', weights_only=True) for d in 'ab')
    assert a['step'] == b['step'] == 8
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k


def test_sigterm_saves_the_step_and_the_same_command_continues(tmp_path, monkeypatch, capsys):
    """SIGTERM during fine-tuning: the step in flight finishes, checkpoint-last.pth holds it, the call returns
    normally (exit 0), and the same command carries on to the end."""
    import signal
    argv = [*TINY, '--synthetic-size', '64', '--batch-size', '16', '--epochs', '2', '--warmup-epochs', '0.5',
            '--output-dir', str(tmp_path)]
    real_step, calls = common.optimizer_step, []

    def step_then_signal(*a, **k):
        real_step(*a, **k)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # a scheduler preempting the job during step 2
    monkeypatch.setattr(common, 'optimizer_step', step_then_signal)
    finetune.main(argv)
    assert 'stopped by a signal at step 3' in capsys.readouterr().out
    assert torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)['step'] == 3
    monkeypatch.setattr(common, 'optimizer_step', real_step)
    finetune.main(argv)
    assert torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)['step'] == 8
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_nan_stops_with_the_step_or_is_skipped(tmp_path, monkeypatch, capsys):
    """A NaN loss at step 4 stops fine-tuning (exit 1) with the step, the mode and the last good checkpoint, which
    stays loadable; --skip-nonfinite 1 skips that step and the run finishes."""
    import signal
    real, calls = VisionTransformer.forward, []

    def forward(self, imgs):
        out = real(self, imgs)
        if self.training:
            calls.append(1)
            if len(calls) == 5:  # the 5th training forward: step 4 (0-based)
                out = out * float('nan')
        return out
    monkeypatch.setattr(VisionTransformer, 'forward', forward)
    argv = [*TINY, '--synthetic-size', '64', '--batch-size', '16', '--epochs', '2', '--warmup-epochs', '0.5']
    with pytest.raises(SystemExit) as e:
        finetune.main([*argv, '--output-dir', str(tmp_path / 'a')])
    err = capsys.readouterr().err
    last = tmp_path / 'a' / 'checkpoint-last.pth'
    assert e.value.code == 1 and 'non-finite loss at step 4' in err and 'finetune' in err and str(last) in err
    assert torch.load(last, weights_only=True)['step'] == 4  # the end of epoch 0, intact
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the preemption handler is gone with the run
    calls.clear()
    finetune.main([*argv, '--output-dir', str(tmp_path / 'b'), '--skip-nonfinite', '1'])
    ckpt = torch.load(tmp_path / 'b' / 'checkpoint-last.pth', weights_only=True)
    assert ckpt['step'] == 8 and all(torch.isfinite(v).all() for v in ckpt['model'].values() if v.is_floating_point())


def test_imagefolder_data(tmp_path):
    """--data-path reads <root>/train and <root>/val class folders (here 3 classes of PNGs)."""
    shapes = common.SyntheticShapes('train', 30, 32, 0)
    for i in range(30):
        split = 'val' if i >= 24 else 'train'
        d = tmp_path / 'data' / split / shapes.classes[i % 3]
        d.mkdir(parents=True, exist_ok=True)
        common.write_png(shapes[i][0], d / f'{i}.png')
    out = finetune.main(['--mode', 'knn', *TINY, '--data-path', str(tmp_path / 'data'), '--output-dir',
                         str(tmp_path / 'o'), '--nb-knn', '5', '--batch-size', '4'])
    assert out['top5'] == 100.0  # 3 classes, k 5: all three are in the first min(5, k) predictions


def test_benchmark_keeps_the_ema_on_the_model_device(monkeypatch):
    # on CUDA the EMA copy stayed on the CPU and the first after_step() failed; 'meta' stands in for
    # a device other than the CPU the encoder is built on
    import finetune
    seen = {}
    monkeypatch.setattr(finetune, 'setup_distributed', lambda: (0, 1, torch.device('meta')))
    monkeypatch.setattr(finetune, 'benchmark', lambda model, args, device: seen.update(model=model.to(device)))
    finetune.main(['--benchmark', '1', '--res', '32', '--batch-size', '2', '--num-workers', '0',
                   '--model', 'vit_tiny', '--model-ema'])
    model = seen['model']
    model.after_step()  # the benchmark's EMA update: lerp_ across devices raises
    assert {v.device.type for v in model.ema.values()} == {'meta'}
