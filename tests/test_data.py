"""The input pipeline on JPEG folders: the official transform exactly without draft decoding, the
same crop box, flip and statistics with it, crops keyed to the sample, --benchmark-data on a small
folder, bad files named."""
import argparse
import json
import os

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import common
import fastmim

MEAN = torch.tensor(common.IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(common.IMAGENET_STD).view(3, 1, 1)


@pytest.fixture(scope='module')
def jpegs(tmp_path_factory):
    """12 generated 500 x 375 JPEGs (quality 90) in class folders."""
    return common.make_jpeg_folder(str(tmp_path_factory.mktemp('jpegs')), 12)


def files(root):
    """The image paths of a folder, in ImageFolder's order."""
    return [p for p, _ in common.image_folder(root).samples]


def crop(path, key, res, draft):
    """DecodeCrop of one file, its randomness seeded by `key` -> (3, res, res) in [0, 1]."""
    torch.manual_seed(key)
    return common.DecodeCrop(res, draft=draft)(common.read_image(path, decode=False)) * STD + MEAN


def reduction(path, key, res):
    """The draft reduction DecodeCrop picks for this file and key (1, 2, 4 or 8)."""
    torch.manual_seed(key)
    _, _, h, w = T.RandomResizedCrop.get_params(common.read_image(path), (0.2, 1.0), (3 / 4, 4 / 3))
    return next((r for r in (8, 4, 2) if min(w, h) >= r * res), 1)


def test_jpeg_folder_is_photo_like_and_deterministic(jpegs, tmp_path):
    paths = files(jpegs)
    assert len(paths) == 12 and len({os.path.dirname(p) for p in paths}) == 10
    with Image.open(paths[0]) as im:
        assert (im.format, im.size, im.mode) == ('JPEG', (500, 375), 'RGB')
    kb = [os.path.getsize(p) / 1024 for p in paths]
    assert 40 < sum(kb) / len(kb) < 250  # a photo at quality 90, not a flat picture or pure noise
    again = files(common.make_jpeg_folder(str(tmp_path / 'again'), 2))  # 00000.jpg, 00001.jpg
    same = [p for p in paths if os.path.basename(p) in ('00000.jpg', '00001.jpg')]
    assert [open(p, 'rb').read() for p in again] == [open(p, 'rb').read() for p in same]


@pytest.mark.parametrize('res', [128, 224])
def test_without_draft_it_is_the_official_transform(jpegs, res):
    """MAE main_pretrain.py (and FastMIM's): RandomResizedCrop(scale 0.2-1, bicubic) on the PIL
    image, flip, ToTensor, Normalize; the same seed gives the same tensor, bit for bit."""
    official = T.Compose([T.RandomResizedCrop(res, scale=(0.2, 1.0), interpolation=3),
                          T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD)])
    flips = set()
    for k, path in enumerate(files(jpegs)):
        torch.manual_seed(k)
        ref = official(common.read_image(path))
        torch.manual_seed(k)
        ours = common.DecodeCrop(res, draft=False)(common.read_image(path, decode=False))
        assert torch.equal(ours, ref), path
        torch.manual_seed(k)
        T.RandomResizedCrop.get_params(common.read_image(path), (0.2, 1.0), (3 / 4, 4 / 3))
        flips.add(bool(torch.rand(1) < 0.5))
    assert flips == {True, False}  # both branches of the flip were compared


def test_draft_keeps_the_box_the_flip_and_the_statistics(jpegs):
    """At 128 px, 192 crops of 500 x 375 JPEGs: where the crop is small (r = 1) nothing changes;
    where it is decoded at 1/2 the crop is the same picture (mean error 8x below a one-pixel
    shift) and the per-channel mean and std move by less than 1 %."""
    paths = files(jpegs)
    keys = [(k, p) for k in range(16) for p in paths]
    r = torch.tensor([reduction(p, 1000 * k + i, 128) for i, (k, p) in enumerate(keys)])
    assert 0.3 < (r == 2).float().mean() < 0.9 and set(r.tolist()) == {1, 2}
    a = torch.stack([crop(p, 1000 * k + i, 128, True) for i, (k, p) in enumerate(keys)])
    b = torch.stack([crop(p, 1000 * k + i, 128, False) for i, (k, p) in enumerate(keys)])
    err = (a - b).abs().mean((1, 2, 3))  # (n,) per crop, in [0, 1] pixel units
    assert (err[r == 1] == 0).all() and (err[r == 2] > 0).all()
    shifted = (a[..., 1:] - b[..., :-1]).abs().mean((1, 2, 3))[r == 2].mean()  # one pixel off
    assert err[r == 2].mean() < shifted / 4 and err[r == 2].max() < 0.03
    for stat in (torch.mean, torch.std):
        rel = stat(a.transpose(0, 1).flatten(1), 1) / stat(b.transpose(0, 1).flatten(1), 1) - 1
        assert rel.abs().max() < 0.01, (stat.__name__, rel)


def test_draft_at_1_4_and_1_8_keeps_the_crop(jpegs):
    """At 32 px the crops of a 500 x 375 JPEG decode at 1/4 or 1/8: still the same picture."""
    paths, err, rs = files(jpegs), [], set()
    for k in range(24):
        p = paths[k % len(paths)]
        rs.add(reduction(p, k, 32))
        err.append((crop(p, k, 32, True) - crop(p, k, 32, False)).abs().mean())
    assert rs == {4, 8} and max(err) < 0.03


def test_grey_jpeg_and_png_files(tmp_path):
    """A grey JPEG decodes at a reduced scale and becomes RGB; a PNG (no draft) is untouched."""
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(375, 500, generator=g) * 40 + torch.linspace(0, 200, 500)).byte()
    os.makedirs(tmp_path / 'a')
    Image.fromarray(pixels.numpy(), 'L').save(tmp_path / 'a' / 'grey.jpg', quality=90)
    Image.fromarray(pixels.numpy(), 'L').convert('RGB').save(tmp_path / 'a' / 'rgb.png')
    key = next(k for k in range(100) if reduction(str(tmp_path / 'a' / 'grey.jpg'), k, 64) > 1)
    grey = crop(str(tmp_path / 'a' / 'grey.jpg'), key, 64, True)
    assert grey.shape == (3, 64, 64) and torch.allclose(grey[0], grey[2], atol=1e-6)
    assert (grey - crop(str(tmp_path / 'a' / 'grey.jpg'), key, 64, False)).abs().mean() < 0.03
    png = str(tmp_path / 'a' / 'rgb.png')
    assert torch.equal(crop(png, key, 64, True), crop(png, key, 64, False))


@pytest.mark.parametrize('draft', [True, False])
def test_a_crop_is_a_pure_function_of_the_sample_key(jpegs, draft):
    args = argparse.Namespace(data_path=jpegs, res=64, rrc_scale=(0.2, 1.0), seed=3,
                              skip_bad_images=False, draft_decode=draft)
    data = common.pretrain_dataset(args)
    assert isinstance(data.transform, common.DecodeCrop) and data.transform.draft == draft
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = data[(2, 5)]
    assert torch.equal(torch.get_rng_state(), state)  # the process's generator is left alone
    torch.rand(7)
    again = data[(2, 5)]
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]
    assert first[2] == common.sample_key(3, 2, 5)
    assert not torch.equal(first[0], data[(3, 5)][0])  # another epoch, another crop


def run_benchmark(out, *argv):
    """fastmim.py with a tiny model (for --benchmark-data) -> what main returns."""
    return fastmim.main(['--output-dir', str(out), '--model', 'vit_tiny', '--res', '32',
                         '--decoder-dim', '32', '--num-workers', '0', *argv])


def test_benchmark_data_cycles_over_a_small_folder(jpegs, tmp_path, capsys):
    """12 images, batch 8: one batch an epoch; 5 timed batches (+1 warm-up) take 6 epochs."""
    row = run_benchmark(tmp_path, '--data-path', jpegs, '--batch-size', '8',
                        '--benchmark-data', '5')
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == row and row['img_per_s'] > 0 and row['cpu_ms_per_img'] > 0
    assert row['workers'] == 0 and row['data'] == jpegs
    with pytest.raises(SystemExit) as e:
        run_benchmark(tmp_path, '--data-path', jpegs, '--batch-size', '13', '--benchmark-data', '2')
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith('error: 12 images are fewer')
    assert err.count('\n') == 1


def test_a_truncated_jpeg_is_named_or_skipped(jpegs, tmp_path, capsys):
    """The header reads, the data does not: the file is named; --skip-bad-images skips it."""
    os.makedirs(tmp_path / 'd' / 'a')
    good = files(jpegs)[0]
    data = open(good, 'rb').read()
    (tmp_path / 'd' / 'a' / '0_cut.jpg').write_bytes(data[:len(data) // 3])
    (tmp_path / 'd' / 'a' / '1_good.jpg').write_bytes(data)
    args = argparse.Namespace(data_path=str(tmp_path / 'd'), res=64, rrc_scale=(0.2, 1.0), seed=0,
                              skip_bad_images=False, draft_decode=True)
    with pytest.raises(ValueError, match='0_cut.jpg.*--skip-bad-images'):
        common.pretrain_dataset(args)[(0, 0)]
    args.skip_bad_images = True
    img, label, key = common.pretrain_dataset(args)[(0, 0)]
    assert img.shape == (3, 64, 64) and key == common.sample_key(0, 0, 0)
    assert '0_cut.jpg' in capsys.readouterr().err
