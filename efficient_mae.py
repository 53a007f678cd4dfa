"""Efficient MAE towards Large-Scale Vision Transformers (Qiu et al., WACV 2024): MAE at a higher mask ratio with a
Difficulty-Flatten Loss and Decoder Masking. No official code; only the abstract and the supplement are public.

What the sources establish (spec Part A): MAE pushed to a higher mask ratio for speed; at high ratios difficult
targets (masked patches with few visible neighbours) dominate and accuracy drops. Two components fix it: a
Difficulty-Flatten Loss (DFL) that "provides balanced supervision on reconstruction targets of different
difficulties", with higher weight on easy targets (supplement B), and Decoder Masking, which "discards the most
difficult reconstruction targets" from the decoder. Difficulty is a geometric property of the mask; the supplement
(C) compares the authors' P²Dist with three metrics: visible patches in the 3x3 neighbourhood, inverse-distance-
weighted visible patches in 5x5, and the distance to the nearest visible patch centre. Reported: 27 % (ViT-L) /
30 % (ViT-H) faster pre-training than MAE.

Our reading (spec Part B; the main text with the formulas is not available, so every item is a flag):
- `--mask-ratio 0.85` (the paper's value is not known; 0.85 with `--decoder-drop 0.25` fits the reported speed-ups).
- P²Dist (`--difficulty p2dist`): for a masked patch, the mean over its pixels of the Euclidean distance to the
  nearest visible patch square, in patch units (a per-patch SimMIM AvgDist); `count3`, `invdist5`, `nearest` are
  the supplement's three metrics, turned so that d grows with difficulty (8 - n, S_max - S, as they are).
- DFL (`--dfl-mode hist`): difficulties in fixed-width bins, weight n_bin^-gamma over the retained targets,
  normalised to mean 1, optional clip; loss = sum(w l) / sum(w); with gamma 1 that is the mean of the per-bin mean
  losses. `--dfl-mode monotone`: w = (bin_width + d)^-gamma. The spec's third option (`lossnorm`, a running mean of
  each bin's loss) is not implemented: it needs state in the checkpoint and under DDP, and the spec ranks it last.
- Decoder masking (`--decoder-drop 0.25`): per image the round((1 - rho) n_masked) easiest masked patches keep their
  mask token; the hardest are removed from the decoder input and from the loss (fewer tokens, less compute).
Neutral knobs (`--mask-ratio 0.75 --decoder-drop 0 --dfl-gamma 0`) are MAE exactly: the same calls of common.py.

Defaults as MAE (inherited, not stated by the sources): ViT-B/16 at 224, decoder 8 blocks x 512 (16 heads),
norm-pix MSE, 800 epochs, 40 warm-up, blr 1.5e-4 (lr = blr * batch / 256, effective batch 4096 = 512 x 8 GPUs),
AdamW (0.9, 0.95), wd 0.05. Downstream settings the supplement gives (A.2): ADE20K UperNet lr 1.4e-4, wd 0.03,
layer decay 0.75; COCO ViTDet ViT-B 25 epochs, batch 16, layer decay 0.8.

    python efficient_mae.py                                    # CPU smoke run on the built-in data
    python efficient_mae.py --data-path /data/imagenet         # one GPU
    torchrun --nproc_per_node 8 efficient_mae.py --data-path /data/imagenet --model vit_large
    torchrun --nproc_per_node 8 efficient_mae.py --data-path /data/imagenet --mask-ratio 0.75 \\
        --decoder-drop 0 --dfl-gamma 0                         # plain MAE
"""
import argparse
import math
import os

import torch
import torch.nn.functional as F

from common import (MAE_DEFAULTS, MAE_NAMES, VIT_PRESETS, MaskedAutoencoderViT, check_ratio, autocast_off, grid_picture,
                    hot_colours, ids_from_mask, masked_mean, parse_pretrain, pixel_columns, pretrain_parser,
                    random_masking, run_main, sample_noise, train, upsample_mask)

DEFAULTS, OFFICIAL_NAMES = MAE_DEFAULTS, MAE_NAMES  # MAE's recipe, inherited (spec §2)
SMOKE = dict(model='vit_tiny', res=64, batch_size=64, epochs=16, warmup_epochs=2, blr=1.5e-3, decoder_dim=128,
             decoder_depth=2, decoder_heads=4, log_freq=16, save_freq=4,
             num_workers=2)  # ours: about 2 minutes on 2 CPU cores; 10x blr so a short run visibly learns
METRICS = ('p2dist', 'count3', 'invdist5', 'nearest')
INVDIST5_MAX = sum(1 / math.hypot(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if dy or dx)  # ~13.820
RANK_STEP = 1e-4  # difficulties closer than this (patch units) tie when ranking: float noise must not break ties


# ----------------------------------------------------------------------------- model

class EfficientMAE(MaskedAutoencoderViT):
    """MAE (common.MaskedAutoencoderViT, same keys) + mask-geometry difficulty, DFL weights and decoder masking.

    Nothing is added to the state dict: difficulty and weights are functions of the mask, so MAE checkpoints load.
    """

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512,
                 decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0, norm_pix_loss=True, mask_ratio=0.85,
                 metric='p2dist', samples=None, dfl_mode='hist', dfl_gamma=1.0, dfl_bin_width=0.5, dfl_bins=8,
                 dfl_scope='batch', dfl_clip=0.0, dfl_after_drop=True, decoder_drop=0.25):
        super().__init__(img_size, patch_size, embed_dim, depth, num_heads, decoder_embed_dim, decoder_depth,
                         decoder_num_heads, mlp_ratio, norm_pix_loss, mask_ratio)
        L = self.grid ** 2
        n_masked = L - int(L * (1 - mask_ratio))
        if n_masked == L:
            raise ValueError(f'mask ratio {mask_ratio} leaves no visible patch of {L}; use a lower --mask-ratio')
        check_ratio(decoder_drop, '--decoder-drop')
        if n_masked and keep_count(n_masked, decoder_drop) == 0:
            raise ValueError(f'--decoder-drop {decoder_drop} keeps none of the {n_masked} masked patches; lower it')
        if metric not in METRICS:
            raise ValueError(f'unknown --difficulty {metric}; choose one of {", ".join(METRICS)}')
        samples = patch_size if samples is None else samples
        checks = ((samples >= 1, f'--p2dist-samples {samples} must be at least 1'),
                  (dfl_gamma >= 0, f'--dfl-gamma {dfl_gamma} must be >= 0 (0 = MAE, 1 = full flattening)'),
                  (dfl_bin_width > 0, f'--dfl-bin-width {dfl_bin_width} must be > 0'),
                  (dfl_bins >= 1, f'--dfl-bins {dfl_bins} must be at least 1'),
                  (dfl_clip == 0 or dfl_clip >= 1, f'--dfl-clip {dfl_clip}: use 0 (off) or a cap >= 1 (mean weight)'),
                  (dfl_mode in ('hist', 'monotone'), f'unknown --dfl-mode {dfl_mode}; choose hist or monotone'),
                  (dfl_scope in ('batch', 'image'), f'unknown --dfl-scope {dfl_scope}; choose batch or image'))
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        self.metric, self.samples, self.decoder_drop = metric, samples, decoder_drop
        self.dfl = dict(mode=dfl_mode, gamma=dfl_gamma, bin_width=dfl_bin_width, bins=dfl_bins, scope=dfl_scope,
                        clip=dfl_clip)
        self.dfl_after_drop = dfl_after_drop

    def difficulty(self, mask):
        """Difficulty (B, L) of a mask with this model's metric (spec B.2)."""
        return difficulty(mask, self.grid, self.metric, self.samples)

    def forward(self, imgs, mask=None, keys=None):
        """imgs (B, 3, H, W) -> dict(loss, pred, target, mask, difficulty, weights, kept_targets[, loss_unweighted])."""
        B, L = imgs.shape[0], self.grid ** 2
        noise = None
        if mask is None:  # = MaskedAutoencoderViT.masking, keeping the noise for tie-breaking
            noise = sample_noise(B, L, imgs.device, keys)
            ids_keep, mask, ids_restore = random_masking(noise, self.mask_ratio)
        else:
            ids_keep, mask, ids_restore = ids_from_mask(mask.to(imgs.device))  # ValueError on uneven rows
        n_masked = L - ids_keep.shape[1]
        n_drop = n_masked - keep_count(n_masked, self.decoder_drop)
        d = self.difficulty(mask)  # (B, L), no grad
        kept = decoder_targets(d, mask, n_drop, noise) if n_drop else mask  # (B, L) masked and retained

        latent = self.forward_encoder(imgs, ids_keep)  # (B, 1+K, D)
        if n_drop:  # decoder masking: cls + visible + retained mask tokens only (spec B.4)
            pred = self.forward_decoder(latent, ids_restore, keep=~mask | kept,
                                        n=L - n_drop)  # (B, L, P), dropped rows zero
        else:
            pred = self.forward_decoder(latent, ids_restore)  # (B, L, P) = MAE
        target = self.target(imgs)
        per_patch = self.patch_loss(pred, target)  # (B, L) autocast_off

        out = dict(pred=pred * kept[..., None].to(pred.dtype), target=target, mask=mask, difficulty=d,
                   kept_targets=kept)
        if self.dfl['gamma'] == 0:  # flat weights: MAE's loss function itself, no re-weighting code
            out.update(loss=masked_mean(per_patch, kept), weights=kept.float())
            return out
        counted = kept if self.dfl_after_drop else mask  # spec B.3 caveat: histogram after decoder masking
        w = dfl_weights(d, kept, counted=counted, **self.dfl)  # (B, L) constants
        out.update(loss=(per_patch * w).sum() / w.sum().clamp(min=1e-12), weights=w,
                   loss_unweighted=masked_mean(per_patch.detach(), kept))
        return out

    def picture(self, imgs, out):
        """input | masked | difficulty | DFL weight | prediction, a row per image, uint8 (3, H, W) (issue #6 layout).

        Difficulty: 'hot' colours (black -> red -> yellow -> white) scaled by the batch maximum. Weight: gray levels
        (dark -> white) scaled by the batch maximum, dropped targets red. Visible patches: the input in blue tones.
        """
        p, mask, kept = self.patch_size, out['mask'], out['kept_targets']
        inp, masked, recon = pixel_columns(imgs, out['pred'], mask, p, self.norm_pix_loss)
        dropped = mask & ~kept
        recon = recon * (1 - self.patch_map(dropped.float(), imgs))  # no prediction for dropped targets: black
        d = out['difficulty'].float() * mask
        heat = self.patch_map(d / d.amax().clamp(min=1e-12), imgs)  # (B, 1, H, W)
        d_col = hot_colours(heat)  # (B, 3, H, W)
        w = out['weights'].float() * kept
        gray = 0.15 + 0.85 * self.patch_map(w / w.amax().clamp(min=1e-12), imgs).expand(-1, 3, -1, -1)  # (B, 3, H, W)
        red = torch.tensor([0.8, 0.0, 0.0], device=imgs.device).view(1, 3, 1, 1)
        w_col = torch.where(self.patch_map(dropped.float(), imgs) > 0, red, gray)
        vis = self.patch_map((~mask).float(), imgs)  # (B, 1, H, W)
        blue = torch.tensor([0.3, 0.3, 0.9], device=imgs.device).view(1, 3, 1, 1)
        dim = inp.mean(1, keepdim=True) * blue  # (B, 3, H, W) visible patches: the input in blue tones
        d_col, w_col = (torch.where(vis > 0, dim, c) for c in (d_col, w_col))
        return grid_picture([inp, masked, d_col, w_col, recon])

    def patch_map(self, v, imgs):
        """Per-patch values (B, L) -> per-pixel map (B, 1, H, W)."""
        B, (H, W) = v.shape[0], imgs.shape[-2:]
        return upsample_mask(v.reshape(B, H // self.patch_size, W // self.patch_size), self.patch_size)[:, None]


# ----------------------------------------------------------------------------- loss (Difficulty-Flatten Loss)

@torch.no_grad()
def dfl_weights(d, kept, mode='hist', gamma=1.0, bin_width=0.5, bins=8, scope='batch', clip=0.0, counted=None):
    """DFL weights (B, L): mean 1 over `kept` in each scope (batch or image), 0 elsewhere; constants (spec B.3).

    hist: w = n_bin^-gamma, n_bin = targets of `counted` (default `kept`) in the bin of width `bin_width`
    (last of `bins` open-ended). monotone: w = (bin_width + d)^-gamma. Then the mean-1 normalisation, then
    w <= clip when clip > 0.
    """
    counted = kept if counted is None else counted
    dims = (0, 1) if scope == 'batch' else (1,)
    keep = kept.float()
    if mode == 'hist':
        b = torch.floor(d.float() / bin_width).clamp(0, bins - 1).long()  # (B, L) fixed-width bins, spec B.3 step 2
        onehot = b[..., None] == torch.arange(bins, device=d.device)  # (B, L, bins)
        n = (onehot & counted[..., None]).sum(dims, keepdim=True).float()  # (1, 1, bins) or (B, 1, bins)
        w = (onehot.float() * n.clamp(min=1).pow(-gamma)).sum(-1)  # (B, L)
    elif mode == 'monotone':
        w = (bin_width + d.float()).pow(-gamma)  # (B, L); our reading: epsilon = the bin width
    else:
        raise ValueError(f'unknown --dfl-mode {mode}; choose hist or monotone')
    w = w * keep
    mean = w.sum(dims, keepdim=True) / keep.sum(dims, keepdim=True).clamp(min=1)  # our reading: per scope
    w = w / mean.clamp(min=1e-12)
    return w.clamp(max=clip) if clip > 0 else w


# ----------------------------------------------------------------------------- masking: difficulty from the mask

@torch.no_grad()
def p2dist(mask, grid, samples):
    """P²Dist (spec B.2, our reading): mask (B, L) -> (B, L), mean distance of s x s points to the nearest visible.

    Patch square j spans [j, j+1] in patch units. The squared distance from a point to a square is a row gap² plus a
    column gap², so its min over the visible squares takes two passes: over the rows of each column, then over the
    columns. Memory B (G s)² G floats (ViT-B/16, s 16, 512 images: 1.4 GB); visible patches get 0.
    """
    B, G, s = mask.shape[0], grid, samples
    dev = mask.device
    with autocast_off(dev):
        t = (torch.arange(G * s, device=dev, dtype=torch.float32) + 0.5) / s  # (G*s,) sample coordinates
        start = torch.arange(G, device=dev, dtype=torch.float32)  # (G,) square j covers [j, j+1]
        gap2 = ((start[None] - t[:, None]).clamp(min=0) + (t[:, None] - start[None] - 1).clamp(min=0)) ** 2  # (G*s, G)
        hidden = mask.reshape(B, G, G).float() * (4.0 * G * G)  # (B, G, G): a masked square is farther than any
        col = (gap2[None, :, :, None] + hidden[:, None]).amin(2)  # (B, G*s, G): min over rows, per column
        d2 = (col[:, :, None, :] + gap2[None, None]).amin(-1)  # (B, G*s, G*s): min over columns
        d = d2.sqrt().view(B, G, s, G, s).mean((2, 4))  # (B, G, G): mean over each patch's s x s points
    return d.reshape(B, G * G)  # (B, L)


@torch.no_grad()
def neighbour_sum(mask, grid, kernel):
    """Visible patches weighted by `kernel` (k, k) around each patch, outside the image not visible: (B, L)."""
    B = mask.shape[0]
    with autocast_off(mask.device):
        vis = (~mask).float().view(B, 1, grid, grid)  # (B, 1, G, G)
        k = kernel.to(mask.device, torch.float32)[None, None]  # (1, 1, k, k)
        return F.conv2d(vis, k, padding=kernel.shape[-1] // 2).reshape(B, grid * grid)  # (B, L)


def count3(mask, grid):
    """Visible patches in the 3x3 neighbourhood, centre excluded (Efficient MAE suppl. C, metric 1): (B, L)."""
    k = torch.ones(3, 3)
    k[1, 1] = 0
    return neighbour_sum(mask, grid, k)


def invdist5(mask, grid):
    """Sum of 1/centre distance over visible patches in the 5x5 neighbourhood (Efficient MAE suppl. C, metric 2)."""
    o = torch.arange(-2, 3, dtype=torch.float64)
    r = (o[:, None] ** 2 + o[None] ** 2).sqrt()  # (5, 5)
    return neighbour_sum(mask, grid, torch.where(r > 0, 1 / r.clamp(min=1e-12), 0).float())


@torch.no_grad()
def nearest(mask, grid):
    """Distance from each patch centre to the nearest visible patch centre, patch units (suppl. C, metric 3): (B, L)."""
    dev = mask.device
    with autocast_off(dev):
        c = torch.arange(grid, device=dev, dtype=torch.float32)
        yx = torch.stack(torch.meshgrid(c, c, indexing='ij')).reshape(2, -1)  # (2, L) raster order
        dist = (yx[:, :, None] - yx[:, None, :]).square().sum(0).sqrt()  # (L, L) centre distances
        far = mask.float()[:, None, :] * (4.0 * grid * grid)  # (B, 1, L): masked candidates are pushed away
        return (dist[None] + far).amin(-1)  # (B, L)


@torch.no_grad()
def difficulty(mask, grid, metric='p2dist', samples=16):
    """Per-patch difficulty (B, L) that grows with difficulty, 0 on visible patches (spec B.2 directions)."""
    if metric == 'p2dist':
        d = p2dist(mask, grid, samples)
    elif metric == 'nearest':
        d = nearest(mask, grid)
    elif metric == 'count3':
        d = 8 - count3(mask, grid)  # spec B.2: fewer visible neighbours = harder
    elif metric == 'invdist5':
        d = INVDIST5_MAX - invdist5(mask, grid)
    else:
        raise ValueError(f'unknown --difficulty {metric}; choose one of {", ".join(METRICS)}')
    return d * mask


# ----------------------------------------------------------------------------- masking: decoder masking

def keep_count(n_masked, drop):
    """Masked patches kept for the decoder and the loss: round((1 - drop) n_masked), Python round (spec B.4)."""
    return round((1 - drop) * n_masked)


@torch.no_grad()
def decoder_targets(d, mask, n_drop, noise=None):
    """Masked patches kept (B, L) bool: the n_drop hardest of each row are dropped (spec B.4, our reading).

    Order: difficulty descending (values within RANK_STEP tie), then masking noise descending, or raster index
    ascending when there is no noise (a given mask).
    """
    B, L = mask.shape
    key = torch.where(mask, torch.round(d.float() / RANK_STEP), -1.0)  # (B, L) visible last; our reading: quantised
    if noise is None:
        order = torch.arange(L, device=mask.device).expand(B, L)  # ties: lower raster index first
    else:
        order = torch.argsort(noise, dim=1, descending=True, stable=True)  # (B, L) ties: larger noise first
    by_d = torch.argsort(torch.gather(key, 1, order), dim=1, descending=True, stable=True)  # (B, L)
    order = torch.gather(order, 1, by_d)  # (B, L) hardest first
    dropped = torch.zeros_like(mask).scatter(1, order[:, :n_drop], True)  # (B, L)
    return mask & ~dropped


# ----------------------------------------------------------------------------- command line

def get_args(argv=None):
    """Parse the command line and fill the per-model defaults."""
    p = pretrain_parser('efficient_mae', __doc__)
    a = p.add_argument
    a('--difficulty', choices=METRICS, default='p2dist',
      help='per-patch difficulty from the mask: p2dist (default; our reading of P²Dist, spec B.2) or the '
           "supplement C metrics count3 (visible in 3x3), invdist5 (1/distance-weighted in 5x5), nearest")
    a('--p2dist-samples', dest='p2dist_samples', type=int,
      help='P²Dist sample points per patch side; default the patch size (one per pixel; 4-8 is within ~1 %%)')
    a('--dfl-mode', dest='dfl_mode', choices=('hist', 'monotone'), default='hist',
      help='Difficulty-Flatten Loss (our reading, spec B.3): hist = inverse bin frequency (default), monotone = '
           '(bin width + d)^-gamma; lossnorm (spec) is not implemented')
    a('--dfl-gamma', dest='dfl_gamma', type=float, default=1.0,
      help='DFL strength: 1 = full flattening (default), 0 = flat weights (MAE loss)')
    a('--dfl-bin-width', dest='dfl_bin_width', type=float, default=0.5,
      help='DFL bin width in units of the difficulty (default 0.5 patch); also the epsilon of monotone mode')
    a('--dfl-bins', dest='dfl_bins', type=int, default=8, help='DFL bins, the last open-ended (default 8)')
    a('--dfl-scope', dest='dfl_scope', choices=('batch', 'image'), default='batch',
      help='bin counts and the mean-1 normalisation over the per-GPU batch (default) or per image')
    a('--dfl-clip', dest='dfl_clip', type=float, default=0.0, help='cap on the weights (default 0 = off; spec: 10)')
    a('--dfl-after-drop', dest='dfl_after_drop', action=argparse.BooleanOptionalAction, default=True,
      help='count bins over the targets left after decoder masking (default) or over all masked patches')
    a('--decoder-drop', dest='decoder_drop', type=float, default=0.25,
      help='fraction of each image\'s masked patches, the hardest, removed from the decoder and the loss '
           '(default 0.25, our reading; 0 = MAE)')
    a('--norm-pix-loss', '--norm_pix_loss', dest='norm_pix_loss', action=argparse.BooleanOptionalAction,
      default=True, help='standardise each target patch (MAE recipe, default on)')
    a('--decoder-dim', '--decoder_embed_dim', dest='decoder_dim', type=int, help='decoder width; default 512')
    a('--decoder-depth', '--decoder_depth', dest='decoder_depth', type=int, help='decoder blocks; default 8')
    a('--decoder-heads', '--decoder_num_heads', dest='decoder_heads', type=int, help='decoder heads; default 16')
    args = parse_pretrain(p, argv, DEFAULTS, SMOKE, OFFICIAL_NAMES, method='efficient_mae', res=224,
                          mask_ratio=0.85, blr=1.5e-4)
    if not 0 <= args.decoder_drop < 1:
        p.error(f'--decoder-drop {args.decoder_drop} is out of range; use a fraction of the masked patches in [0, 1)')
    if not 0 <= args.mask_ratio < 1:
        p.error(f'--mask-ratio {args.mask_ratio} is out of range; use a value in [0, 1) (default 0.85)')
    return args


def build_model(args):
    """The Efficient MAE model of the resolved arguments."""
    return EfficientMAE(img_size=args.res, decoder_embed_dim=args.decoder_dim, decoder_depth=args.decoder_depth,
                        decoder_num_heads=args.decoder_heads, norm_pix_loss=args.norm_pix_loss,
                        mask_ratio=args.mask_ratio, metric=args.difficulty, samples=args.p2dist_samples,
                        dfl_mode=args.dfl_mode, dfl_gamma=args.dfl_gamma, dfl_bin_width=args.dfl_bin_width,
                        dfl_bins=args.dfl_bins, dfl_scope=args.dfl_scope, dfl_clip=args.dfl_clip,
                        dfl_after_drop=args.dfl_after_drop, decoder_drop=args.decoder_drop,
                        **VIT_PRESETS[args.model])


def pretrain(argv=None):
    """Parse, build, train."""
    args = get_args(argv)
    torch.manual_seed(args.seed)  # the same initial weights on every rank and every run
    model = build_model(args)
    if int(os.environ.get('RANK', 0)) == 0:
        L = model.grid ** 2
        K = int(L * (1 - args.mask_ratio))
        n_keep = keep_count(L - K, args.decoder_drop)
        print(f'efficient_mae: {L} patches per image, {K} visible to the encoder, {L - K} masked, {n_keep} decoded '
              f'and in the loss ({L - K - n_keep} hardest dropped by {args.difficulty}); decoder length '
              f'{1 + K + n_keep} (MAE: {1 + L}); DFL {args.dfl_mode} gamma {args.dfl_gamma:g}')
    return train(model, args)


def main(argv=None):
    """Pre-train Efficient MAE (see the module docstring); a user error prints `error: …` and exits 2."""
    return run_main(pretrain, argv)


if __name__ == '__main__':
    main()
