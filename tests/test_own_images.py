"""Your own images: pre-training on a folder without class folders (flat or nested), --mean and --std
from the transform to the checkpoint and finetune.py, and finetune.py --mode features."""
import numpy as np
import pytest
import torch
from PIL import Image

import common
import finetune
import mff
from test_common import log_rows

TINY = ['--model', 'vit_tiny', '--patch-size', '8', '--embed-dim', '32', '--depth', '2', '--num-heads', '2',
        '--res', '32', '--decoder-dim', '32', '--decoder-depth', '1', '--decoder-heads', '2', '--fuse-layers', '0,1',
        '--batch-size', '4', '--epochs', '1', '--warmup-epochs', '0', '--log-freq', '1', '--max-steps', '2',
        '--num-workers', '0']
MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.1]
COLOUR = (200, 30, 90)


def pngs(folder, names, colour=None, size=36):
    """Small PNGs at folder/name; one colour, or a random pattern per file."""
    rng = np.random.default_rng(len(names))
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = (np.full((size, size, 3), colour, np.uint8) if colour is not None
                  else rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        Image.fromarray(pixels).save(path)


@pytest.mark.parametrize('workers', ['0', '2'])
@pytest.mark.parametrize('layout,files,folders', [
    ('flat', [f'{i}.png' for i in range(8)], 1),
    ('nested', [f'{a}/b/c/{i}.png' for a in ('a', 'd') for i in range(4)], 2),  # depth 3, no class folders
])
def test_pretrain_on_a_folder_without_class_folders(tmp_path, capsys, layout, files, folders, workers):
    """8 images with no class folders (flat, or three folders deep): read unlabelled, said in one
    line, trained for 2 steps of 4 (the whole folder, with drop_last)."""
    pngs(tmp_path / 'data', files)
    mff.main(['--data-path', str(tmp_path / 'data'), '--output-dir', str(tmp_path / 'out'), *TINY,
              '--num-workers', workers])
    out = capsys.readouterr().out
    assert (f'data: 8 images in {folders} folder(s) under {tmp_path / "data"} (no class subfolders: '
            f'unlabelled)') in out
    assert [r['step'] for r in log_rows(tmp_path / 'out' / 'log.jsonl')] == [1, 2]


def test_nested_class_folders_keep_the_order_imagefolder_gives(tmp_path):
    """Class folders whose images sit one level deeper are read unlabelled now, in the order
    torchvision's ImageFolder read them (the sampler's order, so a run trains as before)."""
    from torchvision import datasets
    pngs(tmp_path, [f'{c}/{s}/{i}.png' for c in ('a', 'a-b', 'b') for s in ('x', 'x-y') for i in (1, 0)])
    pngs(tmp_path, ['a/x/y/0.png'])
    ours = common.image_folder(str(tmp_path))
    assert isinstance(ours, common.ImageFiles) and ours.classes == [] and len(ours) == 13
    assert [p for p, _ in ours.samples] == [p for p, _ in datasets.ImageFolder(str(tmp_path)).samples]


@pytest.mark.parametrize('workers', ['0', '2'])
def test_class_folders_are_still_an_imagefolder_with_labels(tmp_path, capsys, workers):
    pngs(tmp_path / 'data' / 'train', [f'{c}/{i}.png' for c in ('cat', 'dog') for i in range(4)])
    mff.main(['--data-path', str(tmp_path / 'data'), '--output-dir', str(tmp_path / 'out'), *TINY,
              '--num-workers', workers])
    out = capsys.readouterr().out
    assert f'data: 8 images in ImageFolder {tmp_path / "data" / "train"} with 2 classes, its train/ split' in out


def test_mean_std_reach_the_transform_the_picture_the_checkpoint_and_finetune(tmp_path, capsys):
    """--mean/--std normalise the crops ((200/255 - 0.5) / 0.25 by hand for red), undo it in the
    picture (the input column shows the images' own colour), are saved in the checkpoint's args, and
    finetune.py takes them from there unless given."""
    pngs(tmp_path / 'data', [f'{i}.png' for i in range(8)], COLOUR)
    argv = ['--data-path', str(tmp_path / 'data'), '--output-dir', str(tmp_path / 'out'), *TINY,
            '--mean', *map(str, MEAN), '--std', *map(str, STD)]
    by_hand = (torch.tensor(COLOUR) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    for data in (mff.make_dataset(mff.get_args(argv)),  # PixMIM's crop, and MAE's (DecodeCrop)
                 common.pretrain_dataset(mff.get_args(argv))):
        img = data[(0, 3)][0]  # (3, 32, 32); one colour stays one colour through crop and resize
        assert torch.allclose(img, by_hand[:, None, None].expand_as(img), atol=1e-5)  # fp32 round-off

    mff.main(argv)
    ckpt = torch.load(tmp_path / 'out' / 'checkpoint-last.pth', weights_only=True)
    assert (ckpt['args']['mean'], ckpt['args']['std']) == (MEAN, STD)
    pic = np.array(Image.open(tmp_path / 'out' / 'picture-last.png'))  # (H, W, 3)
    inside = pic[14 + 2 + 10, 2 + 10].astype(int)  # under the 14-px names, the 2-px border: input 1
    assert np.abs(inside - COLOUR).max() <= 1, inside  # uint8 rounding; ImageNet's would be far off
    assert 'mean [0.5, 0.4, 0.3], std [0.25, 0.2, 0.1]' in capsys.readouterr().out
    with pytest.raises(SystemExit):  # the run's normalisation is part of the run: resume keeps it
        mff.main([*argv[:-3], '0.2', '0.2', '0.2'])
    assert '--std [0.25, 0.2, 0.1] -> [0.2, 0.2, 0.2]' in capsys.readouterr().err

    ft = ['--mode', 'features', '--ckpt', str(tmp_path / 'out' / 'checkpoint-last.pth'), '--data-path',
          str(tmp_path / 'data'), '--output-dir', str(tmp_path / 'ft')]
    args = finetune.resolve(finetune.get_args(ft), common.load_file(str(tmp_path / 'out' / 'checkpoint-last.pth')))
    assert (args.mean, args.std, args.res) == (MEAN, STD, 32)
    args = finetune.resolve(finetune.get_args([*ft, '--std', '0.5', '0.5', '0.5']),
                            common.load_file(str(tmp_path / 'out' / 'checkpoint-last.pth')))
    assert (args.mean, args.std) == (MEAN, [0.5] * 3)  # a flag wins over the checkpoint


@pytest.mark.parametrize('argv,msg', [
    (['--mean', '0.5', '0.5'], '--mean takes three numbers, red green blue'),
    (['--std', '0.2', '0.2', '0.2', '0.2'], '--std takes three numbers'),
    (['--mean', '124', '117', '104'], 'divide by 255'),
    (['--std', '0.2', '0', '0.2'], '--std 0.2 0 0.2 is out of range'),
])
def test_a_wrong_mean_or_std_is_one_line(tmp_path, capsys, argv, msg):
    for main in (mff.main, finetune.main):
        with pytest.raises(SystemExit) as e:
            main(['--output-dir', str(tmp_path), '--num-workers', '0', *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith('error: ') and msg in err and err.count('\n') == 1


@pytest.mark.parametrize('workers', ['0', '2'])
def test_a_folder_without_images_names_the_extensions(tmp_path, capsys, workers):
    (tmp_path / 'data' / 'sub').mkdir(parents=True)
    (tmp_path / 'data' / 'sub' / 'notes.txt').write_text('x')
    with pytest.raises(SystemExit) as e:
        mff.main(['--data-path', str(tmp_path / 'data'), '--output-dir', str(tmp_path / 'out'), *TINY,
              '--num-workers', workers])
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'no images found in' in err and '.jpg .jpeg .png' in err


@pytest.mark.parametrize('workers', ['0', '2'])
def test_features_of_a_flat_folder_and_of_class_folders(tmp_path, capsys, workers):
    """--mode features writes cls and avg (N, D) in the folder's order with the paths (and labels
    with class folders), each row the encoder's own features of the image preprocessed by hand at
    the checkpoint's res, mean and std."""
    pngs(tmp_path / 'flat', [f'{i}.png' for i in range(8)])
    model = mff.main(['--data-path', str(tmp_path / 'flat'), '--output-dir', str(tmp_path / 'out'), *TINY,
                      '--mean', *map(str, MEAN), '--std', *map(str, STD)]).eval()
    ckpt = str(tmp_path / 'out' / 'checkpoint-last.pth')
    pngs(tmp_path / 'classes', [f'{c}/{i}.png' for c in ('cat', 'dog') for i in range(3)])
    for name, n in (('flat', 8), ('classes', 6)):
        capsys.readouterr()
        finetune.main(['--mode', 'features', '--ckpt', ckpt, '--data-path', str(tmp_path / name),
                       '--output-dir', str(tmp_path / f'f_{name}'), '--num-workers', workers, '--batch-size', '3'])
        path = tmp_path / f'f_{name}' / 'features.pt'
        last = capsys.readouterr().out.strip().splitlines()[-1]
        assert last.startswith(f'wrote {path}: cls ({n}, 32), avg ({n}, 32)')
        out = torch.load(path, weights_only=True)
        assert out['paths'] == sorted(str(p) for p in (tmp_path / name).rglob('*.png'))
        assert out['res'] == 32 and out['mean'] == MEAN
        if name == 'classes':
            assert out['labels'].tolist() == [0, 0, 0, 1, 1, 1] and out['classes'] == ['cat', 'dog']
        else:
            assert 'labels' not in out and 'no labels' in last
        # by hand: 36 px -> Resize(32 / 0.875 = 36) is the identity, centre crop 32 = pixels 2..33
        pixels = np.stack([np.array(Image.open(p))[2:34, 2:34] for p in out['paths']])  # (N, 32, 32, 3)
        x = (torch.from_numpy(pixels).permute(0, 3, 1, 2) / 255 - torch.tensor(MEAN)[:, None, None]) / \
            torch.tensor(STD)[:, None, None]  # (N, 3, 32, 32)
        with torch.no_grad():
            cls, avg = model.encoder_features(x)
            assert torch.allclose(cls, model.forward_features(x)[:, 0])
        # the same weights and operations in batches of 3 vs N: fp32 round-off only (~1e-7 relative)
        assert torch.allclose(out['cls'], cls, atol=1e-5) and torch.allclose(out['avg'], avg, atol=1e-5)
