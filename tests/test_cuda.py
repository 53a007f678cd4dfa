"""On a CUDA GPU (skipped without one): python -m pytest -q tests/test_cuda.py

One bf16 step of each method with no host-device sync (torch.cuda.set_sync_debug_mode('error'): an
.item(), .tolist(), nonzero, boolean index or blocking copy to the CPU raises), the memory of each
default configuration against the README's table, --benchmark of each method, and the advice line
of a run too big for its card. The README's table is also parsed without a GPU, so that a change
to it that these tests cannot read fails everywhere.
"""
import importlib
import json
import os
import re

import pytest
import torch

import common
import fastmim
import finetune
import hpm

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md')

# each method's smoke preset (vit_tiny, 64 px), and the two Swin paths at 128 px
METHODS = {
    'fastmim': ['fastmim'],
    'fastmim_swin': ['fastmim', '--model', 'swin_tiny', '--res', '128'],
    'mae': ['hpm', '--method', 'mae'],
    'hpm': ['hpm'],
    'localmim': ['localmim'],
    'localmim_swin': ['localmim', '--model', 'swin_tiny', '--res', '128', '--window-size', '4'],
    'mff': ['mff'],
    'efficient_mae': ['efficient_mae'],
}


def build(name, tmp_path, *argv):
    """(module, args, model on the GPU) of a METHODS entry with more flags."""
    script, *rest = METHODS[name]
    module = importlib.import_module(script)
    args = module.get_args([*rest, '--output-dir', str(tmp_path), '--num-workers', '0', *argv])
    torch.manual_seed(0)
    return module, args, module.build_model(args).to('cuda')


def stepper(model, args, batch):
    """A function that runs one bf16 training step (forward, backward, AdamW, after_step) of
    `model` on a fixed random batch at the model's resolution, as common.train does."""
    device = torch.device('cuda')
    res = getattr(model, 'res', args.res)
    imgs, keys = torch.randn(batch, 3, res, res, device=device), torch.arange(batch)
    args.lr = args.blr * batch / 256
    opt = common.make_optimizer(model, args, device)
    scaler = torch.amp.GradScaler('cuda', enabled=False)

    def step():
        """One step."""
        with torch.autocast('cuda', dtype=torch.bfloat16):
            out = model(imgs, keys=keys)
        scaler.scale(out['loss']).backward()
        common.optimizer_step(opt, scaler, model.parameters(), args.clip_grad)
        if hasattr(model, 'after_step'):
            model.after_step()
    return step


# ----------------------------------------------------------------------------- no host-device sync

@cuda
@pytest.mark.parametrize('name', METHODS)
def test_a_bf16_step_at_the_middle_epoch_syncs_nothing(name, tmp_path):
    # the model's step alone, at the epoch where HPM's teacher picks the hard patches
    _, args, model = build(name, tmp_path)
    if hasattr(model, 'on_epoch'):
        model.on_epoch(args.epochs // 2)
    step = stepper(model, args, 8)
    step()  # the first step creates AdamW's moments and the teacher's copy on the GPU
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@cuda
@pytest.mark.parametrize('name', METHODS)
def test_a_step_of_the_training_loop_syncs_nothing(name, tmp_path):
    # common.train's own step: from the second forward to the third (backward, the finite check,
    # AdamW, after_step, the next batch's copy); the log rows and the save come later
    _, args, model = build(name, tmp_path, '--batch-size', '6', '--max-steps', '3',
                           '--log-freq', '1000')
    forwards = [0]

    def hook(module, inputs):
        """Turn the sync check on for the second training forward, off at the third (6 images:
        not the memory estimate's 2 and 4 or the picture's 8)."""
        if inputs[0].shape[0] != 6:
            return
        forwards[0] += 1
        torch.cuda.set_sync_debug_mode(0)
        if forwards[0] == 2:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode('error')
    model.register_forward_pre_hook(hook)
    try:
        common.train(model, args)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert forwards[0] == 3


# ----------------------------------------------------------------------------- memory

def memory_rows():
    """The README's memory table: [(script, flags, MiB per image, fixed GiB)]."""
    text = open(README).read()
    section = text.split('\n### Memory\n', 1)[1].split('\n#', 1)[0]
    return [(script, flags.split(), float(per), float(fixed)) for script, flags, per, fixed in re.findall(
        r'^\| `(\w+)\.py ([^`]*)` \| \d+² \| \d+ \| ([\d.]+) \| ([\d.]+) \|', section, re.M)]


def test_the_readme_memory_table_names_every_method():
    rows = memory_rows()
    assert {r[0] for r in rows} == {'fastmim', 'hpm', 'localmim', 'mff', 'efficient_mae'} and len(rows) == 8
    assert all(r[2] > 0 and r[3] > 0 for r in rows)


@cuda
@pytest.mark.parametrize('row', range(8))
def test_memory_of_each_default_configuration_is_the_readme_s(row, tmp_path):
    # the table is an estimate (bytes saved for backward + 16 B per parameter) that leaves out the
    # backward's transient buffers and the allocator's rounding: 25 % either way
    script, flags, per_mib, fixed_gib = memory_rows()[row]
    module = importlib.import_module(script)
    (tmp_path / 'data' / 'a').mkdir(parents=True)  # the defaults are those of a --data-path run
    args = module.get_args(['--data-path', str(tmp_path / 'data'), '--output-dir', str(tmp_path), *flags])
    torch.manual_seed(0)
    model = module.build_model(args).to('cuda')
    batch = 64  # fits a 16 GB card in every row
    step = stepper(model, args, batch)
    step()  # AdamW's moments exist from here on, as in every later step
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    expected = fixed_gib * 2 ** 30 + per_mib * 2 ** 20 * batch
    assert abs(peak - expected) <= 0.25 * expected, (script, flags, peak / 2 ** 30, expected / 2 ** 30)


@cuda
def test_a_run_too_big_for_its_card_says_so_at_start(tmp_path, monkeypatch, capsys):
    _, args, model = build('fastmim', tmp_path)
    est = common.estimate_memory(model, args.res, torch.device('cuda'), torch.bfloat16)
    real = torch.cuda.get_device_properties

    class Small:
        """The real card's properties, with room for 20 images of the smoke preset's 64."""
        total_memory = (est['fixed'] + 20 * est['per_image']) / 0.9

        def __init__(self, device):
            self.props = real(device)

        def __getattr__(self, name):
            return getattr(self.props, name)
    monkeypatch.setattr(torch.cuda, 'get_device_properties', Small)
    fastmim.main(['--output-dir', str(tmp_path / 'run'), '--num-workers', '0', '--max-steps', '1'])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('warning: --batch-size')]
    assert len(lines) == 1 and lines[0].endswith('use --batch-size 16 --accum-iter 4 (the same 64 images '
                                                 'per step and GPU)')


# ----------------------------------------------------------------------------- --benchmark

@cuda
@pytest.mark.parametrize('name', [*METHODS, 'finetune'])
def test_benchmark_json_on_cuda(name, tmp_path, capsys):
    if name == 'finetune':  # its EMA copy stayed on the CPU once
        row = finetune.main(['--benchmark', '2', '--model', 'vit_tiny', '--res', '64', '--batch-size', '32',
                             '--model-ema', '--num-workers', '0', '--output-dir', str(tmp_path)])
    else:
        script, *rest = METHODS[name]
        row = importlib.import_module(script).main([*rest, '--benchmark', '2', '--num-workers', '0',
                                                    '--output-dir', str(tmp_path)])
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-1]) == row
    assert (row['device'], row['dtype'], row['attention'], row['fused_adamw']) == ('cuda', 'bfloat16', 'sdpa', True)
    assert row['img_per_s'] > 0 and row['flops_per_img'] > 0 and row['est_mem_mb'] > 0
    assert row['peak_mem_mb'] > 0 and torch.backends.cuda.matmul.allow_tf32  # the run's settings
    if name == 'hpm':
        assert row['epoch'] == hpm.get_args([]).epochs // 2  # the teacher's pass is timed
