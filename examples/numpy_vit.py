"""A Vision Transformer forward pass in plain NumPy, written to be read, copied and verified.

    python -m parity verify examples/numpy_vit.py:vit --checkpoint ckpt.npz --input x.npy

`vit(params, x)` is what `parity verify` calls: `params` maps the official parameter names
('Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel', ...) to float32 arrays, `x` is a
float32 batch of NHWC images in [-1, 1]. It returns the named intermediates the harness
compares (any subset would do; `logits` is the one that must be there).

Everything the architecture needs is read off the parameter shapes: width, heads, patch
size, depth, class token or global average pooling, a representation layer, a hybrid
ResNet stem. The numerics are the official code's, and each place where other libraries
differ says so: tanh GELU, LayerNorm eps 1e-6, queries scaled before the dot product,
weight-standardised convolutions, TF `SAME` padding.

Nothing here imports the project: copy the file and change it.

Shapes: B batch, N tokens, D width, H heads, Dh = D // H, M MLP width, C channels, h x w a grid,
G GroupNorm groups.
"""

import math

import numpy as np

LN_EPS = 1e-6  # the official LayerNorm eps (PyTorch's default is 1e-5, transformers' 1e-12)
GN_EPS = 1e-6  # GroupNorm in the hybrid stem, 32 groups


# --------------------------------------------------------------------------- building blocks

def gelu(x):
    """GELU, tanh approximation: flax's `nn.gelu` default, so the official model's (timm and transformers use erf)."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def layer_norm(x, scale, bias):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + LN_EPS) * scale + bias


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def attention(x, p, prefix):
    """Multi-head self-attention with the parameters of flax's MultiHeadDotProductAttention."""
    q = np.einsum('bnd,dhk->bnhk', x, p[prefix + 'query/kernel']) + p[prefix + 'query/bias']  # (B, N, H, Dh)
    k = np.einsum('bnd,dhk->bnhk', x, p[prefix + 'key/kernel']) + p[prefix + 'key/bias']  # (B, N, H, Dh)
    v = np.einsum('bnd,dhk->bnhk', x, p[prefix + 'value/kernel']) + p[prefix + 'value/bias']  # (B, N, H, Dh)
    q = q / np.sqrt(q.shape[-1]).astype(q.dtype)  # the queries are scaled, not the logits, as in flax
    weights = softmax(np.einsum('bqhk,bshk->bhqs', q, k))  # (B, H, N, N)
    y = np.einsum('bhqs,bshk->bqhk', weights, v)  # (B, N, H, Dh)
    out = np.einsum('bnhk,hkd->bnd', y, p[prefix + 'out/kernel']) + p[prefix + 'out/bias']  # (B, N, D)
    return out, weights


def mlp(x, p, prefix):
    h = gelu(x @ p[prefix + 'Dense_0/kernel'] + p[prefix + 'Dense_0/bias'])  # (B, N, M)
    return h @ p[prefix + 'Dense_1/kernel'] + p[prefix + 'Dense_1/bias']  # (B, N, D)


def encoder_block(x, p, prefix):
    """Pre-norm block: x + attention(LN(x)), then x + MLP(LN(x)). `prefix` names the block's parameters."""
    y, weights = attention(layer_norm(x, p[prefix + 'LayerNorm_0/scale'], p[prefix + 'LayerNorm_0/bias']), p,
                           prefix + 'MultiHeadDotProductAttention_0/')
    x = x + y
    x = x + mlp(layer_norm(x, p[prefix + 'LayerNorm_1/scale'], p[prefix + 'LayerNorm_1/bias']), p,
                prefix + 'MlpBlock_0/')
    return x, weights


# --------------------------------------------------------------------------- the hybrid ResNet stem

def same_padding(size, kernel, stride):
    """TF `SAME`: output ceil(size / stride); an odd pixel of padding goes at the end (PyTorch pads both sides)."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def conv2d(x, kernel, stride, pad_value=0.0):
    """NHWC convolution with an HWIO kernel, TF `SAME` padding."""
    kh, kw, _, _ = kernel.shape
    x = np.pad(x, ((0, 0), same_padding(x.shape[1], kh, stride), same_padding(x.shape[2], kw, stride), (0, 0)),
               constant_values=pad_value)
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]
    return np.tensordot(windows, kernel.transpose(2, 0, 1, 3), axes=([3, 4, 5], [0, 1, 2]))  # (B, h, w, O)


def std_conv(x, kernel, stride=1):
    """Weight standardisation per output channel: (w - mean) / (std + 1e-5), eps on the std (timm: sqrt(var + eps))."""
    kernel = (kernel - kernel.mean((0, 1, 2))) / (kernel.std((0, 1, 2)) + 1e-5)
    return conv2d(x, kernel, stride)


def group_norm(x, scale, bias, groups=32):
    B, h, w, C = x.shape
    g = x.reshape(B, h, w, groups, C // groups)  # (B, h, w, G, C/G)
    mean = g.mean((1, 2, 4), keepdims=True)
    var = ((g - mean) ** 2).mean((1, 2, 4), keepdims=True)
    return ((g - mean) / np.sqrt(var + GN_EPS)).reshape(B, h, w, C) * scale + bias  # (B, h, w, C)


def max_pool(x):
    """3x3, stride 2, TF `SAME` padding with -inf."""
    x = np.pad(x, ((0, 0), same_padding(x.shape[1], 3, 2), same_padding(x.shape[2], 3, 2), (0, 0)),
               constant_values=-np.inf)
    return np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(1, 2))[:, ::2, ::2].max((-2, -1))


def residual_unit(x, p, prefix, stride):
    """Post-activation bottleneck: 1x1, 3x3 (strided), 1x1, each GroupNorm'd; projected residual when shapes change."""
    def conv_norm(y, name, s=1):
        return group_norm(std_conv(y, p[f'{prefix}conv{name}/kernel'], s), p[f'{prefix}gn{name}/scale'],
                          p[f'{prefix}gn{name}/bias'])

    residual = conv_norm(x, '_proj', stride) if f'{prefix}conv_proj/kernel' in p else x
    y = np.maximum(conv_norm(x, '1'), 0)
    y = np.maximum(conv_norm(y, '2', stride), 0)
    return np.maximum(residual + conv_norm(y, '3'), 0)


def resnet_stem(x, p):
    """Root (7x7 stride-2 conv, GroupNorm, ReLU, max-pool), then stages block1, block2, ... (stride 2 after block1)."""
    x = np.maximum(group_norm(std_conv(x, p['conv_root/kernel'], 2), p['gn_root/scale'], p['gn_root/bias']), 0)
    x = max_pool(x)
    stage = 1
    while f'block{stage}/unit1/conv1/kernel' in p:
        unit = 1
        while f'block{stage}/unit{unit}/conv1/kernel' in p:
            x = residual_unit(x, p, f'block{stage}/unit{unit}/', 2 if stage > 1 and unit == 1 else 1)
            unit += 1
        stage += 1
    return x


# --------------------------------------------------------------------------- the model

def vit(params, x):
    """The official ViT forward pass; returns every named intermediate (see the module docstring)."""
    p = params
    out = {}
    if 'conv_root/kernel' in p:  # a hybrid: the ResNet feeds the patch embedding
        x = resnet_stem(x, p)
        out['stem'] = x  # (B, h, w, C)

    # Patch embedding: a conv with stride = kernel = patch size, written as a matmul over patches.
    ph, pw, C, D = p['embedding/kernel'].shape
    B, height, width, _ = x.shape
    gh, gw = height // ph, width // pw
    patches = x[:, :gh * ph, :gw * pw].reshape(B, gh, ph, gw, pw, C)  # (B, gh, ph, gw, pw, C)
    patches = patches.transpose(0, 1, 3, 2, 4, 5)  # (B, gh, gw, ph, pw, C)
    x = patches.reshape(B, gh * gw, ph * pw * C) @ p['embedding/kernel'].reshape(ph * pw * C, D)
    x = x + p['embedding/bias']  # (B, N, D), tokens in row-major grid order
    out['embedding'] = x

    if 'cls' in p:  # class-token classifier; without it the model pools by averaging
        x = np.concatenate([np.broadcast_to(p['cls'], (B, 1, D)), x], axis=1)
    x = x + p['Transformer/posembed_input/pos_embedding']
    out['with_posemb'] = x

    i = 0
    while f'Transformer/encoderblock_{i}/LayerNorm_0/scale' in p:
        x, out[f'attention_{i}'] = encoder_block(x, p, f'Transformer/encoderblock_{i}/')
        out[f'encoderblock_{i}'] = x
        i += 1
    x = layer_norm(x, p['Transformer/encoder_norm/scale'], p['Transformer/encoder_norm/bias'])
    out['encoder_norm'] = x

    x = x[:, 0] if 'cls' in p else x.mean(axis=1)  # (B, D)
    if 'pre_logits/kernel' in p:  # the representation layer of the imagenet21k checkpoints
        x = np.tanh(x @ p['pre_logits/kernel'] + p['pre_logits/bias'])
    out['pre_logits'] = x
    out['logits'] = x @ p['head/kernel'] + p['head/bias'] if 'head/kernel' in p else x
    return out
