"""Odd inputs, third round: teacher files, a bad image in val/, export paths, what defines a fine-tuning
run, the k-NN feature cache, FastMIM's target and resolution schedule, large seeds, loose images."""
import gc
import os
import shutil

import pytest
import torch
from PIL import Image

import common
import fastmim
import finetune
import hpm
from test_hpm import clip_state

FT = ['--model', 'vit_tiny', '--patch-size', '8', '--embed-dim', '32', '--depth', '2', '--num-heads', '2',
      '--res', '32', '--num-workers', '0']
FAST = ['--model', 'vit_tiny', '--num-workers', '0', '--res', '32', '--batch-size', '16', '--warmup-epochs', '1',
        '--log-freq', '1', '--decoder-dim', '32', '--synthetic-size', '32', '--epochs', '2']


def one_line_error(capsys, fn, argv, after_training=False):
    """Run a main that must refuse: exit 2 and one `error:` line (after the progress bar of the steps
    already trained, when after_training) -> that line."""
    with pytest.raises(SystemExit) as e:
        fn(argv)
    code, err = e.value.code, capsys.readouterr().err
    del e  # its context's frames hold the data loaders: their workers end with them
    gc.collect()
    if after_training:
        err = err[err.find('error: '):]
    assert code == 2 and err.startswith('error: ') and err.count('\n') == 1, err
    return err


def image_split(root, n_per_class, bad=None):
    """Class folders a/ and b/ of 32 px PNGs (a dark, b bright) under root; `bad`: a text file in a/."""
    for c, base in (('a', 40), ('b', 200)):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.new('RGB', (32, 32), (base + 3 * i, base, 255 - base)).save(root / c / f'{c}{i}.png')
    if bad:
        (root / 'a' / bad).write_text('not an image')


# ----------------------------------------------------------------------------- hpm.py --teacher-path

def hpm_argv(out, teacher, *extra):
    return ['--output-dir', str(out), '--num-workers', '0', '--synthetic-size', '32', '--batch-size', '16',
            '--res', '32', '--epochs', '2', '--decoder-dim', '32', '--decoder-depth', '1', '--decoder-heads', '2',
            '--model', 'vit_tiny', '--target', 'clip', '--teacher-path', str(teacher), *extra]  # patch 16


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated')
@pytest.mark.parametrize('kind, msg', [
    ('tensor', 'holds a Tensor, not a state dict'), ('list', 'holds a list, not a state dict'),
    ('torchscript', 'is TorchScript'), ('folder', 'is a folder'),
])
def test_a_teacher_file_that_is_no_state_dict_is_one_line(tmp_path, capsys, kind, msg):
    path = tmp_path / 'teacher.pt'
    if kind == 'tensor':
        torch.save(torch.zeros(3), path)
    elif kind == 'list':
        torch.save([torch.zeros(3)], path)
    elif kind == 'torchscript':  # the CLIP release is a TorchScript archive
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    else:
        path.mkdir()
    err = one_line_error(capsys, hpm.main, hpm_argv(tmp_path / 'out', path))
    assert msg in err and str(path) in err
    assert 'state_dict()' in err if kind == 'torchscript' else True  # how to convert it


def test_another_teacher_file_of_the_same_width_does_not_resume(tmp_path, capsys):
    """The teacher defines the run by its content: another file (same shapes) is refused, a copy of the same
    file under another name resumes."""
    a, b = tmp_path / 'a.pth', tmp_path / 'b.pth'
    clip = dict(width=64, layers=1, patch=16, grid=2, out=24)  # vit_tiny at 32 px: patch 16, 64-wide heads
    torch.save(clip_state(**clip), a)
    torch.save({k: v + 0.01 for k, v in clip_state(**clip).items()}, b)
    out = tmp_path / 'out'
    hpm.main(hpm_argv(out, a, '--max-steps', '1'))
    capsys.readouterr()
    err = one_line_error(capsys, hpm.main, hpm_argv(out, b, '--max-steps', '2'))
    assert 'was saved by another run' in err and 'the content of the --teacher-path file changed' in err
    shutil.copyfile(a, tmp_path / 'copy.pth')
    hpm.main(hpm_argv(out, tmp_path / 'copy.pth', '--max-steps', '2'))
    assert torch.load(out / 'checkpoint-last.pth', weights_only=True)['step'] == 2


# ----------------------------------------------------------------------------- finetune.py: val/, export, resume

@pytest.mark.parametrize('workers', ['0', '2'])
def test_a_bad_val_image_loses_no_training_and_is_skipped_when_asked(tmp_path, capsys, workers):
    data = tmp_path / 'data'
    image_split(data / 'train', 8)
    image_split(data / 'val', 4, bad='broken.png')
    argv = [*FT, '--num-workers', workers, '--data-path', str(data), '--output-dir', str(tmp_path / 'o'),
            '--batch-size', '8', '--epochs', '1', '--warmup-epochs', '0', '--mixup', '0', '--cutmix', '0']
    if workers == '0':  # with workers a failed run's exit waits for issue 22 item 1 (workers shut down)
        err = one_line_error(capsys, finetune.main, argv, after_training=True)
        assert 'broken.png' in err and '--skip-bad-images' in err
        ckpt = torch.load(tmp_path / 'o' / 'checkpoint-last.pth', weights_only=True)
        assert ckpt['step'] == 2  # the epoch's two steps were saved before the evaluation
    out = finetune.main([*argv, '--skip-bad-images'])  # after the error: the missing evaluation only
    text = capsys.readouterr()
    assert ('evaluating now' in text.out) == (workers == '0')
    assert f'top1 {out["top1"]:.2f}' in text.out.splitlines()
    assert 'broken.png' in text.err or workers != '0'  # a worker's warning is not captured here
    assert torch.load(tmp_path / 'o' / 'checkpoint-last.pth', weights_only=True)['step'] == 2
    assert out['top1'] in {100 * k / 8 for k in range(9)}  # over the 8 readable images only
    knn = finetune.main([*FT, '--num-workers', workers, '--mode', 'knn', '--data-path', str(data), '--output-dir',
                         str(tmp_path / 'k'), '--nb-knn', '3', '--skip-bad-images'])
    assert knn['top1'] in {100 * k / 8 for k in range(9)}
    assert not (tmp_path / 'k' / 'knn_features.pth').exists()  # incomplete features are not cached


def test_export_timm_onto_a_folder_or_into_an_unwritable_one_is_one_line(tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    torch.save(common.VisionTransformer(32, 8, 32, 2, 2).state_dict(), tmp_path / 'enc.pth')
    argv = [*FT, '--ckpt', str(tmp_path / 'enc.pth'), '--output-dir', str(tmp_path / 'o')]
    (tmp_path / 'dir').mkdir()
    err = one_line_error(capsys, finetune.main, [*argv, '--export-timm', str(tmp_path / 'dir')])
    assert 'is a folder' in err
    locked = tmp_path / 'locked'
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, 'access', lambda p, mode: False if str(p) == str(locked) else real(p, mode))
    err = one_line_error(capsys, finetune.main, [*argv, '--export-timm', str(locked / 'x.pth')])
    assert 'cannot be written' in err and not (locked / 'x.pth').exists()


def test_fine_tuning_resume_is_refused_for_another_encoder_or_optimiser(tmp_path, capsys):
    for name, seed in (('a.pth', 0), ('b.pth', 1)):  # two encoders of the same shapes
        torch.manual_seed(seed)
        torch.save(common.VisionTransformer(32, 8, 32, 2, 2).state_dict(), tmp_path / name)
    argv = [*FT, '--mode', 'linear', '--output-dir', str(tmp_path / 'o'), '--synthetic-size', '64',
            '--synthetic-val-size', '16', '--batch-size', '16', '--accum-iter', '1', '--epochs', '1']
    finetune.main([*argv, '--ckpt', str(tmp_path / 'a.pth'), '--max-steps', '1'])
    capsys.readouterr()
    err = one_line_error(capsys, finetune.main, [*argv, '--ckpt', str(tmp_path / 'b.pth')])
    assert 'the content of the --ckpt file changed' in err
    err = one_line_error(capsys, finetune.main, [*argv, '--ckpt', str(tmp_path / 'a.pth'), '--optimizer', 'sgd'])
    assert '--optimizer lars -> sgd' in err  # not KeyError: 'dampening' from loading LARS state into SGD
    shutil.copyfile(tmp_path / 'a.pth', tmp_path / 'copy.pth')  # the same encoder elsewhere: the same run
    finetune.main([*argv, '--ckpt', str(tmp_path / 'copy.pth')])
    assert torch.load(tmp_path / 'o' / 'checkpoint-last.pth', weights_only=True)['step'] == 4


def test_knn_cache_follows_the_labels_and_the_model_flags(tmp_path, capsys):
    data = tmp_path / 'data'
    image_split(data / 'train', 6)
    image_split(data / 'val', 3)
    argv = [*FT, '--mode', 'knn', '--data-path', str(data), '--output-dir', str(tmp_path / 'o'), '--nb-knn', '3']
    finetune.main(argv)
    finetune.main(argv)
    assert 'features from' in capsys.readouterr().out  # nothing changed: the cache serves
    os.replace(data / 'val' / 'a' / 'a0.png', data / 'val' / 'b' / 'a0.png')  # two images change class,
    os.replace(data / 'val' / 'b' / 'b0.png', data / 'val' / 'a' / 'b0.png')  # the counts stay
    moved = finetune.main(argv)
    assert 'features from' not in capsys.readouterr().out
    fresh = finetune.main([*argv[:-4], '--output-dir', str(tmp_path / 'fresh'), '--nb-knn', '3'])
    assert moved == fresh
    for flag in (['--table-resize', 'bicubic'], ['--permute-merge'], ['--precision', 'bf16']):
        finetune.main([*argv, *flag])
        assert 'features from' not in capsys.readouterr().out, flag


# ----------------------------------------------------------------------------- fastmim.py flags, seeds

@pytest.mark.parametrize('argv, msg', [
    (['--target', 'foo'], "invalid choice: 'foo' (choose from 'hog', 'pixel')"),
    (['--res-schedule', '0:1,32:1'], "stage 0:1 out of range"),
    (['--res-schedule', '32:-1,64:2', '--epochs', '1'], "stage 32:-1 out of range"),
    (['--seed', str(2 ** 63)], '--seed 9.22337e+18 is out of range; use a seed in [0, 2**63)'),
])
def test_fastmim_flags_out_of_range_are_one_line(tmp_path, capsys, argv, msg):
    err = one_line_error(capsys, fastmim.main, ['--output-dir', str(tmp_path / 'o'), '--num-workers', '0', *argv])
    assert msg in err and not (tmp_path / 'o').exists()


def test_official_mim_loss_spellings():
    assert [fastmim.get_args(['--mim_loss', s]).target for s in ('HOG', 'hog', 'l2', 'L2', 'pixel')] == [
        'hog', 'hog', 'pixel', 'pixel', 'pixel']


def test_a_large_seed_trains_and_the_keys_of_small_seeds_stay(tmp_path):
    fastmim.main(['--output-dir', str(tmp_path), *FAST, '--seed', str(10 ** 12), '--max-steps', '1'])
    assert torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)['step'] == 1
    assert common.sample_key(921_000, 3, 7) == (921_000 * 1_000_003 + 3) * 10_000_019 + 7  # as before
    keys = {common.sample_key(10 ** 12, e, i) for e in range(3) for i in range(1000)}
    assert len(keys) == 3000 and all(0 <= k < 2 ** 63 for k in keys)  # distinct, and each fits int64


def test_loose_images_beside_class_folders_are_named(tmp_path, capsys):
    image_split(tmp_path / 'data', 8)
    for name in ('x.png', 'y.jpg'):
        Image.new('RGB', (32, 32)).save(tmp_path / 'data' / name)
    fastmim.main(['--output-dir', str(tmp_path / 'o'), *FAST, '--data-path', str(tmp_path / 'data'), '--max-steps',
                  '1'])
    out = capsys.readouterr().out
    assert out.count('2 image(s) at the top of') == 1 and 'were not read' in out
