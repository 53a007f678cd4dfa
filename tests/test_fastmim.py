"""fastmim.py: pixel-space masking, HOG target layout, loss locality, learning, checkpoints, resume, FastMIM-P, CLI."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import common
import fastmim
from test_common import bins_of, edge_images, log_rows, on_bin_edge


def vit(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, **kw):
    """FastMIM on a ViT encoder of these sizes; kw go to FastMIM."""
    return fastmim.FastMIM(common.VisionTransformer(img_size, patch_size, embed_dim, depth, num_heads), **kw)


def swin(img_size=64, embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=2, **kw):
    """FastMIM on a Swin encoder (patch 4) of these sizes; kw go to FastMIM."""
    return fastmim.FastMIM(common.SwinTransformer(img_size, 4, embed_dim, depths, num_heads, window_size), **kw)


def tiny_vit(**kw):
    cfg = dict(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, mask_size=16, decoder_dim=32)
    cfg.update(kw)
    return vit(**cfg)


def tiny_swin(**kw):
    cfg = dict(img_size=64, embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=2, mask_size=32,
               decoder_dim=32, decoder_depth=1)
    cfg.update(kw)
    return swin(**cfg)


def steps(model, imgs, n=30, lr=1e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    keys = torch.arange(len(imgs))
    losses = []
    for _ in range(n):
        loss = model(imgs, keys=keys)['loss']
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def official_form_gradients(imgs):
    """gx, gy (B, 3, H, W) by the conv calls of ggjy/FastMIM.pytorch
    util/hog_layer.py:HOGLayerC.forward, written here in that form: reflect pad, then one grouped
    conv per direction with a (3, 1, 3, 3) weight."""
    kx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    x = F.pad(imgs, (1, 1, 1, 1), mode='reflect')  # (B, 3, H+2, W+2)
    return F.conv2d(x, kx, groups=3), F.conv2d(x, kx.transpose(2, 3), groups=3)


def official_form_cells(gx, gy, norm=True):
    """The rest of HOGLayerC.forward: a per-pixel histogram (B, 3, 9, H, W), 8x8 sums, per-cell
    L2 -> (B, 27, H/8, W/8)."""
    B, C, H, W = gx.shape
    mag = torch.stack([gx, gy], dim=-1).norm(dim=-1)  # (B, 3, H, W)
    hist = torch.zeros(B, C, 9, H, W).scatter_add_(2, bins_of(gx, gy, 9)[:, :, None], mag[:, :, None])
    hist = hist.unfold(3, 8, 8).unfold(4, 8, 8).sum((-1, -2))  # (B, 3, 9, H/8, W/8)
    return (F.normalize(hist, dim=2) if norm else hist).flatten(1, 2)


def test_hog_target_is_the_official_conv_form():
    imgs = edge_images()  # flat regions and axis-aligned edges, where round-off decides bins
    for norm in (True, False):
        ref = official_form_cells(*official_form_gradients(imgs), norm)  # (B, 27, 8, 8)
        ref = rearrange(ref, 'b c (i dy) (j dx) -> b (i j) (c dy dx)', dy=2, dx=2)  # (B, 16, 108)
        out = fastmim.make_target(imgs, 16, 'hog', norm)
        # the same conv calls make the same gradients, hence the same bin at every pixel; left:
        # the magnitude (1 ulp) and the 8x8 sums in another order, ~1e-6 relative. A pixel in the
        # other bin moves its cell by its magnitude / the cell's norm (up to 1.0: the test below)
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_bins_on_edges_follow_the_official_rounding():
    imgs = edge_images()
    gx_zero, gy_zero = on_bin_edge(imgs)
    assert gx_zero.float().mean() > 0.1  # pixels binned by the round-off of an exact 0 (9 bins)
    gx, gy = common.sobel(imgs)
    ox, oy = official_form_gradients(imgs)
    assert torch.equal(bins_of(gx, gy, 9), bins_of(ox, oy, 9))  # integers of the same conv call
    # those pixels rounded to +-1e-30 instead: cells move by up to 1.0, 1e5 x the tolerance above
    up, down = (official_form_cells(torch.where(gx_zero, s, ox), oy) for s in (1e-30, -1e-30))
    assert (up - down).abs().max() > 0.5


def test_vit_shapes_at_128():
    m = vit(128, 16, 16, 1, 2, decoder_dim=32)
    out = m(torch.randn(2, 3, 128, 128))
    assert out['pred'].shape == (2, 64, 108) and out['target'].shape == (2, 64, 108)
    assert out['mask'].shape == (2, 8, 8) and (out['mask'].flatten(1).sum(1) == 48).all()
    assert vit(128, 16, 16, 1, 2, decoder_dim=32, target='pixel')(torch.randn(1, 3, 128, 128))['pred'].shape == (1, 64, 768)


@pytest.mark.parametrize('res,window,expect', [(128, 4, (2, 16, 432)), (224, 7, (2, 49, 432))])
def test_swin_shapes(res, window, expect):
    m = swin(res, embed_dim=8, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), window_size=window, decoder_dim=32,
             decoder_depth=1)
    out = m(torch.randn(2, 3, res, res))
    assert out['pred'].shape == expect and out['mask'].shape == (2, res // 32, res // 32)


def test_painted_pixels_and_mask_token_gradient():
    torch.manual_seed(0)
    m = tiny_vit()
    imgs = torch.randn(2, 3, 32, 32)
    mask = torch.tensor([[[True, False], [False, False]], [[False, False], [False, True]]])
    x = fastmim.paint(imgs, mask, m.mask_token)
    assert torch.equal(x[0, :, :16, :16], m.mask_token[0].expand(3, 16, 16))
    assert torch.equal(x[0, :, 16:, :], imgs[0, :, 16:, :])
    m(imgs, mask=mask)['loss'].backward()
    assert m.mask_token.grad.abs().sum() > 0


def test_loss_is_taken_on_masked_tokens_only():
    torch.manual_seed(0)
    m = tiny_vit(img_size=64)
    imgs = torch.randn(2, 3, 64, 64)
    out = m(imgs)
    pred = out['pred'].detach().clone().requires_grad_()
    loss = fastmim.masked_loss(pred, out['target'], out['mask'], m.stride, m.mask_size)
    loss.backward()
    visible = ~out['mask'].flatten(1)
    assert (pred.grad[visible] == 0).all() and (pred.grad[~visible] != 0).any()
    changed = pred.detach().clone()
    changed[visible] += 5.0
    loss_of = lambda p: fastmim.masked_loss(p, out['target'], out['mask'], m.stride, m.mask_size)  # noqa: E731
    assert torch.equal(loss_of(changed), loss.detach())
    zero = loss_of(torch.zeros_like(pred))  # normalised HOG: mean target^2 = 1/9
    assert abs(zero.item() - 1 / 9) < 1e-6  # unit-norm cells; 1e-6: fp32 round-off of the means


def test_cell_level_loss_below_token_stride():
    torch.manual_seed(0)
    m = tiny_vit(mask_size=8)  # 8-px blocks on a 16-px token grid: per-cell loss (official quirk #11)
    out = m(torch.randn(2, 3, 32, 32))
    assert out['mask'].shape == (2, 4, 4)
    target = out['target']
    pred = target.clone()
    # perturb exactly one cell feature of token 0: (c=0, dy=0, dx=0) -> cell (0, 0) only
    pred[:, 0, 0] += 1.0
    mask = out['mask'].clone()
    mask[:, 0, 0] = True
    loss = fastmim.masked_loss(pred, target, mask, m.stride, m.mask_size)
    n_masked = mask.flatten(1).sum()
    assert torch.allclose(loss, 2 * 1.0 / 27 / n_masked)


@pytest.mark.parametrize('make', [tiny_vit, tiny_swin])
def test_loss_decreases_on_a_fixed_batch(make):
    torch.manual_seed(0)
    m = make()
    res = 32 if make is tiny_vit else 64
    imgs = torch.randn(4, 3, res, res)
    losses = steps(m, imgs, 30)
    assert losses[-1] < 0.7 * losses[0]


def test_one_fastmim_over_either_encoder_keeps_the_official_keys():
    """One class over a ViT or a Swin: ViT keys at the top level in the official order, Swin's under `encoder.`;
    the ViT's encoder object and the model hold the same tensors, also after a conversion."""
    enc = common.VisionTransformer(32, 16, 32, 2, 2)
    enc_keys = list(enc.state_dict())
    m = fastmim.FastMIM(enc, decoder_dim=32)
    keys = list(m.state_dict())
    assert keys[:3] == ['cls_token', 'pos_embed', 'mask_token'] and set(enc_keys) <= set(keys)
    assert all(k == 'mask_token' or k.startswith('decoder_') for k in set(keys) - set(enc_keys))
    for to in (torch.float64, 'meta'):  # meta: new tensors, not new data in the old ones
        m = m.to(to)
        assert m.encoder.pos_embed is m.pos_embed and m.encoder.cls_token is m.cls_token and m.encoder.blocks is m.blocks
    assert m.pos_embed.is_meta and m(torch.zeros(2, 3, 32, 32, device='meta', dtype=torch.float64))['pred'].is_meta
    s_enc = common.SwinTransformer(64, 4, 8, (1, 1, 1, 1), (1, 1, 2, 2), 2)
    s = fastmim.FastMIM(s_enc, decoder_dim=32)
    own = {k for k in s.state_dict() if k == 'mask_token' or k.startswith('decoder_')}
    assert set(s.state_dict()) - own == {'encoder.' + k for k in s_enc.state_dict()}
    assert (m.stride, m.mask_size, s.stride, s.mask_size) == (16, 16, 32, 32)  # the default block: the stride


def test_from_official_round_trip_and_key_counts():
    m = tiny_vit()
    sd = {'module.' + k: v for k, v in m.state_dict().items()}
    m2 = tiny_vit()
    m2.load_state_dict(fastmim.from_official({'model': sd, 'epoch': 3}), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    s = tiny_swin()
    s2 = tiny_swin()
    s2.load_state_dict(fastmim.from_official(s.state_dict()), strict=True)
    assert any(k.startswith('encoder.layers.0.blocks.0.attn.relative_position_bias_table') for k in s.state_dict())
    with torch.device('meta'):
        vit_b = vit(128, 16, 768, 12, 6)
        swin_b = swin(128, 128, (2, 2, 18, 2), (4, 8, 16, 32), 4, decoder_depth=4)
    assert len(vit_b.state_dict()) == 169  # fastmim.md §13: official ViT-B pre-training checkpoint
    assert len(swin_b.state_dict()) == 417  # and Swin-B at 128 / window 4, buffers included
    assert vit_b.state_dict()['decoder_pred.weight'].shape == (108, 256)
    assert swin_b.state_dict()['decoder_pred.weight'].shape == (432, 256)
    assert swin_b.state_dict()['encoder.layers.0.blocks.1.attn_mask'].shape == (64, 16, 16)
    assert 'encoder.layers.3.blocks.1.attn_mask' not in swin_b.state_dict()  # grid 4 = window 4: no shift


def run(tmp_path, *extra, name='run'):
    out = tmp_path / name
    fastmim.main(['--output-dir', str(out), '--num-workers', '0', '--synthetic-size', '64', '--batch-size', '16',
                  '--res', '32', '--epochs', '2', '--warmup-epochs', '1', '--log-freq', '1', *extra])
    rows = log_rows(out / 'log.jsonl')
    return out, rows


def test_default_run_writes_log_checkpoint_picture(tmp_path):
    out, rows = run(tmp_path, '--max-steps', '3')
    assert [r['step'] for r in rows] == [1, 2, 3] and all(r['loss'] > 0 for r in rows)
    ckpt = torch.load(out / 'checkpoint-last.pth', weights_only=True)
    assert ckpt['step'] == 3 and ckpt['epoch'] == 0 and set(ckpt) >= {'model', 'optimizer', 'scaler', 'args'}
    assert os.path.getsize(out / 'picture-last.png') > 0


def test_resume_equals_uninterrupted(tmp_path):
    torch.use_deterministic_algorithms(True)
    try:
        a, rows_a = run(tmp_path, '--max-steps', '6', name='a')  # 4 steps per epoch: crosses an epoch
        b, _ = run(tmp_path, '--max-steps', '3', name='b')  # stop mid-epoch ...
        b, rows_b = run(tmp_path, '--max-steps', '6', name='b')  # ... and resume from checkpoint-last.pth
    finally:
        torch.use_deterministic_algorithms(False)
    assert [r['loss'] for r in rows_a] == [r['loss'] for r in rows_b]
    wa = torch.load(a / 'checkpoint-last.pth', weights_only=True)['model']
    wb = torch.load(b / 'checkpoint-last.pth', weights_only=True)['model']
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_finished_run_says_so(tmp_path, capsys):
    run(tmp_path, '--epochs', '1')
    capsys.readouterr()
    run(tmp_path, '--epochs', '1')
    assert 'already finished at epoch 1' in capsys.readouterr().out


def test_fastmim_p_vit_and_swin_switch(tmp_path):
    vit = tiny_vit(res_schedule=[(32, 1), (48, 1)])
    assert vit.on_epoch(0) is None and vit.on_epoch(1) == 48
    assert vit.pos_embed.shape == (1, 10, 32) and vit(torch.randn(1, 3, 48, 48))['pred'].shape == (1, 9, 108)
    swin = tiny_swin(res_schedule=[(64, 1), (96, 1)])
    opt = torch.optim.AdamW(swin.parameters())
    swin(torch.randn(1, 3, 64, 64))['loss'].backward()
    opt.step()
    before = dict(swin.named_parameters())
    old = before['encoder.layers.0.blocks.0.attn.relative_position_bias_table']
    old_state = {k: v.clone() for k, v in opt.state[old].items()}
    assert swin.on_epoch(1) == 96
    common.resize_optimizer_state(swin, opt, before)
    table = swin.encoder.layers[0].blocks[0].attn.relative_position_bias_table
    # a new Parameter (autograd and DDP hooks keep the old shape for the old one) that took the old one's
    # place in the optimizer, with its step count and its moments resized as the table was
    assert table is not old and table.shape == (25, 1) and old.shape == (9, 1)
    held = [p for g in opt.param_groups for p in g['params']]
    assert any(p is table for p in held) and not any(p is old for p in held) and old not in opt.state
    assert torch.equal(opt.state[table]['step'], old_state['step'])
    assert torch.equal(opt.state[table]['exp_avg'], common.resize_rel_pos_table(old_state['exp_avg'], 5))
    assert (opt.state[table]['exp_avg_sq'] >= 0).all()
    swin(torch.randn(1, 3, 96, 96))['loss'].backward()
    opt.step()  # the moved state steps with the new table
    assert opt.state[table]['step'] == 2 and table.grad.shape == (25, 1)


def test_fastmim_p_resume_across_switch(tmp_path):
    args = ['--model', 'swin_tiny', '--res-schedule', '64:1,96:1', '--epochs', '2', '--window-size', '2',
            '--decoder-dim', '32', '--decoder-depth', '1', '--embed-dim', '8', '--depth', '1,1,1,1',
            '--num-heads', '1,1,2,2']
    torch.use_deterministic_algorithms(True)
    try:
        a, rows_a = run(tmp_path, *args, '--batch-size', '32', name='a')
        run(tmp_path, *args, '--batch-size', '32', '--max-steps', '2', name='b')  # stops at the switch
        b, rows_b = run(tmp_path, *args, '--batch-size', '32', name='b')
    finally:
        torch.use_deterministic_algorithms(False)
    assert [r['loss'] for r in rows_a] == [r['loss'] for r in rows_b]
    wa = torch.load(a / 'checkpoint-last.pth', weights_only=True)['model']
    assert wa['encoder.layers.0.blocks.0.attn.relative_position_bias_table'].shape == (25, 1)


@pytest.mark.parametrize('model', ['vit_tiny', 'swin_tiny'])
def test_fastmim_p_stopped_after_the_switch_resumes_exactly(tmp_path, monkeypatch, model):
    """Preempted in the second stage (after the resolution switch), the same command carries on: the
    crops, the model and the optimiser are rebuilt at the saved stage's resolution."""
    size = {'vit_tiny': ['--embed-dim', '16', '--depth', '1', '--num-heads', '2'],
            'swin_tiny': ['--embed-dim', '8', '--depth', '1,1,1,1', '--num-heads', '1,1,2,2']}[model]
    args = ['--model', model, '--res-schedule', '32:1,64:1', '--epochs', '2', '--window-size', '1',
            '--decoder-dim', '32', '--decoder-depth', '1', *size]
    torch.use_deterministic_algorithms(True)
    try:
        a, rows_a = run(tmp_path, *args, name='a')
        run(tmp_path, *args, '--max-steps', '5', name='b')  # one step into the 64-px stage
        b, rows_b = run(tmp_path, *args, name='b')
    finally:
        torch.use_deterministic_algorithms(False)
    assert [r['loss'] for r in rows_a] == [r['loss'] for r in rows_b] and len(rows_a) == 8
    wa, wb = (torch.load(d / 'checkpoint-last.pth', weights_only=True)['model'] for d in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_saves_scan_the_folder_once_per_resolution_and_serialise_once(tmp_path, monkeypatch):
    """Rank 0 saves every epoch while the other ranks wait: --data-path is scanned (for the training data and
    for the picture's 8 images) once per run and once more at a FastMIM-P switch, not at every save, and a kept
    checkpoint is a copy of checkpoint-last.pth, not a second torch.save; it holds what checkpoint-last held."""
    root = common.make_jpeg_folder(str(tmp_path / 'jpegs'), 16, size=(80, 64))
    scans, saves, lasts = [], [], {}
    real_folder, real_save = common.image_folder, torch.save
    monkeypatch.setattr(common, 'image_folder', lambda *a, **k: scans.append(a[0]) or real_folder(*a, **k))

    def save(obj, f, *a, **k):
        saves.append(str(f))
        if 'checkpoint-last' in str(f):  # what checkpoint-last.pth holds at the end of each epoch
            lasts[obj['epoch']] = {n: t.clone() for n, t in obj['model'].items()}
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, 'save', save)
    out = tmp_path / 'run'
    fastmim.main(['--output-dir', str(out), '--data-path', root, '--model', 'vit_tiny', '--res-schedule', '32:2,64:2',
                  '--epochs', '4', '--batch-size', '8', '--warmup-epochs', '1', '--save-freq', '1', '--log-freq', '2',
                  '--num-workers', '0', '--embed-dim', '16', '--depth', '1', '--num-heads', '2', '--decoder-dim', '32'])
    assert len(scans) == 2 * 2  # the data and the picture, at 32 px and again at 64 px
    assert len(saves) == 4  # one serialisation a save, though every epoch's checkpoint is kept
    for epoch in range(4):
        kept = torch.load(out / f'checkpoint-{epoch}.pth', weights_only=True)
        assert kept['epoch'] == epoch and kept['model'].keys() == lasts[epoch].keys()
        assert all(torch.equal(kept['model'][n], t) for n, t in lasts[epoch].items())
    assert os.path.getsize(out / 'picture-3.png') > 0


@pytest.mark.parametrize('argv,msg', [
    (['--res', '130'], 'res 130'),
    (['--res-schedule', '64:1,96:1', '--epochs', '3'], 'covers 2 epochs'),
    (['--mask-ratio', '1.5'], 'out of range'),
    (['--model', 'swin_tiny', '--res', '128', '--window-size', '7'], 'window 7'),
    (['--data-path', '/nonexistent/folder'], 'does not exist'),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        fastmim.main(['--output-dir', str(tmp_path), '--num-workers', '0', *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith('error: ') and msg in err and err.count('\n') == 1


def test_compiled_loss_equals_eager():
    torch.manual_seed(0)
    m = tiny_vit()
    imgs, keys = torch.randn(2, 3, 32, 32), torch.arange(2)
    eager = m(imgs, keys=keys)['loss']
    compiled = torch.compile(m, backend='aot_eager')(imgs, keys=keys)['loss']
    assert torch.allclose(eager, compiled, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('script', ['fastmim', 'finetune'])
def test_benchmark_prints_one_json_line(script, capsys):
    import finetune
    main = {'fastmim': fastmim.main, 'finetune': finetune.main}[script]
    main(['--benchmark', '1', '--res', '32', '--batch-size', '2', '--num-workers', '0', '--model', 'vit_tiny'])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(row) >= {'method', 'model', 'res', 'batch', 'device', 'dtype', 'img_per_s', 'step_ms_median',
                        'flops_per_img', 'tflops', 'peak_mem_mb'}
    assert row['flops_per_img'] > 0 and row['res'] == 32 and row['batch'] == 2
    # the paths that ran on the CPU: SDPA, fused AdamW, fp32
    assert (row['attention'], row['fused_adamw'], row['dtype']) == ('sdpa', True, 'float32')


def test_benchmark_runs_the_middle_epoch_at_its_resolution(tmp_path, capsys):
    argv = ['--benchmark', '1', '--model', 'vit_tiny', '--epochs', '4', '--batch-size', '2',
            '--num-workers', '0', '--output-dir', str(tmp_path)]
    fastmim.main(argv + ['--res-schedule', '32:2,64:2'])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row['epoch'] == 2 and row['res'] == 64  # the second stage, and a 64 px batch
    at_64 = fastmim.build_model(fastmim.get_args(argv + ['--res', '64']))
    flops = common.count_flops(at_64, torch.randn(2, 3, 64, 64), keys=torch.arange(2))
    assert row['flops_per_img'] == flops // 2
