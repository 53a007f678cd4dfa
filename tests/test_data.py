"""The input pipeline on JPEG folders: generated photo-like JPEGs, --benchmark-data on a small
folder."""
import json
import os

import pytest
from PIL import Image

import common
import fastmim


@pytest.fixture(scope='module')
def jpegs(tmp_path_factory):
    """12 generated 500 x 375 JPEGs (quality 90) in class folders."""
    return common.make_jpeg_folder(str(tmp_path_factory.mktemp('jpegs')), 12)


def files(root):
    """The image paths of a folder, in ImageFolder's order."""
    return [p for p, _ in common.image_folder(root).samples]


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
