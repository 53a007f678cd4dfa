r"""Downstream evaluation of every method's encoders: fine-tuning, linear probing, k-NN.

The transfer protocols the five papers report, on ViT and Swin encoders pre-trained by fastmim.py,
hpm.py, localmim.py, mff.py or efficient_mae.py, or released by the official repositories (MAE, HPM,
FastMIM and LocalMIM ViT/Swin, MFF in mmpretrain names). The checkpoint's layout is detected,
prefixes, decoders and method-only keys stripped, names mapped, the pos-embed and Swin relative
tables resized (common.load_encoder). Without `--ckpt`: random init, the baseline.

- finetune (facebookresearch/mae main_finetune.py and its descendants): AdamW with layer-wise lr
  decay, warm-up + cosine per iteration, RandAugment, mixup/cutmix, label smoothing, random erasing,
  drop path, global average pooling + a fresh `fc_norm`, optional EMA; best checkpoint kept.
- linear (MAE main_linprobe.py): frozen encoder, cls token after the final norm (or `--pool avg`,
  or the block `--probe-layer`), BatchNorm1d without affine + Linear; LARS (MAE, MFF) or SGD (HPM).
- knn (facebookresearch/dino eval_knn.py): the k nearest L2-normalised train features (cosine) vote
  exp(sim / 0.07), k 10/20/100/200; features cached, gathered by dataset index under DDP.
- features: the encoder's cls and average-pooled features of every image under --data-path (a
  folder at any depth, or class folders: then with labels) and the file paths, to one .pt file.
`--recipe` picks a method's published recipe (default: the checkpoint's); explicit flags win.
Every mode but features ends with the lines `top1 <percent>` and `top5 <percent>` (in log.jsonl).
`--export-timm OUT.pth` only writes the encoder in timm names + OUT.json (create_model kwargs).
`--summary DIR` only prints the final top-1 of DIR/<encoder>/<protocol> runs as a table (README).

    python finetune.py                                # CPU smoke run: random-init vit_tiny, 64 px
    python finetune.py --mode knn --ckpt output/fastmim_vit_tiny/checkpoint-last.pth --res 64
    python finetune.py --mode features --ckpt output/mff_vit_tiny/checkpoint-last.pth --data-path x/
    python finetune.py --ckpt mae_pretrain_vit_base.pth --data-path /data/imagenet    # one GPU
    torchrun --nproc_per_node 8 finetune.py --ckpt vit_base_fastmim_hog_800e_pretrain.pth \
        --data-path /data/imagenet
    torchrun --nproc_per_node 8 finetune.py --mode linear --ckpt hpm.pth --recipe hpm \
        --data-path /data/imagenet
    python finetune.py --ckpt swin_base_fastmim_hog_400e_pretrain.pth --model swin_base \
        --export-timm swin_b.pth
"""
import argparse
import copy
import glob
import json
import math
import os
import re
import shutil
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from common import (IMAGENET_MEAN, IMAGENET_STD, NUMBER_RULES, SWIN_PRESETS, VIT_PRESETS,
                    KeyedDataset, SwinTransformer, SyntheticShapes, VisionTransformer,
                    autocast_dtype, benchmark, check_run_args, data_line, dataset_defaults,
                    encoder_config, eval_datasets, eval_loader, extract_features, fast_cuda,
                    file_fingerprint, fill_defaults, image_folder, knn_classify, launched_world,
                    load_encoder, load_file, mean_std, mmpretrain_vit_to_timm, named_set,
                    official_layout, parse_run, pick_state_dict, plain_data, print0,
                    print_sources, read_log, resolve_accum, run_main, run_parser, save_atomic,
                    setup_distributed, strip_prefix, swin_timm_keys, train)

# Defaults of each mode; recipes below override them. Per-process batches assume 8 processes:
# effective batch = batch x accum x world, lr = blr x effective batch / 256. A run on other
# processes is told the recipe's batch x accum x RECIPE_PROCESSES (common.batch_note).
RECIPE_PROCESSES = 8
MODE_DEFAULTS = {
    'finetune': dict(  # facebookresearch/mae main_finetune.py; FINETUNE page, ViT-B command (1024)
        epochs=100, warmup_epochs=5, blr=5e-4, min_lr=1e-6, weight_decay=0.05, layer_decay=0.65,
        drop_path=0.1, batch_size=128, accum_iter=1, smoothing=0.1, mixup=0.8, cutmix=1.0,
        reprob=0.25, randaug=True, pool='avg', swin_head='norm', window_size=7, optimizer='adamw'),
    'linear': dict(  # MAE main_linprobe.py; FINETUNE page, linear probing: 512 x 32 GPUs = 16384
        epochs=90, warmup_epochs=10, blr=0.1, min_lr=0.0, weight_decay=0.0, batch_size=512,
        accum_iter=4, optimizer='lars', pool='cls', window_size=7, drop_path=0.0),
    'knn': dict(batch_size=128, pool='cls', window_size=7, nb_knn='10,20,100,200',
                temperature=0.07),  # facebookresearch/dino eval_knn.py
    'features': dict(batch_size=128, window_size=7),  # ours: the encoder's features to a file
}
# Published recipes ('all' < 'vit' / 'swin' < model name); official lrs as blr = lr x 256 / batch
RECIPES = {
    'mae': {'finetune': {  # facebookresearch/mae FINETUNE page: the ViT-L and ViT-H commands
        'vit_large': dict(epochs=50, blr=1e-3, layer_decay=0.75, drop_path=0.2),
        'vit_huge': dict(epochs=50, blr=1e-3, layer_decay=0.75, drop_path=0.3),
        'swin': dict(blr=1e-3, layer_decay=0.8)}},  # MAE has no Swin: FastMIM's Swin-B command
    'fastmim': {'finetune': {  # ggjy/FastMIM.pytorch README commands
        'vit': dict(blr=6e-4, layer_decay=0.70),  # Tab. 12: 1e-3; 6e-4 wins in FastMIM.pytorch#1
        'swin': dict(blr=1e-3, layer_decay=0.8, swin_head='fc_norm'),
        'swin_large': dict(layer_decay=0.75, drop_path=0.3)}},  # no command: FastMIM Tab. 12
    'hpm': {  # Haochen-Wang409/HPM scripts/
        'finetune': {'vit': dict(layer_decay=0.8, batch_size=48),  # finetune_base.sh: 48 x 8
                     'vit_large': dict(epochs=50, batch_size=64)},  # finetune_large.sh
        'linear': {'all': dict(optimizer='sgd', blr=1e-3, epochs=100, batch_size=256,
                               accum_iter=1)}},  # linprob.sh: 512 x 4 = 2048; main_linprob.py: SGD
    'localmim': {'finetune': {  # Haoqing-Wang/LocalMIM ViT/README, Swin/README commands
        'vit': dict(blr=5e-4, warmup_epochs=20, min_lr=1e-5),  # lr 2e-3 at 1024
        'vit_large': dict(epochs=50, warmup_epochs=5, blr=7.5e-4, layer_decay=0.75, drop_path=0.2,
                          batch_size=64, accum_iter=2),  # lr 3e-3 at 1024
        'swin': dict(blr=1e-3, layer_decay=0.9, warmup_epochs=20, min_lr=2.5e-7,
                     swin_head='pool_norm'),  # lr 4e-3 at 1024; Swin/run_finetune.py defaults
        'swin_large': dict(blr=2.5e-4, layer_decay=0.8, drop_path=0.3, window_size=14,
                           batch_size=32, accum_iter=8)}},  # lr 2e-3 at 32 x 8 x 8
    # open-mmlab/mmpretrain configs/mff/benchmarks/vit-base-p16_8xb128-coslr-100e_in1k.py
    'mff': {'finetune': {'vit': dict(blr=5e-4, layer_decay=0.65)}},  # lr 2e-3 at 1024
}
# ours: a couple of minutes on 2 CPU cores; without --ckpt the encoder of the pre-training scripts'
# smoke presets (8-px patches at 64 px, 4 blocks of width 96), with --ckpt the checkpoint's
SMOKE = dict(model='vit_tiny', patch_size=8, embed_dim=96, depth=4, num_heads=3, res=64,
             batch_size=64, accum_iter=1, epochs=4, warmup_epochs=1, window_size=4, num_workers=2,
             log_freq=8)
CKPT_SIZES = ('model', 'patch_size', 'embed_dim', 'depth', 'num_heads')  # --ckpt's or --model's win
METHOD_RECIPE = {'mae': 'mae', 'hpm': 'hpm', 'fastmim': 'fastmim', 'localmim': 'localmim',
                 'mff': 'mff', 'efficient_mae': 'mae'}  # Efficient MAE publishes none: MAE's
TIMM_SWIN_WINDOW = 7  # timm names: swin_*_patch4_window7_224; other windows go to OUT.json


# ----------------------------------------------------------------------------- models

def model_config(args):
    """Constructor kwargs: the preset overridden by --patch-size/--embed-dim/--depth/--num-heads,
    the pre-training scripts' rule (common.encoder_config)."""
    return encoder_config(args)


class SwinClassifier(SwinTransformer):
    """Swin with the classifier head a method fine-tunes with (`--swin-head`).

    'norm': final norm, then average pool (Swin, timm); 'fc_norm': a fresh fc_norm instead of the
    final norm, then pool (ggjy/FastMIM.pytorch mim_swin_finetune.py); 'pool_norm': pool, then the
    norm (Haoqing-Wang/LocalMIM Swin/models_swin.py), each in SwinTransformer.forward_features.
    """

    def __init__(self, *args, head_norm='norm', **kwargs):
        super().__init__(*args, **kwargs)
        if head_norm not in ('norm', 'fc_norm', 'pool_norm'):
            raise ValueError(f'unknown --swin-head {head_norm!r}; use norm, fc_norm or pool_norm')
        self.head_norm = head_norm
        if head_norm == 'fc_norm':
            self.norm, self.fc_norm = nn.Identity(), nn.LayerNorm(self.num_features)

    def forward(self, imgs):
        """imgs (B, 3, H, W) -> logits (B, classes); the pooled features (B, C) without a head."""
        if self.head_norm == 'pool_norm':
            x = self.norm(self.forward_features(imgs, final_norm=False).mean(1))  # (B, C)
        elif self.head_norm == 'fc_norm':
            x = self.fc_norm(self.forward_features(imgs)).mean(1)  # (B, C); `norm` is the identity
        else:
            x = self.forward_features(imgs).mean(1)  # (B, C)
        return self.head(x) if self.head is not None else x


def build_encoder(args, num_classes=0, pool='token', drop_path=0.0, swin_head='norm'):
    """The ViT (timm names, learnable pos-embed) or Swin (Microsoft layout) of --model at --res."""
    cfg = model_config(args)
    if args.model.startswith('vit'):
        return VisionTransformer(args.res, drop_path=drop_path, global_pool=pool,
                                 num_classes=num_classes, learnable_pos=True, **cfg)
    return SwinClassifier(args.res, window_size=args.window_size, drop_path=drop_path,
                          num_classes=num_classes, head_norm=swin_head, **cfg)


def encoder_features(enc, imgs, pool='cls', layer=None):
    """Frozen features (B, D) after block `layer` (1-based): ViT cls token after the final norm, or
    mean patch token + affine-free LayerNorm (MAE linprobe's --global_pool); Swin: normed mean."""
    if isinstance(enc, SwinTransformer):
        return enc.forward_features(imgs).mean(1)  # (B, C)
    x = enc.embed(imgs)  # (B, 1+L, D)
    for blk in enc.blocks[:layer]:
        x = blk(x)
    if pool == 'cls':
        return enc.norm(x)[:, 0]  # (B, D)
    return F.layer_norm(x[:, 1:].mean(1), (x.shape[-1],), eps=1e-6)  # (B, D)


class Probe(nn.Module):
    """Linear probe (MAE main_linprobe.py): frozen encoder -> BatchNorm1d (no affine) -> Linear."""

    def __init__(self, encoder, dim, num_classes, pool='cls', layer=None):
        super().__init__()
        self.encoder, self.pool, self.layer = encoder, pool, layer
        self.encoder.requires_grad_(False)
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6),
                                  nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self.head[1].weight, std=0.01)  # MoCo v3 / MAE linprobe init
        nn.init.zeros_(self.head[1].bias)

    def train(self, mode=True):
        """Only the head trains; the encoder stays in eval mode."""
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, imgs):
        """imgs (B, 3, H, W) -> logits (B, classes)."""
        with torch.no_grad():
            f = encoder_features(self.encoder, imgs, self.pool, self.layer)
        return self.head(f)


class LARS(torch.optim.Optimizer):
    """LARS of MAE util/lars.py (from MoCo v3): momentum SGD; every >1-D tensor's update is weight-
    decayed and scaled by trust * |w| / |update|; 1-D tensors (BatchNorm, biases) are not."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        """One LARS update of every parameter that has a gradient."""
        for g in self.param_groups:
            for p in g['params']:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=g['weight_decay'])
                    w, u = torch.norm(p), torch.norm(d)
                    d = d * torch.where((w > 0) & (u > 0), g['trust_coefficient'] * w / u,
                                        torch.ones_like(w))
                mu = self.state[p].setdefault('mu', torch.zeros_like(p))
                mu.mul_(g['momentum']).add_(d)
                p.add_(mu, alpha=-g['lr'])


def vit_no_decay(name, param):
    """No weight decay in MAE fine-tuning: 1-D tensors, biases, pos_embed, cls_token."""
    return param.ndim <= 1 or name.endswith('.bias') or name in ('pos_embed', 'cls_token')


def vit_layer_id(name, depth):
    """MAE/BEiT layer id (mae util/lr_decay.py:get_layer_id_for_vit; SimMIM adds mask_token):
    cls_token, pos_embed, patch_embed, mask_token 0; blocks.i -> i+1; the rest depth+1."""
    if name in ('cls_token', 'pos_embed', 'mask_token') or name.startswith('patch_embed'):
        return 0
    if name.startswith('blocks.'):
        return int(name.split('.')[1]) + 1
    return depth + 1


def swin_layer_id(name, depths):
    """Swin layer id as microsoft/SimMIM optimizer.py:get_swin_layer (FastMIM, LocalMIM alike):
    block b of stage s -> sum(depths[:s]) + b + 1, its downsample the id of its last block."""
    if name == 'mask_token' or name.startswith('patch_embed'):
        return 0
    if name.startswith('layers.'):
        parts = name.split('.')
        s = int(parts[1])
        if parts[2] == 'downsample':
            return sum(depths[:s + 1])
        return sum(depths[:s]) + int(parts[3]) + 1
    return sum(depths) + 1


def layer_decay_groups(model, weight_decay, no_decay, layer_id, decay, num_layers=None):
    """AdamW groups `layer_{id}_{decay|no_decay}`, lr_scale decay^(num_layers - id), num_layers
    by default the top id (facebookresearch/mae util/lr_decay.py:param_groups_lrd)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ids = {n: layer_id(n) for n, _ in named}
    top = max(ids.values()) if num_layers is None else num_layers
    groups = {}
    for n, p in named:
        skip = no_decay(n, p)
        key = f'layer_{ids[n]}_{"no_decay" if skip else "decay"}'
        if key not in groups:
            groups[key] = {'name': key, 'params': [], 'weight_decay': 0.0 if skip else weight_decay,
                           'lr_scale': decay ** (top - ids[n])}
        groups[key]['params'].append(p)
    return list(groups.values())


def finetune_groups(model, args):
    """Layer-decay AdamW groups: ViT as in MAE util/lr_decay.py:param_groups_lrd, original-layout
    Swin as in ggjy/FastMIM.pytorch util/lr_decay.py:get_layer_id_for_swin."""
    if isinstance(model, SwinTransformer):
        depths = model.depths
        return layer_decay_groups(model, args.weight_decay, vit_no_decay,
                                  partial(swin_layer_id, depths=depths), args.layer_decay,
                                  num_layers=sum(depths) + 1)
    depth = len(model.blocks)
    return layer_decay_groups(model, args.weight_decay, vit_no_decay,
                              partial(vit_layer_id, depth=depth), args.layer_decay,
                              num_layers=depth + 1)


# ----------------------------------------------------------------------------- checkpoints

def detect_recipe(obj, sd):
    """The recipe of a checkpoint: ours by its `args.method`, official ones by their keys."""
    a = obj.get('args') if isinstance(obj, dict) else None
    a = vars(a) if isinstance(a, argparse.Namespace) else a
    if isinstance(a, dict) and a.get('method') == 'finetune' and a.get('recipe') in RECIPES:
        return a['recipe']
    if isinstance(a, dict) and a.get('method') in METHOD_RECIPE:
        return METHOD_RECIPE[a['method']]
    return official_layout(sd)


def infer_model(sd):
    """The preset whose shapes match a state dict (timm or Microsoft names, any prefix), or None."""
    sd = mmpretrain_vit_to_timm(sd) if any(k.startswith('backbone.') for k in sd) else sd
    sd = {re.sub(r'^encoder\.', '', k): v for k, v in sd.items()}
    if 'patch_embed.proj.weight' in sd and 'cls_token' in sd:
        D, depth = sd['cls_token'].shape[-1], len({k.split('.')[1] for k in sd
                                                   if k.startswith('blocks.')})
        return next((n for n, c in VIT_PRESETS.items()
                     if c['embed_dim'] == D and c['depth'] == depth), None)
    if 'patch_embed.proj.weight' in sd and any(k.startswith('layers.') for k in sd):
        C = sd['patch_embed.proj.weight'].shape[0]
        depths = tuple(len({k.split('.')[3] for k in sd if k.startswith(f'layers.{s}.blocks.')})
                       for s in range(4))
        return next((n for n, c in SWIN_PRESETS.items()
                     if c['embed_dim'] == C and tuple(c['depths']) == depths), None)
    return None


def plain_args(obj):
    """The `args` of a checkpoint as a dict (ours: a dict; MAE family: a Namespace), else {}."""
    a = obj.get('args') if isinstance(obj, dict) else None
    return vars(a) if isinstance(a, argparse.Namespace) else (a if isinstance(a, dict) else {})


# ----------------------------------------------------------------------------- data

def finetune_transform(res, randaug=True, reprob=0.25, scale=(0.08, 1.0), mean=IMAGENET_MEAN,
                       std=IMAGENET_STD):
    """timm create_transform(is_training) as MAE fine-tuning uses it: RandomResizedCrop(0.08-1,
    bicubic), flip, RandAugment, normalise, random erasing (pixel mode)."""
    from torchvision.transforms import InterpolationMode, v2
    ops = [v2.ToImage(),
           v2.RandomResizedCrop(res, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC),
           v2.RandomHorizontalFlip()]
    if randaug:  # ~ timm rand-m9-mstd0.5-inc1: magnitude 9 of 10 (11 bins), no magnitude noise
        fill = [round(255 * m) for m in mean]  # timm fills with the mean pixel
        ops.append(v2.RandAugment(num_ops=2, magnitude=9, num_magnitude_bins=11,
                                  interpolation=InterpolationMode.BILINEAR, fill=fill))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if reprob > 0:  # timm RandomErasing(mode='pixel'): per-pixel normal noise after normalisation
        ops.append(v2.RandomErasing(p=reprob, value='random'))
    return v2.Compose(ops)


def linear_transform(res, scale=(0.08, 1.0), mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """MAE linear probing: RandomResizedCrop(0.08-1, bicubic) + flip + normalise."""
    from torchvision.transforms import InterpolationMode, v2
    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(res, scale=tuple(scale),
                                                          interpolation=InterpolationMode.BICUBIC),
                       v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(mean, std)])


def splits(args):
    """(train, val, classes) from <data>/train and /val, a named set's train and test splits, else
    the built-in SyntheticShapes."""
    if named_set(args.data_path):
        return eval_datasets(args)
    if args.data_path:
        train, val = image_folder(args.data_path, 'train'), image_folder(args.data_path, 'val')
        if train.classes != val.classes:
            raise ValueError(f'{args.data_path}/train and /val have different class folders '
                             f'({len(train.classes)} vs {len(val.classes)}); they must match')
        return train, val, len(train.classes)
    train = SyntheticShapes('train', args.synthetic_size, args.res, args.seed)
    return (train, SyntheticShapes('val', args.synthetic_val_size, args.res, args.seed),
            len(SyntheticShapes.classes))


def mix_batch(imgs, labels, num_classes, args):
    """Mixup or CutMix (probability 0.5 each, one lambda per batch: timm Mixup mode 'batch'), then
    smoothing by hand, y = (1 - s) y_mix + s / K (= timm's smooth-then-mix) -> (imgs, (B, K))."""
    from torchvision.transforms import v2
    ops = ([v2.MixUp(alpha=args.mixup, num_classes=num_classes)] if args.mixup > 0 else []) + \
          ([v2.CutMix(alpha=args.cutmix, num_classes=num_classes)] if args.cutmix > 0 else [])
    imgs, y = v2.RandomChoice(ops)(imgs, labels)  # the global RNG, seeded per step and rank
    return imgs, y * (1 - args.smoothing) + args.smoothing / num_classes


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, loader, device, amp, world):
    """Top-1 and top-5 accuracy (percent) over the whole val set; counts are summed over ranks."""
    was = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, images
    for imgs, labels, _ in loader:
        imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(imgs)
        hit = (logits.float().topk(min(5, logits.shape[1]), dim=1).indices
               == labels[:, None])  # (B, 5); a skipped image (label -1) hits nothing
        counts += torch.stack([hit[:, 0].sum(), hit.any(1).sum(),
                               (labels >= 0).sum()]).double()  # and is not counted
    if world > 1:
        dist.all_reduce(counts)
    model.train(was)
    return (100 * counts[0] / counts[2]).item(), (100 * counts[1] / counts[2]).item()


# ----------------------------------------------------------------------------- modes

def load_pretrained(model, args, obj, fresh, level_norm):
    """Encoder weights from --ckpt (when given) via common.load_encoder."""
    if obj is None:
        print0('no --ckpt: the encoder starts from random init (the baseline)')
        return
    print0(f'loading {args.ckpt} (recipe {args.recipe})')
    load_encoder(model, obj, teacher=args.teacher, merge_permute=args.permute_merge,
                 table_mode=args.table_resize, fresh=fresh, level_norm=level_norm, log=print0)


def append_log(args, row):
    """Append one JSON row to <output-dir>/log.jsonl (first process only)."""
    if int(os.environ.get('RANK', 0)) == 0:
        with open(os.path.join(args.output_dir, 'log.jsonl'), 'a') as f:
            f.write(json.dumps(row) + '\n')


def finish(args, top1, top5, **extra):
    """Print `top1 <n>` / `top5 <n>` and append them to log.jsonl."""
    row = dict(mode=args.mode, top1=round(top1, 4), top5=round(top5, 4), **extra)
    append_log(args, row)
    print0(f'top1 {top1:.2f}')
    print0(f'top5 {top5:.2f}')
    return row


def knn_stamp(args, train, val, device):
    """What the cached k-NN features depend on: the encoder file's content, every flag that
    changes the encoder or its features, the precision, and each image's file and label."""
    import hashlib
    files = hashlib.sha256()
    for base in (train, val):  # ImageFolder: its (path, label) list; SyntheticShapes: n, res, seed
        samples = (getattr(base, 'samples', None) or  # a named set: its md5-checked files
                   ([type(base).__name__, base.root, repr(base), len(base)]
                    if named_set(args.data_path) else [(base.n, base.res, base.seed)]))
        files.update(json.dumps(samples).encode())
    return plain_data(dict(
        ckpt=args.ckpt_content, teacher=args.teacher, model=args.model, cfg=model_config(args),
        res=args.res, mean_std=mean_std(args), window=args.window_size,
        permute_merge=args.permute_merge, table_resize=args.table_resize, pool=args.pool,
        layer=args.probe_layer,
        dtype=str(autocast_dtype(args.precision, device)), files=files.hexdigest()))


def run_knn(args, obj, rank, world, device):
    """k-NN mode: features of train and val once (cached), then DINO's vote for every k."""
    train, val, K = splits(args)
    enc = build_encoder(args)
    load_pretrained(enc, args, obj, fresh=(), level_norm=True)
    enc = enc.to(device).eval()
    cache = os.path.join(args.output_dir, 'knn_features.pth')
    stamp = knn_stamp(args, train, val, device)
    cached = (torch.load(cache, map_location='cpu', weights_only=True) if os.path.isfile(cache)
              else None)
    hit = torch.tensor(int(cached is not None and cached.get('stamp') == stamp), device=device)
    if world > 1:  # every rank must take the same branch (the extraction below has collectives)
        dist.all_reduce(hit, op=dist.ReduceOp.MIN)
    if hit.item():
        print0(f'features from {cache}')
        feats = {k: v.to(device) for k, v in cached.items() if k != 'stamp'}
    else:
        amp = autocast_dtype(args.precision, device)
        fn = partial(encoder_features, enc, pool=args.pool, layer=args.probe_layer)
        feats = {}
        for name, base in (('train', train), ('val', val)):  # DINO: eval transform for both
            feats[name], feats[name + '_labels'] = extract_features(
                fn, eval_loader(base, args, rank, world, device), device, amp, world, len(base))
        complete = len(feats['train']) == len(train) and len(feats['val']) == len(val)
        if rank == 0 and complete:  # with skipped images: read them again once they are fixed
            save_atomic({'stamp': stamp, **{k: v.cpu() for k, v in feats.items()}}, cache)
    best = None
    for k in [int(v) for v in str(args.nb_knn).split(',')]:
        top1, top5 = knn_classify(feats['train'], feats['train_labels'], feats['val'],
                                  feats['val_labels'], k, args.temperature, K)
        print0(f'k-NN k={k} T={args.temperature}: top1 {top1:.2f} top5 {top5:.2f}')
        append_log(args, dict(mode='knn', k=k, top1=round(top1, 4), top5=round(top5, 4)))
        if best is None or top1 > best[1]:
            best = (k, top1, top5)
    print0(f'best k = {best[0]} (the HPM supplement reports the best k)')
    return finish(args, best[1], best[2], k=best[0])


class Numbered(torch.utils.data.Dataset):
    """Items (image, i) of a dataset: the index in place of the label, so that extract_features
    returns which images were read (one --skip-bad-images skipped is left out)."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i][0], i


def cls_and_avg(enc, imgs, layer=None):
    """imgs (B, 3, H, W) -> (B, 2D): encoder_features' cls and avg side by side, from one pass of
    the blocks (ViT); Swin: (B, C), its normed patch mean (no cls token)."""
    if isinstance(enc, SwinTransformer):
        return encoder_features(enc, imgs)
    x = enc.embed(imgs)  # (B, 1+L, D)
    for blk in enc.blocks[:layer]:
        x = blk(x)
    avg = F.layer_norm(x[:, 1:].mean(1), (x.shape[-1],), eps=1e-6)  # (B, D)
    return torch.cat([enc.norm(x)[:, 0], avg], dim=1)  # (B, 2D)


def run_features(args, obj, rank, world, device):
    """features mode: the encoder's cls and average-pooled features of every image under
    --data-path, in the folder's order, with the paths (and labels), to <output-dir>/features.pt.
    Under torchrun each process embeds its share and the first process writes the file."""
    base = image_folder(args.data_path)
    print0(data_line(base, args))
    enc = build_encoder(args)
    load_pretrained(enc, args, obj, fresh=(), level_norm=True)
    enc = enc.to(device).eval()
    fn = partial(cls_and_avg, enc, layer=args.probe_layer)
    feats, index = extract_features(fn, eval_loader(Numbered(base), args, rank, world, device),
                                    device, autocast_dtype(args.precision, device), world,
                                    len(base), normalize=False)
    feats, index = feats.cpu(), index.cpu()
    out = dict(paths=[base.samples[i][0] for i in index.tolist()], ckpt=args.ckpt, res=args.res,
               mean=mean_std(args)[0], std=mean_std(args)[1], layer=args.probe_layer)
    if isinstance(enc, SwinTransformer):
        out['avg'] = feats  # (N, C)
    else:
        out['cls'], out['avg'] = (f.contiguous() for f in feats.chunk(2, dim=1))  # (N, D) each
    if base.classes:  # class folders: their labels and names
        out['labels'] = torch.as_tensor(base.targets)[index]  # (N,)
        out['classes'] = list(base.classes)
    if len(index) < len(base):
        print0(f'note: {len(base) - len(index)} unreadable image(s) left out (--skip-bad-images)')
    path = os.path.join(args.output_dir, 'features.pt')
    if rank == 0:
        save_atomic(out, path)
    shapes = ', '.join(f'{k} {tuple(out[k].shape)}' for k in ('cls', 'avg', 'labels') if k in out)
    print0(f'wrote {path}: {shapes}, {len(out["paths"])} paths'
           + (f', {len(out["classes"])} classes' if 'classes' in out else ' (no labels)'))
    return out


class Finetuner(nn.Module):
    """What common.train runs for --mode finetune and linear (loop hooks of common.py): a classifier
    (ViT, Swin or Probe) with its loss, mixup/cutmix, optional EMA, evaluation, best top-1."""

    takes_labels = True

    def __init__(self, net, args, num_classes, val_loader, device, world):
        super().__init__()
        self.net, self.args, self.num_classes = net, args, num_classes
        self.val_loader, self.device, self.world = val_loader, device, world
        self.amp = autocast_dtype(args.precision, device)
        self.mixing = args.mode == 'finetune' and (args.mixup > 0 or args.cutmix > 0)
        self.smoothing = args.smoothing if args.mode == 'finetune' else 0.0
        self.ema = None
        if args.model_ema:  # timm ModelEmaV2 over the whole state dict
            self.ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
        self.best = {'top1': -1.0, 'top5': 0.0, 'epoch': -1}
        self.last = None  # (top1, top5) of the latest evaluation
        self.unevaluated = False  # trained since the latest evaluation

    def state_dict(self, *args, **kwargs):
        """The classifier's state dict, no `net.` prefix (MAE's fine-tuning checkpoint keys)."""
        return self.net.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict=True):
        """Load the classifier's state dict."""
        return self.net.load_state_dict(state_dict, strict)

    def forward(self, imgs, keys=None, labels=None):
        """imgs (B, 3, H, W), labels (B,) -> dict(loss): cross-entropy with label smoothing, or the
        soft-target cross-entropy of mixed images (timm SoftTargetCrossEntropy)."""
        if self.mixing:
            imgs, target = mix_batch(imgs, labels, self.num_classes, self.args)
        logits = self.net(imgs)
        if self.mixing:
            loss = torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        else:
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.smoothing)
        return {'loss': loss}

    def make_optimizer(self, args, fused):
        """AdamW (0.9, 0.999) with layer decay (finetune); LARS or SGD on the head (linear)."""
        if args.mode == 'finetune':
            return torch.optim.AdamW(finetune_groups(self.net, args), lr=args.lr,
                                     betas=(0.9, 0.999), fused=fused)
        if args.optimizer == 'lars':
            return LARS(self.net.head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        return torch.optim.SGD(self.net.head.parameters(), lr=args.lr, momentum=0.9,
                               weight_decay=args.weight_decay)  # HPM main_linprob.py

    @torch.no_grad()
    def after_step(self):
        """EMA update: ema <- lerp(ema, weights, 1 - decay); integer buffers are copied."""
        self.unevaluated = True
        if self.ema is None:
            return
        for k, v in self.net.state_dict().items():
            if v.dtype.is_floating_point:
                self.ema[k].lerp_(v, 1 - self.args.model_ema_decay)
            else:
                self.ema[k].copy_(v)

    def evaluate(self, epoch):
        """Top-1/top-5 on the val set (and of the EMA); 'best' if top-1 beats all earlier epochs."""
        top1, top5 = evaluate(self.net, self.val_loader, self.device, self.amp, self.world)
        row = {'top1': round(top1, 4), 'top5': round(top5, 4)}
        if self.ema is not None:
            ema_net = copy.deepcopy(self.net)
            ema_net.load_state_dict(self.ema)
            ema_top = evaluate(ema_net, self.val_loader, self.device, self.amp, self.world)
            row['top1_ema'], row['top5_ema'] = round(ema_top[0], 4), round(ema_top[1], 4)
        is_best = top1 > self.best['top1']
        if is_best:
            self.best = {'top1': top1, 'top5': top5, 'epoch': epoch}
        row['best_top1'] = round(self.best['top1'], 4)
        print0(f'epoch {epoch}: top1 {top1:.2f} top5 {top5:.2f} (best {self.best["top1"]:.2f})')
        self.last, self.unevaluated = (top1, top5), False
        return {**row, 'best': is_best}

    def extra_state(self):
        """The best top-1 so far, and the EMA weights with --model-ema."""
        state = {'best': dict(self.best), 'unevaluated': self.unevaluated}
        if self.ema is not None:
            state['model_ema'] = self.ema
        return state

    def load_extra_state(self, checkpoint):
        """Read back the best top-1 and the EMA weights."""
        self.best = checkpoint.get('best', self.best)
        self.unevaluated = checkpoint.get('unevaluated', False)
        self.saved_epoch = checkpoint['epoch']
        if self.ema is not None and 'model_ema' in checkpoint:
            self.ema = {k: v.to(self.device) for k, v in checkpoint['model_ema'].items()}

    def describe(self):
        """The classes and images of the run."""
        n_val = len(self.val_loader.dataset) * self.world
        return f'{self.args.mode}: {self.num_classes} classes, about {n_val} val images'


def run_training(args, obj, rank, world, device):
    """finetune and linear: build the classifier, load the encoder, train through common.train."""
    train_base, val_base, K = splits(args)
    last_path = os.path.join(args.output_dir, 'checkpoint-last.pth')
    resuming = args.resume or os.path.isfile(last_path)  # the checkpoint brings its own weights
    if args.mode == 'finetune':
        pool = 'avg' if args.pool == 'avg' else 'token'
        net = build_encoder(args, K, pool, args.drop_path, args.swin_head)
        if not resuming:
            pool_norm = args.swin_head == 'pool_norm'
            fresh = ('fc_norm', 'head', 'norm') if pool_norm else ('fc_norm', 'head')
            load_pretrained(net, args, obj, fresh=fresh, level_norm=not pool_norm)
            nn.init.trunc_normal_(net.head.weight, std=2e-5)  # as MAE main_finetune.py:main
            nn.init.zeros_(net.head.bias)
    else:
        enc = build_encoder(args)
        if not resuming:
            load_pretrained(enc, args, obj, fresh=(), level_norm=True)
        dim = enc.num_features if isinstance(enc, SwinTransformer) else enc.embed_dim
        net = Probe(enc, dim, K, args.pool, args.probe_layer)
    val_loader = eval_loader(val_base, args, rank, world, device)
    model = Finetuner(net.to(device), args, K, val_loader, device, world)
    if args.mode == 'finetune':
        transform = finetune_transform(args.res, args.randaug, args.reprob, args.rrc_scale,
                                       *mean_std(args))
    else:
        transform = linear_transform(args.res, args.rrc_scale, *mean_std(args))
    model = train(model, args,
                  lambda a: KeyedDataset(train_base, transform, a.seed, a.skip_bad_images))
    if args.benchmark_data:  # train() timed the input pipeline alone: its JSON row
        return model
    best_path = os.path.join(args.output_dir, 'checkpoint-best.pth')
    if model.run_end['reason'] == 'already_finished' and model.unevaluated:
        # saved before its final evaluation, which failed (e.g. an unreadable val image): run it
        saved = args.resume or last_path
        print0(f'the final evaluation of {saved} is missing: evaluating now')
        if model.evaluate(model.saved_epoch)['best'] and rank == 0:
            shutil.copyfile(saved, best_path)
        model.run_end['reason'] = 'evaluated'
    if model.run_end['reason'] in ('signal', 'already_finished'):
        return dict(model.best)
    top1, top5 = model.last
    print0(f'best top1 {model.best["top1"]:.2f} at epoch {model.best["epoch"]} ({best_path})')
    return finish(args, top1, top5, best_top1=round(model.best['top1'], 4),
                  step=model.run_end['step'])


def export_timm(args, obj):
    """--export-timm OUT.pth: the encoder in timm key names (Swin in timm's layout) + OUT.json with
    the timm.create_model kwargs that load it strictly (img_size, num_heads, window_size, ...)."""
    sd = strip_prefix(pick_state_dict(obj, args.teacher))
    avg = 'fc_norm.weight' in sd and args.model.startswith('vit')  # fine-tuned: avg pool, fc_norm
    enc = build_encoder(args, pool='avg' if avg else 'token')
    load_encoder(enc, obj, teacher=args.teacher, merge_permute=args.permute_merge,
                 table_mode=args.table_resize, fresh=(), level_norm=True, log=print0)
    cfg, out = model_config(args), enc.state_dict()
    if args.model.startswith('vit'):
        preset = VIT_PRESETS[args.model]
        name = f'{args.model}_patch{preset["patch_size"]}_224'
        kwargs = dict(img_size=args.res, num_classes=0, global_pool='avg' if avg else 'token',
                      num_heads=cfg['num_heads'])
    else:
        preset = dict(SWIN_PRESETS[args.model], patch_size=4)
        name = f'{args.model}_patch4_window{TIMM_SWIN_WINDOW}_224'
        out = swin_timm_keys(out, to_timm=True)
        kwargs = dict(img_size=args.res, num_classes=0, window_size=args.window_size)
    kwargs.update({k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()
                   if preset.get(k) != v})
    torch.save({k: v.contiguous() for k, v in out.items()}, args.export_timm)
    spec = dict(model_name=name, pretrained=False, **kwargs)
    json_path = os.path.splitext(args.export_timm)[0] + '.json'
    with open(json_path, 'w') as f:
        json.dump(spec, f, indent=1)
    print0(f'wrote {len(out)} tensors in timm names to {args.export_timm} and the create_model '
           f'kwargs to {json_path}:\n  timm.create_model(**json.load(open({json_path!r})))'
           f'.load_state_dict(torch.load({args.export_timm!r}))')
    return spec


# ----------------------------------------------------------------------------- command line

def canonical_model(name):
    """Official model name -> (our preset, window or None): vit_base_patch16 -> (vit_base, None),
    swin_base_patch4_window7_224 -> (swin_base, 7)."""
    m = re.match(r'(?:mim_|mae_|MIM_)?((?:vit|swin)_(?:tiny|small|base|large|huge))(.*)',
                 name or '')
    if not m:
        return name, None
    w = re.search(r'win(?:dow)?(\d+)', m[2])
    return m[1], int(w[1]) if w else None


def get_args(argv=None):
    """Parse the command line (common.run_parser plus fine-tuning's flags); resolve() fills the
    unset flags (smoke preset, recipe, mode defaults)."""
    p = run_parser('finetune', __doc__, notes=dict(
        res='default 224 (smoke: 64)', epochs='default: 100 finetune (50 ViT-L/H) / 90 linear '
        '(100 HPM)', warmup_epochs='default 5 / 10 (20 LocalMIM)',
        blr='MAE 5e-4, LARS 0.1; per recipe', min_lr='1e-6 finetune, 0 linear',
        weight_decay='0.05 finetune, 0 linear', accum_iter='per recipe',
        data_path='fine-tuning, linear probing and k-NN read <root>/train and <root>/val (a named '
        'set: its train and test splits; mean and std from --ckpt when it has them); --mode '
        'features reads the folder as pre-training does',
        mean='finetune.py: default the --ckpt\'s (its pre-training\'s)',
        std='finetune.py: default the --ckpt\'s',
        synthetic_size='the built-in val set has --synthetic-val-size',
        rrc_scale='default 0.08 1.0 (timm / MAE)', output_dir='default output/<mode>_<model>',
        save_freq='default none: checkpoint-last.pth and checkpoint-best.pth only',
        benchmark='1000 classes'))
    a = p.add_argument
    a('--mode', choices=('finetune', 'linear', 'knn', 'features'), default='finetune',
      help='default finetune; features: write the encoder\'s cls and average-pooled features of '
      'every image under --data-path (any depth; labels when it has class folders) with their '
      'paths to <output-dir>/features.pt, at the checkpoint\'s --res, mean and std unless given '
      '(works under torchrun: each process embeds its share, the first writes)')
    a('--ckpt', '--finetune', dest='ckpt',
      help='pre-trained checkpoint, ours or official (MAE spelling --finetune); none = random init')
    a('--recipe', choices=tuple(RECIPES), help='published recipe (default: by --ckpt, else mae)')
    a('--teacher', action='store_true', help='load the EMA teacher (HPM ema_state_dict, model_ema)')
    a('--model', help='preset: vit_tiny|vit_small|vit_base|vit_large|vit_huge|swin_tiny|swin_base|'
      'swin_large (or official names, e.g. vit_base_patch16); default: from --ckpt, else vit_base')
    a('--patch-size', dest='patch_size', type=int, help='override the preset (custom / tiny '
      'models); the four size flags default to those saved in one of our --ckpt files')
    a('--embed-dim', dest='embed_dim', type=int, help='override the preset width')
    a('--depth', help='override the preset depth (Swin: comma list per stage)')
    a('--num-heads', dest='num_heads', help='override the preset heads (Swin: comma list); FastMIM '
      'ViT-B is pre-trained with 6 (its mim_vit_pretrain.py), fine-tuned with 12')
    a('--window-size', '--window_size', dest='window_size', type=int, help='7; LocalMIM Swin-L 14')
    a('--layer-decay', '--layer_decay', dest='layer_decay', type=float,
      help='layer-wise lr decay, per recipe (MAE ViT-B: 0.65)')
    a('--drop-path', '--drop_path', dest='drop_path', type=float, help='stochastic depth (0.1)')
    a('--pool', choices=('avg', 'cls'), help='finetune avg (patch mean + fc_norm), linear/k-NN cls')
    a('--global_pool', dest='pool', action='store_const', const='avg', help=argparse.SUPPRESS)
    a('--cls_token', dest='pool', action='store_const', const='cls', help=argparse.SUPPRESS)
    a('--swin-head', dest='swin_head', choices=('norm', 'fc_norm', 'pool_norm'),
      help='Swin classifier: norm then pool (standard), fresh fc_norm then pool (FastMIM), pool '
      'then fresh norm (LocalMIM); default per recipe')
    a('--smoothing', type=float, help='label smoothing (default 0.1)')
    a('--mixup', type=float, help='mixup alpha (default 0.8; 0 = off)')
    a('--cutmix', type=float, help='cutmix alpha (default 1.0; 0 = off)')
    a('--reprob', type=float, help='random erasing probability (default 0.25)')
    a('--randaug', action=argparse.BooleanOptionalAction, default=None,
      help='RandAugment(2 ops, m9) (default on)')
    a('--aa', help='timm auto-augment: rand-m9-mstd0.5-inc1 = --randaug, none = --no-randaug')
    a('--model-ema', '--model_ema', dest='model_ema', action='store_true',
      help='keep and evaluate an EMA')
    a('--model-ema-decay', '--model_ema_decay', dest='model_ema_decay', type=float, default=0.9999,
      help='EMA decay')
    a('--optimizer', choices=('lars', 'sgd'), help='linear probe: lars (MAE, MFF) or sgd (HPM)')
    a('--probe-layer', dest='probe_layer', type=int,
      help='linear / k-NN / features: features after this block (1-based; default the last)')
    a('--nb-knn', '--nb_knn', dest='nb_knn', help='k values (default 10,20,100,200)')
    a('--temperature', type=float, help='k-NN vote temperature (default 0.07)')
    a('--table-resize', '--remap_mode', dest='table_resize', default='geometric',
      type=lambda s: {'simmim': 'geometric', 'interpolate': 'bicubic'}.get(s, s),
      choices=('geometric', 'bicubic'), help='Swin relative tables: geometric (default; FastMIM/'
      'SimMIM simmim) or bicubic (FastMIM interpolate)')
    a('--permute-merge', dest='permute_merge', action='store_true',
      help='LocalMIM pre-training merge TL,TR,BL,BR -> standard order (off: as official loader)')
    a('--export-timm', dest='export_timm', metavar='OUT.pth', help='write timm-named encoder, exit')
    a('--summary', metavar='DIR', help='print the final top-1 of every DIR/<encoder>/<protocol> run '
      'as a table, exit (the README comparison)')
    a('--synthetic-val-size', dest='synthetic_val_size', type=int, default=512,
      help='built-in val images')
    args = parse_run(p, argv)
    if args.aa is not None:
        fill_defaults(args, ('--aa', dict(randaug=args.aa.lower() not in ('none', ''))))
    return args


def resolve(args, obj):
    """Fill unset flags (common.fill_defaults): smoke preset, model (checkpoint or shapes), recipe
    (model, family, all), mode defaults."""
    if args.ckpt is None and args.export_timm:
        raise ValueError('--export-timm needs --ckpt')
    if args.mode == 'features' and (args.data_path is None or named_set(args.data_path)):
        raise ValueError('--mode features needs --data-path FOLDER, the images to embed (a '
                         'folder at any depth, or class folders)')
    if args.data_path is None and not args.export_timm:  # a checkpoint keeps its model
        fill_defaults(args, ('smoke', {k: v for k, v in SMOKE.items()
                                       if not (k in CKPT_SIZES and (obj is not None
                                                                    or args.model))}))
    sd = strip_prefix(pick_state_dict(obj, args.teacher)) if obj is not None else {}
    ck = plain_args(obj)
    if args.model is None and obj is not None:
        if ck.get('method') in METHOD_RECIPE or ck.get('method') == 'finetune':  # ours: its preset
            model = canonical_model(ck.get('model'))[0]
            size = ['patch_size', 'embed_dim', 'depth', 'num_heads']  # its encoder's size
            if ck.get('method') == 'finetune':
                size.append('window_size')
            elif ck.get('method') == 'fastmim' and ck.get('embed_dim') in (
                    None, VIT_PRESETS.get(model, {}).get('embed_dim')):
                size.remove('num_heads')  # ViT-B pre-trained with 6 heads, fine-tuned with 12
            fill_defaults(args, ('ckpt', dict(model=model, **{k: ck.get(k) for k in size})))
        if args.model is None:
            fill_defaults(args, ('ckpt', dict(model=infer_model(sd))))
        if args.model is None:
            raise ValueError(f'cannot tell the model of {args.ckpt} from its shapes; pass --model '
                             f'(and --embed-dim/--depth/--num-heads for a custom size)')
    # the normalisation the encoder was pre-trained with (its checkpoint's args), else the data's
    fill_defaults(args, ('ckpt', {k: ck.get(k) for k in ('mean', 'std')}), dataset_defaults(args),
                  ('default', dict(model='vit_base', mean=list(IMAGENET_MEAN),
                                   std=list(IMAGENET_STD))))
    args.model, window = canonical_model(args.model)
    if args.model not in VIT_PRESETS and args.model not in SWIN_PRESETS:
        raise ValueError(f'unknown --model {args.model}; choose one of '
                         f'{", ".join([*VIT_PRESETS, *SWIN_PRESETS])}')
    fill_defaults(args, ('model name', dict(window_size=window)))
    if args.export_timm or args.mode == 'features':  # the checkpoint's geometry unless told
        geometry = {}
        if 'pos_embed' in sd and args.model.startswith('vit'):
            geometry['res'] = math.isqrt(sd['pos_embed'].shape[1] - 1) * (
                args.patch_size or VIT_PRESETS[args.model]['patch_size'])
        tables = [v for k, v in sd.items() if k.endswith('relative_position_bias_table')]
        if tables:
            geometry['window_size'] = (math.isqrt(tables[0].shape[0]) + 1) // 2
        if ck.get('num_heads') and args.model.startswith('vit'):
            geometry['num_heads'] = ck['num_heads']  # e.g. FastMIM's 6-head ViT-B
        fill_defaults(args, ('ckpt', geometry), ('ckpt', dict(res=ck.get('res'))),
                      ('default', dict(res=224)))
    if args.recipe is None:
        fill_defaults(args, ('ckpt', dict(recipe=detect_recipe(obj, sd))) if obj is not None
                      else ('default', dict(recipe='mae')))
    family = 'vit' if args.model.startswith('vit') else 'swin'
    table = RECIPES[args.recipe].get(args.mode, {})
    recipe = f'recipe({args.recipe} {args.mode}'
    # the recipe's effective batch (common.batch_note); none for the smoke preset and k-NN
    rows = (table.get(args.model, {}), table.get(family, {}), table.get('all', {}),
            MODE_DEFAULTS[args.mode])
    batch, accum = (next((row[k] for row in rows if k in row), 1) for k in ('batch_size',
                                                                             'accum_iter'))
    args.recipe_batch = (batch * accum * RECIPE_PROCESSES if args.data_path and args.mode != 'knn'
                         else None)
    return fill_defaults(args, (f'{recipe} {args.model})', table.get(args.model, {})),
                         (f'{recipe} {family})', table.get(family, {})),
                         (f'{recipe})', table.get('all', {})),
                         (f'mode({args.mode})', MODE_DEFAULTS[args.mode]),
                         ('default', dict(res=224, num_workers=8, log_freq=20,
                                          rrc_scale=(0.08, 1.0),
                                          output_dir=f'output/{args.mode}_{args.model}')))


def fraction(v):
    """True for a number in [0, 1)."""
    return 0 <= v < 1


# The pre-training scripts' number rules, and fine-tuning's own.
FINETUNE_RULES = {
    **{k: rule for k, rule in NUMBER_RULES.items() if k != 'num_heads'},  # a list for Swin
    'synthetic_val_size': (lambda v: v >= 1, '1 or more images'),
    'layer_decay': (lambda v: 0 < v <= 1, 'a factor in (0, 1] such as 0.65 (1 = none)'),
    'drop_path': (fraction, 'a probability in [0, 1) such as 0.1'),
    'smoothing': (fraction, 'a fraction in [0, 1) such as 0.1'),
    'mixup': (lambda v: v >= 0, '0 (off) or a positive alpha such as 0.8'),
    'cutmix': (lambda v: v >= 0, '0 (off) or a positive alpha such as 1.0'),
    'reprob': (lambda v: 0 <= v <= 1, 'a probability in [0, 1] such as 0.25'),
    'model_ema_decay': (fraction, 'a decay in [0, 1) such as 0.9999'),
    'temperature': (lambda v: v > 0, 'a positive temperature such as 0.07'),
    'probe_layer': (lambda v: v >= 1, 'a block number from 1'),
}


def validate(args):
    """Check sizes and ranges before anything is printed."""
    cfg = model_config(args)
    if args.model.startswith('vit'):
        if args.res % cfg['patch_size']:
            raise ValueError(f'res {args.res} is not divisible by patch {cfg["patch_size"]}; use a '
                             f'multiple of {cfg["patch_size"]}')
        if args.probe_layer is not None and not 1 <= args.probe_layer <= cfg['depth']:
            raise ValueError(f'--probe-layer {args.probe_layer} is out of range; the model has '
                             f'{cfg["depth"]} blocks')
    else:
        if args.probe_layer is not None:
            raise ValueError('--probe-layer applies to ViT only (Swin features are the normed '
                             'final stage)')
        S = len(cfg['depths'])
        SwinTransformer(args.res, cfg['patch_size'], 1, (1,) * S, (1,) * S,
                        args.window_size)  # checks res, window
    check_run_args(args, FINETUNE_RULES)
    if args.export_timm:
        out = os.path.abspath(args.export_timm)
        folder = os.path.dirname(out)
        for path in (out, os.path.splitext(out)[0] + '.json'):
            if os.path.isdir(path):
                raise ValueError(f'--export-timm {args.export_timm}: {path} is a folder; give a '
                                 f'file name such as {os.path.join(args.export_timm, "enc.pth")}')
        if not os.path.isdir(folder):
            raise ValueError(f'--export-timm {args.export_timm}: its folder does not exist; '
                             f'create it or write elsewhere')
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ValueError(f'--export-timm {args.export_timm}: its folder {folder} cannot be '
                             f'written; write elsewhere')
    if args.mode == 'knn' and not all(v.strip().isdigit() and int(v) > 0
                                      for v in str(args.nb_knn).split(',')):
        raise ValueError(f'--nb-knn {args.nb_knn} must be positive integers separated by commas, '
                         f'e.g. 10,20,100,200')
    if args.data_path and not named_set(args.data_path) and not args.export_timm and \
            args.mode != 'features':
        for split in ('train', 'val'):
            if not os.path.isdir(os.path.join(args.data_path, split)):
                raise ValueError(f'no {split}/ folder in --data-path {args.data_path}; '
                                 f'fine-tuning, linear probing and k-NN read <root>/train '
                                 f'and <root>/val')
    if args.resume and not os.path.isfile(args.resume):
        raise ValueError(f'--resume {args.resume} does not exist')


def summary(root):
    """A markdown table of the comparison loop under root: per encoder, the k-NN monitor's first and
    last scores of its pre-training run (root/<encoder>/log.jsonl) and the final top-1 of every
    root/<encoder>/<protocol>/log.jsonl; rows and columns in the order the runs were made."""
    logs = sorted(glob.glob(os.path.join(root, '*', '*', 'log.jsonl')) +
                  glob.glob(os.path.join(root, '*', 'log.jsonl')), key=os.path.getmtime)
    if not logs:
        raise ValueError(f'--summary {root}: no <encoder>/<protocol>/log.jsonl under it; give the '
                         f'folder the comparison loop wrote')
    cells = {}
    for path in logs:
        parts = os.path.relpath(path, root).split(os.sep)
        if len(parts) == 2:  # a pre-training run: its k-NN monitor at step 0 and at the end
            knn = [r for _, r in read_log(path) if r.get('event') == 'knn']
            if knn:
                for name, r in (('k-NN cls / avg at init', knn[0]),
                                ('k-NN cls / avg pre-trained', knn[-1])):
                    cells.setdefault(parts[0], {})[name] = \
                        f'{r["knn_cls"]:.1f} / {r["knn_avg"]:.1f}'
            continue
        rows = [r for _, r in read_log(path) if 'top1' in r]  # blank lines skipped
        cells.setdefault(parts[0], {})[parts[1]] = f'{rows[-1]["top1"]:.1f}' if rows else '-'
    columns = list(dict.fromkeys(p for row in cells.values() for p in row))
    lines = ['| encoder | ' + ' | '.join(columns) + ' |', '|---' * (len(columns) + 1) + '|']
    lines += [f'| {e} | ' + ' | '.join(row.get(c, '-') for c in columns) + ' |'
              for e, row in cells.items()]
    return '\n'.join(lines)


def run(argv=None):
    """Parse, resolve, validate, then export, k-NN, or train (finetune / linear)."""
    args = get_args(argv)
    if args.summary:
        text = summary(args.summary)
        print(text)
        return text
    obj = load_file(args.ckpt) if args.ckpt else None
    if obj is not None and not isinstance(obj, dict):
        raise ValueError(f'--ckpt {args.ckpt} holds a {type(obj).__name__}, not a checkpoint or a '
                         f'state dict; give the file a pre-training run or a release wrote')
    resolve(args, obj)
    validate(args)
    resolve_accum(args, launched_world())
    # the encoder's content, not its name, defines the run (resume, k-NN cache): a file replaced
    # under the same name is another run; a copy elsewhere is the same
    args.ckpt_content = file_fingerprint(args.ckpt) if args.ckpt else None
    rank, world, device = setup_distributed()
    print_sources(args)
    torch.manual_seed(args.seed)  # the same initial head / random-init encoder on every rank
    if args.export_timm:
        return export_timm(args, obj)
    if args.benchmark:
        return benchmark_finetune(args, device)
    if args.mode not in ('knn', 'features'):
        return run_training(args, obj, rank, world, device)
    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        print0(f'config: {json.dumps(vars(args), default=str)}')
        if not args.data_path:
            print0(f'no --data-path: built-in SyntheticShapes data ({args.synthetic_size} train / '
                   f'{args.synthetic_val_size} val images, 10 classes) and smoke preset')
    if args.mode == 'features':
        return run_features(args, obj, rank, world, device)
    return run_knn(args, obj, rank, world, device)


def benchmark_finetune(args, device):
    """--benchmark N: time the fine-tuning step of --model at --res (1000 classes, as resolved)."""
    args.method = f'finetune-{args.mode}'
    enc = build_encoder(args, num_classes=1000, pool='avg', drop_path=args.drop_path or 0.0)
    fast_cuda(device)  # TF32 and cudnn autotuning, as a run has them
    # on the device first, as run_training: --model-ema copies the weights where they are
    return benchmark(Finetuner(enc.to(device), args, 1000, None, device, 1), args, device)


def main(argv=None):
    """Fine-tune / linear-probe / k-NN; a user error prints `error: …` and exits 2."""
    return run_main(run, argv)


if __name__ == '__main__':
    main()
