"""Preemption, atomic checkpoints, the NaN guard and bad input: nothing already saved is lost."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import common
import efficient_mae
import fastmim
import localmim
import mff
from test_common import log_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--model', 'vit_tiny', '--num-workers', '0', '--res', '32', '--batch-size', '16', '--warmup-epochs', '1', '--log-freq', '1',
        '--decoder-dim', '32']


def run(out, *argv):
    return fastmim.main(['--output-dir', str(out), *TINY, *argv])


def rows(out):
    return log_rows(out / 'log.jsonl')


def test_sigterm_saves_and_the_same_command_continues(tmp_path):
    argv = ['--output-dir', str(tmp_path), *TINY, '--synthetic-size', '512', '--epochs', '1']
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'fastmim.py'), *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / 'log.jsonl'
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.02)  # short: the run must still be going when the signal lands (~1 s left)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert 'stopped by a signal' in out
    step = torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)['step']
    assert 2 <= step < 32
    fastmim.main(argv)  # the same command picks up where it stopped
    steps = [r['step'] for r in rows(tmp_path)]
    assert steps == list(range(1, 33))


@pytest.mark.parametrize('script, extra', [
    (mff, ['--res', '32', '--fuse-layers', 'L4', '--target', 'lowfreq', '--decoder-depth', '1']),
    (localmim, ['--res', '64']),
    (efficient_mae, ['--res', '64', '--p2dist-samples', '4', '--decoder-depth', '1']),
])
def test_stopped_mid_epoch_and_resumed_equals_uninterrupted(tmp_path, script, extra):
    """MFF, LocalMIM, Efficient MAE (FastMIM, HPM and finetune have their own): 3 steps, stop, the same command
    with more steps: the same losses and the same weights as one straight run."""
    argv = ['--num-workers', '0', '--synthetic-size', '32', '--batch-size', '8', '--epochs', '2',
            '--warmup-epochs', '1', '--log-freq', '1', '--decoder-dim', '32', '--decoder-heads', '2', *extra]
    torch.use_deterministic_algorithms(True)  # bit-equal: the same kernels, step for step
    try:
        script.main([*argv, '--output-dir', str(tmp_path / 'a'), '--max-steps', '6'])
        script.main([*argv, '--output-dir', str(tmp_path / 'b'), '--max-steps', '3'])
        script.main([*argv, '--output-dir', str(tmp_path / 'b'), '--max-steps', '6'])
    finally:
        torch.use_deterministic_algorithms(False)
    a, b = (torch.load(tmp_path / d / 'checkpoint-last.pth', weights_only=True) for d in 'ab')
    assert a['step'] == b['step'] == 6 and all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    assert [r['loss'] for r in rows(tmp_path / 'a')] == [r['loss'] for r in rows(tmp_path / 'b')]


def test_crash_during_save_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    run(tmp_path, '--synthetic-size', '64', '--epochs', '1')
    good = torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        with open(f, 'wb') as fh:
            fh.write(b'truncated')
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', dying_save)
    with pytest.raises(OSError):
        run(tmp_path, '--synthetic-size', '64', '--epochs', '2')
    monkeypatch.setattr(torch, 'save', real_save)
    again = torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)
    assert again['step'] == good['step'] == 4


def nan_after(monkeypatch, first_bad, count=10 ** 9):
    """Make FastMIM's training loss NaN on forward calls first_bad .. first_bad+count-1 (0-based)."""
    real = fastmim.FastMIM.forward
    calls = []

    def forward(self, imgs, mask=None, keys=None):
        out = real(self, imgs, mask, keys)
        if not self.training:  # the picture's forward does not count
            return out
        calls.append(1)
        if first_bad <= len(calls) - 1 < first_bad + count:
            out['loss'] = out['loss'] * float('nan')
        return out
    monkeypatch.setattr(fastmim.FastMIM, 'forward', forward)


def test_nan_stops_with_step_method_and_last_checkpoint(tmp_path, monkeypatch, capsys):
    nan_after(monkeypatch, 5)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, '--synthetic-size', '64', '--epochs', '3')
    err = capsys.readouterr().err
    assert e.value.code == 1
    assert 'non-finite loss at step 5' in err and 'fastmim' in err and str(tmp_path / 'checkpoint-last.pth') in err
    assert torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)['step'] == 4  # the good state stays
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the preemption handler is gone with the run


def test_skip_nonfinite_skips_k_steps(tmp_path, monkeypatch):
    nan_after(monkeypatch, 2, count=2)
    run(tmp_path, '--synthetic-size', '128', '--epochs', '1', '--skip-nonfinite', '2', '--max-steps', '4')
    ckpt = torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)
    assert ckpt['step'] == 4 and all(torch.isfinite(v).all() for v in ckpt['model'].values())


def make_folder(root, n=8, bad=None):
    for c in ('a', 'b'):
        os.makedirs(root / c, exist_ok=True)
        for i in range(n // 2):
            Image.new('RGB', (40, 40), (i * 20, 100, 200)).save(root / c / f'{i}.png')
    if bad:
        (root / 'a' / bad).write_bytes(b'not a png at all')


def test_unreadable_image_is_named_or_skipped(tmp_path, capsys):
    make_folder(tmp_path / 'data', bad='broken.png')
    with pytest.raises(SystemExit) as e:
        run(tmp_path / 'out', '--data-path', str(tmp_path / 'data'), '--batch-size', '9', '--epochs', '1')
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'broken.png' in err and '--skip-bad-images' in err
    run(tmp_path / 'out2', '--data-path', str(tmp_path / 'data'), '--batch-size', '9', '--epochs', '1',
        '--skip-bad-images')
    assert 'broken.png' in capsys.readouterr().err
    assert torch.load(tmp_path / 'out2' / 'checkpoint-last.pth', weights_only=True)['step'] == 1


@pytest.mark.parametrize('argv,msg', [
    (['--resume', '/nonexistent/ckpt.pth'], 'does not exist'),
    (['--data-path', 'EMPTY'], 'no images found'),
    (['--synthetic-size', '8'], 'fewer than one step'),
])
def test_bad_arguments(tmp_path, capsys, argv, msg):
    argv = [str(tmp_path / 'empty') if a == 'EMPTY' else a for a in argv]
    os.makedirs(tmp_path / 'empty', exist_ok=True)
    with pytest.raises(SystemExit) as e:
        run(tmp_path / 'out', *argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and err.startswith('error: ')


def test_checkpoint_of_another_size_lists_keys(tmp_path, capsys):
    run(tmp_path, '--synthetic-size', '32', '--epochs', '1')
    with pytest.raises(SystemExit):
        run(tmp_path / 'other', '--resume', str(tmp_path / 'checkpoint-last.pth'), '--decoder-depth', '2',
            '--synthetic-size', '32', '--epochs', '2')
    err = capsys.readouterr().err
    assert 'does not match' in err and 'decoder_blocks.1' in err


def test_worker_crash_tears_the_job_down(tmp_path):
    make_folder(tmp_path / 'data', n=16, bad='broken.png')
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           os.path.join(ROOT, 'fastmim.py'), '--output-dir', str(tmp_path / 'out'), *TINY,
           '--data-path', str(tmp_path / 'data'), '--batch-size', '4', '--epochs', '1']
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0 and 'broken.png' in proc.stderr
