"""Shared parts of mimkit: the models every method builds on, then the runner that trains them.

The model half needs only torch and einops (torchvision for a picture's grid): transformer layers
-> ViT -> Swin -> HOG -> masking -> pictures (what the models draw) -> the MAE baseline. Nothing in
it uses the runner, so a copier who needs only a model can stop at the banner "the runner". The
runner half: checkpoints and key maps -> data -> pictures on disk -> command line -> distributed
and the entry -> the loop's parts -> the method <-> loop contract and the train loop ->
benchmarks."""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# timm's model families (vit_base = vit_base_patch16_224); method files add decoders and recipes.
VIT_PRESETS = {
    'vit_tiny': dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    'vit_small': dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    'vit_base': dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    'vit_large': dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    'vit_huge': dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}
SWIN_PRESETS = {
    'swin_tiny': dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    'swin_base': dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    'swin_large': dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
}


# --------------------------------------------------------------------- transformer layers

def drop_path(x, p, training):
    """Stochastic depth: zero whole samples of a residual branch with probability p, rescale."""
    if p == 0.0 or not training:
        return x
    keep = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device, dtype=x.dtype) >= p
    return x * keep / (1 - p)


class Attention(nn.Module):
    """Multi-head self-attention, fused qkv projection, through F.scaled_dot_product_attention."""

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'width {dim} is not divisible by {num_heads} heads; use a head count '
                             f'that divides it')
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None):
        """x (B, L, D) -> (B, L, D); attn_mask, added to the logits, broadcasts to (B, nH, L, L)."""
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, D // self.num_heads)  # (B, L, 3, nH, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, nH, L, d)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, nH, L, d)
        return self.proj(x.transpose(1, 2).reshape(B, L, D))  # (B, L, D)


class Mlp(nn.Module):
    """Two linear layers with an exact (erf) GELU between them."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        """x (..., D) -> (..., D)."""
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (timm key names: norm1, attn, norm2, mlp)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0, eps=1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x, attn_mask=None):
        """x (B, L, D) -> (B, L, D)."""
        x = x + drop_path(self.attn(self.norm1(x), attn_mask), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


def init_weights(module):
    """MAE init: xavier-uniform Linear with zero bias, LayerNorm (1, 0)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def check_divisible(res, size, what, hint=None):
    """Raise a ValueError that says what to change when `size` does not divide `res`."""
    if res % size:
        lo, hi = res // size * size, (res // size + 1) * size
        near = hi if (hi - res) < (res - lo) or lo == 0 else lo
        raise ValueError(f'res {res} is not divisible by {what} {size}; use a multiple of {size} '
                         f'such as {near}' + (f' ({hint})' if hint else ''))


def check_ratio(value, what, lo=0.0, hi=1.0):
    """Raise a ValueError unless lo <= value < hi."""
    if not lo <= value < hi:
        raise ValueError(f'{what} {value} is out of range; use a value in [{lo}, {hi})')


# --------------------------------------------------------------------- ViT

def sincos_pos_embed(dim, grid_h, grid_w=None, cls_token=True):
    """Fixed 2-D sin-cos table (1+G*G or G*G, D), cls row 0: the first D/2 channels encode the
    column, the others the row (facebookresearch/mae util/pos_embed.py:get_2d_sincos_pos_embed)."""
    assert dim % 4 == 0, 'sin-cos embedding needs a width divisible by 4'
    grid_w = grid_w or grid_h
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (D/4,)
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing='ij')

    def half(pos):
        """Positions (G*G,) -> (G*G, D/2): [sin(pos * omega), cos(pos * omega)]."""
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)
    table = torch.cat([half(cols), half(rows)], dim=1)  # (G*G, D)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=torch.float64), table], dim=0)  # (1+G*G, D)
    return table.float()


class PatchEmbed(nn.Module):
    """Conv patch embedding: (B, 3, H, W) -> (B, L, D), tokens in raster order."""

    def __init__(self, patch_size, embed_dim, in_chans=3):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        """x (B, 3, H, W) -> (B, H/p * W/p, D)."""
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, L, D)


class VisionTransformer(nn.Module):
    """ViT, timm/MAE keys, sin-cos pos-embed (frozen unless learnable_pos), on all or kept tokens;
    global_pool 'token' (cls after `norm`), 'avg' (patch mean -> `fc_norm`) or '' (no head)."""

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, drop_path=0.0, global_pool='', num_classes=0, learnable_pos=False):
        super().__init__()
        check_divisible(img_size, patch_size, 'patch')
        self.patch_size, self.embed_dim, self.global_pool = patch_size, embed_dim, global_pool
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.grid = img_size // patch_size
        self.pos_embed = nn.Parameter(sincos_pos_embed(embed_dim, self.grid)[None],
                                      requires_grad=learnable_pos)
        dpr = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # linear in depth (timm)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, dpr[i])
                                     for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6) if global_pool != 'avg' else nn.Identity()
        if global_pool == 'avg':
            self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        if num_classes:
            self.head = nn.Linear(embed_dim, num_classes)
        self.apply(init_weights)
        w = self.patch_embed.proj.weight  # xavier on the (D, 3*p*p) view, bias at its default (MAE)
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)

    def set_resolution(self, img_size):
        """Recompute the frozen sin-cos table for a new input size (FastMIM-P)."""
        check_divisible(img_size, self.patch_size, 'patch')
        self.grid = img_size // self.patch_size
        assert not self.pos_embed.requires_grad, (
            'resize a learnable pos-embed with resize_pos_embed instead')
        self.pos_embed.data = (sincos_pos_embed(self.embed_dim, self.grid)[None]
                               .to(self.pos_embed.device))

    def embed(self, imgs, ids_keep=None):
        """imgs (B, 3, H, W) -> tokens with pos-embed (B, 1+K, D), only those in ids_keep (B, K)."""
        x = self.patch_embed(imgs)  # (B, L, D)
        assert x.shape[1] == self.pos_embed.shape[1] - 1, (
            f'input has {x.shape[1]} patches but the pos-embed has {self.pos_embed.shape[1] - 1}; '
            f'image size {imgs.shape[-1]} differs from the model size '
            f'{self.grid * self.patch_size}')
        x = x + self.pos_embed[:, 1:]
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))  # (B, K, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # (B, 1, D)
        return torch.cat([cls, x], dim=1)  # (B, 1+K, D)

    def forward_features(self, imgs, ids_keep=None):
        """imgs (B, 3, H, W) -> tokens after the final norm (B, 1+K, D) (all L, or the kept K)."""
        x = self.embed(imgs, ids_keep)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def encoder_features(self, imgs):
        """imgs (B, 3, H, W), all tokens -> (cls after the final norm, patch mean through an
        affine-free LayerNorm), each (B, D): finetune.py's k-NN features --pool cls and avg."""
        x = self.embed(imgs)  # (B, 1+L, D)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0], F.layer_norm(x[:, 1:].mean(1), (x.shape[-1],), eps=1e-6)

    def forward(self, imgs):
        """imgs (B, 3, H, W) -> logits (B, classes), or the pooled features when there's no head."""
        x = self.forward_features(imgs)
        x = self.fc_norm(x[:, 1:].mean(1)) if self.global_pool == 'avg' else x[:, 0]
        return self.head(x) if hasattr(self, 'head') else x


# --------------------------------------------------------------------- Swin
def window_partition(x, w):
    """(B, H, W, C) -> (B*nW, w*w, C), windows in raster order."""
    B, H, W, C = x.shape
    x = x.view(B, H // w, w, W // w, w, C).permute(0, 1, 3, 2, 4, 5)  # (B, H/w, W/w, w, w, C)
    return x.reshape(-1, w * w, C)  # (B*nW, w*w, C)


def window_reverse(windows, w, H, W):
    """(B*nW, w*w, C) -> (B, H/w, w, W/w, w, C) -> (B, H, W, C); inverse of window_partition."""
    C = windows.shape[-1]
    x = windows.view(-1, H // w, W // w, w, w, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def relative_position_index(w):
    """(w*w, w*w) index into the ((2w-1)^2, nH) table, (dy+w-1)(2w-1) + dx+w-1 (Swin Sec. 3.2)."""
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w),
                                        indexing='ij')).flatten(1)  # (2, w*w)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N): query minus key
    return (rel[0] + w - 1) * (2 * w - 1) + rel[1] + w - 1


def shifted_window_mask(H, W, w, shift):
    """(nW, w*w, w*w) additive mask, -100 between tokens from different pre-shift regions."""
    region = torch.zeros(1, H, W, 1)
    n = 0
    for hs in (slice(0, -w), slice(-w, -shift), slice(-shift, None)):
        for ws in (slice(0, -w), slice(-w, -shift), slice(-shift, None)):
            region[:, hs, ws] = n
            n += 1
    r = window_partition(region, w).squeeze(-1)  # (nW, N)
    return (r[:, None, :] != r[:, :, None]).float() * -100.0  # (nW, N, N)


def resize_rel_pos_table(table, new_side, mode='bicubic', num_heads=None):
    """Resize a relative-position table ((2w-1)^2, nH) -> (new_side^2, nH): 'bicubic' (FastMIM's
    `interpolate`; timm layers/pos_embed_rel.py:resize_rel_pos_bias_table_simple) or 'geometric',
    BEiT's stretched offsets, piecewise-linear (FastMIM's `simmim`; remap_pretrained_keys_swin in
    microsoft/SimMIM utils.py and ggjy/FastMIM.pytorch util/pos_embed.py), torch only."""
    if table.dim() != 2:
        raise ValueError(f'a relative-position table is 2-D ((2w-1)^2, heads), got shape '
                         f'{tuple(table.shape)}')
    L, nH = table.shape
    side = math.isqrt(L)
    if side * side != L or side % 2 == 0:
        raise ValueError(f'a relative-position table has (2w-1)^2 rows, got {L}; is this the right '
                         f'tensor?')
    if num_heads is not None and num_heads != nH:
        raise ValueError(f'the table has {nH} heads but the model has {num_heads}; a head count '
                         f'cannot be resized')
    if not isinstance(new_side, int) or new_side < 1 or new_side % 2 == 0:
        raise ValueError(f'new side must be 2w-1 for a window w >= 1 (odd), got {new_side!r}')
    if new_side == side:
        return table.clone()
    grid = table.float().t().reshape(1, nH, side, side)  # (1, nH, S, S): rows dy, columns dx
    if mode == 'bicubic':
        out = F.interpolate(grid, size=(new_side, new_side), mode='bicubic',
                            align_corners=False)  # (1, nH, S', S')
    elif mode == 'geometric':
        targets = torch.arange(new_side, dtype=torch.float64) - new_side // 2  # offsets -t..t
        Wm = linear_weights(geometric_offsets(side, new_side), targets).to(grid)  # (S', S)
        out = torch.einsum('ia,nhab,jb->nhij', Wm, grid, Wm)  # (1, nH, S', S')
    else:
        raise ValueError(f"unknown table resize mode {mode!r}; use 'bicubic' or 'geometric'")
    return out.reshape(nH, new_side * new_side).t().contiguous().to(table.dtype)  # (S'*S', nH)


def geometric_offsets(src, dst):
    """BEiT/SimMIM source offsets (src,): 0, ±1, ±(1+q), …, q by bisection so the last is dst//2."""
    k, reach = src // 2, dst // 2
    lo, hi = 0.5, 2.0  # FastMIM's bracket; BEiT, SimMIM and timm search 1.01-1.5 (q <= 1.5)
    while hi - lo > 1e-6:
        q = (lo + hi) / 2
        if sum(q ** i for i in range(k)) > reach:
            hi = q
        else:
            lo = q
    pos = [sum(q ** i for i in range(n + 1)) for n in range(k)]  # 1, 1+q, 1+q+q^2, …
    return torch.tensor([-p for p in reversed(pos)] + [0.0] + pos, dtype=torch.float64)


def linear_weights(nodes, targets):
    """(len(targets), len(nodes)) piecewise-linear weights; targets past an end take its value."""
    right = torch.searchsorted(nodes, targets).clamp(1, len(nodes) - 1)  # (T,) next node index
    x0, x1 = nodes[right - 1], nodes[right]
    a = ((targets - x0) / (x1 - x0)).clamp(0.0, 1.0)  # clamp: nearest-value extrapolation
    W = torch.zeros(len(targets), len(nodes), dtype=nodes.dtype)
    rows = torch.arange(len(targets))
    W[rows, right - 1] = 1.0 - a
    W[rows, right] = a
    return W  # (T, S)


class WindowAttention(nn.Module):
    """Window self-attention with a learned relative-position bias, through SDPA."""

    def __init__(self, dim, window, num_heads):
        super().__init__()
        self.num_heads, self.window = num_heads, window
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer('relative_position_index', relative_position_index(window))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def bias(self):
        """The relative-position bias (nH, N, N) gathered from the table."""
        N = self.window ** 2
        return (self.relative_position_bias_table[self.relative_position_index.view(-1)]
                .view(N, N, -1).permute(2, 0, 1))  # (nH, N, N)

    def forward(self, x, mask=None):
        """x (B*nW, N, C), mask (nW, N, N) or None -> (B*nW, N, C)."""
        BW, N, C = x.shape
        qkv = (self.qkv(x).view(BW, N, 3, self.num_heads, C // self.num_heads)
               .permute(2, 0, 3, 1, 4))  # 3 x (BW, nH, N, d)
        bias = self.bias().to(x.dtype)  # (nH, N, N)
        if mask is None:
            out = F.scaled_dot_product_attention(*qkv, attn_mask=bias)  # (BW, nH, N, d)
        else:  # windows x heads as one head axis: 4-D for the fused kernels (they refuse 5-D),
            # and the mask (nW*nH, N, N) broadcasts over the batch instead of being copied B times
            nW, nH = mask.shape[0], self.num_heads
            q, k, v = (t.reshape(BW // nW, nW * nH, N, -1) for t in qkv)  # (B, nW*nH, N, d)
            bias = (mask[:, None].to(x.dtype) + bias).reshape(nW * nH, N, N)  # (nW*nH, N, N)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, nW*nH, N, d)
        return self.proj(out.reshape(BW, self.num_heads, N, -1).transpose(1, 2).reshape(BW, N, C))


class SwinBlock(nn.Module):
    """Swin block: (shifted) window attention + MLP, pre-norm; `attn_mask` only when shifted."""

    def __init__(self, dim, num_heads, window, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)  # eps 1e-5 everywhere in Swin
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path
        self.register_buffer('attn_mask', None)

    def configure(self, grid, window, shift):
        """Set grid, window and shift; rebuild index and mask; a new window gets a resized bias
        table as a new Parameter (resize_optimizer_state hands it the old one's AdamW state)."""
        self.grid, self.shift = grid, shift
        attn, dev = self.attn, self.attn.relative_position_bias_table.device
        if window != attn.window:
            # a new Parameter, not `.data =`: autograd and DDP's hooks keep the old one's shape;
            # row-major strides even with one head, as its gradient and DDP's bucket view have
            old = attn.relative_position_bias_table
            table = resize_rel_pos_table(old.detach(), 2 * window - 1)  # ((2w-1)^2, nH)
            attn.relative_position_bias_table = nn.Parameter(
                table.clone(memory_format=torch.contiguous_format), requires_grad=old.requires_grad)
            attn.window = window
            attn.relative_position_index = relative_position_index(window).to(dev)
        self.attn_mask = shifted_window_mask(grid, grid, window, shift).to(dev) if shift else None

    def forward(self, x):
        """x (B, G*G, C) -> (B, G*G, C)."""
        B, L, C = x.shape
        G, w, s = self.grid, self.attn.window, self.shift
        h = self.norm1(x).view(B, G, G, C)
        if s:  # cyclic shift (Swin Sec. 3.2)
            h = torch.roll(h, (-s, -s), dims=(1, 2))
        h = window_reverse(self.attn(window_partition(h, w), self.attn_mask),
                           w, G, G)  # (B, G, G, C)
        if s:
            h = torch.roll(h, (s, s), dims=(1, 2))
        x = x + drop_path(h.reshape(B, L, C), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated in `offsets` (row, column) order, Swin's TL, BL, TR, BR ->
    LayerNorm(4C) -> Linear(4C, 2C): (B, G*G, C) -> (B, G*G/4, 2C)."""

    offsets = ((0, 0), (1, 0), (0, 1), (1, 1))

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x, G):
        """x (B, G*G, C) -> (B, G*G/4, 2C)."""
        B, L, C = x.shape
        x = x.view(B, G, G, C)
        x = torch.cat([x[:, dy::2, dx::2] for dy, dx in self.offsets], dim=-1)  # (B, G/2, G/2, 4C)
        return self.reduction(self.norm(x.view(B, -1, 4 * C)))


class SwinStage(nn.Module):
    """One stage: its blocks, then (except in the last stage) a PatchMerging `downsample`."""

    def __init__(self, dim, depth, num_heads, window, mlp_ratio, dpr, downsample):
        super().__init__()
        self.blocks = nn.ModuleList([SwinBlock(dim, num_heads, window, mlp_ratio, dpr[i])
                                     for i in range(depth)])
        self.downsample = PatchMerging(dim) if downsample else None


class SwinPatchEmbed(nn.Module):
    """Conv(4x4, stride 4) + LayerNorm: (B, 3, H, W) -> (B, H/4 * W/4, C)."""

    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        """(B, 3, H, W) -> (B, L, C)."""
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class SwinTransformer(nn.Module):
    """Swin-v1 (Liu et al. 2021) with the keys of microsoft/Swin-Transformer
    models/swin_transformer.py; as in its SwinTransformerBlock, a stage whose grid is not larger
    than the window uses window = grid and no shift."""

    def __init__(self, img_size=224, patch_size=4, embed_dim=96, depths=(2, 2, 6, 2),
                 num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4.0, drop_path=0.0,
                 num_classes=0):
        super().__init__()
        self.patch_size, self.depths = patch_size, tuple(depths)
        self.patch_embed = SwinPatchEmbed(patch_size, embed_dim)
        dpr = [drop_path * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]  # linear
        self.layers = nn.ModuleList([
            SwinStage(embed_dim * 2 ** s, depths[s], num_heads[s], window_size, mlp_ratio,
                      dpr[sum(depths[:s]):sum(depths[:s + 1])], s < len(depths) - 1)
            for s in range(len(depths))])
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else None
        for m in self.modules():  # Swin init: trunc-normal Linear, zero bias, LayerNorm (1, 0)
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.set_resolution(img_size, window_size)
        for m in self.modules():  # the official code draws tables at the clamped window size
            if isinstance(m, WindowAttention):
                nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)

    def set_resolution(self, img_size, window_size):
        """(Re)configure every stage for an input size and window; a resized table is a new
        Parameter."""
        stride = self.patch_size * 2 ** (len(self.depths) - 1)
        check_divisible(img_size, stride, 'the Swin output stride',
                        f'patch {self.patch_size} x {len(self.depths) - 1} patch merges')
        self.img_size, self.window_size = img_size, window_size
        for s, stage in enumerate(self.layers):
            G = img_size // self.patch_size // 2 ** s
            w, shift = (G, 0) if G <= window_size else (window_size, window_size // 2)  # clamp
            if G % w:
                good = [v for v in range(2, window_size + 1) if all(
                    (img_size // self.patch_size // 2 ** t) % v == 0
                    or img_size // self.patch_size // 2 ** t <= v
                    for t in range(len(self.depths)))]
                raise ValueError(f'window {window_size} does not divide stage grid {G} at res '
                                 f'{img_size}; use --window-size {good[-1] if good else 1}')
            for b, blk in enumerate(stage.blocks):
                blk.configure(G, w, shift if b % 2 else 0)

    def forward_features(self, imgs, stages=False, final_norm=True):
        """imgs (B, 3, H, W) -> final tokens after `norm` (B, L, C); stages=True also returns each
        stage's output before its downsample, [(B, G_s*G_s, C_s)]; final_norm=False skips `norm`."""
        if imgs.shape[-1] != self.img_size or imgs.shape[-2] != self.img_size:
            raise ValueError(f'input {tuple(imgs.shape[-2:])} differs from the model size '
                             f'{self.img_size}; call set_resolution first')
        x = self.patch_embed(imgs)  # (B, L, C)
        outs = []
        for s, stage in enumerate(self.layers):
            for blk in stage.blocks:
                x = blk(x)
            outs.append(x)
            if stage.downsample is not None:
                x = stage.downsample(x, self.img_size // self.patch_size // 2 ** s)
        if final_norm:
            x = self.norm(x)
        return (x, outs) if stages else x

    def forward(self, imgs):
        """Classification: the normed final tokens, average-pooled -> head (or pooled features)."""
        x = self.forward_features(imgs).mean(1)  # (B, C)
        return self.head(x) if self.head is not None else x


# --------------------------------------------------------------------- HOG

def autocast_off(device):
    """A context that turns autocast off on `device` (targets such as HOG are computed in fp32)."""
    if device.type in ('cpu', 'cuda'):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()  # e.g. 'meta', where FLOPs are counted


def sobel_kernel(device=None):
    """The 3x3 Sobel kernel of gx = left - right (its transpose: gy = top - bottom)."""
    return torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], device=device)


def sobel(imgs):
    """Per-colour gradients imgs (B, C, H, W) -> gx, gy (B, C, H, W), fp32: reflect pad, 3x3 Sobel
    cross-correlation (gx = left - right, gy = top - bottom), as MaskFeat, FastMIM, LocalMIM.
    The conv calls of ggjy/FastMIM.pytorch util/hog_layer.py:HOGLayerC.forward: one grouped conv
    per direction, weight (C, 1, 3, 3). Another call (one (2C, 1, 3, 3) conv, or LocalMIM's one
    colour at a time) may round a gradient that is 0 in exact arithmetic to +-1 ulp, which moves
    the pixel between bins 0 and nbins-1 (an axis-aligned edge); the same call rounds alike."""
    with torch.no_grad(), autocast_off(imgs.device):
        x = F.pad(imgs.float(), (1, 1, 1, 1), mode='reflect')  # (B, C, H+2, W+2)
        C = x.shape[1]
        kx = sobel_kernel(x.device)  # (3, 3)
        weight_x = kx.view(1, 1, 3, 3).repeat(C, 1, 1, 1)  # (C, 1, 3, 3)
        weight_y = weight_x.transpose(2, 3)  # (C, 1, 3, 3), a transposed view as official
        return F.conv2d(x, weight_x, groups=C), F.conv2d(x, weight_y, groups=C)


def hog_from_gradients(gx, gy, nbins=9, cell=8, pool='sum', normalize=True):
    """HOG: gx, gy (B, C, H, W) -> (B, C*nbins, H/cell, W/cell), channel colour*nbins + bin, fp32;
    hard bins of unsigned atan2(gx, gy) (FastMIM, LocalMIM, mmpretrain), per-cell sum, L2 norm.
    Each pixel's magnitude is added straight into its cell's bin, without the (B, C, nbins, H, W)
    per-pixel histogram of the official layers (nbins x the image's memory)."""
    with torch.no_grad(), autocast_off(gx.device):
        Hc, Wc = gx.shape[-2] // cell, gx.shape[-1] // cell  # whole cells only, as a pool
        gx, gy = gx[..., :Hc * cell, :Wc * cell], gy[..., :Hc * cell, :Wc * cell]
        B, C, H, W = gx.shape
        mag = torch.sqrt(gx * gx + gy * gy).flatten(2)  # (B, C, H*W)
        # the bin by atan2, / pi, * nbins, floor in this order, as the official layers
        # (another order, e.g. * (nbins / pi), moves pixels whose angle is on a bin edge)
        bins = torch.atan2(gx, gy).div_(math.pi).mul_(nbins).floor_().long().remainder_(nbins)
        rows = torch.arange(H, device=gx.device) // cell  # (H,) cell row of each pixel row
        cols = torch.arange(W, device=gx.device) // cell  # (W,)
        cell_id = (rows[:, None] * Wc + cols[None]).flatten()  # (H*W,) raster cell of each pixel
        index = bins.flatten(2).mul_(Hc * Wc).add_(cell_id)  # (B, C, H*W): bin * Hc*Wc + cell
        # CPU adds in raster order; CUDA in no fixed order (atomics) unless
        # torch.use_deterministic_algorithms(True): fp32 round-off of the sums, run to run
        hist = mag.new_zeros(B, C, nbins * Hc * Wc).scatter_add_(2, index, mag)
        hist = hist.view(B, C, nbins, Hc, Wc)  # (B, C, nbins, Hc, Wc)
        if pool == 'mean':
            hist = hist / (cell * cell)
        if normalize:  # per colour and cell, over the bins
            hist = F.normalize(hist, dim=2)
        return hist.flatten(1, 2)  # (B, C*nbins, H/cell, W/cell)


def hog(imgs, nbins=9, cell=8, pool='sum', normalize=True):
    """Per-colour HOG: imgs (B, C, H, W) -> (B, C*nbins, H/cell, W/cell), fp32, no grad."""
    return hog_from_gradients(*sobel(imgs), nbins, cell, pool, normalize)


# --------------------------------------------------------------------- masking

def key_noise(key, n):
    """U[0,1) noise (n,) of one sample from a CPU generator seeded by its int64 key alone."""
    g = torch.Generator()
    g.manual_seed((int(key) * 0x9E3779B97F4A7C15 + 1) % (1 << 63))
    return torch.rand(n, generator=g)


def sample_noise(B, n, device, keys=None):
    """U[0,1) noise (B, n): row i = key_noise(keys[i], n), else one torch.rand. `keys` may also be
    those rows already drawn, (B, n) float: the data workers draw them (KeyedDataset.noise_len)."""
    if keys is None:
        return torch.rand(B, n, device=device)
    if keys.is_floating_point():
        assert keys.shape == (B, n), f'noise rows {tuple(keys.shape)} for a ({B}, {n}) mask'
        return keys.to(device, non_blocking=True)
    # one generator per sample, so the mask depends on the sample only
    return torch.stack([key_noise(k, n) for k in keys.tolist()]).to(device, non_blocking=True)


def random_masking(noise, mask_ratio):
    """MAE masking: of noise (B, L) the int(L(1-r)) smallest kept -> ids_keep, mask, ids_restore."""
    B, L = noise.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)  # (B, L) ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, L)
    mask = torch.arange(L, device=noise.device)[None].expand(B, L) >= len_keep  # (B, L) shuffled
    return ids_shuffle[:, :len_keep], torch.gather(mask, 1, ids_restore), ids_restore


def ids_from_mask(mask):
    """A bool mask (B, L), True = masked -> (ids_keep, mask, ids_restore), kept ids ascending."""
    counts = mask.sum(1)
    if (counts != counts[0]).any():
        raise ValueError(f'every row of the mask needs the same masked count, got '
                         f'{counts.tolist()}')
    ids_shuffle = torch.argsort(mask.int(), dim=1, stable=True)  # (B, L): visible, then masked
    len_keep = mask.shape[1] - int(counts[0])
    return ids_shuffle[:, :len_keep], mask, torch.argsort(ids_shuffle, dim=1)


def token_masking(imgs, L, mask_ratio, mask=None, keys=None, policy=random_masking):
    """MAE-family masking of L tokens -> (ids_keep, mask, ids_restore), noise (B, L).

    A given (B, L) bool mask (True = masked) is used as it is (noise None); else noise from the
    sample keys (sample_noise) and `policy(noise, mask_ratio)`: MAE's random_masking, or a policy
    that ranks the same noise otherwise (HPM's easy-to-hard mask).
    """
    if mask is not None:
        return ids_from_mask(mask.to(imgs.device)), None
    noise = sample_noise(imgs.shape[0], L, imgs.device, keys)  # (B, L)
    return policy(noise, mask_ratio), noise


def upsample_mask(mask, factor):
    """Nearest upsampling of a grid mask (B, g, g) -> (B, g*factor, g*factor)."""
    return mask.repeat_interleave(factor, 1).repeat_interleave(factor, 2)


# --------------------------------------------------------------------- what the models draw

# The mean and std the run's images are normalised with: ImageNet's, a named set's or --mean/--std
# (args.mean/std, DATASETS); train() sets them for the run (use_normalization), so that the
# pictures undo the normalisation the data had (a model's loss never reads them: MFF takes its own).
NORMALIZATION = [IMAGENET_MEAN, IMAGENET_STD]


def data_mean_std(device=None):
    """The run's per-colour mean and std (NORMALIZATION), each (1, 3, 1, 1) fp32."""
    return tuple(torch.tensor(v, device=device, dtype=torch.float32).view(1, 3, 1, 1)
                 for v in NORMALIZATION)


def use_normalization(mean, std):
    """Make (mean, std) the run's normalisation (data_mean_std, denormalize) -> a function that
    restores the previous one."""
    before = NORMALIZATION[:]
    NORMALIZATION[:] = [tuple(mean), tuple(std)]
    return lambda: NORMALIZATION.__setitem__(slice(None), before)


def denormalize(imgs):
    """Normalised (B, 3, H, W) (the run's mean and std, data_mean_std) -> [0, 1]."""
    mean, std = data_mean_std(imgs.device)  # (1, 3, 1, 1) each
    return (imgs.float() * std + mean).clamp(0, 1)


def grid_picture(columns, labels=None, gray=0.5):
    """Columns of (B, 3, H, W) images in [0, 1] -> one uint8 (3, H', W') grid, a row per image,
    under a strip that names each column (`labels`)."""
    from torchvision.utils import make_grid
    cols = [c.float().cpu().clamp(0, 1) for c in columns]
    stack = torch.stack(cols, dim=1).flatten(0, 1)  # (B*K, 3, H, W) image-major: a row per image
    if stack.shape[-2] < 128:  # small images are enlarged (nearest) so a person can read them
        stack = F.interpolate(stack, scale_factor=math.ceil(128 / stack.shape[-2]), mode='nearest')
    grid = (make_grid(stack, nrow=len(cols), padding=2, pad_value=gray) * 255).round()
    grid = grid.to(torch.uint8)  # (3, H', W')
    if not labels:
        return grid
    from PIL import Image, ImageDraw
    assert len(labels) == len(cols), (labels, len(cols))
    strip = Image.new('RGB', (grid.shape[-1], 14), (0, 0, 0))
    draw = ImageDraw.Draw(strip)
    width = stack.shape[-1] + 2  # one column and its padding
    for k, text in enumerate(labels):
        draw.text((k * width + 4, 1), text, fill=(255, 255, 255))
    strip = torch.frombuffer(bytearray(strip.tobytes()), dtype=torch.uint8)
    strip = strip.view(14, grid.shape[-1], 3).permute(2, 0, 1)  # (3, 14, W')
    return torch.cat([strip, grid], dim=1)  # (3, 14 + H', W')


# --visualize --raw-prediction: pixel_columns also draws a norm-pix prediction as it is predicted
RAW_PREDICTION = [False]


def pixel_columns(imgs, pred, mask, p, norm_pix_loss):
    """pixel_picture's columns [input, masked, prediction], (B, 3, H, W) in [0, 1] each, and
    [raw prediction] after them when the target is norm-pix and RAW_PREDICTION is on."""
    target = patchify(imgs.float(), p)
    pred = raw = pred.float()
    if norm_pix_loss:  # undo the per-patch standardisation with the true statistics (MAE demo)
        pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    m = mask[..., None].float()
    H, W = imgs.shape[-2:]
    masked = unpatchify(target * (1 - m), p, H, W)
    recon = unpatchify(target * (1 - m) + pred * m, p, H, W)
    masked = torch.where(unpatchify(m.expand_as(target), p, H, W) > 0,
                         torch.zeros_like(masked) - 10, masked)
    columns = [denormalize(imgs), denormalize(masked), denormalize(recon)]
    if norm_pix_loss and RAW_PREDICTION[0]:  # the standardised patches drawn as pixels
        columns.append(denormalize(unpatchify(target * (1 - m) + raw * m, p, H, W)))
    return columns


def pixel_labels(norm_pix_loss):
    """The names of pixel_columns' columns: a norm-pix prediction says that it borrows each
    masked patch's mean and std from the target."""
    names = ['input', 'masked', 'pred + target mean/std' if norm_pix_loss else 'prediction']
    return names + (['raw prediction'] if norm_pix_loss and RAW_PREDICTION[0] else [])


def pixel_picture(imgs, pred, mask, p, norm_pix_loss):
    """input | masked | prediction of a pixel-predicting ViT (pred (B, L, p*p*3), mask (B, L))."""
    return grid_picture(pixel_columns(imgs, pred, mask, p, norm_pix_loss),
                        pixel_labels(norm_pix_loss))


def hot_colours(v):
    """[0, 1] values (B, 1, H, W) -> 'hot' colours (B, 3, H, W): black, red, yellow, white."""
    return torch.cat([3 * v, 3 * v - 1, 3 * v - 2], dim=1).clamp(0, 1)


def hog_glyphs(h, nbins, cell=8, size=None):
    """HOG (B, C*nbins, Hc, Wc) -> glyphs (B, 3, Hc*size, Wc*size) in [0, 1], a line per bin."""
    size = size or cell
    B, _, Hc, Wc = h.shape
    mag = h.float().view(B, -1, nbins, Hc, Wc).sum(1)  # (B, nbins, Hc, Wc)
    mag = mag / mag.flatten(1).amax(1).clamp(min=1e-12).view(B, 1, 1, 1)
    theta = (torch.arange(nbins, device=h.device) + 0.5) * math.pi / nbins  # atan2(gx, gy) bins
    c = torch.arange(size, device=h.device, dtype=torch.float32) - (size - 1) / 2
    yy, xx = torch.meshgrid(c, c, indexing='ij')
    # distance to each bin's edge line, then a round stencil: (nbins, size, size)
    dist = (xx[None] * theta.sin()[:, None, None] + yy[None] * theta.cos()[:, None, None]).abs()
    stencil = (1 - dist).clamp(0, 1) * ((xx ** 2 + yy ** 2) <= (size / 2) ** 2)
    img = (torch.einsum('bkij,kyx->biyjx', mag, stencil)
           .reshape(B, 1, Hc * size, Wc * size))  # (B, 1, H, W)
    return img.clamp(0, 1).expand(-1, 3, -1, -1)


# --------------------------------------------------------------------- MAE baseline

def patchify(imgs, p):
    """imgs (B, 3, H, W) -> (B, L, p*p*3), per patch ordered (pixel row, pixel col, channel)."""
    return rearrange(imgs, 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)', p1=p, p2=p)


def unpatchify(x, p, H, W=None):
    """(B, L, p*p*3) -> imgs (B, 3, H, W); inverse of patchify."""
    return rearrange(x, 'b (h w) (p1 p2 c) -> b c (h p1) (w p2)', h=H // p, w=(W or H) // p,
                     p1=p, p2=p)


def norm_pix(target, eps=1e-6):
    """Standardise each patch (B, L, P) by its mean and unbiased variance (MAE --norm_pix_loss)."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)  # unbiased, as MAE's torch.var default
    return (target - mean) / (var + eps) ** 0.5


def masked_mean(per_token_loss, mask):
    """Mean of (B, L) per-token losses over the masked tokens of the whole batch."""
    mask = mask.to(per_token_loss.dtype)
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1)


def fill_masked(x, mask_token, ids_restore):
    """[cls, kept] (B, 1+K, D) + mask_token (1, 1, D) -> MAE's decoder input (B, 1+L, D), raster."""
    B, L = ids_restore.shape
    x_ = torch.cat([x[:, 1:], mask_token.expand(B, L + 1 - x.shape[1], -1)], dim=1)  # (B, L, D)
    x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))  # (B, L, D)
    return torch.cat([x[:, :1], x_], dim=1)  # (B, 1+L, D)


class MaskedAutoencoderViT(VisionTransformer):
    """MAE (He et al. 2022, keys of facebookresearch/mae models_mae.py): ViT encoder on the kept
    tokens, light decoder, per-patch pixel loss. MFF replaces `forward_encoder`,
    Efficient MAE decodes part of `decoder_input`, HPM runs a second `run_decoder` on it."""

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0,
                 norm_pix_loss=True, mask_ratio=0.75, drop_path=0.0):
        super().__init__(img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, drop_path)
        check_ratio(mask_ratio, 'mask ratio')
        if decoder_embed_dim % decoder_num_heads or decoder_embed_dim % 4:
            raise ValueError(f'--decoder-dim {decoder_embed_dim} must be divisible by '
                             f'--decoder-heads {decoder_num_heads} and by 4 (sin-cos table)')
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(decoder_embed_dim, self.grid)[None],
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(decoder_embed_dim, decoder_num_heads, mlp_ratio)
                                             for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * 3)
        for m in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            m.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def masking(self, imgs, mask=None, keys=None):
        """Random (noise from the keys) or given (B, L) bool mask -> ids_keep, mask, ids_restore."""
        return token_masking(imgs, self.grid ** 2, self.mask_ratio, mask, keys)[0]

    def noise_len(self):
        """Mask noise values per sample (one per token), drawn by the data workers from its key."""
        return self.grid ** 2

    def forward_encoder(self, imgs, ids_keep):
        """Kept tokens -> encoder -> final norm: (B, 1+K, D); MFF overrides it."""
        return self.forward_features(imgs, ids_keep)

    def decoder_input(self, latent, ids_restore):
        """Latent (B, 1+K, D) -> decoder tokens (B, 1+L, Dd): embed, fill, un-shuffle, pos-embed."""
        return (fill_masked(self.decoder_embed(latent), self.mask_token, ids_restore)
                + self.decoder_pos_embed)

    @staticmethod
    def run_decoder(x, blocks, norm, head):
        """Decoder blocks -> norm -> head, cls row dropped: (B, 1+N, Dd) -> (B, N, P)."""
        for blk in blocks:
            x = blk(x)
        return head(norm(x))[:, 1:]

    def forward_decoder(self, latent, ids_restore):
        """Latent (B, 1+K, D) -> predicted patches (B, L, p*p*3) at every position."""
        x = self.decoder_input(latent, ids_restore)  # (B, 1+L, Dd)
        return self.run_decoder(x, self.decoder_blocks, self.decoder_norm, self.decoder_pred)

    def target(self, imgs):
        """Pixel target (B, L, p*p*3), standardised per patch with --norm-pix-loss."""
        t = patchify(imgs.float(), self.patch_size)
        return norm_pix(t) if self.norm_pix_loss else t

    @staticmethod
    def patch_loss(pred, target):
        """Per-patch MSE (B, L) in fp32."""
        return ((pred.float() - target) ** 2).mean(dim=-1)

    def forward(self, imgs, mask=None, keys=None):
        """imgs (B, 3, H, W) -> dict(loss, pred, target, mask), loss = MSE on the masked patches."""
        ids_keep, mask, ids_restore = self.masking(imgs, mask, keys)
        latent = self.forward_encoder(imgs, ids_keep)
        pred = self.forward_decoder(latent, ids_restore)
        target = self.target(imgs)
        loss = masked_mean(self.patch_loss(pred, target), mask)
        return dict(loss=loss, pred=pred, target=target, mask=mask)

    def describe(self):
        """One line for the log: how many patches the encoder sees."""
        L = self.grid ** 2
        keep = int(L * (1 - self.mask_ratio))
        return f'mae: {L} patches per image, {keep} visible to the encoder, {L - keep} masked'

    def picture(self, imgs, out):
        """input | masked | prediction (visible patches pasted back), uint8 (3, H, W)."""
        return pixel_picture(imgs, out['pred'], out['mask'], self.patch_size, self.norm_pix_loss)


# ===================================================================== the runner
# Everything below trains the models above: checkpoint files, data, pictures, the command line,
# DDP and the loop. Its imports live here, so that the model half above stands on its own.
import argparse  # noqa: E402
import difflib  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import weakref  # noqa: E402

import torch.distributed as dist  # noqa: E402


# --------------------------------------------------------------------- checkpoints and key maps

def load_file(path):
    """weights_only torch.load that also allows argparse.Namespace (mae util/misc.py:save_model)."""
    if not os.path.isfile(path):
        raise ValueError(f'checkpoint {path} does not exist')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        if 'Namespace' not in str(e):
            with open(path, 'rb') as f:
                head = f.read(2)
            if not head.startswith((b'PK', b'\x80')):  # torch.save: a zip archive (legacy: pickle)
                raise ValueError(f'{path} is not a checkpoint torch can read ('
                                 f'{"an empty file" if not head else "no zip archive or pickle"});'
                                 f' give a file that torch.save wrote') from None
            raise ValueError(f'cannot read checkpoint {path}: {e}') from None
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)


def file_fingerprint(path, chunk=1 << 20):
    """'<size> bytes, sha256 <hex>' of a file's size, first and last MiB: cheap on a large file, and
    a torch.save zip ends with the CRC-32 of every tensor, so any change of content shows."""
    import hashlib
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(size - chunk, chunk))
            h.update(f.read(chunk))
    return f'{size} bytes, sha256 {h.hexdigest()[:16]}'


def pick_state_dict(obj, teacher=False):
    """The state dict in a file: 'model', 'state_dict' (teacher: 'ema_state_dict', 'model_ema')."""
    names = ('ema_state_dict', 'model_ema') if teacher else ('model', 'state_dict')
    for name in names:  # HPM stores a name string under 'model'
        if isinstance(obj, dict) and isinstance(obj.get(name), dict):
            return obj[name]
    if teacher:
        raise ValueError('no teacher weights (ema_state_dict / model_ema) in this checkpoint')
    return obj


def strip_prefix(sd, *prefixes):
    """Remove leading `module.`, `_orig_mod.` (always) and the given prefixes from every key."""
    out = {}
    for k, v in sd.items():
        for p in ('module.', '_orig_mod.') + prefixes:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


# mmpretrain ViT layer (models/backbones/vision_transformer.py:TransformerEncoderLayer) -> timm
# block; the same renames inside the MAE neck's decoder blocks (models/necks/mae_neck.py)
MMPRETRAIN_BLOCK = (('ln1.', 'norm1.'), ('ln2.', 'norm2.'), ('ffn.layers.0.0.', 'mlp.fc1.'),
                    ('ffn.layers.1.', 'mlp.fc2.'))
TIMM_ENCODER = ('cls_token', 'pos_embed', 'patch_embed.', 'blocks.', 'norm.', 'fc_norm.')


def mmpretrain_key_to_timm(key):
    """One mmpretrain key (`backbone.layers.3.ffn.layers.0.0.weight`, …) -> timm/MAE name."""
    for prefix, stack, final_norm in (('backbone.', 'layers', 'norm'),
                                      ('neck.', 'decoder_blocks', 'decoder_norm')):
        if not key.startswith(prefix):
            continue
        k = key[len(prefix):].replace('patch_embed.projection.', 'patch_embed.proj.')
        parts = k.split('.', 2)
        if parts[0] == stack and len(parts) == 3:  # a transformer layer: (stack, i, rest)
            rest = parts[2]
            for old, new in MMPRETRAIN_BLOCK:
                if rest.startswith(old):
                    rest = new + rest[len(old):]
            return f'{"blocks" if prefix == "backbone." else stack}.{parts[1]}.{rest}'
        if k.startswith('ln1.'):  # outside the layers ln1 is the final norm
            return f'{final_norm}.{k[4:]}'
        if k.startswith('ln2.') and prefix == 'backbone.':  # out_type='avg_featmap': timm fc_norm
            return f'fc_norm.{k[4:]}'
        return k  # cls_token, pos_embed, MFF's proj_layers/proj_weights, mask_token, decoder_*
    return key


def mmpretrain_vit_to_timm(sd, encoder_only=False):
    """mmpretrain/mmselfsup ViT (+ MAE neck, MFF proj_*) keys -> timm/MAE, timm names unchanged;
    encoder_only keeps the encoder alone, as mmpretrain's configs/mff/benchmarks load it (and drops
    the stray `proj_blocks.*` of open-mmlab/mmselfsup tools/model_converters/mmcls2timm.py)."""
    out = {mmpretrain_key_to_timm(k): v for k, v in sd.items()
           if not k.startswith('data_preprocessor.')}
    if encoder_only:
        out = {k: v for k, v in out.items() if k.startswith(TIMM_ENCODER)}
    return out


def load_model_state(model, sd, what='checkpoint'):
    """Strict load that turns a key or shape mismatch into a ValueError listing the keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or shapes:
        def show(keys):
            return ', '.join(keys[:8]) + (f' … (+{len(keys) - 8})' if len(keys) > 8 else '')
        raise ValueError(f'{what} does not match this model (another method or size?): '
                         f'missing {show(missing) or "none"}; '
                         f'unexpected {show(unexpected) or "none"}; shape mismatch '
                         f'''{show([f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
                                   for k in shapes]) or "none"}''')
    model.load_state_dict(sd, strict=True)


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a truncated `path`."""
    tmp = f'{path}.tmp'
    torch.save(obj, tmp)
    os.replace(tmp, path)


def copy_atomic(src, path):
    """Copy a file to a temporary file, then rename (as save_atomic): a second copy of a saved
    checkpoint without serialising it again."""
    tmp = f'{path}.tmp'
    shutil.copyfile(src, tmp)
    os.replace(tmp, path)


REBUILT_BUFFERS = ('relative_position_index', 'attn_mask', 'relative_coords_table')  # never loaded


def resize_pos_embed(pos_embed, new_grid, num_prefix=1, antialias=False):
    """Bicubic pos-embed resize (1, n+G*G, D) -> (1, n+h*w, D), n prefix rows kept: antialias=False
    as mae util/pos_embed.py:interpolate_pos_embed, True as timm resample_abs_pos_embed."""
    h, w = (new_grid, new_grid) if isinstance(new_grid, int) else new_grid
    n = pos_embed.shape[1] - num_prefix
    G = math.isqrt(n)
    if G * G != n:
        raise ValueError(f'pos_embed has {n} grid rows after {num_prefix} prefix rows, not a '
                         f'square grid')
    if (G, G) == (h, w):
        return pos_embed.clone()
    D = pos_embed.shape[-1]
    grid = pos_embed[:, num_prefix:].float().reshape(1, G, G, D).permute(0, 3, 1, 2)  # (1, D, G, G)
    grid = F.interpolate(grid, size=(h, w), mode='bicubic', align_corners=False,
                         antialias=antialias)  # (1, D, h, w)
    grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, D).to(pos_embed.dtype)  # (1, h*w, D)
    return torch.cat([pos_embed[:, :num_prefix], grid], dim=1)


def swin_timm_keys(sd, to_timm):
    """Microsoft Swin keys -> timm >= 0.9 (to_timm; timm models/swin_transformer.py:
    checkpoint_filter_fn) or back: timm keeps stage s's PatchMerging in stage s+1 and names the
    head `head.fc.`; the rebuilt buffers (REBUILT_BUFFERS) are left out of a timm file."""
    import re
    shift, (ours, timm) = (1, ('head.', 'head.fc.')) if to_timm else (-1, ('head.fc.', 'head.'))
    out = {}
    for k, v in sd.items():
        if to_timm and k.endswith(REBUILT_BUFFERS):
            continue
        m = re.match(r'layers\.(\d+)\.downsample\.(.*)', k)
        if m:
            k = f'layers.{int(m[1]) + shift}.downsample.{m[2]}'
        elif k.startswith(ours):
            k = timm + k[len(ours):]
        out[k] = v
    return out


def permute_merge(sd, order=(0, 2, 1, 3)):
    """Reorder the four C-wide chunks of every PatchMerging: LocalMIM pre-training concatenates
    TL,TR,BL,BR (Haoqing-Wang/LocalMIM Swin/models_mim.py:PatchMerging), Swin TL,BL,TR,BR."""
    out = dict(sd)
    for k, v in sd.items():
        if k.endswith(('downsample.norm.weight', 'downsample.norm.bias')):
            out[k] = torch.cat([v.chunk(4, 0)[i] for i in order], 0)  # (4C,)
        elif k.endswith('downsample.reduction.weight'):
            out[k] = torch.cat([v.chunk(4, 1)[i] for i in order], 1)  # (2C, 4C)
    return out


def key_summary(keys, limit=12):
    """Keys for a log line: all when few, else grouped by the prefix before the first index."""
    import re
    keys = sorted(keys)
    if len(keys) <= limit:
        return ', '.join(keys) or 'none'
    groups = {}  # name -> [indices, count, first key]
    for k in keys:
        m = re.match(r'(.*?)\.(\d+)\.', k)
        g = groups.setdefault(m[1] if m else k.split('.')[0], [set(), 0, k])
        g[1] += 1
        if m:
            g[0].add(int(m[2]))
    parts = []
    for name, (idx, n, first) in groups.items():
        if idx:
            parts.append(f'{name}.{{{min(idx)}..{max(idx)}}}.* ({n})')
        else:
            parts.append(f'{name}.* ({n})' if n > 1 else first)
    return ', '.join(parts) + f' [{len(keys)} keys]'


def load_encoder(model, obj, teacher=False, merge_permute=False, table_mode='geometric',
                 fresh=('fc_norm', 'head'), level_norm=True, log=print):
    """Load the encoder of any supported checkpoint (ours or official) into a ViT/Swin classifier;
    only keys under `fresh` (and rebuilt buffers) may be missing -> (missing, unexpected)."""
    import re
    sd = strip_prefix(pick_state_dict(obj, teacher))
    tried = ['module.', '_orig_mod.']
    if any(k.startswith('backbone.') for k in sd):  # mmpretrain (MFF): rename first
        sd = mmpretrain_vit_to_timm(sd)
        tried.append('backbone. (mmpretrain names)')
    if any(k.startswith('encoder.') for k in sd):  # FastMIM/LocalMIM Swin, SimMIM
        sd = {k[len('encoder.'):] if k.startswith('encoder.') else k: v for k, v in sd.items()}
        tried.append('encoder.')
    own = model.state_dict()
    if isinstance(model, SwinTransformer):
        if any(k.startswith('head.fc.') for k in sd) or (
                'layers.1.downsample.reduction.weight' in sd
                and 'layers.0.downsample.reduction.weight' not in sd):
            sd = swin_timm_keys(sd, to_timm=False)
            tried.append('timm Swin layout')
        if merge_permute:
            sd = permute_merge(sd)
        # a FastMIM fine-tuned Swin pools into `fc_norm`
        if 'norm.weight' in own and 'norm.weight' not in sd and 'fc_norm.weight' in sd:
            sd['norm.weight'], sd['norm.bias'] = sd.pop('fc_norm.weight'), sd.pop('fc_norm.bias')
    if level_norm and 'norm.weight' in own and 'norm.weight' not in sd:
        levels = sorted(int(m[1]) for k in sd if (m := re.fullmatch(r'norm\.(\d+)\.weight', k)))
        if levels:  # LocalMIM: no final norm, its last per-level one serves (linear probe, k-NN)
            sd['norm.weight'], sd['norm.bias'] = (sd.pop(f'norm.{levels[-1]}.weight'),
                                                  sd.pop(f'norm.{levels[-1]}.bias'))
            log(f'norm: the last per-level norm norm.{levels[-1]} of the checkpoint serves as the '
                f'final norm')
    sd = {k: v for k, v in sd.items() if not k.endswith(REBUILT_BUFFERS)}
    if ('pos_embed' in sd and 'pos_embed' in own
            and sd['pos_embed'].shape != own['pos_embed'].shape):
        old, new = (math.isqrt(sd['pos_embed'].shape[1] - 1),
                    math.isqrt(own['pos_embed'].shape[1] - 1))
        sd['pos_embed'] = resize_pos_embed(sd['pos_embed'], new, antialias=new < old)
        log(f'pos_embed resized {old}x{old} -> {new}x{new} '
            f'(bicubic{", antialias" if new < old else ""})')
    resized = []
    for k in [k for k in sd if k.endswith('relative_position_bias_table') and k in own]:
        if sd[k].shape != own[k].shape:
            if sd[k].shape[1] != own[k].shape[1]:
                raise ValueError(f'{k} has {sd[k].shape[1]} heads in the checkpoint but '
                                 f'{own[k].shape[1]} in the model; a head count cannot be resized '
                                 f'(wrong --model?)')
            src = math.isqrt(sd[k].shape[0])
            sd[k] = resize_rel_pos_table(sd[k], math.isqrt(own[k].shape[0]), table_mode)
            resized.append(src)
    if resized:
        side = math.isqrt(
            own[next(k for k in own if k.endswith('relative_position_bias_table'))].shape[0])
        log(f'{len(resized)} relative-position tables resized ({table_mode}), e.g. '
            f'{resized[0]}x{resized[0]} -> {side}x{side}')
    for k in ('head.weight', 'head.bias'):
        if k in sd and (k not in own or sd[k].shape != own[k].shape):
            log(f'{k} {tuple(sd[k].shape)} dropped (the model has '
                f'{tuple(own[k].shape) if k in own else "none"})')
            del sd[k]  # as facebookresearch/mae main_finetune.py
    shapes = [f'{k} {tuple(v.shape)} vs {tuple(own[k].shape)}' for k, v in sd.items()
              if k in own and v.shape != own[k].shape]
    if shapes:
        raise ValueError(f'checkpoint does not match this model (wrong --model or size?): '
                         f'{"; ".join(shapes[:6])}')
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    allowed = tuple(p + '.' for p in fresh)
    bad = [k for k in missing if not k.startswith(allowed) and not k.endswith(REBUILT_BUFFERS)]
    if bad:
        raise ValueError(f'checkpoint lacks encoder keys {key_summary(bad)} (prefixes tried: '
                         f'{", ".join(tried)}); is it an encoder of this --model?')
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    rebuilt = [k for k in missing if k.endswith(REBUILT_BUFFERS)]
    log(f'loaded {len(sd) - len(unexpected)} tensors; missing (fresh): '
        f'{key_summary([k for k in missing if k not in rebuilt])}'
        + (f' (+{len(rebuilt)} rebuilt buffers)' if rebuilt else '')
        + f'; unexpected (ignored): {key_summary(unexpected)}')
    return missing, unexpected


# --------------------------------------------------------------------- pre-trained weights
# --visualize and --init-from read a pre-training file of any script: ours (built from its saved
# args) or an official release (the method's from_official maps its keys); read_pretrained names
# any other file in one line, fit_state loads it and says what it loaded, resized or left.

def official_layout(sd):
    """The release a pre-training state dict's keys look like: hpm, fastmim, localmim, mff or
    (none of their extras) mae."""
    import re
    if any('_losspred' in k for k in sd):
        return 'hpm'
    if 'mask_token' in sd and tuple(sd['mask_token'].shape) == (1, 3, 1, 1):  # FastMIM's RGB token
        return 'fastmim'
    if any(k.startswith(('hog_enc.', 'decoder.0.'))
           or re.fullmatch(r'(encoder\.)?norm\.\d+\.weight', k) for k in sd):
        return 'localmim'
    if any('proj_weights' in k for k in sd):
        return 'mff'
    return 'mae'


PRETRAIN_METHODS = ('fastmim', 'hpm', 'mae', 'localmim', 'mff', 'efficient_mae')
READS = {'hpm': ('hpm', 'mae'), 'mae': ('hpm', 'mae')}  # hpm.py trains either (--method)
SCRIPT = {'mae': 'hpm.py --method mae'}  # the script (and flag) that reads a method's files
OFFICIAL_LAYOUT = {'efficient_mae': 'mae'}  # no release of its own; MAE's is its layout


def read_pretrained(obj, path, method, from_official, any_method=False):
    """A pre-training file of `method` (ours, or its release through from_official) -> (state
    dict in our keys, what the file is, its saved args or None); any other file is a ValueError
    that names it. any_method: another method's file is read too (--init-from)."""
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f'{path} holds {"an empty dict" if obj == {} else type(obj).__name__}, '
                         f'not a checkpoint; give a pre-training checkpoint of {method}')
    saved = obj.get('args')
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else saved
    ours = saved.get('method') if isinstance(saved, dict) else None
    if ours == 'finetune':
        raise ValueError(f'{path} is a classifier fine-tuned by finetune.py (--mode '
                         f'{saved.get("mode")}), without the pre-training heads; give a '
                         f'pre-training checkpoint of {method}')
    if ours in PRETRAIN_METHODS and isinstance(obj.get('model'), dict):
        if ours not in READS.get(method, (method,)) and not any_method:
            raise ValueError(f'{path} is a {ours} pre-training checkpoint (ours); read it with '
                             f'{SCRIPT.get(ours, ours + ".py")}, or give one of {method}')
        return strip_prefix(obj['model']), f'ours ({ours}, step {obj.get("step")})', saved
    sd = strip_prefix(pick_state_dict(obj))
    if not any(k.endswith(('patch_embed.proj.weight', 'patch_embed.projection.weight'))
               and torch.is_tensor(v) for k, v in sd.items()):
        raise ValueError(f'{path} holds no ViT or Swin weights (keys: {key_summary(sd)}); give a '
                         f'pre-training checkpoint of {method}, ours or its official release')
    if any(k.startswith('head.') for k in sd) and not any('decoder' in k for k in sd):
        raise ValueError(f'{path} is a classifier (head.*, no decoder), a fine-tuned model '
                         f'without the pre-training heads; give a pre-training checkpoint of '
                         f'{method}')
    layout, want = official_layout(sd), OFFICIAL_LAYOUT.get(method, method)
    if layout != want and not any_method:
        use = {('hpm', 'mae'): 'add --method mae', ('mae', 'hpm'): 'drop --method mae'}.get(
            (method, layout), f'read it with {SCRIPT.get(layout, layout + ".py")}')
        raise ValueError(f'{path} is an official {layout} checkpoint, not {want}\'s; {use}')
    sd = from_official(obj)
    if any(k.startswith('backbone.') for k in sd):  # another release's names (mmpretrain: MFF)
        sd = mmpretrain_vit_to_timm(sd)
    return sd, f'official {layout} release', None


def table_grid(n):
    """(prefix rows, grid side) of a position table with n rows: 1 + G*G, or G*G (no cls)."""
    G = math.isqrt(n)
    return (0, G) if G * G == n else (1, math.isqrt(n - 1))


ENCODER_KEYS = ('cls_token', 'pos_embed', 'patch_embed.', 'blocks.', 'layers.')


def fit_state(model, sd, what, partial=False):
    """Load `sd` (read_pretrained) into a pre-training model: equal shapes load; a position table
    of another grid is resized (fixed sin-cos: recomputed for the model's grid, as at a
    resolution change; learnable: resize_pos_embed; Swin: resize_rel_pos_table). partial: a key
    missing, or of another shape, stays at init (the encoder must load), else it is an error.
    -> dict(loaded, resized, init, ignored): lists of keys (resized: key and grids)."""
    own, params = model.state_dict(), dict(model.named_parameters())
    sd = {k: v for k, v in sd.items() if not k.endswith(REBUILT_BUFFERS)}
    new, report = {}, dict(loaded=[], resized=[], init=[], ignored=sorted(set(sd) - set(own)))
    for k, mine in own.items():
        v = sd.get(k)
        if k.endswith(REBUILT_BUFFERS):
            continue
        if v is not None and v.shape == mine.shape:
            new[k] = v
            report['loaded'].append(k)
        elif (v is not None and k.endswith('pos_embed') and v.dim() == 3
              and v.shape[-1] == mine.shape[-1]):
            (n, src), (_, dst) = table_grid(v.shape[1]), table_grid(mine.shape[1])
            fixed = k in params and not params[k].requires_grad
            if not fixed:
                new[k] = resize_pos_embed(v, dst, n, antialias=dst < src)
            report['resized'].append(f'{k} {src}x{src} -> {dst}x{dst}'
                                     f'{" (sin-cos recomputed)" if fixed else ""}')
        elif (v is not None and k.endswith('relative_position_bias_table')
              and v.shape[1] == mine.shape[1]):
            new[k] = resize_rel_pos_table(v, math.isqrt(mine.shape[0]))
            report['resized'].append(f'{k} {math.isqrt(v.shape[0])}^2 -> '
                                     f'{math.isqrt(mine.shape[0])}^2')
        else:
            report['init'].append(k if v is None else
                                  f'{k} {tuple(v.shape)} vs {tuple(mine.shape)}')
    bad = report['init'] + ([] if partial else report['ignored'])
    if partial:  # the encoder must load; heads of other shapes or methods may start afresh
        bad = [k for k in bad if k.removeprefix('encoder.').startswith(ENCODER_KEYS)]
    if bad:
        raise ValueError(f'{what} does not match this model (another size or method? give '
                         f'--model and the size flags it was trained with): '
                         f'{"; ".join(bad[:4])}{" …" if len(bad) > 4 else ""}')
    model.load_state_dict(new, strict=False)
    return report


# --------------------------------------------------------------------- data

def sample_key(seed, epoch, index):
    """The int64 key of one sample in one epoch: seeds its crop, flip and mask noise on any rank."""
    # mod 2**63: fits int64 for any --seed; the keys of seeds below ~922,000 are the product itself
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (1 << 63)


def shape_distance(k, x, y, s):
    """Signed distance of shape k of radius s (< 0 inside), at points x, y (R, R) of its frame."""
    r = (x * x + y * y).sqrt()
    th = torch.atan2(y, x)
    if k == 0:  # disk
        return r - s
    if k in (1, 2, 3, 4):  # regular 3-, 4-, 5-, 6-gon: distance to the nearest side's line
        n = k + 2
        a = 2 * math.pi / n
        return r * torch.cos(torch.remainder(th + math.pi / 2, a) - a / 2) - s * math.cos(math.pi / n)
    if k == 5:  # five-pointed star: the radius swings with the angle (a distance only near the edge)
        return r - s * (0.62 + 0.38 * torch.cos(5 * th + 2.5 * math.pi))
    if k == 6:  # ring
        return (r - 0.72 * s).abs() - 0.28 * s
    if k == 7:  # cross: the nearer of two bars
        return torch.minimum(torch.maximum(x.abs() - s, y.abs() - 0.32 * s),
                             torch.maximum(y.abs() - s, x.abs() - 0.32 * s))
    if k == 8:  # heart: a square turned 45 degrees with a disk on each upper side
        u, v = (x + y) / math.sqrt(2), (y - x) / math.sqrt(2)
        c = 0.55 * s
        return torch.minimum(torch.maximum(u.abs(), v.abs()) - c,
                             torch.minimum((u * u + (v + c) ** 2).sqrt(), ((u + c) ** 2 + v * v).sqrt()) - c)
    return torch.maximum(r - s, 0.8 * s - ((x - 0.45 * s) ** 2 + y * y).sqrt())  # crescent: disk minus disk


def fill_pattern(k, x, y, f, speckle):
    """Share of the second colour, in [0, 1], of pattern k at points x, y (R, R) and angular
    frequency f; its ramps are about a pixel wide, so it does not alias."""
    if k == 0:  # stripes
        v = torch.sin(f * x)
    elif k == 1:  # checkerboard
        v = 2 * torch.sin(f * x) * torch.sin(f * y)
    elif k == 2:  # dots
        v = torch.cos(f * x) + torch.cos(f * y) - 1
    elif k == 3:  # concentric rings
        v = torch.sin(f * (x * x + y * y).sqrt())
    elif k == 4:  # 16 spokes
        v = torch.sin(8 * torch.atan2(y, x))
    elif k == 5:  # wavy stripes
        v = torch.sin(f * x + 2.5 * torch.sin(0.5 * f * y))
    elif k == 6:  # grid lines
        v = 5 * (torch.maximum(torch.cos(f * x), torch.cos(f * y)) - 0.8)
    elif k == 7:  # plain
        return torch.zeros_like(x)
    elif k == 8:  # zigzag stripes
        v = torch.sin(f * x + 4 * (torch.remainder(f * y / math.pi, 2) - 1).abs())
    else:  # speckle: random 2-px cells
        return speckle
    return (0.5 + 1.5 * v).clamp_(0, 1)


# The label is a shape and its fill pattern (the pattern shows in any 8-px patch of the object),
# so a small ViT can learn it on a CPU; everything else varies as in photos (colour, place, size,
# angle, 1/f background, clutter, light, sensor noise), so the mean colour does not give the
# class away and HOG and pixel targets both see edges, not flat fields.
class SyntheticShapes(torch.utils.data.Dataset):
    """Built-in data: 10 classes (a shape with its fill pattern) on photo-like clutter as uint8
    (3, res, res), generated per index, no files."""

    classes = ['disk_stripes', 'triangle_checker', 'square_dots', 'pentagon_rings',
               'hexagon_spokes', 'star_waves', 'ring_grid', 'cross_plain', 'heart_zigzag',
               'crescent_speckle']

    def __init__(self, split='train', n=None, res=64, seed=0):
        self.split, self.res, self.seed = split, res, seed
        self.n = n if n is not None else (2048 if split == 'train' else 512)
        self.targets = [i % 10 for i in range(self.n)]
        c = torch.linspace(-1, 1, 2 * res + 1)[1::2]  # pixel centres in [-1, 1]
        self.x, self.y = c.view(1, res), c.view(res, 1)  # broadcast to (R, R)
        fy, fx = torch.fft.fftfreq(res)[:, None], torch.fft.rfftfreq(res)[None]
        self.log_f = (fy * fy + fx * fx).sqrt().clamp(min=1 / res).log()  # (R, R/2+1)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        """-> (uint8 image (3, res, res), label)."""
        g = torch.Generator().manual_seed(  # mod 2**64: manual_seed's range, for any seed
            ((self.seed * 7919 + (self.split == 'val')) * 1_000_003 + i) % (1 << 64))
        ut = torch.rand(24, generator=g)  # 21 used, 3 spare
        u = ut.tolist()
        c = torch.rand(4, 3, 1, 1, generator=g)  # background tint, object colour, 2 distractors
        label, R = self.targets[i], self.res
        x, y, px = self.x, self.y, 2 / R  # px: one pixel in frame units
        # background: 1/f^a noise (a in 0.8-1.8, natural images ~1), one luminance and one colour
        # field, at low saturation, over a linear gradient
        amp = (self.log_f * -(0.8 + u[0])).exp()  # (R, R/2+1)
        phase = torch.rand(2, R, R // 2 + 1, generator=g) * (2 * math.pi)
        field = torch.fft.irfft2(torch.polar(amp.expand(2, -1, -1), phase), s=(R, R))  # (2, R, R)
        k = (0.08 + 0.17 * u[4]) / field.std()
        a, gr = u[1] * 2 * math.pi, 0.3 * u[3]
        grey = (x * (gr * math.cos(a)) + y * (gr * math.sin(a))).add_(field[0], alpha=k)  # (R, R)
        img = torch.addcmul(grey, field[1], (c[1] - 0.5) * (0.8 * k))  # (3, R, R)
        img += 0.2 + 0.6 * u[2] + 0.3 * (c[0] - 0.5)
        # clutter: two soft-edged ellipses of random colour behind the object
        cx, cy, ax, ay = ut[5:13].view(4, 2, 1, 1)  # (2, 1, 1) each
        cx, cy, ax, ay = cx * 2 - 1, cy * 2 - 1, 0.06 + 0.16 * ax, 0.06 + 0.16 * ay
        d = ((((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2).sqrt_() - 1)  # (2, R, R) 0 on the rim
        w = torch.minimum(ax, ay) / px  # a unit of d in pixels, at the narrow end
        m = d.mul_(-w).add_(0.5).clamp_(0, 1)  # (2, R, R) a one-pixel edge
        img = img.lerp_(c[2], m[0]).lerp_(c[3], m[1])
        # the object: its class's shape at a random size, place and angle, filled with its class's
        # pattern in two contrasting random colours (period 4-7 px at 64 px), lit from one side
        s = 0.55 + 0.3 * u[13]
        ox, oy = (u[14] * 2 - 1) * (0.95 - s), (u[15] * 2 - 1) * (0.95 - s)
        ca, sa = math.cos(u[16] * 2 * math.pi), math.sin(u[16] * 2 * math.pi)
        x1, y1 = (x - ox) * ca + (y - oy) * sa, (y - oy) * ca - (x - ox) * sa  # (R, R) object frame
        inside = (0.5 - shape_distance(label, x1, y1, s) / px).clamp_(0, 1)  # (R, R) one-pixel edge
        cb, sb = math.cos(u[17] * 2 * math.pi), math.sin(u[17] * 2 * math.pi)
        f = 2 * math.pi / ((4 + 3 * u[18]) * R / 64 * px)
        speckle = None
        if label == 9:
            h = (R + 1) // 2
            speckle = (torch.rand(h, h, generator=g) > 0.5).float().repeat_interleave(
                2, 0).repeat_interleave(2, 1)[:R, :R]  # (R, R)
        t = fill_pattern(label, x1 * cb + y1 * sb, y1 * cb - x1 * sb, f, speckle)  # (R, R)
        c2 = (c[1] + 0.4 + 0.2 * u[19]) % 1  # each channel 0.4-0.6 round the wheel: a contrasting colour
        b = u[20] * 2 * math.pi
        light = (x1 * (0.2 * math.cos(b) / s) + y1 * (0.2 * math.sin(b) / s)).add_(1)  # (R, R)
        img = img.lerp_(torch.lerp(c[1], c2, t).mul_(light), inside)
        img = img.add_(torch.rand(3, R, R, generator=g).sub_(0.5), alpha=0.1)  # sensor noise, std 0.03
        return img.mul_(255).round_().clamp_(0, 255).to(torch.uint8), label


# To measure the input pipeline without a download: each image a colour field with a photo's 1/f
# amplitude spectrum over an upscaled SyntheticShapes image (its edges), in that image's class
# folder; about 100 KB at 500 x 375 and quality 90, as ImageNet's files. From a shell:
#   python -c "import common; common.make_jpeg_folder('/tmp/jpegs', 300)"
def make_jpeg_folder(root, n, size=(500, 375), quality=90, seed=0):
    """Write n photo-like W x H JPEGs into class folders under root; returns root."""
    from PIL import Image
    W, H = size
    f = torch.fft.fftfreq(H)[:, None].hypot(torch.fft.rfftfreq(W)).clamp(min=1 / max(W, H))
    shapes = SyntheticShapes('train', n, 96, seed)
    for i in range(n):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        spec = torch.view_as_complex(torch.randn(4, H, W // 2 + 1, 2, generator=g))
        field = torch.fft.irfft2(spec / f ** 1.2, s=(H, W))  # (4, H, W): shared + one per channel
        field = field / field.std(dim=(1, 2), keepdim=True)
        img, label = shapes[i]
        edges = F.interpolate(img[None] / 255, size=(H, W), mode='bilinear')[0]  # (3, H, W)
        x = (0.7 * edges + 0.25 * (field[:1] + 0.3 * field[1:])).clamp(0, 1)  # (3, H, W)
        folder = os.path.join(root, shapes.classes[label])
        os.makedirs(folder, exist_ok=True)
        Image.fromarray((x * 255).round().byte().permute(1, 2, 0).numpy()).save(
            os.path.join(folder, f'{i:05d}.jpg'), quality=quality)
    return root


class UnreadableImage(ValueError):
    """An image file that cannot be read (named); --skip-bad-images skips it."""


def read_image(path, decode=True):
    """Open an image as RGB (decode=False: its header only, for DecodeCrop), naming a bad file."""
    from PIL import Image
    try:
        if not decode:
            return Image.open(path)
        with open(path, 'rb') as f:
            return Image.open(f).convert('RGB')
    except Exception as e:
        raise UnreadableImage(f'cannot read image {path}: {e}') from None


NOTED_TOP_IMAGES = set()  # folders whose loose images image_folder has named
# the files a --data-path folder is read for: ImageFolder's (torchvision's IMG_EXTENSIONS)
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


def is_image_file(entry):
    """True for a file (os.DirEntry) whose name ends in one of IMAGE_EXTENSIONS, any case."""
    return entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS)


def has_class_folders(path):
    """True when a subfolder of `path` holds an image itself: ImageFolder's one folder per class
    (a folder whose images sit deeper, e.g. <path>/2023/05/*.jpg, is no class folder)."""
    for sub in sorted(e.path for e in os.scandir(path) if e.is_dir()):
        with os.scandir(sub) as entries:
            if any(is_image_file(e) for e in entries):
                return True
    return False


class ImageFiles(torch.utils.data.Dataset):
    """Every image file under `root` at any depth, items (image, -1): no labels (-1 as torchvision's
    STL-10 unlabeled split). Order: the top folder's files, then each subfolder (sorted) walked as
    ImageFolder walks a class folder, so a folder ImageFolder also reads keeps its sample order."""

    classes = []

    def __init__(self, root, loader=read_image):
        self.root, self.loader = root, loader
        subs = sorted(e.name for e in os.scandir(root) if e.is_dir())
        walks = [(root, [], sorted(e.name for e in os.scandir(root) if is_image_file(e)))]
        for sub in subs:
            walks += sorted(os.walk(os.path.join(root, sub), followlinks=True))
        self.samples = [(os.path.join(folder, name), -1) for folder, _, names in walks
                        for name in sorted(names) if name.lower().endswith(IMAGE_EXTENSIONS)]
        self.targets = [-1] * len(self.samples)
        self.folders = len({os.path.dirname(p) for p, _ in self.samples})

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.loader(self.samples[i][0]), -1


def image_folder(root, split=None, loader=read_image):
    """ImageFolder at <root>/<split> (or <root>/train, else <root>); without a split and without
    class folders, every image under it at any depth, unlabelled (ImageFiles); a clear error if no
    images.

    An empty class folder among full ones is kept as a class with no images, and named.
    """
    from torchvision import datasets
    if not os.path.isdir(root):
        raise ValueError(f'--data-path {root} does not exist')
    if split is not None:
        path = os.path.join(root, split)
    else:
        path = os.path.join(root, 'train') if os.path.isdir(os.path.join(root, 'train')) else root
        if not has_class_folders(path):  # labels are not needed: pre-training, pictures, features
            data = ImageFiles(path, loader)
            if not data.samples:
                raise ValueError(f'no images found in {path} or its subfolders; the files read '
                                 f'end in {" ".join(IMAGE_EXTENSIONS)} (any case)')
            return data
    try:
        data = datasets.ImageFolder(path, loader=loader, allow_empty=True)
    except (FileNotFoundError, RuntimeError) as e:
        raise ValueError(f'no images found in {path} ({e}); expected class folders of '
                         f'images') from None
    if not data.samples:
        raise ValueError(f'no images found in {path}; expected class folders of images '
                         f'({", ".join(data.classes[:3]) or "no folders"} hold none)')
    top = [e.name for e in os.scandir(path) if is_image_file(e)]
    if top and path not in NOTED_TOP_IMAGES:  # ImageFolder reads class folders only; say so once
        NOTED_TOP_IMAGES.add(path)
        print0(f'note: {len(top)} image(s) at the top of {path} (e.g. {top[0]}) were not read: '
               f'class subfolders exist, and only their images are')
    empty = sorted(set(data.classes) - {data.classes[t] for t in data.targets})
    if empty:
        print0(f'note: {len(empty)} class folder(s) of {path} hold no image: '
               f'{", ".join(empty[:5])}')
    return data


def data_line(base, args):
    """The start line that says how a --data-path folder was read (ImageFiles or ImageFolder)."""
    where = (f'{len(base):,} images in {base.folders:,} folder(s) under {base.root} (no class '
             f'subfolders: unlabelled)' if isinstance(base, ImageFiles) else
             f'{len(base):,} images in ImageFolder {base.root} with {len(base.classes)} classes')
    if os.path.normpath(base.root) != os.path.normpath(args.data_path):
        where += ', its train/ split'
    return f'data: {where}, mean {mean_std(args)[0]}, std {mean_std(args)[1]}'


# torchvision's small sets by name (--data-path cifar10): the split each use reads (pretrain: the
# pre-training images; train/val: the labelled bank and the held-out queries of k-NN and
# finetune.py), the native side (the default --res) and the per-colour mean and std of the
# training split's pixels in [0, 1] (std over all its pixels; CIFAR: the 50,000 train images,
# STL-10: the 5,000 labelled train images), the values in common use, not measured here; to check
# them: load_named(...).data / 255 -> mean and std over every axis but the colour.
DATASETS = {
    'cifar10': dict(cls='CIFAR10', folder='cifar-10-batches-py', res=32, classes=10,
                    splits=dict(pretrain='train', train='train', val='test'),
                    mean=[0.4914, 0.4822, 0.4465], std=[0.2470, 0.2435, 0.2616]),
    'cifar100': dict(cls='CIFAR100', folder='cifar-100-python', res=32, classes=100,
                     splits=dict(pretrain='train', train='train', val='test'),
                     mean=[0.5071, 0.4865, 0.4409], std=[0.2673, 0.2564, 0.2762]),
    'stl10': dict(cls='STL10', folder='stl10_binary', res=96, classes=10,  # 100,000 unlabelled
                  splits=dict(pretrain='unlabeled', train='train', val='test'),
                  mean=[0.4467, 0.4398, 0.4066], std=[0.2603, 0.2566, 0.2713]),
}
NOTED_NAME_FOLDERS = set()  # --data-path names that are also folders, said once


def named_set(data_path):
    """The DATASETS name --data-path gives, or None: a folder of that name wins (a note says so)."""
    if not isinstance(data_path, str) or data_path not in DATASETS:  # (--visualize: files)
        return None
    if os.path.isdir(data_path):
        if data_path not in NOTED_NAME_FOLDERS:
            NOTED_NAME_FOLDERS.add(data_path)
            print0(f'note: --data-path {data_path} is the folder ./{data_path} (an image folder), '
                   f'not torchvision\'s {data_path}; run elsewhere or rename the folder to use it')
        return None
    return data_path


def mean_std(args):
    """The (mean, std) lists the run normalises with: args.mean/std (a named set's, or the
    checkpoint's in finetune.py), else ImageNet's."""
    mean, std = getattr(args, 'mean', None), getattr(args, 'std', None)
    return (list(mean or IMAGENET_MEAN), list(std or IMAGENET_STD))


def dataset_defaults(args):
    """The default layer of a named set (fill_defaults): its native --res, its mean and std."""
    name = named_set(args.data_path)
    return (f'dataset({name})', {k: DATASETS[name][k] for k in ('res', 'mean', 'std')}
            if name else {})


@functools.lru_cache(maxsize=8)
def load_named(name, split, root):
    """torchvision's set `name`, one split, as (PIL image, label) items; downloaded into root on
    first use, its files md5-checked by torchvision; one process at a time (torchrun's ranks)."""
    import fcntl
    import urllib.error
    from torchvision import datasets
    spec = DATASETS[name]
    cls = getattr(datasets, spec['cls'])
    os.makedirs(root, exist_ok=True)
    # a lock file, not a collective: rank 0 alone also reads a set (the picture batch); the first
    # process downloads, the others wait here and then find the files
    with open(os.path.join(root, f'.{name}.lock'), 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if name == 'stl10':
                return cls(root, split=split, download=True)
            return cls(root, train=split == 'train', download=True)
        except (OSError, RuntimeError, urllib.error.URLError) as e:
            raise ValueError(f'--data-path {name}: no usable files in '
                             f'{os.path.join(root, spec["folder"])} and the download failed '
                             f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}); '
                             f'download {cls.url} and extract it into {root}, or pass '
                             f'--data-root where it is') from None


def named_dataset(args, use):
    """The split of the named set --data-path that `use` reads: 'pretrain' (CIFAR train, STL-10
    unlabeled), 'train' (the labelled bank / fine-tuning set) or 'val' (the held-out test split)."""
    name = named_set(args.data_path)
    return load_named(name, DATASETS[name]['splits'][use],
                      os.path.abspath(getattr(args, 'data_root', None) or 'data'))


def eval_datasets(args):
    """(bank, queries, classes) of a k-NN monitor or a fine-tune, untransformed (image, label)
    items: a named set's train and test splits, <data-path>/train and /val, or the built-in
    SyntheticShapes train and val splits."""
    name = named_set(args.data_path)
    if name:
        return named_dataset(args, 'train'), named_dataset(args, 'val'), DATASETS[name]['classes']
    if args.data_path:
        train, val = image_folder(args.data_path, 'train'), image_folder(args.data_path, 'val')
        return train, val, len(train.classes)
    return (SyntheticShapes('train', args.synthetic_size, args.res, args.seed),
            SyntheticShapes('val', getattr(args, 'synthetic_val_size', None) or 512, args.res,
                            args.seed), len(SyntheticShapes.classes))


def pretrain_transform(res, scale=(0.2, 1.0), mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """RandomResizedCrop(res, scale, bicubic) + flip + normalisation (MAE, FastMIM)."""
    from torchvision.transforms import InterpolationMode, v2
    return v2.Compose([v2.ToImage(),
                       v2.RandomResizedCrop(res, scale=tuple(scale),
                                            interpolation=InterpolationMode.BICUBIC),
                       v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(mean, std)])


# The official pre-training transform (facebookresearch/mae main_pretrain.py:main, likewise
# ggjy/FastMIM.pytorch main_pretrain.py:main): RandomResizedCrop(res, scale 0.2-1, bicubic) on the
# PIL image, flip, ToTensor, Normalize. Given the file undecoded, DecodeCrop draws the same box from
# the header's size first; a JPEG whose crop keeps at least res px a side at 1/2, 1/4 or 1/8 of its
# size is then decoded at that scale.
class DecodeCrop:
    """The official pre-training transform on an undecoded file, JPEGs decoded at 1/r (draft)."""

    def __init__(self, res, scale=(0.2, 1.0), draft=True, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.res, self.scale, self.draft = res, tuple(scale), draft
        self.mean, self.std = (torch.tensor(v).view(3, 1, 1) for v in (mean, std))  # (3, 1, 1)

    def __call__(self, img):
        """read_image(path, decode=False) -> (3, res, res) float, normalised."""
        from PIL import Image
        from torchvision.transforms import RandomResizedCrop
        from torchvision.transforms.v2.functional import pil_to_tensor
        top, left, h, w = RandomResizedCrop.get_params(img, self.scale, (3 / 4, 4 / 3))
        r = next((r for r in (8, 4, 2) if min(w, h) >= r * self.res), 1) if self.draft else 1
        with img:  # closes the file and frees the decoded image after the crop
            s, W = 1, img.width  # the image is decoded at 1/s of its full size
            if r > 1:  # faithful: the same box, resampled from a DCT-downscaled image instead of
                # the full one, bicubic either way (Pillow docs: Image.draft)
                drafted = img.draft('RGB', (img.width // r, img.height // r))
                s = W / drafted[1][2] if drafted else 1  # None: no JPEG, decoded in full
            box = (left / s, top / s, (left + w) / s, (top + h) / s)  # the crop, decoded pixels
            outer = (int(box[0]), int(box[1]), math.ceil(box[2]), math.ceil(box[3]))
            try:
                img.load()
            except Exception as e:
                raise UnreadableImage(f'cannot read image {img.filename}: {e}') from None
            part = img.crop(outer)
        if part.mode != 'RGB':  # grey, CMYK, palette: to RGB before resampling, as read_image
            part = part.convert('RGB')
        part = part.resize((self.res, self.res), Image.Resampling.BICUBIC,
                           box=(box[0] - outer[0], box[1] - outer[1],
                                box[2] - outer[0], box[3] - outer[1]))
        if torch.rand(1) < 0.5:  # RandomHorizontalFlip's draw
            part = part.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = pil_to_tensor(part).float().div_(255)  # (3, res, res), as ToTensor
        return x.sub_(self.mean).div_(self.std)


def eval_transform(res, crop_pct=0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Resize(res/0.875, bicubic) + centre crop + normalisation (256 -> 224 at res 224)."""
    from torchvision.transforms import InterpolationMode, v2
    return v2.Compose([v2.ToImage(),
                       v2.Resize(int(res / crop_pct), interpolation=InterpolationMode.BICUBIC),
                       v2.CenterCrop(res), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(mean, std)])


class KeyedDataset(torch.utils.data.Dataset):
    """Item (epoch, i) of a dataset -> (image, label, key), the transform seeded by the key; with
    `noise_len` n > 0 also the sample's mask noise key_noise(key, n), drawn here in the data
    worker so that the training step runs no loop over its samples."""

    def __init__(self, base, transform, seed, skip_bad=False):
        self.base, self.transform, self.seed, self.skip_bad = base, transform, seed, skip_bad
        self.bad, self.noise_len = 0, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, item):
        epoch, i = item
        key = sample_key(self.seed, epoch, i)
        for j in range(len(self.base)):  # --skip-bad-images: the next file replaces a bad one
            try:
                img, label = self.base[(i + j) % len(self.base)]
                with torch.random.fork_rng(devices=[]):  # crop and flip: per sample, not process
                    # the CPU generator alone: torch.manual_seed also queues a seed for each lazy
                    # device (CUDA, XPU, MTIA) with a formatted stack trace, 0.1-0.3 ms a sample
                    torch.default_generator.manual_seed(key % (1 << 63))
                    img = self.transform(img)  # DecodeCrop decodes the file here
                break
            except UnreadableImage as e:
                if not self.skip_bad:
                    raise UnreadableImage(f'{e}; fix or remove it, or pass --skip-bad-images'
                                          ) from None
                self.bad += 1
                sys.stderr.write(f'warning: skipped {e} ({self.bad} skipped by this worker)\n')
        else:
            raise ValueError(f'none of the {len(self.base)} images can be read; check the '
                             f'--data-path folder')
        if self.noise_len:
            return img, label, key, key_noise(key, self.noise_len)
        return img, label, key


class StepSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (also at world 1) that yields (epoch, index) and can start mid-epoch."""

    def __init__(self, dataset, num_replicas, rank, seed):
        super().__init__(dataset, num_replicas, rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def __iter__(self):
        return iter([(self.epoch, i) for i in list(super().__iter__())[self.skip:]])

    def __len__(self):
        return self.num_samples - self.skip


def pretrain_dataset(args, transform=None):
    """(image, label, key) items of ImageFolder at --data-path, of a named set (DATASETS), else
    of SyntheticShapes."""
    if not args.data_path:
        base = SyntheticShapes('train', args.synthetic_size, args.res, args.seed)
    elif named_set(args.data_path):
        base = named_dataset(args, 'pretrain')
    elif transform is None:  # files opened undecoded: DecodeCrop decodes what its crop needs
        base = image_folder(args.data_path, loader=functools.partial(read_image, decode=False))
        transform = DecodeCrop(args.res, args.rrc_scale, args.draft_decode, *mean_std(args))
    else:
        base = image_folder(args.data_path)
    transform = transform or pretrain_transform(args.res, args.rrc_scale, *mean_std(args))
    return KeyedDataset(base, transform, args.seed, args.skip_bad_images)


def ignore_preemption(worker_id=None):
    """In a data worker: ignore SIGTERM/SIGUSR1, so that a signal to the whole process group
    (schedulers send one) lets the main process finish its step and save; it ends the workers."""
    import signal
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


LOADERS = weakref.WeakSet()  # make_loader's loaders with workers, for stop_workers()


def make_loader(dataset, batch_size, sampler, num_workers, device, drop_last=True):
    """DataLoader: pinned memory on CUDA, persistent workers that leave preemption to the main
    process."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                         num_workers=num_workers, pin_memory=device.type == 'cuda',
                                         drop_last=drop_last, persistent_workers=num_workers > 0,
                                         worker_init_fn=ignore_preemption if num_workers else None)
    if num_workers:
        LOADERS.add(loader)
    return loader


def stop_workers(*loaders):
    """End the data workers of these loaders (none given: of every make_loader loader) now.

    The workers ignore SIGTERM (ignore_preemption), and at interpreter exit multiprocessing
    SIGTERMs its children, then waits for them: a loader still alive then (after an error its
    traceback holds it) would keep the process from ever exiting. DataLoader has no public
    shutdown; its iterator's _shutdown_workers is the one torch's own __del__ calls. A worker
    still busy after it is killed.
    """
    for loader in loaders or list(LOADERS):
        it = getattr(loader, '_iterator', None)  # persistent workers: the live iterator
        if it is None:
            continue
        if hasattr(it, '_shutdown_workers'):
            it._shutdown_workers()  # asks each worker to exit, waits up to 2 x 5 s
            for w in it._workers:
                if w.is_alive():
                    w.kill()
                    w.join()
        loader._iterator = None  # iterating it again starts new workers


# --------------------------------------------------------------------- k-NN
# One k-NN for the pre-training monitor (--eval-knn, Run.knn_monitor) and finetune.py --mode knn.

class Indexed(torch.utils.data.Dataset):
    """A share of a dataset with a fixed transform; items are (image, label, dataset index).

    skip_bad: an unreadable image comes as a blank one with label -1, which evaluation leaves out.
    """

    def __init__(self, base, transform, indices, skip_bad=False):
        self.base, self.transform, self.indices = base, transform, list(indices)
        self.skip_bad = skip_bad

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j):
        try:
            img, label = self.base[self.indices[j]]
        except UnreadableImage as e:
            if not self.skip_bad:
                raise ValueError(f'{e}; fix or remove it, or pass --skip-bad-images') from None
            sys.stderr.write(f'warning: skipped {e}\n')
            from PIL import Image
            img, label = Image.new('RGB', (8, 8)), -1  # same shape after the transform
        return self.transform(img), label, self.indices[j]


def eval_loader(base, args, rank, world, device):
    """Sequential loader over this rank's strided share of `base` (each image once, no padding)."""
    share = Indexed(base, eval_transform(args.res, mean=mean_std(args)[0], std=mean_std(args)[1]),
                    range(rank, len(base), world), args.skip_bad_images)
    return make_loader(share, args.batch_size, None, args.num_workers, device, drop_last=False)


@torch.no_grad()
def extract_features(fn, loader, device, amp, world, total, normalize=True):
    """L2-normalised features (N, D) and labels (N,) of a whole dataset in dataset order, gathered
    from all ranks with their dataset indices (HPM main_knn.py stores them by loader position);
    normalize=False: `fn` normalises its own (the monitor's two features side by side)."""
    feats, labels, index = [], [], []
    for imgs, y, i in loader:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            f = fn(imgs.to(device, non_blocking=True))
        feats.append(F.normalize(f.float(), dim=1) if normalize else f.float())
        labels.append(torch.as_tensor(y, device=device))
        index.append(torch.as_tensor(i, device=device))
    f, y, i = torch.cat(feats), torch.cat(labels), torch.cat(index)
    if world > 1:  # all_gather needs equal sizes: pad every share to the largest, with index -1
        n = torch.tensor([len(i)], device=device)
        sizes = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes, n)
        m = int(max(s.item() for s in sizes))
        pad = m - len(i)
        f = torch.cat([f, f.new_zeros(pad, f.shape[1])])
        y, i = torch.cat([y, y.new_zeros(pad)]), torch.cat([i, i.new_full((pad,), -1)])
        parts = [[torch.empty_like(t) for _ in range(world)] for t in (f, y, i)]
        for out, t in zip(parts, (f, y, i)):
            dist.all_gather(out, t)
        f, y, i = (torch.cat(p) for p in parts)
        keep = i >= 0
        f, y, i = f[keep], y[keep], i[keep]
    order = torch.argsort(i)
    assert torch.equal(i[order].cpu(), torch.arange(total)), 'every image must be seen exactly once'
    f, y = f[order], y[order]
    return f[y >= 0], y[y >= 0]  # without the images --skip-bad-images skipped (label -1)


@torch.no_grad()
def knn_classify(train_f, train_y, test_f, test_y, k, T=0.07, num_classes=None, chunk=1024):
    """DINO k-NN on L2-normalised features, votes exp(sim / T) -> (top-1, top-5) in percent."""
    num_classes = num_classes or int(train_y.max()) + 1
    k = min(k, len(train_y))
    n5 = min(5, k, num_classes)  # the official top-5 counts the first min(5, k) predictions
    hits1 = hits5 = 0
    for s in range(0, len(test_y), chunk):
        sim = test_f[s:s + chunk] @ train_f.T  # (b, N) cosine similarity
        top, idx = sim.topk(k, dim=1)  # (b, k)
        votes = torch.zeros(len(top), num_classes, device=sim.device)
        votes.scatter_add_(1, train_y[idx], (top / T).exp())  # (b, K) summed weights per class
        # facebookresearch/dino eval_knn.py:knn_classifier: all classes sorted by votes, descending.
        # Stable: tied classes (no vote) follow in ascending index, as torch's default CPU sort
        # orders them in rows of up to 16 classes; longer rows in no set order (torch 2.14).
        pred = votes.sort(dim=1, descending=True, stable=True).indices[:, :n5]  # (b, n5)
        hit = pred == test_y[s:s + chunk, None]
        hits1 += int(hit[:, 0].sum())
        hits5 += int(hit.any(1).sum())
    return 100.0 * hits1 / len(test_y), 100.0 * hits5 / len(test_y)


KNN_K, KNN_T = 20, 0.07  # the monitor's vote: DINO's default k and temperature (eval_knn.py)
# built-in data: the bank is the first 512 training images, the queries the first 256 val ones;
# three evaluations of 768 images then cost under a tenth of a smoke run (measured in the README)
KNN_BANK, KNN_QUERIES = 512, 256


class Kept(torch.utils.data.Dataset):
    """The (image, label) items of a small dataset, read once and kept, with its classes."""

    def __init__(self, base):
        self.items, self.classes = [base[i] for i in range(len(base))], base.classes

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def knn_sets(args):
    """The monitor's (bank, queries) with labels: --eval-data <root>/train and /val; else a named
    set's train and test splits, or <data-path>/train and /val when both exist; else the first KNN_BANK built-in train images (at
    most --synthetic-size) and KNN_QUERIES val images (at most as many); None when --eval-knn is 0
    or there is no val folder (said in one line)."""
    if not args.eval_knn:
        return None
    if named_set(args.data_path) and not args.eval_data:  # cifar10, ...: its train and test splits
        return eval_datasets(args)[:2]
    root = args.eval_data or args.data_path
    if root is None:  # generated once here, not at every evaluation (9 MiB at 64 px)
        n = min(KNN_BANK, args.synthetic_size)
        return (Kept(SyntheticShapes('train', n, args.res, args.seed)),
                Kept(SyntheticShapes('val', min(KNN_QUERIES, n), args.res, args.seed)))
    if not all(os.path.isdir(os.path.join(root, split)) for split in ('train', 'val')):
        if args.eval_data:
            raise ValueError(f'--eval-data {root} needs train/ and val/ class folders (the k-NN '
                             f'bank and queries)')
        print0(f'note: no k-NN monitor: {root} has no train/ and val/ folders; give --eval-data '
               f'<root with train/ and val/>')
        return None
    bank, queries = image_folder(root, 'train'), image_folder(root, 'val')
    if bank.classes != queries.classes:
        raise ValueError(f'{root}/train and /val have different class folders '
                         f'({len(bank.classes)} vs {len(queries.classes)}); they must match')
    return bank, queries


# --------------------------------------------------------------------- pictures on disk

def write_png(picture, path):
    """Save a uint8 (3, H, W) tensor as PNG with Pillow, to a temporary file then renamed (as
    save_atomic): a crash mid-write never leaves a truncated `path`."""
    from PIL import Image
    tmp = f'{path}.tmp'
    Image.fromarray(picture.permute(1, 2, 0).contiguous().numpy()).save(tmp, format='PNG')
    os.replace(tmp, path)


def picture_batch(args, n=8):
    """The picture batch: the first n images of the built-in val split (a named set's held-out
    split, or --data-path), centred."""
    tf = eval_transform(args.res, crop_pct=1.0, mean=mean_std(args)[0], std=mean_std(args)[1])
    base = (named_dataset(args, 'val') if named_set(args.data_path)
            else image_folder(args.data_path) if args.data_path
            else SyntheticShapes('val', n, args.res, args.seed))
    imgs = []
    for i in range(len(base)):
        with contextlib.suppress(ValueError):  # an unreadable file is not worth a picture
            imgs.append(tf(base[i][0]))
        if len(imgs) == n:
            break
    return torch.stack(imgs), torch.arange(len(imgs))


def save_picture(model, args, device, path, batch=None):
    """Run the model on the picture batch (`batch`, else built now) and write its picture() as PNG."""
    imgs, keys = picture_batch(args) if batch is None else batch
    was = model.training
    model.eval()
    with torch.no_grad(), torch.autocast(
            device.type, dtype=autocast_dtype(args.precision, device) or torch.float32,
            enabled=autocast_dtype(args.precision, device) is not None):
        imgs = imgs.to(device)
        write_png(model.picture(imgs, model(imgs, keys=keys)), path)
    model.train(was)


# --------------------------------------------------------------------- command line
# One parser for every script: run_parser declares the flags the loop reads, pretrain_parser adds
# the masking and model flags of the pre-training scripts, finetune.py adds its own. Defaults follow
# one rule (fill_defaults): a flag given on the command line wins; a flag left unset takes the
# first value it finds in the smoke preset (no --data-path), the named set (dataset_defaults), the
# recipe of --model, then the script's defaults. The start line `from: ...` (print_sources) says which one each value came from.

class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line `error: …` on stderr and exit code 2 (no usage dump)."""

    def error(self, message):
        """Print `error: message` and exit 2."""
        sys.stderr.write(f'error: {message}\n')
        sys.exit(2)


# Official launch and logging flags of the pre-training and fine-tuning scripts: accepted and
# ignored with a note (we always auto-resume; --nb_classes comes from the data).
LAUNCH_FLAGS = ('dist_url', 'world_size', 'device', 'pin_mem', 'no_pin_mem',
                'dist_on_itp', 'dist_eval', 'opt_level', 'auto_resume', 'start_epoch',
                'nb_classes', 'experiment')


def run_parser(method, doc, notes=None):
    """The flags common.train reads, in our and the official spellings; each script adds its own.

    notes: flag dest -> what the script says about it (its defaults), appended to the help."""
    p = ArgumentParser(prog=f'{method}.py', description=doc,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog='Defaults: a flag given here wins; a flag left out takes its value '
                       'from the smoke preset (no --data-path), else the named set (--data-path '
                       'cifar10: its native --res, mean and std), else the recipe of --model, else '
                       'the script\'s default. The start line "from: ..." names the source of '
                       'each value.')
    p.set_defaults(method=method)
    notes = notes or {}

    def a(*flags, help, **kw):
        """add_argument with the script's note appended to the help."""
        note = notes.get(kw.get('dest', flags[0].lstrip('-')))
        return p.add_argument(*flags, **kw, help=f'{help}; {note}' if note else help)
    a('--res', '--input_size', '--input-size', dest='res', type=int, help='input resolution')
    a('--epochs', type=int, help='training epochs')
    a('--warmup-epochs', '--warmup_epochs', dest='warmup_epochs', type=float,
      help='linear warm-up epochs')
    a('--blr', type=float, help='base lr: lr = blr * effective batch / 256')
    a('--lr', type=float, help='absolute lr (overrides --blr)')
    a('--min-lr', '--min_lr', dest='min_lr', type=float, help='cosine floor')
    a('--weight-decay', '--weight_decay', dest='weight_decay', type=float, help='weight decay')
    a('--batch-size', '--batch_size', dest='batch_size', type=int,
      help='images per process per micro-step')
    a('--accum-iter', '--accum_iter', dest='accum_iter', type=accum_count,
      help='gradient accumulation: micro-steps per optimizer step; auto: the fewest that reach '
      'the effective batch of the --model recipe (batch x accum x processes)')
    a('--clip-grad', '--clip_grad', dest='clip_grad', type=float,
      help='clip the global grad norm (0 or below: none)')
    a('--data-path', '--data_path', dest='data_path', nargs='+',
      help='a folder of images: class folders (ImageFolder; <root>/train used when present), or '
      'images at any depth without class folders (read unlabelled), or cifar10 | cifar100 | stl10: '
      'torchvision\'s set in --data-root, downloaded on first use, at its native --res (32 / 96) '
      'and normalised with its own mean and std (a folder of that name in the working directory '
      'is read as an image folder instead, with a note); none = built-in SyntheticShapes and the '
      'CPU smoke preset')
    a('--data-root', '--data_root', dest='data_root', default='./data',
      help='where --data-path cifar10 | cifar100 | stl10 keeps its files (default ./data)')
    a('--mean', type=float, nargs='+', metavar='M',
      help='per-colour mean of the pixels in [0, 1] that the images are normalised with, three '
      'numbers R G B (default: ImageNet\'s 0.485 0.456 0.406; a named set\'s own)')
    a('--std', type=float, nargs='+', metavar='S',
      help='per-colour std, three numbers R G B (default: ImageNet\'s 0.229 0.224 0.225; a named '
      'set\'s own)')
    a('--synthetic-size', dest='synthetic_size', type=int, default=2048,
      help='images in the built-in training data')
    a('--rrc-scale', '--rrc_scale', dest='rrc_scale', type=float, nargs=2,
      help='RandomResizedCrop scale range of the training images')
    a('--output-dir', '--output_dir', dest='output_dir', help='where log.jsonl, the checkpoints '
      'and the pictures go')
    a('--resume', help='checkpoint to resume from (default: <output-dir>/checkpoint-last.pth '
      'when present)')
    a('--log-dir', '--log_dir', dest='log_dir', metavar='DIR',
      help='also write the numbers of log.jsonl as TensorBoard events into DIR (needs the '
      'tensorboard package: pip install tensorboard); a resumed run appends to it')
    a('--seed', type=int, default=0, help='seed of the per-sample randomness')
    a('--num-workers', '--num_workers', dest='num_workers', type=int,
      help='data loader workers (default 8)')
    a('--precision', choices=('auto', 'bf16', 'fp16', 'fp32'), default='auto',
      help='auto = bf16 autocast on CUDA, fp32 on CPU; fp16 adds a GradScaler')
    a('--compile', action='store_true', help='torch.compile the model')
    a('--log-freq', dest='log_freq', type=int, help='optimizer steps between log rows (default 20)')
    a('--save-freq', '--save_ckpt_freq', '--save_freq', dest='save_freq', type=int,
      help='epochs between kept checkpoints (checkpoint-last.pth is written every epoch)')
    a('--max-steps', dest='max_steps', type=int,
      help='stop after this many optimizer steps, with a checkpoint (and an evaluation where the '
      'model has one)')
    a('--skip-nonfinite', dest='skip_nonfinite', type=int, default=0, metavar='K',
      help='drop the update of up to K steps whose loss is NaN/inf (each still counts as a step) '
      'instead of stopping')
    a('--skip-bad-images', dest='skip_bad_images', action='store_true',
      help='skip unreadable images (each is named on stderr) instead of stopping')
    a('--benchmark', type=int, default=0, metavar='N',
      help='time N training steps on synthetic batches and print one JSON line')
    a('--benchmark-data', dest='benchmark_data', type=int, default=0, metavar='N',
      help='time N batches of the input pipeline alone and print one JSON line')
    for flag in LAUNCH_FLAGS:
        p.add_argument(f'--{flag}', nargs='?', const=True, default=None, help=argparse.SUPPRESS)
    return p


def pretrain_parser(method, doc, decoder=(), norm_pix=False,
                    norm_pix_help='standardise each target patch (MAE --norm_pix_loss)',
                    heads_note=None):
    """run_parser plus the flags all pre-training scripts share; decoder: which of
    --decoder-{dim,depth,heads} exist; norm_pix: False = no --norm-pix-loss, else its default;
    heads_note: the script's word on the default of --num-heads."""
    p = run_parser(method, doc, notes=dict(
        epochs=f'default per --model (the DEFAULTS table of {method}.py)',
        min_lr='default 0 unless the method says', weight_decay='default 0.05 (AdamW)',
        accum_iter='default 1', clip_grad='none by default unless the method says',
        rrc_scale='default 0.2 1.0 (MAE pre-training)',
        output_dir=f'default output/{method}_<model>',
        save_freq='default 20'))
    a = p.add_argument
    a('--model',
      help='model preset (official names accepted, e.g. mim_vit_base, mae_vit_base_patch16)')
    a('--mask-ratio', '--mask_ratio', dest='mask_ratio', type=float,
      help='fraction of masked patches')
    names = {'dim': ('--decoder-dim', '--decoder_embed_dim'),
             'depth': ('--decoder-depth', '--decoder_depth'),
             'heads': ('--decoder-heads', '--decoder_num_heads')}
    for part in decoder:
        a(*names[part], dest=f'decoder_{part}', type=int,
          help=f'decoder {part}; default per --model (the DEFAULTS table of {method}.py)')
    # the encoder's size, as finetune.py reads it; saved in the checkpoint's args, which
    # finetune.py --ckpt reads back, so a custom size need not be repeated there
    heads = (heads_note or 'default: the --model preset') + ' (Swin: comma list per stage)'
    a('--patch-size', '--patch_size', dest='patch_size', type=positive_int,
      help='encoder patch in px; default: the --model preset (ViT 16, ViT-H 14, Swin 4)')
    a('--embed-dim', '--embed_dim', dest='embed_dim', type=positive_int,
      help='encoder width (Swin: C of the first stage); default: the --model preset')
    a('--depth', type=int_list, help='encoder blocks (Swin: comma list per stage); default: '
      'the --model preset')
    a('--num-heads', '--num_heads', dest='num_heads', type=int_list, help=f'encoder heads; {heads}')
    if norm_pix is not False:
        a('--norm-pix-loss', '--norm_pix_loss', dest='norm_pix_loss', default=norm_pix,
          action=argparse.BooleanOptionalAction, help=norm_pix_help)
    a('--draft-decode', dest='draft_decode', default=True, action=argparse.BooleanOptionalAction,
      help='decode a --data-path JPEG at 1/2, 1/4 or 1/8 of its size when the crop keeps at least '
      '--res px a side (Pillow Image.draft): the same crop box, fewer pixels (default: on)')
    a('--eval-knn', dest='eval_knn', type=int, metavar='N',
      help='k-NN monitor: top-1 of the cls token and the patch average (k 20, T 0.07 as DINO) at '
      'step 0, every N epochs and at the end; 0: off (default: off with --data-path; the smoke '
      'preset evaluates half-way)')
    a('--eval-data', dest='eval_data', metavar='PATH',
      help='the monitor\'s images: PATH/train is the bank, PATH/val the queries (default: '
      '<data-path>/train and /val when both exist; the built-in train and val splits)')
    a('--visualize', metavar='CKPT',
      help=f'no training: write one PNG of what CKPT (a {method}.py checkpoint, or the official '
      f'release) predicts, the columns of the training pictures, a row per image of --data-path '
      f'(a folder, or image files; none: the built-in val images), at --mask-ratio and --seed, '
      f'into --output-dir')
    a('--num-images', '--num_images', dest='num_images', type=positive_int, default=8,
      help='--visualize: images (rows) in the picture (default 8)')
    a('--raw-prediction', dest='raw_prediction', action='store_true',
      help='--visualize, norm-pix target: also draw the prediction as predicted, without the '
      'mean and std of the target patch that the prediction column borrows')
    a('--init-from', '--init_from', dest='init_from', metavar='CKPT',
      help='start a new run from the weights of CKPT (ours or an official release, any method '
      'whose encoder matches): the encoder, and the decoder and heads where shapes match; '
      'position tables resized; a fresh optimizer and schedule (--resume continues a run)')
    return p


# MAE's recipe per --model (official commands: decoder 8 x 512-d, 16 heads; 512 per GPU x 8; 800
# epochs, 40 warm-up); vit_tiny/small are ours, for CPUs. hpm.py and efficient_mae.py use it.
# recipe_batch: the effective batch, 4096 = 64 x 8 nodes x 8 GPUs, here 512 x 8 processes
# (facebookresearch/mae PRETRAIN.md).
MAE_DEFAULTS = {
    'vit_tiny': dict(decoder_dim=128, decoder_depth=2, decoder_heads=4, batch_size=256, epochs=100,
                     warmup_epochs=5),
    'vit_small': dict(decoder_dim=256, decoder_depth=4, decoder_heads=8, batch_size=512, epochs=800,
                      warmup_epochs=40),
    'vit_base': dict(decoder_dim=512, decoder_depth=8, decoder_heads=16, batch_size=512, epochs=800,
                     warmup_epochs=40, recipe_batch=4096),  # mae_vit_base_patch16_dec512d8b
    'vit_large': dict(decoder_dim=512, decoder_depth=8, decoder_heads=16, batch_size=512,
                      epochs=800, warmup_epochs=40,
                      recipe_batch=4096),  # not HPM's pretrain_large.sh (a ViT-B)
    'vit_huge': dict(decoder_dim=512, decoder_depth=8, decoder_heads=16, batch_size=512, epochs=800,
                     warmup_epochs=40, recipe_batch=4096),
}
MAE_NAMES = {'mae_vit_base_patch16': 'vit_base', 'mae_vit_base_patch16_dec512d8b': 'vit_base',
             'mae_vit_large_patch16': 'vit_large', 'mae_vit_large_patch16_dec512d8b': 'vit_large',
             'mae_vit_huge_patch14': 'vit_huge', 'mae_vit_huge_patch14_dec512d8b': 'vit_huge'}


def positive_int(text):
    """argparse type: an integer >= 1."""
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f'{text} is not a positive integer')
    return v


def int_list(text):
    """argparse type: 12 -> 12 (ViT), 2,2,6,2 -> [2, 2, 6, 2] (Swin, one per stage); each >= 1."""
    vals = [positive_int(v) for v in text.split(',')]
    return vals[0] if len(vals) == 1 else vals


def accum_count(text):
    """argparse type of --accum-iter: an integer (checked with the other numbers, NUMBER_RULES)
    or 'auto' (resolve_accum)."""
    return 'auto' if text == 'auto' else int(text)


def preset_sizes(model):
    """The size flags of a --model preset: patch_size, embed_dim, depth, num_heads (Swin: patch
    4, depth and num_heads per stage as lists)."""
    if model in VIT_PRESETS:
        return dict(VIT_PRESETS[model])
    c = SWIN_PRESETS[model.removesuffix('_win14')]  # LocalMIM's swin_base_win14: swin_base sizes
    return dict(patch_size=4, embed_dim=c['embed_dim'], depth=list(c['depths']),
                num_heads=list(c['num_heads']))


def encoder_config(args):
    """Constructor kwargs of the encoder of --model: its preset overridden by --patch-size,
    --embed-dim, --depth, --num-heads (pre-training and finetune.py alike; a flag may be an int,
    a list or finetune's comma string). ViT: one number each; Swin: C, depths and heads per stage."""
    cfg = preset_sizes(args.model)
    for k in cfg:
        v = getattr(args, k, None)
        if v is not None:
            cfg[k] = [int(x) for x in (v if isinstance(v, (list, tuple)) else str(v).split(','))]
    vit = args.model.startswith('vit')
    for k, v in cfg.items():
        n = v if isinstance(v, list) else [v]
        if (vit or k in ('patch_size', 'embed_dim')) and len(n) != 1:
            raise ValueError(f'--{k.replace("_", "-")} {",".join(map(str, n))}: '
                             f'{"a ViT" if vit else "Swin"} takes one number here')
        cfg[k] = n[0] if vit or k in ('patch_size', 'embed_dim') else tuple(n)
    if vit:
        if cfg['embed_dim'] % cfg['num_heads']:
            raise ValueError(f'--embed-dim {cfg["embed_dim"]} is not divisible by --num-heads '
                             f'{cfg["num_heads"]}; use a width that is a multiple of the heads')
        return cfg
    if len(cfg['depth']) != len(cfg['num_heads']):
        raise ValueError(f'Swin needs one depth and one head count per stage, got --depth '
                         f'{cfg["depth"]} and --num-heads {cfg["num_heads"]}')
    cfg['depths'] = cfg.pop('depth')
    return cfg


def mae_config(args):
    """The constructor arguments of a MAE-family model (MAE, HPM, MFF, Efficient MAE) from the
    resolved flags: the ViT size, resolution, decoder, target normalisation, mask ratio."""
    return dict(encoder_config(args), img_size=args.res, decoder_embed_dim=args.decoder_dim,
                decoder_depth=args.decoder_depth, decoder_num_heads=args.decoder_heads,
                norm_pix_loss=args.norm_pix_loss, mask_ratio=args.mask_ratio)


def parse_run(p, argv):
    """Parse; note in args.sources the flags given and the official launch flags (dropped)."""
    args = p.parse_args(argv)
    if isinstance(args.data_path, list):  # nargs='+': several image files for --visualize only
        if len(args.data_path) > 1 and not getattr(args, 'visualize', None):
            p.error(f'--data-path takes one folder, not {len(args.data_path)} paths (several '
                    f'image files: --visualize only)')
        args.data_path = args.data_path[0] if len(args.data_path) == 1 else args.data_path
    args.sources = {k: 'flag' for k, v in vars(args).items()
                    if k not in LAUNCH_FLAGS and v != p.get_default(k)}
    for f in LAUNCH_FLAGS:
        if getattr(args, f) is not None:
            args.sources[f] = 'ignored'
        delattr(args, f)
    return args


def fill_defaults(args, *layers):
    """The one rule for defaults: each flag still unset (None) takes its value from the first
    layer that has it. layers: (source, {flag: value}), first wins; the source is noted in
    args.sources for the start line."""
    sources = vars(args).setdefault('sources', {})
    for source, values in layers:
        for k, v in values.items():
            if getattr(args, k, None) is None and v is not None:
                setattr(args, k, v)
                sources[k] = source
    return args


def print_sources(args):
    """Print the note on ignored official flags and the line `from: ...`: where each value the
    parser's defaults do not give came from. Takes args.sources off args (not a flag)."""
    groups = {}
    for k, source in vars(args).pop('sources', {}).items():
        groups.setdefault(source, []).append(k)
    ignored = groups.pop('ignored', [])
    if ignored:
        print0(f'note: official launch/logging flags ignored: '
               f'{", ".join("--" + f for f in ignored)}')
    print0('from: ' + ' | '.join(f'{source}: {" ".join(keys)}' for source, keys in groups.items()))


# Length and pace of a run: the smoke preset's values win even under an explicit --model.
RUN_LENGTH_FLAGS = ('res', 'batch_size', 'epochs', 'warmup_epochs', 'blr', 'log_freq', 'save_freq',
                    'num_workers')
# What a pre-training script uses for a flag that neither the smoke preset nor the recipe sets.
PRETRAIN_DEFAULTS = dict(num_workers=8, log_freq=20, save_freq=20, accum_iter=1, min_lr=0.0,
                         weight_decay=0.05, rrc_scale=(0.2, 1.0), eval_knn=0,
                         mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))


def apply_defaults(args, table, smoke, model_names=None, default_model='vit_base', **fallback):
    """Resolve --model (official names: model_names), then fill the unset flags (fill_defaults):
    the smoke preset without --data-path, the model's row of `table`, the defaults, `fallback`.
    Under an explicit --model the smoke preset keeps the model's architecture (size, decoder, ...)."""
    chosen = args.model is not None
    if getattr(args, 'visualize', None):  # the file's model, not the smoke preset's
        smoke = {}
    default = smoke.get('model', default_model) if args.data_path is None else default_model
    args.model = (model_names or {}).get(args.model, args.model or default)
    if args.model not in table:
        raise ValueError(f'unknown --model {args.model}; choose one of {", ".join(table)}')
    if not chosen:
        vars(args).setdefault('sources', {})['model'] = 'smoke' if args.data_path is None \
            and smoke else 'default'
    # the recipe's effective batch (batch x accum x its GPUs) is no flag: kept for batch_note,
    # which the smoke preset, a batch of its own, does not get
    recipe = {k: v for k, v in table[args.model].items() if k != 'recipe_batch'}
    args.recipe_batch = table[args.model].get('recipe_batch') if args.data_path else None
    kept = {k for k in {*recipe, *preset_sizes(args.model)} if k not in RUN_LENGTH_FLAGS}
    smoke = {k: v for k, v in smoke.items() if not (chosen and k in kept)}
    return fill_defaults(args, ('smoke', smoke if args.data_path is None else {}),
                         dataset_defaults(args), (f'recipe({args.model})', recipe),
                         (f'preset({args.model})', preset_sizes(args.model)),
                         ('default', dict(PRETRAIN_DEFAULTS, **fallback,
                                          output_dir=f'output/{args.method}_{args.model}')))


def parse_pretrain(p, argv, table, smoke, model_names=None, **fallback):
    """Parse (parse_run), fill the defaults (apply_defaults; `fallback` e.g. res=128 comes last),
    check the numbers."""
    args = parse_run(p, argv)
    try:
        apply_defaults(args, table, smoke, model_names, **fallback)
        check_run_args(args)
        resolve_accum(args, launched_world())
        encoder_config(args)  # the size flags agree with each other
    except ValueError as e:
        p.error(str(e))
    return args


def launched_world():
    """The process count torchrun gives (WORLD_SIZE, with RANK and LOCAL_RANK set), else 1: known
    before the process group starts (setup_distributed), so --accum-iter auto resolves with the
    other flags."""
    if all(k in os.environ for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')):
        return int(os.environ['WORLD_SIZE'])
    return 1


def recipe_accum(recipe_batch, batch, world):
    """The fewest micro-steps whose batch x accum x world reaches recipe_batch -> (accum, exact)."""
    per = batch * world
    accum = max(1, -(-recipe_batch // per))  # ceil
    return accum, accum * per == recipe_batch


def resolve_accum(args, world):
    """--accum-iter auto -> recipe_accum for args.recipe_batch (1 without one); args.accum_auto
    says it was asked for (batch_note)."""
    args.accum_auto = args.accum_iter == 'auto'
    if args.accum_auto:
        vars(args).get('sources', {})['accum_iter'] = 'auto'  # the start line's `from: auto: ...`
        recipe = getattr(args, 'recipe_batch', None)
        args.accum_iter = recipe_accum(recipe, args.batch_size, world)[0] if recipe else 1


def batch_note(args, world):
    """One line when batch x accum x world is not the recipe's effective batch (args.recipe_batch)
    with the --accum-iter that restores it, or why none does; None when it is the recipe's, or the
    run has none (the smoke preset, our own small presets) and --accum-iter auto was not asked."""
    recipe, batch, accum = getattr(args, 'recipe_batch', None), args.batch_size, args.accum_iter
    auto = getattr(args, 'accum_auto', False)
    if not recipe:
        if not auto:
            return None
        whose = f'--model {args.model}' if args.data_path else 'the smoke preset'
        return f'note: --accum-iter auto is 1: {whose} has no recipe batch to reach'
    per_step = batch * accum * world
    if per_step == recipe:
        return None
    need, exact = recipe_accum(recipe, batch, world)
    head = (f'note: effective batch {per_step} ({batch} x {accum} x {world}) is not the '
            f'{args.model} recipe\'s {recipe}')
    if exact:
        return f'{head}; --accum-iter {need} restores it (or --accum-iter auto)'
    # no accum gives it: the nearest batch per process that does, when the processes divide it
    per_process = recipe // world
    fits = [b for b in range(min(batch, per_process), 0, -1) if per_process % b == 0]
    fix = (f'--batch-size {fits[0]} --accum-iter {per_process // fits[0]} gives {recipe}'
           if recipe % world == 0 else f'{recipe} is not divisible by {world} processes')
    if batch * world > recipe:
        return f'{head}; {batch} x {world} processes is more already: {fix}'
    took = 'auto took' if auto else 'the nearest:'
    return (f'{head}; no --accum-iter restores it exactly ({took} --accum-iter {need}, '
            f'{need * batch * world}): {fix}')


def positive(v):
    """True for a number > 0."""
    return v > 0


def at_least(lo):
    """A test: the number is lo or more."""
    return lambda v: v >= lo


# The numbers every training script checks before it prints or writes anything:
# flag -> (test, what to use instead). A flag left unset (None) is not checked.
NUMBER_RULES = {
    'res': (positive, 'a positive resolution such as 224'),
    'mask_ratio': (lambda v: 0 < v < 1, 'a fraction in (0, 1) such as 0.75'),
    'epochs': (at_least(1), '1 or more epochs'),
    'warmup_epochs': (at_least(0), '0 or more epochs'),
    'blr': (positive, 'a positive base lr such as 1.5e-4'),
    'lr': (positive, 'a positive lr, or leave it out to use --blr'),
    'min_lr': (at_least(0), '0 or a positive lr'),
    'weight_decay': (at_least(0), '0 or more'),
    'batch_size': (at_least(1), '1 or more images per process'),
    'accum_iter': (lambda v: v == 'auto' or v >= 1,
                   '1 or more micro-steps per optimizer step, or auto'),
    'synthetic_size': (at_least(1), '1 or more images'),
    'seed': (lambda v: 0 <= v < 1 << 63, 'a seed in [0, 2**63)'),
    'num_workers': (at_least(0), '0 (load in the main process) or more workers'),
    'log_freq': (at_least(1), '1 or more steps'),
    'save_freq': (at_least(1), '1 or more epochs'),
    'max_steps': (at_least(1), '1 or more steps, or leave it out'),
    'skip_nonfinite': (at_least(0), '0 or more steps'),
    'benchmark': (at_least(0), '0 or more steps'),
    'benchmark_data': (at_least(0), '0 or more batches'),
    'eval_knn': (at_least(0), '0 (off) or every N >= 1 epochs'),
    'decoder_dim': (positive, 'a positive width'),
    'decoder_depth': (at_least(0), '0 or more blocks'),
    'decoder_heads': (positive, 'a positive head count'),
    'window_size': (positive, 'a positive window such as 7'),
    'mask_size': (positive, 'a positive block size in px such as 32'),
    'hog_nbins': (positive, 'a positive bin count such as 9'),
    'rrc_scale': (lambda v: 0 < v[0] <= v[1] <= 1,
                  'two fractions MIN MAX with 0 < MIN <= MAX <= 1'),
    'mean': (lambda v: all(0 <= m <= 1 for m in v),
             'values for pixels in [0, 1] such as 0.485 0.456 0.406 (0-255 values: divide by 255)'),
    'std': (lambda v: all(0 < s <= 1 for s in v),
            'positive values for pixels in [0, 1] such as 0.229 0.224 0.225 (0-255: / 255)'),
}


def check_run_args(args, rules=NUMBER_RULES):
    """Refuse a bad number, a --data-path that is no folder, an output folder nobody can write.

    --clip-grad 0 or below means no clipping (a common spelling of "off").
    """
    for name, example in (('mean', IMAGENET_MEAN), ('std', IMAGENET_STD)):
        value = getattr(args, name, None)
        if value is not None and len(value) != 3:
            raise ValueError(f'--{name} takes three numbers, red green blue (e.g. --{name} '
                             f'{" ".join(map(str, example))}); got {len(value)}')
    for name, (ok, use) in rules.items():
        value = getattr(args, name, None)
        if value is not None and not ok(value):
            shown = ' '.join(f'{v:g}' for v in value) if isinstance(value, (list, tuple)) \
                else f'{value:g}'
            raise ValueError(f'--{name.replace("_", "-")} {shown} is out of range; use {use}')
    if getattr(args, 'clip_grad', None) is not None and args.clip_grad <= 0:
        args.clip_grad = 0.0  # off, and set: a method's own default (HPM's 5) does not fill it
    for flag in ('visualize', 'init_from'):
        path = getattr(args, flag, None)
        if path and not os.path.isfile(path):
            raise ValueError(f'--{flag.replace("_", "-")} {path} '
                             f'{"is a folder" if os.path.isdir(path) else "does not exist"}; give '
                             f'a checkpoint file')
    if getattr(args, 'init_from', None) and args.resume:
        raise ValueError('--init-from starts a new run from weights, --resume continues a run; '
                         'give one of them')
    if getattr(args, 'visualize', None) and args.data_path and not named_set(args.data_path):
        for path in args.data_path if isinstance(args.data_path, list) else [args.data_path]:
            if not os.path.exists(path):
                raise ValueError(f'--data-path {path} does not exist; give a folder or image '
                                 f'files')
    elif args.data_path and not named_set(args.data_path) and not os.path.exists(args.data_path):
        raise ValueError(f'--data-path {args.data_path} does not exist (give a folder, or one of '
                         f'{", ".join(DATASETS)})')
    elif args.data_path and not named_set(args.data_path) and not os.path.isdir(args.data_path):
        raise ValueError(f'--data-path {args.data_path} is a file; give the folder that holds the '
                         f'class folders (or their train/ folder)')
    for flag in ('output_dir', 'log_dir'):  # log_dir: TensorBoard's, when given
        given = getattr(args, flag, None)
        if flag == 'log_dir' and not given:
            continue
        folder, name = os.path.abspath(given), '--' + flag.replace('_', '-')
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
            raise ValueError(f'{name} {given} cannot be written ({folder} is not a '
                             f'writable folder); choose another {name}')
    if getattr(args, 'precision', None) == 'fp16' and not torch.cuda.is_available():
        print0('note: --precision fp16 on a CPU runs through slow fp16 kernels (about 6x slower '
               'here); fp32 (auto) is the fast path on CPUs')


# --------------------------------------------------------------------- distributed and the entry

def setup_distributed():
    """DDP iff RANK, LOCAL_RANK, WORLD_SIZE are set (torchrun), nccl/gloo -> rank, world, device."""
    cuda = torch.cuda.is_available()
    if not all(k in os.environ for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')):
        return 0, 1, torch.device('cuda' if cuda else 'cpu')
    local = int(os.environ['LOCAL_RANK'])
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        import datetime
        dist.init_process_group('nccl' if cuda else 'gloo', timeout=datetime.timedelta(minutes=30))
    device = torch.device('cuda', local) if cuda else torch.device('cpu')
    return dist.get_rank(), dist.get_world_size(), device


def print0(*args, **kwargs):
    """print() on the first process only (every process runs the same script under torchrun)."""
    if int(os.environ.get('RANK', 0)) == 0:
        print(*args, **kwargs)


def error_message(e):
    """An exception's message; one raised in a data worker by its last line (its own message)."""
    message = str(e).strip()
    if 'Original Traceback' in message:
        message = message.splitlines()[-1].split(': ', 1)[-1]
    return message


def run_main(fn, argv):
    """Run a main: a ValueError is one line `error: …`, exit 2; NonFiniteLoss exits 1; ends DDP
    and every data worker, however it ends."""
    try:
        return fn(argv)
    except (ValueError, NonFiniteLoss) as e:
        sys.stderr.write(f'error: {error_message(e)}\n')
        raise SystemExit(2 if isinstance(e, ValueError) else 1) from None
    finally:
        stop_workers()  # finetune.py's val and k-NN loaders, --benchmark-data's, any left
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(argv, get_args, build_model, make_dataset=None, from_official=None):
    """main() of a pre-training script: parse, build the model (the same on every rank), train;
    or --visualize a checkpoint. from_official: the method's reader of its official release."""
    def pretrain(argv):
        args = get_args(argv)
        torch.manual_seed(args.seed)
        if args.visualize:
            return visualize(args, build_model, from_official)
        if args.init_from:  # the weights define the run: a resume checks they are the same
            args.init_from_content = file_fingerprint(args.init_from)
        model = build_model(args)
        print_sources(args)
        return train(model, args, make_dataset, from_official)
    return run_main(pretrain, argv)


# What --visualize takes from its own command line, not from the checkpoint's saved args.
VISUALIZE_OWN = ('visualize', 'num_images', 'raw_prediction', 'data_path', 'data_root', 'seed',
                 'output_dir', 'precision', 'num_workers', 'resume', 'init_from', 'compile',
                 'benchmark', 'benchmark_data', 'max_steps', 'eval_knn', 'eval_data')


def visualize_images(args):
    """--visualize's images: --data-path's files (a folder: every image under it, sorted), the
    first --num-images that decode, else the picture batch -> (imgs (N, 3, H, W), keys (N,))."""
    n, paths = args.num_images, args.data_path
    if paths is None or named_set(paths):
        imgs, _ = picture_batch(args, n)
    else:
        from torchvision.datasets.folder import IMG_EXTENSIONS
        if isinstance(paths, str) and os.path.isdir(paths):
            paths = sorted(os.path.join(d, f) for d, _, files in os.walk(paths) for f in files
                           if f.lower().endswith(IMG_EXTENSIONS))
        tf = eval_transform(args.res, crop_pct=1.0, mean=mean_std(args)[0], std=mean_std(args)[1])
        imgs = []
        for path in [paths] if isinstance(paths, str) else paths:
            with contextlib.suppress(ValueError):  # a file that does not decode is passed over
                imgs.append(tf(read_image(path)))
            if len(imgs) == n:
                break
        if not imgs:
            raise ValueError(f'no image in --data-path {args.data_path} could be read')
        imgs = torch.stack(imgs)
    # the mask noise of --seed (seed 0: the keys of the training pictures)
    return imgs, torch.tensor([sample_key(args.seed, 0, i) for i in range(len(imgs))])


def visualize(args, build_model, from_official):
    """--visualize CKPT: build the model of a pre-training file (ours: from its saved args; an
    official release: from the flags, at the file's resolution), load it, write its picture()
    on visualize_images as one PNG into --output-dir. No training, no optimiser."""
    path = args.visualize
    obj = load_file(path)
    sd, what, saved = read_pretrained(obj, path, args.method, from_official)
    given = {k for k, source in vars(args).pop('sources', {}).items() if source == 'flag'}
    if saved is not None:  # ours: the model its run built, at its normalisation
        for k, v in saved.items():
            if k not in given and k not in VISUALIZE_OWN:
                setattr(args, k, v)
        if 'output_dir' not in given:
            args.output_dir = f'output/{args.method}_{args.model}'
    elif 'res' not in given and 'pos_embed' in sd and 'patch_embed.proj.weight' in sd:
        args.res = table_grid(sd['pos_embed'].shape[1])[1] * sd['patch_embed.proj.weight'].shape[-1]
    _, _, device = setup_distributed()
    model = build_model(args)
    epoch = obj.get('epoch') if isinstance(obj.get('epoch'), int) else 0
    if hasattr(model, 'on_epoch'):  # the file's epoch: FastMIM-P's resolution, HPM's alpha
        model.on_epoch(epoch)
        args.res = getattr(model, 'res', args.res)
    report = fit_state(model, sd, path)
    if hasattr(model, 'load_extra_state'):  # HPM's EMA teacher, ours or the official file's
        model.load_extra_state(obj)
    os.makedirs(args.output_dir, exist_ok=True)
    out = os.path.join(args.output_dir,
                       f'visualize-{os.path.splitext(os.path.basename(path))[0]}.png')
    batch = visualize_images(args)
    restore = use_normalization(*mean_std(args))
    RAW_PREDICTION[0] = args.raw_prediction
    try:
        save_picture(model.to(device), args, device, out, batch)
    finally:
        restore()
        RAW_PREDICTION[0] = False
    print0(f'{path}: {what}, {len(report["loaded"])} tensors'
           + (f', resized {", ".join(report["resized"])}' if report['resized'] else '')
           + f'; {len(batch[0])} images at res {args.res}, mask ratio {args.mask_ratio:g}, '
           f'seed {args.seed} -> {out}')
    return out


# --------------------------------------------------------------------- the loop's parts

class NonFiniteLoss(RuntimeError):
    """Raised when a step's loss is NaN or inf."""


def default_no_decay(name, param):
    """No decay for 1-D tensors and biases (timm 0.3.2 add_weight_decay, as MAE, FastMIM, HPM)."""
    return param.ndim <= 1 or name.endswith('.bias')


def param_groups(model, weight_decay, no_decay=default_no_decay):
    """Two AdamW groups (decay / no decay) of the trainable parameters; frozen tables left out."""
    decay, skip = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (skip if no_decay(name, p) else decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay}, {'params': skip, 'weight_decay': 0.0}]


# Devices where AdamW runs fused (one kernel over all tensors; CPU since torch 2.4): it measured
# faster than the per-tensor loop on CPU and gives the same update within fp32 round-off (README,
# Cost).
FUSED_ADAMW = ('cuda', 'cpu')


def make_optimizer(model, args, device):
    """The model's make_optimizer hook, else MAE's AdamW (0.9, 0.95) with the model's decay rule."""
    fused = device.type in FUSED_ADAMW
    if hasattr(model, 'make_optimizer'):
        return model.make_optimizer(args, fused)
    no_decay = getattr(model, 'no_weight_decay', default_no_decay)
    return torch.optim.AdamW(param_groups(model, args.weight_decay, no_decay), lr=args.lr,
                             betas=(0.9, 0.95), fused=fused)


def lr_at(epoch, args):
    """Lr at a fractional epoch: linear warm-up, half-cosine to min_lr (mae util/lr_sched.py)."""
    if epoch < args.warmup_epochs:
        return args.lr * epoch / args.warmup_epochs
    t = (epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-12)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def autocast_dtype(precision, device):
    """auto = bf16 on CUDA and fp32 (no autocast) on CPU."""
    if precision == 'auto':
        return torch.bfloat16 if device.type == 'cuda' else None
    return {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': None}[precision]


def resize_optimizer_state(model, optimizer, before):
    """FastMIM-P: hand each parameter the switch replaced (a resized relative-position table;
    `before` = dict(model.named_parameters()) before it) the optimizer slot and state of the one it
    replaced: AdamW's moments resized as the table, its step count kept."""
    for name, p in model.named_parameters():
        old = before.get(name, p)
        if old is not p:  # the new tensor takes the old one's place in its group, and its state
            for group in optimizer.param_groups:
                group['params'] = [p if q is old else q for q in group['params']]
            if old in optimizer.state:
                optimizer.state[p] = optimizer.state.pop(old)
        state = optimizer.state.get(p, {})
        for k, v in list(state.items()):
            if torch.is_tensor(v) and v.dim() and v.shape != p.shape:
                assert 'relative_position_bias_table' in name, (
                    f'cannot resize the optimizer state of {name}')
                v = resize_rel_pos_table(v, math.isqrt(p.shape[0]))
                state[k] = v.clamp(min=0) if k == 'exp_avg_sq' else v  # bicubic may undershoot


def logged_scalars(out):
    """The 0-d tensors of a forward's output (lists as name_0, name_1, …), detached, fixed order."""
    items = {}
    for k, v in out.items():
        if torch.is_tensor(v) and v.dim() == 0:
            items[k] = v.detach().float()
        elif (isinstance(v, (list, tuple)) and v
              and all(torch.is_tensor(t) and t.dim() == 0 for t in v)):
            items.update({f'{k}_{i}': t.detach().float() for i, t in enumerate(v)})
    return items


def optimizer_step(optimizer, scaler, params, clip_grad=None, skip=None):
    """Unscale and clip the global grad norm (if asked), step through the GradScaler, zero grads.

    skip: a 0-d float tensor, 1 = drop this update (weights, moments and step counts stay as they
    were), 0 = step; decided on the device, without the host reading it, for fused optimisers
    (the fused AdamW of every pre-training run) and under the GradScaler (which then lowers its
    scale, as after an overflow); any other optimiser reads it first (one sync).
    """
    fused = skip is not None and optimizer.defaults.get('fused') and not scaler.is_enabled()
    if skip is not None and scaler.is_enabled():  # an inf gradient makes the GradScaler skip
        g = next(p.grad for group in optimizer.param_groups for p in group['params']
                 if p.grad is not None)
        g.add_(torch.where(skip > 0, float('inf'), 0.0))
    elif skip is not None and not fused and bool(skip):
        optimizer.zero_grad(set_to_none=True)
        return
    if clip_grad:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, clip_grad)
    if fused:  # the fused kernels' skip flag, the one GradScaler sets (torch.amp.GradScaler.step)
        optimizer.found_inf = skip
    scaler.step(optimizer)
    if fused:
        del optimizer.found_inf
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def step_plan(n_images, args, world):
    """-> (effective batch, optimizer steps per epoch); unset args.lr = blr * batch / 256."""
    per_step = args.batch_size * args.accum_iter * world
    steps_per_epoch = n_images // world // args.batch_size // args.accum_iter
    if steps_per_epoch == 0:
        raise ValueError(f'{n_images} images are fewer than one step needs (batch '
                         f'{args.batch_size} x accum {args.accum_iter} x world {world} = '
                         f'{per_step}); lower --batch-size or add images')
    if args.lr is None:
        args.lr = args.blr * per_step / 256
    return per_step, steps_per_epoch


def timed(iterable, waited, clock=time.perf_counter):
    """Yield from `iterable`, adding the seconds spent blocked in it (next(), and iter() starting
    the workers) to waited[0]: wall clock only, no device sync."""
    t0 = clock()
    for item in iterable:
        waited[0] += clock() - t0
        yield item
        t0 = clock()


def catch_preemption():
    """SIGTERM/SIGUSR1 append to a list (the loop saves, exits 0) -> (list, restore handlers)."""
    import signal
    hit = []
    old = {sig: signal.signal(sig, lambda *_: hit.append(1))
           for sig in (signal.SIGTERM, signal.SIGUSR1)}
    return hit, lambda: [signal.signal(sig, h) for sig, h in old.items()]


def wrap(model, args, world, device):
    """The module the steps call: DDP when world > 1, then torch.compile with --compile."""
    wrapped = model
    if world > 1:
        # no device_ids: DDP leaves the inputs where the loop put them (the mask noise stays on the
        # host for LocalMIM Swin, which builds its windows there)
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=None,
                                                            find_unused_parameters=False)
    return torch.compile(wrapped) if args.compile else wrapped


def checkpoint_state(model, optimizer, scaler, epoch, step, args):
    """The MAE checkpoint layout + 'step', plain data only (loads with weights_only=True)."""
    state = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': epoch,
             'step': step, 'scaler': scaler.state_dict() if scaler.is_enabled() else {},
             'args': plain_data(vars(args))}
    if hasattr(model, 'extra_state'):
        state.update(model.extra_state())
    return state


# The arguments that make a run what it is: a resume with other values is refused (the saved step
# would mean another place in another schedule). More --epochs, another --blr, --max-steps: allowed.
# The files a run reads count by their content (file_fingerprint), named as below in a refusal.
RUN_DEFINING = ('method', 'mode', 'model', 'patch_size', 'embed_dim', 'depth', 'num_heads',
                'batch_size', 'accum_iter', 'mask_ratio', 'seed',
                'data_path', 'synthetic_size', 'mean', 'std', 'res_schedule', 'optimizer',
                'teacher', 'ckpt_content', 'teacher_content', 'init_from_content')
CONTENT_OF = {'ckpt_content': 'the content of the --ckpt file',
              'teacher_content': 'the content of the --teacher-path file',
              'init_from_content': 'the content of the --init-from file'}


def check_same_run(ckpt, args, path, steps_per_epoch):
    """Refuse a --resume file that is not a training checkpoint, or one saved by another run."""
    if not isinstance(ckpt, dict) or not {'model', 'optimizer', 'step', 'epoch'} <= set(ckpt):
        raise ValueError(f'{path} is not a training checkpoint (no model, optimizer, step and '
                         f'epoch); start from its weights with finetune.py --ckpt, or use another '
                         f'--output-dir')
    saved = ckpt.get('args') or {}
    names = RUN_DEFINING + (() if getattr(args, 'res_schedule', None) else ('res',))

    def same(k):
        """The saved value of k is this run's; a folder by its resolved path ('data/' = 'data')."""
        a, b = saved[k], plain_data(getattr(args, k, None))
        if k == 'data_path' and a and b:
            return os.path.realpath(a) == os.path.realpath(b)
        return a == b
    diffs = [f'{CONTENT_OF[k]} changed' if k in CONTENT_OF else
             f'--{k.replace("_", "-")} {saved[k]} -> {plain_data(getattr(args, k, None))}'
             for k in names if k in saved and not same(k)]
    if ckpt.get('steps_per_epoch', steps_per_epoch) != steps_per_epoch:
        diffs.append(f'steps per epoch {ckpt["steps_per_epoch"]} -> {steps_per_epoch} (another '
                     f'batch, accumulation, process count or data)')
    if diffs:
        raise ValueError(f'{path} was saved by another run ({"; ".join(diffs)}); resume with the '
                         f'same arguments, or use a new --output-dir')


def read_log(path):
    """The rows of a log.jsonl as (line, row) pairs; blank lines are skipped, a torn last line (a
    crash or a full disk mid-write) is dropped with a note, a torn line before it is an error."""
    with open(path) as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    rows = []
    for n, line in lines:
        try:
            rows.append((line if line.endswith('\n') else line + '\n', json.loads(line)))
        except ValueError as e:
            if n != lines[-1][0]:
                raise ValueError(f'{path} line {n} is not a JSON row ({e}); fix or delete that '
                                 f'line') from None
            sys.stderr.write(f'note: dropped the torn last line of {path}: {line.strip()[:60]}\n')
    return rows


def tensorboard_writer(log_dir, purge_step=None):
    """A TensorBoard SummaryWriter on log_dir, or None: without --log-dir, and (with a one-line
    note) without the tensorboard package, which the run does not need."""
    if not log_dir:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print0(f'note: --log-dir {log_dir} needs the tensorboard package (pip install '
               f'tensorboard); logging to log.jsonl only')
        return None
    return SummaryWriter(log_dir, purge_step=purge_step)


class RunLog:
    """<out_dir>/log.jsonl of one run, which holds <out_dir>/.lock while it is open.

    On resume the rows a crashed run wrote after its last checkpoint are dropped (they are trained
    again); a 'start' row names the run, every row carries its id, an 'end' row says how it ended.
    """

    def __init__(self, out_dir, step, args, resume):
        import fcntl
        self.lock = open(os.path.join(out_dir, '.lock'), 'a+')
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.lock.close()
            raise ValueError(f'another run is writing to {out_dir}; wait for it to end or use '
                             f'another --output-dir') from None
        self.path = os.path.join(out_dir, 'log.jsonl')
        now = time.time()  # milliseconds: two runs of one process can start within a second
        self.run = (f'{time.strftime("%Y%m%d-%H%M%S", time.localtime(now))}.'
                    f'{int(now * 1e3) % 1000:03d}-{os.getpid()}')
        if os.path.isfile(self.path):  # a torn last line is dropped before rows are appended
            with open(self.path) as f:
                text = f.read()
            kept = [line for line, row in read_log(self.path) if not resume
                    or row.get('step', 0) <= step or 'event' in row]
            if ''.join(kept) != text:
                with open(self.path + '.tmp', 'w') as f:
                    f.writelines(kept)
                os.replace(self.path + '.tmp', self.path)
        self.file = open(self.path, 'a')
        # --log-dir: a resume hides the events a crashed run wrote after its checkpoint, as the
        # rows above (TensorBoard's purge_step: steps >= step + 1)
        self.board = tensorboard_writer(getattr(args, 'log_dir', None),
                                        step + 1 if resume else None)
        self.write({'event': 'start', 'step': step, 'method': args.method, 'model': args.model,
                    'resumed_from': resume})

    def write(self, row):
        """Append one row (with the run id) and flush it; its numbers (but step and epoch, the
        axes) also go to TensorBoard under their log.jsonl names, at the row's step."""
        self.file.write(json.dumps({**row, 'run': self.run}) + '\n')
        self.file.flush()
        if self.board is not None:
            for k, v in row.items():
                if k not in ('step', 'epoch') and isinstance(v, (int, float)) \
                        and not isinstance(v, bool):
                    self.board.add_scalar(k, v, row['step'])

    def flush(self):
        """Write the TensorBoard events to disk (at each checkpoint; log.jsonl flushes by row)."""
        if self.board is not None:
            self.board.flush()

    def close(self, reason, step, checkpoint, error=None):
        """The 'end' row (naming the error, if any), then release the file and the lock (a second
        call does nothing)."""
        if self.file.closed:
            return
        row = {'event': 'end', 'reason': reason, 'step': step, 'checkpoint': checkpoint}
        if error is not None:
            message = (error_message(error).splitlines() or [''])[0]  # one line
            row['error'] = f'{type(error).__name__}: {message}' if message else type(error).__name__
        self.write(row)
        self.file.close()
        self.lock.close()
        if self.board is not None:
            self.board.close()


def newer_last(path, ckpt, last_path, args, steps_per_epoch):
    """-> (path, checkpoint) to resume: --resume X, or <output-dir>/checkpoint-last.pth when it
    is of the same run and further on, so that a requeued job that carries --resume X does not go
    back to X (and drop the log rows written since) each time it starts."""
    if not os.path.isfile(last_path) or os.path.samefile(path, last_path):
        return path, ckpt
    try:  # mmap: only its step and args are read, unless it is taken
        last = torch.load(last_path, map_location='cpu', weights_only=True, mmap=True)
        check_same_run(last, args, last_path, steps_per_epoch)
    except Exception:  # another run's or unreadable: --resume X, as asked
        return path, ckpt
    if last['step'] <= ckpt['step']:
        return path, ckpt
    print0(f'{last_path} (step {last["step"]}) is newer than --resume {path} (step '
           f'{ckpt["step"]}) of the same run: continuing from {last_path}')
    del last, ckpt
    return last_path, load_file(last_path)


def schedule_note(saved, args, step, steps_per_epoch):
    """At resume, one line when the lr schedule moved under the saved step (more --epochs
    stretch the cosine: a finished run's lr jumps up from its end value)."""
    names = ('epochs', 'warmup_epochs', 'lr', 'min_lr')
    if not all(k in saved for k in names):
        return
    old = lr_at(step / steps_per_epoch, argparse.Namespace(**{k: saved[k] for k in names}))
    new = lr_at(step / steps_per_epoch, args)
    if not math.isclose(old, new, rel_tol=1e-6, abs_tol=1e-12):  # the same numbers: equal
        changed = [k for k in names if saved[k] != getattr(args, k)]
        how = 'stretched' if set(changed) <= {'epochs', 'warmup_epochs'} else 'changed'
        print0(f'note: the lr jumps from {old:.3g} to {new:.3g} at step {step} because the '
               f'schedule is {how} (' + '; '.join(f'--{k.replace("_", "-")} {saved[k]:.4g} -> '
                                                  f'{getattr(args, k):.4g}' for k in changed) + ')')


def fast_cuda(device):
    """On CUDA: TF32 matmuls and convolutions, cudnn autotuning (the input sizes are fixed)."""
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


# --------------------------------------------------------------------- the method <-> loop contract
#
# train(model, args) runs any nn.Module that keeps this contract: the five methods, and
# finetune.py's classifier.
#
#   model(imgs, keys=keys) -> dict      Required. imgs (B, 3, H, W) normalised, keys (B,) int64: one
#                                       key per sample, which seeds its mask noise (with
#                                       noise_len: the (B, n) float noise rows already drawn from
#                                       the keys, common.sample_noise). 'loss' (0-d) is
#                                       what is optimised; every other 0-d tensor (or list of them,
#                                       logged as name_0, name_1, ...) is averaged over the log
#                                       interval into log.jsonl; other entries are for picture(). A
#                                       model whose `takes_labels` is True also gets labels=(B,).
#
# Optional hooks, called when the model has them (what happens without one in brackets):
#   no_weight_decay(name, param) -> bool    the tensors AdamW does not decay
#                                                                           [1-D tensors and biases]
#   make_optimizer(args, fused) -> optim    its own optimiser; the loop sets each group's lr every
#                                           step, times the group's 'lr_scale'
#                                                                      [AdamW (0.9, 0.95), 2 groups]
#   on_epoch(epoch) -> int | None           at the start of every epoch, also the one a resume lands
#                                           in; an int is a new input resolution: the loop rebuilds
#                                           the data, resizes the AdamW moments of resized tables,
#                                           re-wraps DDP and compile (FastMIM-P)           [nothing]
#   after_step()                            after every optimizer step, not every micro-step
#                                                                                          [nothing]
#   evaluate(epoch) -> dict                 after each completed epoch and at --max-steps; the
#                                           numbers go to log.jsonl; 'best': True also writes
#                                           checkpoint-best.pth                            [nothing]
#   picture(imgs, out) -> uint8 (3, H, W)   drawn with every checkpoint on 8 fixed images
#                                                                                       [no picture]
#   extra_state() -> dict                   more top-level checkpoint entries, e.g. 'model_ema'
#                                                                                             [none]
#   load_extra_state(checkpoint)            reads them back on resume                      [nothing]
#   describe() -> str                       one line printed under the config              [nothing]
#   encoder_features(imgs) -> (cls, avg)    the encoder on all tokens (no mask), in eval mode: the
#                                           cls token after the final norm (None without one, Swin)
#                                           and the patch average, each (B, D); for the k-NN
#                                           monitor (--eval-knn)                      [no monitor]
#   noise_len() -> int                      mask noise values per sample at the current
#                                           resolution: the data workers draw them from the keys
#                                           (KeyedDataset), so the step runs no loop over samples
#                                                               [the forward draws from the keys]
#   takes_labels (attribute)                True: the forward also gets labels (B,)     [no labels]
#   res (attribute)                         the input side the model runs at now: after on_epoch at
#                                           a resume, for the CUDA memory estimate and --benchmark
#                                                                                       [args.res]
# A method of the model one typo from a hook (`on_epochs`, `picutre`) is refused at the start
# (check_hooks): the loop would silently never call it.
#
# The args attributes the loop reads (run_parser gives them all, to the pre-training scripts
# and finetune.py alike):
#   method              the run's name: progress bar, log 'start' row, errors, benchmark rows
#   model               the log's 'start' row and the benchmark row
#   data_path           the image folder (pretrain_dataset) and the picture batch; None = built-in;
#                       cifar10 | cifar100 | stl10: torchvision's set (DATASETS) in data_root
#   mean, std           the normalisation of the images (lists; None: ImageNet's)
#   synthetic_size      built-in training images (pretrain_dataset)
#   res                 input side: crops, picture batch, benchmark; a FastMIM-P switch rewrites it
#   rrc_scale           RandomResizedCrop scale range (pretrain_dataset)
#   draft_decode        JPEG draft decoding before the crop (pretrain_dataset)
#   skip_bad_images     skip unreadable images instead of stopping (pretrain_dataset)
#   seed                sampler order, per-sample crops and mask noise, drop path
#   batch_size          images per process per micro-step
#   accum_iter          micro-steps per optimizer step (an int: 'auto' is resolved by resolve_accum)
#   epochs              the schedule's length: epochs x steps per epoch optimizer steps
#   warmup_epochs       linear lr warm-up (lr_at)
#   blr                 base lr: lr = blr x effective batch / 256 when lr is None (step_plan)
#   lr                  absolute peak lr; None: set from blr
#   min_lr              the floor of the half-cosine (lr_at)
#   weight_decay        AdamW's decay (the default optimiser)
#   clip_grad           max global gradient norm; None or 0 (--clip-grad 0 or below): none
#   precision           auto | bf16 | fp16 | fp32: the autocast dtype, a GradScaler for fp16
#   compile             torch.compile the module the steps call
#   num_workers         data-loading processes
#   output_dir          log.jsonl, checkpoints and pictures
#   resume              checkpoint to resume; None: <output_dir>/checkpoint-last.pth when present
#   init_from           a fresh run's weights (Run.resume; read_pretrained, fit_state)
#   log_freq            optimizer steps between log rows
#   log_dir             also write the log rows' numbers as TensorBoard events there; None: no
#   save_freq           also keep checkpoint-<epoch>.pth every N epochs; None or 0: never
#   max_steps           stop (evaluate, save) after N optimizer steps; None or 0: no limit
#   skip_nonfinite      K: drop up to K steps whose loss is NaN/inf, then stop
#   benchmark           N > 0: time N steps on synthetic batches, print one JSON line, no training
#   benchmark_data      N > 0: time N batches of the data pipeline alone
#   eval_knn            N > 0: the k-NN monitor at step 0, every N epochs and at the end (getattr:
#                       finetune.py has none); eval_data: its image folder (knn_sets)
# and, read with getattr (None when absent), the other names a resume must keep (RUN_DEFINING):
#   recipe_batch        the recipe's effective batch, for the start line's note (batch_note);
#                       accum_auto: --accum-iter auto was asked
#   mode                finetune.py's finetune | linear | knn
#   mask_ratio          masked share of the tokens
#   optimizer           finetune.py's linear-probe optimiser
#   teacher             finetune.py's --teacher: the checkpoint's EMA weights
#   res_schedule        FastMIM-P's --res-schedule (then res may differ at a resume)
#   ckpt_content        fingerprint of finetune.py's --ckpt file
#   teacher_content     fingerprint of HPM's --teacher-path file
#   init_from_content   fingerprint of the --init-from file (the weights a new run starts from)
# All of vars(args) is saved in every checkpoint ('args').
#
# train() returns the model, with `model.run_end` = dict(step, total, reason) where reason is
# 'done', 'max_steps', 'signal' or 'already_finished'.

HOOKS = ('no_weight_decay', 'make_optimizer', 'on_epoch', 'after_step', 'evaluate', 'picture',
         'extra_state', 'load_extra_state', 'describe', 'noise_len', 'takes_labels', 'res',
         'encoder_features')


def check_hooks(model):
    """Refuse a method or class attribute of the model one typo from a hook (`on_epochs`,
    `picutre`), which the loop would never call; nn.Module's own names and the attributes set on
    the instance (its data: `unevaluated` is no typo of `evaluate`) are not looked at."""
    names = {n for cls in type(model).__mro__ if cls not in nn.Module.__mro__ for n in vars(cls)}
    for name in sorted(n for n in names if n[0] != '_' and n not in HOOKS):
        close = difflib.get_close_matches(name, HOOKS, n=1, cutoff=0.8)
        if close:
            raise ValueError(f'{type(model).__name__}.{name} looks like the hook {close[0]}, which '
                             f'the training loop would then never call; rename it (hooks: '
                             f'{", ".join(HOOKS)})')


class Run:
    """What the steps of one training run share: the model and its optimiser, the step, the log
    interval's sums and the flags read one step late. train() below calls the steps in order."""

    def __init__(self, model, args, make_dataset, rank, world, device, from_official=None):
        self.args, self.make_dataset, self.rank, self.world = args, make_dataset, rank, world
        # the method's reader of its official files (--init-from); else only pick and strip
        self.from_official = from_official or (lambda obj: strip_prefix(pick_state_dict(obj)))
        self.dataset = make_dataset(args)
        self.per_step, self.steps_per_epoch = step_plan(len(self.dataset), args, world)
        self.total = args.epochs * self.steps_per_epoch
        self.model, self.device = model.to(device), device
        self.out_dir = args.output_dir
        self.last_path = os.path.join(self.out_dir, 'checkpoint-last.pth')
        self.step, self.resumed_from, self.lr = 0, None, 0.0
        self.log = self.bar = self.loader = self.sampler = self.wrapped = None
        # res -> the picture batch: --data-path is scanned once, not at every save
        self.pictures = {}
        self.sums, self.n_sum, self.t_log = {}, 0, time.time()  # the log interval
        self.waited = [0.0]  # seconds blocked on the loader since the last log row
        self.skipped, self.pending, self.stopping, self.signalled = 0, None, False, []
        # the k-NN monitor's images, and its last scores for the progress bar
        self.knn = knn_sets(args) if hasattr(model, 'encoder_features') and getattr(
            args, 'eval_knn', 0) else None
        self.knn_last = {}

    def resume(self):
        """The optimiser; with a checkpoint (--resume, else checkpoint-last.pth): the model at the
        saved epoch's resolution, then its weights, optimiser, GradScaler and extras."""
        model, args, spe = self.model, self.args, self.steps_per_epoch
        ckpt = None
        resume = args.resume or (self.last_path if os.path.isfile(self.last_path) else None)
        if resume:
            ckpt = load_file(resume)
            check_same_run(ckpt, args, resume, spe)
            resume, ckpt = newer_last(resume, ckpt, self.last_path, args, spe)
            if hasattr(model, 'on_epoch'):  # shapes at the saved epoch's resolution (FastMIM-P)
                model.on_epoch(ckpt['epoch'])
                if getattr(model, 'res', args.res) != args.res:  # and the crops with them
                    args.res = model.res
                    self.dataset = self.make_dataset(args)
            load_model_state(model, ckpt['model'], f'checkpoint {resume}')
            self.step, self.resumed_from = ckpt['step'], resume
        elif getattr(args, 'init_from', None):
            self.init_from(args.init_from)
        self.amp = autocast_dtype(args.precision, self.device)
        self.optimizer = make_optimizer(model, args, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        if ckpt is not None:
            self.optimizer.load_state_dict(ckpt['optimizer'])
            if ckpt.get('scaler'):
                self.scaler.load_state_dict(ckpt['scaler'])
            if hasattr(model, 'load_extra_state'):
                model.load_extra_state(ckpt)
            print0(f'resumed from {resume} at epoch {self.step // spe}, step {self.step}, '
                   f'lr {lr_at(self.step / spe, args):.3g}')
            schedule_note(ckpt.get('args') or {}, args, self.step, spe)

    def init_from(self, path):
        """--init-from: a new run starts from the weights of `path` (read_pretrained, fit_state:
        what matches; position tables resized); an EMA copy (extra_state) starts as the loaded
        weights, as it does from the init. One line says what was loaded, resized, left."""
        model = self.model
        sd, what, _ = read_pretrained(load_file(path), path, self.args.method,
                                      self.from_official, any_method=True)
        report = fit_state(model, sd, path, partial=True)
        if hasattr(model, 'extra_state'):
            model.load_extra_state({k: model.state_dict() for k in model.extra_state()})
        print0(f'init from {path} ({what}): loaded {key_summary(report["loaded"])}; resized '
               f'{", ".join(report["resized"]) or "none"}; left at init '
               f'{key_summary(report["init"])}; ignored {key_summary(report["ignored"])}')

    def announce(self):
        """Rank 0 prints the config, the derived numbers (world, effective batch, lr, steps per
        epoch, parameters), the model's line, and on CUDA when a batch is too big for the card."""
        if self.rank != 0:
            return
        args, model, device, world = self.args, self.model, self.device, self.world
        os.makedirs(self.out_dir, exist_ok=True)
        print0(f'config: {json.dumps(vars(args), default=str)}')
        if not args.data_path:
            print0(f'no --data-path: built-in SyntheticShapes data ({len(self.dataset)} images, '
                   f'10 classes) and smoke preset')
        elif named_set(args.data_path):
            print0(f'data: torchvision {args.data_path} in '
                   f'{os.path.abspath(getattr(args, "data_root", None) or "data")} '
                   f'({len(self.dataset)} images), mean {mean_std(args)[0]}, '
                   f'std {mean_std(args)[1]}')
        elif hasattr(getattr(self.dataset, 'base', None), 'samples'):  # ImageFolder, ImageFiles
            print0(data_line(self.dataset.base, args))
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print0(f'device {device}, world {world}, effective batch {self.per_step} ({args.batch_size}'
               f' x {args.accum_iter} x {world}), lr {args.lr:.3g} (blr {args.blr} x '
               f'{self.per_step}/256), {self.steps_per_epoch} steps/epoch, '
               f'{n_params / 1e6:.2f}M trainable parameters')
        note = batch_note(args, world)
        if note:
            print0(note)
        if hasattr(model, 'describe'):
            print0(model.describe())
        if device.type == 'cuda':  # a batch the card cannot hold: say so before the first step
            advice = memory_advice(estimate_memory(model, getattr(model, 'res', args.res), device,
                                                   self.amp), args.batch_size, args.accum_iter,
                                   torch.cuda.get_device_properties(device).total_memory)
            if advice:
                print0(advice)

    def finished(self):
        """True (and says so) when the run is already at its end or at --max-steps."""
        args, step, total = self.args, self.step, self.total
        self.model.run_end = dict(step=step, total=total, reason='already_finished')
        if step >= total:
            print0(f'already finished at epoch {args.epochs} ({self.last_path}): use a new '
                   f'--output-dir or more --epochs')
        elif args.max_steps and step >= args.max_steps:
            print0(f'already at --max-steps {args.max_steps} ({self.last_path}): raise it, or '
                   f'leave it out to train to the end')
        return step >= total or bool(args.max_steps and step >= args.max_steps)

    def start_epoch(self, epoch):
        """on_epoch; the data, loader and wrapped module at the first epoch and at a new resolution
        -> the epoch's micro-batches, from the step the run is at."""
        model, args = self.model, self.args
        # no step's graph is alive here (train_step's `out` ended with it): a switch may replace
        # tables
        before = dict(model.named_parameters())
        new_res = model.on_epoch(epoch) if hasattr(model, 'on_epoch') else None
        if self.loader is None or (new_res and new_res != args.res):
            if new_res and new_res != args.res:  # FastMIM-P: new crops, moments, DDP, compile
                print0(f'epoch {epoch}: resolution {args.res} -> {new_res}')
                args.res = new_res
                # the old DDP holds the old tables' gradient hooks and a bucket copy of every
                # gradient: let it go before the new one is built
                self.wrapped = None
                resize_optimizer_state(model, self.optimizer, before)
                self.dataset = self.make_dataset(args)
            self.sampler = StepSampler(self.dataset, self.world, self.rank, args.seed)
            if hasattr(model, 'noise_len'):  # the data workers draw the mask noise
                self.dataset.noise_len = model.noise_len()
            self.loader = make_loader(self.dataset, args.batch_size, self.sampler,
                                      args.num_workers, self.device)
            self.wrapped = wrap(model, args, self.world, self.device)
        self.sampler.set_epoch(epoch)
        done = self.step - epoch * self.steps_per_epoch
        self.sampler.skip = done * args.accum_iter * args.batch_size
        model.train()
        return timed(self.loader, self.waited)

    def forward_backward(self, batch, final):
        """One micro-batch: forward under autocast, backward of loss / --accum-iter (under DDP the
        gradients are all-reduced on the final micro-batch only) -> the forward's output."""
        imgs, labels, keys, *noise = batch
        imgs = imgs.to(self.device, non_blocking=True)
        inputs = dict(keys=noise[0] if noise else keys)  # noise: drawn from the keys
        if getattr(self.model, 'takes_labels', False):
            inputs['labels'] = labels.to(self.device, non_blocking=True)
        sync = contextlib.nullcontext() if final or self.world == 1 else self.wrapped.no_sync()
        with sync:
            with torch.autocast(self.device.type, dtype=self.amp or torch.float32,
                                enabled=self.amp is not None):
                out = self.wrapped(imgs, **inputs)
            self.scaler.scale(out['loss'] / self.args.accum_iter).backward()
        for k, v in logged_scalars(out).items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.n_sum += 1
        return out

    def train_step(self, batches):
        """One optimizer step over --accum-iter micro-batches of `batches`: forward and backward,
        the step's flags, the update, after_step; then the flags of the step before are read."""
        args, device = self.args, self.device
        for micro in range(args.accum_iter):
            batch = next(batches)
            if micro == 0:  # after the fetch: starting an epoch's loader draws from torch's RNG
                # drop path (and fine-tuning's mixup): a function of the step
                torch.manual_seed(((args.seed * 1_000_003 + self.step) * 1009 + self.rank)
                                  % (1 << 64))
                self.lr = lr_at(self.step / self.steps_per_epoch, args)
                for g in self.optimizer.param_groups:
                    g['lr'] = self.lr * g.get('lr_scale', 1.0)
            out = self.forward_backward(batch, final=micro == args.accum_iter - 1)
            bad = (~torch.isfinite(out['loss'].detach())).float()
            nonfinite = bad if micro == 0 else nonfinite + bad  # any micro-step's loss
        # the step's flags stay on the device: a non-finite loss makes the optimizer step
        # a no-op there, and the host reads them one step late (resolve), so that the
        # device queue is never drained for them
        flags = torch.stack([nonfinite,  # torch.full: a fill kernel, no host-to-device copy
                             torch.full((), float(bool(self.signalled)), device=device)])
        if self.world > 1:
            dist.all_reduce(flags)  # every rank decides alike; queued on the device
        # alone: no wait needed
        self.stopping = self.stopping or (self.world == 1 and bool(self.signalled))
        optimizer_step(self.optimizer, self.scaler, self.model.parameters(), args.clip_grad,
                       skip=(flags[0] > 0).float())
        if hasattr(self.model, 'after_step'):
            self.model.after_step()  # HPM's EMA: after a dropped update too (same weights)
        self.step += 1
        self.bar.update(1)
        self.resolve()  # the previous step's flags
        # on CUDA a copy into pinned memory that waits for nothing, and an event that
        # tells when it has landed; resolve() reads it a step later
        copied = torch.cuda.Event() if device.type == 'cuda' else None
        host_flags = flags.to('cpu', non_blocking=True)
        if copied is not None:
            copied.record()
        self.pending = (host_flags, copied, self.step - 1, logged_scalars(out))

    def resolve(self):
        """Read the last step's flags, one step late (the device has the next step queued by
        then): a non-finite loss, whose update the device already dropped (optimizer_step), is
        counted against --skip-nonfinite or stops the run; a signal on any rank sets `stopping`."""
        if self.pending is None:
            return
        (flags, copied, at, terms), self.pending = self.pending, None
        if copied is not None:
            copied.synchronize()  # the copy of a step ago: long done, so no wait and no stall
        bad, signalled_any = flags.tolist()
        self.stopping = self.stopping or bool(signalled_any)
        if not bad:
            return
        terms = {k: float(v) for k, v in terms.items()}
        args = self.args
        # --skip-nonfinite: the step stays, its update is dropped
        if self.skipped < args.skip_nonfinite:
            self.skipped += 1
            print0(f'warning: non-finite loss at step {at} skipped '
                   f'({self.skipped}/{args.skip_nonfinite}): {terms}')
            self.sums, self.n_sum = {}, 0
            return
        good = self.last_path if os.path.isfile(self.last_path) else 'none yet'
        raise NonFiniteLoss(f'non-finite loss at step {at} (epoch {at // self.steps_per_epoch}) of '
                            f'{args.method}: {terms}; last good checkpoint: {good} '
                            f'(resume from it with a lower --blr, or pass '
                            f'--skip-nonfinite K)')

    def log_interval(self):
        """One log.jsonl row: the means of the logged scalars since the last row (all ranks)."""
        self.resolve()  # the values are read here anyway; a skipped step empties the interval
        if self.n_sum == 0:
            return
        names = sorted(self.sums)
        vals = torch.stack([self.sums[k] for k in names]).to(self.device) / self.n_sum
        if self.world > 1:
            dist.all_reduce(vals)
            vals /= self.world
        seconds = time.time() - self.t_log
        row = {'step': self.step, 'epoch': round(self.step / self.steps_per_epoch, 4),
               'lr': self.lr,
               'img_per_s': round(self.n_sum / self.args.accum_iter * self.per_step / seconds, 2),
               'data_wait': round(min(self.waited[0] / seconds, 1.0), 4)}  # share blocked on data
        row.update({k: float(v) for k, v in zip(names, vals.tolist())})
        if self.log:
            self.log.write(row)
            self.bar.set_postfix(loss=f'{row["loss"]:.4f}', **self.knn_last)
        self.sums, self.n_sum, self.t_log, self.waited[0] = {}, 0, time.time(), 0.0

    def save(self, epoch, keep, path=None):
        """Rank 0 writes the checkpoint (and the picture); every rank waits for it."""
        self.resolve()  # never save a state before its last step is known to be finite
        path = path or self.last_path
        if self.rank == 0:
            state = checkpoint_state(self.model, self.optimizer, self.scaler, epoch, self.step,
                                     self.args)
            state['steps_per_epoch'] = self.steps_per_epoch
            save_atomic(state, path)
            if self.log:  # the TensorBoard events up to the checkpoint
                self.log.flush()
            if keep:  # a copy of the file: serialising a large model again takes as long as saving
                copy_atomic(path, os.path.join(self.out_dir, f'checkpoint-{epoch}.pth'))
            if hasattr(self.model, 'picture') and path == self.last_path:
                self.draw(epoch, keep)
        if self.world > 1:
            dist.barrier()  # no rank runs ahead (or shuts the group down) while rank 0 writes

    def draw(self, epoch, keep):
        """picture-last.png (and a kept copy picture-<epoch>.png) on the fixed picture batch."""
        args, picture = self.args, os.path.join(self.out_dir, 'picture-last.png')
        if args.res not in self.pictures:  # built again only at a new resolution (FastMIM-P)
            self.pictures.clear()
            self.pictures[args.res] = picture_batch(args)
        save_picture(self.model, args, self.device, picture, self.pictures[args.res])
        if keep:
            copy_atomic(picture, os.path.join(self.out_dir, f'picture-{epoch}.png'))

    def end_epoch(self, epoch, at_max):
        """After an epoch or at --max-steps: evaluate (saved first), log its numbers, save (kept
        every --save-freq epochs and at the end)."""
        args, model = self.args, self.model
        if hasattr(model, 'evaluate'):
            self.save(epoch, keep=False)  # first: an evaluation that fails loses no training
            metrics = model.evaluate(epoch)
            if metrics.pop('best', False):
                self.save(epoch, keep=False, path=os.path.join(self.out_dir, 'checkpoint-best.pth'))
            if self.log:
                self.log.write({'step': self.step, 'epoch': round(self.step / self.steps_per_epoch,
                                                                  4), **metrics})
        keep = bool(args.save_freq) and not at_max and (epoch % args.save_freq == 0
                                                        or self.step == self.total)
        self.save(epoch, keep)  # kept: epochs 0, f, 2f, … and the last, as MAE and LocalMIM
        # the monitor after the save: its row is never written twice (a resume starts after it)
        if self.knn is not None and (at_max or self.step == self.total
                                     or (epoch + 1) % args.eval_knn == 0):
            self.knn_monitor()

    @torch.no_grad()
    def knn_monitor(self):
        """k-NN top-1 (percent) of the encoder's cls and patch-average features (encoder_features,
        eval mode, no mask): the bank's and the queries' features, each rank its share (gathered
        in dataset order, so any world size gives one process's scores), DINO's vote with k 20,
        T 0.07 (knn_classify, as finetune.py --mode knn) -> a log row, a console line, the bar."""
        if self.knn is None:
            return
        model, args = self.model, self.args
        bank, queries = self.knn
        has_cls, start = [], time.perf_counter()

        def features(imgs):
            """(B, 3, H, W) -> [cls | avg] each L2-normalised, (B, 2D) (Swin: avg, (B, D))."""
            cls, avg = model.encoder_features(imgs)
            has_cls[:] = [cls is not None]
            return torch.cat([F.normalize(f.float(), dim=1) for f in (cls, avg)
                              if f is not None], 1)  # (B, 2D) or (B, D)

        was = model.training
        model.eval()
        feats = []
        # the monitor's loaders draw from the global RNG: training's draws stay as without it
        with torch.random.fork_rng(devices=[]):
            for base in (bank, queries):  # eval transform for both (DINO)
                loader = eval_loader(base, args, self.rank, self.world, self.device)
                feats.append(extract_features(features, loader, self.device, self.amp, self.world,
                                              len(base), normalize=False))
                stop_workers(loader)
        model.train(was)
        (bank_f, bank_y), (query_f, query_y) = feats
        if has_cls[0]:
            D = bank_f.shape[1] // 2
            pairs = [(bank_f[:, :D], query_f[:, :D]), (bank_f[:, D:], query_f[:, D:])]
        else:
            pairs = [None, (bank_f, query_f)]
        scores = [None if p is None else round(knn_classify(
            p[0], bank_y, p[1], query_y, KNN_K, KNN_T, len(bank.classes))[0], 4) for p in pairs]
        row = {'event': 'knn', 'step': self.step,
               'epoch': round(self.step / self.steps_per_epoch, 4),
               'knn_cls': scores[0], 'knn_avg': scores[1],
               'seconds': round(time.perf_counter() - start, 2)}  # the monitor's cost
        shown = ' '.join(f'{name} {"-" if v is None else f"{v:.2f}"}'
                         for name, v in zip(('cls', 'avg'), scores))
        print0(f'k-NN top-1 at step {self.step} (epoch {row["epoch"]:g}): {shown} ({len(bank_y)} '
               f'bank, {len(query_y)} query images, k {KNN_K})')
        self.knn_last = {'knn': shown}
        if self.log:
            self.log.write(row)
            self.bar.set_postfix(**self.knn_last)
        if self.world > 1:
            dist.barrier()  # as after save(): no rank runs ahead (or shuts the group down)

    def stopped(self):
        """After a signal, with the step saved: how to continue, then end the run (exit 0)."""
        print0(f'stopped by a signal at step {self.step}: {self.last_path} saved; run the same '
               f'command to continue')
        return self.end('signal')

    def end(self, reason):
        """Close the run: the last partial interval, an 'end' row, the model's run_end."""
        self.log_interval()
        self.bar.close()
        if self.log:
            self.log.close(reason, self.step, self.last_path)
        self.model.run_end = dict(step=self.step, total=self.total, reason=reason)
        return self.model


def train(model, args, make_dataset=None, from_official=None):
    """Train `model` (the contract above) on CPU, one GPU or torchrun; exact resume, preemption.
    from_official: the method's reader of its release files, for --init-from."""
    check_hooks(model)
    make_dataset = make_dataset or pretrain_dataset
    rank, world, device = setup_distributed()
    torch.manual_seed(args.seed + rank)  # only randomness not tied to a sample (drop path)
    fast_cuda(device)  # before the benchmarks too: they time what a run runs
    if args.benchmark_data:
        return benchmark_data(args, device, make_dataset)
    if args.benchmark:
        return benchmark(model, args, device)
    run = Run(model, args, make_dataset, rank, world, device, from_official)
    run.resume()
    run.announce()
    if run.finished():
        return run.model
    run.log = RunLog(run.out_dir, run.step, args, run.resumed_from) if rank == 0 else None
    run.signalled, restore_signals = catch_preemption()
    restore_normalization = use_normalization(*mean_std(args))  # for the pictures (denormalize)
    try:
        from tqdm import tqdm
        run.bar = tqdm(total=min(run.total, args.max_steps or run.total), initial=run.step,
                       disable=rank != 0, desc=args.method, mininterval=2)
        if run.step == 0:  # the random-init baseline (a resumed run logged it already)
            run.knn_monitor()
        run.t_log = time.time()
        while run.step < run.total:
            epoch = run.step // run.steps_per_epoch
            batches = run.start_epoch(epoch)
            while True:
                run.train_step(batches)
                if run.step % args.log_freq == 0 or run.step == run.total:
                    run.log_interval()
                if run.stopping:  # preemption: save the step, skip the evaluation, exit 0
                    run.save(epoch, keep=False)
                    return run.stopped()
                at_max = bool(args.max_steps and run.step >= args.max_steps)
                if at_max or run.step % run.steps_per_epoch == 0:
                    break
            batches.close()  # the epoch's micro-batches end here, as a for loop's break ends them
            run.end_epoch(epoch, at_max)
            if at_max:
                return run.end('max_steps')
            if run.stopping and run.step < run.total:  # a signal read with the epoch's last step
                return run.stopped()
        print0(f'done: {run.step} steps, checkpoints and pictures in {run.out_dir}')
        return run.end('done')
    except BaseException as e:  # also a closed stdout pipe (BrokenPipeError) or Ctrl-C
        if run.log:
            run.log.close('error', run.step, run.last_path, error=e)
        if run.bar is not None:  # now, not at exit: the error line stays the last line
            with contextlib.suppress(OSError):
                run.bar.close()
        raise
    finally:
        restore_signals()  # also when the run ends with an error (in-process callers)
        restore_normalization()
        if run.loader is not None:
            stop_workers(run.loader)  # every way out, before the process exits (stop_workers)


def plain_data(obj):
    """Only plain data (str, int, float, bool, None, list, dict): loads with weights_only=True."""
    if isinstance(obj, dict):
        return {str(k): plain_data(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_data(v) for v in obj]
    return obj if isinstance(obj, (str, int, float, bool, type(None))) else str(obj)


# --------------------------------------------------------------------- benchmarks

def count_flops(model, imgs, **kw):
    """Forward + backward FLOPs of a training step on `imgs`, attention included (SDPA math)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(imgs, **kw)['loss'].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def peak_memory_mb(device):
    """CUDA max allocated, or the process's peak resident set on CPU, in MB."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def saved_bytes(model, imgs, amp=None, **inputs):
    """Bytes one training forward keeps for backward: every saved tensor's storage once, except
    the model's own parameters and buffers (they are there anyway)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = []

    def pack(t):
        """Note a saved tensor (weakly: one a dropped branch saved dies with it) and keep it."""
        saved.append(weakref.ref(t))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(
            imgs.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        out = model(imgs, **inputs)
        alive = [t for t in (r() for r in saved) if t is not None]  # while the graph holds them
        sizes = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in alive}
    del out
    return sum(n for ptr, n in sizes.items() if ptr not in own)


def estimate_memory(model, res, device, amp=None, batches=(2, 4)):
    """Training memory in bytes = fixed + per_image x batch, from the bytes saved for backward on
    two small batches (linear in the batch) plus 16 B per trainable parameter (fp32 weight, grad,
    AdamW's two moments), 4 B per other parameter and buffer, and extra_state() (HPM's teacher).
    Leaves out the backward's transient buffers and the allocator's rounding."""
    was_training = model.training
    model.train()
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        sizes = []
        for b in batches:
            inputs = dict(keys=torch.arange(b))
            if getattr(model, 'takes_labels', False):
                inputs['labels'] = torch.arange(b, device=device) % model.num_classes
            imgs = torch.randn(b, 3, res, res, device=device)
            sizes.append(saved_bytes(model, imgs, amp, **inputs))
    model.train(was_training)
    per_image = max(sizes[1] - sizes[0], 0) / (batches[1] - batches[0])
    states = {}  # storage -> (bytes, trainable): each tensor once, tied weights too
    extra = model.extra_state() if hasattr(model, 'extra_state') else {}
    tensors = [*model.parameters(), *model.buffers(), *(v for d in extra.values()
                                                        if isinstance(d, dict) for v in d.values()
                                                        if torch.is_tensor(v))]
    for t in tensors:
        s = t.untyped_storage()
        states[s.data_ptr()] = (s.nbytes(), t.requires_grad or states.get(s.data_ptr(), (0, 0))[1])
    fixed = sum(n * (4 if trainable else 1) for n, trainable in states.values())
    return {'per_image': per_image, 'fixed': fixed + max(sizes[0] - per_image * batches[0], 0)}


def memory_advice(est, batch, accum, total, usable=0.9):
    """None if `batch` fits in `usable` of `total` bytes (estimate_memory's `est`), else one line
    with the largest --batch-size that fits and the --accum-iter that keeps batch x accum."""
    gib = 2 ** 30
    need = est['fixed'] + est['per_image'] * batch
    if need <= usable * total:
        return None
    per_gpu = batch * accum  # the recipe's images per optimizer step and GPU
    fits = [b for b in range(1, batch) if per_gpu % b == 0
            and est['fixed'] + est['per_image'] * b <= usable * total]
    head = (f'warning: --batch-size {batch} needs about {need / gib:.1f} GiB (estimated: '
            f'{est["fixed"] / gib:.1f} GiB + {est["per_image"] / 2 ** 20:.1f} MiB per image), '
            f'more than {usable:.0%} of this GPU\'s {total / gib:.1f} GiB; ')
    if not fits:
        return head + 'even --batch-size 1 does not fit: use a smaller --model or --res'
    b = fits[-1]
    return head + (f'use --batch-size {b} --accum-iter {per_gpu // b} (the same {per_gpu} images '
                   f'per step and GPU)')


def benchmark(model, args, device, warmup=2):
    """--benchmark N: time N training steps on synthetic batches (no data), print one JSON line."""
    # a step of the run's middle epoch (HPM's teacher pass, FastMIM-P's resolution), its optimiser
    epoch = args.epochs // 2
    if hasattr(model, 'on_epoch'):
        model.on_epoch(epoch)
    res = getattr(model, 'res', args.res)
    model = model.to(device)
    amp = autocast_dtype(args.precision, device)
    imgs = torch.randn(args.batch_size, 3, res, res, device=device)
    keys = torch.arange(args.batch_size)
    if args.lr is None:
        args.lr = args.blr * args.batch_size / 256
    opt = make_optimizer(model, args, device)
    net = torch.compile(model) if args.compile else model
    times = []
    # the mask noise as the data workers hand it to a training step: drawn, not timed
    noise = (torch.stack([key_noise(k, model.noise_len()) for k in keys.tolist()])
             if hasattr(model, 'noise_len') else keys)  # (B, n)
    inputs = dict(keys=noise.to(device))
    if getattr(model, 'takes_labels', False):
        inputs['labels'] = keys.to(device) % 1000
    for i in range(warmup + args.benchmark):
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = net(imgs, **inputs)['loss']
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if hasattr(model, 'after_step'):
            model.after_step()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - t0, time.process_time() - c0))
    step = sorted(t for t, _ in times)[len(times) // 2]
    cpu = sorted(c for _, c in times)[len(times) // 2]  # all threads; 1 thread: ~ idle wall time
    b = torch.backends.cuda  # the SDPA backend switches (sdpa_kernel), for every device
    fused_sdpa = b.flash_sdp_enabled() or b.mem_efficient_sdp_enabled() or b.cudnn_sdp_enabled()
    n = min(2, args.batch_size)
    flops = count_flops(model, imgs[:n], **{k: v[:n] for k, v in inputs.items()}) / n
    row = {'method': args.method, 'model': args.model, 'res': res, 'batch': args.batch_size,
           'epoch': epoch, 'device': device.type,
           'dtype': str(amp or torch.float32).replace('torch.', ''),
           'attention': 'sdpa' if fused_sdpa else 'math', 'optimizer': type(opt).__name__,
           'fused_adamw': bool(opt.defaults.get('fused')), 'threads': torch.get_num_threads(),
           'img_per_s': round(args.batch_size / step, 2), 'step_ms_median': round(step * 1e3, 2),
           'cpu_ms_median': round(cpu * 1e3, 2),
           'flops_per_img': int(flops), 'tflops': round(flops * args.batch_size / step / 1e12, 4),
           'peak_mem_mb': round(peak_memory_mb(device), 1)}
    est = estimate_memory(model, res, device, amp)
    row['est_mem_mb'] = round((est['fixed'] + est['per_image'] * args.batch_size) / 2 ** 20, 1)
    print0(json.dumps(row))
    return row


def benchmark_data(args, device, make_dataset=pretrain_dataset):
    """--benchmark-data N: time N batches of the input pipeline alone, print one JSON line."""
    import resource

    def cpu():
        """CPU seconds of this process and of its finished children (the data workers)."""
        return sum(u.ru_utime + u.ru_stime for u in map(
            resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))
    dataset = make_dataset(args)
    step_plan(len(dataset), args, 1)  # a folder smaller than one batch is refused, as in training
    sampler = StepSampler(dataset, 1, 0, args.seed)
    per_epoch = len(sampler) // args.batch_size * args.batch_size
    items = []
    for epoch in range(-(-(args.benchmark_data + 1) * args.batch_size // per_epoch)):
        sampler.set_epoch(epoch)
        items += list(sampler)[:per_epoch]  # one sampler over the epochs: no refill between them
    cpu0 = cpu()
    loader = make_loader(dataset, args.batch_size, items, args.num_workers, device)
    it, n, t0 = iter(loader), 0, None
    for i in range(args.benchmark_data + 1):
        imgs = next(it)[0]
        if i == 0:  # the first batch pays for worker start-up
            t0 = time.perf_counter()
        else:
            n += imgs.shape[0]
    rate = n / (time.perf_counter() - t0)
    del it, loader  # the workers exit, so that their CPU time is counted
    cpu_ms = (cpu() - cpu0) * 1e3 / (n + imgs.shape[0])  # all batches: cores = img/s x ms / 1000
    row = {'method': args.method, 'res': args.res, 'batch': args.batch_size,
           'workers': args.num_workers, 'img_per_s': round(rate, 1),
           'img_per_s_per_worker': round(rate / max(args.num_workers, 1), 1),
           'cpu_ms_per_img': round(cpu_ms, 2), 'data': args.data_path or 'SyntheticShapes',
           'load': round(os.getloadavg()[0], 2)}
    print0(json.dumps(row))
    return row
