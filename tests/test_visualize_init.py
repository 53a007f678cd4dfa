"""--visualize CKPT (one PNG of what a pre-training file predicts) and --init-from CKPT (a new run from its weights),
for our checkpoints and the official layouts of each method, through the command line on tiny models."""
import importlib

import numpy as np
import pytest
import torch
from PIL import Image

import common
from test_common import timm_vit_to_mmpretrain

METHODS = ('fastmim', 'hpm', 'localmim', 'mff', 'efficient_mae')
SIZE = ['--model', 'vit_tiny', '--patch-size', '8', '--embed-dim', '32', '--depth', '2', '--num-heads', '2']
HEADS = ['--decoder-dim', '32', '--decoder-depth', '1', '--decoder-heads', '2']
ARCH = {'fastmim': [*SIZE, '--decoder-dim', '32', '--decoder-depth', '1', '--mask-size', '16'],
        'localmim': [*SIZE, *HEADS, '--depth', '8'], 'hpm': [*SIZE, *HEADS], 'mff': [*SIZE, *HEADS],
        'efficient_mae': [*SIZE, *HEADS]}
COLUMNS = {'fastmim': 4, 'hpm': 4, 'localmim': 10, 'mff': 3, 'efficient_mae': 5}  # of each method's picture
RUN = ['--num-workers', '0', '--synthetic-size', '8', '--batch-size', '4', '--epochs', '2', '--eval-knn', '0']


def main(method, argv):
    return importlib.import_module(method).main(argv)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """method -> the folder of a 2-step run at res 32 (checkpoint-last.pth, picture-last.png)."""
    runs = {}
    for m in METHODS:
        out = tmp_path_factory.mktemp(m)
        main(m, [*ARCH[m], '--res', '32', *RUN, '--max-steps', '2', '--output-dir', str(out)])
        runs[m] = out
    return runs


def official_file(method, ckpt):
    """Our checkpoint in the layout of the method's release (MAE's for Efficient MAE), as the loader tests build it."""
    sd = ckpt['model']
    if method == 'hpm':  # {'state_dict' (DDP names), 'model' (a name), 'ema_state_dict', ...}
        return {'epoch': ckpt['epoch'], 'state_dict': {'module.' + k: v for k, v in sd.items()}, 'optimizer': {},
                'model': 'mae_vit_base_patch16_dec512d8b', 'ema_state_dict': ckpt['model_ema'], 'loss_scaler': {}}
    if method == 'mff':  # mmengine, mmpretrain names
        return {'meta': {'epoch': ckpt['epoch']}, 'state_dict': timm_vit_to_mmpretrain(sd)}
    return {'model': {'module.' + k: v for k, v in sd.items()}, 'epoch': ckpt['epoch']}


def png(path):
    return np.asarray(Image.open(path))


def grid_shape(rows, columns, side=128):
    """(H, W) of grid_picture: a 14-px label strip, images enlarged to `side`, 2-px padding."""
    return 14 + rows * (side + 2) + 2, columns * (side + 2) + 2


def error(capsys, method, argv):
    with pytest.raises(SystemExit) as e:
        main(method, argv)
    assert e.value.code == 2
    return capsys.readouterr().err.strip()


# ----------------------------------------------------------------------------- --visualize

@pytest.mark.parametrize('method', METHODS)
def test_visualize_ours_and_official_layout(method, trained, tmp_path):
    """Ours at seed 0 on the built-in images is the run's own last picture; the official-layout file of the same
    weights (read at the file's resolution) draws the same picture."""
    ckpt_path = trained[method] / 'checkpoint-last.pth'
    ours = main(method, ['--visualize', str(ckpt_path), '--output-dir', str(tmp_path / 'ours')])
    assert np.array_equal(png(ours), png(trained[method] / 'picture-last.png'))  # same model, images, masks
    official = tmp_path / 'official.pth'
    torch.save(official_file(method, torch.load(ckpt_path, weights_only=True)), official)
    theirs = main(method, ['--visualize', str(official), *ARCH[method], '--output-dir', str(tmp_path / 'theirs'),
                           '--epochs', '2'])  # HPM: alpha at epoch 1 of the run's 2
    assert np.array_equal(png(theirs), png(ours))
    H, W = grid_shape(8, COLUMNS[method])  # 8 images (default), the method's columns
    assert png(ours).shape[:2] == (H, W) or (method == 'mff' and png(ours).shape[1] == W)  # MFF: bars below


def test_visualize_reads_files_and_flat_folders_and_adds_the_raw_prediction(trained, tmp_path, capsys):
    """--data-path: a flat folder (an unreadable file passed over), or image files; --raw-prediction adds a
    column under a norm-pix target, whose prediction column says it borrows the target's statistics."""
    folder = tmp_path / 'imgs'
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        Image.fromarray(torch.randint(0, 256, (40, 48, 3), generator=g, dtype=torch.uint8).numpy()).save(
            folder / f'{i}.png')
    (folder / 'bad.jpg').write_bytes(b'not an image')
    ckpt = str(trained['mff'] / 'checkpoint-last.pth')
    flat = png(main('mff', ['--visualize', ckpt, '--data-path', str(folder), '--output-dir', str(tmp_path / 'a')]))
    assert flat.shape[1] == grid_shape(3, 3)[1] and flat.shape[0] > grid_shape(3, 3)[0]
    raw = png(main('mff', ['--visualize', ckpt, '--data-path', str(folder / '2.png'), str(folder / '0.png'),
                           '--raw-prediction', '--mask-ratio', '0.5', '--seed', '3',
                           '--output-dir', str(tmp_path / 'b')]))
    assert raw.shape[1] == grid_shape(2, 4)[1]
    assert 'mask ratio 0.5, seed 3' in capsys.readouterr().out
    assert common.pixel_labels(True) == ['input', 'masked', 'pred + target mean/std']


@pytest.mark.parametrize('method', ['hpm', 'localmim'])
def test_visualize_refuses_a_wrong_file_in_one_line(method, trained, tmp_path, capsys):
    other = 'mff' if method == 'hpm' else 'fastmim'
    msg = error(capsys, method, ['--visualize', str(trained[other] / 'checkpoint-last.pth'),
                                 '--output-dir', str(tmp_path)])
    assert msg == (f'error: {trained[other] / "checkpoint-last.pth"} is a {other} pre-training checkpoint (ours); '
                   f'read it with {other}.py, or give one of {method}')
    official = tmp_path / 'mff_release.pth'
    torch.save(official_file('mff', torch.load(trained['mff'] / 'checkpoint-last.pth', weights_only=True)),
               official)
    assert 'is an official mff checkpoint' in error(capsys, method, ['--visualize', str(official),
                                                                     '--output-dir', str(tmp_path)])
    classifier = tmp_path / 'ft.pth'
    torch.save({'model': {'patch_embed.proj.weight': torch.zeros(2, 3, 8, 8), 'head.weight': torch.zeros(10, 2)},
                'args': {'method': 'finetune', 'mode': 'linear'}}, classifier)
    assert 'is a classifier fine-tuned by finetune.py (--mode linear)' in error(
        capsys, method, ['--visualize', str(classifier), '--output-dir', str(tmp_path)])
    junk = tmp_path / 'junk.pth'
    torch.save({'foo': torch.zeros(3)}, junk)
    msg = error(capsys, method, ['--visualize', str(junk), '--output-dir', str(tmp_path)])
    assert 'holds no ViT or Swin weights (keys: foo)' in msg and '\n' not in msg


# ----------------------------------------------------------------------------- --init-from

def start_state(monkeypatch):
    """Record the model's weights and the optimiser's state at step 0 (after the weights are set, before a step)."""
    seen = {}
    announce = common.Run.announce

    def record(run):
        seen.update(weights={k: v.clone() for k, v in run.model.state_dict().items()},
                    optimizer=dict(run.optimizer.state), step=run.step)
        if hasattr(run.model, 'teacher'):  # HPM's EMA teacher
            seen['teacher'] = {k: v.clone() for k, v in run.model.teacher.state_dict().items()}
        return announce(run)
    monkeypatch.setattr(common.Run, 'announce', record)
    return seen


@pytest.mark.parametrize('layout', ['ours', 'official'])
def test_init_from_starts_a_new_run_from_the_file(layout, trained, tmp_path, monkeypatch, capsys):
    """Step 0 holds the file's weights (HPM's EMA teacher too) and a fresh optimiser; the run trains from there."""
    ckpt = torch.load(trained['hpm'] / 'checkpoint-last.pth', weights_only=True)
    path = tmp_path / 'init.pth'
    torch.save(ckpt if layout == 'ours' else official_file('hpm', ckpt), path)
    seen = start_state(monkeypatch)
    model = main('hpm', [*ARCH['hpm'], '--res', '32', *RUN, '--max-steps', '1', '--init-from', str(path),
                         '--output-dir', str(tmp_path / 'run')])
    assert seen['step'] == 0 and not seen['optimizer']
    assert seen['weights'].keys() == ckpt['model'].keys()
    assert all(torch.equal(seen['weights'][k], v) for k, v in ckpt['model'].items())
    assert all(torch.equal(seen['teacher'][k], v) for k, v in ckpt['model'].items())  # starts as the weights
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith('init from'))
    assert 'resized none; left at init none; ignored none' in line
    assert model.run_end['step'] == 1 and torch.load(tmp_path / 'run' / 'checkpoint-last.pth',
                                                     weights_only=True)['optimizer']['state'][0]['step'] == 1


def test_init_from_another_method_and_resolution_says_what_it_loaded(trained, tmp_path, monkeypatch, capsys):
    """Efficient MAE's run (MAE's keys) into HPM at res 64: the encoder and decoder load, the sin-cos tables are
    recomputed for the new grid, the loss predictor starts at init; one line says so."""
    ckpt = torch.load(trained['efficient_mae'] / 'checkpoint-last.pth', weights_only=True)
    seen = start_state(monkeypatch)
    main('hpm', [*ARCH['hpm'], '--res', '64', *RUN, '--max-steps', '1', '--output-dir', str(tmp_path / 'run'),
                 '--init-from', str(trained['efficient_mae'] / 'checkpoint-last.pth')])
    w = seen['weights']
    assert all(torch.equal(w[k], v) for k, v in ckpt['model'].items() if 'pos_embed' not in k)
    assert torch.allclose(w['pos_embed'][0], common.sincos_pos_embed(32, 8), atol=1e-6)  # the 8x8 grid's table
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith('init from'))
    assert ('resized pos_embed 4x4 -> 8x8 (sin-cos recomputed), decoder_pos_embed 4x4 -> 8x8 (sin-cos '
            'recomputed); left at init decoder_blocks_losspred.{0..0}.* (12), decoder_norm_losspred.* (2), '
            'decoder_pred_losspred.* (2)') in line
    assert 'ours (efficient_mae, step 2)' in line


def test_init_from_is_run_defining_and_refuses_another_encoder(trained, tmp_path, capsys):
    """A resume of an --init-from run checks the file's content; an encoder of another size is one error line."""
    path = tmp_path / 'init.pth'
    ckpt = torch.load(trained['mff'] / 'checkpoint-last.pth', weights_only=True)
    torch.save(ckpt, path)
    argv = [*ARCH['mff'], '--res', '32', *RUN, '--max-steps', '1', '--init-from', str(path),
            '--output-dir', str(tmp_path / 'run')]
    main('mff', argv)
    ckpt['model']['mask_token'] = ckpt['model']['mask_token'] + 1
    torch.save(ckpt, path)
    assert 'the content of the --init-from file changed' in error(capsys, 'mff', argv)
    wide = [a if a != '32' else '64' for a in ARCH['mff']]  # embed and decoder 64 wide
    msg = error(capsys, 'mff', [*wide, '--res', '32', *RUN, '--init-from', str(path),
                                '--output-dir', str(tmp_path / 'wide')])
    assert msg.startswith(f'error: {path} does not match this model') and 'cls_token (1, 1, 32) vs (1, 1, 64)' in msg
    assert 'give one of them' in error(capsys, 'mff', [*argv, '--resume', str(path)])
