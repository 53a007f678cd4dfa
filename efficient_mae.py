"""Efficient MAE towards Large-Scale Vision Transformers (Qiu et al., WACV 2024): MAE at a higher
mask ratio with a Difficulty-Flatten Loss and Decoder Masking. No official code; the abstract and
the supplementary material ("supp.") are public, the main text with the formulas is not.

What the sources establish. Abstract: above MAE's mask ratio 0.75 visible patches grow sparse,
difficult reconstruction targets dominate and accuracy drops; a Difficulty-Flatten Loss (DFL)
"provides balanced supervision on reconstruction targets of different difficulties", Decoder Masking
"discards the most difficult reconstruction targets"; 27 % (ViT-L) / 30 % (ViT-H) pre-training
runtime acceleration over MAE. Supp. B: higher weight on easy targets, lower weight on the extremely
hard ones, which Decoder Masking discards, keep the task moderately hard (SimMIM's AvgDist). Supp. C
defines the mask-geometry metrics the main text's Tab. 5 sets beside the authors' P²Dist: visible
patches in the 3x3 neighbourhood, inverse-distance-weighted visible patches in 5x5, distance to the
nearest visible patch centre. Downstream: ADE20K UperNet lr 1.4e-4, wd 0.03, layer decay 0.75
(supp. A.1); COCO ViTDet ViT-B 25 epochs, batch 16, layer decay 0.8 (supp. A.2).

    python efficient_mae.py                                    # CPU smoke run on the built-in data
    python efficient_mae.py --data-path /data/imagenet         # one GPU
    torchrun --nproc_per_node 8 efficient_mae.py --data-path /data/imagenet --model vit_large
    torchrun --nproc_per_node 8 efficient_mae.py --data-path /data/imagenet --mask-ratio 0.75 \\
        --decoder-drop 0 --dfl-gamma 0                         # plain MAE, bit for bit

Where this is our reading rather than the paper's text (each choice is a flag):
1. `--mask-ratio 0.85`: the paper's value is not public; with note 5 it fits the abstract's gains in
   our FLOP estimate (ViT-L / H: 36 / 38 % fewer FLOPs than MAE; wall-clock savings run lower).
2. P²Dist (`--difficulty p2dist`): mean distance of a masked patch's pixels to the nearest visible
   patch square, in patch units: a per-patch AvgDist (supp. B), finer than nearest-centre (supp. C).
3. Supp. C metrics: windows exclude the centre, outside the image is not visible, and the counts are
   turned to grow with difficulty: d = 8 - n, d = S_max - S (S_max = the full 5x5 sum, ~13.820).
4. DFL (`--dfl-mode hist`): w = n_bin^-gamma over fixed-width bins of d, n_bin counted after decoder
   masking (else at ratios 0.75-0.85 the rare hardest targets weigh most, against supp. B), mean 1,
   optional clip; loss = sum(w l) / sum(w). `monotone`: w = (bin width + d)^-gamma.
5. Decoder masking (`--decoder-drop 0.25`): per image the round((1 - drop) n_masked) easiest masked
   patches keep a mask token; the hardest get no token, prediction or loss; ties by masking noise.
6. MAE's recipe, unstated by the sources: ViT-B/16 at 224, decoder 8 x 512-d (16 heads), norm-pix
   MSE (facebookresearch/mae models_mae.py:mae_vit_base_patch16_dec512d8b), 800 epochs, 40 warm-up,
   blr 1.5e-4, batch 4096, AdamW (0.9, 0.95), wd 0.05 (its pre-training guide, main_pretrain.py).
"""
import argparse
import math
import torch
import torch.nn.functional as F

from common import (MaskedAutoencoderViT, autocast_off, check_ratio, grid_picture, hot_colours,
                    masked_mean, pixel_columns, pixel_labels, token_masking, upsample_mask)

METRICS = ('p2dist', 'count3', 'invdist5', 'nearest')
INVDIST5_MAX = sum(1 / math.hypot(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if dy or dx)
RANK_STEP = 1e-4  # difficulties this close tie when ranking, so round-off cannot decide (note 5)


# ----------------------------------------------------------------------------- masking: difficulty

@torch.no_grad()
def p2dist(mask, grid, samples):
    """P²Dist (supp. C) as we read it (note 2): mask (B, L) -> (B, L), mean distance of s x s points
    per patch to the nearest visible patch square (patch units), 0 on visible patches. Square j
    spans [j, j+1]; the squared distance from a point to a square is a row gap² plus a column gap²,
    so its min over the visible squares takes two passes (rows of each column, then columns).
    Memory B (G s)² G floats (ViT-B/16, s 16, 512 images: 1.4 GB)."""
    B, G, s, dev = mask.shape[0], grid, samples, mask.device
    with autocast_off(dev):
        pos = (torch.arange(G * s, device=dev, dtype=torch.float32) + 0.5) / s  # (G*s,) points
        start = torch.arange(G, device=dev, dtype=torch.float32)  # (G,) square j covers [j, j+1]
        gap2 = ((start[None] - pos[:, None]).clamp(min=0)
                + (pos[:, None] - start[None] - 1).clamp(min=0)) ** 2  # (G*s, G)
        hidden = mask.reshape(B, G, G).float() * (4.0 * G * G)  # (B, G, G) masked: out of reach
        col_min = (gap2[None, :, :, None] + hidden[:, None]).amin(2)  # (B, G*s, G) min over rows
        dist2 = (col_min[:, :, None, :] + gap2[None, None]).amin(-1)  # (B, G*s, G*s) over columns
        d = dist2.sqrt().view(B, G, s, G, s).mean((2, 4))  # (B, G, G) mean over s x s points
    return d.reshape(B, G * G)  # (B, L)


@torch.no_grad()
def neighbour_sum(mask, grid, kernel):
    """Visible patches weighted by `kernel` (k, k) around each patch, none outside: (B, L)."""
    B = mask.shape[0]
    with autocast_off(mask.device):
        visible = (~mask).float().view(B, 1, grid, grid)  # (B, 1, G, G)
        weights = kernel.to(mask.device, torch.float32)[None, None]  # (1, 1, k, k)
        summed = F.conv2d(visible, weights, padding=kernel.shape[-1] // 2)  # (B, 1, G, G)
        return summed.reshape(B, grid * grid)  # (B, L)


def count3(mask, grid):
    """Supp. C "Number of Patches in 3x3": visible patches around each patch (note 3), (B, L)."""
    kernel = torch.ones(3, 3)
    kernel[1, 1] = 0
    return neighbour_sum(mask, grid, kernel)


def invdist5(mask, grid):
    """Supp. C "Sum of Patch Distance in 5x5": visible patches weighted by 1/distance (note 3)."""
    offsets = torch.arange(-2, 3, dtype=torch.float64)
    dist = (offsets[:, None] ** 2 + offsets[None] ** 2).sqrt()  # (5, 5)
    return neighbour_sum(mask, grid, torch.where(dist > 0, 1 / dist.clamp(min=1e-12), 0).float())


@torch.no_grad()
def nearest(mask, grid):
    """Supp. C "Nearest Patch Distance": centre to nearest visible centre, patch units, (B, L)."""
    dev = mask.device
    with autocast_off(dev):
        index = torch.arange(grid, device=dev, dtype=torch.float32)
        yx = torch.stack(torch.meshgrid(index, index, indexing='ij')).reshape(2, -1)  # (2, L)
        dist = (yx[:, :, None] - yx[:, None, :]).square().sum(0).sqrt()  # (L, L) centre distances
        hidden = mask.float()[:, None, :] * (4.0 * grid * grid)  # (B, 1, L) masked: out of reach
        return (dist[None] + hidden).amin(-1)  # (B, L)


@torch.no_grad()
def difficulty(mask, grid, metric='p2dist', samples=16):
    """Per-patch difficulty (B, L), growing with difficulty, 0 on visible patches (note 3)."""
    if metric == 'p2dist':
        d = p2dist(mask, grid, samples)
    elif metric == 'nearest':
        d = nearest(mask, grid)
    elif metric == 'count3':
        d = 8 - count3(mask, grid)
    elif metric == 'invdist5':
        d = INVDIST5_MAX - invdist5(mask, grid)
    else:
        raise ValueError(f'unknown --difficulty {metric}; choose one of {", ".join(METRICS)}')
    return d * mask


# ----------------------------------------------------------------------------- loss: DFL

@torch.no_grad()
def dfl_weights(d, kept, mode='hist', gamma=1.0, bin_width=0.5, bins=8, scope='batch', clip=0.0,
                counted=None):
    """DFL weights (B, L), constants: supp. B's higher weight on rare easy targets, as note 4.
    hist: w = n_bin^-gamma, n_bin = targets of `counted` (default `kept`) in bins of width
    `bin_width`, the last of `bins` open-ended; monotone: w = (bin_width + d)^-gamma. Then mean 1
    over `kept` in each scope (batch or image), 0 elsewhere, then w <= clip when clip > 0."""
    counted = kept if counted is None else counted
    dims = (0, 1) if scope == 'batch' else (1,)  # the scope: bin counts and the mean run over these
    kept_float = kept.float()
    if mode == 'hist':
        bin_id = torch.floor(d.float() / bin_width).clamp(0, bins - 1).long()  # (B, L)
        onehot = bin_id[..., None] == torch.arange(bins, device=d.device)  # (B, L, bins)
        n_bin = (onehot & counted[..., None]).sum(dims, keepdim=True).float()  # (1 or B, 1, bins)
        w = (onehot.float() * n_bin.clamp(min=1).pow(-gamma)).sum(-1)  # (B, L)
    elif mode == 'monotone':
        w = (bin_width + d.float()).pow(-gamma)  # (B, L); epsilon = the bin width (note 4)
    else:
        raise ValueError(f'unknown --dfl-mode {mode}; choose hist or monotone')
    w = w * kept_float
    mean = w.sum(dims, keepdim=True) / kept_float.sum(dims, keepdim=True).clamp(min=1)
    w = w / mean.clamp(min=1e-12)
    return w.clamp(max=clip) if clip > 0 else w


# ----------------------------------------------------------------------------- masking: decoder

def keep_count(n_masked, drop):
    """Masked patches decoded and in the loss: round((1 - drop) n_masked), Python round (note 5)."""
    return round((1 - drop) * n_masked)


@torch.no_grad()
def decoder_targets(d, mask, n_drop, noise=None):
    """Masked patches kept (B, L) bool: the n_drop hardest of each row are dropped (note 5); ties
    (within RANK_STEP) put larger noise first or, with no noise (a given mask), the lower index."""
    B, L = mask.shape
    key = torch.where(mask, torch.round(d.float() / RANK_STEP), -1.0)  # (B, L) visible last
    if noise is None:
        order = torch.arange(L, device=mask.device).expand(B, L)  # ties: lower raster index first
    else:
        order = torch.argsort(noise, dim=1, descending=True, stable=True)  # (B, L) larger noise 1st
    by_d = torch.argsort(torch.gather(key, 1, order), dim=1, descending=True, stable=True)  # (B, L)
    order = torch.gather(order, 1, by_d)  # (B, L) hardest first
    dropped = torch.zeros_like(mask).scatter(1, order[:, :n_drop], True)  # (B, L)
    return mask & ~dropped


# ----------------------------------------------------------------------------- model

class EfficientMAE(MaskedAutoencoderViT):
    """MAE + difficulty, DFL and decoder masking; keys as common.MaskedAutoencoderViT, no more."""

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0,
                 norm_pix_loss=True, mask_ratio=0.85, metric='p2dist', samples=None,
                 dfl_mode='hist', dfl_gamma=1.0, dfl_bin_width=0.5, dfl_bins=8, dfl_scope='batch',
                 dfl_clip=0.0, dfl_after_drop=True, decoder_drop=0.25):
        super().__init__(img_size, patch_size, embed_dim, depth, num_heads, decoder_embed_dim,
                         decoder_depth, decoder_num_heads, mlp_ratio, norm_pix_loss, mask_ratio)
        L = self.grid ** 2
        n_masked = L - int(L * (1 - mask_ratio))
        if n_masked == L:
            raise ValueError(f'mask ratio {mask_ratio} leaves no visible patch of {L}; '
                             'use a lower --mask-ratio')
        check_ratio(decoder_drop, '--decoder-drop')
        if n_masked and keep_count(n_masked, decoder_drop) == 0:
            raise ValueError(f'--decoder-drop {decoder_drop} keeps none of the {n_masked} masked '
                             'patches; lower it')
        if metric not in METRICS:
            raise ValueError(f'unknown --difficulty {metric}; choose one of {", ".join(METRICS)}')
        samples = patch_size if samples is None else samples
        checks = (
            (samples >= 1, f'--p2dist-samples {samples} must be at least 1'),
            (dfl_gamma >= 0,
             f'--dfl-gamma {dfl_gamma} must be >= 0 (0 = MAE, 1 = full flattening)'),
            (dfl_bin_width > 0, f'--dfl-bin-width {dfl_bin_width} must be > 0'),
            (dfl_bins >= 1, f'--dfl-bins {dfl_bins} must be at least 1'),
            (dfl_clip == 0 or dfl_clip >= 1,
             f'--dfl-clip {dfl_clip}: use 0 (off) or a cap >= 1 (mean weight)'),
            (dfl_mode in ('hist', 'monotone'),
             f'unknown --dfl-mode {dfl_mode}; choose hist or monotone'),
            (dfl_scope in ('batch', 'image'),
             f'unknown --dfl-scope {dfl_scope}; choose batch or image'))
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        self.metric, self.samples, self.decoder_drop = metric, samples, decoder_drop
        self.dfl = dict(mode=dfl_mode, gamma=dfl_gamma, bin_width=dfl_bin_width, bins=dfl_bins,
                        scope=dfl_scope, clip=dfl_clip)
        self.dfl_after_drop = dfl_after_drop

    def decode_subset(self, latent, ids_restore, keep, n):
        """Decoder Masking (note 5): only the positions `keep` (B, L) bool, n in every row, enter
        the decoder (with the cls token) -> (B, L, P), the other rows zero. n is passed in, not
        counted, so nothing waits on the device (FLOPs on 'meta', torch.compile)."""
        x = self.decoder_input(latent, ids_restore)  # (B, 1+L, Dd)
        ids = torch.argsort((~keep).int(), dim=1, stable=True)[:, :n]  # (B, n) kept, ascending
        xs = torch.gather(x[:, 1:], 1, ids[..., None].expand(-1, -1, x.shape[-1]))  # (B, n, Dd)
        parts = (self.decoder_blocks, self.decoder_norm, self.decoder_pred)
        out = self.run_decoder(torch.cat([x[:, :1], xs], dim=1), *parts)  # (B, n, P)
        pred = out.new_zeros(x.shape[0], x.shape[1] - 1, out.shape[-1])  # (B, L, P)
        return pred.scatter(1, ids[..., None].expand(-1, -1, out.shape[-1]), out)

    def describe(self):
        """One line for the log: visible, masked, decoded and dropped patches, the DFL."""
        L = self.grid ** 2
        K = int(L * (1 - self.mask_ratio))
        n_keep = keep_count(L - K, self.decoder_drop)
        return (f'efficient_mae: {L} patches per image, {K} visible to the encoder, {L - K} '
                f'masked, {n_keep} decoded and in the loss ({L - K - n_keep} hardest dropped by '
                f'{self.metric}); decoder length {1 + K + n_keep} (MAE: {1 + L}); DFL '
                f'{self.dfl["mode"]} gamma {self.dfl["gamma"]:g}')

    def difficulty(self, mask):
        """Difficulty (B, L) of a mask with this model's metric (supp. C; notes 2 and 3)."""
        return difficulty(mask, self.grid, self.metric, self.samples)

    def forward(self, imgs, mask=None, keys=None):
        """imgs (B, 3, H, W) -> MAE dict + difficulty, weights, kept_targets[, loss_unweighted]."""
        L = self.grid ** 2
        # MAE's masking (models_mae.py:random_masking); its noise breaks ties (note 5), None for a
        # given mask (uneven rows: ValueError)
        (ids_keep, mask, ids_restore), noise = token_masking(imgs, L, self.mask_ratio, mask, keys)
        n_masked = L - ids_keep.shape[1]
        n_drop = n_masked - keep_count(n_masked, self.decoder_drop)
        d = self.difficulty(mask)  # (B, L), no grad
        kept = decoder_targets(d, mask, n_drop, noise) if n_drop else mask  # (B, L) masked, kept

        latent = self.forward_encoder(imgs, ids_keep)  # (B, 1+K, D)
        if n_drop:  # Decoder Masking (abstract; note 5): cls + visible + kept mask tokens only
            pred = self.decode_subset(latent, ids_restore, ~mask | kept,
                                      L - n_drop)  # (B, L, P), dropped rows zero
        else:
            pred = self.forward_decoder(latent, ids_restore)  # (B, L, P) = MAE
        target = self.target(imgs)
        per_patch = self.patch_loss(pred, target)  # (B, L) fp32

        out = dict(pred=pred * kept[..., None].to(pred.dtype), target=target, mask=mask,
                   difficulty=d, kept_targets=kept)
        if self.dfl['gamma'] == 0:  # flat weights: MAE's own loss (models_mae.py:forward_loss)
            out.update(loss=masked_mean(per_patch, kept), weights=kept.float())
            return out
        counted = kept if self.dfl_after_drop else mask  # our reading (note 4)
        weights = dfl_weights(d, kept, counted=counted, **self.dfl)  # (B, L) constants
        out.update(loss=(per_patch * weights).sum() / weights.sum().clamp(min=1e-12),
                   weights=weights, loss_unweighted=masked_mean(per_patch.detach(), kept))
        return out

    def picture(self, imgs, out):
        """input | masked | difficulty | weight (dropped: red) | prediction, uint8 (3, H, W)."""
        p, mask, kept = self.patch_size, out['mask'], out['kept_targets']
        inputs, masked, *recon = pixel_columns(imgs, out['pred'], mask, p, self.norm_pix_loss)
        dropped = mask & ~kept
        # dropped: no prediction, black (recon: the prediction, and the raw one when drawn)
        recon = [r * (1 - self.patch_map(dropped.float(), imgs)) for r in recon]
        d = out['difficulty'].float() * mask
        heat = self.patch_map(d / d.amax().clamp(min=1e-12), imgs)  # (B, 1, H, W)
        d_column = hot_colours(heat)  # (B, 3, H, W)
        w = out['weights'].float() * kept
        w_map = self.patch_map(w / w.amax().clamp(min=1e-12), imgs)  # (B, 1, H, W)
        gray = 0.15 + 0.85 * w_map.expand(-1, 3, -1, -1)  # (B, 3, H, W)
        red = torch.tensor([0.8, 0.0, 0.0], device=imgs.device).view(1, 3, 1, 1)
        w_column = torch.where(self.patch_map(dropped.float(), imgs) > 0, red, gray)
        visible = self.patch_map((~mask).float(), imgs)  # (B, 1, H, W)
        blue = torch.tensor([0.3, 0.3, 0.9], device=imgs.device).view(1, 3, 1, 1)
        blue_input = inputs.mean(1, keepdim=True) * blue  # (B, 3, H, W)
        d_column, w_column = (torch.where(visible > 0, blue_input, c) for c in (d_column, w_column))
        names = pixel_labels(self.norm_pix_loss)
        return grid_picture([inputs, masked, d_column, w_column, *recon],
                            names[:2] + ['difficulty', 'loss weight'] + names[2:])

    def patch_map(self, v, imgs):
        """Per-patch values (B, L) -> per-pixel map (B, 1, H, W)."""
        B, (H, W), p = v.shape[0], imgs.shape[-2:], self.patch_size
        return upsample_mask(v.reshape(B, H // p, W // p), p)[:, None]  # (B, 1, H, W)


def from_official(obj):
    """An MAE release file with its decoder (mae_pretrain_vit_*_full.pth, mae_visualize_vit_*.pth;
    Efficient MAE has none of its own and MAE's keys) -> our state dict: pick it, strip DDP."""
    return strip_prefix(pick_state_dict(obj))


# ----------------------------------------------------------------------------- command line

# The runner's names: for the command line below, and for from_official above (checkpoints).
from common import (MAE_DEFAULTS, MAE_NAMES, launch, mae_config, parse_pretrain,  # noqa: E402
                    pick_state_dict, pretrain_parser, strip_prefix)

DEFAULTS, OFFICIAL_NAMES = MAE_DEFAULTS, MAE_NAMES  # MAE's recipe (note 6)
# The smoke preset (ours, no --data-path): the method's recipe (ratio 0.85, norm-pix target, the
# difficulty-flatten loss, the hardest 25 % of the masked patches out of the decoder) scaled as
# mff.py's MAE: a ViT of 4 blocks, width 96, 8-px patches at 64 px (64 tokens, 9 of them visible),
# a 2-block 128-wide decoder, 36 epochs of the built-in images, blr 1.6e-2 (about 100x MAE's)
SMOKE = dict(model='vit_tiny', patch_size=8, embed_dim=96, depth=4, num_heads=3, res=64,
             batch_size=64, epochs=36, warmup_epochs=1, blr=1.6e-2, decoder_dim=128,
             decoder_depth=2, decoder_heads=4, log_freq=16, save_freq=12, num_workers=2,
             eval_knn=12)


def get_args(argv=None):
    """Parse the command line and fill the per-model defaults."""
    p = pretrain_parser('efficient_mae', __doc__, decoder=('dim', 'depth', 'heads'), norm_pix=True,
                        norm_pix_help='standardise each target patch (MAE recipe, default on)')
    a = p.add_argument
    a('--difficulty', choices=METRICS, default='p2dist',
      help='per-patch difficulty from the mask: p2dist (default; our reading of P²Dist, note 2) '
           'or the supp. C metrics count3 (visible in 3x3), invdist5 (1/distance in 5x5), nearest')
    a('--p2dist-samples', dest='p2dist_samples', type=int,
      help='P²Dist sample points per patch side; default the patch size (one per pixel; 4-8 is '
           'within ~1 %%)')
    a('--dfl-mode', dest='dfl_mode', choices=('hist', 'monotone'), default='hist',
      help='Difficulty-Flatten Loss (our reading, note 4): hist = inverse bin frequency '
           '(default), monotone = (bin width + d)^-gamma')
    a('--dfl-gamma', dest='dfl_gamma', type=float, default=1.0,
      help='DFL strength: 1 = full flattening (default), 0 = flat weights (MAE loss)')
    a('--dfl-bin-width', dest='dfl_bin_width', type=float, default=0.5,
      help='DFL bin width in units of the difficulty (default 0.5 patch); also the epsilon of '
           'monotone mode')
    a('--dfl-bins', dest='dfl_bins', type=int, default=8,
      help='DFL bins, the last open-ended (default 8)')
    a('--dfl-scope', dest='dfl_scope', choices=('batch', 'image'), default='batch',
      help='bin counts and the mean-1 normalisation over the per-GPU batch (default) or per image')
    a('--dfl-clip', dest='dfl_clip', type=float, default=0.0, help='cap on the weights (0 = off)')
    a('--dfl-after-drop', dest='dfl_after_drop', action=argparse.BooleanOptionalAction,
      default=True, help='count bins over the targets left after decoder masking (default) or '
      'over all masked patches')
    a('--decoder-drop', dest='decoder_drop', type=float, default=0.25,
      help="fraction of each image's masked patches, the hardest, removed from the decoder and "
           'the loss (default 0.25, our reading; 0 = MAE)')
    args = parse_pretrain(p, argv, DEFAULTS, SMOKE, OFFICIAL_NAMES, res=224, mask_ratio=0.85,
                          blr=1.5e-4)
    if not 0 <= args.decoder_drop < 1:
        p.error(f'--decoder-drop {args.decoder_drop} is out of range; use a fraction of the '
                f'masked patches in [0, 1)')
    if not 0 <= args.mask_ratio < 1:
        p.error(f'--mask-ratio {args.mask_ratio} is out of range; use a value in [0, 1) '
                f'(default 0.85)')
    return args


def build_model(args):
    """The Efficient MAE model of the resolved arguments."""
    return EfficientMAE(**mae_config(args), metric=args.difficulty, samples=args.p2dist_samples,
                        dfl_mode=args.dfl_mode, dfl_gamma=args.dfl_gamma,
                        dfl_bin_width=args.dfl_bin_width, dfl_bins=args.dfl_bins,
                        dfl_scope=args.dfl_scope, dfl_clip=args.dfl_clip,
                        dfl_after_drop=args.dfl_after_drop, decoder_drop=args.decoder_drop)


def main(argv=None):
    """Pre-train Efficient MAE (the module docstring); a user error prints `error: …`, exit 2."""
    return launch(argv, get_args, build_model, from_official=from_official)


if __name__ == '__main__':
    main()
