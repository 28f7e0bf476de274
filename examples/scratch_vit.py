"""A Vision Transformer from scratch in PyTorch, written the way tutorials write it.

    python -m parity verify examples/scratch_vit.py:build --module --checkpoint ckpt.npz

Its own names (`to_patch`, `transformer`, `attn.qkv`, `ff`), a fused qkv, a Linear patch
embedding over patches flattened as einops' 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)' (written
with reshape and permute, so einops is not needed), and `nn.GELU()`. `build(config)` is
what `verify --module` calls: `config` is a plain dict of sizes (image_size, patch_size,
hidden_size, num_layers, num_heads, mlp_dim, num_classes, classifier, representation_size).

It differs from the official ViT in one place, as most from-scratch ViTs do: `nn.GELU()` is the
exact erf GELU where the official code uses the tanh approximation. `verify --module`
stops it at encoderblock_0's MLP and names the cause; `GELU_APPROXIMATE = 'tanh'` fixes it.

Nothing here imports the project: copy the file and change it.

Shapes: B batch, N tokens, D width, H heads, Dh = D // H, M MLP width, p patch size, C channels.
"""

import torch
from torch import nn

GELU_APPROXIMATE = 'none'  # nn.GELU()'s default, exact erf; the official ViT: 'tanh'


class FeedForward(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, hidden_dim),
                                 nn.GELU(approximate=GELU_APPROXIMATE), nn.Linear(hidden_dim, dim))

    def forward(self, x):
        return self.net(x)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        x = self.norm(x)
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads)  # (B, N, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, N, Dh)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
        out = attn.softmax(dim=-1) @ v  # (B, H, N, Dh)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_dim):
        super().__init__()
        self.attn = Attention(dim, heads)
        self.ff = FeedForward(dim, mlp_dim)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.ff(x)


class ViT(nn.Module):
    def __init__(self, image_size, patch_size, dim, depth, heads, mlp_dim, num_classes, pool='cls'):
        super().__init__()
        self.patch_size = patch_size
        num_patches = (image_size // patch_size) ** 2
        self.to_patch = nn.Linear(patch_size * patch_size * 3, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + (pool == 'cls'), dim))
        self.transformer = nn.ModuleList([Block(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pool = pool
        self.head = nn.Linear(dim, num_classes)

    def patchify(self, img):
        """'b c (h p1) (w p2) -> b (h w) (p1 p2 c)' with reshape and permute."""
        B, C, height, width = img.shape
        p = self.patch_size
        x = img.reshape(B, C, height // p, p, width // p, p)  # (B, C, h, p1, w, p2)
        x = x.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p1, p2, C)
        return x.reshape(B, (height // p) * (width // p), p * p * C)  # (B, N, p*p*C)

    def forward(self, img):
        x = self.to_patch(self.patchify(img))  # (B, N, D)
        if self.pool == 'cls':
            x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        x = x + self.pos_embedding
        for block in self.transformer:
            x = block(x)
        x = self.norm(x)
        x = x[:, 0] if self.pool == 'cls' else x.mean(dim=1)
        return self.head(x)


def build(config):
    """What `parity verify --module` calls: the model for the checkpoint's sizes."""
    return ViT(config['image_size'], config['patch_size'], config['hidden_size'], config['num_layers'],
               config['num_heads'], config['mlp_dim'], config['num_classes'],
               pool='cls' if config['classifier'] == 'token' else 'mean')
