"""One parser: the loop's flags are declared once (common.run_parser) and work alike in every script; the start
line `from: ...` says where each resolved value came from (flag, smoke preset, recipe, default)."""
import json
import os

import torch

import fastmim
import finetune

FT = ['--model', 'vit_tiny', '--patch-size', '8', '--embed-dim', '32', '--depth', '2', '--num-heads', '2',
      '--res', '32', '--num-workers', '0', '--synthetic-size', '64', '--synthetic-val-size', '32',
      '--batch-size', '32']


def start_lines(text):
    """The config dict and the `from:` line of a run's output as {source: [flags]}."""
    lines = text.splitlines()
    config = json.loads(next(line for line in lines if line.startswith('config: '))[len('config: '):])
    groups = {}
    for part in next(line for line in lines if line.startswith('from: '))[len('from: '):].split(' | '):
        source, keys = part.split(': ')
        groups[source] = keys.split()
    return config, groups


def test_finetune_takes_the_loop_flags_of_the_pretraining_scripts(tmp_path, capsys):
    """--save-freq, --benchmark-data and the official launch flags of either script mean the same in finetune.py
    (they were pre-training flags only, the launch list was two lists)."""
    out = tmp_path / 'ft'
    finetune.main([*FT, '--epochs', '2', '--save-freq', '1', '--output-dir', str(out), '--start_epoch', '3',
                   '--auto_resume'])
    assert {'checkpoint-0.pth', 'checkpoint-1.pth', 'checkpoint-last.pth'} <= set(os.listdir(out))
    assert 'official launch/logging flags ignored: --auto_resume, --start_epoch' in capsys.readouterr().out
    row = finetune.main([*FT, '--benchmark-data', '2', '--output-dir', str(tmp_path / 'bench')])
    assert row['method'] == 'finetune' and row['batch'] == 32 and row['img_per_s'] > 0


def test_the_start_line_says_where_each_value_came_from(tmp_path, capsys):
    """Each value the command line did not give is named with its source, and holds that source's value."""
    torch.manual_seed(0)
    given = dict(res=32, batch_size=8, decoder_dim=32, max_steps=1, synthetic_size=16, num_workers=0)
    argv = [x for k, v in given.items() for x in (f'--{k.replace("_", "-")}', str(v))]
    fastmim.main([*argv, '--output-dir', str(tmp_path / 'pre'), '--nb_classes', '5'])
    text = capsys.readouterr().out
    config, groups = start_lines(text)
    assert 'note: official launch/logging flags ignored: --nb_classes' in text and 'sources' not in config
    assert set(groups) == {'flag', 'smoke', 'recipe(vit_tiny)', 'default'}  # the smoke preset sizes the ViT
    assert {'patch_size', 'embed_dim', 'depth', 'num_heads'} <= set(groups['smoke'])
    assert set(groups['flag']) == {*given, 'output_dir'} and all(config[k] == v for k, v in given.items())
    assert {'model', 'epochs', 'blr'} <= set(groups['smoke'])
    assert all(config[k] == fastmim.SMOKE[k] for k in groups['smoke'])
    assert {'mask_size', 'decoder_depth'} <= set(groups['recipe(vit_tiny)'])
    assert all(config[k] == fastmim.DEFAULTS['vit_tiny'][k] for k in groups['recipe(vit_tiny)'])
    assert config['accum_iter'] == 1 and {'accum_iter', 'mask_ratio', 'weight_decay'} <= set(groups['default'])
    finetune.main([*FT, '--mode', 'linear', '--recipe', 'hpm', '--max-steps', '1',
                   '--output-dir', str(tmp_path / 'lin')])
    config, groups = start_lines(capsys.readouterr().out)
    recipe, mode = finetune.RECIPES['hpm']['linear']['all'], finetune.MODE_DEFAULTS['linear']
    assert set(groups['recipe(hpm linear)']) == set(recipe) - set(finetune.SMOKE) - {'batch_size'}  # the flag
    assert all(config[k] == recipe[k] for k in groups['recipe(hpm linear)'])
    assert all(config[k] == mode[k] for k in groups['mode(linear)']) and 'min_lr' in groups['mode(linear)']
    assert all(config[k] == finetune.SMOKE[k] for k in groups['smoke']) and 'epochs' in groups['smoke']
