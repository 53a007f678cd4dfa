"""Runs that know themselves: numbers checked before anything is written, resume checks, the log's
bookkeeping, one run per output folder, bad data named, a signal to the whole process group."""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import common
import fastmim
import hpm
from test_common import log_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--model', 'vit_tiny', '--num-workers', '0', '--res', '32', '--batch-size', '16',
        '--warmup-epochs', '1', '--log-freq', '1', '--decoder-dim', '32', '--synthetic-size', '64',
        '--epochs', '2', '--eval-knn', '0']  # the k-NN monitor off: these logs hold start/end events only


def run(out, *argv):
    """fastmim.py on 64 built-in images: 4 steps an epoch, 8 in all."""
    return fastmim.main(['--output-dir', str(out), *TINY, *argv])


def events(out):
    """The 'start' and 'end' rows of a run's log."""
    return [r for r in map(json.loads, open(out / 'log.jsonl')) if 'event' in r]


@pytest.mark.parametrize('argv', [
    ['--save-freq', '0'], ['--batch-size', '0'], ['--batch-size', '-8'], ['--accum-iter', '0'],
    ['--log-freq', '0'], ['--res', '0'], ['--res', '-64'], ['--blr', '-1'], ['--epochs', '0'],
    ['--num-workers', '-1'], ['--mask-ratio', '0'], ['--max-steps', '0'], ['--warmup-epochs', '-1'],
    ['--rrc-scale', '0.9', '0.1'], ['--synthetic-size', '0'], ['--decoder-depth', '-1'],
])
def test_a_bad_number_is_one_line_that_names_it_and_nothing_is_written(tmp_path, capsys, argv):
    out = tmp_path / 'out'
    with pytest.raises(SystemExit) as e:
        run(out, *argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f'error: {" ".join(argv)} is out of range; use ')
    assert err.count('\n') == 1 and not out.exists()


def test_clip_grad_zero_or_below_is_off():
    args = fastmim.get_args(['--clip-grad', '-1', '--num-workers', '0'])
    assert not args.clip_grad and fastmim.get_args(['--clip-grad', '3']).clip_grad == 3.0
    # a method that clips by default (HPM at 5) is turned off by the flag too
    assert hpm.get_args([]).clip_grad == 5.0 and not hpm.get_args(['--clip-grad', '0']).clip_grad


class Hooked(torch.nn.Module):
    """A model with every hook of the loop, a data attribute and nn.Module's own near-names."""

    takes_labels, res = False, 32

    def __init__(self):
        super().__init__()
        self.lin, self.unevaluated = torch.nn.Linear(2, 2), True  # data, not a misspelt evaluate

    def forward(self, imgs, keys=None):
        return {'loss': self.lin(imgs).sum()}

    def no_weight_decay(self, name, param):
        return False

    def make_optimizer(self, args, fused):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_epoch(self, epoch):
        return None

    def after_step(self):
        pass

    def evaluate(self, epoch):
        return {}

    def picture(self, imgs, out):
        return torch.zeros(3, 2, 2, dtype=torch.uint8)

    def extra_state(self):
        return {}

    def load_extra_state(self, checkpoint):
        pass

    def describe(self):
        return 'hooked'

    def noise_len(self):
        return 0


@pytest.mark.parametrize('typo', ['on_epochs', 'after_steps', 'extra_states', 'picutre', 'noise_length',
                                  'take_labels'])
def test_a_misspelt_hook_is_one_line_naming_the_hooks_before_anything_runs(capsys, typo):
    """A hook the loop would never call, because of a typo, is refused in one line (exit 2); the empty args show
    that nothing else was read first. The real hooks, nn.Module's names and data attributes pass."""
    common.check_hooks(Hooked())
    Typo = type('Typo', (Hooked,), {typo: (lambda self, *a: None) if typo != 'take_labels' else True})
    with pytest.raises(SystemExit) as e:
        common.run_main(lambda argv: common.train(Typo(), argparse.Namespace()), [])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1
    hook = {'on_epochs': 'on_epoch', 'after_steps': 'after_step', 'extra_states': 'extra_state',
            'picutre': 'picture', 'noise_length': 'noise_len', 'take_labels': 'takes_labels'}[typo]
    assert err.startswith(f'error: Typo.{typo} looks like the hook {hook},') and '(hooks: no_weight_decay, ' in err


def test_resume_refuses_another_run_and_a_finished_max_steps_run_stays_finished(tmp_path, capsys):
    run(tmp_path, '--max-steps', '2')
    with pytest.raises(SystemExit) as e:
        run(tmp_path, '--batch-size', '8')
    err = capsys.readouterr().err
    assert e.value.code == 2 and '--batch-size 16 -> 8' in err and 'steps per epoch 4 -> 8' in err
    run(tmp_path, '--max-steps', '2')  # the same finished run again: nothing more is trained
    assert 'already at --max-steps 2' in capsys.readouterr().out
    assert torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)['step'] == 2
    for bad in (torch.zeros(3), {'blocks.0.norm1.weight': torch.ones(2)}):  # a tensor, a state dict
        torch.save(bad, tmp_path / 'weights.pth')
        with pytest.raises(SystemExit):
            run(tmp_path / 'other', '--resume', str(tmp_path / 'weights.pth'))
        assert 'is not a training checkpoint' in capsys.readouterr().err


def test_the_log_after_a_crash_holds_each_step_once_and_names_its_runs(tmp_path):
    run(tmp_path, '--max-steps', '3', '--log-freq', '2')  # rows at 2 and 3 (the partial interval)
    with open(tmp_path / 'log.jsonl', 'a') as f:  # a run killed after its checkpoint had logged 4, 5
        f.write(json.dumps({'step': 4, 'loss': 9.0}) + '\n' + json.dumps({'step': 5, 'loss': 9.0}) + '\n')
    run(tmp_path)
    assert [r['step'] for r in log_rows(tmp_path / 'log.jsonl')] == [2, 3, 4, 5, 6, 7, 8]
    assert all(r['loss'] != 9.0 for r in log_rows(tmp_path / 'log.jsonl'))
    ev = events(tmp_path)
    assert [(r['event'], r.get('reason')) for r in ev] == [('start', None), ('end', 'max_steps'),
                                                           ('start', None), ('end', 'done')]
    assert ev[2]['step'] == 3 and ev[3]['checkpoint'].endswith('checkpoint-last.pth')
    runs = {r['run'] for r in map(json.loads, open(tmp_path / 'log.jsonl')) if 'run' in r}
    assert len(runs) == 2
    pic, ckpt = (os.path.getmtime(tmp_path / f) for f in ('picture-last.png', 'checkpoint-last.pth'))
    assert pic >= ckpt


def test_a_second_run_into_the_same_folder_is_refused(tmp_path, capsys):
    holder = common.RunLog(str(tmp_path), 0, argparse.Namespace(method='fastmim', model='x'), None)
    try:
        with pytest.raises(SystemExit) as e:
            run(tmp_path, '--max-steps', '1')
        assert e.value.code == 2 and 'another run is writing to' in capsys.readouterr().err
    finally:
        holder.close('done', 0, '')
    run(tmp_path, '--max-steps', '1')  # free again


def png_folder(root, classes, n=4, bad=()):
    """Class folders of small PNGs (and unreadable files named in `bad`)."""
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(n if c else 0):
            Image.new('RGB', (40, 40), (i * 20, 100, 200)).save(root / c / f'{i}.png')
    for name in bad:
        (root / name).write_bytes(b'not an image')


def test_bad_data_is_named_in_one_line(tmp_path, capsys):
    (tmp_path / 'file.txt').write_text('x')
    with pytest.raises(SystemExit):
        run(tmp_path / 'o1', '--data-path', str(tmp_path / 'file.txt'))
    assert 'is a file' in capsys.readouterr().err
    png_folder(tmp_path / 'd', ['a', 'b'], n=8)
    os.makedirs(tmp_path / 'd' / 'empty')  # one empty class folder among full ones: trained, named
    run(tmp_path / 'o2', '--data-path', str(tmp_path / 'd'), '--max-steps', '1')
    assert 'hold no image: empty' in capsys.readouterr().out
    png_folder(tmp_path / 'bad', ['a'], n=0, bad=('a/x.png', 'a/y.png'))
    with pytest.raises(SystemExit):
        run(tmp_path / 'o3', '--data-path', str(tmp_path / 'bad'), '--batch-size', '1',
            '--skip-bad-images')
    err = capsys.readouterr().err
    assert 'error: none of the 2 images can be read' in err


def test_sigterm_to_the_process_group_with_workers_saves_and_the_same_command_continues(tmp_path):
    """Schedulers signal every process of the job: the data workers leave it to the main process,
    which finishes its step, saves and exits 0; the same command carries on exactly."""
    argv = ['--output-dir', str(tmp_path / 'b'), *TINY, '--synthetic-size', '512', '--epochs', '1',
            '--num-workers', '2']
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'fastmim.py'), *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    log = tmp_path / 'b' / 'log.jsonl'
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and 'stopped by a signal' in out, err[-2000:]
    assert 2 <= torch.load(tmp_path / 'b' / 'checkpoint-last.pth', weights_only=True)['step'] < 32
    torch.use_deterministic_algorithms(True)
    try:
        fastmim.main([*argv[:-1], '0'])  # the same command (0 workers: the same data) continues
        fastmim.main(['--output-dir', str(tmp_path / 'a'), *argv[2:-1], '0'])  # uninterrupted
    finally:
        torch.use_deterministic_algorithms(False)
    assert [r['step'] for r in log_rows(log)] == list(range(1, 33))
    a, b = (torch.load(tmp_path / d / 'checkpoint-last.pth', weights_only=True)['model'] for d in 'ab')
    assert all(torch.equal(a[k], b[k]) for k in a)


FT = ['--model', 'vit_tiny', '--patch-size', '8', '--embed-dim', '32', '--depth', '2', '--num-heads', '2',
      '--res', '32', '--num-workers', '0']


@pytest.mark.parametrize('argv', [
    ['--layer-decay', '0'], ['--drop-path', '1.5'], ['--smoothing', '1'], ['--epochs', '0'],
    ['--batch-size', '-1'], ['--reprob', '2'], ['--model-ema-decay', '1'], ['--blr', '0'],
    ['--log-freq', '0'], ['--num-workers', '-2'],
])
def test_finetune_refuses_a_bad_number_in_one_line(tmp_path, capsys, argv):
    import finetune
    with pytest.raises(SystemExit) as e:
        finetune.main([*FT, '--output-dir', str(tmp_path / 'out'), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f'error: {" ".join(argv)} is out of range; use ')
    assert not (tmp_path / 'out').exists()


def test_finetune_names_a_tensor_file_and_a_missing_export_folder(tmp_path, capsys):
    import finetune
    torch.save(torch.zeros(3), tmp_path / 't.pth')
    with pytest.raises(SystemExit):
        finetune.main([*FT, '--ckpt', str(tmp_path / 't.pth'), '--output-dir', str(tmp_path)])
    assert 'holds a Tensor, not a checkpoint' in capsys.readouterr().err
    torch.save({'model': common.VisionTransformer(32, 8, 32, 2, 2).state_dict()}, tmp_path / 'v.pth')
    with pytest.raises(SystemExit):
        finetune.main([*FT, '--ckpt', str(tmp_path / 'v.pth'), '--export-timm',
                       str(tmp_path / 'no' / 'such' / 'x.pth')])
    assert 'its folder does not exist' in capsys.readouterr().err
