"""HPM: Hard Patches Mining for Masked Image Modeling (Wang et al., CVPR 2023), and its MAE baseline.
https://arxiv.org/abs/2304.05919 · official code: github.com/Haochen-Wang409/HPM (MAE: facebookresearch/mae)

MAE (`--method mae`) hides 75% of the patches, encodes the visible ones with a ViT and reconstructs the pixels of
the hidden ones with a light decoder (mask tokens + its own sin-cos pos-embed). HPM (`--method hpm`, default) adds
a second decoder, the loss predictor, that learns which patches are hard to reconstruct: it ranks the masked
patches by their (detached) reconstruction losses with a pairwise BCE; loss = L_rec + L_pred. Each step an EMA
teacher scores every patch of the unmasked image, and the student's mask then always contains the
alpha * (masked count) patches the teacher finds hardest, alpha growing from 0 to 0.5 over training
("easy-to-hard"); the rest of the mask is random. The teacher sees whole images while the student ranks masked
patches: a train/test mismatch the author acknowledges (HPM#1) and that we reproduce.

Defaults (hpm.md §2; official scripts): ViT-B/16 at 224, decoder 8 blocks x 512 (16 heads) for the reconstructor
and the loss predictor, mask ratio 0.75, 800 epochs, 40 warm-up, blr 1.5e-4 (lr = blr * batch / 256, effective
batch 4096 = 512 x 8 GPUs), AdamW (0.9, 0.95), wd 0.05 on all but 1-D tensors and biases. HPM: raw-pixel target
(`--no-norm-pix-loss`), relative ranking loss, EMA 0.999 -> 0.9999 over epochs 0-99, alpha = 0.5 (epoch+1)/epochs,
grad clip 5.0 (`--clip-grad 0` turns it off). MAE: `--norm-pix-loss`, no clipping. The supplement's ablations
use `--epochs 200` (README results: 800).

    python hpm.py                                              # CPU smoke run on the built-in data
    python hpm.py --data-path /data/imagenet                   # one GPU
    torchrun --nproc_per_node 8 hpm.py --data-path /data/imagenet --model vit_base
    torchrun --nproc_per_node 8 hpm.py --method mae --data-path /data/imagenet   # the MAE baseline
"""
import argparse
import copy
import os

import torch
import torch.nn as nn

from common import (MAE_DEFAULTS, MAE_NAMES, VIT_PRESETS, Block, MaskedAutoencoderViT, denormalize, autocast_off,
                    grid_picture, hot_colours, init_weights, masked_mean, parse_pretrain, pick_state_dict,
                    pixel_columns, pretrain_parser, random_masking, run_main, sample_noise, strip_prefix, train,
                    upsample_mask)

DEFAULTS, OFFICIAL_NAMES = MAE_DEFAULTS, MAE_NAMES  # hpm.md §2: HPM trains with MAE's scripts (Table S1)
SMOKE = dict(model='vit_tiny', res=64, batch_size=64, epochs=8, warmup_epochs=1, blr=1.5e-3, decoder_dim=128,
             decoder_depth=2, decoder_heads=4, log_freq=8, save_freq=4,
             num_workers=2)  # ours: about 2 minutes on 2 CPU cores; 10x blr so short a run visibly learns
EPS = 1e-6  # official forward_learning_loss: log(sigmoid(z) + 1e-6)


# ----------------------------------------------------------------------------- model

def ema_decay(epoch):
    """Teacher EMA decay of an epoch: 0.999 -> 0.9999 linearly over epochs 0-99, then 0.9999 (engine_pretrain.py)."""
    return 0.999 + epoch / 100 * (0.9999 - 0.999) if epoch < 100 else 0.9999


def alpha_at(epoch, epochs, alpha_start=0.0, alpha_end=0.5):
    """Fraction of the masked patches chosen as hard in an epoch: a0 + (aT - a0) (epoch+1)/T (HPM Alg. S1, code)."""
    return alpha_start + (alpha_end - alpha_start) * ((epoch + 1) / epochs)  # = official ((epoch+1)/T) * 0.5


def hard_count(L, mask_ratio, alpha):
    """len_loss = int((L - len_keep) alpha), len_keep = int(L (1 - r)) (official generate_mask, not Alg. S1)."""
    return int((L - int(L * (1 - mask_ratio))) * alpha)


class HPM(MaskedAutoencoderViT):
    """MAE + a loss predictor (official `_losspred` keys) + an EMA teacher that picks the hard patches to mask.

    The loss predictor shares the encoder, `decoder_embed`, `mask_token` and `decoder_pos_embed` with the
    reconstructor and has its own blocks, norm and p*p*3-wide head, averaged to one score per patch (hpm.md §4).
    The teacher is a plain attribute (out of state_dict, parameters, the optimiser and DDP), saved via extra_state.
    """

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512,
                 decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0, norm_pix_loss=False, mask_ratio=0.75,
                 epochs=800, alpha_start=0.0, alpha_end=0.5, relative=True):
        super().__init__(img_size, patch_size, embed_dim, depth, num_heads, decoder_embed_dim, decoder_depth,
                         decoder_num_heads, mlp_ratio, norm_pix_loss, mask_ratio)
        for a, name in ((alpha_start, '--alpha-start'), (alpha_end, '--alpha-end')):
            if not 0.0 <= a <= 1.0:
                raise ValueError(f'{name} {a} is out of range; use a fraction of the masked patches in [0, 1]')
        self.decoder_blocks_losspred = nn.ModuleList([Block(decoder_embed_dim, decoder_num_heads, mlp_ratio)
                                                      for _ in range(decoder_depth)])
        self.decoder_norm_losspred = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred_losspred = nn.Linear(decoder_embed_dim, patch_size ** 2 * 3)  # wide head, as released
        for m in (self.decoder_blocks_losspred, self.decoder_norm_losspred, self.decoder_pred_losspred):
            m.apply(init_weights)
        self.epochs, self.alpha_start, self.alpha_end, self.relative = epochs, alpha_start, alpha_end, relative
        self.on_epoch(0)
        teacher = copy.deepcopy(self).eval().requires_grad_(False)  # timm ModelEma: a copy of the whole model
        object.__setattr__(self, 'teacher', teacher)  # plain attribute, not a submodule (STYLE contract)

    # --- loss predictor
    def predict_loss(self, x):
        """Loss predictor on decoder tokens (B, 1+L, Dd) -> one score per token (B, L): mean of the wide head."""
        parts = (self.decoder_blocks_losspred, self.decoder_norm_losspred, self.decoder_pred_losspred)
        out = self.run_decoder(x, *parts)  # (B, L, p*p*3); the official comment says (N, L, 1): it is not
        return out.float().mean(dim=-1)  # (B, L); fp32 so that bf16 scores rarely tie in the top-k

    @torch.no_grad()
    def score_patches(self, imgs):
        """Predicted difficulty of every patch of the unmasked image (B, L); no mask tokens, no reconstruction.

        The official teacher pass also runs the reconstruction decoder and discards it; skipping it changes nothing.
        """
        latent = self.forward_features(imgs)  # (B, 1+L, D): all patches, raster order
        return self.predict_loss(self.decoder_embed(latent) + self.decoder_pos_embed)  # (B, L)

    # --- EMA teacher
    def teacher_on(self, device):
        """The teacher, moved to `device` when it is elsewhere (model.to() does not move a plain attribute)."""
        if self.teacher.pos_embed.device != device:
            self.teacher.to(device)
        return self.teacher

    def on_epoch(self, epoch):
        """Set this epoch's EMA decay and easy-to-hard alpha (both per epoch in the official code)."""
        self.ema_decay = ema_decay(epoch)
        self.alpha = alpha_at(epoch, self.epochs, self.alpha_start, self.alpha_end)

    @torch.no_grad()
    def after_step(self):
        """EMA update of every teacher state entry after an optimizer step: ema = d ema + (1 - d) student."""
        d = self.ema_decay
        student = self.state_dict()
        for k, v in self.teacher_on(self.pos_embed.device).state_dict().items():
            v.copy_(v * d + (1.0 - d) * student[k])  # timm 0.3.2 ModelEma.update arithmetic

    def extra_state(self):
        """The teacher's weights, saved as the checkpoint's 'model_ema'."""
        return {'model_ema': self.teacher.state_dict()}

    def load_extra_state(self, checkpoint):
        """Restore the teacher from a checkpoint's 'model_ema'."""
        if 'model_ema' not in checkpoint:
            raise ValueError('this HPM checkpoint has no teacher (model_ema); resume from a file hpm.py wrote')
        self.teacher.load_state_dict(checkpoint['model_ema'], strict=True)

    # --- masking and forward
    def mask_and_score(self, imgs, mask=None, keys=None):
        """A given mask as is, else the easy-to-hard mask -> ((ids_keep, mask, ids_restore), teacher scores | None).

        The drawn mask comes from the teacher's scores of the unmasked image and per-sample noise (hpm.md §5).
        """
        if mask is not None:
            return super().masking(imgs, mask), None
        B, L = imgs.shape[0], self.grid ** 2
        noise = sample_noise(B, L, imgs.device, keys)
        n_hard = hard_count(L, self.mask_ratio, self.alpha)
        scores = None
        if n_hard > 0 or not self.training:  # eval: scores for the picture
            scores = self.teacher_on(imgs.device).score_patches(imgs)
        if n_hard == 0:
            return random_masking(noise, self.mask_ratio), scores  # official: argsort(randn), same distribution
        return easy_to_hard(scores, self.mask_ratio, self.alpha, noise), scores

    def forward(self, imgs, mask=None, keys=None):
        """imgs (B, 3, H, W) -> dict(loss, loss_rec, loss_pred, pred, target, mask, scores (teacher, when drawn))."""
        (ids_keep, mask, ids_restore), scores = self.mask_and_score(imgs, mask, keys)
        latent = self.forward_encoder(imgs, ids_keep)  # (B, 1+K, D)
        x = self.decoder_input(latent, ids_restore)  # (B, 1+L, Dd), shared by both decoders (not detached)
        pred = self.run_decoder(x, self.decoder_blocks, self.decoder_norm, self.decoder_pred)  # (B, L, P)
        pred_loss = self.predict_loss(x)  # (B, L)
        target = self.target(imgs)
        per_patch = self.patch_loss(pred, target)  # (B, L) autocast_off
        loss_rec = masked_mean(per_patch, mask)  # = official sq.mean() over [N, Mn, P]
        B, L = mask.shape
        M = L - ids_keep.shape[1]
        ids_m = torch.argsort(mask.int(), dim=1, stable=True)[:, L - M:]  # (B, M) masked positions, ascending
        p = torch.gather(pred_loss, 1, ids_m)  # (B, M)
        t = torch.gather(per_patch.detach(), 1, ids_m)  # (B, M) ranking target, detached (HPM §7)
        loss_pred = ranking_loss(p, t) if self.relative else absolute_loss(p, t)
        out = dict(loss=loss_rec + loss_pred, loss_rec=loss_rec, loss_pred=loss_pred,
                   pred=pred * mask[..., None].to(pred.dtype), target=target, mask=mask, pred_loss=pred_loss)
        if scores is not None:
            out['scores'] = scores
        return out

    def picture(self, imgs, out):
        """input | masked | reconstruction | teacher's predicted difficulty (supplement Fig. S1), uint8 (3, H, W)."""
        scores = out.get('scores')
        if scores is None:
            scores = self.teacher_on(imgs.device).score_patches(imgs)
        cols = pixel_columns(imgs, out['pred'], out['mask'], self.patch_size, self.norm_pix_loss)
        return grid_picture(cols + [difficulty_map(scores, imgs, self.patch_size)])


def difficulty_map(scores, imgs, p):
    """Scores (B, L) -> heat map (B, 3, H, W) in [0, 1]: min-max per image, 'hot' colours over the dimmed input."""
    B = scores.shape[0]
    H, W = imgs.shape[-2:]
    s = scores.float()
    lo, hi = s.amin(1, keepdim=True), s.amax(1, keepdim=True)
    v = ((s - lo) / (hi - lo).clamp(min=1e-12)).reshape(B, H // p, W // p)  # (B, G, G)
    v = upsample_mask(v, p)[:, None]  # (B, 1, H, W)
    return 0.3 * denormalize(imgs).mean(1, keepdim=True) + 0.7 * hot_colours(v)  # (B, 3, H, W)


def from_official(obj, teacher=False):
    """Official MAE ({'model'}) or HPM ({'state_dict' with module., 'ema_state_dict', ...}) file -> our state dict.

    Keys are the official ones, so this picks the state dict (the teacher's with teacher=True) and strips prefixes.
    MAE's encoder-only release files have no decoder and cannot continue pre-training.
    """
    sd = strip_prefix(pick_state_dict(obj, teacher=teacher))
    if 'decoder_embed.weight' not in sd:
        raise ValueError('this checkpoint has no decoder (an encoder-only MAE release such as '
                         'mae_pretrain_vit_base.pth); pre-training needs mae_pretrain_vit_*_full.pth (norm-pix) or '
                         'mae_visualize_vit_*.pth (raw pixels); finetune.py reads encoder-only files')
    return sd


# ----------------------------------------------------------------------------- losses

def ranking_loss(p, t):
    """Relative loss (official forward_learning_loss, relative=True): p, t (B, M) -> 0-d, fp32.

    All ordered pairs (i, j) of one image: z = p_j - p_i, label t_j > t_i, ties ignored,
    -log(sigmoid(z) + 1e-6) or -log(1 - sigmoid(z) + 1e-6), summed and divided by the batch's non-tied pair count.
    """
    with autocast_off(p.device):  # official quirk #7: fp16 there; fp32 here
        p, t = p.float(), t.float()
        pos = (t[:, None, :] > t[:, :, None]).float()  # (B, M, M) [i, j] = t_j > t_i
        neg = (t[:, None, :] < t[:, :, None]).float()  # (B, M, M)
        z = torch.sigmoid(p[:, None, :] - p[:, :, None])  # (B, M, M) sigmoid(p_j - p_i)
        loss = -pos * torch.log(z + EPS) - neg * torch.log(1 - z + EPS)
        return loss.sum() / (pos + neg).sum().clamp(min=1)  # official 0/0 when every pair ties (quirk #11)


def absolute_loss(p, t):
    """Absolute ablation (relative=False): MSE to the per-image standardised losses (unbiased variance), fp32."""
    with autocast_off(p.device):
        t = t.float()
        t = (t - t.mean(1, keepdim=True)) / (t.var(1, keepdim=True) + 1e-6) ** 0.5
        return ((p.float() - t) ** 2).mean()


# ----------------------------------------------------------------------------- easy-to-hard masking

def easy_to_hard(scores, mask_ratio, alpha, noise):
    """easy_to_hard_mask with the (ids_keep, mask, ids_restore) triple of common.random_masking."""
    B, L = scores.shape
    n_hard = hard_count(L, mask_ratio, alpha)
    ids = torch.argsort(scores, dim=1, stable=True)[:, L - n_hard:]  # (B, n_hard) top scores, ties -> higher index
    hard = torch.zeros(B, L, dtype=torch.bool, device=scores.device).scatter(1, ids, True)  # (B, L)
    return random_masking(noise.masked_fill(hard, float('inf')), mask_ratio)  # hard patches are never kept


def easy_to_hard_mask(scores, mask_ratio, alpha, noise):
    """HPM mask (official generate_mask, guide=True) -> (B, L) bool, True = masked; scores, noise U[0,1) (B, L).

    The int((L - len_keep) alpha) top-scored patches are always masked; among the others the len_keep with the
    smallest noise stay visible, the rest are masked. alpha = 0 is MAE random masking on the same noise.
    """
    return easy_to_hard(scores, mask_ratio, alpha, noise)[1]


# ----------------------------------------------------------------------------- command line

def get_args(argv=None):
    """Parse the command line and fill the per-method and per-model defaults."""
    p = pretrain_parser('hpm', __doc__)
    a = p.add_argument
    a('--method', choices=('hpm', 'mae'), default='hpm', help='hpm (default) or the MAE baseline')
    a('--learning_loss', '--learning-loss', dest='method', action='store_const', const='hpm',
      help='official HPM flag: the loss predictor (= --method hpm)')
    a('--relative', action=argparse.BooleanOptionalAction, default=True,
      help='relative ranking loss (default, official --relative); --no-relative = absolute ablation (hpm.md §7)')
    a('--alpha-start', '--alpha_start', dest='alpha_start', type=float, default=0.0,
      help='easy-to-hard alpha_0 (HPM Alg. S1; the official code hard-wires 0)')
    a('--alpha-end', '--alpha_end', dest='alpha_end', type=float, default=0.5,
      help='easy-to-hard alpha_T, reached at the last epoch (official code: 0.5)')
    a('--norm-pix-loss', '--norm_pix_loss', dest='norm_pix_loss', action=argparse.BooleanOptionalAction,
      help='standardise each target patch; default off for hpm (author, HPM#4), on for mae (MAE recipe)')
    a('--decoder-dim', '--decoder_embed_dim', dest='decoder_dim', type=int,
      help='decoder width of both decoders; default 512 (mae_vit_*_dec512d8b)')
    a('--decoder-depth', '--decoder_depth', dest='decoder_depth', type=int,
      help='decoder blocks of both decoders; default 8 (supplement Table S4)')
    a('--decoder-heads', '--decoder_num_heads', dest='decoder_heads', type=int, help='decoder heads; default 16')
    a('--token_size', '--token-size', dest='token_size', type=int,
      help='official mask-generator grid side; derived from --res, checked when given')
    a('--experiment', help='official run name, only used for file names there: accepted, ignored')
    args = parse_pretrain(p, argv, DEFAULTS, SMOKE, OFFICIAL_NAMES, res=224, mask_ratio=0.75, blr=1.5e-4)
    if args.norm_pix_loss is None:  # hpm.md §2: HPM never passes --norm_pix_loss; MAE's recipe does
        args.norm_pix_loss = args.method == 'mae'
    if args.clip_grad is None and args.method == 'hpm':
        args.clip_grad = 5.0  # HPM's NativeScalerWithGradNormCount clip default; MAE does not clip
    patch = VIT_PRESETS[args.model]['patch_size']
    if args.token_size is not None and args.token_size * patch != args.res:
        p.error(f'--token_size {args.token_size} does not match res {args.res} / patch {patch}; drop it or use '
                f'{args.res // patch}')
    if args.experiment is not None and int(os.environ.get('RANK', 0)) == 0:
        print(f'note: official --experiment {args.experiment} ignored (our files live in --output-dir)')
    return args


def build_model(args):
    """The MAE baseline (common.MaskedAutoencoderViT) or HPM of the resolved arguments."""
    cfg = dict(VIT_PRESETS[args.model], img_size=args.res, decoder_embed_dim=args.decoder_dim,
               decoder_depth=args.decoder_depth, decoder_num_heads=args.decoder_heads,
               norm_pix_loss=args.norm_pix_loss, mask_ratio=args.mask_ratio)
    if args.method == 'mae':
        return MaskedAutoencoderViT(**cfg)
    return HPM(**cfg, epochs=args.epochs, alpha_start=args.alpha_start, alpha_end=args.alpha_end,
               relative=args.relative)


def pretrain(argv=None):
    """Parse, build, train."""
    args = get_args(argv)
    torch.manual_seed(args.seed)  # the same initial weights on every rank and every run
    model = build_model(args)
    if int(os.environ.get('RANK', 0)) == 0:
        L = model.grid ** 2
        keep = int(L * (1 - args.mask_ratio))
        hard = ''
        if args.method == 'hpm':
            last = alpha_at(args.epochs - 1, args.epochs, args.alpha_start, args.alpha_end)
            hard = (f'; hard patches per image {hard_count(L, args.mask_ratio, model.alpha)} (epoch 0) -> '
                    f'{hard_count(L, args.mask_ratio, last)} (last epoch)')
        print(f'{args.method}: {L} patches per image, {keep} visible to the encoder, {L - keep} masked{hard}')
    return train(model, args)


def main(argv=None):
    """Pre-train HPM or MAE (see the module docstring); a user error prints `error: …` and exits 2."""
    return run_main(pretrain, argv)


if __name__ == '__main__':
    main()
