"""LocalMIM: Masked Image Modeling with Local Multi-Scale Reconstruction (Wang et al., CVPR 2023).
https://arxiv.org/abs/2303.05251 and its supplement ("Suppl.", cited by its own numbers). Official
code: github.com/Haoqing-Wang/LocalMIM @ 314a6e5, cited as `<path>:<function>` of that repository.

MAE-style masking (the encoder sees the visible tokens only), but four light decoders hang off four
encoder depths, each reconstructing the masked regions at its own scale: lower layers fine regions,
upper layers coarse ones (ViT: 4/8/16/32 px at patch 16; Swin: 8/16/32/32). A region's target is
its HOG with one cell per region (Suppl. Sec. C), per colour and L2-normalised, or for Swin its
normalised pixels; the four masked MSEs are summed with equal weights (Suppl. Sec. C). Each level
has its own LayerNorm and the encoder no final norm; decoders and level norms are dropped after
pre-training. A decoder (Fig. 2b): transformer blocks, a deconvolution or pool to its level's grid,
a head; ViT: 256 wide, 1 block, 8 heads. The Swin runs on the visible tokens only, with windows
built over them (GreenMIM, Huang et al. 2022); its decoders are 64/128/128/128 wide.

Defaults = the official README commands: 224 px, mask ratio 0.75, AdamW (0.9, 0.95), wd 0.05; ViT-B
HOG 9 bins, blr 2e-4, batch 256 x 8, 1600 epochs; ViT-L HOG 18 + bias, 1.5e-4, 128 x 4 x 8, 800;
Swin-B window 7, HOG 18 + bias (or `--target pixel`), 1e-4, 256 x 8, 400; Swin-L window 14, 1e-4,
128 x 4 x 8, 800. The predictions are HOG histograms, not pixels: the pictures draw them as
orientation glyphs (huawei-noah/Efficient-Computing#137).

    python localmim.py                                          # CPU smoke run on the built-in data
    python localmim.py --data-path /data/imagenet               # one GPU
    torchrun --nproc_per_node 8 localmim.py --data-path /data/imagenet --model vit_base
    torchrun --nproc_per_node 8 localmim.py --data-path /data/imagenet --model swin_base

Where this follows the official code rather than the paper (or where the paper is silent):
 1. Levels: ViT blocks [1, 3, depth-3, depth-1], 0-based (ViT-B's are Suppl. Sec. C's segmentation
    out-indices [2, 4, 10, 12], 1-based); Swin: each stage's output after its patch merging, if any.
 2. The decoder head ends in one linear layer (a 1x1 conv), where Fig. 2b draws an MLP.
 3. `--hog-bias` (README ViT-L and Swin; the Suppl. describes HOG without it): the gradient convs
    get a frozen random bias, which shifts the HOG target.
 4. HOG cells are hard-coded in pixels (ViT 4/8/16/32, Swin 8/16/32/32), right for patch 16 / 4
    only; ours are patch / scale, the same numbers there.
 5. A level's squared error is averaged over the masked regions of the whole batch; at the x0.5 ViT
    level a region weighs the masked fraction of its 2x2 patches.
 6. README numbers where the Suppl. differs: 9 HOG bins for ViT-B (Sec. C: 18), ViT-L blr 1.5e-4
    (Tab. 3: 2e-4).
 7. Swin: one mask for the whole batch, int(r * n) + 1 of its n units masked (37 of 49 at 0.75).
 8. Swin pre-training merges 2x2 neighbours as TL, TR, BL, BR (`Swin/models_mim.py:PatchMerging`);
    standard Swin and the official fine-tuning model (`Swin/models_swin.py:PatchMerging`) use TL,
    BL, TR, BR. Off with --no-official-swin-quirks.
 9. Swin: after a merge, window grouping and relative bias see mixed-up token coordinates (stages 1
    and 2). Off with --no-official-swin-quirks.
10. Swin LayerNorm eps 1e-6 (`Swin/models_mim.py:mim_swin_*` factories; standard Swin: 1e-5).
11. Swin weight decay also skips names with `position_bias`, `token` (`Swin/run_pretrain.py:main`).
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from common import (Block, SwinTransformer, VisionTransformer, autocast_off, check_divisible,
                    check_ratio, drop_path, fill_masked, grid_picture, hog_from_gradients,
                    hog_glyphs, init_weights, norm_pix, patchify, pixel_columns, pixel_labels,
                    sample_noise, sincos_pos_embed, sobel_kernel, token_masking, upsample_mask)

VIT_SCALES = (4, 2, 1, 0.5)  # grid multiplier of each ViT level (official `self.scale`)
SWIN_UNITS = (4, 2, 1, 1)  # tokens per mask unit side on the Swin level grids (28/14/7/7 at 224)


# ----------------------------------------------------------------------------- targets

class HOGConv(nn.Module):
    """An official HOG layer's gradients (`ViT/models_mim.py:HOGLayer`): a frozen Sobel conv and,
    with --hog-bias, a frozen random bias (U(-1/3, 1/3); note 3)."""

    def __init__(self, bias=False):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1, padding_mode='reflect', bias=bias)
        kx = sobel_kernel()  # (3, 3), as common.sobel's
        self.conv.weight.data = torch.stack([kx, kx.t()])[:, None]  # (2, 1, 3, 3)
        self.requires_grad_(False)

    def forward(self, imgs):
        """imgs (B, C, H, W) -> gx, gy (B, C, H, W), fp32: each colour through the conv as its own
        (B, 1, H, W) image, the official call (`ViT/models_mim.py:MaskedAutoencoderViT.HOG`).
        common.sobel's grouped call may round a gradient that is 0 in exact arithmetic to another
        +-1 ulp and move its pixel between bins 0 and nbins-1; the same call rounds alike."""
        g = [self.conv(imgs[:, c:c + 1].float()) for c in range(imgs.shape[1])]  # C x (B, 2, H, W)
        return torch.stack([t[:, 0] for t in g], 1), torch.stack([t[:, 1] for t in g], 1)


def hog_levels(imgs, nbins, cells, hog_enc):
    """HOG targets of all levels: [(B, (H/cell)^2, 3*nbins)], raster cells, [R bins | G | B].
    Without a bias the cell histograms are computed once, at the finest cell, and mean-pooled to
    the coarser cells before each level's L2 norm (equal to one HOG per level within float
    rounding). With --hog-bias every level has its own bias, hence its own gradients and HOG."""
    with torch.no_grad(), autocast_off(imgs.device):
        if hog_enc[0].conv.bias is not None:
            maps = [hog_from_gradients(*layer(imgs), nbins, c, 'mean')  # (B, 3*nbins, H/c, W/c)
                    for c, layer in zip(cells, hog_enc)]
        else:
            gx, gy = hog_enc[0](imgs)  # (B, 3, H, W) each; all levels' convs are the same
            finest = hog_from_gradients(gx, gy, nbins, cells[0], 'mean', normalize=False)
            maps = []
            for c in cells:
                hist = F.avg_pool2d(finest, c // cells[0])  # (B, 3*nbins, H/c, W/c): mean of means
                B, _, Hc, Wc = hist.shape
                maps.append(F.normalize(hist.view(B, 3, nbins, Hc, Wc), dim=2).view(B, -1, Hc, Wc))
        return [m.flatten(2).transpose(1, 2) for m in maps]  # (B, cells, 3*nbins)


def level_loss(pred, target, weight):
    """Masked MSE of one level: sum_i w_i mean_c (pred - target)^2 / sum_i w_i over the whole batch
    (note 5; `ViT/models_mim.py:MaskedAutoencoderViT.forward_loss`)."""
    w = weight.float()
    return (((pred.float() - target) ** 2).mean(-1) * w).sum() / w.sum().clamp(min=1e-6)


# ----------------------------------------------------------------------------- decoders

class LayerNorm2d(nn.LayerNorm):
    """Channels-first LayerNorm (B, C, H, W) of the x4 head (ConvNeXt style, eps 1e-6)."""

    def forward(self, x):
        """(B, C, H, W) -> (B, C, H, W)."""
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def scale_head(dim, out_dim, scale):
    """The `pred` head of a ViT level (`ViT/models_mim.py:MAE_Decoder`): x4 two transposed convs,
    x2 one, x1 none, x0.5 a 2x2 average pool; then a 1x1 conv (official, not the paper: note 2)."""
    if scale == 4:
        layers, hidden = [nn.ConvTranspose2d(dim, dim // 2, 2, 2), LayerNorm2d(dim // 2, eps=1e-6),
                          nn.GELU(), nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2)], dim // 4
    elif scale == 2:
        layers, hidden = [nn.ConvTranspose2d(dim, dim // 2, 2, 2)], dim // 2
    elif scale == 1:
        layers, hidden = [], dim
    else:
        layers, hidden = [nn.AvgPool2d(2, 2)], dim
    return nn.Sequential(*layers, nn.Conv2d(hidden, out_dim, 1))


class Decoder(nn.Module):
    """One level's decoder: Linear -> mask tokens -> fixed sin-cos pos-embed -> blocks -> LayerNorm
    -> head. ViT (`scale` given): a cls row, the patch grid, the scale head on the (B, d, G, G) map.
    Swin (`scale` None): no cls, the level's own grid, a Linear head. Keys as the official
    `ViT/models_mim.py:MAE_Decoder` / `Swin/models_mim.py:ViT_Decoder`."""

    def __init__(self, in_dim, dim, depth, num_heads, grid, out_dim, scale=None):
        super().__init__()
        self.grid, self.cls = grid, scale is not None
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed(dim, grid, cls_token=self.cls)[None],
                                      requires_grad=False)
        self.blocks = nn.ModuleList([Block(dim, num_heads, 4.0) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = scale_head(dim, out_dim, scale) if self.cls else nn.Linear(dim, out_dim)
        self.apply(init_weights)  # Linear xavier, LayerNorm (1, 0), conv heads PyTorch's (official)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent, restore):
        """ViT: latent (B, 1+K, D), restore = ids_restore (B, L); Swin: latent (B, K, D), restore =
        its raster positions (K,) on the level grid -> predictions (B, L_out, C_out) in raster
        order."""
        x = self.embed(latent)  # (B, [1+]K, d)
        B, K, d = x.shape
        if self.cls:
            x = fill_masked(x, self.mask_token, restore)  # (B, 1+L, d)
        else:
            L = self.grid ** 2
            # built where `restore` is: on the host (LocalMIMSwin.forward), the device never waits
            visible = torch.zeros(L, dtype=torch.bool, device=restore.device)
            visible[restore] = True
            # ids_restore (L,) takes [visible, masked] tokens to raster order: x (B, L, d)
            ids_restore = torch.argsort(torch.cat([restore, (~visible).nonzero().squeeze(1)]))
            ids_restore = ids_restore.to(x.device, non_blocking=True)
            x = torch.cat([x, self.mask_token.expand(B, L - K, d)], dim=1)[:, ids_restore]
        x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        if not self.cls:
            return self.pred(x)  # (B, L, C_out)
        G = self.grid
        x = x[:, 1:].transpose(1, 2).reshape(B, d, G, G)  # (B, d, G, G): token i at (i // G, i % G)
        return self.pred(x).flatten(2).transpose(1, 2)  # (B, (sG)^2, C_out)


# ----------------------------------------------------------------------------- pictures

def level_labels(n):
    """Column names of n levels' target and prediction."""
    return [f'{kind} {k}' for k in range(n) for kind in ('target', 'pred')]


def hog_columns(out, weights, nbins, res):
    """Per level: target glyphs, and prediction glyphs where the loss is taken (else target)."""
    cols = []
    for p, t, w in zip(out['pred'], out['target'], weights):
        G = int(t.shape[1] ** 0.5)
        shown = torch.where(w[..., None] > 0, p.float(), t)  # (B, L_k, 3*nbins)
        for hist in (t, shown):  # (B, G*G, C) -> (B, C, G, G) glyphs
            cols.append(hog_glyphs(rearrange(hist.clamp(min=0), 'b (h w) c -> b c h w', h=G),
                                   nbins, res // G))
    return cols


# ----------------------------------------------------------------------------- ViT

class LocalMIMViT(VisionTransformer):
    """LocalMIM on a ViT (`ViT/models_mim.py:MaskedAutoencoderViT`, same keys): encoder on the kept
    tokens, per-level norms `norm.{k}`, decoders `decoder.{k}`, HOG layers `hog_enc.{k}`."""

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, decoder_embed_dim=256, decoder_depth=1, decoder_num_heads=8,
                 hog_nbins=9, hog_bias=False, mask_ratio=0.75):
        super().__init__(img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio)
        if depth < 7:  # ours: below 7, [1, 3, depth-3, depth-1] repeats or mis-orders the levels
            raise ValueError(f'LocalMIM ViT needs depth >= 7 (supervised blocks [1, 3, depth-3, '
                             f'depth-1] must be increasing), got depth {depth}')
        # A level's region (its HOG cell) is patch / scale: 4, 8, 16, 32 px at patch 16, the sizes
        # of Haoqing-Wang/LocalMIM ViT/models_mim.py:MaskedAutoencoderViT.__init__ (hog_enc), and
        # proportional to the patch otherwise (note 4). Each must be whole (patch % 4) and tile
        # the image (res % 2*patch, the largest).
        if patch_size % 4:
            raise ValueError(f'patch {patch_size} must be divisible by 4: the finest level '
                             f'regresses patch/4-px HOG cells; use --patch-size 8 or 16')
        check_divisible(img_size, 2 * patch_size, 'twice the patch',
                        'the x0.5 level pools 2x2 patches')
        if decoder_embed_dim % 4 or decoder_embed_dim % decoder_num_heads:
            raise ValueError(f'--decoder-dim {decoder_embed_dim} must be divisible by 4 and by '
                             f'--decoder-heads {decoder_num_heads}')
        check_ratio(mask_ratio, '--mask-ratio')
        self.mask_ratio, self.nbins = mask_ratio, hog_nbins
        self.ids = [1, 3, depth - 3, depth - 1]  # supervised blocks (note 1; official `self.ID`)
        self.cells = [int(patch_size / s) for s in VIT_SCALES]  # 4, 8, 16, 32 px at patch 16
        self.norm = nn.ModuleList([nn.LayerNorm(embed_dim, eps=1e-6) for _ in self.ids])
        self.decoder = nn.ModuleList([
            Decoder(embed_dim, decoder_embed_dim, decoder_depth, decoder_num_heads, self.grid,
                    3 * hog_nbins, s) for s in VIT_SCALES])
        self.hog_enc = nn.ModuleList([HOGConv(hog_bias) for _ in VIT_SCALES])

    def masking(self, imgs, mask=None, keys=None):
        """MAE masking (noise from the sample keys) or a given (B, L) bool mask (True = masked)."""
        return token_masking(imgs, self.grid ** 2, self.mask_ratio, mask, keys)[0]

    def noise_len(self):
        """Mask noise values per sample (one per token), drawn by the data workers from its key."""
        return self.grid ** 2

    def forward_encoder(self, imgs, ids_keep):
        """Encoder on the kept tokens -> the normed latents [(B, 1+K, D)] of blocks `self.ids`."""
        x = self.embed(imgs, ids_keep)  # (B, 1+K, D)
        latents = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in self.ids:
                latents.append(self.norm[self.ids.index(i)](x))
        return latents

    def encoder_features(self, imgs):
        """All tokens -> (cls, patch mean through an affine-free LayerNorm), each (B, D); no final
        norm: the last level's norm serves, as finetune.py takes it (common.load_encoder)."""
        x = self.embed(imgs)  # (B, 1+L, D)
        for blk in self.blocks:
            x = blk(x)
        return self.norm[-1](x)[:, 0], F.layer_norm(x[:, 1:].mean(1), (x.shape[-1],), eps=1e-6)

    def level_weights(self, mask):
        """Per-level loss weights from the patch mask (B, L) -> [(B, L_k)]: nearest copies for
        scale >= 1, the mean of each 2x2 patch block at scale 0.5 (note 5;
        `ViT/models_mim.py:MaskedAutoencoderViT.recal_mask`)."""
        patch_mask = mask.float().view(-1, self.grid, self.grid)  # (B, G, G)
        return [upsample_mask(patch_mask, int(s)).flatten(1) if s >= 1
                else F.avg_pool2d(patch_mask[:, None], 2).flatten(1) for s in VIT_SCALES]

    def forward(self, imgs, mask=None, keys=None):
        """imgs (B, 3, H, W) -> dict(loss, loss_per_level, pred [(B, L_k, 3*nbins)], target,
        mask (B, L) bool); the levels weigh the same (Suppl. Sec. C)."""
        ids_keep, mask, ids_restore = self.masking(imgs, mask, keys)
        latents = self.forward_encoder(imgs, ids_keep)
        pred = [dec(z, ids_restore) for dec, z in zip(self.decoder, latents)]
        target = hog_levels(imgs, self.nbins, self.cells, self.hog_enc)
        losses = [level_loss(p, t, w) for p, t, w in zip(pred, target, self.level_weights(mask))]
        return dict(loss=sum(losses), loss_per_level=losses, pred=pred, target=target, mask=mask)

    def describe(self):
        """One line for the log: tokens, supervised blocks, HOG cells."""
        L = self.grid ** 2
        bias = ' + bias' if self.hog_enc[0].conv.bias is not None else ''
        return (f'localmim: {L} patches, {int(L * (1 - self.mask_ratio))} visible; supervised '
                f'blocks {self.ids}, HOG cells {self.cells} px, {self.nbins} bins{bias}')

    def picture(self, imgs, out):
        """input | masked | per level: target HOG, prediction on the masked regions (glyphs)."""
        cols = pixel_columns(imgs, torch.zeros_like(patchify(imgs, self.patch_size)), out['mask'],
                             self.patch_size, False)[:2]
        hogs = hog_columns(out, self.level_weights(out['mask']), self.nbins, imgs.shape[-1])
        return grid_picture(cols + hogs, ['input', 'masked'] + level_labels(len(hogs) // 2))


# ----------------------------------------------------------------------------- Swin, visible tokens
# g: side of the mask-unit grid; u: tokens per unit side at a stage; nv: number of visible units.

def blocked_positions(vis, g, u):
    """Visible units vis (nv,) of a g x g grid, u x u tokens each -> (rows, cols, blocked index),
    each (nv*u*u,), of their tokens in unit-blocked order (units, then their tokens, raster)."""
    within = torch.arange(u * u, device=vis.device)  # a token's index inside its unit
    rows = ((vis // g)[:, None] * u + within[None] // u).flatten()  # (nv*u*u,)
    cols = ((vis % g)[:, None] * u + within[None] % u).flatten()
    blocked = (vis[:, None] * u * u + within[None]).flatten()  # index among all g*g*u*u tokens
    return rows, cols, blocked


def window_groups(coords, window, shift):
    """Group visible tokens by (shifted) window: coords (N, 2) -> index (nW, M) of each window's
    tokens (N = padding), inverse (N,) flat slot of each token, relative-bias index (nW, M, M),
    padding (nW, M) bool. A token at (r, c) is in window ((r + (w - s) % w) // w, (c + ...) // w)
    (`Swin/models_mim.py:GroupingModule._get_group_id`), equal to Swin's cyclic shift + region
    mask; GreenMIM's knapsack packing of windows is only a speed device, we pad each window."""
    N, dev = coords.shape[0], coords.device
    window_rc = (coords + (window - shift) % window) // window  # (N, 2)
    window_id = window_rc[:, 0] * 65536 + window_rc[:, 1]  # (N,)
    order = torch.argsort(window_id, stable=True)  # (N,) tokens grouped by window
    counts = torch.unique_consecutive(window_id[order], return_counts=True)[1]  # (nW,)
    nW, M = counts.numel(), int(counts.max())
    group = torch.repeat_interleave(torch.arange(nW, device=dev), counts)  # (N,) window, sorted
    slot = torch.arange(N, device=dev) - (torch.cumsum(counts, 0) - counts)[group]  # (N,) place
    index = torch.full((nW, M), N, dtype=torch.long, device=dev)
    index[group, slot] = order
    inverse = torch.empty(N, dtype=torch.long, device=dev)
    inverse[order] = group * M + slot
    pad = index == N  # (nW, M)
    win_coords = torch.cat([coords, coords[:1]])[index]  # (nW, M, 2); padding borrows a real one
    rel = win_coords[:, :, None] - win_coords[:, None] + window - 1  # (nW, M, M, 2) query - key
    bias_index = (rel[..., 0] * (2 * window - 1) + rel[..., 1]).masked_fill(
        pad[:, None] | pad[:, :, None], 0)  # (nW, M, M)
    return index, inverse, bias_index, pad


# FLOPs of a step (forward + backward, flop_counter), swin_tiny preset, 224 px, batch 8, the mask of
# key 0: 63.6 G (79.9 G when qkv and proj ran on every padded slot); with the official encoder in
# place of ours 64.4 G, as its knapsack groups pad whole blocks a little (833 rows for 768 tokens
# at stage 0; `Swin/models_mim.py:GroupingModule._prepare_grouping`).
def visible_block(blk, x, index, inverse, bias_index, pad):
    """A common.SwinBlock's weights on visible tokens x (B, N, C) grouped by window -> (B, N, C)."""
    B, N, C = x.shape
    attn, (nW, M) = blk.attn, index.shape
    nH = attn.num_heads
    # qkv and proj, like the norms and the MLP, see the N visible tokens only; just q, k, v are
    # gathered into the padded windows (zeros in the padding, hidden from every query by the mask)
    qkv = attn.qkv(blk.norm1(x))  # (B, N, 3C)
    qkv = torch.cat([qkv, qkv.new_zeros(B, 1, 3 * C)], dim=1)[:, index.flatten()]  # (B, nW*M, 3C)
    qkv = qkv.view(B, nW, M, 3, nH, -1).permute(3, 0, 1, 4, 2, 5)  # 3 x (B, nW, nH, M, d)
    qkv = qkv.reshape(3, B, nW * nH, M, -1)  # 3 x (B, nW*nH, M, d); pads: q = k = v = 0
    bias = attn.relative_position_bias_table[bias_index].permute(0, 3, 1, 2)  # (nW, nH, M, M)
    bias = bias.masked_fill(pad[:, None, None], float('-inf')).to(qkv.dtype)  # pads: no weight
    # windows x heads as one head axis, so the mask broadcasts over the batch and fused kernels run
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2],
                                         attn_mask=bias.reshape(nW * nH, M, M))
    out = out.view(B, nW, nH, M, -1).transpose(2, 3).reshape(B, nW * M, C)  # (B, nW*M, C)
    out = attn.proj(out[:, inverse])  # (B, N, C); the pad rows (finite: q = 0) are left behind
    x = x + drop_path(out, blk.drop_path, blk.training)
    return x + drop_path(blk.mlp(blk.norm2(x)), blk.drop_path, blk.training)


def merge_visible(merge, x, nv, u):
    """A common.PatchMerging on blocked tokens (B, nv*u*u, C) -> (B, nv*(u/2)^2, 2C); units stay
    whole, so every 2x2 neighbourhood is complete."""
    B, _, C = x.shape
    x = x.view(B, nv, u // 2, 2, u // 2, 2, C)  # (B, unit, row, dy, col, dx, C)
    # (B, nv, u/2, u/2, 4C) in the module's merge order (note 8)
    x = torch.cat([x[:, :, :, dy, :, dx] for dy, dx in merge.offsets], dim=-1)
    return merge.reduction(merge.norm(x.reshape(B, -1, 4 * C)))


class LocalMIMSwin(nn.Module):
    """LocalMIM on Swin (`Swin/models_mim.py:MaskedAutoencoderSwin`, same keys): `encoder.` = the
    Microsoft-layout Swin with per-level norms `encoder.norm.{k}`; `decoder.{k}`; `hog_enc.{k}`."""

    def __init__(self, img_size=224, patch_size=4, embed_dim=128, depths=(2, 2, 18, 2),
                 num_heads=(4, 8, 16, 32), window_size=7, mlp_ratio=4.0, decoder_embed_dim=128,
                 decoder_depth=1, decoder_num_heads=4, target='hog', hog_nbins=18, hog_bias=True,
                 norm_pix_loss=True, mask_ratio=0.75, official_quirks=True):
        super().__init__()
        if len(depths) != 4:
            raise ValueError(f'LocalMIM Swin has 4 stages, got depths {tuple(depths)}')
        if target not in ('hog', 'pixel'):
            raise ValueError(f'unknown --target {target}; use hog or pixel')
        check_ratio(mask_ratio, '--mask-ratio')
        check_divisible(img_size, patch_size * 8, 'the Swin output stride',
                        'one mask unit per final token')
        self.units = img_size // (patch_size * 8)  # side of the final grid = of the mask-unit grid
        if int(mask_ratio * self.units ** 2) + 1 >= self.units ** 2:
            raise ValueError(
                f'at res {img_size} the mask has {self.units ** 2} units of {patch_size * 8} px '
                f'and '
                f'mask ratio {mask_ratio} masks int(r*n)+1 = all of them; use a larger --res (>= '
                f'{3 * patch_size * 8}, e.g. --res 128 --window-size 4) or a lower --mask-ratio')
        # official code, not the paper (note 8); off with --no-official-swin-quirks
        self.encoder = SwinTransformer(img_size, patch_size, embed_dim, depths, num_heads,
                                       window_size, mlp_ratio)
        if official_quirks:
            for stage in self.encoder.layers[:-1]:
                stage.downsample.offsets = ((0, 0), (0, 1), (1, 0), (1, 1))  # TL, TR, BL, BR
        self.encoder.norm = nn.ModuleList([nn.LayerNorm(embed_dim * k, eps=1e-6)
                                           for k in (2, 4, 8, 8)])
        for module in self.encoder.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = 1e-6  # official code, not standard Swin (note 10)
        for stage in self.encoder.layers:
            for blk in stage.blocks:
                blk.attn_mask = None  # windows are built from the visible tokens: no attn_mask key
        self.encoder.apply(init_weights)  # official: xavier Linear, patch embed as a Linear
        proj_weight = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(proj_weight.view(proj_weight.shape[0], -1))
        self.patch_size, self.mask_ratio, self.official_quirks = (
            patch_size, mask_ratio, official_quirks)
        self.target_kind, self.nbins, self.norm_pix_loss = target, hog_nbins, norm_pix_loss
        # 8, 16, 32, 32 px at patch 4 (Swin/models_mim.py:MaskedAutoencoderSwin.__init__), else
        # proportional: whole and tiling the image by the output-stride check above
        self.cells = [patch_size * 8 // u for u in SWIN_UNITS]
        out_dims = [3 * hog_nbins if target == 'hog' else 3 * c * c for c in self.cells]
        self.decoder = nn.ModuleList([  # level k: input C*[2, 4, 8, 8][k], width d/[2, 1, 1, 1][k]
            Decoder(embed_dim * mult, decoder_embed_dim // div, decoder_depth, decoder_num_heads,
                    self.units * u, out_dim)
            for mult, div, u, out_dim in zip((2, 4, 8, 8), (2, 1, 1, 1), SWIN_UNITS, out_dims)])
        if target == 'hog':
            self.hog_enc = nn.ModuleList([HOGConv(hog_bias) for _ in SWIN_UNITS])

    def no_weight_decay(self, name, param):
        """Official rule (note 11): 1-D tensors, biases, names holding `position_bias`, `token`."""
        return default_no_decay(name, param) or 'position_bias' in name or 'token' in name

    def unit_mask(self, imgs, mask=None, keys=None):
        """One mask (B, g, g) bool for the whole batch, True = masked (note 7): units ranked by
        noise (the first sample's key), rank <= int(r * g^2) masked, as the official
        `randperm(n) <= int(r n)` in `Swin/models_mim.py:MaskedAutoencoderSwin.forward_encoder`;
        or a given mask, checked. On the host (CPU): the forward builds its windows and indices
        from it there, so no step waits for the device (a given device mask is read once)."""
        B, g = imgs.shape[0], self.units
        if mask is None:
            noise = sample_noise(1, g * g, 'cpu', None if keys is None else keys[:1])
            rank = torch.argsort(torch.argsort(noise, dim=1), dim=1)  # (1, g*g), a permutation
            return (rank <= int(self.mask_ratio * g * g)).view(1, g, g).expand(B, g, g)
        mask = mask.cpu().reshape(B, g, g).bool()
        if (mask != mask[:1]).any():
            raise ValueError('LocalMIM Swin uses one mask for the whole batch (official); give '
                             'identical rows')
        if mask[0].all():
            raise ValueError('the mask hides every unit; the Swin encoder needs at least one '
                             'visible unit')
        return mask

    def attention_coords(self, vis, s):
        """(row, col) (N, 2) of stage s's visible tokens (blocked order) for windows and relative
        bias: the true ones or, with the quirks (note 9), after a merge (stages 1, 2) the new grid's
        raster coordinates indexed by the blocked-order visibility, as
        `Swin/models_mim.py:PatchMerging.forward`."""
        u = SWIN_UNITS[0] * 2 >> s
        rows, cols, blocked = blocked_positions(vis, self.units, u)
        if self.official_quirks and s > 0:  # off with --no-official-swin-quirks
            side = self.units * u
            return torch.stack([blocked // side, blocked % side], 1)  # (N, 2)
        return torch.stack([rows, cols], 1)  # (N, 2)

    def forward_encoder(self, imgs, vis):
        """Swin on the visible units vis (nv,) -> latents [(B, N_k, C_k)] after each stage's merge
        and its norm (note 1), and the raster positions [(N_k,)] of their tokens on level grids."""
        enc, g, u = self.encoder, self.units, SWIN_UNITS[0] * 2  # 8 tokens per unit side at stage 0
        x = enc.patch_embed(imgs)  # (B, G0*G0, C)
        B, _, C = x.shape
        # (B, g*g units, u*u tokens, C)
        x = x.view(B, g, u, g, u, C).permute(0, 1, 3, 2, 4, 5).reshape(B, g * g, u * u, C)
        # vis, coords and window groups are host tensors (forward): index tensors go to the
        # device as copies that do not wait for it
        x = x[:, vis.to(x.device, non_blocking=True)].flatten(1, 2)  # (B, nv*u*u, C): blocked
        latents, positions = [], []
        for s, stage in enumerate(enc.layers):
            coords = self.attention_coords(vis, s)
            groups = {}  # window_groups per (window, shift), shared by the stage's blocks
            for blk in stage.blocks:
                window_shift = (blk.attn.window, blk.shift)
                if window_shift not in groups:
                    groups[window_shift] = [t.to(x.device, non_blocking=True)
                                            for t in window_groups(coords, *window_shift)]
                x = visible_block(blk, x, *groups[window_shift])
            if stage.downsample is not None:
                x, u = merge_visible(stage.downsample, x, len(vis), u), u // 2
            rows, cols, _ = blocked_positions(vis, g, u)
            latents.append(enc.norm[s](x))
            positions.append(rows * g * u + cols)
        return latents, positions

    def encoder_features(self, imgs):
        """Every unit visible -> (None, mean of the last level's normed tokens (B, 8C)): Swin has
        no cls token; the last per-level norm is the one finetune.py takes (common.load_encoder)."""
        latents, _ = self.forward_encoder(imgs, torch.arange(self.units ** 2))
        return None, latents[-1].mean(1)  # (B, 8C)

    def targets(self, imgs):
        """Per-level targets [(B, L_k, C_k)]: HOG cells 8/16/32/32 px, or the same regions' pixels,
        with --norm-pix-loss standardised (unbiased variance as
        `Swin/models_mim.py:MaskedAutoencoderSwin.norm_pixel`)."""
        if self.target_kind == 'hog':
            return hog_levels(imgs, self.nbins, self.cells, self.hog_enc)
        t = [patchify(imgs.float(), c) for c in self.cells]
        return [norm_pix(x) for x in t] if self.norm_pix_loss else t

    def level_weights(self, mask):
        """The unit mask (B, g, g) nearest-upsampled to each level grid -> [(B, L_k)] (binary)."""
        return [upsample_mask(mask.float(), u).flatten(1) for u in SWIN_UNITS]

    def forward(self, imgs, mask=None, keys=None):
        """imgs (B, 3, H, W) -> dict(loss, loss_per_level, pred, target [(B, L_k, C_k)],
        mask (B, g, g) bool)."""
        mask = self.unit_mask(imgs, mask, keys)  # on the host, as vis and every index below
        vis = (~mask[0]).flatten().nonzero().squeeze(1)  # (nv,) visible units, raster order
        latents, positions = self.forward_encoder(imgs, vis)
        pred = [dec(z, p) for dec, z, p in zip(self.decoder, latents, positions)]
        mask = mask.to(imgs.device, non_blocking=True)
        target = self.targets(imgs)
        losses = [level_loss(p, t, w) for p, t, w in zip(pred, target, self.level_weights(mask))]
        return dict(loss=sum(losses), loss_per_level=losses, pred=pred, target=target, mask=mask)

    def noise_len(self):
        """Mask noise values per sample (one per mask unit; the batch's mask uses the first)."""
        return self.units ** 2

    def describe(self):
        """One line for the log: mask units, visible units, target, quirks."""
        n, unit = self.units ** 2, self.patch_size * 8
        visible = n - int(self.mask_ratio * n) - 1
        return (f'localmim: {n} mask units of {unit} px, {visible} visible '
                f'(one mask per batch); target {self.target_kind} at {self.cells} px; official '
                f'quirks {"on" if self.official_quirks else "off"}')

    def picture(self, imgs, out):
        """input | masked | per level: target and prediction (HOG glyphs, or masked-unit pixels)."""
        unit = imgs.shape[-1] // self.units
        masked_units = out['mask'].flatten(1)  # (B, g*g)
        cols = pixel_columns(imgs, torch.zeros_like(patchify(imgs, unit)), masked_units, unit,
                             False)[:2]
        weights = self.level_weights(out['mask'])
        if self.target_kind == 'hog':
            hogs = hog_columns(out, weights, self.nbins, imgs.shape[-1])
            return grid_picture(cols + hogs, ['input', 'masked'] + level_labels(len(hogs) // 2))
        names = ['input', 'masked']
        for k, (p, c, w) in enumerate(zip(out['pred'], self.cells, weights)):
            cols += pixel_columns(imgs, p, w > 0, c, self.norm_pix_loss)[2:]
            names += [f'{k}: {n}' for n in pixel_labels(self.norm_pix_loss)[2:]]
        return grid_picture(cols, names)


def from_official(obj):
    """Official pre-training checkpoint (ViT: top level; Swin: `encoder.`, `decoder.`, `hog_enc.`)
    -> our state dict: the keys are the official ones, so only pick it and strip DDP/compile."""
    return strip_prefix(pick_state_dict(obj))


# ----------------------------------------------------------------------------- command line

# The runner's names: for the command line below, and for from_official and the Swin
# no_weight_decay above (checkpoints, the loop's default rule).
from common import (default_no_decay, encoder_config, launch, parse_pretrain,  # noqa: E402
                    pick_state_dict, pretrain_parser, strip_prefix)

# Per --model: the official README commands and factories (OFFICIAL_NAMES; bins, blr: note 6).
# vit_tiny and swin_tiny are ours, for CPUs; vit_small and swin_base_win14 have no README command.
# recipe_batch: the effective batch, batch x accum x 8 GPUs (Haoqing-Wang/LocalMIM ViT/README.md,
# Swin/README.md); swin_base_win14 as swin_base.
DEFAULTS = {
    'vit_tiny': dict(decoder_dim=128, decoder_depth=1, decoder_heads=4, hog_nbins=9,
                     hog_bias=False, batch_size=256, epochs=100, warmup_epochs=10, blr=2e-4,
                     min_lr=1e-6, save_freq=50),
    'vit_small': dict(decoder_dim=256, decoder_depth=1, decoder_heads=8, hog_nbins=9,
                      hog_bias=False, batch_size=256, epochs=1600, warmup_epochs=40, blr=2e-4,
                      min_lr=1e-6, save_freq=50),
    'vit_base': dict(decoder_dim=256, decoder_depth=1, decoder_heads=8, hog_nbins=9,
                     hog_bias=False, batch_size=256, epochs=1600, warmup_epochs=40, blr=2e-4,
                     min_lr=1e-6, save_freq=50, recipe_batch=2048),
    'vit_large': dict(decoder_dim=256, decoder_depth=1, decoder_heads=8, hog_nbins=18,
                      hog_bias=True, batch_size=128, accum_iter=4, epochs=800, warmup_epochs=40,
                      blr=1.5e-4, min_lr=1e-6, save_freq=50, recipe_batch=4096),
    'swin_tiny': dict(decoder_dim=128, decoder_depth=1, decoder_heads=4, hog_nbins=18,
                      hog_bias=True, window_size=7, batch_size=256, epochs=100, warmup_epochs=10,
                      blr=1e-4, min_lr=0.0, save_freq=20),
    'swin_base': dict(decoder_dim=128, decoder_depth=1, decoder_heads=4, hog_nbins=18,
                      hog_bias=True, window_size=7, batch_size=256, epochs=400, warmup_epochs=40,
                      blr=1e-4, min_lr=0.0, save_freq=20, recipe_batch=2048),
    'swin_base_win14': dict(decoder_dim=128, decoder_depth=1, decoder_heads=4, hog_nbins=18,
                            hog_bias=True, window_size=14, batch_size=256, epochs=400,
                            warmup_epochs=40, blr=1e-4, min_lr=0.0, save_freq=20,
                            recipe_batch=2048),
    'swin_large': dict(decoder_dim=128, decoder_depth=1, decoder_heads=4, hog_nbins=18,
                       hog_bias=True, window_size=14, batch_size=128, accum_iter=4, epochs=800,
                       warmup_epochs=40, blr=1e-4, min_lr=0.0, save_freq=20, recipe_batch=4096),
}
# The smoke preset (ours, no --data-path): LocalMIM's recipe (HOG of 4/8/16/32-px regions at
# patch 16, here patch/4 .. 2 x patch, at four depths) scaled to about 5 minutes on 2 CPU cores: a
# ViT of 8 blocks (supervised at 2, 4, 6, 8; 7 is the fewest that keeps four apart), width 96,
# 8-px patches at 64 px, 64-wide decoders, 24 epochs of the built-in images, blr 8e-3 (about 50x)
SMOKE = dict(model='vit_tiny', patch_size=8, embed_dim=96, depth=8, num_heads=3, res=64,
             batch_size=64, epochs=24, warmup_epochs=1, blr=8e-3, decoder_dim=64, decoder_heads=4,
             log_freq=8, save_freq=8, num_workers=2, eval_knn=8)
OFFICIAL_NAMES = {'MIM_vit_small_patch16': 'vit_small', 'MIM_vit_base_patch16': 'vit_base',
                  'MIM_vit_large_patch16': 'vit_large', 'mim_swin_base_patch4_win7': 'swin_base',
                  'mim_swin_base_patch4_win14': 'swin_base_win14',
                  'mim_swin_large_patch4_win14': 'swin_large'}


def get_args(argv=None):
    """Parse the command line and fill the per-model defaults."""
    p = pretrain_parser('localmim', __doc__, decoder=('dim', 'depth', 'heads'), norm_pix=True,
                        norm_pix_help='pixel target: standardise each region (on, as the README '
                        'Swin pixel command)')
    a = p.add_argument
    a('--target', type=lambda s: {'hog': 'hog', 'HOG': 'hog', 'pixel': 'pixel',
                                  'Pixel': 'pixel'}[s],
      help='hog (default, official --target HOG) or pixel (Swin only, official --target Pixel)')
    a('--hog-nbins', '--hog_nbins', dest='hog_nbins', type=int,
      help='HOG orientation bins; default 9 (ViT-B README) / 18 (ViT-L, Swin; the supplement: 18)')
    a('--hog-bias', '--hog_bias', dest='hog_bias', action=argparse.BooleanOptionalAction,
      help='the frozen random bias of the official HOG convs (saved; note 3); default off (ViT-B) '
      '/ on (ViT-L, Swin)')
    a('--window-size', '--window_size', dest='window_size', type=int,
      help='Swin window; default 7 (B) / 14 (L)')
    a('--official-swin-quirks', dest='official_quirks', action=argparse.BooleanOptionalAction,
      default=True, help='Swin: keep the official pre-training merge order and coordinate mix-up '
      '(default, the released weights need them); --no-official-swin-quirks = clean Swin '
      '(notes 8, 9)')
    args = parse_pretrain(p, argv, DEFAULTS, SMOKE, OFFICIAL_NAMES, res=224, mask_ratio=0.75,
                          target='hog')
    if args.model.startswith('vit') and args.target != 'hog':
        p.error('the LocalMIM ViT regresses HOG only (official code); use a Swin --model for '
                '--target pixel')
    return args


def build_model(args):
    """The LocalMIM model of the resolved arguments (HOG biases drawn here, alike on every rank)."""
    dec = dict(decoder_embed_dim=args.decoder_dim, decoder_depth=args.decoder_depth,
               decoder_num_heads=args.decoder_heads, hog_nbins=args.hog_nbins,
               hog_bias=args.hog_bias, mask_ratio=args.mask_ratio)
    if args.model.startswith('vit'):
        return LocalMIMViT(args.res, **encoder_config(args), **dec)
    return LocalMIMSwin(args.res, window_size=args.window_size, target=args.target,
                        norm_pix_loss=args.norm_pix_loss, official_quirks=args.official_quirks,
                        **encoder_config(args), **dec)


def main(argv=None):
    """Pre-train LocalMIM (the module docstring); a user error prints `error: …` and exits 2."""
    return launch(argv, get_args, build_model, from_official=from_official)


if __name__ == '__main__':
    main()
