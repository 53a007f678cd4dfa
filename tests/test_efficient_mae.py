"""efficient_mae.py: the four difficulty metrics on the spec's 4x4 example and closed forms, DFL weights, decoder
masking (counts, ties, shorter decoder), reduction to MAE bit for bit, learning, a run of main, CLI errors."""
import math

import pytest
import torch
from PIL import Image

import common
import efficient_mae as em
from test_common import log_rows


def tiny(**kw):
    """A tiny Efficient MAE (32 px, patch 8: a 4x4 grid) with constructor overrides."""
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
               decoder_depth=2, decoder_num_heads=2)
    cfg.update(kw)
    return em.EfficientMAE(**cfg)


def random_mask(B, L, n, seed=0):
    """(B, L) bool with n random masked positions per row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(L, generator=g)[:n] for _ in range(B)])
    return torch.zeros(B, L, dtype=torch.bool).scatter(1, ids, True)


# spec B.2 worked example: 4x4 grid, visible (1, 1) and (3, 3); None = visible
EXAMPLE = torch.ones(1, 16, dtype=torch.bool)
EXAMPLE[0, [5, 15]] = False
_ = None
TABLE = {
    'p2dist': [0.765, 0.500, 0.765, 1.608, 0.500, _, 0.500, 4 / 3, 0.765, 0.500, 0.541, 0.500, 1.608, 4 / 3,
               0.500, _],
    'count3': [1, 1, 1, 0, 1, _, 1, 0, 1, 1, 2, 1, 0, 0, 1, _],
    'invdist5': [0.707, 1.000, 0.707, 0.447, 1.000, _, 1.447, 1.000, 0.707, 1.447, 1.414, 1.447, 0.447, 1.000,
                 1.447, _],
    'nearest': [1.414, 1.000, 1.414, 2.236, 1.000, _, 1.000, 2.000, 1.414, 1.000, 1.414, 1.000, 2.236, 2.000,
                1.000, _],
}
RAW = {'p2dist': lambda m, g: em.p2dist(m, g, 64), 'count3': em.count3, 'invdist5': em.invdist5,
       'nearest': em.nearest}


@pytest.mark.parametrize('metric', em.METRICS)
def test_metrics_on_the_worked_example(metric):
    masked = EXAMPLE[0]
    want = torch.tensor([v if v is not None else 0.0 for v in TABLE[metric]])
    got = RAW[metric](EXAMPLE, 4)[0]
    if metric == 'count3':
        assert torch.equal(got[masked], want[masked])  # counts exact
    else:
        assert torch.allclose(got[masked], want[masked], rtol=0, atol=6e-4 if metric != 'p2dist' else 1e-3)
    d = em.difficulty(EXAMPLE, 4, metric, 64)[0]
    assert (d[~masked] == 0).all()
    turn = {'count3': 8 - got, 'invdist5': em.INVDIST5_MAX - got}.get(metric, got)  # d grows with difficulty
    assert torch.equal(d[masked], turn[masked])
    assert abs(em.INVDIST5_MAX - 13.820) < 1e-3


def test_p2dist_closed_forms_sampling_and_monotone():
    one = torch.ones(1, 9, dtype=torch.bool)
    one[0, 4] = False  # 3x3 grid, only the centre visible
    d = em.p2dist(one, 3, 64)[0]
    corner = (math.sqrt(2) + math.log(1 + math.sqrt(2))) / 3
    assert abs(d[1].item() - 0.5) < 1e-3 and abs(d[0].item() - corner) < 1e-3 and abs(corner - 0.7652) < 1e-4
    assert d[4] == 0
    s4 = em.p2dist(EXAMPLE, 4, 4)[0]  # spec: s = 4 within 2e-2 of the continuum
    assert abs(s4[7].item() - 1.3438) < 1e-4 and abs(s4[0].item() - 0.7609) < 1e-4
    assert torch.allclose(s4, em.p2dist(EXAMPLE, 4, 64)[0], atol=2e-2)
    mask = random_mask(16, 36, 30, seed=1)
    more = mask.clone()
    more[torch.arange(16), mask.int().argmax(1)] = False  # one more visible patch per image
    for metric in em.METRICS:  # adding a visible patch never makes a patch harder
        before, after = em.difficulty(mask, 6, metric, 4), em.difficulty(more, 6, metric, 4)
        assert (after[more] <= before[more] + 1e-6).all(), metric
        assert (after[more] < before[more] - 1e-6).any(), metric


def test_dfl_weights_mean_one_direction_clip():
    mask = random_mask(8, 196, 186, seed=2)  # ratio ~0.95 on the ViT-B grid: easy targets are rare
    d = em.difficulty(mask, 14, 'p2dist', 4)
    for mode in ('hist', 'monotone'):
        w = em.dfl_weights(d, mask, mode=mode)
        assert (w[~mask] == 0).all() and abs(w[mask].mean().item() - 1) < 1e-5, mode
        wi = em.dfl_weights(d, mask, mode=mode, scope='image')
        assert torch.allclose(wi.sum(1) / mask.sum(1), torch.ones(8), atol=1e-5), mode
    w = em.dfl_weights(d, mask)
    assert w[mask & (d < 0.5)].mean() > 3 * w[mask & (d >= 2)].mean()  # spec B.3: ~6 vs ~1 at 0.95
    mono = em.dfl_weights(d, mask, mode='monotone')[mask]
    order = torch.argsort(d[mask])
    assert (mono[order].diff() <= 1e-6).all() and mono.max() > 1.5 * mono.min()  # falls with d by construction
    # hist: bin counts 1, 3, 6 rising with difficulty -> weights 1 : 1/3 : 1/6, normalised to mean 1
    d = torch.tensor([[0.2, 0.7, 0.7, 0.7, 1.2, 1.2, 1.2, 1.2, 1.2, 1.2, 0.0]])
    kept = torch.ones_like(d, dtype=torch.bool)
    kept[0, -1] = False
    w = em.dfl_weights(d, kept)
    raw = torch.tensor([1, 1 / 3, 1 / 3, 1 / 3] + [1 / 6] * 6 + [0])
    assert torch.allclose(w, raw / raw[:10].mean(), rtol=1e-6)
    two = torch.cat([d, torch.full_like(d, 0.3)])  # image 1: all ten targets in bin 0
    w2 = em.dfl_weights(two, kept.expand(2, -1), scope='image')  # per-image counts and mean 1
    assert torch.allclose(w2[0], w[0], rtol=1e-6) and torch.allclose(w2[1], kept[0].float(), rtol=1e-6)
    capped = em.dfl_weights(d, kept, clip=1.5)
    assert w.max() > 1.5 and capped.max() == 1.5 and torch.equal(capped[w < 1.5], w[w < 1.5])
    gamma0 = em.dfl_weights(d, kept, gamma=0)
    assert torch.allclose(gamma0, kept.float())


def test_gamma1_loss_is_the_mean_of_per_bin_means_and_one_bin_is_mae():
    torch.manual_seed(0)
    m = tiny(img_size=64, mask_ratio=0.75, decoder_drop=0.25)
    imgs = torch.randn(4, 3, 64, 64)
    out = m(imgs, keys=torch.arange(4))
    assert not out['weights'].requires_grad and out['weights'].grad_fn is None and out['loss'].requires_grad
    kept = out['kept_targets']
    per = ((out['pred'] - out['target']) ** 2).mean(-1)  # pred rows are the retained targets
    b = torch.floor(out['difficulty'] / 0.5).clamp(max=7)[kept]
    means = [per[kept][b == k].mean() for k in b.unique()]
    assert len(means) > 1
    assert torch.allclose(out['loss'], torch.stack(means).mean(), rtol=1e-5)
    assert torch.allclose(out['loss_unweighted'], per[kept].mean(), rtol=1e-6)
    m.dfl['bin_width'] = 100.0  # every target in one bin: the plain mean over the retained targets
    assert torch.allclose(m(imgs, keys=torch.arange(4))['loss'], out['loss_unweighted'], rtol=1e-6)
    m.dfl['clip'], m.dfl['bin_width'] = 2.0, 0.5
    out = m(imgs, keys=torch.arange(4))
    assert out['weights'].max() <= 2.0


@pytest.mark.parametrize('ratio,drop,n_keep', [(0.85, 0.25, 10), (0.75, 0.5, 6), (0.85, 0.3, 10)])
def test_decoder_masking_drops_the_hardest_with_the_tie_rules(ratio, drop, n_keep):
    # L 16: n_masked 14 / 12 / 14 -> round(10.5) = 10 (half to even), 6, round(9.8) = 10
    torch.manual_seed(0)
    m = tiny(mask_ratio=ratio, decoder_drop=drop, metric='count3')  # integer difficulties: many ties
    imgs = torch.randn(6, 3, 32, 32)
    n_masked = 16 - int(16 * (1 - ratio))
    assert em.keep_count(n_masked, drop) == n_keep == round((1 - drop) * n_masked)
    for given in (True, False):
        keys = torch.arange(6) + 10
        mask = random_mask(6, 16, n_masked, seed=3) if given else None
        out = m(imgs, mask=mask, keys=keys)
        mask, kept, d = out['mask'], out['kept_targets'], out['difficulty']
        assert (kept.sum(1) == n_keep).all() and not (kept & ~mask).any()
        noise = common.sample_noise(6, 16, 'cpu', keys)
        for i in range(6):  # hardest first; ties: raster index ascending (given mask) or larger noise first
            tie = (lambda j: j) if given else (lambda j: -noise[i, j].item())
            order = sorted(mask[i].nonzero().flatten().tolist(), key=lambda j: (-d[i, j].item(), tie(j)))
            assert set(kept[i].nonzero().flatten().tolist()) == set(order[n_masked - n_keep:]), (given, i)
    m.metric = 'p2dist'  # real values: mirror-image patches tie exactly, not always in fp32
    out = m(imgs, keys=torch.arange(6))
    kept, dropped, d = out['kept_targets'], out['mask'] & ~out['kept_targets'], out['difficulty']
    for i in range(6):  # ranked on multiples of RANK_STEP; 1e-6: fp32 round-off of d / RANK_STEP
        assert d[i][kept[i]].max() <= d[i][dropped[i]].min() + em.RANK_STEP + 1e-6
    if ratio == 0.85:  # visible (0, 1), (1, 0): symmetric about the diagonal, 14 masked, 4 dropped
        sym = torch.ones(1, 16, dtype=torch.bool)
        sym[0, [1, 4]] = False
        # hardest (3, 3) = 15, then the tied mirror pairs 11 = 14 (2.14) and 7 = 13 (1.607, i.e.
        # 16073.2 steps, far from a rounding edge); a given mask drops the lower raster index: 7
        out = m(imgs[:1], mask=sym)
        assert (sym & ~out['kept_targets'])[0].nonzero().flatten().tolist() == [7, 11, 14, 15]
    uneven = random_mask(2, 16, 12)
    uneven[1, uneven[1].nonzero()[0]] = False
    with pytest.raises(ValueError, match='same masked count'):
        m(imgs[:2], mask=uneven)


def test_decoder_really_runs_on_fewer_tokens_and_dropped_targets_have_no_loss():
    torch.manual_seed(0)
    lengths = []
    flops = {}
    imgs = torch.randn(2, 3, 64, 64)
    for drop in (0.0, 0.5):
        m = tiny(img_size=64, mask_ratio=0.75, decoder_drop=drop)  # L 64, 16 visible, 48 masked
        m.decoder_blocks[0].register_forward_pre_hook(lambda mod, args: lengths.append(args[0].shape[1]))
        out = m(imgs, keys=torch.arange(2))
        flops[drop] = common.count_flops(m, imgs, keys=torch.arange(2))
    assert lengths[0] == 1 + 64 and lengths[2] == 1 + 16 + 24 and flops[0.5] < 0.8 * flops[0.0]
    kept, mask = out['kept_targets'], out['mask']
    assert (out['pred'][~kept] == 0).all() and (out['pred'][kept] != 0).any(dim=-1).all()
    upsample = common.upsample_mask((mask & ~kept).float().view(2, 8, 8), 8)[:, None]  # (2, 1, 64, 64)
    other = imgs + 5 * torch.randn_like(imgs) * upsample  # change only the pixels of dropped patches
    again = m(other, keys=torch.arange(2))
    assert torch.equal(again['kept_targets'], kept)
    assert torch.allclose(again['loss'], out['loss'], rtol=1e-6, atol=0)
    assert not torch.equal(again['target'], out['target'])


def test_neutral_knobs_are_mae_bit_for_bit(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError('re-weighting or decoder masking ran with neutral knobs')

    monkeypatch.setattr(em, 'dfl_weights', forbidden)
    monkeypatch.setattr(em, 'decoder_targets', forbidden)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(0)
        mae = common.MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                          decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2)
        imgs = torch.randn(3, 3, 32, 32)
        for mode in ('hist', 'monotone'):
            m = tiny(mask_ratio=0.75, decoder_drop=0.0, dfl_gamma=0.0, dfl_mode=mode)
            m.load_state_dict(mae.state_dict(), strict=True)  # the same keys: nothing added to MAE
            for kw in (dict(mask=random_mask(3, 16, 12)), dict(keys=torch.arange(3))):
                a, b = mae(imgs, **kw), m(imgs, **kw)
                assert torch.equal(a['loss'], b['loss']) and torch.equal(a['mask'], b['mask'])
                assert torch.equal(a['pred'][a['mask']], b['pred'][b['mask']])
                assert torch.equal(b['kept_targets'], b['mask']) and torch.equal(b['weights'], b['mask'].float())
    finally:
        torch.use_deterministic_algorithms(False)


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    m = tiny()  # defaults: ratio 0.85, drop 0.25, P²Dist, hist DFL gamma 1
    data = common.SyntheticShapes('train', 8, 32)
    imgs = (torch.stack([data[i][0] for i in range(8)]).float() / 255 - 0.45) / 0.25
    keys = torch.arange(8)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):  # the built-in images' texture and sensor noise: 0.71 of the first loss at 20 steps
        out = m(imgs, keys=keys)
        opt.zero_grad()
        out['loss'].backward()
        opt.step()
        losses.append(out['loss'].item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.7 * losses[0]


def test_main_run_writes_log_checkpoint_picture_and_reads_official_flags(tmp_path):
    out = tmp_path / 'run'
    em.main(['--output-dir', str(out), '--num-workers', '0', '--synthetic-size', '32', '--batch-size', '8',
             '--res', '64', '--epochs', '2', '--warmup-epochs', '1', '--log-freq', '1', '--decoder-dim', '32',
             '--decoder-depth', '1', '--decoder-heads', '2', '--p2dist-samples', '4', '--max-steps', '3'])
    rows = log_rows(out / 'log.jsonl')
    assert [r['step'] for r in rows] == [1, 2, 3] and all(math.isfinite(r['loss']) for r in rows)
    assert 'loss_unweighted' in rows[0]
    ckpt = torch.load(out / 'checkpoint-last.pth', weights_only=True)
    assert ckpt['step'] == 3 and ckpt['args']['mask_ratio'] == 0.85 and ckpt['args']['decoder_drop'] == 0.25
    assert ckpt['args']['difficulty'] == 'p2dist' and ckpt['args']['dfl_mode'] == 'hist'
    mae = common.MaskedAutoencoderViT(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3,
                                      decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)  # the smoke ViT
    mae.load_state_dict(ckpt['model'], strict=True)  # an MAE checkpoint: nothing extra to save
    tile = 2 * 64 + 2  # grid_picture enlarges 64-px images 2x, 2-px padding
    # input|masked|d|w|pred x 8 images, under the 14-px strip of column names
    assert Image.open(out / 'picture-last.png').size == (5 * tile + 2, 14 + 8 * tile + 2)
    args = em.get_args(['--data_path', str(tmp_path), '--model', 'mae_vit_base_patch16', '--mask_ratio', '0.9',
                        '--norm_pix_loss', '--input_size', '224'])
    assert (args.model, args.res, args.mask_ratio, args.norm_pix_loss, args.decoder_drop) == ('vit_base', 224, 0.9,
                                                                                            True, 0.25)
    assert (args.decoder_dim, args.decoder_depth, args.decoder_heads, args.batch_size, args.epochs,
            args.warmup_epochs, args.blr) == (512, 8, 16, 512, 800, 40, 1.5e-4)
    assert em.get_args(['--data-path', str(tmp_path)]).mask_ratio == 0.85


@pytest.mark.parametrize('argv,msg', [
    (['--decoder-drop', '1.5'], '--decoder-drop 1.5 is out of range'),
    (['--mask-ratio', '1.2'], '--mask-ratio 1.2 is out of range'),
    (['--decoder-drop', '0.99'], 'keeps none of the 14 masked patches'),
    (['--mask-ratio', '0.95'], 'leaves no visible patch'),
    (['--dfl-gamma', '-1'], '--dfl-gamma -1'),
    (['--dfl-clip', '0.5'], '--dfl-clip 0.5'),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        em.main(['--output-dir', str(tmp_path), '--num-workers', '0', '--patch-size', '16', *argv])  # 16 tokens
    err = capsys.readouterr()
    assert e.value.code == 2 and err.err.startswith('error: ') and msg in err.err and err.err.count('\n') == 1
    assert err.out == ''
