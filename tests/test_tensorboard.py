"""--log-dir (the official --log_dir): the numbers of log.jsonl, k-NN rows included, also as TensorBoard events when
the tensorboard package is there (rank 0); one line saying how to get it when it is not, and the run goes on."""
import json
import os
import sys
import types

import pytest

import common
import fastmim

# 16 images, batch 8: 2 steps an epoch; a row every step; the k-NN monitor at step 0 and every epoch
TINY = ['--patch-size', '8', '--embed-dim', '32', '--depth', '2', '--num-heads', '2', '--res', '32',
        '--decoder-dim', '32', '--num-workers', '0', '--synthetic-size', '16', '--batch-size', '8', '--log-freq', '1',
        '--eval-knn', '1']


class FakeWriter:
    """Records what a torch.utils.tensorboard.SummaryWriter is asked to do."""
    made = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.scalars, self.flushes, self.closed = log_dir, purge_step, [], 0, False
        FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        assert not self.closed
        self.scalars.append((tag, value, step))

    def flush(self):
        self.flushes += 1

    def close(self):
        self.closed = True


@pytest.fixture
def fake_board(monkeypatch):
    """torch.utils.tensorboard replaced by a module whose SummaryWriter is FakeWriter."""
    FakeWriter.made = []
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard',
                        types.SimpleNamespace(SummaryWriter=FakeWriter))
    return FakeWriter.made


def expected(rows):
    """log.jsonl's rows as (name, value, step): every number but the step and epoch."""
    return [(k, v, r['step']) for r in rows for k, v in r.items()
            if k not in ('step', 'epoch') and isinstance(v, (int, float)) and not isinstance(v, bool)]


def test_without_tensorboard_one_line_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    """The official spelling --log_dir with the package missing: one note naming `pip install tensorboard`, and the
    run trains to its end as without the flag."""
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)  # `import` raises ImportError
    out = tmp_path / 'run'
    fastmim.main([*TINY, '--epochs', '1', '--eval-knn', '0', '--output-dir', str(out), '--log_dir',
                  str(tmp_path / 'tb')])
    text = capsys.readouterr().out
    assert [line for line in text.splitlines() if 'pip install tensorboard' in line] == [
        f'note: --log-dir {tmp_path / "tb"} needs the tensorboard package (pip install tensorboard); logging to '
        f'log.jsonl only']
    assert 'ignored: --log_dir' not in text and (out / 'checkpoint-last.pth').exists()


def test_the_events_are_the_rows_of_log_jsonl_and_a_resume_appends(tmp_path, fake_board, monkeypatch):
    """Every number of every log.jsonl row (the loss rows and the k-NN rows) is one add_scalar at the row's step,
    in order; the events are flushed at each checkpoint and closed at the end. A resumed run writes into the same
    --log-dir with purge_step = its step + 1 (the events past its checkpoint are hidden, as the rows are dropped),
    and a run that fails closes the writer too."""
    out, tb = tmp_path / 'run', str(tmp_path / 'tb')
    fastmim.main([*TINY, '--epochs', '2', '--output-dir', str(out), '--log-dir', tb])
    rows = [json.loads(line) for line in open(out / 'log.jsonl')]
    first, = fake_board
    assert first.log_dir == tb and first.purge_step is None and first.closed
    assert first.scalars == expected(rows) and {'loss', 'lr', 'knn_cls', 'knn_avg'} <= {t for t, _, _ in first.scalars}
    assert first.flushes >= 2  # one per checkpoint (2 epochs)
    fastmim.main([*TINY, '--epochs', '3', '--output-dir', str(out), '--log-dir', tb])  # 2 more steps
    second = fake_board[1]
    assert second.log_dir == tb and second.purge_step == 4 + 1 and second.closed
    new = [json.loads(line) for line in open(out / 'log.jsonl')][len(rows):]
    assert second.scalars == expected(new) and min(s for _, _, s in second.scalars) == 5

    def broken(self, *args, **kwargs):
        raise RuntimeError('disk on fire')
    monkeypatch.setattr(common.Run, 'save', broken)
    with pytest.raises(RuntimeError, match='disk on fire'):
        fastmim.main([*TINY, '--epochs', '1', '--output-dir', str(tmp_path / 'bad'), '--log-dir', tb])
    assert fake_board[2].closed


def test_no_log_dir_no_tensorboard(tmp_path, fake_board):
    """Without --log-dir nothing is written to TensorBoard (and nothing imported)."""
    fastmim.main([*TINY, '--epochs', '1', '--eval-knn', '0', '--output-dir', str(tmp_path / 'run')])
    assert fake_board == []


def test_real_tensorboard_reads_the_rows(tmp_path):
    """With the tensorboard package: its own reader finds each log.jsonl loss at its step."""
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, tb = tmp_path / 'run', tmp_path / 'tb'
    fastmim.main([*TINY, '--epochs', '1', '--output-dir', str(out), '--log-dir', str(tb)])
    rows = [json.loads(line) for line in open(out / 'log.jsonl')]
    acc = EventAccumulator(str(tb))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars('loss')]
    want = [(r['step'], r['loss']) for r in rows if 'loss' in r]
    assert [s for s, _ in got] == [s for s, _ in want]
    assert all(abs(a - b) <= 1e-6 * abs(b) for (_, a), (_, b) in zip(got, want))  # float32 events
    assert os.listdir(tb)
