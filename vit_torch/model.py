"""Vision Transformer in PyTorch, the mirror of `vit_jax/model.py`.

Same classes, same order, same submodule names as the Flax model, so every
state-dict key is the official parameter name with '.' for '/' (the layouts are in
`parity.core.weights.formats.vit_torch.TORCH_LAYOUT`). Numerics follow the official code, not PyTorch
habits: tanh GELU, LayerNorm eps 1e-6 (unless the config says otherwise: a file whose library computes
another, as timm's erf GELU), weight-standardised convolutions with
GroupNorm(32, 1e-6), TF `SAME` padding. For bf16 compute run under
`torch.autocast`; the parameters stay float32.

Shapes: B batch, N tokens, Q query tokens (N in self-attention), D width, H heads,
Dh = D // H, M MLP size, h x w the patch grid, C channels. Images are NCHW in [-1, 1].

Named intermediates (see `parity.core.intermediates`) are recorded through `Module.sow`,
flax's idea: a no-op unless a recorder is attached (`vit_torch.inspect`), so the
plain forward pass pays one attribute lookup per sow.

`fast=True` takes the fast path where it serves: the same function from the same
parameters, with the kernels of `vit_torch.fast`. This file chooses it in one place (the
attention); what is written here is the teaching path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from parity.core import posemb
from parity.core.config import ViTConfig
from vit_torch import fast as fast_path


class Module(nn.Module):
    """`nn.Module` with flax's `sow`: hands a named value to the attached recorder, if any."""

    recorder = None  # set per instance by vit_torch.inspect; callable(collection, module, name, value)

    def sowing(self, collection: str) -> bool:
        return self.recorder is not None and self.recorder.wants(collection)

    def sow(self, collection: str, name: str, value: torch.Tensor) -> None:
        if self.recorder is not None:
            self.recorder(collection, self, name, value)


def lecun_normal_(w: torch.Tensor) -> torch.Tensor:
    """flax's lecun_normal: truncated normal (2 std) with variance 1/fan_in."""
    fan_in = w[0].numel()
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # std of a unit normal truncated at 2
    return nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)


def pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """TF `SAME` padding: output size ceil(in / stride), any odd pixel padded at the end."""
    h, w = x.shape[-2:]
    ph = max((math.ceil(h / stride) - 1) * stride + kernel - h, 0)
    pw = max((math.ceil(w / stride) - 1) * stride + kernel - w, 0)
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=value)


class MlpBlock(Module):
    """Dense, GELU, Dense, with dropout after each; the official GELU is the tanh approximation."""

    def __init__(self, dim: int, mlp_dim: int, dropout_rate: float = 0.0, gelu: str = 'tanh'):
        super().__init__()
        self.Dense_0 = nn.Linear(dim, mlp_dim)
        self.Dense_1 = nn.Linear(mlp_dim, dim)
        self.dropout_rate = dropout_rate
        self.gelu = gelu  # 'erf' for files whose library computes the exact GELU (timm, transformers' "gelu")
        for dense in (self.Dense_0, self.Dense_1):
            nn.init.xavier_uniform_(dense.weight)
            nn.init.normal_(dense.bias, std=1e-6)

    def forward(self, x):
        x = self.Dense_0(x)  # (B, N, M)
        x = F.gelu(x, approximate='tanh' if self.gelu == 'tanh' else 'none')  # the official model's: the tanh form
        x = F.dropout(x, self.dropout_rate, self.training)
        x = self.Dense_1(x)  # (B, N, D)
        return F.dropout(x, self.dropout_rate, self.training)


class Attention(Module):
    """Multi-head attention with the parameters of flax's MultiHeadDotProductAttention.

    By hand, as the paper writes it; `fast` takes `vit_torch.fast.attention` where it can serve.
    Self-attention unless `kv` is given: then the queries come from `x`, keys and values from
    `kv` (the MAP head's probe attending over the tokens).
    """

    def __init__(self, dim: int, num_heads: int, dropout_rate: float = 0.0, fast: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.dropout_rate = dropout_rate
        self.fast = fast
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        for proj in (self.query, self.key, self.value, self.out):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, x, kv=None):
        if self.fast and kv is None and fast_path.serves_attention(self):
            return fast_path.attention(self, x)  # (B, N, D)
        kv = x if kv is None else kv
        B, Q, D = x.shape
        N = kv.shape[1]
        H = self.num_heads
        Dh = D // H
        q = self.query(x).view(B, Q, H, Dh).transpose(1, 2)  # (B, H, Q, Dh)
        k = self.key(kv).view(B, N, H, Dh).transpose(1, 2)  # (B, H, N, Dh)
        v = self.value(kv).view(B, N, H, Dh).transpose(1, 2)  # (B, H, N, Dh)
        # Scale the queries rather than the logits, as flax does: same rounding as the official model.
        q = q / math.sqrt(Dh)
        logits = q @ k.transpose(-2, -1)  # (B, H, Q, N)
        weights = logits.float().softmax(dim=-1).to(q.dtype)  # (B, H, Q, N)
        self.sow('attention', 'attention', weights)
        weights = F.dropout(weights, self.dropout_rate, self.training)
        y = weights @ v  # (B, H, Q, Dh)
        y = y.transpose(1, 2).reshape(B, Q, D)  # (B, Q, D)
        return self.out(y)


class DropPath(Module):
    """Stochastic depth: drops a residual branch for a whole example with probability `rate`.

    The kept examples' branches are scaled by 1 / (1 - rate), so the expected sum is
    unchanged and evaluation (or rate 0) is the identity, as in timm and DeiT.
    """

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = rate

    def forward(self, x):
        if not self.training or self.rate == 0.0:
            return x
        B, N, D = x.shape
        keep = torch.rand(B, 1, 1, device=x.device) < 1.0 - self.rate  # one draw per example
        return torch.where(keep, x / (1.0 - self.rate), torch.zeros_like(x))


class EncoderBlock(Module):
    """Pre-norm transformer block: x + Attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, mlp_dim: int, num_heads: int, dropout_rate: float = 0.0,
                 attention_dropout_rate: float = 0.0, drop_path_rate: float = 0.0, fast: bool = False,
                 gelu: str = 'tanh', layer_norm_eps: float = 1e-6):
        super().__init__()
        self.LayerNorm_0 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.MultiHeadDotProductAttention_0 = Attention(dim, num_heads, attention_dropout_rate, fast)
        self.LayerNorm_1 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.MlpBlock_0 = MlpBlock(dim, mlp_dim, dropout_rate, gelu)
        self.dropout_rate = dropout_rate
        self.DropPath_0, self.DropPath_1 = DropPath(drop_path_rate), DropPath(drop_path_rate)

    def forward(self, x):
        y = self.LayerNorm_0(x)
        y = self.MultiHeadDotProductAttention_0(y)
        y = F.dropout(y, self.dropout_rate, self.training)
        x = x + self.DropPath_0(y)
        y = self.LayerNorm_1(x)
        y = self.MlpBlock_0(y)
        x = x + self.DropPath_1(y)
        self.sow('intermediates', 'output', x)
        return x


class AddPositionEmbs(Module):
    """Adds one embedding per token position: learned, or big_vision's fixed sincos2d table for `grid`."""

    def __init__(self, num_tokens: int, dim: int, posemb: str = 'learn', grid: tuple[int, int] = (0, 0)):
        super().__init__()
        self.posemb, self.grid = posemb, grid
        if posemb == 'learn':
            self.pos_embedding = nn.Parameter(torch.empty(1, num_tokens, dim))
            nn.init.normal_(self.pos_embedding, std=0.02)

    def forward(self, x):
        B, N, D = x.shape
        if self.posemb == 'sincos2d':  # the class token, first, gets a zero row: no position
            pe = torch.tensor(posemb.sincos_2d(self.grid, D, N - self.grid[0] * self.grid[1]), device=x.device)
        else:
            pe = self.pos_embedding  # (1, N, D)
        return x + pe.to(x.dtype)


class Encoder(Module):
    """Position embeddings, `num_layers` blocks, final LayerNorm."""

    def __init__(self, num_tokens: int, dim: int, num_layers: int, mlp_dim: int, num_heads: int,
                 dropout_rate: float = 0.0, attention_dropout_rate: float = 0.0,
                 drop_path_rates: tuple[float, ...] = (), fast: bool = False,
                 posemb: str = 'learn', grid: tuple[int, int] = (0, 0), gelu: str = 'tanh',
                 layer_norm_eps: float = 1e-6):
        super().__init__()
        self.posembed_input = AddPositionEmbs(num_tokens, dim, posemb, grid)
        self.num_layers = num_layers
        self.dropout_rate = dropout_rate
        for i in range(num_layers):
            rate = drop_path_rates[i] if drop_path_rates else 0.0
            self.add_module(f'encoderblock_{i}', EncoderBlock(dim, mlp_dim, num_heads, dropout_rate,
                                                              attention_dropout_rate, rate, fast, gelu,
                                                              layer_norm_eps))
        self.encoder_norm = nn.LayerNorm(dim, eps=layer_norm_eps)

    def forward(self, x):
        x = self.posembed_input(x)
        self.sow('intermediates', 'with_posemb', x)
        x = F.dropout(x, self.dropout_rate, self.training)
        for i in range(self.num_layers):
            x = getattr(self, f'encoderblock_{i}')(x)
        x = self.encoder_norm(x)
        self.sow('intermediates', 'encoded', x)
        return x


class MAPHead(Module):
    """Multihead attention pooling, as big_vision's MAPHead: a learned probe attends over the tokens.

    The attention's output gets an MLP with a residual; the LayerNorm eps and GELU are the
    trunk's (1e-6 and tanh in the official numerics).
    """

    def __init__(self, dim: int, mlp_dim: int, num_heads: int, gelu: str = 'tanh', layer_norm_eps: float = 1e-6):
        super().__init__()
        self.probe = nn.Parameter(torch.empty(1, 1, dim))
        nn.init.xavier_uniform_(self.probe)
        self.MultiHeadDotProductAttention_0 = Attention(dim, num_heads)
        self.LayerNorm_0 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.MlpBlock_0 = MlpBlock(dim, mlp_dim, gelu=gelu)

    def forward(self, x):
        B, N, D = x.shape
        probe = self.probe.to(x.dtype).expand(B, -1, -1)  # (B, 1, D)
        x = self.MultiHeadDotProductAttention_0(probe, x)  # (B, 1, D)
        y = self.LayerNorm_0(x)
        x = x + self.MlpBlock_0(y)
        return x[:, 0]  # (B, D)


class StdConv(Module):
    """Convolution with weight standardisation, TF `SAME` padding, no bias."""

    def __init__(self, in_channels: int, features: int, kernel_size: int, strides: int = 1):
        super().__init__()
        self.kernel_size = kernel_size
        self.strides = strides
        self.weight = nn.Parameter(torch.empty(features, in_channels, kernel_size, kernel_size))
        lecun_normal_(self.weight)

    def forward(self, x):
        w = self.weight
        # Standardise over (in, kh, kw) per output channel; eps added to the std, not the variance.
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        std = w.std(dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (w - mean) / (std + 1e-5)
        x = pad_same(x, self.kernel_size, self.strides)
        return F.conv2d(x, w.to(x.dtype), stride=self.strides)


class ResidualUnit(Module):
    """Post-activation bottleneck: 1x1, 3x3 (strided), 1x1, each GroupNorm'd; projected residual."""

    def __init__(self, in_channels: int, features: int, strides: int = 1):
        super().__init__()
        self.needs_projection = in_channels != features * 4 or strides != 1
        if self.needs_projection:
            self.conv_proj = StdConv(in_channels, features * 4, 1, strides)
            self.gn_proj = nn.GroupNorm(32, features * 4, eps=1e-6)
        self.conv1 = StdConv(in_channels, features, 1)
        self.gn1 = nn.GroupNorm(32, features, eps=1e-6)
        self.conv2 = StdConv(features, features, 3, strides)
        self.gn2 = nn.GroupNorm(32, features, eps=1e-6)
        self.conv3 = StdConv(features, features * 4, 1)
        self.gn3 = nn.GroupNorm(32, features * 4, eps=1e-6)
        nn.init.zeros_(self.gn3.weight)  # a zero scale starts each unit as the identity

    def forward(self, x):
        residual = x
        if self.needs_projection:
            residual = self.gn_proj(self.conv_proj(x))
        y = F.relu(self.gn1(self.conv1(x)))
        y = F.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return F.relu(residual + y)


class ResNetStage(Module):
    """`block_size` residual units; the first may stride."""

    def __init__(self, in_channels: int, block_size: int, nout: int, first_stride: int):
        super().__init__()
        self.block_size = block_size
        self.unit1 = ResidualUnit(in_channels, nout, first_stride)
        for i in range(1, block_size):
            self.add_module(f'unit{i + 1}', ResidualUnit(nout * 4, nout, 1))

    def forward(self, x):
        for i in range(self.block_size):
            x = getattr(self, f'unit{i + 1}')(x)
        return x


class VisionTransformer(Module):
    """The official ViT (and R+ViT hybrid) for one `ViTConfig`, built at `config.image_size`.

    Takes NCHW images in [-1, 1]. `fast` takes the fast path (`vit_torch.fast`): fused attention.
    With the `token_distilled` classifier (DeiT) the class and distillation heads' logits are
    averaged, or with `both_heads=True` returned as a pair (class head, distillation head).
    """

    def __init__(self, config: ViTConfig, fast: bool = False):
        super().__init__()
        cfg = self.config = config
        D = cfg.hidden_size
        channels = 3
        if cfg.is_hybrid:
            W = cfg.resnet_width
            self.conv_root = StdConv(3, W, 7, 2)
            self.gn_root = nn.GroupNorm(32, W, eps=1e-6)
            channels = W
            for i, units in enumerate(cfg.resnet_num_layers):
                self.add_module(f'block{i + 1}', ResNetStage(channels, units, W * 2 ** i, 1 if i == 0 else 2))
                channels = W * 2 ** i * 4
        self.embedding = nn.Conv2d(channels, D, cfg.patch_size, stride=cfg.patch_size)
        lecun_normal_(self.embedding.weight)
        nn.init.zeros_(self.embedding.bias)
        if cfg.has_dist_token:
            self.dist_token = nn.Parameter(torch.empty(1, 1, D))
            nn.init.normal_(self.dist_token, std=0.02)
        if cfg.has_cls_token:
            self.cls = nn.Parameter(torch.zeros(1, 1, D))
        self.Transformer = Encoder(cfg.num_tokens, D, cfg.num_layers, cfg.mlp_dim, cfg.num_heads,
                                   cfg.dropout_rate, cfg.attention_dropout_rate, cfg.drop_path_rates, fast,
                                   cfg.posemb, cfg.grid_size, cfg.gelu, cfg.layer_norm_eps)
        if cfg.classifier == 'map':
            self.MAPHead_0 = MAPHead(D, cfg.mlp_dim, cfg.num_heads, cfg.gelu, cfg.layer_norm_eps)
        features = D
        if cfg.representation_size is not None:
            self.pre_logits = nn.Linear(D, cfg.representation_size)
            lecun_normal_(self.pre_logits.weight)
            nn.init.zeros_(self.pre_logits.bias)
            features = cfg.representation_size
        if cfg.num_classes:
            self.head = nn.Linear(features, cfg.num_classes)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
            if cfg.has_dist_token:
                self.head_dist = nn.Linear(features, cfg.num_classes)
                nn.init.zeros_(self.head_dist.weight)
                nn.init.zeros_(self.head_dist.bias)

    def forward(self, images, both_heads: bool = False):
        cfg = self.config
        x = images  # (B, 3, h, w)
        if cfg.is_hybrid:
            x = self.conv_root(x)  # (B, W, h/2, w/2)
            x = F.relu(self.gn_root(x))
            x = F.max_pool2d(pad_same(x, 3, 2, float('-inf')), 3, 2)  # (B, W, h/4, w/4)
            for i in range(len(cfg.resnet_num_layers)):
                x = getattr(self, f'block{i + 1}')(x)
            self.sow('intermediates', 'stem', x)
        x = self.embedding(x)  # (B, D, h, w)
        B, D, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        self.sow('intermediates', 'patch_tokens', x)
        if cfg.has_dist_token:  # DeiT's distillation token goes after the class token
            x = torch.cat([self.dist_token.to(x.dtype).expand(B, -1, -1), x], dim=1)  # (B, N, D)
        if cfg.has_cls_token:
            x = torch.cat([self.cls.to(x.dtype).expand(B, -1, -1), x], dim=1)  # (B, N, D)
        x = self.Transformer(x)
        if cfg.has_dist_token:
            x, x_dist = x[:, 0], x[:, 1]  # (B, D) each
        elif cfg.classifier in ('token', 'first'):
            x = x[:, 0]  # (B, D)
        elif cfg.classifier == 'gap':
            x = x.mean(dim=1)  # (B, D)
        elif cfg.classifier == 'map':
            x = self.MAPHead_0(x)  # (B, D)
        if cfg.representation_size is not None:
            x = torch.tanh(self.pre_logits(x))
        self.sow('intermediates', 'features', x)
        if cfg.num_classes:
            with torch.autocast(x.device.type, enabled=False):  # logits in float32, as in vit_jax
                x = self.head(x.float())
                if cfg.has_dist_token:
                    x_dist = self.head_dist(x_dist.float())
                    if both_heads:
                        return x, x_dist
                    x = (x + x_dist) / 2  # DeiT's inference: the mean of the two heads
        self.sow('intermediates', 'logits', x)
        return x
