"""The k-NN monitor of every pre-training run (--eval-knn): its rows and when they come, its score
against finetune.py --mode knn on the same checkpoint, each method's encoder_features hook."""
import json

import pytest
import torch

import common
import fastmim
import finetune
import localmim as lm
from common import SwinTransformer, VisionTransformer

quiet = dict(log=lambda *a, **k: None)
# 64 built-in images at 32 px, 16 a step: 4 steps an epoch; bank 64 train, queries 64 val images
ARGV = ['--model', 'vit_tiny', '--res', '32', '--num-workers', '0', '--synthetic-size', '64',
        '--batch-size', '16', '--epochs', '3', '--warmup-epochs', '1', '--log-freq', '2']


def pretrain(out, *argv, swin=False):
    """A tiny FastMIM (ViT: patch 8, D 32, 2 blocks; or a C 8 Swin at 64 px) through common.train."""
    args = fastmim.get_args(['--output-dir', str(out), *ARGV, *argv])
    torch.manual_seed(0)
    if swin:
        enc = SwinTransformer(args.res, 4, 8, (1, 1, 1, 1), (1, 1, 2, 2), 2)
        model = fastmim.FastMIM(enc, mask_size=32, decoder_dim=32)
    else:
        model = fastmim.FastMIM(VisionTransformer(32, 8, 32, 2, 2), mask_size=16, decoder_dim=32)
    return common.train(model, args)


def knn_rows(out):
    """The monitor's rows of a run's log."""
    return [r for r in map(json.loads, open(out / 'log.jsonl')) if r.get('event') == 'knn']


def test_rows_at_step_0_every_n_epochs_and_the_end_once_across_a_resume(tmp_path, capsys):
    assert fastmim.get_args(ARGV).eval_knn == fastmim.SMOKE['eval_knn'] > 0  # on in the smoke run
    assert fastmim.get_args([*ARGV, '--data-path', str(tmp_path)]).eval_knn == 0  # off with data
    pretrain(tmp_path, '--eval-knn', '2', '--max-steps', '6')  # stopped in epoch 1
    pretrain(tmp_path, '--eval-knn', '2')  # resumed from step 6: no second baseline
    rows = knn_rows(tmp_path)
    # step 0 (random init), at --max-steps 6, after epoch 2 of 3 (step 8), at the end (step 12)
    assert [(r['step'], r['epoch']) for r in rows] == [(0, 0.0), (6, 1.5), (8, 2.0), (12, 3.0)]
    assert all(0 <= r[k] <= 100 for r in rows for k in ('knn_cls', 'knn_avg'))
    assert all(r['seconds'] > 0 for r in rows)  # the monitor's cost, for the run's time budget
    text = capsys.readouterr().out
    assert text.count('k-NN top-1 at step') == 4 and 'k-NN top-1 at step 12 (epoch 3): cls ' in text
    steps = [r['step'] for r in map(json.loads, open(tmp_path / 'log.jsonl')) if 'event' not in r]
    assert steps == [2, 4, 6, 8, 10, 12]  # the step rows as without the monitor


def test_the_score_equals_finetune_knn_on_the_checkpoint(tmp_path):
    pretrain(tmp_path / 'pre', '--max-steps', '3', '--synthetic-size', '128')  # bank, queries: 128 each
    last = knn_rows(tmp_path / 'pre')[-1]
    # measured 10.2 and 12.5: 3 queries apart, so a swap of the two pools would show
    assert last['step'] == 3 and last['knn_cls'] != last['knn_avg']
    ckpt = str(tmp_path / 'pre' / 'checkpoint-last.pth')
    for pool, key in (('cls', 'knn_cls'), ('avg', 'knn_avg')):
        got = finetune.main(['--mode', 'knn', '--ckpt', ckpt, '--model', 'vit_tiny', '--patch-size', '8',
                             '--embed-dim', '32', '--depth', '2', '--num-heads', '2', '--res', '32',
                             '--num-workers', '0', '--synthetic-size', '128', '--synthetic-val-size', '128',
                             '--batch-size', '16', '--nb-knn', '20', '--pool', pool,
                             '--output-dir', str(tmp_path / pool)])
        # the same weights, images, batches and operations: the same features, so the same votes
        assert got['top1'] == last[key], (pool, got, last)


def test_workers_give_the_same_rows(tmp_path):
    pretrain(tmp_path / 'w0', '--max-steps', '2')
    pretrain(tmp_path / 'w2', '--max-steps', '2', '--num-workers', '2')
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ('run', 'seconds')} for r in rows]  # noqa: E731
    a, b = strip(knn_rows(tmp_path / 'w0')), strip(knn_rows(tmp_path / 'w2'))
    assert [r['step'] for r in a] == [0, 2] and a == b


def test_swin_has_no_cls_score(tmp_path):
    pretrain(tmp_path, '--max-steps', '1', '--res', '64', '--model', 'swin_tiny', '--window-size', '2', swin=True)
    rows = knn_rows(tmp_path)
    assert [r['step'] for r in rows] == [0, 1]
    assert all(r['knn_cls'] is None and 0 <= r['knn_avg'] <= 100 for r in rows)


def test_off_writes_no_rows(tmp_path):
    pretrain(tmp_path, '--max-steps', '1', '--eval-knn', '0')
    assert knn_rows(tmp_path) == []


@pytest.mark.parametrize('swin', [False, True], ids=['vit', 'swin'])
def test_localmim_hook_equals_finetune_features_of_its_checkpoint(swin):
    """LocalMIM has no final norm: the hook takes the last level's, as finetune.py's loading does."""
    torch.manual_seed(0)
    imgs = torch.randn(3, 3, 128 if swin else 64, 128 if swin else 64)
    if swin:  # quirks off: the standard Swin's merge order, which finetune.py builds
        m = lm.LocalMIMSwin(128, 4, 8, (2, 2, 2, 2), (1, 2, 2, 4), 4, decoder_embed_dim=16, decoder_num_heads=2,
                            hog_nbins=9, official_quirks=False).eval()
        enc = SwinTransformer(128, 4, 8, (2, 2, 2, 2), (1, 2, 2, 4), 4)
        sd = {k[len('encoder.'):]: v for k, v in m.state_dict().items() if k.startswith('encoder.')}
    else:
        m = lm.LocalMIMViT(64, 16, 32, 8, 2, decoder_embed_dim=32, decoder_num_heads=2).eval()
        enc, sd = VisionTransformer(64, 16, 32, 8, 2, learnable_pos=True), m.state_dict()
    common.load_encoder(enc, sd, fresh=(), level_norm=True, **quiet)
    enc.eval()
    with torch.no_grad():
        cls, avg = m.encoder_features(imgs)
        # Swin: the visible-token path of the pre-training forward against the plain Swin; fp32 round-off
        assert torch.allclose(avg, finetune.encoder_features(enc, imgs, 'avg'), atol=1e-5)
        if swin:
            assert cls is None
        else:
            assert torch.allclose(cls, finetune.encoder_features(enc, imgs, 'cls'), atol=1e-5)
