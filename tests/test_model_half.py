"""A model needs only the model halves: common.py above its banner "the runner" plus a method file above its
command-line banner, loaded on their own (no runner, no command line) build and train one step."""
import importlib.util
import os
import re
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a tiny model of each method through its constructor (dim <= 64, 32-64 px)
TINY = {
    'fastmim': ('FastMIM', dict(encoder=dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2),
                                mask_size=16, decoder_dim=32)),
    'hpm': ('HPM', dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
                        decoder_depth=1, decoder_num_heads=2)),
    'localmim': ('LocalMIMViT', dict(img_size=64, patch_size=16, embed_dim=32, depth=8, num_heads=2,
                                     decoder_embed_dim=32, decoder_num_heads=2)),
    'mff': ('MFF', dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, decoder_embed_dim=32,
                        decoder_depth=1, decoder_num_heads=2)),
    'efficient_mae': ('EfficientMAE', dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                           decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)),
}


def model_half(name, banner):
    """The lines of ROOT/name above the first line that matches the banner's regex."""
    with open(os.path.join(ROOT, name)) as f:
        lines = f.readlines()
    cut = next(i for i, line in enumerate(lines) if re.match(banner, line))
    return ''.join(lines[:cut])


def load(name, path):
    """Import the file at path as module `name` (registered in sys.modules first, as an import does)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_the_model_halves_alone_build_and_train_each_method(tmp_path, monkeypatch):
    (tmp_path / 'common.py').write_text(model_half('common.py', r'# =+ the runner'))
    monkeypatch.syspath_prepend(str(tmp_path))
    for m in (*TINY, 'common'):  # the halves, not the files the other tests imported
        monkeypatch.delitem(sys.modules, m, raising=False)
    common = load('common', tmp_path / 'common.py')
    assert not hasattr(common, 'train') and not hasattr(common, 'ArgumentParser')
    for m, (cls, kw) in TINY.items():
        (tmp_path / f'{m}.py').write_text(model_half(f'{m}.py', r'# -+ *command line'))
        module = load(m, tmp_path / f'{m}.py')
        assert not hasattr(module, 'get_args') and module.__file__ == str(tmp_path / f'{m}.py')
        torch.manual_seed(0)
        res = kw['encoder']['img_size'] if 'encoder' in kw else kw['img_size']
        if 'encoder' in kw:  # FastMIM wraps an encoder the model half of common.py builds
            kw = dict(kw, encoder=common.VisionTransformer(**kw['encoder']))
        model = getattr(module, cls)(**kw)
        out = model(torch.randn(2, 3, res, res), keys=torch.arange(2))
        out['loss'].backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert torch.isfinite(out['loss']) and any(g is not None and g.abs().sum() > 0 for g in grads), m
