"""The recipe's batch on fewer GPUs: a run whose batch x accum x processes is not its recipe's effective batch says so
at the start with the --accum-iter that restores it; --accum-iter auto picks it; lr = blr x effective batch / 256."""
import argparse
import json

import pytest
import torch

import common
import efficient_mae
import fastmim
import finetune
import hpm
import localmim
import mff

TINY = ['--patch-size', '8', '--embed-dim', '32', '--depth', '2', '--num-heads', '2', '--res', '32',
        '--decoder-dim', '32', '--num-workers', '0', '--max-steps', '1', '--no-draft-decode']


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """24 small JPEGs in class folders."""
    return common.make_jpeg_folder(str(tmp_path_factory.mktemp('imgs')), 24, size=(40, 40))


def start(text):
    """The config dict, the effective-batch line and the recipe note (or None) of a run's output."""
    lines = text.splitlines()
    config = json.loads(next(line for line in lines if line.startswith('config: '))[len('config: '):])
    batch = next(line for line in lines if ', effective batch ' in line)
    notes = [line for line in lines if line.startswith('note: effective batch') or 'accum-iter auto' in line]
    assert len(notes) <= 1, notes  # one line at most
    return config, batch, notes[0] if notes else None


def test_recipe_batch_is_the_tables_batch_on_8_gpus():
    """Every recipe_batch is its row's batch x accum x 8 (the official commands' GPUs), so `torchrun
    --nproc_per_node 8` with the defaults runs the recipe without a note; the official numbers are kept."""
    tables = {'fastmim': fastmim.DEFAULTS, 'localmim': localmim.DEFAULTS, 'mff': mff.DEFAULTS,
              'hpm': hpm.DEFAULTS, 'efficient_mae': efficient_mae.DEFAULTS}
    for name, table in tables.items():
        for model, row in table.items():
            if 'recipe_batch' in row:
                assert row['batch_size'] * row.get('accum_iter', 1) * 8 == row['recipe_batch'], (name, model)
    assert [fastmim.DEFAULTS[m]['recipe_batch'] for m in ('vit_base', 'swin_base')] == [4096, 2048]
    assert [localmim.DEFAULTS[m]['recipe_batch'] for m in ('vit_base', 'vit_large', 'swin_base', 'swin_large')] \
        == [2048, 4096, 2048, 4096]
    assert hpm.DEFAULTS['vit_base']['recipe_batch'] == mff.DEFAULTS['vit_base']['recipe_batch'] == 4096
    assert 'recipe_batch' not in fastmim.DEFAULTS['vit_tiny']  # ours: no recipe to restore


def test_recipe_accum_and_the_note_for_other_worlds():
    """The fewest micro-steps reaching the recipe at 1, 2, 3 and 8 processes, and what the note says when no
    --accum-iter gives the recipe exactly (3 processes do not divide 4096) or the batch is over it already."""
    assert common.recipe_accum(4096, 512, 1) == (8, True)
    assert common.recipe_accum(4096, 512, 8) == (1, True)
    assert common.recipe_accum(4096, 64, 2) == (32, True)
    assert common.recipe_accum(4096, 100, 3) == (14, False)  # 4200, the smallest >= 4096
    assert common.recipe_accum(2048, 128, 4) == (4, True)

    def note(batch, accum, world, auto=False):
        args = argparse.Namespace(recipe_batch=4096, batch_size=batch, accum_iter=accum, model='vit_base',
                                  data_path='x', accum_auto=auto)
        return common.batch_note(args, world)
    assert note(512, 1, 8) is None and note(64, 8, 8) is None
    assert '--accum-iter 4 restores it' in note(512, 1, 2) and 'effective batch 1024 (512 x 1 x 2)' in note(512, 1, 2)
    inexact = note(100, 14, 3, auto=True)
    assert 'no --accum-iter restores it exactly (auto took --accum-iter 14, 4200)' in inexact
    assert '4096 is not divisible by 3 processes' in inexact
    assert 'no --accum-iter restores it exactly' in note(96, 1, 2)  # 2048 = 21.3 x 96
    assert '--batch-size 64 --accum-iter 32 gives 4096' in note(96, 1, 2)  # the nearest batch that does
    over = note(1024, 1, 8)
    assert 'is more already' in over and '--batch-size 512 --accum-iter 1 gives 4096' in over


def test_a_run_under_its_recipes_batch_names_the_accum_that_restores_it(tmp_path, folder, capsys):
    """fastmim vit_base (recipe 512 x 8 GPUs = 4096) on 1 process at batch 8: one note naming --accum-iter 512;
    the lr stays blr x 8 / 256 (the batch that runs)."""
    fastmim.main(['--model', 'vit_base', *TINY, '--data-path', folder, '--batch-size', '8',
                  '--output-dir', str(tmp_path / 'a')])
    config, batch, note = start(capsys.readouterr().out)
    assert note == ("note: effective batch 8 (8 x 1 x 1) is not the vit_base recipe's 4096; --accum-iter 512 "
                    "restores it (or --accum-iter auto)")
    assert config['accum_iter'] == 1 and config['recipe_batch'] == 4096
    assert config['lr'] == pytest.approx(config['blr'] * 8 / 256, rel=1e-12)  # the rule, on the run's batch


def test_accum_auto_reaches_the_recipe(tmp_path, folder, capsys, monkeypatch):
    """--accum-iter auto sets accum_iter to the fewest micro-steps reaching the recipe's batch (a recipe of 20
    here, so that one step fits the folder): batch 4 -> 5, effective batch 20, lr = blr x 20 / 256, no note; batch
    3 -> 7 (21, not exactly 20: the note says so)."""
    monkeypatch.setitem(fastmim.DEFAULTS, 'vit_base', {**fastmim.DEFAULTS['vit_base'], 'recipe_batch': 20})
    fastmim.main(['--model', 'vit_base', *TINY, '--data-path', folder, '--batch-size', '4', '--accum-iter', 'auto',
                  '--output-dir', str(tmp_path / 'a')])
    text = capsys.readouterr().out
    config, batch, note = start(text)
    assert config['accum_iter'] == 5 and config['accum_auto'] is True and note is None
    assert 'effective batch 20 (4 x 5 x 1)' in batch and 'auto: accum_iter' in text  # the `from:` line
    assert config['lr'] == pytest.approx(config['blr'] * 20 / 256, rel=1e-12)
    saved = torch.load(tmp_path / 'a' / 'checkpoint-last.pth', weights_only=True)
    assert saved['args']['accum_iter'] == 5  # a number in the checkpoint: a resume compares like for like
    fastmim.main(['--model', 'vit_base', *TINY, '--data-path', folder, '--batch-size', '3', '--accum-iter', 'auto',
                  '--output-dir', str(tmp_path / 'b')])
    config, batch, note = start(capsys.readouterr().out)
    assert config['accum_iter'] == 7 and 'effective batch 21 (3 x 7 x 1)' in batch
    assert 'no --accum-iter restores it exactly (auto took --accum-iter 7, 21)' in note
    assert '--batch-size 2 --accum-iter 10 gives 20' in note


def test_the_smoke_preset_has_no_recipe_batch(tmp_path, capsys):
    """No --data-path: the smoke preset's batch is its own, so no note even under --model vit_base; auto is 1
    and says why in one line."""
    argv = ['--model', 'vit_base', *TINY, '--batch-size', '8', '--synthetic-size', '16']
    fastmim.main([*argv, '--output-dir', str(tmp_path / 'a')])
    config, _, note = start(capsys.readouterr().out)
    assert note is None and config['recipe_batch'] is None
    fastmim.main([*argv, '--accum-iter', 'auto', '--output-dir', str(tmp_path / 'b')])
    config, _, note = start(capsys.readouterr().out)
    assert config['accum_iter'] == 1 and note == 'note: --accum-iter auto is 1: the smoke preset has no recipe batch ' \
        'to reach'


def test_finetune_recipes_have_their_batch_too(tmp_path, capsys):
    """finetune.py's recipes: the recipe's batch x accum x 8 processes (HPM's linear probe: 256 x 1 x 8 = 2048) is
    named with the --accum-iter that restores it."""
    common.make_jpeg_folder(str(tmp_path / 'd' / 'train'), 10, size=(40, 40))
    common.make_jpeg_folder(str(tmp_path / 'd' / 'val'), 10, size=(40, 40))
    finetune.main(['--model', 'vit_tiny', '--patch-size', '8', '--embed-dim', '32', '--depth', '2', '--num-heads',
                   '2', '--res', '32', '--num-workers', '0', '--mode', 'linear', '--recipe', 'hpm', '--batch-size',
                   '4', '--max-steps', '1', '--data-path', str(tmp_path / 'd'), '--output-dir', str(tmp_path / 'o')])
    config, _, note = start(capsys.readouterr().out)
    assert config['recipe_batch'] == 2048
    assert note == "note: effective batch 4 (4 x 1 x 1) is not the vit_tiny recipe's 2048; --accum-iter 512 " \
        "restores it (or --accum-iter auto)"
