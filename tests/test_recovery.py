"""A run that ends badly still ends, and says why; the next run recovers: a requeued --resume never
rewinds, a torn log line or a truncated picture never blocks, odd but harmless input is accepted."""
import argparse
import json
import os
import signal
import subprocess
import sys

import numpy
import pytest
import torch
from PIL import Image

import common
import finetune
from test_common import log_rows
from test_run_checks import ROOT, TINY, events, run  # the same tiny fastmim run


def start(argv, **kw):
    """fastmim.py in its own process group (so that a hung run and its workers can be killed)."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, os.path.join(ROOT, 'fastmim.py'), *argv], env=env,
                            start_new_session=True, **kw)


def finish(proc, timeout=120):
    """Wait for the run to exit; a hang is killed with its data workers, and fails the test."""
    try:
        out = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the workers ignore SIGTERM
        proc.communicate()
        pytest.fail(f'the run did not exit within {timeout} s')
    return out


def unreadable_folder(tmp_path):
    """8 readable PNGs and one text file named .jpg in one class folder -> the --data-path."""
    os.makedirs(tmp_path / 'data' / 'a')
    for i in range(8):
        Image.new('RGB', (40, 40), (i * 20, 100, 200)).save(tmp_path / 'data' / 'a' / f'{i}.png')
    (tmp_path / 'data' / 'a' / 'bad.jpg').write_text('junk')
    return str(tmp_path / 'data')


def assert_end_names_the_image(out):
    """The log's end row: reason error, the UnreadableImage line naming the file."""
    end = events(out)[-1]
    assert end['reason'] == 'error' and end['error'].startswith('UnreadableImage: cannot read image')
    assert 'bad.jpg' in end['error'] and '\n' not in end['error']


def test_an_unreadable_image_ends_the_run_and_the_log_names_it(tmp_path, capsys):
    """Without workers, in-process: the one-line error, exit 2, the error in the end row."""
    with pytest.raises(SystemExit) as e:
        run(tmp_path / 'out', '--data-path', unreadable_folder(tmp_path), '--batch-size', '9')
    assert e.value.code == 2 and 'bad.jpg' in capsys.readouterr().err.splitlines()[-1]
    assert_end_names_the_image(tmp_path / 'out')


def test_an_unreadable_image_ends_the_process_with_its_workers(tmp_path):
    """With 2 data workers: the process ends (they ignore the SIGTERM multiprocessing sends them
    at exit, and it then waits for them), with the one-line error and exit 2."""
    proc = start(['--output-dir', str(tmp_path / 'out'), *TINY, '--data-path',
                  unreadable_folder(tmp_path), '--batch-size', '9', '--num-workers', '2'],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = finish(proc)
    assert proc.returncode == 2 and 'bad.jpg' in err.splitlines()[-1], err[-2000:]
    assert_end_names_the_image(tmp_path / 'out')


def test_a_closed_stdout_pipe_ends_the_run_with_its_data_workers(tmp_path):
    """`python fastmim.py ... 2>&1 | head -c N`: once head has gone, the next write fails; the run
    logs the error and exits instead of waiting for its workers forever."""
    out = tmp_path / 'out'
    proc = start(['--output-dir', str(out), *TINY, '--synthetic-size', '512', '--num-workers', '2'],
                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = b''
    while b'loss=' not in seen and proc.poll() is None:  # a step is logged: the workers run
        seen += proc.stdout.read1(4096)
    proc.stdout.close()  # head -c N has what it wanted and exits
    finish(proc)
    end = events(out)[-1]
    assert proc.returncode != 0 and end['reason'] == 'error'
    assert end['error'].startswith('BrokenPipeError') and end['step'] < 64


def test_a_requeued_job_with_resume_continues_from_its_newer_checkpoint(tmp_path, capsys):
    """A job script that carries --resume X (to start its folder from another run) runs again
    after a requeue: it continues from its own newer checkpoint-last.pth, not from X."""
    run(tmp_path / 'a', '--max-steps', '2')
    x = str(tmp_path / 'a' / 'checkpoint-last.pth')
    run(tmp_path / 'b', '--resume', x, '--max-steps', '4')
    capsys.readouterr()
    run(tmp_path / 'b', '--resume', x, '--max-steps', '6')  # the same job, requeued
    last = str(tmp_path / 'b' / 'checkpoint-last.pth')
    assert f'{last} (step 4) is newer than --resume {x} (step 2)' in capsys.readouterr().out
    ev = events(tmp_path / 'b')
    assert ev[2]['event'] == 'start' and ev[2]['step'] == 4 and ev[2]['resumed_from'] == last
    rows = log_rows(tmp_path / 'b' / 'log.jsonl')
    assert [r['step'] for r in rows] == [3, 4, 5, 6]
    assert rows[1]['run'] == ev[0]['run']  # step 4 of the first job is kept, not trained again
    run(tmp_path / 'b', '--resume', x, '--max-steps', '6')  # once more: already there
    assert 'already at --max-steps 6' in capsys.readouterr().out


def test_a_torn_last_log_line_is_dropped_and_a_torn_line_before_it_is_named(tmp_path, capsys):
    run(tmp_path, '--max-steps', '2')
    with open(tmp_path / 'log.jsonl', 'a') as f:  # a blank line, then a row cut by a crash
        f.write('\n{"step": 3, "loss": 0.5')
    run(tmp_path, '--max-steps', '3')
    assert 'dropped the torn last line' in capsys.readouterr().err
    lines = [line for line in open(tmp_path / 'log.jsonl') if line.strip()]
    assert [json.loads(line).get('step') for line in lines] == [0, 1, 2, 2, 2, 3, 3]
    with open(tmp_path / 'log.jsonl') as f:
        lines = f.readlines()
    lines.insert(2, '{"step": 2, "lo\n')  # torn, with rows after it: the log is not ours to fix
    (tmp_path / 'log.jsonl').write_text(''.join(lines))
    with pytest.raises(SystemExit) as e:
        run(tmp_path, '--max-steps', '4')
    err = capsys.readouterr().err
    assert e.value.code == 2 and f'{tmp_path / "log.jsonl"} line 3 is not a JSON row' in err


def test_summary_skips_a_blank_line(tmp_path):
    os.makedirs(tmp_path / 'enc' / 'knn')
    (tmp_path / 'enc' / 'knn' / 'log.jsonl').write_text('{"mode": "knn", "top1": 50.0}\n\n')
    assert finetune.main(['--summary', str(tmp_path)]).splitlines()[-1] == '| enc | 50.0 |'


def test_a_write_that_fails_midway_keeps_the_old_picture(tmp_path, monkeypatch):
    path = str(tmp_path / 'picture-last.png')
    old = torch.zeros(3, 8, 8, dtype=torch.uint8)
    common.write_png(old, path)

    def dying_save(self, fp, *a, **k):
        with open(fp, 'wb') as f:
            f.write(b'\x89PNG')  # a kill or a full disk after the first bytes
        raise OSError('disk full')
    monkeypatch.setattr(Image.Image, 'save', dying_save)
    with pytest.raises(OSError):
        common.write_png(torch.full((3, 8, 8), 255, dtype=torch.uint8), path)
    monkeypatch.undo()
    with Image.open(path) as img:
        assert torch.equal(torch.from_numpy(numpy.array(img)).permute(2, 0, 1), old)


def test_more_epochs_on_a_finished_run_say_that_the_lr_jumps(tmp_path, capsys):
    run(tmp_path)  # 2 epochs: the cosine ends at min_lr 0
    saved = torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)['args']
    run(tmp_path, '--epochs', '3', '--max-steps', '9')
    old = common.lr_at(2.0, argparse.Namespace(**saved))
    new = common.lr_at(2.0, argparse.Namespace(**{**saved, 'epochs': 3}))
    assert new > 0.4 * saved['lr'] > old + 0.3 * saved['lr']  # halfway down a 3-epoch cosine
    assert (f'note: the lr jumps from {old:.3g} to {new:.3g} at step 8 because the schedule is '
            f'stretched (--epochs 2 -> 3)') in capsys.readouterr().out


def test_a_trailing_slash_on_data_path_is_the_same_run(tmp_path):
    os.makedirs(tmp_path / 'data' / 'a')
    for i in range(16):
        Image.new('RGB', (40, 40), (i * 10, 100, 200)).save(tmp_path / 'data' / 'a' / f'{i}.png')
    run(tmp_path / 'out', '--data-path', str(tmp_path / 'data'), '--max-steps', '1')
    run(tmp_path / 'out', '--data-path', str(tmp_path / 'data') + '/', '--max-steps', '2')
    assert torch.load(tmp_path / 'out' / 'checkpoint-last.pth', weights_only=True)['step'] == 2


@pytest.mark.parametrize('content', ['some notes\n', 'e', ''])
def test_a_file_torch_cannot_read_is_named_as_such(tmp_path, capsys, content):
    (tmp_path / 'notes.pth').write_text(content)
    with pytest.raises(SystemExit) as e:
        run(tmp_path / 'out', '--resume', str(tmp_path / 'notes.pth'))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1
    assert f'{tmp_path / "notes.pth"} is not a checkpoint torch can read' in err
