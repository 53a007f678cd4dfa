"""HPM: Hard Patches Mining for Masked Image Modeling (Wang et al., CVPR 2023) and its MAE baseline.
https://arxiv.org/abs/2304.05919 · official code: github.com/Haochen-Wang409/HPM, cited below as
`path:function` at commit c15ae90 (MAE: github.com/facebookresearch/mae). "Supp." is the paper's
supplementary material (Tab. S1-S4, Alg. S1, Fig. S1); "HPM#N" is
github.com/Haochen-Wang409/HPM/issues/N. We could not check the main text: its numbers appear only
where the supplement or the author cites them, and its equations not at all.

MAE (`--method mae`) hides 75% of the patches, encodes the visible ones with a ViT and reconstructs
the pixels of the hidden ones with a light decoder (mask tokens + its own sin-cos pos-embed). HPM
(`--method hpm`, default) adds a second decoder, the loss predictor, that learns which patches are
hard to reconstruct: it ranks the masked patches by their (detached) reconstruction losses with a
pairwise BCE; loss = L_rec + L_pred. Each step an EMA teacher scores every patch of the unmasked
image, and the student's mask then always contains the alpha * (masked count) patches the teacher
finds hardest, alpha growing from 0 to 0.5 over training ("easy-to-hard", Sec. 3.4 and Alg. S1);
the rest of the mask is random.

Defaults (Tab. S1, the official scripts; note 1): ViT-B/16 at 224, decoder 8 blocks x 512 (16
heads) for the reconstructor and the loss predictor (Tab. S4's best), mask ratio 0.75, 800 epochs,
40 warm-up, blr 1.5e-4 (lr = blr * batch / 256), batch 4096 = 512 x 8 processes, AdamW (0.9,
0.95), wd 0.05 on all but 1-D tensors and biases. HPM: raw pixels (note 8), relative loss, grad
clip 5.0 (note 9). MAE (its recipe): norm-pix, no clipping.

Feature targets (`--target ema|dino|clip`, official `--learn_feature_loss`) are an ablation (the
main text's Tab. 1 and 5, per the author in HPM#4): the decoder predicts each masked patch's
feature from a frozen model (the EMA teacher's encoder, or a DINO / OpenAI CLIP ViT-B/16 read from
`--teacher-path`) with a per-patch loss 2 - 2 cos, and the loss predictor ranks these losses.

    python hpm.py                                              # CPU smoke run on the built-in data
    python hpm.py --target ema                                 # the same, EMA-feature target
    python hpm.py --data-path /data/imagenet                   # one GPU
    torchrun --nproc_per_node 8 hpm.py --data-path /data/imagenet --model vit_base
    torchrun --nproc_per_node 8 hpm.py --method mae --data-path /data/imagenet   # MAE baseline
    torchrun --nproc_per_node 8 hpm.py --data-path /data/imagenet --target clip --teacher-path c.pth

Where this follows the official code rather than the paper (or where the paper is silent); the
comments below cite these as "note N":
1. 800 epochs and 40 warm-up as scripts/pretrain_base.sh (the README's results); Tab. S1 and the
   ablations: 200 epochs, ViT-B warm-up 10. Batch 4096 as Tab. S1 (the script: 32 x 8).
   `--epochs 200 --warmup-epochs 10` gives Tab. S1's schedule.
2. alpha = 0.5 (epoch + 1) / T, fixed within an epoch, 0.5 in the last one (`keep_ratio` in
   models_mae_learn_loss.py:MaskedAutoencoderViT.generate_mask); Alg. S1: alpha_t = alpha_0 +
   t / T (alpha_T - alpha_0), the supplement gives no values. `--alpha-start`, `--alpha-end`.
3. Hard patches per image int((L - len_keep) alpha), len_keep = int(L (1 - r)) (generate_mask);
   Alg. S1: len_pred = int(L r alpha_t). The same whenever L r is whole (L 196 or 64 at r 0.75).
4. The mask as generate_mask builds it (1 = masked); Alg. S1 as printed sets mask[:len_keep] = 1 on
   a mask of ones and calls 0 "remove". No hard patch: random masking (argsort of randn there).
5. Teacher: a copy of the whole model (timm ModelEma, main_pretrain.py:main), updated after every
   optimizer step, decay 0.999 + epoch / 100 (0.9999 - 0.999) up to epoch 99, then 0.9999
   (engine_pretrain.py:train_one_epoch). The supplement names no decay.
6. The teacher scores every patch of the unmasked image (train_one_epoch passes an all-False mask)
   while the student's loss predictor ranks masked patches: a train/test mismatch the author
   acknowledges in HPM#1. Reproduced.
7. Loss-predictor head Linear(D_dec, p*p*3), its outputs averaged to one score per patch
   (models_mae_learn_loss.py:MaskedAutoencoderViT.forward_decoder), so the released weights load;
   supp. Sec. A says "a linear projector".
8. Raw-pixel target: HPM never passes `--norm_pix_loss` (main_pretrain.py; the author in HPM#4),
   unlike MAE's recipe. `--norm-pix-loss` standardises each target patch.
9. Grad clip 5.0: the default of util/misc.py:NativeScalerWithGradNormCount.__call__, which
   train_one_epoch calls without clip_grad (MAE's default: none). `--clip-grad 0` turns it off.
10. Relative loss as models_mae_learn_loss.py:MaskedAutoencoderViT.forward_learning_loss: tied
    pairs ignored, -log(sigmoid(z) + 1e-6) rather than BCE with logits (a pair costs at most
    13.8), divided by the batch's non-tied pair count (ours: at least 1; the code's is 0/0 when
    all tie). Ours in fp32; the code runs it under fp16 autocast (train_one_epoch).
11. Feature targets (models_mae_learn_feature_loss.py): the code's decoder_pred is
    Linear(D_dec, D_dec), which fits CLIP-B/16's 512 only; ours takes the target's width. CLIP
    features as engine_pretrain.py:forward_features_clip: ln_post and proj on every token of the
    ImageNet-normalised image. main_pretrain.py:main loads --clip_path for `ema` too; we do not.
"""
import argparse
import copy
import os
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (Block, MaskedAutoencoderViT, VisionTransformer, autocast_off, denormalize,
                    grid_picture, hot_colours, init_weights, masked_mean, patchify, pixel_columns,
                    pixel_labels, random_masking, token_masking, upsample_mask)

EPS = 1e-6  # inside the log of the relative loss (note 10)
# official --learn_feature_loss: none (= pixel) | ema | dino | clip
TARGETS = ('pixel', 'ema', 'dino', 'clip')


# ----------------------------------------------------------------------------- model

def ema_decay(epoch):
    """Teacher EMA decay of an epoch: 0.999 -> 0.9999 linearly over epochs 0-99 (note 5)."""
    return 0.999 + epoch / 100 * (0.9999 - 0.999) if epoch < 100 else 0.9999


def alpha_at(epoch, epochs, alpha_start=0.0, alpha_end=0.5):
    """Alg. S1's alpha_t, the hard share of the masked patches: a0 + (aT - a0) (epoch+1)/T."""
    return alpha_start + (alpha_end - alpha_start) * ((epoch + 1) / epochs)  # note 2


def hard_count(L, mask_ratio, alpha):
    """Hard patches per image, int((L - len_keep) alpha), len_keep = int(L (1 - r)) (note 3)."""
    return int((L - int(L * (1 - mask_ratio))) * alpha)


# ----------------------------------------------------------------------------- losses

def ranking_loss(p, t):
    """Relative loss (note 10): predicted p, true t (B, M) -> 0-d, fp32.

    All ordered pairs (i, j) of one image: z = p_j - p_i, label t_j > t_i, ties ignored,
    -log(sigmoid(z) + 1e-6) or -log(1 - sigmoid(z) + 1e-6), summed and divided by the batch's
    non-tied pair count.
    """
    with autocast_off(p.device):  # ours fp32, the official loop fp16 (note 10)
        p, t = p.float(), t.float()
        pos = (t[:, None, :] > t[:, :, None]).float()  # (B, M, M) [i, j] = t_j > t_i
        neg = (t[:, None, :] < t[:, :, None]).float()  # (B, M, M)
        prob = torch.sigmoid(p[:, None, :] - p[:, :, None])  # (B, M, M) sigmoid(p_j - p_i)
        loss = -pos * torch.log(prob + EPS) - neg * torch.log(1 - prob + EPS)
        return loss.sum() / (pos + neg).sum().clamp(min=1)  # the code: 0/0 if all tie (note 10)


def absolute_loss(p, t):
    """Absolute ablation (`--no-relative`): MSE to per-image standardised losses, fp32.

    Unbiased variance, as forward_learning_loss with relative=False.
    """
    with autocast_off(p.device):
        t = t.float()
        t = (t - t.mean(1, keepdim=True)) / (t.var(1, keepdim=True) + 1e-6) ** 0.5
        return ((p.float() - t) ** 2).mean()


def feature_loss(pred, target):
    """Feature-target loss per token: pred, target (B, L, C) -> (B, L) fp32, |p^ - t^|^2 = 2 - 2cos.

    As models_mae_learn_feature_loss.py:MaskedAutoencoderViT.forward_loss (^ = L2-normalised):
    its mean over the masked tokens is L_rec, its per-token values the ranking target.
    """
    with autocast_off(pred.device):
        p, t = F.normalize(pred.float(), dim=-1), F.normalize(target.float(), dim=-1)  # (B, L, C)
        return ((p - t) ** 2).sum(dim=-1)  # (B, L)


# ----------------------------------------------------------------------------- easy-to-hard masking

def easy_to_hard_mask(scores, mask_ratio, alpha, noise):
    """Easy-to-hard mask (Alg. S1, note 4): scores, noise (B, L) -> (ids_keep, mask, ids_restore)
    as common.random_masking, mask (B, L) bool, True = masked.

    Supp. Sec. C: of the masked patches an alpha_t share are those of highest predicted loss, the
    rest random. The hard_count top-scored patches are always masked; of the others the len_keep
    with the smallest noise U[0,1) stay visible. alpha = 0 is MAE random masking on the same
    noise. Vectorised: the same distribution as the official per-sample loop, not the same draws.
    """
    B, L = scores.shape
    n_hard = hard_count(L, mask_ratio, alpha)  # Alg. S1 len_pred (note 3)
    # Alg. S1 argsort(pred_t)[-len_pred:]: the top scores, stable so ties go to the higher index
    ids_hard = torch.argsort(scores, dim=1, stable=True)[:, L - n_hard:]  # (B, n_hard)
    # (B, L), True at the hard patches
    hard = torch.zeros(B, L, dtype=torch.bool, device=scores.device).scatter(1, ids_hard, True)
    # Alg. S1 "random masking for remained patches": hard patches get infinite noise, never kept;
    # random_masking keeps the len_keep smallest (Alg. S1 len_keep, mask and restore; note 4)
    return random_masking(noise.masked_fill(hard, float('inf')), mask_ratio)


# ----------------------------------------------------------------------------- the model

def difficulty_map(scores, imgs, p):
    """Scores (B, L) -> heat map (B, 3, H, W) in [0, 1], min-max per image, over the dim input."""
    B = scores.shape[0]
    H, W = imgs.shape[-2:]
    s = scores.float()
    lo, hi = s.amin(1, keepdim=True), s.amax(1, keepdim=True)
    v = ((s - lo) / (hi - lo).clamp(min=1e-12)).reshape(B, H // p, W // p)  # (B, G, G)
    v = upsample_mask(v, p)[:, None]  # (B, 1, H, W)
    return 0.3 * denormalize(imgs).mean(1, keepdim=True) + 0.7 * hot_colours(v)  # (B, 3, H, W)


class HPM(MaskedAutoencoderViT):
    """MAE + a loss predictor (official `_losspred` keys) + an EMA teacher that picks hard patches.

    The loss predictor shares the encoder, `decoder_embed`, `mask_token` and `decoder_pos_embed`
    with the reconstructor and has its own blocks, norm and p*p*3-wide head, averaged to one score
    per patch (note 7). The teacher is a plain attribute (out of state_dict, parameters, the
    optimiser and DDP), saved via extra_state. target 'ema' | 'dino' | 'clip' predicts features,
    not pixels: the EMA teacher's encoder output, or that of `target_model` (load_target_model), a
    frozen plain attribute that is never saved.
    """

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0,
                 norm_pix_loss=False, mask_ratio=0.75, epochs=800, alpha_start=0.0, alpha_end=0.5,
                 relative=True, target='pixel', target_model=None):
        super().__init__(img_size, patch_size, embed_dim, depth, num_heads, decoder_embed_dim,
                         decoder_depth, decoder_num_heads, mlp_ratio, norm_pix_loss, mask_ratio)
        for value, flag in ((alpha_start, '--alpha-start'), (alpha_end, '--alpha-end')):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f'{flag} {value} is out of range; use a fraction of the masked '
                                 f'patches in [0, 1]')
        if target not in TARGETS:
            raise ValueError(f'unknown target {target}; use one of {", ".join(TARGETS)}')
        if (target_model is not None) != (target in ('dino', 'clip')):
            raise ValueError(f'target {target}: pass target_model (load_target_model) for dino and '
                             f'clip only')
        if target != 'pixel' and norm_pix_loss:
            raise ValueError(f'--norm-pix-loss standardises pixels; drop it with --target {target}')
        self.target_kind = target
        if target != 'pixel':
            # ours, not the official Linear(D_dec, D_dec): the target's width (note 11)
            width = embed_dim if target == 'ema' else target_model.out_dim
            self.decoder_pred = nn.Linear(decoder_embed_dim, width)
            init_weights(self.decoder_pred)
        self.decoder_blocks_losspred = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)])
        self.decoder_norm_losspred = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred_losspred = nn.Linear(decoder_embed_dim, patch_size ** 2 * 3)  # note 7
        for m in (self.decoder_blocks_losspred, self.decoder_norm_losspred,
                  self.decoder_pred_losspred):
            m.apply(init_weights)
        self.epochs, self.alpha_start, self.alpha_end, self.relative = (epochs, alpha_start,
                                                                        alpha_end, relative)
        self.on_epoch(0)
        teacher = copy.deepcopy(self).eval().requires_grad_(False)  # the whole model (note 5)
        object.__setattr__(self, 'teacher', teacher)  # not registered (class docstring)
        if target_model is not None:  # after the copy: the EMA teacher needs no DINO/CLIP copy
            target_model = target_model.eval().requires_grad_(False)
        object.__setattr__(self, 'target_model', target_model)

    # --- loss predictor
    def predict_loss(self, x):
        """Decoder tokens (B, 1+L, Dd) -> one predicted loss per token (B, L) (note 7)."""
        parts = (self.decoder_blocks_losspred, self.decoder_norm_losspred,
                 self.decoder_pred_losspred)
        out = self.run_decoder(x, *parts)  # (B, L, p*p*3)
        return out.float().mean(dim=-1)  # (B, L); fp32 so that bf16 scores rarely tie in the top-k

    @torch.no_grad()
    def score_patches(self, imgs, latent=None):
        """Predicted difficulty (B, L) of every patch of the unmasked image, no mask token (note 6).

        The official teacher pass also runs the reconstruction decoder and discards it; we skip it.
        `latent` = this model's forward_features(imgs), when the caller has it (the 'ema' target).
        """
        if latent is None:
            latent = self.forward_features(imgs)  # (B, 1+L, D): all patches, raster order
        return self.predict_loss(self.decoder_embed(latent) + self.decoder_pos_embed)  # (B, L)

    # --- EMA teacher
    def teacher_on(self, device, name='teacher'):
        """The EMA teacher or 'target_model' on `device` (model.to() skips plain attributes)."""
        frozen = getattr(self, name)
        if next(frozen.parameters()).device != device:
            frozen.to(device)
        return frozen

    def on_epoch(self, epoch):
        """Set this epoch's EMA decay and easy-to-hard alpha (both per epoch, notes 2 and 5)."""
        self.ema_decay = ema_decay(epoch)
        self.alpha = alpha_at(epoch, self.epochs, self.alpha_start, self.alpha_end)

    @torch.no_grad()
    def after_step(self):
        """EMA update of every teacher state entry: ema = d ema + (1 - d) student (note 5)."""
        d = self.ema_decay
        student = self.state_dict()
        for k, v in self.teacher_on(self.pos_embed.device).state_dict().items():
            v.copy_(v * d + (1.0 - d) * student[k])  # timm 0.3.2 ModelEma.update arithmetic

    def extra_state(self):
        """The teacher's weights, saved as the checkpoint's 'model_ema'."""
        return {'model_ema': self.teacher.state_dict()}

    def load_extra_state(self, checkpoint):
        """Restore the teacher from a checkpoint: ours ('model_ema') or an official HPM file
        ('ema_state_dict'), read by from_official as the student's weights are."""
        if not any(k in checkpoint for k in ('model_ema', 'ema_state_dict')):
            raise ValueError('this HPM checkpoint has no teacher (model_ema or ema_state_dict); '
                             'resume from a file hpm.py wrote or an official HPM checkpoint')
        self.teacher.load_state_dict(from_official(checkpoint, teacher=True), strict=True)

    def describe(self):
        """One line for the log: visible, masked and hard patches, the target."""
        L = self.grid ** 2
        last = alpha_at(self.epochs - 1, self.epochs, self.alpha_start, self.alpha_end)
        line = (super().describe().replace('mae:', 'hpm:') + f'; hard patches per image '
                f'{hard_count(L, self.mask_ratio, self.alpha)} (epoch 0) -> '
                f'{hard_count(L, self.mask_ratio, last)} (last epoch)')
        if self.target_kind != 'pixel':
            width = self.decoder_pred.out_features
            line += f'; target: {self.target_kind} features ({width}-d), loss 2 - 2 cos'
        return line

    # --- masking and forward
    def mask_and_score(self, imgs, mask=None, keys=None, latent=None):
        """Easy-to-hard mask (Sec. 3.4), or a given one -> ((ids_keep, mask, ids_restore), scores).

        Drawn from the teacher's scores of the unmasked image and per-sample noise; scores None
        when not needed. `latent`: the teacher's encoder output on that image, if the caller has it.
        """
        L = self.grid ** 2
        n_hard = hard_count(L, self.mask_ratio, self.alpha)
        scores, policy = None, random_masking  # no hard patch: random masking (note 4)
        if mask is None and (n_hard > 0 or not self.training):  # eval: scores for the picture
            scores = self.teacher_on(imgs.device).score_patches(imgs, latent)  # (B, L)
        if mask is None and n_hard > 0:
            def policy(noise, mask_ratio):
                return easy_to_hard_mask(scores, mask_ratio, self.alpha, noise)
        return token_masking(imgs, L, self.mask_ratio, mask, keys, policy)[0], scores

    def forward(self, imgs, mask=None, keys=None):
        """imgs (B, 3, H, W) -> dict(loss, loss_rec, loss_pred, pred, target, mask, pred_loss).

        Plus 'scores', the teacher's, when they were drawn.
        """
        teacher_latent = None
        if self.target_kind == 'ema':
            # one teacher pass gives the target and the scores (engine_pretrain.py:train_one_epoch)
            with torch.no_grad():
                teacher_latent = self.teacher_on(imgs.device).forward_features(imgs)  # (B, 1+L, D)
        (ids_keep, mask, ids_restore), scores = self.mask_and_score(imgs, mask, keys,
                                                                    teacher_latent)
        latent = self.forward_encoder(imgs, ids_keep)  # (B, 1+K, D)
        # (B, 1+L, Dd), shared by both decoders, not detached: L_pred trains the encoder too
        x = self.decoder_input(latent, ids_restore)
        pred = self.run_decoder(x, self.decoder_blocks, self.decoder_norm,
                                self.decoder_pred)  # (B, L, P)
        pred_loss = self.predict_loss(x)  # (B, L)
        target = self.target(imgs, teacher_latent)
        per_patch = self.patch_loss(pred, target)  # (B, L) fp32
        loss_rec = masked_mean(per_patch, mask)  # L_rec = official forward_loss: mean of (B, M, P)
        B, L = mask.shape
        n_masked = L - ids_keep.shape[1]  # M
        # (B, M) masked positions, ascending
        ids_masked = torch.argsort(mask.int(), dim=1, stable=True)[:, L - n_masked:]
        predicted = torch.gather(pred_loss, 1, ids_masked)  # (B, M) the predictor's losses
        # (B, M) reconstruction losses, the ranking target; detached: L_pred cannot move them
        actual = torch.gather(per_patch.detach(), 1, ids_masked)
        loss_pred = (ranking_loss(predicted, actual) if self.relative
                     else absolute_loss(predicted, actual))
        # L = L_rec + L_pred, weight 1 (engine_pretrain.py:train_one_epoch)
        out = dict(loss=loss_rec + loss_pred, loss_rec=loss_rec, loss_pred=loss_pred,
                   pred=pred * mask[..., None].to(pred.dtype), target=target, mask=mask,
                   pred_loss=pred_loss)
        if scores is not None:
            out['scores'] = scores
        return out

    # --- targets
    def target(self, imgs, latent=None):
        """Pixels (B, L, p*p*3), or for a feature target the frozen model's features (B, L, C).

        `latent`: the EMA teacher's forward_features(imgs) (B, 1+L, D), when the caller has it.
        """
        if self.target_kind == 'pixel':
            return super().target(imgs)
        with torch.no_grad():
            if self.target_kind == 'ema':
                if latent is None:
                    latent = self.teacher_on(imgs.device).forward_features(imgs)
                return latent[:, 1:].float()  # (B, L, D): normed encoder output, cls dropped
            return self.teacher_on(imgs.device, 'target_model')(imgs).float()  # (B, L, C)

    def patch_loss(self, pred, target):
        """Per-patch loss (B, L) in fp32: MSE on pixels, 2 - 2 cos on features."""
        if self.target_kind == 'pixel':
            return super().patch_loss(pred, target)
        return feature_loss(pred, target)

    def picture(self, imgs, out):
        """input | masked | reconstruction | predicted difficulty (as Fig. S1), uint8 (3, H, W).

        The difficulty is the teacher's. A feature target has no reconstruction to draw.
        """
        scores = out.get('scores')
        if scores is None:
            scores = self.teacher_on(imgs.device).score_patches(imgs)
        p = self.patch_size
        if self.target_kind == 'pixel':
            cols = pixel_columns(imgs, out['pred'], out['mask'], p, self.norm_pix_loss)
        else:  # the input itself as the 'prediction': only the input and masked columns are kept
            cols = pixel_columns(imgs, patchify(imgs.float(), p), out['mask'], p, False)[:2]
        names = pixel_labels(self.norm_pix_loss)[:len(cols)] + ['difficulty']
        return grid_picture(cols + [difficulty_map(scores, imgs, p)], names)


def from_official(obj, teacher=False):
    """Official MAE or HPM checkpoint -> our state dict (the teacher's with teacher=True).

    MAE's files hold {'model'}, HPM's {'state_dict' (module. prefixes), 'ema_state_dict', ...}.
    Keys are the official ones, so this only picks and strips. MAE's encoder-only release files
    have no decoder and cannot continue pre-training.
    """
    sd = strip_prefix(pick_state_dict(obj, teacher=teacher))
    if 'decoder_embed.weight' not in sd:
        raise ValueError('this checkpoint has no decoder (an encoder-only MAE release such as '
                         'mae_pretrain_vit_base.pth); pre-training needs '
                         'mae_pretrain_vit_*_full.pth (norm-pix) or mae_visualize_vit_*.pth (raw '
                         'pixels); finetune.py reads encoder-only files')
    return sd


# ----------------------------------------------------------------------------- feature targets

def quick_gelu(x):
    """CLIP's GELU approximation: x sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


class ClipBlock(nn.Module):
    """CLIP's residual attention block with its key names (ln_1, attn.in_proj_*, mlp.c_fc, ...)."""

    def __init__(self, width, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)  # eps 1e-5 (CLIP), not timm's 1e-6
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(width, 4 * width),
                                      c_proj=nn.Linear(4 * width, width)))

    def forward(self, x):
        """x (B, 1+L, W) -> (B, 1+L, W)."""
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp.c_proj(quick_gelu(self.mlp.c_fc(self.ln_2(x))))


class ClipVisual(nn.Module):
    """OpenAI CLIP's ViT image tower (its key names) as a frozen target: imgs -> (B, L, C)."""

    def __init__(self, img_size=224, patch_size=16, width=768, layers=12, heads=12, out_dim=512):
        super().__init__()
        self.out_dim = out_dim
        self.conv1 = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        L = (img_size // patch_size) ** 2
        self.positional_embedding = nn.Parameter(torch.zeros(1 + L, width))
        self.ln_pre = nn.LayerNorm(width)
        blocks = nn.Sequential(*[ClipBlock(width, heads) for _ in range(layers)])
        self.transformer = nn.ModuleDict(dict(resblocks=blocks))
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, out_dim))

    def forward(self, imgs):
        """imgs (B, 3, H, W) -> patch features (B, L, C), as the official code (note 11).

        engine_pretrain.py:forward_features_clip, not CLIP's encode_image: ln_post and proj on
        every token (CLIP: cls only), cls dropped; ImageNet-normalised input, not CLIP's mean/std.
        """
        x = self.conv1(imgs).flatten(2).transpose(1, 2)  # (B, L, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, W)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)  # (B, 1+L, W)
        x = self.transformer.resblocks(x)  # (B, 1+L, W)
        return (self.ln_post(x) @ self.proj)[:, 1:]  # (B, L, C)


class DinoViT(VisionTransformer):
    """timm ViT (the DINO release's keys) as a frozen target: imgs -> patch tokens (B, L, D)."""

    @property
    def out_dim(self):
        """Feature width D."""
        return self.embed_dim

    def forward(self, imgs):
        """(B, 3, H, W) -> (B, L, D): final norm, cls dropped (as forward_features_dino)."""
        return self.forward_features(imgs)[:, 1:]  # (B, L, D)


def load_target_model(kind, path, img_size, patch_size, head_dim=64):
    """The frozen model of target 'dino' (timm ViT keys) or 'clip' (CLIP image tower) from `path`.

    A whole CLIP state dict gives its `visual.` tower. Heads = width / head_dim: 64 in timm's
    ViT-S/B/L and in CLIP (models_clip.py:CLIP.__init__ assumes so). It sees the student's
    patches: same patch size and resolution.
    """
    if not path:
        raise ValueError(f'--target {kind} reads a frozen {kind} ViT-B/16; give its weights with '
                         f'--teacher-path')
    if os.path.isdir(path):
        raise ValueError(f'--teacher-path {path} is a folder; give the {kind} state-dict file')
    if not os.path.isfile(path):
        raise ValueError(f'--teacher-path {path} does not exist; give the {kind} state-dict file')
    if zipfile.is_zipfile(path) and any(n.endswith('/constants.pkl')
                                        for n in zipfile.ZipFile(path).namelist()):
        raise ValueError(f'--teacher-path {path} is TorchScript (as the CLIP release); save its '
                         f'state dict first: torch.save(torch.jit.load(path, map_location="cpu")'
                         f'.state_dict(), "{kind}.pth")')
    sd = pick_state_dict(load_file(path))
    if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
        raise ValueError(f'--teacher-path {path} holds a {type(sd).__name__}, not a state dict; '
                         f'give the {kind} state-dict file (see --help)')
    sd = strip_prefix(sd)
    if kind == 'clip':
        if any(k.startswith('visual.') for k in sd):  # a whole CLIP model: keep its image tower
            sd = {k[len('visual.'):]: v for k, v in sd.items() if k.startswith('visual.')}
        patch_key, pos_key, block = ('conv1.weight', 'positional_embedding',
                                     'transformer.resblocks.{}.ln_1.weight')
    else:  # a classifier head is no feature (main_pretrain.py:main loads with strict=False)
        sd = {k: v for k, v in sd.items() if not k.startswith('head.')}
        patch_key, pos_key, block = 'patch_embed.proj.weight', 'pos_embed', 'blocks.{}.norm1.weight'
    need = (patch_key, pos_key, 'proj' if kind == 'clip' else 'cls_token')
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f'--teacher-path {path} is not a {kind} ViT state dict: missing '
                         f'{", ".join(missing)}; it holds {key_summary(sd)}')
    D, p = sd[patch_key].shape[0], sd[patch_key].shape[-1]  # conv weight (D, 3, p, p)
    G = round((sd[pos_key].shape[-2] - 1) ** 0.5)  # pos-embed (1+G*G, D), DINO's with a leading 1
    if (p, G * p) != (patch_size, img_size):
        raise ValueError(f'the {kind} model in {path} takes {G * p} px images in {p} px patches; '
                         f'use --res {G * p} and a --model with patch {p}')
    if D % head_dim:
        raise ValueError(f'the {kind} model in {path} is {D} wide, not a multiple of '
                         f'{head_dim}-wide heads')
    depth = 0
    while block.format(depth) in sd:
        depth += 1
    if kind == 'clip':
        model = ClipVisual(img_size, p, D, depth, D // head_dim, sd['proj'].shape[1])
    else:
        model = DinoViT(img_size, p, D, depth, D // head_dim)
    load_model_state(model, sd, f'--teacher-path {path} ({kind})')  # fp16 values load as fp32
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- command line

# The runner's names: for the command line below, and for from_official and load_target_model
# above (checkpoint files).
from common import (MAE_DEFAULTS, MAE_NAMES, file_fingerprint,  # noqa: E402
                    fill_defaults, key_summary, launch, load_file, load_model_state, mae_config,
                    parse_pretrain, pick_state_dict, pretrain_parser, strip_prefix)

DEFAULTS, OFFICIAL_NAMES = MAE_DEFAULTS, MAE_NAMES  # HPM trains with MAE's recipe (note 1)
# its recipe_batch 4096 is also HPM's (HPM supp. Tab. S1; the command in Haochen-Wang409/HPM
# PRETRAIN.md runs 32 x 8 accum x 8 GPUs = 2048)
# The smoke preset (ours, no --data-path): HPM's recipe (MAE at ratio 0.75 on raw pixels, the loss
# predictor and its ranking loss, the EMA teacher, easy-to-hard masking over the run) scaled to about
# 5 minutes on 2 CPU cores: a ViT of 4 blocks, width 96, 8-px patches at 64 px, a 2-block 128-wide
# decoder and loss predictor, 24 epochs of the built-in images, blr 8e-3 (about 50x the recipe's)
SMOKE = dict(model='vit_tiny', patch_size=8, embed_dim=96, depth=4, num_heads=3, res=64,
             batch_size=64, epochs=24, warmup_epochs=1, blr=8e-3, decoder_dim=128,
             decoder_depth=2, decoder_heads=4, log_freq=8, save_freq=8, num_workers=2,
             eval_knn=8)


def get_args(argv=None):
    """Parse the command line and fill the per-method and per-model defaults."""
    p = pretrain_parser('hpm', __doc__, decoder=('dim', 'depth', 'heads'), norm_pix=None,
                        norm_pix_help='standardise each target patch; default off for hpm (the '
                        'author, HPM#4), on for mae (the MAE recipe)')
    a = p.add_argument
    a('--method', choices=('hpm', 'mae'), default='hpm', help='hpm (default) or the MAE baseline')
    a('--learning_loss', '--learning-loss', dest='method', action='store_const', const='hpm',
      help='official HPM flag: the loss predictor (= --method hpm)')
    a('--relative', action=argparse.BooleanOptionalAction, default=True,
      help='relative ranking loss (default, official --relative); --no-relative = the absolute '
           'ablation')
    a('--alpha-start', '--alpha_start', dest='alpha_start', type=float, default=0.0,
      help='easy-to-hard alpha_0 (HPM Alg. S1; the official code hard-wires 0)')
    a('--alpha-end', '--alpha_end', dest='alpha_end', type=float, default=0.5,
      help='easy-to-hard alpha_T, reached at the last epoch (official code: 0.5)')
    a('--target', '--learn_feature_loss', '--learn-feature-loss', dest='target', default='pixel',
      choices=TARGETS, type=lambda s: 'pixel' if s == 'none' else s,
      help='what the decoder predicts: pixel (default), or the patch features of the EMA teacher '
           '(ema), of a DINO (dino) or OpenAI CLIP (clip) ViT-B/16 from --teacher-path (official '
           '--learn_feature_loss; HPM#4)')
    a('--teacher-path', '--clip_path', '--dino_path', dest='teacher_path',
      type=lambda s: None if s == 'none' else s,
      help='frozen model of --target dino (timm ViT state dict: the DINO release) or clip (CLIP '
           'ViT-B/16 state dict, whole or its visual tower; the released .pt is TorchScript: save '
           'torch.jit.load(f).state_dict()); official --dino_path / --clip_path')
    a('--token_size', '--token-size', dest='token_size', type=int,
      help='official mask-generator grid side; derived from --res, checked when given')
    args = parse_pretrain(p, argv, DEFAULTS, SMOKE, OFFICIAL_NAMES, res=224, mask_ratio=0.75,
                          blr=1.5e-4)
    # hpm: raw pixels (note 8) and clipping at 5 (official code, not the paper: note 9); mae: the
    # MAE recipe, which standardises and does not clip
    fill_defaults(args, (f'method({args.method})', dict(norm_pix_loss=args.method == 'mae',
                                                         clip_grad=5.0 if args.method == 'hpm'
                                                         else None)))
    if args.target != 'pixel' and args.method == 'mae':
        p.error(f'--target {args.target} needs --method hpm; the MAE baseline here predicts pixels')
    if args.target != 'pixel' and args.norm_pix_loss:
        p.error(f'--norm-pix-loss standardises pixels; drop it with --target {args.target}')
    if args.teacher_path and args.target not in ('dino', 'clip'):
        p.error(f'--teacher-path is read by --target dino or clip only, not {args.target}; '
                f'drop one of them')
    patch = args.patch_size
    if args.token_size is not None and args.token_size * patch != args.res:
        p.error(f'--token_size {args.token_size} does not match res {args.res} / patch {patch}; '
                f'drop it or use {args.res // patch}')
    return args


def build_model(args):
    """The MAE baseline (common.MaskedAutoencoderViT) or HPM of the resolved arguments."""
    cfg = mae_config(args)
    if args.method == 'mae':
        return MaskedAutoencoderViT(**cfg)
    target_model = None  # none for 'ema', unlike the official code (note 11)
    if args.target in ('dino', 'clip'):
        target_model = load_target_model(args.target, args.teacher_path, args.res,
                                         cfg['patch_size'])
        args.teacher_content = file_fingerprint(args.teacher_path)  # a resume needs this file
    return HPM(**cfg, epochs=args.epochs, alpha_start=args.alpha_start, alpha_end=args.alpha_end,
               relative=args.relative, target=args.target, target_model=target_model)


def main(argv=None):
    """Pre-train HPM or MAE (the module docstring); a user error prints `error: …` and exits 2."""
    return launch(argv, get_args, build_model, from_official=from_official)


if __name__ == '__main__':
    main()
