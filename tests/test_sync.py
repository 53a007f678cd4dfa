"""No host-device sync in a training step: the mask noise comes from the data workers, the finite-loss and
preemption flags are read one step late (a non-finite step is dropped on the device), LocalMIM Swin builds its
windows on the host."""
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import common
import efficient_mae
import fastmim
import hpm
import localmim
import mff

# ops that make the host wait for the device's data (boolean-mask indexing runs nonzero)
SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
            torch.ops.aten.masked_select.default}
READS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__,
         torch.Tensor.__int__}


class CountSyncs(TorchDispatchMode):
    """Counts the ops in SYNC_OPS and aten.index with bool indices; with `device` set, only those that touch a
    tensor on that device (host tensors, such as LocalMIM Swin's window indices, are free to read)."""

    def __init__(self, device=None):
        super().__init__()
        self.device, self.ops = device, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        hit = func in SYNC_OPS or (func is torch.ops.aten.index.Tensor
                                   and any(i is not None and i.dtype == torch.bool for i in args[1]))
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if hit and (self.device is None or any(t.device.type == self.device for t in tensors)):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class CountReads(TorchFunctionMode):
    """Counts the host reads of a tensor's values (.tolist(), .item(), bool(), float(), int()), which the
    dispatcher does not always see (.tolist())."""

    def __init__(self, log=None):
        super().__init__()
        self.log, self.paused = [] if log is None else log, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READS and args[0].is_floating_point() and not self.paused:  # int keys: host data
            self.log.append('read')
        return func(*args, **(kwargs or {}))


# every method, ViT and Swin where it has both: (name, constructor, res)
MODELS = [
    ('fastmim_vit', lambda: fastmim.FastMIM(common.VisionTransformer(32, 16, 32, 2, 2), mask_size=16, decoder_dim=32), 32),
    ('fastmim_swin', lambda: fastmim.FastMIM(common.SwinTransformer(64, 4, 8, (1, 1, 1, 1), (1, 1, 2, 2), 2),
                                             mask_size=32, decoder_dim=32, decoder_depth=1), 64),
    ('localmim_vit', lambda: localmim.LocalMIMViT(64, 16, 32, 8, 2, decoder_embed_dim=32, decoder_num_heads=2), 64),
    ('localmim_swin', lambda: localmim.LocalMIMSwin(128, 4, 8, (2, 2, 2, 2), (1, 2, 2, 4), window_size=4,
                                                    decoder_embed_dim=16, decoder_num_heads=2, hog_nbins=9), 128),
    ('hpm', lambda: hpm.HPM(32, 8, 32, 2, 2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, epochs=2,
                            target='ema'), 32),
    ('mff', lambda: mff.MFF(32, 8, 32, 4, 2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2), 32),
    ('efficient_mae', lambda: efficient_mae.EfficientMAE(32, 8, 32, 2, 2, decoder_embed_dim=32, decoder_depth=1,
                                                         decoder_num_heads=2), 32),
]


def loader_noise(model, keys):
    """The (B, n) noise a KeyedDataset with the model's noise_len yields for these keys."""
    return torch.stack([common.key_noise(k, model.noise_len()) for k in keys.tolist()])


def old_noise(keys, n):
    """The per-key generation of mimkit before the data workers drew the noise, written out."""
    rows = []
    for k in keys.tolist():
        g = torch.Generator()
        g.manual_seed((int(k) * 0x9E3779B97F4A7C15 + 1) % (1 << 63))
        rows.append(torch.rand(n, generator=g))
    return torch.stack(rows)


def test_the_data_workers_draw_the_keyed_noise_of_before():
    """KeyedDataset with noise_len yields each sample's noise from its key alone: the rows the per-key loop drew
    before (same generator, so bit for bit), and the model draws the same mask from them as from the keys."""
    ds = common.KeyedDataset(common.SyntheticShapes('train', 8, 32, 0), common.pretrain_transform(32), seed=0)
    ds.noise_len = 4
    loader = common.make_loader(ds, 4, [(3, i) for i in range(8)], 0, torch.device('cpu'))
    batches = list(loader)
    for _, _, keys, noise in batches:
        assert torch.equal(noise, old_noise(keys, 4))
    keys, noise = batches[1][2], batches[1][3]
    assert len(set(keys.tolist())) == 4 and not torch.equal(noise[0], noise[1])  # one stream per sample
    m = fastmim.FastMIM(common.VisionTransformer(32, 16, 32, 2, 2), mask_size=16, decoder_dim=32)
    assert m.noise_len() == 4
    imgs = torch.randn(4, 3, 32, 32)
    assert torch.equal(m(imgs, keys=noise)['mask'], m(imgs, keys=keys)['mask'])


@pytest.mark.parametrize('name, make, res', MODELS, ids=[m[0] for m in MODELS])
def test_a_training_step_reads_nothing_from_the_device(name, make, res):
    """One training step as the loop runs it, every method: forward on the loader's noise, backward, the flags,
    after_step on the 'meta' device (the CUDA proxy: a device whose data the host cannot read, so a data-
    dependent op either counts here or fails), then the fused AdamW step with its skip flag on the CPU: no op that
    waits for the device's data. Host tensors are free (LocalMIM Swin builds its windows from the keys there)."""
    torch.manual_seed(0)
    model = make()
    if hasattr(model, 'on_epoch'):
        model.on_epoch(1)  # HPM: alpha > 0, the teacher scores the patches
    keys = torch.arange(4) + 100
    cpu_grads = model(torch.randn(4, 3, res, res), keys=loader_noise(model, keys))['loss']
    cpu_grads.backward()
    optimizer = common.make_optimizer(model, SimpleNamespace(weight_decay=0.05, lr=1e-3), torch.device('cpu'))
    assert optimizer.defaults['fused']
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    skip = torch.zeros(())
    with CountSyncs() as syncs, CountReads() as reads:  # everything here is device data
        common.optimizer_step(optimizer, scaler, model.parameters(), 1.0, skip=skip)
    assert syncs.ops == [] and reads.log == []

    meta = make().to('meta').train()
    if hasattr(meta, 'on_epoch'):
        meta.on_epoch(1)
    imgs = torch.randn(4, 3, res, res, device='meta')
    with CountSyncs('meta') as syncs, CountReads() as reads:
        out = meta(imgs, keys=loader_noise(meta, keys))
        out['loss'].backward()
        flags = torch.stack([(~torch.isfinite(out['loss'].detach())).float(), torch.zeros((), device='meta')])
        (flags[0] > 0).float()
        if hasattr(meta, 'after_step'):
            meta.after_step()
    assert syncs.ops == [] and reads.log == []


def test_a_skipped_update_leaves_weights_and_moments_as_they_were():
    """optimizer_step(skip=1) drops the update on the device: fused AdamW (the kernel's found_inf) keeps weights,
    moments and step count bit for bit (nothing is computed on them); under the GradScaler the step is skipped and
    the scale lowered; an unfused optimiser (one read) keeps its weights; skip=0 is the plain step."""
    def setup(**kw):
        torch.manual_seed(0)
        lin = torch.nn.Linear(4, 3)
        opt = torch.optim.AdamW(lin.parameters(), lr=0.1, **kw) if kw.get('fused') else torch.optim.SGD(
            lin.parameters(), lr=0.1, momentum=0.9)
        return lin, opt

    def grads(lin, scaler, bad=False):
        scaler.scale(lin(torch.linspace(-1, 1, 8).view(2, 4)).sum().mul(float('nan') if bad else 1.0)).backward()

    for kw, scaler in [({'fused': True}, False), ({'fused': True}, True), ({}, False)]:
        lin, opt = setup(**kw)
        gs = torch.amp.GradScaler('cpu', enabled=scaler, init_scale=4.0)
        grads(lin, gs)
        common.optimizer_step(opt, gs, lin.parameters(), skip=torch.zeros(()))  # a first, real step
        before = {k: v.clone() for k, v in lin.state_dict().items()}
        state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in lin.parameters()}
        grads(lin, gs, bad=True)
        common.optimizer_step(opt, gs, lin.parameters(), 1.0, skip=torch.ones(()))
        assert all(torch.equal(v, before[k]) for k, v in lin.state_dict().items()), (kw, scaler)
        for p in lin.parameters():
            assert all(torch.equal(v, state[id(p)][k]) for k, v in opt.state[p].items()), (kw, scaler)
        assert all(p.grad is None for p in lin.parameters())
        if scaler:
            assert gs.get_scale() == 2.0  # as after an overflow
    lin, opt = setup(fused=True)
    ref, ref_opt = setup(fused=True)
    off = torch.amp.GradScaler('cpu', enabled=False)
    grads(lin, off), grads(ref, off)
    common.optimizer_step(opt, off, lin.parameters(), skip=torch.zeros(()))
    ref_opt.step()
    for a, b in zip(lin.parameters(), ref.parameters()):
        assert torch.allclose(a, b, rtol=1e-6, atol=0)  # the same update (one kernel, found_inf unset or 0)


def test_the_loop_reads_a_steps_flags_one_step_late(tmp_path, monkeypatch):
    """In a run, the host reads step t's flags (and nothing else of the device's) only after step t+1's forward:
    the device always has the next step queued. At most one read per step; the log and the save read more."""
    events, real = [], fastmim.FastMIM.forward

    def forward(self, imgs, mask=None, keys=None):
        if self.training:
            events.append('forward')
        return real(self, imgs, mask, keys)
    monkeypatch.setattr(fastmim.FastMIM, 'forward', forward)
    reads, real_loader = CountReads(events), common.make_loader

    def make_loader(*args, **kwargs):
        """The loader, its own reads (the random crops) not counted: in a real run the workers do them."""
        loader = real_loader(*args, **kwargs)

        def batches():
            it = iter(loader)
            while True:
                reads.paused = True
                try:
                    batch = next(it)
                except StopIteration:
                    return
                finally:
                    reads.paused = False
                yield batch
        return batches()
    monkeypatch.setattr(common, 'make_loader', make_loader)
    with reads:
        fastmim.main(['--output-dir', str(tmp_path), '--model', 'vit_tiny', '--num-workers', '0', '--res', '32',
                      '--batch-size', '8', '--synthetic-size', '64', '--epochs', '1', '--warmup-epochs', '1',
                      '--decoder-dim', '32', '--log-freq', '100', '--max-steps', '5',
                      '--eval-knn', '0'])  # the steps' reads only: the monitor's images are made at start
    steps = ' '.join(events[:events.index('forward', events.index('forward') + 1) + 1])
    assert steps == 'forward forward', steps  # step 0's flags are not read before step 1 runs
    during = events[:len(events) - events[::-1].index('forward')]  # up to the last training forward
    assert during.count('forward') == 5 and during.count('read') == 3  # steps 0-2, read in steps 1-3
