"""MFF: Improving Pixel-based MIM by Reducing Wasted Modeling Capability (Liu et al., ICCV 2023),
on MAE and PixMIM.

Paper: https://arxiv.org/abs/2308.00261; its appendix is cited as "MFF supp." (A.1-A.8, Tab. 1-5).
Official code: open-mmlab/mmpretrain, mmpretrain/models/selfsup/mff.py and configs/mff/.
PixMIM (Liu et al., https://arxiv.org/abs/2303.02416): open-mmlab/mmselfsup 1.x,
mmselfsup/models/target_generators/low_freq_generator.py and configs/selfsup/pixmim/.

Pixel reconstruction makes the last encoder blocks keep low-level detail ("wasted modelling
capability"). MFF adds a shortcut (MFF Fig. 3): the outputs of a few shallow blocks, each through
its own Linear(D, D), are mixed with the last block's output by a learned softmax-weighted sum,
before the shared final LayerNorm. Masking, decoder, target and loss stay those of MAE (MFF_MAE,
`--target pixel`) or of PixMIM (MFF_PixMIM, `--target lowfreq`: the target image keeps only the
frequencies inside a circle of radius 40 at 224 px). The fusion exists only in pre-training:
downstream models are plain ViTs that ignore `proj_*`. The fusion weights are logged
(`fusion_weights_k`) and drawn as a bar chart under each checkpoint's picture (MFF supp. Fig. 1:
does the model lean more and more on the shallow blocks?).

Defaults (MFF supp. Tab. 1; configs/mff/mff_vit-base-p16_8xb512-amp-coslr-800e_in1k.py): ViT-B/16
at 224, fused blocks 0, 2, 4, 6, 8, 11 (preset L6; MFF Tab. 3(b), listed in supp. Tab. 4), decoder
8 blocks x 512 (16 heads), mask ratio 0.75, norm-pix pixel target, PixMIM's crop (note 6), 800
epochs (300 also released), 40 warm-up, blr 1.5e-4 (lr = blr * batch / 256 at batch 4096 = 512 x 8
GPUs), AdamW (0.9, 0.95), weight decay 0.05 (exemptions: note 4).

    python mff.py                                    # CPU smoke run on the built-in data
    python mff.py --data-path /data/imagenet         # one GPU
    torchrun --nproc_per_node 8 mff.py --data-path /data/imagenet --model vit_base  # MFF_MAE
    torchrun --nproc_per_node 8 mff.py --data-path /data/imagenet --target lowfreq  # MFF_PixMIM
    # PixMIM itself (one block, no fusion); all 12 blocks (a row of MFF Tab. 3(b); supp. Fig. 1)
    torchrun --nproc_per_node 8 mff.py --data-path /data/imagenet --fuse-layers L1 --target lowfreq
    torchrun --nproc_per_node 8 mff.py --data-path /data/imagenet --fuse-layers L12 --epochs 300

Where this follows the official code rather than the paper (or where the paper is silent):
 1. The fusion, as open-mmlab/mmpretrain mmpretrain/models/selfsup/mff.py:MFFViT.forward does it:
    only the shallow blocks are projected, the last listed block enters as it is; one logit per
    block, initialised to 1, softmax recomputed at every forward; every token is fused, cls
    included; the one final LayerNorm comes after the sum.
 2. With one fused block the logit is frozen (same file, MFFViT.__init__) and softmax gives
    exactly 1, so MFF with one block is MAE to the last bit.
 3. The projections get Xavier-uniform weights and zero biases from the model-wide init_cfg of
    open-mmlab/mmpretrain configs/_base_/models/mae_vit-base-p16.py; MFFViT does not init them.
 4. Weight decay as the paramwise_cfg of open-mmlab/mmpretrain
    configs/mae/mae_vit-base-p16_8xb512-amp-coslr-800e_in1k.py (the base of configs/mff): none
    for names containing ln, bias, pos_embed, mask_token or cls_token, so the fusion logits and
    projection weights are decayed (`--no-fusion-weight-decay` exempts them).
 5. Sin-cos tables in the layout of open-mmlab/mmpretrain
    mmpretrain/models/utils/position_encoding.py:build_2d_sincos_position_embedding: the row
    encoding fills the first half of the channels, MAE's the column (`--sincos-order mae`).
 6. open-mmlab/mmpretrain configs/mff/mff_vit-base-p16_8xb512-amp-coslr-{300e,800e}_in1k.py pair
    MAE's pixel target with PixMIM's crop: resize, random crop of the 4-px reflect-padded image,
    flip (`--crop rrc` gives MAE's RandomResizedCrop).
 7. The low-frequency target as open-mmlab/mmselfsup
    mmselfsup/models/target_generators/low_freq_generator.py:LowFreqTargetGenerator.forward:
    un-normalised without clamping, an ideal circular filter centred half a bin off the DC term,
    no ifftshift before the inverse FFT, then its magnitude; radius 40 at 224 px
    (configs/selfsup/pixmim/pixmim_vit-base-p16_8xb512-amp-coslr-300e_in1k.py).
 8. At other resolutions the radius scales with the image side (ours; `--lowfreq-radius`).
 9. MFF_PixMIM has no released config: we pair MFFViT with mmselfsup's target generator (ours).
10. A list of fused blocks that stops before the last block: the official code runs the later
    blocks and drops their output; we refuse it unless `--allow-truncated-fusion`.
11. Presets LK at depths other than 12 spread the blocks as MFF supp. A.5 does at depth 12, and
    ViT-S/L/H take ViT-B's decoder (ours).
12. MFF^detach (MFF supp. A.8): a stop-gradient on each shallow block's output before its
    projection; the projections and logits still train (our reading).
"""
import argparse
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (IMAGENET_MEAN, IMAGENET_STD, MaskedAutoencoderViT, autocast_off,
                    denormalize, grid_picture, init_weights, masked_mean,
                    pixel_columns, pixel_labels, sincos_pos_embed)

LOWFREQ_RADIUS_224 = 40  # mmselfsup PixMIM config: LowFreqTargetGenerator(radius=40, img_size=224)


# ----------------------------------------------------------------------------- model

def mmpretrain_sincos(dim, grid):
    """mmpretrain's fixed sin-cos table (1+G*G, D): MAE's with its two halves swapped, so the row
    encoding comes first (note 5)."""
    table = sincos_pos_embed(dim, grid)  # (1+G*G, D): column half, row half; cls row 0
    return torch.cat([table[:, dim // 2:], table[:, :dim // 2]], dim=1)


# ---------------------------------------------------------------------- PixMIM low-frequency target

def lowpass_filter(H, W, radius, device=None):
    """Ideal circular low-pass (H, W) bool: True within `radius` of ((H-1)/2, (W-1)/2) (note 7).

    After fftshift the DC term sits at (H/2, W/2), half a bin from that centre.
    """
    rows = torch.arange(H, dtype=torch.float64, device=device)[:, None]  # (H, 1)
    cols = torch.arange(W, dtype=torch.float64, device=device)[None]  # (1, W)
    return (rows - (H - 1) / 2) ** 2 + (cols - (W - 1) / 2) ** 2 <= radius ** 2  # (H, W)


def low_pass(x, radius):
    """[0, 1] images (B, 3, H, W) -> |ifft2(filter * fftshift(fft2(x)))| (B, 3, H, W), real >= 0."""
    # (B, 3, H, W) complex, DC moved to the middle
    spectrum = torch.fft.fftshift(torch.fft.fft2(x.float()), dim=(-2, -1))
    spectrum = spectrum * lowpass_filter(*x.shape[-2:], radius, x.device)
    # No ifftshift (note 7): for even sizes it would only multiply by (-1)^(i+j), which the
    # magnitude removes; the off-centre filter makes the result complex, hence abs, not .real.
    return torch.fft.ifft2(spectrum).abs()  # (B, 3, H, W)


def lowfreq_image(imgs, radius, mean_std=(IMAGENET_MEAN, IMAGENET_STD)):
    """Normalised images (B, 3, H, W) -> their low-frequency version, normalised (fp32, no grad).
    mean_std: the per-colour mean and std the data was normalised with."""
    with torch.no_grad(), autocast_off(imgs.device):
        mean, std = (torch.tensor(v, device=imgs.device).view(1, 3, 1, 1) for v in mean_std)
        rgb = imgs.float() * std + mean  # back to [0, 1] RGB, not clamped (note 7)
        return (low_pass(rgb, radius) - mean) / std


# ----------------------------------------------------------------------------- the model

def fusion_bars(alpha, layers, width, height=160):
    """Bar chart of the fusion weight per fused block, uint8 (3, height, width); dashed: 1/K."""
    from PIL import Image, ImageDraw
    img = Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(img)
    K, top, bottom, left = len(alpha), 32, height - 16, 4
    draw.text((left, 2), f'fusion weights alpha = softmax(proj_weights) per block; '
                         f'dashed: uniform 1/{K}', fill='black')
    scale = (bottom - top) / max(max(alpha), 1 / K)
    slot = (width - 2 * left) / K
    for k, (weight, block) in enumerate(zip(alpha, layers)):
        x0, x1 = left + (k + 0.15) * slot, left + (k + 0.85) * slot
        y0 = bottom - weight * scale
        draw.rectangle([x0, y0, x1, bottom], fill=(200, 90, 60) if k == K - 1 else (70, 110, 180))
        draw.text((x0, y0 - 12), f'{weight:.3f}'.lstrip('0'), fill='black')
        draw.text((x0, bottom + 2), f'b{block}', fill='black')
    y = bottom - scale / K
    for x in range(left, width - left, 8):
        draw.line([(x, y), (x + 4, y)], fill=(120, 120, 120))
    pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return pixels.view(height, width, 3).permute(2, 0, 1).contiguous()  # (3, height, width)


class MFF(MaskedAutoencoderViT):
    """MAE whose latent is LN(sum_k alpha_k f_k) over the K fused blocks (MFF Fig. 3, note 1).

    f_k = proj_layers[k](h_k) for the shallow blocks, f_K = h_K for the last listed block; alpha =
    softmax of the K learnable logits `proj_weights` (K, 1, 1, 1), initialised to ones. Keys: MAE's
    plus `proj_layers.k.*` and `proj_weights` (mmpretrain's `backbone.proj_*` without the prefix).
    Shapes: the encoder sees N = 1 + kept tokens (cls first).
    """

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0,
                 norm_pix_loss=True, mask_ratio=0.75, fuse_layers='L6', detach_shallow=False,
                 allow_truncated=False, target='pixel', lowfreq_radius=None,
                 sincos_order='mmpretrain', decay_fusion=True,
                 data_mean_std=(IMAGENET_MEAN, IMAGENET_STD)):
        super().__init__(img_size, patch_size, embed_dim, depth, num_heads, decoder_embed_dim,
                         decoder_depth, decoder_num_heads, mlp_ratio, norm_pix_loss, mask_ratio)
        if target not in ('pixel', 'lowfreq'):
            raise ValueError(f'--target {target} is unknown; use pixel (MFF_MAE) or lowfreq '
                             f'(MFF_PixMIM)')
        if lowfreq_radius is not None and lowfreq_radius < 0:
            raise ValueError(f'--lowfreq-radius {lowfreq_radius} is negative; use a radius in '
                             f'frequency bins >= 0')
        self.fuse_layers = check_fuse_layers(fuse_layers, depth, allow_truncated)
        K = len(self.fuse_layers)
        self.proj_layers = nn.ModuleList([nn.Linear(embed_dim, embed_dim) for _ in range(K - 1)])
        self.proj_layers.apply(init_weights)  # note 3
        # note 2: frozen for K = 1
        self.proj_weights = nn.Parameter(torch.ones(K, 1, 1, 1), requires_grad=K > 1)
        self.detach_shallow, self.target_kind, self.decay_fusion = (detach_shallow, target,
                                                                    decay_fusion)
        self.data_mean_std = data_mean_std  # the data's normalisation, undone by the lowfreq target
        # R = 40 at 224 (note 7), scaled with the side at other resolutions (note 8)
        self.lowfreq_radius = (LOWFREQ_RADIUS_224 * img_size / 224 if lowfreq_radius is None
                               else lowfreq_radius)
        self.sincos_order = sincos_order
        self.fill_tables()

    # --- encoder with fusion
    def fusion_weights(self):
        """alpha = softmax of the K logits (K, 1, 1, 1), recomputed at every forward (note 1)."""
        return F.softmax(self.proj_weights, dim=0)

    def fuse(self, feats):
        """K block outputs (B, N, D) -> sum_k alpha_k f_k (B, N, D), cls token included (note 1)."""
        shallow = [proj(h.detach() if self.detach_shallow else h)  # MFF^detach (note 12)
                   for proj, h in zip(self.proj_layers, feats[:-1])]
        # (K, B, N, D) -> (B, N, D)
        return (torch.stack(shallow + feats[-1:]) * self.fusion_weights()).sum(0)

    def forward_encoder(self, imgs, ids_keep, layers=None):
        """Encoder on cls + kept tokens -> LN(fused) (B, N, D), plus the raw outputs of `layers`."""
        x = self.embed(imgs, ids_keep)  # (B, N, D)
        last_block = max(self.fuse_layers + list(layers or []))
        fused_inputs, requested = [], []
        # later blocks cannot change the result (a truncated list drops them, note 10)
        for i, blk in enumerate(self.blocks[:last_block + 1]):
            x = blk(x)
            if i in self.fuse_layers:
                fused_inputs.append(x)
            if layers is not None and i in layers:
                requested.append(x)
        # the one final LayerNorm, after the fusion (note 1)
        latent = self.norm(self.fuse(fused_inputs))
        return (latent, requested) if layers is not None else latent

    # --- target and forward
    def target(self, imgs):
        """Norm-pix target (B, L, p*p*3) of the image, or of its low-frequency version (note 9)."""
        if self.target_kind == 'lowfreq':
            imgs = lowfreq_image(imgs, self.lowfreq_radius, self.data_mean_std)
        return super().target(imgs)

    def forward(self, imgs, mask=None, keys=None):
        """imgs (B, 3, H, W) -> dict(loss, pred, target, mask, fusion_weights: K 0-d tensors)."""
        ids_keep, mask, ids_restore = self.masking(imgs, mask, keys)  # MAE's random masking
        latent = self.forward_encoder(imgs, ids_keep)  # (B, 1+K, D): the encoder with fusion
        pred = self.forward_decoder(latent, ids_restore)  # (B, L, p*p*3): MAE's decoder
        target = self.target(imgs)  # (B, L, p*p*3): the pixels or their low frequencies
        loss = masked_mean(self.patch_loss(pred, target), mask)  # MSE on the masked patches
        # logged as mmpretrain MFF.loss logs weight_0 .. weight_{K-1}
        alpha = list(self.fusion_weights().detach().view(-1).unbind())
        return dict(loss=loss, pred=pred, target=target, mask=mask, fusion_weights=alpha)

    # --- sin-cos tables, weight decay, log line, picture
    def fill_tables(self):
        """Both fixed sin-cos tables in the chosen layout (default mmpretrain's, note 5)."""
        make = mmpretrain_sincos if self.sincos_order == 'mmpretrain' else sincos_pos_embed
        for table in (self.pos_embed, self.decoder_pos_embed):
            table.data = make(table.shape[-1], self.grid)[None].to(table.device)

    def no_weight_decay(self, name, param):
        """mmpretrain's rule (note 4): no decay for names containing ln, bias, pos_embed, ...

        Mapped onto our names: mmpretrain's LayerNorms are `ln1`/`ln2` (blocks), `backbone.ln1`
        and `neck.ln1`; ours are `norm1`/`norm2`, `norm` and `decoder_norm`, and no other name
        of ours contains 'norm'. So `proj_weights` and `proj_layers.*.weight` are decayed unless
        decay_fusion=False.
        """
        if not self.decay_fusion and name.startswith('proj_'):
            return True
        return any(s in name for s in ('norm', 'bias', 'pos_embed', 'mask_token', 'cls_token'))

    def describe(self):
        """One line for the log: tokens, fused blocks, target."""
        L, K = self.grid ** 2, len(self.fuse_layers)
        keep = int(L * (1 - self.mask_ratio))
        target = (f'low-frequency (radius {self.lowfreq_radius:g})' if self.target_kind == 'lowfreq'
                  else 'pixel')
        detach = ', shallow detached' if self.detach_shallow else ''
        return (f'mff: {L} patches per image, {keep} visible to the encoder, {L - keep} masked; '
                f'fused blocks {self.fuse_layers} (K = {K}, alpha = 1/{K} at init{detach}); '
                f'{target} target')

    def picture(self, imgs, out):
        """input | (low-freq target) | masked | reconstruction, the fusion weights' bars below."""
        target_imgs = (lowfreq_image(imgs, self.lowfreq_radius, self.data_mean_std)
                       if self.target_kind == 'lowfreq' else imgs)
        columns = pixel_columns(target_imgs, out['pred'], out['mask'], self.patch_size,
                                self.norm_pix_loss)
        names = pixel_labels(self.norm_pix_loss)
        if self.target_kind == 'lowfreq':
            names[0] = 'target'
        if self.target_kind == 'lowfreq':
            columns, names = [denormalize(imgs)] + columns, ['input'] + names
        grid = grid_picture(columns, names)
        alpha = [float(a) for a in out['fusion_weights']]
        return torch.cat([grid, fusion_bars(alpha, self.fuse_layers, grid.shape[-1])],
                         dim=1)  # (3, H + h, W)


def from_official(obj):
    """mmpretrain MFF checkpoint (mmengine {'meta', 'state_dict'}, `backbone.`/`neck.`) or ours.

    Returns our keys. The stored sin-cos tables are kept as they are (mmpretrain's layout, note 5);
    the non-persistent data-preprocessor buffers are absent, and dropped if present.
    """
    return mmpretrain_vit_to_timm(strip_prefix(pick_state_dict(obj)))


# ----------------------------------------------------------------------------- which blocks to fuse

def fuse_preset(K, depth):
    """Preset LK: K block indices spread evenly from block 0 to the last block (note 11).

    Blocks k * (depth // (K-1)) for k < K-1, plus the last; every block when depth < K.
    """
    if depth < K:
        return list(range(depth))
    if K == 1:
        return [depth - 1]
    step = depth // (K - 1)
    # depth 12 gives the lists of MFF supp. Tab. 4, e.g. L6 = [0, 2, 4, 6, 8, 11]
    return [k * step for k in range(K - 1)] + [depth - 1]


def parse_fuse_layers(text, depth):
    """'0,2,4,6,8,11' (negative = from the end) or a preset 'L1'/'L2'/'L4'/'L6'/'L12' -> indices."""
    text = str(text).strip()
    if text[:1] in ('L', 'l') and text[1:].isdigit() and int(text[1:]) > 0:
        return fuse_preset(int(text[1:]), depth)
    try:
        return [int(t) for t in text.split(',')]
    except ValueError:
        raise ValueError(f'--fuse-layers {text!r} is neither a comma list of block indices '
                         f'(e.g. 0,2,4,6,8,11) nor a preset L1, L2, L4, L6 or L12') from None


def check_fuse_layers(layers, depth, allow_truncated=False):
    """Indices (negative from the end) -> checked list: in range, increasing, ending at depth-1."""
    if isinstance(layers, str):
        layers = parse_fuse_layers(layers, depth)
    # -1 -> depth-1, as mmpretrain VisionTransformer.__init__ converts out_indices
    indices = [i + depth if i < 0 else i for i in layers]
    given = ','.join(map(str, layers))
    if not indices or not all(0 <= i < depth for i in indices):
        raise ValueError(f'--fuse-layers {given}: block indices must lie in 0..{depth - 1} '
                         f'(or -{depth}..-1)')
    if any(b <= a for a, b in zip(indices, indices[1:])):
        raise ValueError(f'--fuse-layers {given} must be strictly increasing, '
                         f'e.g. 0,2,4,6,8,{depth - 1}')
    if indices[-1] != depth - 1 and not allow_truncated:  # note 10
        raise ValueError(f'--fuse-layers {given} ends at block {indices[-1]}, so blocks '
                         f'{indices[-1] + 1}..{depth - 1} would be dropped; end the list with '
                         f'{depth - 1} (or -1), or pass --allow-truncated-fusion')
    return indices


# ----------------------------------------------------------------------------- PixMIM data

def pixmim_transform(res, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """PixMIM's crop: short side -> res (bilinear), a res crop of the 4-px reflect-padded image,
    flip, normalise (note 6; mmpretrain configs/mff/*.py). The steps before ToImage run on PIL
    images as there, on uint8 tensors (the built-in data) otherwise."""
    from torchvision.transforms import InterpolationMode, v2
    return v2.Compose([v2.Resize(res, interpolation=InterpolationMode.BILINEAR, antialias=True),
                       v2.RandomCrop(res, padding=4, padding_mode='reflect'),
                       v2.RandomHorizontalFlip(), v2.ToImage(),
                       v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(mean, std)])


def make_dataset(args):
    """The pre-training set with the crop of --crop: PixMIM's (default) or MAE's."""
    crop = pixmim_transform(args.res, *mean_std(args)) if args.crop == 'pixmim' else None
    return pretrain_dataset(args, crop)


# ----------------------------------------------------------------------------- command line

# The runner's names: for the command line below, and for make_dataset and from_official above
# (data, checkpoints).
from common import (fill_defaults, launch, mae_config, mean_std,  # noqa: E402
                    mmpretrain_vit_to_timm, parse_pretrain, pick_state_dict, pretrain_dataset,
                    pretrain_parser, strip_prefix)

# Per-model defaults: ViT-B from the released configs (configs/mff/*_800e_in1k.py), the others
# with ViT-B's decoder (note 11); vit_tiny is ours, for CPUs. recipe_batch: the effective batch,
# 8 x 512 (open-mmlab/mmpretrain configs/mff/mff_vit-base-p16_8xb512-amp-coslr-800e_in1k.py).
DEFAULTS = {
    'vit_tiny': dict(decoder_dim=128, decoder_depth=2, decoder_heads=4, batch_size=256, epochs=100,
                     warmup_epochs=5),
    # ViT-S: none in MFF supp. Tab. 1; ViT-B's, as supp. A.2 keeps ViT-B's settings for ViT-S
    'vit_small': dict(decoder_dim=512, decoder_depth=8, decoder_heads=16, batch_size=512,
                      epochs=800, warmup_epochs=40),
    # 8 x 512 = 4096 as in the config's name and lr; configs/mff/metafile.yml says 2048
    'vit_base': dict(decoder_dim=512, decoder_depth=8, decoder_heads=16, batch_size=512,
                     epochs=800, warmup_epochs=40, recipe_batch=4096),
    'vit_large': dict(decoder_dim=512, decoder_depth=8, decoder_heads=16, batch_size=512,
                      epochs=800, warmup_epochs=40,
                      recipe_batch=4096),  # MAE's ViT-L recipe
    'vit_huge': dict(decoder_dim=512, decoder_depth=8, decoder_heads=16, batch_size=512,
                     epochs=800, warmup_epochs=40, recipe_batch=4096),
}
# The smoke preset (ours, no --data-path): MFF's recipe (MAE at ratio 0.75, norm-pix target, the
# shallow layers fused into the output; here all four) scaled to about 5 minutes on 2 CPU cores: a
# ViT of 4 blocks, width 96, 8-px patches at 64 px, a 2-block 128-wide decoder, 36 epochs of the
# built-in images, blr 1.6e-2 (about 100x the recipe's 1.5e-4)
SMOKE = dict(model='vit_tiny', patch_size=8, embed_dim=96, depth=4, num_heads=3, res=64,
             batch_size=64, epochs=36, warmup_epochs=1, blr=1.6e-2, decoder_dim=128,
             decoder_depth=2, decoder_heads=4, log_freq=16, save_freq=12, num_workers=2,
             eval_knn=12)
OFFICIAL_NAMES = {'b': 'vit_base', 'base': 'vit_base', 'l': 'vit_large', 'large': 'vit_large',
                  'h': 'vit_huge', 'huge': 'vit_huge', 'mff_vit-base-p16': 'vit_base',
                  'mae_vit_base_patch16': 'vit_base', 'mae_vit_large_patch16': 'vit_large',
                  'mae_vit_huge_patch14': 'vit_huge'}


def get_args(argv=None):
    """Parse the command line and fill the per-model defaults."""
    p = pretrain_parser('mff', __doc__, decoder=('dim', 'depth', 'heads'), norm_pix=True,
                        norm_pix_help='standardise each target patch (mmpretrain norm_pix=True, '
                        'default)')
    a = p.add_argument
    a('--fuse-layers', '--fuse_layers', '--out_indices', '--out-indices', dest='fuse_layers',
      help='fused blocks: comma list ending at the last block (0-based, -1 = last) or preset '
           'L1/L2/L4/L6/L12; default L6 = 0,2,4,6,8,11 at depth 12 (configs/mff out_indices; '
           'MFF Tab. 3(b) / supp. Tab. 4)')
    # note 10
    a('--allow-truncated-fusion', dest='allow_truncated', action='store_true',
      help='allow a list that stops before the last block (official behaviour: later blocks are '
           'dropped; single process only, DDP would need find_unused_parameters)')
    a('--detach-shallow', '--detach_shallow', dest='detach_shallow', action='store_true',
      help='MFF^detach (MFF supp. A.8): no gradient from the fusion into the shallow blocks')
    a('--target', choices=('pixel', 'lowfreq'), default='pixel',
      help='pixel = MFF_MAE (default, configs/mff) or lowfreq = MFF_PixMIM (low-frequency target '
           'image)')
    a('--lowfreq-radius', '--lowfreq_radius', '--radius', dest='lowfreq_radius', type=float,
      help='low-pass radius in frequency bins at --res; default 40 * res / 224 (PixMIM: 40 at 224)')
    # official config, not the paper (note 6)
    a('--crop', choices=('pixmim', 'rrc'), default='pixmim',
      help='pixmim = resize + 4-px reflect-padded random crop + flip (configs/mff, default); '
           'rrc = MAE RandomResizedCrop(--rrc-scale, bicubic) + flip')
    a('--norm_pix', dest='norm_pix_loss', action='store_true', help=argparse.SUPPRESS)
    # note 5
    a('--sincos-order', dest='sincos_order', choices=('mmpretrain', 'mae'), default='mmpretrain',
      help='sin-cos table layout for from-scratch runs: mmpretrain (row first, default) or mae '
           '(column first)')
    # note 4
    a('--fusion-weight-decay', dest='fusion_weight_decay', action=argparse.BooleanOptionalAction,
      default=True,
      help='weight decay on proj_weights and proj_layers.*.weight (mmpretrain rule, default on)')
    args = parse_pretrain(p, argv, DEFAULTS, SMOKE, OFFICIAL_NAMES, res=224, mask_ratio=0.75,
                          blr=1.5e-4)
    depth = args.depth
    fill_defaults(args, ('default', dict(fuse_layers='L6')))
    try:
        args.fuse_layers = check_fuse_layers(args.fuse_layers or 'L6', depth, args.allow_truncated)
    except ValueError as e:
        p.error(str(e))
    if args.fuse_layers[-1] != depth - 1 and int(os.environ.get('WORLD_SIZE', 1)) > 1:
        p.error('--allow-truncated-fusion leaves blocks without gradient, which DDP rejects; '
                'run it in one process')
    if args.lowfreq_radius is not None and args.target != 'lowfreq':
        p.error(f'--lowfreq-radius {args.lowfreq_radius:g} needs --target lowfreq')
    if args.target == 'lowfreq':  # note 8
        fill_defaults(args, ('target(lowfreq)', dict(lowfreq_radius=LOWFREQ_RADIUS_224 * args.res
                                                      / 224)))
    return args


def build_model(args):
    """The MFF model of the resolved arguments."""
    return MFF(**mae_config(args), fuse_layers=args.fuse_layers,
               detach_shallow=args.detach_shallow, allow_truncated=args.allow_truncated,
               target=args.target, lowfreq_radius=args.lowfreq_radius,
               sincos_order=args.sincos_order, decay_fusion=args.fusion_weight_decay,
               data_mean_std=mean_std(args))


def main(argv=None):
    """Pre-train MFF (the module docstring); a user error prints `error: …` and exits 2."""
    return launch(argv, get_args, build_model, make_dataset, from_official)


if __name__ == '__main__':
    main()
