"""Two gloo processes on the CPU equal one process at the same global batch (STYLE: DDP runs), for two methods,
and for FastMIM-P on Swin across a resolution switch. The only subprocess tests of the suite."""
import json
import os
import subprocess
import sys

import pytest
import torch

import fastmim
import hpm
from test_common import log_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ['--num-workers', '0', '--synthetic-size', '64', '--res', '32', '--epochs', '1', '--warmup-epochs', '1',
          '--log-freq', '1', '--max-steps', '3', '--eval-knn', '1', '--blr', '1.5e-3']  # lr: Adam's round-off
# FastMIM-P on a tiny Swin: 4 steps at 64 px (window 2, 3x3 tables), then the switch to 96 px (window 3, 5x5
# tables) and 2 steps there
SWIN_P = ['--model', 'swin_tiny', '--res-schedule', '64:1,96:1', '--epochs', '2', '--max-steps', '6',
          '--window-size', '2', '--decoder-dim', '32', '--decoder-depth', '1', '--embed-dim', '8', '--depth', '1,1,1,1',
          '--num-heads', '1,1,2,2']


def torchrun(script, out, *argv, nproc=2):
    """Run `script` under torch.distributed.run with nproc CPU processes; returns the completed process."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(nproc),
           os.path.join(ROOT, script), '--output-dir', str(out), *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def losses(out):
    return [r['loss'] for r in log_rows(out / 'log.jsonl')]


def knn_rows(out):
    """(step, knn_cls, knn_avg) of the k-NN monitor's rows."""
    rows = [json.loads(line) for line in open(out / 'log.jsonl')]
    return [(r['step'], r['knn_cls'], r['knn_avg']) for r in rows if r.get('event') == 'knn']


@pytest.mark.parametrize('module,extra', [
    (fastmim, []),
    (hpm, ['--epochs', '2', '--max-steps', '6']),
    (fastmim, SWIN_P),  # the switch re-wraps DDP around resized tables
], ids=['fastmim', 'hpm', 'fastmim_p_swin'])
def test_two_processes_equal_one(tmp_path, module, extra):
    proc = torchrun(module.__name__ + '.py', tmp_path / 'ddp', *COMMON, '--batch-size', '8', *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    module.main(['--output-dir', str(tmp_path / 'one'), *COMMON, '--batch-size', '16', *extra])
    a, b = losses(tmp_path / 'ddp'), losses(tmp_path / 'one')
    assert len(a) == len(b) >= 3
    # gloo sums the two halves' gradients in another order than one process: fp32 round-off over a few steps
    assert all(abs(x - y) <= 1e-5 * max(1, abs(y)) for x, y in zip(a, b)), (a, b)
    # the k-NN monitor: each rank extracts half of the 64 bank and 64 query images; the weights
    # agree to round-off, so a vote may differ only for a query on a near-tie: one query, 100/64
    ka, kb = knn_rows(tmp_path / 'ddp'), knn_rows(tmp_path / 'one')
    assert [r[0] for r in ka] == [r[0] for r in kb] and len(kb) >= 2 and kb[0][0] == 0
    assert all((x is None) == (y is None) and (x is None or abs(x - y) <= 100 / 64)
               for ra, rb in zip(ka, kb) for x, y in zip(ra[1:], rb[1:])), (ka, kb)
    ca = torch.load(tmp_path / 'ddp' / 'checkpoint-last.pth', weights_only=True)
    cb = torch.load(tmp_path / 'one' / 'checkpoint-last.pth', weights_only=True)
    assert ca['model'].keys() == cb['model'].keys()
    assert all(torch.allclose(ca['model'][k], cb['model'][k], atol=1e-5) for k in ca['model'])
    if 'model_ema' in cb:  # HPM's teacher, updated on every rank alike
        assert all(torch.allclose(ca['model_ema'][k], cb['model_ema'][k], atol=1e-5) for k in cb['model_ema'])
    assert proc.stdout.count('config:') == 1  # rank 0 prints, the other rank stays quiet
