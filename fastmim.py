"""FastMIM: Expediting Masked Image Modeling Pre-training for Vision (Guo et al., arXiv 2212.06593).
https://arxiv.org/abs/2212.06593 · official code: github.com/ggjy/FastMIM.pytorch

SimMIM-style masked image modeling made cheap twice over: pre-train at 128x128 instead of 224x224, and regress
HOG features instead of pixels. Square blocks of the normalised image are painted, in pixel space, with one
learnable RGB colour (`mask_token`, 1x3x1x1) before the unchanged backbone sees every token; a small decoder
(no positional embedding) predicts, per output token, the 9-bin HOG histograms of the 3 colour channels of each
8x8 cell it covers; the loss is the MSE over masked tokens only. The mask block (16 px ViT, 32 px Swin) is
independent of the patch size. FastMIM-P grows the resolution during pre-training (`--res-schedule`).

Defaults (official README commands, which produced the released weights): 128 px, mask ratio 0.75, HOG with
per-cell L2 norm (`--norm-pix-loss`), ViT-B decoder 1 block x 256 (6 encoder heads, as the official model),
Swin-B window 4 and decoder 4 blocks x 256, 800 / 400 epochs, warm-up 20 / 10, batch 4096 / 2048,
blr 1.5e-4, AdamW (0.9, 0.95), wd 0.05 on every tensor but 1-D ones and biases (the official rule:
`mask_token`, `cls_token` and Swin tables are decayed — common.default_no_decay).

    python fastmim.py                                          # CPU smoke run on the built-in data
    python fastmim.py --data-path /data/imagenet               # one GPU
    torchrun --nproc_per_node 8 fastmim.py --res 128 --data-path /data/imagenet --model vit_base
    torchrun --nproc_per_node 8 fastmim.py --model swin_large --res-schedule 128:200,160:100,192:100 ...
"""
import torch
import torch.nn as nn
from einops import rearrange

from common import (SWIN_PRESETS, VIT_PRESETS, Block, SwinTransformer, VisionTransformer, block_mask, check_ratio,
                    denormalize, grid_picture, hog, hog_glyphs, init_weights, masked_mean, norm_pix, parse_pretrain,
                    patchify, per_token, pick_state_dict, pretrain_parser, run_main, sample_noise, strip_prefix,
                    train, unpatchify, upsample_mask)

# Per-model defaults (official README commands; fastmim.md §2). Small presets are ours, for CPUs.
DEFAULTS = {
    'vit_tiny': dict(mask_size=16, decoder_dim=128, decoder_depth=1, num_heads=3, batch_size=256, epochs=100,
                     warmup_epochs=5),
    'vit_small': dict(mask_size=16, decoder_dim=256, decoder_depth=1, num_heads=6, batch_size=512, epochs=800,
                      warmup_epochs=20),
    'vit_base': dict(mask_size=16, decoder_dim=256, decoder_depth=1, num_heads=6, batch_size=512, epochs=800,
                     warmup_epochs=20),  # official code, not the paper: 6 heads (mim_vit_pretrain.py)
    'vit_large': dict(mask_size=16, decoder_dim=512, decoder_depth=8, num_heads=16, batch_size=512, epochs=800,
                      warmup_epochs=20),  # paper: ViT-L decoder 8b512d (fastmim.md §2; no official command)
    'swin_tiny': dict(mask_size=32, decoder_dim=128, decoder_depth=1, window_size=4, batch_size=256, epochs=100,
                      warmup_epochs=5),
    'swin_base': dict(mask_size=32, decoder_dim=256, decoder_depth=4, window_size=4, batch_size=256, epochs=400,
                      warmup_epochs=10),
    'swin_large': dict(mask_size=32, decoder_dim=512, decoder_depth=4, window_size=8, batch_size=256, epochs=400,
                       warmup_epochs=10),  # FastMIM appendix: window 8 for Swin-L at 128
}
SMOKE = dict(model='vit_tiny', res=64, batch_size=64, epochs=6, warmup_epochs=1, decoder_dim=128, log_freq=8,
             save_freq=3, num_workers=2)  # ours: about 2 minutes on 2 CPU cores
OFFICIAL_NAMES = {'mim_vit_base': 'vit_base', 'mim_vit_large': 'vit_large', 'mim_swin_base': 'swin_base',
                  'mim_swin_large': 'swin_large'}
HOG_CELL, HOG_BINS = 8, 9  # FastMIM Sec. 3.2: 9 orientations, 8x8 cells, "following MaskFeat"


# ----------------------------------------------------------------------------- model

def add_decoder(model, in_dim, dim, depth, out_dim, eps):
    """FastMIM's decoder on the encoder tokens: Linear -> blocks (heads = dim // 32) -> LayerNorm -> Linear.

    No positional embedding and no mask tokens (fastmim.md §7); the official code ignores `decoder_num_heads`
    and always uses dim // 32 heads. With depth 0 the projection is skipped and only the norm is applied.
    """
    if depth == 0 and in_dim != dim:
        raise ValueError(f'--decoder-depth 0 needs --decoder-dim equal to the encoder width {in_dim}')
    model.decoder_embed = nn.Linear(in_dim, dim) if depth else nn.Identity()
    model.decoder_blocks = nn.ModuleList([Block(dim, dim // 32, 4.0, eps=eps) for _ in range(depth)])
    model.decoder_norm = nn.LayerNorm(dim, eps=eps)
    model.decoder_pred = nn.Linear(dim, out_dim)


class FastMIM(nn.Module):
    """What the ViT and Swin variants share: the pixel-space mask, the decoder, the HOG / pixel target and the loss."""

    def init_fastmim(self, stride, res, mask_size, mask_ratio, target, norm_pix_loss):
        """Check sizes and store the method's settings (stride = encoder output stride in px)."""
        if mask_size % HOG_CELL or res % mask_size:
            raise ValueError(f'--mask-size {mask_size} must be a multiple of the {HOG_CELL}-px HOG cell and divide '
                             f'res {res}; use e.g. --mask-size {stride}')
        if target == 'hog' and stride % HOG_CELL:
            raise ValueError(f'the HOG target needs an output stride divisible by {HOG_CELL}, got {stride}')
        check_ratio(mask_ratio, '--mask-ratio')
        self.stride, self.res, self.mask_size, self.mask_ratio = stride, res, mask_size, mask_ratio
        self.target_kind, self.norm_pix_loss = target, norm_pix_loss
        self.mask_token = nn.Parameter(torch.zeros(1, 3, 1, 1))  # one learnable colour, FastMIM Sec. 3.1
        nn.init.normal_(self.mask_token, std=0.02)

    def out_dim(self, stride, target):
        """Head width: 27 HOG numbers per 8x8 cell of a token, or stride*stride*3 pixels."""
        return (stride // HOG_CELL) ** 2 * 3 * HOG_BINS if target == 'hog' else stride * stride * 3

    def make_mask(self, imgs, keys=None):
        """Block mask (B, m0, m0) bool, True = masked, from per-sample noise (fastmim.md §4)."""
        m0 = imgs.shape[-1] // self.mask_size
        return block_mask(sample_noise(imgs.shape[0], m0 * m0, imgs.device, keys), m0, self.mask_ratio)

    def paint(self, imgs, mask):
        """Overwrite the masked blocks of the normalised image with the learnable colour (FastMIM Sec. 3.1)."""
        block_px = imgs.shape[-1] // mask.shape[-1]
        pixel_mask = upsample_mask(mask, block_px)[:, None].to(imgs.dtype)  # (B, 1, H, W)
        return imgs * (1 - pixel_mask) + self.mask_token.to(imgs.dtype) * pixel_mask

    def decode(self, x):
        """Encoder tokens (B, N, D) -> per-token predictions (B, N, P)."""
        x = self.decoder_embed(x)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))

    def target(self, imgs):
        """Per-token target (B, L, P): HOG cells of each token (fastmim.md §9a) or standardised pixels (§9c)."""
        if self.target_kind == 'hog':  # HOG of the unmasked image, fp32, L2 per cell with --norm-pix-loss (§8)
            hog_map = hog(imgs, HOG_BINS, HOG_CELL, 'sum', normalize=self.norm_pix_loss)  # (B, 27, Hc, Hc)
            return per_token(hog_map, self.stride // HOG_CELL)  # (B, L, 27*u*u)
        patches = patchify(imgs.float(), self.stride)  # (B, L, s*s*3)
        return norm_pix(patches) if self.norm_pix_loss else patches

    def loss(self, pred, target, mask):
        """MSE over masked tokens; below the token stride the loss is taken per 8x8 cell (fastmim.md §9b)."""
        G = self.res // self.stride
        if self.mask_size >= self.stride:
            tok_mask = upsample_mask(mask, self.mask_size // self.stride).flatten(1)  # (B, L)
            return masked_mean(((pred.float() - target) ** 2).mean(-1), tok_mask)
        cells = self.stride // HOG_CELL  # official quirk #11: a block smaller than a token switches to cell level
        to_cells = 'b (gh gw) (c dy dx) -> b (gh dy gw dx) c'
        pred_cells = rearrange(pred.float(), to_cells, gh=G, dy=cells, dx=cells)  # (B, Hc*Hc, 27)
        target_cells = rearrange(target, to_cells, gh=G, dy=cells, dx=cells)  # (B, Hc*Hc, 27)
        cell_mask = upsample_mask(mask, self.mask_size // HOG_CELL).flatten(1)  # (B, Hc*Hc)
        return masked_mean(((pred_cells - target_cells) ** 2).mean(-1), cell_mask)

    def forward(self, imgs, mask=None, keys=None):
        """imgs (B, 3, H, W) -> dict(loss, pred (B, L, P), target (B, L, P), mask (B, m0, m0) bool)."""
        if mask is None:
            mask = self.make_mask(imgs, keys)
        mask = mask.to(imgs.device)
        pred = self.predict(self.paint(imgs, mask))  # (B, L, P)
        target = self.target(imgs)
        return dict(loss=self.loss(pred, target, mask), pred=pred, target=target, mask=mask)

    def on_epoch(self, epoch):
        """FastMIM-P: switch to the resolution of this epoch's stage; returns the new resolution or None."""
        res = res_at(self.res_schedule, epoch) if self.res_schedule else self.res
        if res == self.res:
            return None
        self.set_res(res)
        self.res = res
        return res

    def picture(self, imgs, out):
        """input | masked input | target | prediction (HOG as orientation glyphs; pixels de-normalised)."""
        masked = denormalize(self.paint(imgs, out['mask']))
        H, W = imgs.shape[-2:]
        if self.mask_size >= self.stride:  # predictions where the loss is taken, the target elsewhere
            use_pred = upsample_mask(out['mask'], self.mask_size // self.stride).flatten(1)[..., None].float()  # (B, L, 1)
        else:
            use_pred = torch.ones_like(out['target'][..., :1])
        shown = out['target'] * (1 - use_pred) + out['pred'].float() * use_pred
        if self.target_kind == 'hog':
            cells, G = self.stride // HOG_CELL, H // self.stride
            to_map = 'b (gh gw) (c dy dx) -> b c (gh dy) (gw dx)'
            columns = [hog_glyphs(rearrange(t, to_map, gh=G, dy=cells, dx=cells).clamp(min=0), HOG_BINS)
                       for t in (out['target'], shown)]
        else:
            columns = [denormalize(unpatchify(t, self.stride, H, W)) for t in (patchify(imgs, self.stride), shown)]
        return grid_picture([denormalize(imgs), masked] + columns)


class FastMIMViT(FastMIM, VisionTransformer):
    """FastMIM on a ViT: keys as the official ViT checkpoint (timm encoder at top level, `mask_token`, `decoder_*`)."""

    def __init__(self, img_size=128, patch_size=16, embed_dim=768, depth=12, num_heads=6, mask_size=16,
                 mask_ratio=0.75, decoder_dim=256, decoder_depth=1, target='hog', norm_pix_loss=True,
                 res_schedule=None):
        VisionTransformer.__init__(self, img_size, patch_size, embed_dim, depth, num_heads)
        self.init_fastmim(patch_size, img_size, mask_size, mask_ratio, target, norm_pix_loss)
        add_decoder(self, embed_dim, decoder_dim, decoder_depth, self.out_dim(patch_size, target), eps=1e-6)
        for part in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            part.apply(init_weights)
        self.res_schedule = res_schedule

    def predict(self, x):
        """Painted image -> per-patch predictions (B, L, P); the cls token passes the decoder, then is dropped."""
        return self.decode(self.forward_features(x))[:, 1:]

    def set_res(self, res):
        """FastMIM-P: the fixed sin-cos table is recomputed for the new grid (exact, fastmim.md §11)."""
        self.set_resolution(res)


class FastMIMSwin(FastMIM):
    """FastMIM on Swin: `encoder.` + original Swin layout, top-level `mask_token` and `decoder_*` (official keys)."""

    def __init__(self, img_size=128, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=4,
                 mask_size=32, mask_ratio=0.75, decoder_dim=256, decoder_depth=4, target='hog', norm_pix_loss=True,
                 linear_init='xavier', res_schedule=None):
        super().__init__()
        self.encoder = SwinTransformer(img_size, 4, embed_dim, depths, num_heads, window_size)
        stride = 4 * 2 ** (len(depths) - 1)  # official PretrainSwin(patch_size=32) is this output stride
        self.init_fastmim(stride, img_size, mask_size, mask_ratio, target, norm_pix_loss)
        width = embed_dim * 2 ** (len(depths) - 1)
        add_decoder(self, width, decoder_dim, decoder_depth, self.out_dim(stride, target), eps=1e-5)
        if linear_init == 'xavier':  # official quirk #8: PretrainSwin re-inits every Linear xavier, bias 0
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    init_weights(module)
        self.window_128 = window_size * 128 / img_size  # FastMIM-P: the window scales with the resolution
        self.res_schedule = res_schedule

    def predict(self, x):
        """Painted image -> last-stage token predictions (B, L, P)."""
        return self.decode(self.encoder.forward_features(x))

    def set_res(self, res):
        """FastMIM-P for Swin: window(R) = window_128 * R / 128; tables resized, indices and masks rebuilt (§11)."""
        self.encoder.set_resolution(res, swin_window(self.window_128, res))


def swin_window(window_at_128, res):
    """FastMIM-P window rule (fastmim.md §11): window_at_128 * res / 128, which must be a whole number."""
    window = window_at_128 * res / 128
    if abs(window - round(window)) > 1e-9:
        step = 128 / window_at_128
        raise ValueError(f'res {res} gives Swin window {window:g}; FastMIM-P needs a resolution that is a multiple '
                         f'of {step:g} (e.g. {int(round(res / step) * step)})')
    return int(round(window))


def from_official(obj):
    """Official FastMIM pre-training checkpoint (ViT: no prefix; Swin: `encoder.` + top level) -> our state dict.

    Our keys are the official ones, so this only picks the state dict and strips DDP/compile prefixes.
    """
    return strip_prefix(pick_state_dict(obj))


# ----------------------------------------------------------------------------- FastMIM-P schedule

def parse_schedule(text):
    """'128:200,160:100' -> [(128, 200), (160, 100)] (resolution, epochs)."""
    try:
        return [(int(r), int(e)) for r, e in (part.split(':') for part in text.split(','))]
    except ValueError:
        raise ValueError(f'--res-schedule {text!r} is not of the form RES:EPOCHS,RES:EPOCHS (e.g. '
                         f'128:200,160:100,192:100)') from None


def res_at(schedule, epoch):
    """The resolution of the schedule stage that holds `epoch`."""
    end = 0
    for res, epochs in schedule:
        end += epochs
        if epoch < end:
            return res
    return schedule[-1][0]


# ----------------------------------------------------------------------------- command line

def get_args(argv=None):
    """Parse the command line and fill the per-model defaults."""
    p = pretrain_parser('fastmim', __doc__)
    a = p.add_argument
    a('--mask-size', '--block_size', '--mask_size', dest='mask_size', type=int,
      help='mask block in px, a multiple of 8; default 16 (ViT) / 32 (Swin) (README, FastMIM Tab. 10b)')
    a('--target', '--mim_loss', dest='target', default='hog',
      type=lambda s: {'hog': 'hog', 'HOG': 'hog', 'pixel': 'pixel', 'l2': 'pixel'}[s],
      help='hog (default, README --mim_loss HOG) or pixel (--mim_loss l2)')
    a('--norm-pix-loss', '--norm_pix_loss', dest='norm_pix_loss', action='store_true', default=True,
      help='HOG: L2-normalise each cell histogram; pixels: standardise each patch (on by default, README)')
    a('--no-norm-pix-loss', dest='norm_pix_loss', action='store_false', help='raw HOG sums / raw pixels')
    a('--decoder-dim', '--decoder_embed_dim', dest='decoder_dim', type=int, help='decoder width; default 256')
    a('--decoder-depth', '--decoder_depth', dest='decoder_depth', type=int,
      help='decoder blocks; default 1 (ViT-B) / 4 (Swin) (README)')
    a('--num-heads', dest='num_heads', type=int, help='ViT encoder heads; default 6 for vit_base (official '
      'mim_vit_base), 12 = standard ViT-B')
    a('--window-size', '--window_size', dest='window_size', type=int,
      help='Swin window at the start resolution; default 4 (Swin-B) / 8 (Swin-L) at 128 (README)')
    a('--res-schedule', dest='res_schedule', help='FastMIM-P: RES:EPOCHS,… e.g. 128:200,160:100,192:100')
    a('--swin-linear-init', dest='swin_linear_init', choices=('xavier', 'trunc_normal'), default='xavier',
      help='official PretrainSwin re-inits every Linear xavier (default); trunc_normal = Swin paper init')
    args = parse_pretrain(p, argv, DEFAULTS, SMOKE, OFFICIAL_NAMES, method='fastmim', res=128, mask_ratio=0.75,
                          blr=1.5e-4)  # FastMIM: pre-train at 128 (Sec. 3)
    if args.res_schedule:
        args.schedule = parse_schedule(args.res_schedule)
        if sum(e for _, e in args.schedule) != args.epochs:
            p.error(f'--res-schedule covers {sum(e for _, e in args.schedule)} epochs but --epochs is {args.epochs};'
                    f' make them agree')
        args.res = args.schedule[0][0]
    return args


def build_model(args):
    """The FastMIM model of the resolved arguments."""
    schedule = getattr(args, 'schedule', None)
    if args.model.startswith('vit'):
        cfg = dict(VIT_PRESETS[args.model], num_heads=args.num_heads)
        model = FastMIMViT(args.res, mask_size=args.mask_size, mask_ratio=args.mask_ratio,
                           decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth, target=args.target,
                           norm_pix_loss=args.norm_pix_loss, res_schedule=schedule, **cfg)
    else:
        model = FastMIMSwin(args.res, window_size=args.window_size, mask_size=args.mask_size,
                            mask_ratio=args.mask_ratio, decoder_dim=args.decoder_dim,
                            decoder_depth=args.decoder_depth, target=args.target, norm_pix_loss=args.norm_pix_loss,
                            linear_init=args.swin_linear_init, res_schedule=schedule, **SWIN_PRESETS[args.model])
    for res, _ in schedule or []:  # validate every stage now, not hours into the run
        if res % model.mask_size or res % model.stride:
            raise ValueError(f'--res-schedule resolution {res} is not divisible by the mask size {model.mask_size} '
                             f'and the stride {model.stride}; use a multiple of {max(model.mask_size, model.stride)}')
        if isinstance(model, FastMIMSwin):
            swin_window(model.window_128, res)
    return model


def pretrain(argv=None):
    """Parse, build, train."""
    args = get_args(argv)
    torch.manual_seed(args.seed)  # the same initial weights on every rank and every run
    return train(build_model(args), args)


def main(argv=None):
    """Pre-train FastMIM (see the module docstring); a user error prints `error: …` and exits 2."""
    return run_main(pretrain, argv)


if __name__ == '__main__':
    main()
