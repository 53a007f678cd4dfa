"""Two-process torchrun (gloo, CPU) equals one process at the same global batch; only rank 0 writes."""
import json
import os
import subprocess
import sys

import torch

import fastmim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ['--num-workers', '0', '--synthetic-size', '64', '--res', '32', '--epochs', '1', '--warmup-epochs', '1',
          '--log-freq', '1', '--max-steps', '3']


def torchrun(script, out, *argv, nproc=2):
    """Run `script` under torch.distributed.run with nproc CPU processes; returns the completed process."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(nproc),
           os.path.join(ROOT, script), '--output-dir', str(out), *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def losses(out):
    return [json.loads(line)['loss'] for line in open(out / 'log.jsonl')]


def test_fastmim_two_processes_equal_one(tmp_path):
    proc = torchrun('fastmim.py', tmp_path / 'ddp', *COMMON, '--batch-size', '8')
    assert proc.returncode == 0, proc.stderr[-3000:]
    fastmim.main(['--output-dir', str(tmp_path / 'one'), *COMMON, '--batch-size', '16'])
    a, b = losses(tmp_path / 'ddp'), losses(tmp_path / 'one')
    assert len(a) == len(b) == 3
    assert all(abs(x - y) <= 1e-5 * max(1, abs(y)) for x, y in zip(a, b)), (a, b)
    wa = torch.load(tmp_path / 'ddp' / 'checkpoint-last.pth', weights_only=True)['model']
    wb = torch.load(tmp_path / 'one' / 'checkpoint-last.pth', weights_only=True)['model']
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    assert proc.stdout.count('config:') == 1  # rank 0 prints, the other rank stays quiet
