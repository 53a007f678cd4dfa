"""--data-path cifar10 | cifar100 | stl10: tiny copies of each set in its own on-disk format (no
download), trained on by pre-training and finetune.py, normalised with the set's mean and std."""
import json
import os
import pickle
import urllib.error

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
import torchvision.datasets.stl10
from PIL import Image

import common
import fastmim
import finetune
import mff
from test_common import log_rows

COLOUR = (200, 30, 90)  # every test (held-out) image: one colour, so pictures can be read back


def cifar_images(n, seed, fill=None):
    """n images as CIFAR stores them: uint8 rows of 3 x 32 x 32 (colour planes, row-major)."""
    if fill is not None:
        return np.tile(np.repeat(np.array(fill, np.uint8), 32 * 32), (n, 1))  # (n, 3072)
    return np.random.default_rng(seed).integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)


def write_pickle(path, obj):
    with open(path, 'wb') as f:
        pickle.dump(obj, f)


def tiny_cifar10(root, per_batch=4, n_test=8, fill=None):
    """cifar-10-batches-py as torchvision.datasets.CIFAR10 reads it: data_batch_1..5 and test_batch
    ({'data': (N, 3072) uint8, 'labels': [...]}), batches.meta ({'label_names': [...]})."""
    folder = os.path.join(root, 'cifar-10-batches-py')
    os.makedirs(folder)
    for b in range(1, 6):
        write_pickle(os.path.join(folder, f'data_batch_{b}'),
                     {'data': cifar_images(per_batch, b, fill), 'labels': [i % 10 for i in range(per_batch)]})
    write_pickle(os.path.join(folder, 'test_batch'),
                 {'data': cifar_images(n_test, 0, COLOUR), 'labels': [i % 10 for i in range(n_test)]})
    write_pickle(os.path.join(folder, 'batches.meta'), {'label_names': [f'c{i}' for i in range(10)]})
    return root


def tiny_cifar100(root, n_train=20, n_test=8):
    """cifar-100-python: train and test ({'data', 'fine_labels', 'coarse_labels'}), meta
    ({'fine_label_names', 'coarse_label_names'})."""
    folder = os.path.join(root, 'cifar-100-python')
    os.makedirs(folder)
    for name, n, fill in (('train', n_train, None), ('test', n_test, COLOUR)):
        labels = [i % 100 for i in range(n)]
        write_pickle(os.path.join(folder, name), {'data': cifar_images(n, 1, fill), 'fine_labels': labels,
                                                  'coarse_labels': [v // 5 for v in labels]})
    write_pickle(os.path.join(folder, 'meta'), {'fine_label_names': [f'f{i}' for i in range(100)],
                                                'coarse_label_names': [f'c{i}' for i in range(20)]})
    return root


def tiny_stl10(root, n_train=10, n_test=8, n_unlabeled=12):
    """stl10_binary: <split>_X.bin uint8 (N, 3, 96, 96) with each plane stored column-major,
    <split>_y.bin labels 1..10, unlabeled_X.bin, class_names.txt."""
    folder = os.path.join(root, 'stl10_binary')
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for split, n in (('train', n_train), ('test', n_test), ('unlabeled', n_unlabeled)):
        x = (np.broadcast_to(np.array(COLOUR, np.uint8)[None, :, None, None], (n, 3, 96, 96))
             if split == 'test' else rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8))
        x.transpose(0, 1, 3, 2).tofile(os.path.join(folder, f'{split}_X.bin'))  # column-major planes
        if split != 'unlabeled':
            (np.arange(n) % 10 + 1).astype(np.uint8).tofile(os.path.join(folder, f'{split}_y.bin'))
    with open(os.path.join(folder, 'class_names.txt'), 'w') as f:
        f.write('\n'.join(f'c{i}' for i in range(10)))
    return root


@pytest.fixture(autouse=True)
def files_not_checksummed(monkeypatch):
    """torchvision checks each file against the md5 of the real set (check_integrity), which a
    tiny copy cannot match: here only that the file exists is checked. The code under test is
    torchvision's, unchanged; a download attempt fails the test (no network in tests)."""
    def exists(fpath, md5=None):
        return os.path.isfile(fpath)

    def no_download(url, *a, **k):
        raise AssertionError(f'a test tried to download {url}')
    for module in (torchvision.datasets.cifar, torchvision.datasets.stl10):
        monkeypatch.setattr(module, 'check_integrity', exists)
        monkeypatch.setattr(module, 'download_and_extract_archive', no_download)
    common.load_named.cache_clear()


TINY = ['--model', 'vit_tiny', '--num-workers', '0', '--batch-size', '4', '--warmup-epochs', '1', '--log-freq', '1',
        '--max-steps', '2', '--decoder-dim', '32']


def test_cifar10_normalises_with_its_own_mean_and_std(tmp_path):
    """Images of CIFAR-10's mean colour are 0 after the pre-training transform (ImageNet's mean and std
    would leave (0.03, 0.12, 0.18)); each split reads its own files."""
    mean = common.DATASETS['cifar10']['mean']
    tiny_cifar10(tmp_path, fill=[round(255 * m) for m in mean])
    args = fastmim.get_args(['--data-path', 'cifar10', '--data-root', str(tmp_path), '--output-dir', str(tmp_path)])
    assert args.res == 32 and args.mean == mean and args.std == common.DATASETS['cifar10']['std']
    data = common.pretrain_dataset(args)
    assert len(data) == 20  # 5 train batches of 4; the 8 test images are the held-out split
    img, label, key = data[(0, 3)]
    assert img.shape == (3, 32, 32) and label == 3
    # uint8 rounding of the mean colour: at most 0.5 / 255 / std (0.008) from 0
    assert img.abs().max() < 0.01
    bank, queries, classes = common.eval_datasets(args)
    assert (len(bank), len(queries), classes) == (20, 8, 10)


def test_cifar10_with_data_workers_trains_as_without(tmp_path):
    """The named set through 2 data workers (as cluster runs read it): the same logged losses as
    without workers, since crops and mask noise are keyed to the sample, not the process."""
    tiny_cifar10(tmp_path / 'data')
    for workers in ('0', '2'):
        fastmim.main(['--data-path', 'cifar10', '--data-root', str(tmp_path / 'data'),
                      '--output-dir', str(tmp_path / workers), *TINY, '--num-workers', workers])
    a, b = (log_rows(tmp_path / w / 'log.jsonl') for w in ('0', '2'))
    assert len(a) == 2 and [r['loss'] for r in a] == [r['loss'] for r in b]


def test_pretrain_on_cifar10_then_finetune_with_the_checkpoint_mean_std(tmp_path, capsys):
    """fastmim.py trains on the tiny CIFAR-10 at its native 32 px; its checkpoint keeps the mean and
    std; its picture shows the held-out images in their own colour (denormalised with CIFAR's mean and
    std, not ImageNet's, which would give (193, 31, 83)); finetune.py trains on it and reads them back."""
    tiny_cifar10(tmp_path / 'data')
    fastmim.main(['--data-path', 'cifar10', '--data-root', str(tmp_path / 'data'), '--output-dir', str(tmp_path / 'pre'),
                  *TINY])
    out = capsys.readouterr().out
    assert 'dataset(cifar10): res mean std' in out
    assert 'data: torchvision cifar10' in out
    ckpt = torch.load(tmp_path / 'pre' / 'checkpoint-last.pth', weights_only=True)
    assert ckpt['args']['mean'] == common.DATASETS['cifar10']['mean'] and ckpt['args']['res'] == 32
    assert common.NORMALIZATION == [common.IMAGENET_MEAN, common.IMAGENET_STD]  # the run's ends with it
    pic = torch.from_numpy(np.array(Image.open(tmp_path / 'pre' / 'picture-last.png')))  # (H, W, 3)
    inside = pic[14 + 2 + 10, 2 + 10].int()  # the strip (14), the padding (2): the first input image
    assert (inside - torch.tensor(COLOUR)).abs().max() <= 1, inside  # uint8 rounding

    ft = tmp_path / 'ft'
    args = finetune.get_args(['--data-path', 'cifar10', '--data-root', str(tmp_path / 'data'), '--ckpt',
                              str(tmp_path / 'pre' / 'checkpoint-last.pth')])
    finetune.resolve(args, common.load_file(args.ckpt))
    assert args.res == 32 and args.mean == common.DATASETS['cifar10']['mean']
    finetune.main(['--data-path', 'cifar10', '--data-root', str(tmp_path / 'data'), '--ckpt',
                   str(tmp_path / 'pre' / 'checkpoint-last.pth'), '--output-dir', str(ft), '--num-workers', '0',
                   '--batch-size', '4', '--epochs', '1', '--warmup-epochs', '0', '--log-freq', '1'])
    rows = [json.loads(line) for line in open(ft / 'log.jsonl') if line.strip()]
    assert any('top1' in r for r in rows)
    head = torch.load(ft / 'checkpoint-last.pth', weights_only=True)['model']['head.weight']
    assert head.shape[0] == 10


def test_finetune_takes_the_checkpoint_mean_std_over_the_data(tmp_path):
    """An encoder pre-trained on CIFAR-100 is fine-tuned on CIFAR-10 with CIFAR-100's normalisation,
    the input distribution it learnt; without a checkpoint the data's own."""
    c100 = common.DATASETS['cifar100']
    tiny_cifar10(tmp_path)
    ckpt = tmp_path / 'c.pth'
    torch.save({'model': {}, 'args': {'method': 'fastmim', 'model': 'vit_tiny', 'mean': c100['mean'],
                                      'std': c100['std']}}, ckpt)
    argv = ['--data-path', 'cifar10', '--data-root', str(tmp_path), '--output-dir', str(tmp_path)]
    args = finetune.get_args([*argv, '--ckpt', str(ckpt)])
    finetune.resolve(args, common.load_file(str(ckpt)))
    assert (args.mean, args.std) == (c100['mean'], c100['std'])
    args = finetune.resolve(finetune.get_args(argv), None)
    assert args.mean == common.DATASETS['cifar10']['mean'] and args.res == 32
    train, val, K = finetune.splits(args)
    assert (len(train), len(val), K) == (20, 8, 10)


def test_mff_on_cifar100_low_pass_undoes_its_normalisation(tmp_path, monkeypatch):
    """mff.py (PixMIM's target and crop) pre-trains on the tiny CIFAR-100 with its mean and std; during
    the run the low-pass target undoes that normalisation (the model's data_mean_std), not ImageNet's."""
    tiny_cifar100(tmp_path / 'data')
    seen, real = [], mff.lowfreq_image

    def spy(imgs, radius, mean_std):
        seen.append([list(v) for v in mean_std])
        return real(imgs, radius, mean_std)
    monkeypatch.setattr(mff, 'lowfreq_image', spy)
    mff.main(['--data-path', 'cifar100', '--data-root', str(tmp_path / 'data'), '--output-dir',
              str(tmp_path / 'o'), '--target', 'lowfreq', *TINY])
    c100 = common.DATASETS['cifar100']
    assert seen and all(torch.allclose(torch.tensor(s), torch.tensor([c100['mean'], c100['std']])) for s in seen)
    ckpt = torch.load(tmp_path / 'o' / 'checkpoint-last.pth', weights_only=True)
    assert ckpt['args']['mean'] == c100['mean'] and ckpt['args']['res'] == 32


def test_stl10_pretrains_on_unlabeled_and_evaluates_on_train_test(tmp_path, capsys):
    """STL-10: pre-training reads the unlabeled images at the native 96 px; the bank is train, the
    queries test; its binary format (column-major planes) is read as torchvision reads it."""
    tiny_stl10(tmp_path / 'data')
    argv = ['--data-path', 'stl10', '--data-root', str(tmp_path / 'data')]
    args = fastmim.get_args([*argv, '--output-dir', str(tmp_path / 'o')])
    assert args.res == 96 and args.mean == common.DATASETS['stl10']['mean']
    assert len(common.pretrain_dataset(args)) == 12
    bank, queries, classes = common.eval_datasets(args)
    assert (len(bank), len(queries), classes) == (10, 8, 10)
    assert np.array(queries[0][0])[5, 7].tolist() == list(COLOUR) and bank[3][1] == 3
    fastmim.main([*argv, '--output-dir', str(tmp_path / 'o'), *TINY, '--max-steps', '1'])
    assert (tmp_path / 'o' / 'checkpoint-last.pth').is_file()


def test_a_failed_download_is_one_line_naming_the_url_and_folder(tmp_path, monkeypatch, capsys):
    """No files and no network: exit 2 with one line that says what to download and where to put it."""
    def offline(url, *a, **k):
        raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution')
    monkeypatch.setattr(torchvision.datasets.cifar, 'download_and_extract_archive', offline)
    with pytest.raises(SystemExit) as e:
        fastmim.main(['--data-path', 'cifar10', '--data-root', str(tmp_path / 'none'), '--output-dir',
                      str(tmp_path / 'o'), *TINY])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ')
    assert 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz' in err[0] and str(tmp_path / 'none') in err[0]


def test_a_folder_named_like_a_set_is_read_as_a_folder(tmp_path, monkeypatch, capsys):
    """./cifar10 exists: --data-path cifar10 reads it as an image folder, and says so."""
    monkeypatch.chdir(tmp_path)
    common.make_jpeg_folder(str(tmp_path / 'cifar10'), 4, size=(40, 40))
    common.NOTED_NAME_FOLDERS.discard('cifar10')
    args = fastmim.get_args(['--data-path', 'cifar10', '--output-dir', str(tmp_path / 'o')])
    assert 'is the folder ./cifar10' in capsys.readouterr().out
    assert args.mean == list(common.IMAGENET_MEAN) and args.res != 32
    assert len(common.pretrain_dataset(args)) == 4
