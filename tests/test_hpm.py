"""hpm.py: MAE parity with the official ordering, ranking loss by hand, easy-to-hard mask, gradient flow, EMA
teacher, learning, official checkpoints, runs and resume with the teacher, CLI.
Feature targets: DINO and CLIP towers from their key layouts (CLIP against a hand computation), the
2 - 2 cos loss by hand, checkpoints and official keys, a run, the errors."""
import json
import math

import pytest
import torch
from einops import rearrange
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import common
import hpm
from test_common import fixed_mask, log_rows


def tiny(cls=hpm.HPM, **kw):
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
               decoder_depth=2, decoder_num_heads=2)
    cfg.update(kw)
    return cls(**cfg)


def reference(m, imgs, mask, norm_pix, feats=None):
    """The official HPM models_mae_learn_loss.py ordering, by hand: [cls, visible ascending, masked ascending].

    feats (B, L, C): a feature target (models_mae_learn_feature_loss.py), 2 - 2 cos per patch.
    """
    B, L = mask.shape
    x = m.patch_embed(imgs) + m.pos_embed[:, 1:]
    D = x.shape[-1]
    x = torch.cat([(m.cls_token + m.pos_embed[:, :1]).expand(B, -1, -1), x[~mask].view(B, -1, D)], 1)
    for blk in m.blocks:
        x = blk(x)
    x = m.decoder_embed(m.norm(x))
    Dd = x.shape[-1]
    pos = m.decoder_pos_embed[:, 1:].expand(B, -1, -1)
    seq = torch.cat([x[:, :1] + m.decoder_pos_embed[:, :1], x[:, 1:] + pos[~mask].view(B, -1, Dd),
                     m.mask_token + pos[mask].view(B, -1, Dd)], 1)
    n = int(mask[0].sum())
    y = seq
    for blk in m.decoder_blocks:
        y = blk(y)
    pred = m.decoder_pred(m.decoder_norm(y))[:, 1:][:, -n:]
    if feats is None:
        p = m.patch_size
        t = imgs.reshape(B, 3, 32 // p, p, 32 // p, p)
        t = torch.einsum('nchpwq->nhwpqc', t).reshape(B, L, p * p * 3)[mask].view(B, n, -1)
        if norm_pix:
            t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
        sq = (pred - t) ** 2
        loss, per_patch = sq.mean(), sq.mean(-1)
    else:
        t = feats[mask].view(B, n, -1)
        per_patch = 2 - 2 * (pred * t).sum(-1) / (pred.norm(dim=-1) * t.norm(dim=-1))  # (B, n)
        loss = per_patch.mean()
    scores = None
    if hasattr(m, 'decoder_blocks_losspred'):
        y = seq
        for blk in m.decoder_blocks_losspred:
            y = blk(y)
        scores = m.decoder_pred_losspred(m.decoder_norm_losspred(y))[:, 1:][:, -n:].mean(-1)
    return loss, per_patch, scores


def test_mae_and_hpm_equal_the_official_ordering():
    torch.manual_seed(0)
    mae = tiny(common.MaskedAutoencoderViT)  # norm-pix on: the MAE recipe
    imgs, mask = torch.randn(2, 3, 32, 32), fixed_mask()
    out = mae(imgs, mask=mask)
    ref, _, _ = reference(mae, imgs, mask, True)
    # Two token orders: the same sums in another order, equal up to fp32 round-off (~1e-7 here);
    # 1e-5 leaves room for other CPUs' kernels, and a wrong order, mask or target moves it far more.
    assert torch.allclose(out['loss'], ref, rtol=1e-5, atol=0)
    model = tiny(norm_pix_loss=False)
    missing = set(model.state_dict()) - set(mae.state_dict())
    assert missing == {k for k in model.state_dict() if '_losspred' in k}
    assert set(mae.state_dict()) < set(model.state_dict())
    model.load_state_dict(mae.state_dict(), strict=False)
    out = model(imgs, mask=mask)
    ref, matrix, scores = reference(model, imgs, mask, False)
    assert torch.allclose(out['loss_rec'], ref, rtol=1e-5, atol=0)  # two token orders, as above
    assert torch.allclose(out['loss_pred'], hpm.ranking_loss(scores, matrix.detach()), rtol=1e-5, atol=0)
    assert torch.allclose(out['pred_loss'][mask].view(2, -1), scores, atol=1e-6)
    assert (out['pred'][~mask] == 0).all() and torch.equal(out['mask'], mask)
    mae.norm_pix_loss = False
    assert torch.allclose(mae(imgs, mask=mask)['loss'], out['loss_rec'], rtol=1e-6, atol=0)  # HPM off = MAE
    uneven = mask.clone()
    uneven[1, uneven[1].nonzero()[0]] = False  # 12 and 11 masked
    with pytest.raises(ValueError, match='same masked count'):
        model(imgs, mask=uneven)


@pytest.mark.parametrize('p,t,expect', [
    ([0, 0], [1, 2], 0.6931452), ([0, 3], [1, 2], 0.0485863), ([3, 0], [1, 2], 3.0485663),
    ([100, 0], [1, 2], 13.8155107), ([0, 0, 5], [1, 1, 2], 0.0067143)])
def test_ranking_loss_spec_values(p, t, expect):
    got = hpm.ranking_loss(torch.tensor([p]).float(), torch.tensor([t]).float())
    # the values are rounded to 7 decimals (abs 1e-7); fp32 log and sigmoid are ulps off (rel 1e-6)
    assert got.item() == pytest.approx(expect, rel=1e-6, abs=1e-7)


def test_ranking_loss_four_patches_with_ties_and_no_cross_image_pairs():
    p = torch.tensor([[0.3, -1.0, 2.0, 0.5], [1.0, 0.0, -0.5, 4.0]])
    t = torch.tensor([[1.0, 1.0, 3.0, 2.0], [0.5, 0.2, 0.2, 0.2]])  # ties: (0, 1) in image 0, three in image 1
    total, count = 0.0, 0
    for n in range(2):  # pairs stay inside an image
        for i in range(4):
            for j in range(4):
                if t[n, j] == t[n, i]:
                    continue
                s = 1 / (1 + math.exp(-(p[n, j] - p[n, i]).item()))
                total += -math.log(s + 1e-6) if t[n, j] > t[n, i] else -math.log(1 - s + 1e-6)
                count += 1
    assert count == 10 + 6
    # an fp32 sum of 32 terms against float64 by hand: a few 1e-7 apart, 1e-5 bounds the worst case
    assert hpm.ranking_loss(p, t).item() == pytest.approx(total / count, rel=1e-5)
    z = torch.zeros(1, 3)
    # all tied: no pair counts, so the sum is exactly 0 by construction and the count is guarded
    assert hpm.ranking_loss(z, z).item() == 0.0
    # Absolute ablation: per-image standardised target. [1, 2, 3] has unbiased variance 1, so
    # the loss is 2/3 (a biased variance would give 1). Next to a variance of 1 the +1e-6 is lost
    # in fp32 round-off; a target of variance 1e-6 shows it: 2/3 * 1e-6 / (1e-6 + 1e-6) = 1/3.
    t = torch.tensor([[1.0, 2.0, 3.0]])
    assert hpm.absolute_loss(z, t).item() == pytest.approx(2 / 3, rel=1e-5)
    assert hpm.absolute_loss(z, t * 1e-3).item() == pytest.approx(1 / 3, rel=1e-5)


def test_easy_to_hard_mask():
    scores = torch.tensor([[0.0, 5, 1, 5, 2, 3, 9, 0]])
    noise = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.05, 0.7]])
    got = hpm.easy_to_hard_mask(scores, 0.5, 0.5, noise)[1]  # len_keep 4, len_loss int(4 * 0.5) = 2: patches 6, 3
    assert got.dtype == torch.bool and got.tolist() == [[False, False, False, True, False, True, True, True]]
    torch.manual_seed(0)
    scores, noise = torch.randn(8, 196), torch.rand(8, 196)
    for alpha in (0.0, 0.005):  # len_loss 0: MAE random masking on the same noise
        assert all(torch.equal(a, b) for a, b in zip(hpm.easy_to_hard_mask(scores, 0.75, alpha, noise),
                                                     common.random_masking(noise, 0.75)))
    m = hpm.easy_to_hard_mask(scores, 0.75, 0.5, noise)[1]
    assert (m.sum(1) == 147).all()
    top = torch.topk(scores, 73, dim=1).indices
    assert m.gather(1, top).all()
    assert not torch.equal(m, common.random_masking(noise, 0.75)[1])


def test_the_forward_masks_with_easy_to_hard_mask(monkeypatch):
    """The function whose docstring explains Alg. S1 is the one the forward calls, on the teacher's scores and
    the noise of the sample keys: its ids_keep reach the encoder and its mask the output."""
    torch.manual_seed(0)
    m = tiny()
    m.on_epoch(m.epochs - 1)  # alpha 0.5: hard patches
    imgs, keys = torch.randn(2, 3, 32, 32), torch.arange(2)
    calls = []
    real = hpm.easy_to_hard_mask

    def spy(scores, mask_ratio, alpha, noise):
        calls.append((scores, noise))
        return real(scores, mask_ratio, alpha, noise)
    monkeypatch.setattr(hpm, 'easy_to_hard_mask', spy)
    out = m(imgs, keys=keys)
    assert len(calls) == 1
    scores, noise = calls[0]
    assert torch.equal(noise, common.sample_noise(2, 16, imgs.device, keys))
    assert torch.equal(scores, out['scores'])
    assert torch.equal(out['mask'], real(scores, 0.75, m.alpha, noise)[1])


def test_alpha_len_loss_and_ema_decay_tables():
    counts = {e: hpm.hard_count(196, 0.75, hpm.alpha_at(e, 800)) for e in (9, 10, 799)}
    assert counts == {9: 0, 10: 1, 799: 73}
    assert [hpm.hard_count(196, 0.75, hpm.alpha_at(e, 200)) for e in (1, 2, 49, 99, 199)] == [0, 1, 18, 36, 73]
    assert [hpm.hard_count(64, 0.75, hpm.alpha_at(e, 200)) for e in (7, 8, 49, 99, 199)] == [0, 1, 6, 12, 24]
    assert hpm.alpha_at(199, 200) == 0.5 and hpm.alpha_at(0, 10, 0.1, 0.3) == pytest.approx(0.12)
    assert [round(hpm.ema_decay(e), 7) for e in (0, 5, 99, 100, 500)] == [0.999, 0.999045, 0.999891, 0.9999, 0.9999]
    m = tiny(epochs=4)
    m.on_epoch(5)
    assert m.ema_decay == hpm.ema_decay(5) and m.alpha == hpm.alpha_at(5, 4)


@pytest.mark.parametrize('relative', [True, False])  # the absolute loss needs the detached target most
def test_gradient_flow(relative):
    torch.manual_seed(0)
    m = tiny(relative=relative)
    out = m(torch.randn(2, 3, 32, 32), mask=fixed_mask())
    names, params = zip(*[(k, p) for k, p in m.named_parameters() if p.requires_grad])
    g_pred = dict(zip(names, torch.autograd.grad(out['loss_pred'], params, retain_graph=True, allow_unused=True)))
    g_rec = dict(zip(names, torch.autograd.grad(out['loss_rec'], params, allow_unused=True)))
    # no path in the graph: exactly zero by construction
    unused = lambda g: g is None  # noqa: E731
    # The relative loss sees only differences of scores. A score is the mean of the head's outputs,
    # so the head's bias adds one constant to every score, and decoder_norm_losspred's bias does too
    # (it passes through the linear head): their gradients are sums of terms that cancel, zero in
    # exact arithmetic and 0.0 or round-off in fp32, depending on the CPU's kernels. Round-off is
    # ~1e-6 of the same layer's weight gradient, a real gradient (absolute loss) ~0.2 of it: 1e-3
    # separates the two on any machine.
    shift = ('decoder_pred_losspred.bias', 'decoder_norm_losspred.bias')
    for k in names:
        if k.startswith(('decoder_blocks.', 'decoder_norm.', 'decoder_pred.')):
            assert unused(g_pred[k]), k
        if '_losspred' not in k:
            continue
        assert unused(g_rec[k]) and not unused(g_pred[k]), k
        if k in shift:
            ratio = g_pred[k].abs().max() / g_pred[k.replace('.bias', '.weight')].abs().max()
            assert (ratio < 1e-3) if relative else (ratio > 1e-3), (k, ratio.item())
        else:
            assert g_pred[k].abs().max() > 0, k
    for k in ('patch_embed.proj.weight', 'blocks.0.attn.qkv.weight', 'norm.weight', 'cls_token',
              'decoder_embed.weight', 'mask_token'):
        assert g_pred[k].abs().max() > 0 and g_rec[k].abs().max() > 0, k


def test_ema_teacher_update_state_and_scoring_pass():
    torch.manual_seed(0)
    m = tiny()
    assert not any('teacher' in k for k in m.state_dict()) and len(list(m.parameters())) == len(
        list(m.teacher.parameters()))
    assert all(not p.requires_grad for p in m.teacher.parameters()) and not m.teacher.training
    before = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    m.on_epoch(5)
    m.after_step()
    d = 0.999045
    for k, v in m.teacher.state_dict().items():
        assert torch.allclose(v, d * before[k] + (1 - d) * m.state_dict()[k], rtol=1e-6, atol=1e-7), k
    m(torch.randn(2, 3, 32, 32), keys=torch.arange(2))['loss'].backward()
    assert all(p.grad is None for p in m.teacher.parameters())
    state = {k: v.clone() for k, v in m.extra_state()['model_ema'].items()}
    other = tiny()
    other.load_extra_state({'model_ema': state})
    assert all(torch.equal(state[k], v) for k, v in other.teacher.state_dict().items())
    # scoring pass: every patch visible, no mask token, one score per patch = mean of the wide head
    imgs = torch.randn(2, 3, 32, 32)
    t = m.teacher
    t.mask_token.data.fill_(float('nan'))
    s = t.score_patches(imgs)
    x = t.decoder_embed(t.forward_features(imgs)) + t.decoder_pos_embed
    for blk in t.decoder_blocks_losspred:
        x = blk(x)
    wide = t.decoder_pred_losspred(t.decoder_norm_losspred(x))[:, 1:]
    assert s.shape == (2, 16) and torch.isfinite(s).all() and wide.shape == (2, 16, 192)
    assert torch.allclose(s, wide.mean(-1))


def test_hpm_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    m = tiny(epochs=2)
    m.on_epoch(1)  # alpha 0.5: the teacher chooses 6 of the 12 masked patches
    data = common.SyntheticShapes('train', 4, 32)
    imgs = (torch.stack([data[i][0] for i in range(4)]).float() / 255 - 0.45) / 0.25
    keys = torch.arange(4)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    rec, pred = [], []
    for _ in range(20):
        out = m(imgs, keys=keys)
        opt.zero_grad()
        out['loss'].backward()
        opt.step()
        m.after_step()
        rec.append(out['loss_rec'].item())
        pred.append(out['loss_pred'].item())
    assert 'scores' in out and rec[-1] < 0.7 * rec[0] and sum(pred[-5:]) < sum(pred[:5])


def test_from_official_layouts_and_key_counts():
    torch.manual_seed(0)
    m = tiny()
    ema = {k: v + 1 for k, v in m.state_dict().items()}
    official = {'epoch': 3, 'state_dict': {'module.' + k: v for k, v in m.state_dict().items()}, 'optimizer': {},
                'model': 'mae_vit_base_patch16_dec512d8b', 'ema_state_dict': ema, 'loss_scaler': {}}
    m2 = tiny()
    m2.load_state_dict(hpm.from_official(official), strict=True)
    assert all(torch.equal(v, m2.state_dict()[k]) for k, v in m.state_dict().items())
    assert all(torch.equal(v, ema[k]) for k, v in hpm.from_official(official, teacher=True).items())
    official['ema_state_dict'] = {'module.' + k: v for k, v in ema.items()}  # as a DDP-wrapped EMA saves it
    m2.load_extra_state(official)  # the teacher of an official file: one call, the same path as the student's
    assert all(torch.equal(v, ema[k]) for k, v in m2.teacher.state_dict().items())
    with pytest.raises(ValueError, match='no teacher'):
        m2.load_extra_state({'model': m.state_dict()})
    mae = tiny(common.MaskedAutoencoderViT)
    mae.load_state_dict(hpm.from_official({'model': mae.state_dict()}), strict=True)
    res = m2.load_state_dict(hpm.from_official({'model': mae.state_dict()}), strict=False)
    assert set(res.missing_keys) == {k for k in m.state_dict() if '_losspred' in k} and not res.unexpected_keys
    encoder_only = {k: v for k, v in mae.state_dict().items() if not k.startswith(('decoder', 'mask_token'))}
    with pytest.raises(ValueError, match=r'mae_pretrain_vit_\*_full\.pth.*mae_visualize_vit_\*\.pth'):
        hpm.from_official({'model': encoder_only})
    with torch.device('meta'):
        big_mae, big = common.MaskedAutoencoderViT(), hpm.HPM()
    assert len(big_mae.state_dict()) == 254 and len(big.state_dict()) == 354
    assert big.state_dict()['decoder_pred_losspred.weight'].shape == (768, 512)


def run(tmp_path, *extra, name='run'):
    out = tmp_path / name
    hpm.main(['--output-dir', str(out), '--num-workers', '0', '--synthetic-size', '64', '--batch-size', '16',
              '--res', '32', '--epochs', '2', '--warmup-epochs', '1', '--log-freq', '1', '--decoder-dim', '32',
              '--decoder-depth', '1', '--decoder-heads', '2', *extra])
    return out, log_rows(out / 'log.jsonl')


def test_resume_with_teacher_equals_uninterrupted(tmp_path):
    torch.use_deterministic_algorithms(True)
    try:
        a, rows_a = run(tmp_path, '--max-steps', '6', name='a')  # 4 steps per epoch; epoch 1 uses the teacher
        run(tmp_path, '--max-steps', '3', name='b')
        b, rows_b = run(tmp_path, '--max-steps', '6', name='b')
    finally:
        torch.use_deterministic_algorithms(False)
    assert [r['step'] for r in rows_a] == list(range(1, 7)) and {'loss_rec', 'loss_pred'} <= set(rows_a[0])
    assert [(r['loss'], r['loss_pred']) for r in rows_a] == [(r['loss'], r['loss_pred']) for r in rows_b]
    ca = torch.load(a / 'checkpoint-last.pth', weights_only=True)
    cb = torch.load(b / 'checkpoint-last.pth', weights_only=True)
    assert ca['step'] == 6 and ca['args']['clip_grad'] == 5.0 and set(ca['model_ema']) == set(ca['model'])
    for part in ('model', 'model_ema'):
        assert all(torch.equal(ca[part][k], cb[part][k]) for k in ca[part])
    assert not all(torch.equal(ca['model'][k], ca['model_ema'][k]) for k in ca['model'])
    assert (a / 'picture-last.png').stat().st_size > 0


def test_mae_method_run_and_defaults(tmp_path):
    out, rows = run(tmp_path, '--method', 'mae', '--max-steps', '2')
    ckpt = torch.load(out / 'checkpoint-last.pth', weights_only=True)
    assert 'model_ema' not in ckpt and not any('_losspred' in k for k in ckpt['model'])
    assert 'loss_pred' not in rows[0] and ckpt['args']['norm_pix_loss'] is True and ckpt['args']['clip_grad'] is None
    args = hpm.get_args(['--data_path', str(tmp_path), '--model', 'mae_vit_base_patch16_dec512d8b', '--input_size',
                         '224', '--token_size', '14', '--learning_loss', '--relative', '--experiment', 'x'])
    assert (args.model, args.res, args.method, args.norm_pix_loss, args.clip_grad) == ('vit_base', 224, 'hpm',
                                                                                       False, 5.0)
    assert (args.decoder_dim, args.decoder_depth, args.epochs, args.warmup_epochs, args.blr) == (512, 8, 800, 40,
                                                                                                1.5e-4)
    assert hpm.get_args(['--norm_pix_loss', '--clip-grad', '0']).norm_pix_loss is True


@pytest.mark.parametrize('argv,msg', [
    (['--token_size', '5'], 'token_size 5'),
    (['--alpha-end', '1.5'], 'alpha-end 1.5'),
    (['--decoder-dim', '30'], 'decoder-dim 30'),
    (['--res', '70'], 'res 70'),
    (['--target', 'dino'], 'give its weights with --teacher-path'),
    (['--target', 'clip', '--teacher-path', 'no-such.pth'], 'no-such.pth does not exist'),
    (['--learn_feature_loss', 'ema', '--method', 'mae'], 'needs --method hpm'),
    (['--target', 'ema', '--norm-pix-loss'], 'drop it with --target ema'),
    (['--teacher-path', 'c.pth'], 'read by --target dino or clip only'),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        hpm.main(['--output-dir', str(tmp_path), '--num-workers', '0', *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith('error: ') and msg in err and err.count('\n') == 1


# ----------------------------------------------------------------------------- feature targets

def clip_state(width=32, layers=2, patch=8, grid=4, out=24):
    """Random weights of a tiny CLIP image tower in OpenAI's key layout, fp16 values as released."""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    sd = {'conv1.weight': r(width, 3, patch, patch), 'class_embedding': r(width),
          'positional_embedding': r(grid * grid + 1, width), 'proj': r(width, out)}
    blocks = [f'transformer.resblocks.{i}.' for i in range(layers)]
    for n in ['ln_pre', 'ln_post'] + [b + n for b in blocks for n in ('ln_1', 'ln_2')]:
        sd.update({n + '.weight': 1 + r(width), n + '.bias': r(width)})
    for b in blocks:
        sd.update({
            b + 'attn.in_proj_weight': r(3 * width, width), b + 'attn.in_proj_bias': r(3 * width),
            b + 'attn.out_proj.weight': r(width, width), b + 'attn.out_proj.bias': r(width),
            b + 'mlp.c_fc.weight': r(4 * width, width), b + 'mlp.c_fc.bias': r(4 * width),
            b + 'mlp.c_proj.weight': r(width, 4 * width), b + 'mlp.c_proj.bias': r(width)})
    return {k: v.half().float() for k, v in sd.items()}


def clip_by_hand(sd, imgs, heads):
    """The tower as official forward_features_clip runs it, in plain tensor ops (no layers)."""
    def ln(x, name):  # CLIP's LayerNorm: biased variance, eps 1e-5
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / (var + 1e-5).sqrt() * sd[name + '.weight'] + sd[name + '.bias']

    def lin(x, name):  # x @ W^T + b
        return x @ sd[name + '.weight'].T + sd[name + '.bias']

    W, p = sd['conv1.weight'].shape[0], sd['conv1.weight'].shape[-1]
    B, d = imgs.shape[0], W // heads
    x = rearrange(imgs, 'b c (h p1) (w p2) -> b (h w) (c p1 p2)', p1=p, p2=p)  # (B, L, 3*p*p)
    x = torch.cat([sd['class_embedding'].expand(B, 1, W), x @ sd['conv1.weight'].view(W, -1).T], 1)
    x = ln(x + sd['positional_embedding'], 'ln_pre')  # (B, 1+L, W)
    for i in range(sum(k.endswith('.ln_1.weight') for k in sd)):
        b = f'transformer.resblocks.{i}.'
        h = ln(x, b + 'ln_1')
        qkv = h @ sd[b + 'attn.in_proj_weight'].T + sd[b + 'attn.in_proj_bias']  # rows: q, k, v
        q, k, v = (rearrange(t, 'b n (h d) -> b h n d', h=heads) for t in qkv.chunk(3, -1))
        a = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, -1) @ v  # (B, nH, 1+L, d)
        x = x + lin(rearrange(a, 'b h n d -> b n (h d)'), b + 'attn.out_proj')
        h = lin(ln(x, b + 'ln_2'), b + 'mlp.c_fc')
        x = x + lin(h * torch.sigmoid(1.702 * h), b + 'mlp.c_proj')  # QuickGELU
    return (ln(x, 'ln_post') @ sd['proj'])[:, 1:]  # ln_post and proj on every token, cls dropped


def test_clip_tower_loads_both_layouts_and_matches_a_hand_computation(tmp_path):
    sd = clip_state()
    torch.save(sd, tmp_path / 'visual.pth')
    text = {'positional_embedding': torch.zeros(7, 16), 'logit_scale': torch.ones(()),
            'transformer.resblocks.0.ln_1.weight': torch.ones(16)}  # the text tower's names
    torch.save({**{'visual.' + k: v.half() for k, v in sd.items()}, **text}, tmp_path / 'clip.pth')
    imgs = torch.randn(2, 3, 32, 32)
    ref = clip_by_hand({k: v.double() for k, v in sd.items()}, imgs.double(), heads=2)
    for name in ('visual.pth', 'clip.pth'):
        m = hpm.load_target_model('clip', str(tmp_path / name), 32, 8, head_dim=16)
        assert isinstance(m, hpm.ClipVisual) and m.out_dim == 24 and not m.training
        assert not any(p.requires_grad for p in m.parameters())
        with torch.no_grad():
            got = m(imgs)
        # fp32 tower against float64 by hand: ~2e-6 apart here, 5e-5 leaves room for other CPUs;
        # a wrong token, norm placement, activation or head split is off by far more
        assert got.shape == (2, 16, 24), name
        assert torch.allclose(got.double(), ref, rtol=1e-5, atol=5e-5), name


def test_dino_model_loads_timm_keys(tmp_path):
    torch.manual_seed(0)
    vit = common.VisionTransformer(32, 8, 32, 2, 2)
    with torch.no_grad():
        vit.pos_embed.normal_(0, 0.1)  # a learned table, as DINO's
    head = {'head.weight': torch.zeros(10, 32), 'head.bias': torch.zeros(10)}  # timm's classifier
    torch.save({**vit.state_dict(), **head}, tmp_path / 'dino.pth')
    m = hpm.load_target_model('dino', str(tmp_path / 'dino.pth'), 32, 8, head_dim=16)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # official forward_features_dino: [cls, patches] + pos, blocks, norm
        x = torch.cat([vit.cls_token.expand(2, -1, -1), vit.patch_embed(imgs)], 1) + vit.pos_embed
        for blk in vit.blocks:
            x = blk(x)
        ref = vit.norm(x)[:, 1:]
        got = m(imgs)
    assert isinstance(m, hpm.DinoViT) and m.out_dim == 32 and got.shape == (2, 16, 32)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_feature_loss_by_hand():
    pred = torch.tensor([[[1.0, 0.0], [0.0, 3.0], [1.0, 1.0]]])
    tgt = torch.tensor([[[2.0, 0.0], [1.0, 1.0], [-1.0, -1.0]]])
    # 2 - 2 cos: parallel 0, 45 degrees 2 - sqrt 2, opposite 4 (lengths do not matter)
    expect = torch.tensor([[0.0, 2 - 2 ** 0.5, 4.0]])
    assert torch.allclose(hpm.feature_loss(pred, tgt), expect, atol=1e-6)
    torch.manual_seed(0)
    m = tiny(target='ema')
    with torch.no_grad():  # a teacher unlike the student, so the target is the teacher's
        for p in m.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    imgs, mask = torch.randn(2, 3, 32, 32), fixed_mask()
    out = m(imgs, mask=mask)
    feats = m.teacher.forward_features(imgs)[:, 1:]  # (B, L, D): the EMA encoder, whole image
    ref, per_patch, scores = reference(m, imgs, mask, False, feats=feats)
    assert out['pred'].shape == (2, 16, 32) and torch.allclose(out['target'], feats)
    # the official ordering by hand, as in the pixel test (two token orders: rtol 1e-5)
    assert torch.allclose(out['loss_rec'], ref, rtol=1e-5, atol=0)
    rank = hpm.ranking_loss(scores, per_patch.detach())
    assert torch.allclose(out['loss_pred'], rank, rtol=1e-5, atol=0)


def test_feature_model_checkpoint_official_keys_and_device(tmp_path):
    torch.save(clip_state(), tmp_path / 'clip.pth')

    def load():
        return hpm.load_target_model('clip', str(tmp_path / 'clip.pth'), 32, 8, head_dim=16)
    torch.manual_seed(0)
    m = tiny(target='clip', target_model=load())
    sd = m.state_dict()
    assert set(sd) == set(tiny().state_dict())  # the pixel model's keys: no teacher, no CLIP
    assert sd['decoder_pred.weight'].shape == (24, 32)
    assert sd['decoder_pred_losspred.weight'].shape == (192, 32)
    assert not {id(p) for p in m.target_model.parameters()} & {id(p) for p in m.parameters()}
    imgs, mask = torch.randn(2, 3, 32, 32), fixed_mask()
    out = m(imgs, mask=mask)
    torch.manual_seed(1)
    m2 = tiny(target='clip', target_model=load())
    m2.load_state_dict(sd, strict=True)
    out2 = m2(imgs, mask=mask)
    for k in ('loss', 'pred', 'target'):  # the same computation on the same weights
        assert torch.allclose(out[k], out2[k], rtol=1e-6, atol=0), k
    official = {'epoch': 1, 'state_dict': {'module.' + k: v for k, v in sd.items()},
                'model': 'mae_vit_base_patch16_dec512d8b', 'ema_state_dict': m.extra_state()['model_ema']}
    m3 = tiny(target='clip', target_model=load())
    m3.load_state_dict(hpm.from_official(official), strict=True)
    m3.load_extra_state(official)  # the official file's teacher, through from_official
    m.eval()
    with torch.no_grad():
        pic = m.picture(imgs, m(imgs))
    # three columns (input | masked | difficulty), each 32 px drawn at 128 with 2 px padding
    assert pic.dtype == torch.uint8 and pic.shape[-1] == 3 * (128 + 2) + 2
    m.train().to('meta')  # model.to() leaves plain attributes behind: the forward moves them
    out = m(torch.zeros(2, 3, 32, 32, device='meta'))
    assert next(m.target_model.parameters()).is_meta and out['target'].shape == (2, 16, 24)


def test_ema_target_run(tmp_path):
    out, rows = run(tmp_path, '--target', 'ema', '--max-steps', '2')
    ckpt = torch.load(out / 'checkpoint-last.pth', weights_only=True)
    assert [r['step'] for r in rows] == [1, 2] and all(math.isfinite(r['loss_pred']) for r in rows)
    assert ckpt['args']['target'] == 'ema' and set(ckpt['model_ema']) == set(ckpt['model'])
    assert ckpt['model']['decoder_pred.weight'].shape == (96, 32)  # the encoder's width (smoke preset: 96)
    assert (out / 'picture-last.png').stat().st_size > 0


def test_target_model_file_errors_and_official_flags(tmp_path):
    sd = clip_state()
    torch.save(sd, tmp_path / 'clip.pth')
    with pytest.raises(ValueError, match='not a dino ViT state dict: missing patch_embed.proj'):
        hpm.load_target_model('dino', str(tmp_path / 'clip.pth'), 32, 8, head_dim=16)
    broken = dict(sd, extra=torch.zeros(1))
    del broken['transformer.resblocks.1.mlp.c_fc.bias']
    torch.save(broken, tmp_path / 'broken.pth')
    bad = r'missing transformer\.resblocks\.1\.mlp\.c_fc\.bias; unexpected extra'
    with pytest.raises(ValueError, match=bad):
        hpm.load_target_model('clip', str(tmp_path / 'broken.pth'), 32, 8, head_dim=16)
    with pytest.raises(ValueError, match='takes 32 px images in 8 px patches; use --res 32'):
        hpm.load_target_model('clip', str(tmp_path / 'clip.pth'), 64, 8, head_dim=16)
    with pytest.raises(ValueError, match='--teacher-path'):
        hpm.load_target_model('clip', None, 32, 8)
    with pytest.raises(ValueError, match='pass target_model'):
        tiny(target='dino')
    args = hpm.get_args(['--learn_feature_loss', 'clip', '--clip_path', 'c.pth'])
    assert (args.target, args.teacher_path) == ('clip', 'c.pth')
    args = hpm.get_args(['--learn_feature_loss', 'none', '--dino_path', 'none'])
    assert (args.target, args.teacher_path) == ('pixel', None)


def test_benchmark_times_a_mid_run_step_and_counts_the_teacher(tmp_path, capsys):
    argv = ['--benchmark', '1', '--res', '64', '--patch-size', '16', '--epochs', '8', '--batch-size', '2',
            '--num-workers', '0', '--output-dir', str(tmp_path)]  # mid-run: epoch 4 of 8; 16 tokens
    hpm.main(argv)
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row['epoch'] == 4 and row['fused_adamw'] is True
    m = hpm.build_model(hpm.get_args(argv))  # epoch 0 (alpha 0.03): no hard patch, no teacher pass
    imgs, keys = torch.randn(2, 3, 64, 64), torch.arange(2)
    epoch0 = common.count_flops(m, imgs, keys=keys)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as teacher:  # as count_flops
        m.teacher.score_patches(imgs)
    m.on_epoch(4)  # alpha 0.31: 3 of the 12 masked patches are the teacher's hardest
    assert hpm.hard_count(16, 0.75, m.alpha) == 3
    assert row['flops_per_img'] == (epoch0 + teacher.get_total_flops()) // 2
