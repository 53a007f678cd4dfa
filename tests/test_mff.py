"""mff.py: one index equals MAE, fusion by hand, presets, detach, truncated lists, PixMIM target and crop, key map,
sin-cos layout, weight-decay groups, learning, a run with logged weights and picture, CLI."""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F

import common
import mff
from test_common import fixed_mask, log_rows, timm_vit_to_mmpretrain

MEAN = torch.tensor(common.IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(common.IMAGENET_STD).view(1, 3, 1, 1)


def tiny(cls=mff.MFF, **kw):
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, decoder_embed_dim=32,
               decoder_depth=1, decoder_num_heads=2)
    cfg.update(kw)
    return cls(**cfg)


def normalised(u):
    """[0, 1] images -> ImageNet-normalised."""
    return (u - MEAN) / STD


def grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------- fusion

@pytest.mark.parametrize('layers', [[3], 'L1', [-1]])
def test_one_index_equals_mae_exactly(layers):
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(0)
        mae = tiny(common.MaskedAutoencoderViT)
        model = tiny(fuse_layers=layers)
        assert model.fuse_layers == [3] and len(model.proj_layers) == 0 and not model.proj_weights.requires_grad
        result = model.load_state_dict(mae.state_dict(), strict=False)  # MAE's tables, weights and init
        assert result.missing_keys == ['proj_weights'] and result.unexpected_keys == []
        model.proj_weights.data.fill_(3.7)  # any stored logit: softmax of one entry is exactly 1
        imgs, mask = torch.randn(2, 3, 32, 32), fixed_mask()
        a, b = mae(imgs, mask=mask), model(imgs, mask=mask)
        assert torch.equal(a['loss'], b['loss']) and torch.equal(a['pred'], b['pred'])
        assert [float(w) for w in b['fusion_weights']] == [1.0]
        a['loss'].backward()
        b['loss'].backward()
        ga, gb = grads(mae), grads(model)
        assert set(ga) == set(gb) and all(torch.equal(ga[k], gb[k]) for k in ga)
        assert model.proj_weights.grad is None
        keys = torch.tensor([5, 9])
        assert torch.equal(mae(imgs, keys=keys)['loss'], model(imgs, keys=keys)['loss'])
    finally:
        torch.use_deterministic_algorithms(False)


def test_fusion_by_hand_uniform_init_and_identity_projections():
    torch.manual_seed(0)
    model = tiny(fuse_layers=[0, 2, 3])
    imgs = torch.randn(2, 3, 32, 32)
    out = model(imgs, mask=fixed_mask())
    alpha = [float(w) for w in out['fusion_weights']]
    assert len(alpha) == 3 and all(abs(a - 1 / 3) < 1e-7 for a in alpha) and abs(sum(alpha) - 1) < 1e-6
    with torch.no_grad():
        for proj in model.proj_layers:  # W = I, b = 0: the latent is LN(mean of the fused block outputs)
            proj.weight.copy_(torch.eye(32))
            proj.bias.zero_()
    ids_keep = torch.arange(4).expand(2, 4)
    x, hs = model.embed(imgs, ids_keep), []
    for blk in model.blocks:
        x = blk(x)
        hs.append(x)
    hand = F.layer_norm((hs[0] + hs[2] + hs[3]) / 3, (32,), model.norm.weight, model.norm.bias, eps=1e-6)
    latent, outs = model.forward_encoder(imgs, ids_keep, layers=[1])
    assert torch.allclose(latent, hand, rtol=1e-5, atol=1e-6) and torch.equal(outs[0], hs[1])
    with torch.no_grad():
        model.proj_weights.copy_(torch.tensor([0.5, -1.0, 2.0]).view(3, 1, 1, 1))
    w = torch.tensor([0.5, -1.0, 2.0]).exp()
    alpha = torch.stack(model(imgs, mask=fixed_mask())['fusion_weights'])
    assert torch.allclose(alpha, w / w.sum(), rtol=1e-6) and abs(float(alpha.sum()) - 1) < 1e-6
    hand = F.layer_norm(sum(a * h for a, h in zip(alpha, (hs[0], hs[2], hs[3]))), (32,), model.norm.weight,
                        model.norm.bias, eps=1e-6)
    assert torch.allclose(model.forward_encoder(imgs, ids_keep), hand, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('depth,preset,expect', [
    (12, 'L1', [11]), (12, 'L2', [0, 11]), (12, 'L4', [0, 4, 8, 11]), (12, 'L6', [0, 2, 4, 6, 8, 11]),
    (12, 'L12', list(range(12))), (24, 'L6', [0, 4, 8, 12, 16, 23]), (4, 'L6', [0, 1, 2, 3]), (4, 'L4', [0, 1, 2, 3]),
    (4, 'L2', [0, 3]), (8, 'L4', [0, 2, 4, 7]), (8, 'L6', [0, 1, 2, 3, 4, 7]), (12, '1,11', [1, 11]),
    (12, '0,-1', [0, 11]), (4, '0,2,3', [0, 2, 3]),
])
def test_presets_and_lists(depth, preset, expect):
    assert mff.check_fuse_layers(preset, depth) == expect


@pytest.mark.parametrize('text,msg', [('0,2', 'allow-truncated-fusion'), ('2,1,3', 'strictly increasing'),
                                      ('0,0,3', 'strictly increasing'), ('0,4', 'must lie in'),
                                      ('a,b', 'neither a comma list')])
def test_bad_lists_are_clear_errors(text, msg):
    with pytest.raises(ValueError, match=msg):
        mff.check_fuse_layers(text, 4)


def test_detach_keeps_the_forward_and_changes_only_shallow_gradients():
    torch.manual_seed(0)
    plain = tiny(fuse_layers=[0, 2, 3])
    det = tiny(fuse_layers=[0, 2, 3], detach_shallow=True)
    det.load_state_dict(plain.state_dict())
    imgs, mask = torch.randn(2, 3, 32, 32), fixed_mask()
    a, b = plain(imgs, mask=mask), det(imgs, mask=mask)
    assert torch.equal(a['loss'], b['loss'])
    a['loss'].backward()
    b['loss'].backward()
    ga, gb = grads(plain), grads(det)
    same = [k for k in ga if k.startswith(('decoder_', 'mask_token', 'proj_', 'norm.', 'blocks.3.'))]
    assert len(same) > 10 and all(torch.allclose(ga[k], gb[k], rtol=1e-6, atol=1e-9) for k in same)
    for k in ('blocks.0.attn.qkv.weight', 'blocks.2.mlp.fc2.weight', 'patch_embed.proj.weight'):
        assert not torch.allclose(ga[k], gb[k], rtol=1e-3, atol=0), k


def test_truncated_fusion_needs_the_flag_and_leaves_later_blocks_without_gradient():
    with pytest.raises(ValueError, match='blocks 3..3 would be dropped'):
        tiny(fuse_layers=[0, 2])
    torch.manual_seed(0)
    model = tiny(fuse_layers=[0, 2], allow_truncated=True)
    model(torch.randn(2, 3, 32, 32), mask=fixed_mask())['loss'].backward()
    assert all(p.grad is None for p in model.blocks[3].parameters())
    assert all(p.grad is not None for p in model.blocks[2].parameters())


def test_weight_decay_groups_follow_mmpretrain():
    model = tiny(fuse_layers=[0, 2, 3])
    names = {id(p): n for n, p in model.named_parameters()}
    decay, skip = [{names[id(p)] for p in g['params']} for g in common.param_groups(model, 0.05, model.no_weight_decay)]
    assert {'proj_weights', 'proj_layers.0.weight', 'proj_layers.1.weight', 'patch_embed.proj.weight',
            'blocks.0.attn.qkv.weight', 'decoder_pred.weight'} <= decay
    assert {'proj_layers.0.bias', 'cls_token', 'mask_token', 'norm.weight', 'blocks.1.norm2.weight',
            'decoder_norm.bias', 'patch_embed.proj.bias'} <= skip
    assert not any(k.endswith('.bias') or 'norm' in k for k in decay)
    assert 'pos_embed' not in decay | skip and 'decoder_pos_embed' not in decay | skip  # frozen tables
    off = tiny(fuse_layers=[0, 2, 3], decay_fusion=False)
    assert off.no_weight_decay('proj_weights', off.proj_weights)
    assert not off.no_weight_decay('blocks.0.mlp.fc1.weight', None)


def test_loss_decreases_on_a_fixed_batch_and_ignores_visible_predictions():
    torch.manual_seed(0)
    model = tiny(embed_dim=64, num_heads=4, decoder_embed_dim=64, decoder_num_heads=4, fuse_layers='0,2,3')
    imgs, mask = torch.randn(4, 3, 32, 32), fixed_mask(B=4)
    base = model(imgs, mask=mask)['loss']

    def noisy_visible(module, inputs, output):  # garbage in every row the loss must not read (cls, visible)
        keep = torch.cat([torch.ones(4, 1, dtype=torch.bool), ~mask], 1)[..., None]
        return output + 100 * keep * torch.randn_like(output)
    hook = model.decoder_pred.register_forward_hook(noisy_visible)
    assert torch.allclose(model(imgs, mask=mask)['loss'], base, rtol=1e-6)
    hook.remove()
    opt = torch.optim.AdamW(common.param_groups(model, 0.05, model.no_weight_decay), lr=1e-3, betas=(0.9, 0.95))
    losses = []
    for _ in range(12):
        loss = model(imgs, mask=mask)['loss']
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert math.isfinite(losses[-1]) and losses[-1] < 0.8 * losses[0]
    alpha = [float(w) for w in model(imgs, mask=mask)['fusion_weights']]
    assert max(abs(a - 1 / 3) for a in alpha) > 1e-4 and abs(sum(alpha) - 1) < 1e-6  # the logits train


# ----------------------------------------------------------------------------- PixMIM target and crop

def test_low_pass_properties():
    torch.manual_seed(0)
    u = torch.rand(2, 3, 32, 32)
    assert torch.allclose(mff.low_pass(u, 23), u, atol=1e-6)  # 23 > half-diagonal 21.9: nothing filtered
    const = torch.full((1, 3, 32, 32), 0.3)
    for r in (0.71, 1, 5):  # the DC bin lies sqrt(0.5) from the filter centre
        assert torch.allclose(mff.low_pass(const, r), const, atol=1e-6)
    assert torch.equal(mff.low_pass(u, 0), torch.zeros_like(u))
    i, j = torch.meshgrid(torch.arange(32), torch.arange(32), indexing='ij')
    board = (0.5 + 0.5 * (-1.0) ** (i + j)).expand(1, 3, 32, 32)  # Nyquist: removed, the mean stays
    assert torch.allclose(mff.low_pass(board, 8), torch.full_like(board, 0.5), atol=1e-6)
    out = mff.low_pass(u, 6)
    assert out.dtype == torch.float32 and (out >= 0).all() and not torch.allclose(out, u, atol=1e-2)
    # target: the low-frequency image of the un-normalised input equals MAE's target when nothing is filtered
    imgs = normalised(u)
    model = tiny(target='lowfreq', lowfreq_radius=23)
    assert torch.allclose(model.target(imgs), tiny(common.MaskedAutoencoderViT).target(imgs), atol=1e-4)
    assert tiny(target='lowfreq').lowfreq_radius == 40 * 32 / 224


def test_filter_at_224_is_the_official_off_centre_disc():
    f = mff.lowpass_filter(224, 224, 40)
    count = sum(1 for i in range(224) for j in range(224) if (i - 111.5) ** 2 + (j - 111.5) ** 2 <= 1600)
    assert int(f.sum()) == count and torch.equal(f, f.flip(0)) and torch.equal(f, f.flip(1))
    assert f[151, 111] and not f[152, 111] and f[72, 111] and not f[71, 111]  # 40 from DC (112) in on one side only


def test_pixmim_crop_is_a_padded_shift_of_the_image_and_the_dataset_uses_it():
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    padded = F.pad(img[None].float(), (4, 4, 4, 4), mode='reflect')[0]  # (3, 40, 40)
    torch.manual_seed(3)
    out = mff.pixmim_transform(32)(img)
    x = (out * STD[0] + MEAN[0]) * 255
    windows = [w for dy in range(9) for dx in range(9) for w in (padded[:, dy:dy + 32, dx:dx + 32],
                                                                 padded[:, dy:dy + 32, dx:dx + 32].flip(-1))]
    assert out.shape == (3, 32, 32) and min(float((x - w).abs().max()) for w in windows) < 1e-3
    wide = mff.pixmim_transform(32)(torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8))
    assert wide.shape == (3, 32, 32)
    args = argparse.Namespace(data_path=None, synthetic_size=4, res=32, seed=0, rrc_scale=(0.2, 1.0),
                              skip_bad_images=False)
    args.crop = 'rrc'
    assert 'RandomResizedCrop' in repr(mff.make_dataset(args).transform)  # MAE's crop
    args.crop = 'pixmim'
    tf = repr(mff.make_dataset(args).transform)
    assert 'RandomCrop' in tf and 'reflect' in tf and 'RandomResizedCrop' not in tf


# ----------------------------------------------------------------------------- checkpoints and tables

def mmpretrain_names(depth, dec_depth, K):
    """The state-dict keys of mmpretrain's MFF (MFFViT + MAEPretrainDecoder), written out from the layout."""
    blk = [f'{m}.{w}' for m in ('ln1', 'attn.qkv', 'attn.proj', 'ln2', 'ffn.layers.0.0', 'ffn.layers.1')
           for w in ('weight', 'bias')]
    names = ['backbone.cls_token', 'backbone.pos_embed', 'backbone.patch_embed.projection.weight',
             'backbone.patch_embed.projection.bias', 'backbone.ln1.weight', 'backbone.ln1.bias',
             'backbone.proj_weights', 'neck.mask_token', 'neck.decoder_pos_embed', 'neck.decoder_embed.weight',
             'neck.decoder_embed.bias', 'neck.ln1.weight', 'neck.ln1.bias', 'neck.decoder_pred.weight',
             'neck.decoder_pred.bias']
    names += [f'backbone.layers.{i}.{b}' for i in range(depth) for b in blk]
    names += [f'backbone.proj_layers.{k}.{w}' for k in range(K - 1) for w in ('weight', 'bias')]
    return set(names + [f'neck.decoder_blocks.{j}.{b}' for j in range(dec_depth) for b in blk])


def test_key_map_round_trip_strict_load_and_downstream():
    with torch.device('meta'):
        big = mff.MFF()
    ours = big.state_dict()
    theirs = mmpretrain_names(12, 8, 6)
    assert len(ours) == len(theirs) == 265
    assert set(mff.from_official({'meta': {}, 'state_dict': {k: 0 for k in theirs}})) == set(ours)
    assert set(timm_vit_to_mmpretrain(ours)) == theirs
    assert ours['proj_weights'].shape == (6, 1, 1, 1) and ours['proj_layers.4.weight'].shape == (768, 768)
    torch.manual_seed(0)
    src, dst = tiny(fuse_layers=[1, 3]), tiny(fuse_layers=[1, 3], sincos_order='mae')
    with torch.no_grad():
        src.proj_weights.copy_(torch.tensor([0.3, -0.2]).view(2, 1, 1, 1))
    file = {'meta': {'epoch': 300}, 'state_dict': timm_vit_to_mmpretrain(src.state_dict())}
    file['state_dict']['data_preprocessor.mean'] = torch.zeros(3, 1, 1)
    common.load_model_state(dst, mff.from_official(file))  # strict; the stored (mmpretrain-order) tables win
    assert torch.equal(dst.pos_embed, src.pos_embed)
    assert not torch.equal(dst.pos_embed, tiny(sincos_order='mae').pos_embed)
    imgs, mask = torch.randn(2, 3, 32, 32), fixed_mask()
    assert torch.equal(dst(imgs, mask=mask)['loss'], src(imgs, mask=mask)['loss'])
    enc = common.mmpretrain_vit_to_timm(file['state_dict'], encoder_only=True)
    assert set(enc) == {k for k in src.state_dict() if not k.startswith(('proj_', 'decoder_', 'mask_token'))}
    converted = {'proj_blocks.0.weight': 0, 'proj_weights': 0, 'blocks.0.norm1.weight': 0, 'norm.bias': 0}
    assert set(common.mmpretrain_vit_to_timm(converted, encoder_only=True)) == {'blocks.0.norm1.weight', 'norm.bias'}
    assert common.mmpretrain_key_to_timm('backbone.ln2.weight') == 'fc_norm.weight'  # avg_featmap classifier


def test_sincos_layout_is_mae_with_halves_swapped():
    mae, mm = common.sincos_pos_embed(16, 4), mff.mmpretrain_sincos(16, 4)
    assert torch.equal(mm, torch.cat([mae[:, 8:], mae[:, :8]], 1))
    r, c = 1, 2  # token (row 1, col 2) is table row 1 + 4r + c; channel 0 = sin(position * omega_0 = 1)
    assert abs(float(mm[1 + 4 * r + c, 0]) - math.sin(r)) < 1e-7
    assert abs(float(mae[1 + 4 * r + c, 0]) - math.sin(c)) < 1e-7
    model = tiny()
    assert torch.equal(model.pos_embed[0], mff.mmpretrain_sincos(32, 4))
    assert torch.equal(model.decoder_pos_embed[0], mff.mmpretrain_sincos(32, 4))
    assert torch.equal(tiny(sincos_order='mae').pos_embed, tiny(common.MaskedAutoencoderViT).pos_embed)


# ----------------------------------------------------------------------------- runs and command line

def test_run_logs_fusion_weights_draws_them_and_saves_a_loadable_checkpoint(tmp_path):
    out = tmp_path / 'run'
    model = mff.main(['--output-dir', str(out), '--num-workers', '0', '--synthetic-size', '32', '--batch-size', '8',
                      '--res', '32', '--epochs', '1', '--log-freq', '1', '--max-steps', '2', '--decoder-dim', '32',
                      '--decoder-depth', '1', '--decoder-heads', '2', '--fuse-layers', 'L4', '--target', 'lowfreq',
                      '--depth', '12'])
    rows = log_rows(out / 'log.jsonl')
    assert [r['step'] for r in rows] == [1, 2]
    for r in rows:
        w = [r[f'fusion_weights_{k}'] for k in range(4)]
        assert 'fusion_weights_4' not in r and abs(sum(w) - 1) < 1e-5 and all(0 < x < 1 for x in w)
    ckpt = torch.load(out / 'checkpoint-last.pth', weights_only=True)
    assert ckpt['args']['fuse_layers'] == [0, 4, 8, 11] and ckpt['args']['crop'] == 'pixmim'
    assert ckpt['args']['lowfreq_radius'] == 40 * 32 / 224 and model.target_kind == 'lowfreq'
    assert ckpt['model']['proj_weights'].shape == (4, 1, 1, 1)
    assert len(ckpt['model']) == 150 + 20 + 7  # encoder, decoder (1 block), fusion
    from PIL import Image
    pic = Image.open(out / 'picture-last.png')
    # 4 columns x 8 images under the 14-px strip of column names, the bar chart below
    assert pic.width == 4 * 130 + 2 and pic.height == 14 + 8 * 130 + 2 + 160
    assert mff.from_official(timm_vit_to_mmpretrain(ckpt['model'])).keys() == ckpt['model'].keys()


def test_defaults_and_official_spellings(tmp_path):
    args = mff.get_args(['--data_path', str(tmp_path)])
    assert (args.model, args.res, args.fuse_layers, args.crop, args.target, args.norm_pix_loss) == (
        'vit_base', 224, [0, 2, 4, 6, 8, 11], 'pixmim', 'pixel', True)
    assert (args.decoder_dim, args.decoder_depth, args.decoder_heads, args.batch_size, args.epochs,
            args.warmup_epochs, args.blr, args.mask_ratio, args.weight_decay) == (512, 8, 16, 512, 800, 40, 1.5e-4,
                                                                                   0.75, 0.05)
    args = mff.get_args(['--data_path', str(tmp_path), '--model', 'b', '--out_indices', '1,11', '--norm_pix',
                         '--target', 'lowfreq', '--crop', 'rrc', '--epochs', '300', '--input_size', '448'])
    assert (args.fuse_layers, args.lowfreq_radius, args.crop, args.epochs) == ([1, 11], 80.0, 'rrc', 300)
    smoke = mff.get_args([])
    assert (smoke.model, smoke.res, smoke.depth, smoke.fuse_layers) == ('vit_tiny', 64, 4, [0, 1, 2, 3])  # L6: all 4


@pytest.mark.parametrize('argv,msg', [
    (['--fuse-layers', '0,2'], 'allow-truncated-fusion'),
    (['--fuse-layers', '3,2,11'], 'strictly increasing'),
    (['--lowfreq-radius', '5'], 'needs --target lowfreq'),
    (['--target', 'lowfreq', '--lowfreq-radius', '-1'], 'lowfreq-radius -1'),
    (['--res', '70'], 'res 70'),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        mff.main(['--output-dir', str(tmp_path), '--num-workers', '0', '--depth', '12', '--max-steps', '1', *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith('error: ') and msg in err and err.count('\n') == 1


def test_truncated_fusion_is_refused_under_ddp(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '2')
    with pytest.raises(SystemExit) as e:
        mff.main(['--output-dir', str(tmp_path), '--depth', '12', '--fuse-layers', '0,5', '--allow-truncated-fusion'])
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'DDP' in err and err.count('\n') == 1
