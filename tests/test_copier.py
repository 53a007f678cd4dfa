"""The copier's path: one method file plus common.py run on their own, and a model trains without our loop."""
import os
import shutil
import subprocess
import sys
import textwrap

import torch

import fastmim
from common import VisionTransformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ('fastmim', 'hpm', 'localmim', 'mff', 'efficient_mae')


def test_each_method_file_runs_beside_common_alone(tmp_path):
    """Copy <method>.py + common.py into an empty folder per method; in a fresh interpreter that can see
    only that folder, run two steps of the smoke preset (smaller data) and find the checkpoint."""
    for m in METHODS:
        os.makedirs(tmp_path / m)
        for f in (f'{m}.py', 'common.py'):
            shutil.copy(os.path.join(ROOT, f), tmp_path / m / f)
    driver = textwrap.dedent(f'''
        import importlib, os, sys
        for m in {METHODS!r}:
            os.chdir(m)
            sys.path.insert(0, os.getcwd())
            sys.modules.pop('common', None)
            mod = importlib.import_module(m)
            assert os.path.dirname(mod.__file__) == os.getcwd() == os.path.dirname(sys.modules['common'].__file__)
            mod.main(['--max-steps', '2', '--synthetic-size', '64', '--batch-size', '16',
                      '--num-workers', '0', '--output-dir', 'out'])
            assert os.path.isfile('out/checkpoint-last.pth'), m
            sys.path.pop(0)
            os.chdir('..')
    ''')
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env['OMP_NUM_THREADS'] = '1'
    proc = subprocess.run([sys.executable, '-c', driver], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_model_trains_in_a_plain_loop():
    """FastMIM's ViT in ten lines of plain PyTorch, no common.train: the loss falls on a fixed batch."""
    torch.manual_seed(0)
    model = fastmim.FastMIM(VisionTransformer(32, 8, 32, 2, 2), mask_size=16, decoder_dim=32)
    imgs, keys = torch.randn(8, 3, 32, 32), torch.arange(8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = model(imgs, keys=keys)['loss']  # the same masks every step: keys fix the noise
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
