"""FastMIM: Expediting Masked Image Modeling Pre-training for Vision (Guo et al., arXiv 2212.06593).
https://arxiv.org/abs/2212.06593 · official code: github.com/ggjy/FastMIM.pytorch, cited below as
`path:function` at commit d4eea0d.
Sec./Tab./App. numbers are those of the revised paper, "Empirical Study on Enhancing Efficiency in
Masked Image Modeling Pre-training" (openreview.net/forum?id=jMZjIi9JcC). It numbers no equations,
so the formulas it writes out are quoted where they are implemented.

SimMIM-style masked image modeling made cheap twice over (Sec. 4.1): pre-train at 128x128 instead
of 224x224, and regress HOG features instead of pixels. Square blocks of the normalised image are
painted, in pixel space, with one learnable RGB colour (`mask_token`, 1x3x1x1) before the unchanged
backbone sees every token (App. A.1); a small decoder without positional embedding (Sec. 4)
predicts, per output token, the 9-bin HOG histograms of the 3 colour channels of each 8x8 cell it
covers; the loss is the MSE over masked tokens only. The mask block (16 px ViT, 32 px Swin) is
independent of the patch size (Tab. 10b). FastMIM-P grows the resolution during pre-training
(Sec. 4.2, `--res-schedule`).

Defaults (the official README commands, which produced the released weights): 128 px, mask ratio
0.75, HOG with per-cell L2 norm (`--norm-pix-loss`); ViT-B: 6 encoder heads, decoder 1 block x 256,
800 epochs, warm-up 20, batch 4096; Swin-B: window 4, decoder 4 blocks x 256, 400 epochs, warm-up
10, batch 2048; blr 1.5e-4, lr = blr x batch / 256 (App. A.3.2); AdamW (0.9, 0.95), wd 0.05
(Tab. 11).

    python fastmim.py                                          # CPU smoke run on the built-in data
    python fastmim.py --data-path /data/imagenet               # one GPU
    torchrun --nproc_per_node 8 fastmim.py --res 128 --data-path /data/imagenet --model vit_base
    torchrun --nproc_per_node 8 fastmim.py --model swin_large --res-schedule 128:200,160:100,192:100

Where this follows the official code rather than the paper (or where the paper is silent); the
comments below cite these as "note N":
1. ViT-B has 6 encoder heads (mim_vit_pretrain.py:mim_vit_base); the "standard ViT" of App. A.3.2
   has 12. `--num-heads 12` gives the standard model.
2. The decoder has width // 32 heads whatever `decoder_num_heads` says (8 at 256-d; it is
   overwritten in mim_vit_pretrain.py:MaskedAutoencoderViT.__init__ and
   mim_swin_pretrain.py:PretrainSwin.__init__). Paper silent.
3. Swin: mim_swin_pretrain.py:PretrainSwin._init_weights re-initialises every Linear, encoder and
   decoder, xavier-uniform with zero bias, over the Swin init the paper follows (App. A.3.2).
   `--swin-linear-init trunc_normal` keeps the Swin init.
4. A mask block smaller than a token makes the loss per 8x8 HOG cell instead of per token
   (mim_vit_pretrain.py:MaskedAutoencoderViT.forward_hog_loss, same in PretrainSwin). Paper
   silent (Tab. 10b trains such blocks).
5. HOG histograms are L2-normalised per cell and colour only with `--norm_pix_loss`, which the
   README commands pass (util/hog_layer.py:HOGLayerC.forward). Paper silent.
   `--no-norm-pix-loss` regresses the raw sums.
6. Weight decay on every tensor but 1-D ones and biases, so `mask_token`, `cls_token` and the Swin
   relative-position tables are decayed: main_pretrain.py:main calls timm 0.3.2's
   optim_factory.add_weight_decay without a skip list. Paper silent (wd 0.05, Tab. 11).
7. ViT-B warm-up 20 epochs and batch 512 x 8 GPUs = 4096 (README); Tab. 11 says 10 and 2048.
   `--warmup-epochs 10 --batch-size 256` on 8 processes gives the paper's.
8. FastMIM-P does not run in the official code: `--mim_pt_size` (main_pretrain.py:main) changes
   the crop and the batch, not the model. Ours: ViT recomputes its sin-cos table, Swin scales its
   window with the resolution (window at 128 x R / 128) and resizes its relative-position tables;
   the paper (App. A.3.2) starts Swin-L at window 14 and interpolates the tables.
"""
import math

import torch
import torch.nn as nn
from einops import rearrange

from common import (Block, SwinTransformer, VisionTransformer, check_ratio, denormalize,
                    grid_picture, hog, hog_glyphs, init_weights, masked_mean, norm_pix, patchify,
                    sample_noise, unpatchify, upsample_mask)

HOG_CELL, HOG_BINS = 8, 9  # FastMIM Sec. 4.1 "Prediction Target": 9 bins, 8x8 cells, after MaskFeat


# ----------------------------------------------------------------------------- the method
# The parts as plain functions (the block mask, the painted input, the HOG / pixel target, the
# loss), then one model over either encoder, ViT or Swin, that calls them in forward.

def block_mask(noise, m0, mask_ratio):
    """FastMIM/SimMIM block mask: noise (B, m0*m0) -> (B, m0, m0) bool, int(m0^2 (1-r)) visible."""
    len_keep = int(m0 * m0 * (1 - mask_ratio))
    rank = torch.argsort(torch.argsort(noise, dim=1), dim=1)  # (B, m0*m0): each block's rank
    return (rank >= len_keep).view(-1, m0, m0)


def per_token(feat, u):
    """A cell map per token: (B, C, G*u, G*u) -> (B, G*G, C*u*u), feature c*u*u + dy*u + dx."""
    return rearrange(feat, 'b c (gh dy) (gw dx) -> b (gh gw) (c dy dx)', dy=u, dx=u)


def check_sizes(stride, res, mask_size, mask_ratio, target):
    """Raise a ValueError that says what to change when the sizes do not fit together."""
    if mask_size % HOG_CELL or res % mask_size:
        raise ValueError(f'--mask-size {mask_size} must be a multiple of the {HOG_CELL}-px HOG '
                         f'cell and divide res {res}; use e.g. --mask-size {stride}')
    if target == 'hog' and stride % HOG_CELL:  # a token holds whole cells (per_token)
        raise ValueError(f'the HOG target needs a patch that is a multiple of the {HOG_CELL}-px '
                         f'cell, got {stride}; use --patch-size {HOG_CELL} or 16, or --target '
                         f'pixel')
    if max(mask_size, stride) % min(mask_size, stride):  # blocks hold whole tokens or vice versa
        raise ValueError(f'--mask-size {mask_size} and the {stride}-px token must nest (one a '
                         f'multiple of the other); use --mask-size {math.lcm(stride, HOG_CELL)}')
    check_ratio(mask_ratio, '--mask-ratio')


def out_dim(stride, target):
    """Head width: 27 HOG numbers per 8x8 cell of a token, or stride*stride*3 pixels."""
    return (stride // HOG_CELL) ** 2 * 3 * HOG_BINS if target == 'hog' else stride * stride * 3


def make_mask(imgs, mask_size, mask_ratio, keys=None):
    """Per-sample block mask (Sec. 4.1 "Masked Input") (B, m0, m0) bool, True = masked.

    m0 = H / mask size; the int(m0^2 (1 - r)) blocks with the smallest noise stay visible
    (mim_vit_pretrain.py:MaskedAutoencoderViT.mim_per_sample_block_masking).
    """
    m0 = imgs.shape[-1] // mask_size
    noise = sample_noise(imgs.shape[0], m0 * m0, imgs.device, keys)  # (B, m0*m0)
    return block_mask(noise, m0, mask_ratio)


def paint(imgs, mask, mask_token):
    """Overwrite the masked blocks of the normalised image with the learnable colour."""
    block_px = imgs.shape[-1] // mask.shape[-1]
    pixel_mask = upsample_mask(mask, block_px)[:, None].to(imgs.dtype)  # (B, 1, H, W)
    # FastMIM App. A.1: X_hat = X * S + [M] * (1 - S), S = 1 - pixel_mask (S = 1: visible)
    return imgs * (1 - pixel_mask) + mask_token.to(imgs.dtype) * pixel_mask


def make_target(imgs, stride, target, norm_pix_loss):
    """Per-token target (B, L, P) from the whole unmasked image (Sec. 4.1 "Prediction Target").

    HOG: 8x8-px cells, Hc = H / 8 a side, cut per token as in
    mim_vit_pretrain.py:MaskedAutoencoderViT.forward_hog_loss: token (i, j) holds cell
    (i*u + dy, j*u + dx) at feature c*u*u + dy*u + dx, u = stride / 8.
    Pixels (`--target pixel`, Tab. 1b): each patch standardised, as MAE's norm-pix.
    """
    if target == 'hog':
        # per-cell L2 norm only with --norm-pix-loss: official code, not the paper (note 5)
        hog_map = hog(imgs, HOG_BINS, HOG_CELL, 'sum', normalize=norm_pix_loss)  # (B, 27, Hc, Hc)
        return per_token(hog_map, stride // HOG_CELL)  # (B, L, 27*u*u)
    patches = patchify(imgs.float(), stride)  # (B, L, s*s*3)
    return norm_pix(patches) if norm_pix_loss else patches


def masked_loss(pred, target, mask, stride, mask_size):
    """MSE over the masked tokens (Sec. 4.1: l2 distance on the masked region); pred, target
    (B, L, P), mask (B, m0, m0)."""
    G = math.isqrt(target.shape[1])  # tokens along one side
    if mask_size >= stride:
        tok_mask = upsample_mask(mask, mask_size // stride).flatten(1)  # (B, L)
        return masked_mean(((pred.float() - target) ** 2).mean(-1), tok_mask)
    # official code, not the paper: a block smaller than a token -> loss per cell (note 4)
    cells = stride // HOG_CELL  # HOG cells along one side of a token
    to_cells = 'b (gh gw) (c dy dx) -> b (gh dy gw dx) c'
    pred_cells = rearrange(pred.float(), to_cells, gh=G, dy=cells, dx=cells)  # (B, Hc*Hc, 27)
    target_cells = rearrange(target, to_cells, gh=G, dy=cells, dx=cells)  # (B, Hc*Hc, 27)
    cell_mask = upsample_mask(mask, mask_size // HOG_CELL).flatten(1)  # (B, Hc*Hc)
    return masked_mean(((pred_cells - target_cells) ** 2).mean(-1), cell_mask)


def res_at(schedule, epoch):
    """FastMIM-P (Sec. 4.2): the resolution of the schedule stage that holds `epoch`."""
    end = 0
    for res, epochs in schedule:
        end += epochs
        if epoch < end:
            return res
    return schedule[-1][0]


def swin_window(window_at_128, res):
    """FastMIM-P window rule (ours, note 8): window_at_128 * res / 128, which must be whole."""
    window = window_at_128 * res / 128
    if abs(window - round(window)) > 1e-9:
        step = 128 / window_at_128
        raise ValueError(f'res {res} gives Swin window {window:g}; FastMIM-P needs a resolution '
                         f'that is a multiple of {step:g} (e.g. {int(round(res / step) * step)})')
    return int(round(window))


# ----------------------------------------------------------------------------- the model

class FastMIM(nn.Module):
    """FastMIM on `encoder`, a common.VisionTransformer or common.SwinTransformer.

    Official checkpoint keys: a ViT's at the top level (timm ViT, `mask_token`, `decoder_*`), a
    Swin under `encoder.` (+ top-level `mask_token`, `decoder_*`). No `no_weight_decay` method:
    the loop's default rule decays `mask_token` and `cls_token` (official code, not the paper:
    note 6).
    """

    def __init__(self, encoder, mask_size=None, mask_ratio=0.75, decoder_dim=256,
                 decoder_depth=1, target='hog', norm_pix_loss=True, linear_init='xavier',
                 res_schedule=None):
        super().__init__()
        self.swin = isinstance(encoder, SwinTransformer)
        if self.swin:
            self.encoder = encoder  # keys `encoder.*`
            # mim_swin_pretrain.py:mim_swin_base's patch_size=32 is this output stride
            stride = encoder.patch_size * 2 ** (len(encoder.depths) - 1)
            res, width, eps = encoder.img_size, encoder.num_features, 1e-5
        else:
            # the official ViT keys have no prefix: the encoder's tensors and blocks are
            # registered as this model's own, in the encoder's order; `self.encoder` is the
            # same object, kept out of the registry so that nothing is registered twice
            object.__setattr__(self, 'encoder', encoder)
            for name, param in encoder.named_parameters(recurse=False):  # cls_token, pos_embed
                self.register_parameter(name, param)
            stride = encoder.patch_size
            res, width, eps = encoder.grid * stride, encoder.embed_dim, 1e-6
        mask_size = stride if mask_size is None else mask_size  # 16 (ViT-B/16) / 32 (Swin)
        check_sizes(stride, res, mask_size, mask_ratio, target)
        self.stride, self.res, self.mask_size = stride, res, mask_size
        self.mask_ratio, self.target_kind, self.norm_pix_loss = mask_ratio, target, norm_pix_loss
        self.res_schedule = res_schedule
        # [M], one learnable RGB colour (FastMIM Sec. 4); N(0, 0.02^2) as the official code
        self.mask_token = nn.Parameter(torch.zeros(1, 3, 1, 1))
        nn.init.normal_(self.mask_token, std=0.02)
        if not self.swin:
            for name, module in encoder.named_children():  # patch_embed, blocks, norm
                self.add_module(name, module)
        # the decoder (Sec. 4.1 "Decoder"): Linear -> blocks -> LayerNorm -> Linear, per token;
        # no positional embedding (Sec. 4) and no mask tokens: the mask is painted into the input
        if decoder_depth and decoder_dim % 32:
            raise ValueError(f'--decoder-dim {decoder_dim}: the decoder has dim // 32 heads '
                             f'(note 2); use a multiple of 32')
        if decoder_depth == 0 and width != decoder_dim:
            raise ValueError(f'--decoder-depth 0 needs --decoder-dim equal to the encoder width '
                             f'{width}')
        # depth 0 keeps only the norm (mim_vit_pretrain.py:MaskedAutoencoderViT.forward_decoder)
        self.decoder_embed = nn.Linear(width, decoder_dim) if decoder_depth else nn.Identity()
        # official code, not the paper: dim // 32 heads (note 2)
        self.decoder_blocks = nn.ModuleList([Block(decoder_dim, decoder_dim // 32, 4.0, eps=eps)
                                             for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=eps)
        self.decoder_pred = nn.Linear(decoder_dim, out_dim(stride, target))
        if not self.swin:
            for part in (self.decoder_embed, self.decoder_blocks, self.decoder_norm,
                         self.decoder_pred):
                part.apply(init_weights)
        elif linear_init == 'xavier':
            # official code, not the paper: every Linear xavier, bias 0 (note 3)
            self.apply(init_weights)
        if self.swin:
            self.window_at_128 = encoder.window_size * 128 / res  # FastMIM-P, note 8

    def _apply(self, fn, *args, **kwargs):
        """model.to() and kin: a conversion that makes new tensors (to 'meta', say) gives them to
        this model; a ViT encoder is handed the same ones, so that both keep holding one set."""
        super()._apply(fn, *args, **kwargs)
        if not self.swin:
            for name in self.encoder._parameters:  # cls_token, pos_embed
                self.encoder._parameters[name] = self._parameters[name]
        return self

    def forward_decoder(self, x):
        """Encoder tokens (B, N, D) -> per-token predictions (B, N, P)."""
        x = self.decoder_embed(x)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))

    def encoder_features(self, imgs):
        """The unpainted image's k-NN features: ViT (cls, patch average), Swin (None, the mean of
        the normed last stage), each (B, D) (the hook of common.train's k-NN monitor)."""
        if self.swin:
            return None, self.encoder.forward_features(imgs).mean(1)  # (B, C)
        return self.encoder.encoder_features(imgs)

    def forward(self, imgs, mask=None, keys=None):
        """imgs (B, 3, H, W) -> dict(loss, pred, target (B, L, P), mask (B, m0, m0) bool)."""
        if mask is None:
            mask = make_mask(imgs, self.mask_size, self.mask_ratio, keys)
        mask = mask.to(imgs.device)
        # every token of the painted image: ViT (B, 1+L, D), Swin's last stage (B, L, C)
        x = self.encoder.forward_features(paint(imgs, mask, self.mask_token))
        pred = self.forward_decoder(x)
        if not self.swin:
            # the cls token is kept (App. A.3.2), passes the decoder and is dropped after the head
            # (mim_vit_pretrain.py:MaskedAutoencoderViT.forward_decoder)
            pred = pred[:, 1:]  # (B, L, P)
        target = make_target(imgs, self.stride, self.target_kind, self.norm_pix_loss)
        loss = masked_loss(pred, target, mask, self.stride, self.mask_size)
        return dict(loss=loss, pred=pred, target=target, mask=mask)

    def noise_len(self):
        """Mask noise values per sample (one per mask block at the current resolution)."""
        return (self.res // self.mask_size) ** 2

    def on_epoch(self, epoch):
        """FastMIM-P (Sec. 4.2, note 8): this epoch's resolution; ViT: the fixed sin-cos table
        recomputed (exact); Swin: its window, tables resized, indices and masks rebuilt. Returns
        the new resolution, or None."""
        res = res_at(self.res_schedule, epoch) if self.res_schedule else self.res
        if res == self.res:
            return None
        if self.swin:
            self.encoder.set_resolution(res, swin_window(self.window_at_128, res))
        else:
            self.encoder.set_resolution(res)
        self.res = res
        return res

    def picture(self, imgs, out):
        """input | masked input | target | prediction (HOG as orientation glyphs, pixels as RGB)."""
        masked = denormalize(paint(imgs, out['mask'], self.mask_token))
        H, W = imgs.shape[-2:]
        stride, mask_size = self.stride, self.mask_size
        # show predictions where the loss is taken, the target elsewhere
        if mask_size >= stride:
            use_pred = upsample_mask(out['mask'], mask_size // stride).flatten(1)[..., None].float()
        else:
            use_pred = torch.ones_like(out['target'][..., :1])  # (B, L, 1)
        shown = out['target'] * (1 - use_pred) + out['pred'].float() * use_pred
        if self.target_kind == 'hog':
            cells, G = stride // HOG_CELL, H // stride
            to_map = 'b (gh gw) (c dy dx) -> b c (gh dy) (gw dx)'
            maps = [rearrange(t, to_map, gh=G, dy=cells, dx=cells)  # (B, 27, Hc, Hc)
                    for t in (out['target'], shown)]
            columns = [hog_glyphs(cell_map.clamp(min=0), HOG_BINS) for cell_map in maps]
        else:
            columns = [denormalize(unpatchify(t, stride, H, W))  # (B, 3, H, W)
                       for t in (patchify(imgs, stride), shown)]
        return grid_picture([denormalize(imgs), masked] + columns,
                            ['input', 'masked', 'target', 'prediction'])


def from_official(obj):
    """Official FastMIM pre-training checkpoint -> our state dict.

    Our keys are the official ones (ViT: no prefix; Swin: `encoder.` + top-level `mask_token`,
    `decoder_*`), so this only picks the state dict and strips DDP/compile prefixes.
    """
    return strip_prefix(pick_state_dict(obj))


# ----------------------------------------------------------------------------- FastMIM-P schedule

def parse_schedule(text):
    """'128:200,160:100' -> [(128, 200), (160, 100)] (resolution, epochs)."""
    try:
        schedule = [(int(r), int(e)) for r, e in (part.split(':') for part in text.split(','))]
    except ValueError:
        raise ValueError(f'--res-schedule {text!r} is not of the form RES:EPOCHS,RES:EPOCHS '
                         f'(e.g. 128:200,160:100,192:100)') from None
    bad = [f'{r}:{e}' for r, e in schedule if r < 1 or e < 1]
    if bad:
        raise ValueError(f'--res-schedule {text!r} has a stage {bad[0]} out of range; use a '
                         f'positive resolution and 1 or more epochs per stage')
    return schedule


# ----------------------------------------------------------------------------- command line

# The runner's names: for the command line below, and for from_official above (checkpoints).
from common import (encoder_config, launch, parse_pretrain, pick_state_dict,  # noqa: E402
                    pretrain_parser, strip_prefix)

# Per-model defaults. vit_base, swin_base: the official README commands. vit_large, swin_large: the
# paper (decoders Sec. 4.1, Swin-L window App. A.3.2, epochs Tab. 3), the rest as their base
# models; there is no official command for them. vit_tiny, vit_small, swin_tiny: ours, for CPUs.
# recipe_batch: the effective batch, 512 (ViT) / 256 (Swin) x 8 GPUs (ggjy/FastMIM.pytorch README).
DEFAULTS = {
    'vit_tiny': dict(mask_size=16, decoder_dim=128, decoder_depth=1, num_heads=3, batch_size=256,
                     epochs=100, warmup_epochs=5),
    'vit_small': dict(mask_size=16, decoder_dim=256, decoder_depth=1, num_heads=6, batch_size=512,
                      epochs=800, warmup_epochs=20),
    # official code, not the paper: 6 heads (note 1); warm-up 20, 512 a process x 8 (note 7)
    'vit_base': dict(mask_size=16, decoder_dim=256, decoder_depth=1, num_heads=6, batch_size=512,
                     epochs=800, warmup_epochs=20, recipe_batch=4096),
    'vit_large': dict(mask_size=16, decoder_dim=512, decoder_depth=8, num_heads=16, batch_size=512,
                      epochs=800, warmup_epochs=20, recipe_batch=4096),
    'swin_tiny': dict(mask_size=32, decoder_dim=128, decoder_depth=1, window_size=4,
                      batch_size=256, epochs=100, warmup_epochs=5),
    'swin_base': dict(mask_size=32, decoder_dim=256, decoder_depth=4, window_size=4,
                      batch_size=256, epochs=400, warmup_epochs=10, recipe_batch=2048),
    'swin_large': dict(mask_size=32, decoder_dim=512, decoder_depth=4, window_size=8,
                       batch_size=256, epochs=400, warmup_epochs=10, recipe_batch=2048),
}
# The smoke preset (ours, no --data-path): FastMIM's recipe (HOG target, 16-px mask blocks, ratio
# 0.75, 64 px for its 128) scaled to about 5 minutes on 2 CPU cores: a ViT of 4 blocks, width 96
# and 8-px patches (64 tokens), a 128-wide decoder, 24 epochs of the 2,048 built-in images and
# blr 1.6e-2, about 100x the recipe's, so a short run moves the k-NN monitor (README, "Does it learn?")
SMOKE = dict(model='vit_tiny', patch_size=8, embed_dim=96, depth=4, num_heads=3, res=64,
             batch_size=64, epochs=24, warmup_epochs=1, blr=1.6e-2, decoder_dim=128, log_freq=8,
             save_freq=8, num_workers=2, eval_knn=8)
# the official factory names (models_mae.py); mim_vit_large is ours, as there is no official one
OFFICIAL_NAMES = {'mim_vit_base': 'vit_base', 'mim_vit_large': 'vit_large',
                  'mim_swin_base': 'swin_base', 'mim_swin_large': 'swin_large'}


def get_args(argv=None):
    """Parse the command line and fill the per-model defaults."""
    p = pretrain_parser('fastmim', __doc__, decoder=('dim', 'depth'), norm_pix=True,
                        norm_pix_help='HOG: L2-normalise each cell histogram; pixels: standardise '
                        'each patch (on by default, as the README commands; note 5)',
                        heads_note='default 6 for vit_base (note 1), 12 = standard ViT-B, else '
                        'the --model preset')
    a = p.add_argument
    a('--mask-size', '--block_size', '--mask_size', dest='mask_size', type=int,
      help='mask block in px, a multiple of 8; default 16 (ViT) / 32 (Swin) (README, Tab. 10b)')
    a('--target', '--mim_loss', dest='target', default='hog', choices=('hog', 'pixel'),
      type=lambda s: {'hog': 'hog', 'pixel': 'pixel', 'l2': 'pixel'}.get(s.lower(), s),
      help='hog (default, README --mim_loss HOG) or pixel (--mim_loss l2)')
    a('--window-size', '--window_size', dest='window_size', type=int,
      help='Swin window at the start resolution; default 4 (Swin-B) / 8 (Swin-L) at 128 (README)')
    a('--res-schedule', dest='res_schedule',
      help='FastMIM-P: RES:EPOCHS,… e.g. 128:200,160:100,192:100')
    a('--swin-linear-init', dest='swin_linear_init', choices=('xavier', 'trunc_normal'),
      default='xavier', help='xavier: every Linear re-initialised as the official code (default, '
      'note 3); trunc_normal: Swin\'s own init')
    # FastMIM Sec. 4.1: pre-train at 128
    args = parse_pretrain(p, argv, DEFAULTS, SMOKE, OFFICIAL_NAMES, res=128, mask_ratio=0.75,
                          blr=1.5e-4)
    if args.res_schedule:
        args.schedule = parse_schedule(args.res_schedule)
        covered = sum(e for _, e in args.schedule)
        if covered != args.epochs:
            p.error(f'--res-schedule covers {covered} epochs but --epochs is {args.epochs}; '
                    f'make them agree')
        args.res = args.schedule[0][0]
        args.sources['res'] = '--res-schedule'
    return args


def build_model(args):
    """The FastMIM model of the resolved arguments; every FastMIM-P stage is checked now."""
    schedule = getattr(args, 'schedule', None)
    shared = dict(mask_size=args.mask_size, mask_ratio=args.mask_ratio,
                  decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth,
                  target=args.target, norm_pix_loss=args.norm_pix_loss, res_schedule=schedule)
    if args.model.startswith('vit'):
        encoder = VisionTransformer(args.res, **encoder_config(args))
    else:
        encoder = SwinTransformer(args.res, window_size=args.window_size, **encoder_config(args))
    model = FastMIM(encoder, linear_init=args.swin_linear_init, **shared)
    for res, _ in schedule or []:  # not hours into the run
        if res % model.mask_size or res % model.stride:
            raise ValueError(f'--res-schedule resolution {res} is not divisible by the mask size '
                             f'{model.mask_size} and the stride {model.stride}; use a multiple of '
                             f'{max(model.mask_size, model.stride)}')
        if model.swin:
            swin_window(model.window_at_128, res)
    return model


def main(argv=None):
    """Pre-train FastMIM (the module docstring); a user error prints `error: …` and exits 2."""
    return launch(argv, get_args, build_model, from_official=from_official)


if __name__ == '__main__':
    main()
