"""Model size for pre-training: --patch-size/--embed-dim/--depth/--num-heads in every method, saved in the checkpoint
and read back by finetune.py --ckpt; each method's size constraints are one line `error: ...`."""
import pytest
import torch

import common
import efficient_mae
import fastmim
import finetune
import hpm
import localmim
import mff

METHODS = {'fastmim': fastmim, 'hpm': hpm, 'localmim': localmim, 'mff': mff, 'efficient_mae': efficient_mae}
RUN = ['--res', '32', '--num-workers', '0', '--batch-size', '8', '--synthetic-size', '16', '--max-steps', '2',
       '--decoder-dim', '32', '--log-freq', '1']
# FastMIM's HOG target needs whole 8-px cells per token; LocalMIM's ViT supervises blocks [1, 3, depth-3, depth-1]
SIZE = {'fastmim': (8, 2), 'hpm': (4, 2), 'localmim': (4, 7), 'mff': (8, 2), 'efficient_mae': (4, 2)}


@pytest.mark.parametrize('method', list(METHODS))
def test_a_custom_size_trains_is_saved_and_finetune_builds_the_same_encoder(tmp_path, capsys, method):
    """The checkpoint's encoder has the given patch, width, depth and heads, and finetune.py --ckpt rebuilds it
    from the checkpoint's args alone: every encoder tensor loads (none missing) with the same shape."""
    patch, depth = SIZE[method]
    out = tmp_path / method
    METHODS[method].main([*RUN, '--output-dir', str(out), '--patch-size', str(patch), '--embed-dim', '32',
                          '--depth', str(depth), '--num-heads', '2'])
    ckpt = torch.load(out / 'checkpoint-last.pth', weights_only=True)
    assert (ckpt['args']['patch_size'], ckpt['args']['embed_dim'], ckpt['args']['depth'],
            ckpt['args']['num_heads']) == (patch, 32, depth, 2)
    sd = common.strip_prefix(ckpt['model'])
    w = next(v for k, v in sd.items() if k.endswith('patch_embed.proj.weight'))
    assert tuple(w.shape) == (32, 3, patch, patch)
    blocks = {k.split('blocks.')[1].split('.')[0] for k in sd if 'blocks.' in k and 'decoder' not in k}
    assert len(blocks) == depth
    capsys.readouterr()

    argv = ['--ckpt', str(out / 'checkpoint-last.pth'), '--mode', 'knn', '--res', '32', '--num-workers', '0',
            '--synthetic-size', '16', '--synthetic-val-size', '16', '--batch-size', '8', '--nb-knn', '5',
            '--output-dir', str(tmp_path / 'knn')]
    finetune.main(argv)
    text = capsys.readouterr().out
    assert 'ckpt: model patch_size embed_dim depth num_heads' in text
    assert 'missing (fresh): none' in text
    args = finetune.get_args(argv)
    finetune.resolve(args, common.load_file(out / 'checkpoint-last.pth'))
    enc = finetune.build_encoder(args)
    assert enc.blocks[0].attn.num_heads == 2 and len(enc.blocks) == depth
    for k, v in enc.state_dict().items():
        if k in sd:
            assert v.shape == sd[k].shape, k


def test_unset_sizes_are_the_presets_and_say_so():
    """Left out, the size flags take the --model preset (FastMIM's recipe first: its ViT-B has 6 heads)."""
    args = mff.get_args(['--model', 'vit_tiny', '--output-dir', 'unused'])
    assert (args.patch_size, args.embed_dim, args.depth, args.num_heads) == (16, 192, 12, 3)
    assert {args.sources[k] for k in ('patch_size', 'embed_dim', 'depth', 'num_heads')} == {'preset(vit_tiny)'}
    args = fastmim.get_args(['--model', 'vit_base', '--output-dir', 'unused'])
    assert (args.num_heads, args.sources['num_heads'], args.sources['embed_dim']) == (
        6, 'recipe(vit_base)', 'preset(vit_base)')
    args = fastmim.get_args(['--model', 'swin_tiny', '--output-dir', 'unused', '--depth', '1,1,2,1'])
    assert (args.patch_size, args.embed_dim, args.depth, args.num_heads) == (4, 96, [1, 1, 2, 1], [3, 6, 12, 24])


@pytest.mark.parametrize('method', list(METHODS))
def test_the_smoke_preset_is_a_small_patch_8_vit_and_an_explicit_model_keeps_its_own(method):
    """Without --data-path every method pre-trains 8-px patches at 64 px (64 tokens; finetune.py's random
    init is the same encoder); an explicit --model (still without data) keeps its preset's size."""
    args = METHODS[method].get_args(['--output-dir', 'unused'])
    assert (args.res, args.patch_size, args.embed_dim, args.num_heads) == (64, 8, 96, 3)
    assert args.depth == (8 if method == 'localmim' else 4)  # LocalMIM supervises blocks 2, 4, 6, 8
    assert args.sources['patch_size'] == 'smoke' and args.eval_knn > 0
    args = METHODS[method].get_args(['--model', 'vit_small', '--output-dir', 'unused'])
    assert (args.patch_size, args.embed_dim, args.depth) == (16, 384, 12)
    ft = finetune.get_args(['--output-dir', 'unused'])
    finetune.resolve(ft, None)
    assert (ft.patch_size, ft.embed_dim, ft.depth, ft.num_heads) == (8, 96, 4, 3)


@pytest.mark.parametrize('method, argv, says', [
    ('fastmim', ['--patch-size', '4'], 'the HOG target needs a patch that is a multiple of the 8-px cell'),
    ('fastmim', ['--res', '48', '--patch-size', '16', '--mask-size', '24'], '--mask-size 24 and the 16-px token must nest'),
    ('fastmim', ['--mask-size', '12'], '--mask-size 12 must be a multiple of the 8-px HOG cell'),
    ('fastmim', ['--model', 'swin_tiny', '--res', '64', '--patch-size', '3'], 'not divisible by the Swin output'),
    ('fastmim', ['--model', 'swin_tiny', '--res', '64', '--patch-size', '2', '--window-size', '3'],
     'window 3 does not divide stage grid'),
    ('fastmim', ['--model', 'swin_tiny', '--depth', '2,2'], 'Swin needs one depth and one head count per stage'),
    ('localmim', ['--patch-size', '6', '--res', '48'], 'the finest level regresses patch/4-px HOG cells'),
    ('localmim', ['--patch-size', '12', '--res', '36'], 'res 36 is not divisible by twice the patch 24'),
    ('localmim', ['--model', 'swin_tiny', '--res', '64', '--patch-size', '3'], 'not divisible by the Swin output'),
    ('hpm', ['--patch-size', '8', '--token_size', '2'], '--token_size 2 does not match res 32 / patch 8'),
    ('mff', ['--patch-size', '12'], 'res 32 is not divisible by patch 12'),
    ('efficient_mae', ['--embed-dim', '30', '--num-heads', '4'], '--embed-dim 30 is not divisible by --num-heads 4'),
    ('hpm', ['--depth', '2,2'], '--depth 2,2: a ViT takes one number here'),
    ('mff', ['--num-heads', '0'], '--num-heads/--num_heads: 0 is not a positive integer'),
])
def test_a_size_that_does_not_fit_is_one_line_and_nothing_is_written(tmp_path, capsys, method, argv, says):
    """Each method's size constraint stops the run with one line that names the fix; no folder is made."""
    out = tmp_path / 'out'
    with pytest.raises(SystemExit) as e:
        METHODS[method].main(['--res', '32', '--num-workers', '0', '--max-steps', '1', '--output-dir', str(out), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith('error: ') and says in err, err
    assert err.count('\n') == 1 and not out.exists()


def test_finetune_keeps_fastmims_standard_heads_and_takes_a_custom_sizes_heads(tmp_path):
    """FastMIM pre-trains ViT-B with 6 heads and fine-tunes with the preset's 12 (ggjy/FastMIM.pytorch): a checkpoint
    at the preset width keeps that rule; at a width of its own, its heads are part of the size and are taken."""
    argv = ['--ckpt', 'x.pth', '--mode', 'knn', '--output-dir', str(tmp_path)]
    base = dict(method='fastmim', model='vit_base', patch_size=16, depth=12)
    for width, heads, expect in ((768, 6, 12), (96, 6, 6)):
        args = finetune.get_args(argv)
        finetune.resolve(args, {'model': {}, 'args': dict(base, embed_dim=width, num_heads=heads)})
        assert finetune.model_config(args)['num_heads'] == expect and args.embed_dim == width
