"""`verify FILE.py:BUILD --module`: user-style torch ViTs, every layout alternative and planted faults.

The models are built here the way people write them (their own names, a fused or separate
qkv, nn.MultiheadAttention, a Conv2d or a Linear patch embedding over flattened patches in
several orders). Most tests call `automap` and the verdict in-process (what verify's child and
parent do, without the child process); one runs `verify --module` whole.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import REPO, images, random_params, tiny
from parity.core import weights
from parity.core.errors import UserError
from parity.harness import automap, stepcheck, verdict, verify

CFG = tiny()  # 32x32 images, 8x8 patches, width 32, 2 blocks of 4 heads, MLP 64, 5 classes


class UserAttention(nn.Module):
    """Self-attention in one of the layouts people write: fused qkv (3, H, Dh) or (H, 3, Dh), separate q/k/v,
    or torch's own nn.MultiheadAttention; `fault` plants one bug."""

    def __init__(self, D, H, layout, fault):
        super().__init__()
        self.H, self.layout, self.fault = H, layout, fault
        bias = fault != 'missing_bias'
        if layout == 'mha':
            self.mha = nn.MultiheadAttention(D, H, batch_first=True)
            return
        if layout.startswith('fused'):
            self.qkv = nn.Linear(D, 3 * D, bias=bias)
        else:
            self.query, self.key, self.value = (nn.Linear(D, D, bias=bias) for _ in range(3))
        self.out = nn.Linear(D, D)

    def forward(self, x):
        if self.layout == 'mha':
            return self.mha(x, x, x, need_weights=False)[0]
        B, N, D = x.shape
        H, Dh = self.H, D // self.H
        if self.layout == 'fused3':
            q, k, v = self.qkv(x).reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4)  # each (B, H, N, Dh)
        elif self.layout == 'fusedH':
            q, k, v = self.qkv(x).reshape(B, N, H, 3, Dh).permute(3, 0, 2, 1, 4)
        else:
            q, k, v = (f(x).reshape(B, N, H, Dh).transpose(1, 2) for f in (self.query, self.key, self.value))
        if self.fault == 'swapped_qk':
            q, k = k, q
        if self.fault != 'unscaled_queries':
            q = q * Dh ** -0.5
        y = (q @ k.transpose(-2, -1)).softmax(-1) @ v  # (B, H, N, Dh)
        y = y.transpose(1, 2).reshape(B, N, D)
        if self.fault == 'out_projection_transposed':
            return y @ self.out.weight + self.out.bias
        return self.out(y)


class UserBlock(nn.Module):
    def __init__(self, D, H, M, layout, fault):
        super().__init__()
        eps = 1e-3 if fault == 'layernorm_eps' else 1e-6
        # A hand-written LayerNorm (w, b) beside nn.Linear projections, in the separate-q/k/v layout.
        norm = (lambda: RawNorm(D, eps)) if layout == 'separate' else (lambda: nn.LayerNorm(D, eps=eps))
        self.norm1, self.norm2 = norm(), norm()
        self.attn = UserAttention(D, H, layout, fault)
        self.fc1, self.fc2 = nn.Linear(D, M), nn.Linear(M, D)
        self.gelu = 'none' if fault == 'erf_gelu' else 'tanh'

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate=self.gelu))


class UserViT(nn.Module):
    """patch: 'conv' or a flattening order of a Linear patch embedding ('p1 p2 c', 'c p1 p2', ...)."""

    def __init__(self, config, patch='conv', layout='fused3', fault=None, depth=None):
        super().__init__()
        D, p, C = config['hidden_size'], config['patch_size'], config['num_classes']
        n = (config['image_size'] // p) ** 2
        self.p, self.patch, self.fault = p, patch, fault
        self.embed = nn.Conv2d(3, D, p, p) if patch == 'conv' else nn.Linear(p * p * 3, D)
        self.class_token = nn.Parameter(torch.zeros(1, 1, D))
        self.positions = nn.Parameter(torch.zeros(1, n + 1, D))
        self.layers = nn.ModuleList(UserBlock(D, config['num_heads'], config['mlp_dim'], layout, fault)
                                    for _ in range(depth or config['num_layers']))
        self.ln = nn.LayerNorm(D, eps=1e-6)
        self.classifier = nn.Linear(D, C)

    def tokens(self, img):
        B, C, h, w = img.shape
        p = self.p
        if self.patch == 'conv':
            x = self.embed(img)  # (B, D, gh, gw)
            x = x.transpose(2, 3) if self.fault == 'token_order' else x
            return x.flatten(2).transpose(1, 2)
        x = img.reshape(B, C, h // p, p, w // p, p)  # (B, c, gh, p1, gw, p2)
        axes = {'c': 1, 'p1': 3, 'p2': 5}
        grid = (4, 2) if self.fault == 'token_order' else (2, 4)
        x = x.permute(0, *grid, *(axes[a] for a in self.patch.split()))
        return self.embed(x.reshape(B, (h // p) * (w // p), p * p * C))

    def forward(self, img):
        x = self.tokens(img)
        positions = self.positions.detach() if self.fault == 'detached_posemb' else self.positions
        x = torch.cat([self.class_token.expand(len(x), -1, -1), x], 1) + positions
        for layer in self.layers:
            x = layer(x)
        return self.classifier(self.ln(x)[:, 0])


class Patches(nn.Module):
    """einops' Rearrange('b c (h p1) (w p2) -> b (h w) (p1 p2 c)') as a module, as lucidrains' vit-pytorch has it."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, img):
        B, C, h, w = img.shape
        x = img.reshape(B, C, h // self.p, self.p, w // self.p, self.p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(B, -1, self.p * self.p * C)


class PreNormAttention(nn.Module):
    def __init__(self, D, H):
        super().__init__()
        self.H, self.norm = H, nn.LayerNorm(D, eps=1e-6)
        self.to_qkv = nn.Linear(D, 3 * D, bias=False)
        self.to_out = nn.Sequential(nn.Linear(D, D), nn.Dropout(0.0))

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.to_qkv(self.norm(x)).reshape(B, N, 3, self.H, D // self.H).permute(2, 0, 3, 1, 4)
        y = ((q @ k.transpose(-2, -1)) * (D // self.H) ** -0.5).softmax(-1) @ v
        return self.to_out(y.transpose(1, 2).reshape(B, N, D))


class LucidStyleViT(nn.Module):
    """Blocks as ModuleList([attention, feedforward]) containers that never run as modules, LayerNorms inside the
    branches, a bias-free qkv, an nn.Embedding of positions."""

    def __init__(self, config):
        super().__init__()
        D, M, p = config['hidden_size'], config['mlp_dim'], config['patch_size']
        self.to_patch_embedding = nn.Sequential(Patches(p), nn.Linear(p * p * 3, D))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos = nn.Embedding((config['image_size'] // p) ** 2 + 1, D)
        self.layers = nn.ModuleList(nn.ModuleList([
            PreNormAttention(D, config['num_heads']),
            nn.Sequential(nn.LayerNorm(D, eps=1e-6), nn.Linear(D, M), nn.GELU('tanh'), nn.Linear(M, D))])
            for _ in range(config['num_layers']))
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.mlp_head = nn.Linear(D, config['num_classes'])

    def forward(self, img):
        x = self.to_patch_embedding(img)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos.weight
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.mlp_head(self.norm(x)[:, 0])


class RawNorm(nn.Module):
    def __init__(self, D, eps=1e-6):
        super().__init__()
        self.w, self.b, self.eps = nn.Parameter(torch.ones(D)), nn.Parameter(torch.zeros(D)), eps

    def forward(self, x):
        x = x - x.mean(-1, keepdim=True)
        return x / (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt() * self.w + self.b


class RawAttention(nn.Module):
    def __init__(self, D, H):
        super().__init__()
        Dh = D // H
        self.W_Q, self.W_K, self.W_V = (nn.Parameter(torch.randn(H, D, Dh)) for _ in range(3))
        self.W_O = nn.Parameter(torch.randn(H, Dh, D))
        self.b_Q, self.b_K, self.b_V = (nn.Parameter(torch.zeros(H, Dh)) for _ in range(3))
        self.b_O = nn.Parameter(torch.zeros(D))

    def forward(self, x):
        q, k, v = (torch.einsum('bnd,hde->bhne', x, w) + b[:, None] for w, b in
                   ((self.W_Q, self.b_Q), (self.W_K, self.b_K), (self.W_V, self.b_V)))
        w = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
        return torch.einsum('bhne,hed->bnd', w @ v, self.W_O) + self.b_O


class RawMLP(nn.Module):
    def __init__(self, D, M):
        super().__init__()
        self.W_in, self.b_in = nn.Parameter(torch.randn(D, M)), nn.Parameter(torch.zeros(M))
        self.W_out, self.b_out = nn.Parameter(torch.randn(M, D)), nn.Parameter(torch.zeros(D))

    def forward(self, x):
        return F.gelu(x @ self.W_in + self.b_in, approximate='tanh') @ self.W_out + self.b_out


class RawBlock(nn.Module):
    def __init__(self, D, H, M):
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = RawNorm(D), RawAttention(D, H), RawNorm(D), RawMLP(D, M)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class RawViT(nn.Module):
    """TransformerLens-style (as vit-prisma writes it): every projection a raw parameter, einsum, a hand-written
    LayerNorm with w and b, a head W_H of (D, C)."""

    def __init__(self, config):
        super().__init__()
        D, p, C = config['hidden_size'], config['patch_size'], config['num_classes']
        self.embed = nn.Conv2d(3, D, p, p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.W_pos = nn.Parameter(torch.zeros((config['image_size'] // p) ** 2 + 1, D))
        self.blocks = nn.ModuleList(RawBlock(D, config['num_heads'], config['mlp_dim'])
                                    for _ in range(config['num_layers']))
        self.ln_final = RawNorm(D)
        self.W_H, self.b_H = nn.Parameter(torch.randn(D, C)), nn.Parameter(torch.zeros(C))

    def forward(self, img):
        x = self.embed(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.W_pos
        for block in self.blocks:
            x = block(x)
        return self.ln_final(x)[:, 0] @ self.W_H + self.b_H


class EncoderViT(nn.Module):
    """The tutorial that reaches for torch's own nn.TransformerEncoder (pre-norm, GELU: erf)."""

    def __init__(self, c):
        super().__init__()
        D, p = c['hidden_size'], c['patch_size']
        self.patch = nn.Conv2d(3, D, p, p)
        self.cls = nn.Parameter(torch.zeros(1, 1, D))
        self.pos = nn.Parameter(torch.zeros(1, (c['image_size'] // p) ** 2 + 1, D))
        layer = nn.TransformerEncoderLayer(D, c['num_heads'], c['mlp_dim'], dropout=0.0, activation='gelu',
                                           batch_first=True, norm_first=True, layer_norm_eps=1e-6)
        self.encoder = nn.TransformerEncoder(layer, c['num_layers'], norm=nn.LayerNorm(D, eps=1e-6),
                                             enable_nested_tensor=False)
        self.head = nn.Linear(D, c['num_classes'])

    def forward(self, img):
        x = self.patch(img).flatten(2).transpose(1, 2)
        return self.head(self.encoder(torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos)[:, 0])


class CNN(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(8, config['num_classes'])

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


@pytest.fixture(scope='module')
def setup():
    params = random_params(weights.param_shapes(CFG), seed=4, scale=0.2)
    x = images(CFG)
    return params, x, verdict.run_reference(CFG, params, x)


def check(setup, tmp_path, build=None, **kw):
    """UserViT(**kw) (or `build`) through automap and the verdict, in-process: (exit code, the JSON report)."""
    params, x, reference = setup
    build = build or (lambda config: UserViT(config, **kw))
    candidate, notes, extra = automap.run_module(build, 'user.py:build', CFG, params, x)
    run = verdict.Comparison(CFG, params, x, 'test batch', 'user.py:build', notes=notes, extra=extra,
                             structural=lambda first, have: automap.structural_findings(
                                 CFG, params, extra['unmapped'], first, have))
    code = verdict.conclude(run, reference, candidate, str(tmp_path / 'out.json'))
    return code, json.loads((tmp_path / 'out.json').read_text())


def causes(report) -> set:
    return {f['cause'] for f in report['diagnosis'] if f['kind'] == 'cause'}


def row(report, canonical):
    return next(r for r in report['mapping'] if r['canonical'] == canonical)


QUERY = 'Transformer/encoderblock_1/MultiHeadDotProductAttention_0/query/kernel'


@pytest.mark.parametrize('patch,layout,words', [
    ('conv', 'fused3', '(3, H, Dh) order'),
    ('p1 p2 c', 'fusedH', '(H, 3, Dh) order'),
    ('c p1 p2', 'separate', 'layers.1.attn.query.weight'),
    ('p2 p1 c', 'mha', '(3, H, Dh) order'),
])
def test_every_layout_is_found_and_passes(setup, tmp_path, patch, layout, words):
    code, report = check(setup, tmp_path, patch=patch, layout=layout)
    assert code == 0 and report['ok'], report['diagnosis']
    assert report['unmapped'] == {'user': [], 'canonical': []}
    assert len(report['mapping']) == len(weights.param_shapes(CFG))
    assert words in row(report, QUERY)['transform'] + row(report, QUERY)['user']
    embed = row(report, 'embedding/kernel')
    assert embed['user'] == 'embed.weight' and (patch == 'conv' or f'({patch})' in embed['transform'])
    assert row(report, 'cls')['user'] == 'class_token'
    assert row(report, 'Transformer/posembed_input/pos_embedding')['user'] == 'positions'
    names = [a['name'] for a in report['activations']]
    assert names[:3] == ['embedding', 'with_posemb', 'encoderblock_0'] and names[-1] == 'logits'


@pytest.mark.parametrize('fault,layout,where,cause', [
    ('erf_gelu', 'fused3', 'encoderblock_0/MlpBlock_0', 'erf_gelu'),
    ('layernorm_eps', 'fusedH', 'encoderblock_0/LayerNorm_0', 'layernorm_eps'),
    ('unscaled_queries', 'fused3', 'encoderblock_0/MultiHeadDotProductAttention_0', 'unscaled_queries'),
    ('out_projection_transposed', 'separate', 'encoderblock_0/MultiHeadDotProductAttention_0',
     'out_projection_transposed'),
    ('swapped_qk', 'fused3', 'encoderblock_0/MultiHeadDotProductAttention_0', 'swapped_qk'),
])
def test_a_planted_fault_is_stopped_at_its_sub_step_and_named(setup, tmp_path, fault, layout, where, cause):
    code, report = check(setup, tmp_path, layout=layout, fault=fault)
    assert code == 1 and report['first_divergence'] == 'encoderblock_0'
    assert report['diagnosis'][0]['where'] == where
    assert cause in causes(report), report['diagnosis']


def test_a_missing_bias_is_a_structural_difference_and_the_cause(setup, tmp_path):
    code, report = check(setup, tmp_path, layout='fused3', fault='missing_bias')
    assert code == 1 and report['first_divergence'] == 'encoderblock_0'
    missing = [f'Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/{r}/bias' for i in range(2)
               for r in ('query', 'key', 'value')]
    assert sorted(report['unmapped']['canonical']) == sorted(missing) and report['unmapped']['user'] == []
    assert any(n.startswith('structural difference: the checkpoint\'s Transformer/encoderblock_0/') for n in
               report['notes'])
    assert 'missing_parameter' in causes(report)


def test_blocks_that_never_run_as_modules_are_read_around(setup, tmp_path):
    """lucidrains' layout: every intermediate is still read (block outputs from the next step's input)."""
    code, report = check(setup, tmp_path, build=LucidStyleViT)
    assert code == 1 and report['first_divergence'] == 'encoderblock_0' and 'missing_parameter' in causes(report)
    assert not [n for n in report['notes'] if n.startswith('no mapping reproduces')]  # bias-free: still laid out
    names = [a['name'] for a in report['activations']]
    assert names == ['embedding', 'with_posemb', 'encoderblock_0', 'encoderblock_1', 'encoder_norm', 'pre_logits',
                     'logits']
    assert row(report, 'Transformer/posembed_input/pos_embedding')['user'] == 'pos.weight'
    assert row(report, 'head/kernel')['user'] == 'mlp_head.weight'


def test_torchs_own_transformer_encoder_is_mapped(setup, tmp_path):
    code, report = check(setup, tmp_path, build=EncoderViT)
    assert code == 1 and report['unmapped'] == {'user': [], 'canonical': []}
    assert report['first_divergence'] == 'encoderblock_0' and 'erf_gelu' in causes(report)
    assert row(report, QUERY)['user'] == 'encoder.layers.1.self_attn.in_proj_weight[0:32]'


def test_numbered_blocks_are_found_and_vit_torch_passes(setup, tmp_path):
    """vit_torch's own model registers its blocks as encoderblock_0, encoderblock_1, ... (add_module)."""
    from vit_torch.model import VisionTransformer

    code, report = check(setup, tmp_path, build=lambda c: VisionTransformer(CFG))
    assert code == 0 and report['ok'] and report['unmapped'] == {'user': [], 'canonical': []}
    torch_name = lambda n: n.replace('/', '.').replace('kernel', 'weight').replace('scale', 'weight')  # noqa: E731
    assert [r['user'] for r in report['mapping']] == [torch_name(r['canonical']) for r in report['mapping']]


def test_hand_written_layers_are_mapped(setup, tmp_path):
    """Raw parameters (W_Q (H, D, Dh), W_in (D, M), LayerNorm w and b) as TransformerLens-style code has them."""
    code, report = check(setup, tmp_path, build=RawViT)
    assert code == 0 and report['ok'] and report['unmapped'] == {'user': [], 'canonical': []}, report['diagnosis']
    assert row(report, QUERY) == {'canonical': QUERY, 'user': 'blocks.1.attn.W_Q',
                                  'transform': 'kernel (D, H, Dh) -> (H, D, Dh)'}
    assert row(report, 'Transformer/encoder_norm/scale')['user'] == 'ln_final.w'


def test_patch_tokens_in_column_order_are_named(setup, tmp_path):
    code, report = check(setup, tmp_path, patch='c p1 p2', fault='token_order')
    assert code == 1 and report['first_divergence'] == 'embedding'
    assert '(c p1 p2)' in row(report, 'embedding/kernel')['transform']  # the layout was still found
    assert 'token_order' in causes(report)


def test_no_layout_reproducing_a_layer_is_said(setup, tmp_path):
    _, report = check(setup, tmp_path, layout='fusedH', fault='unscaled_queries')
    note = next(n for n in report['notes'] if n.startswith('no mapping reproduces'))
    assert 'encoderblock_0/MultiHeadDotProductAttention_0' in note and '(3, H, Dh)' in note and '(H, 3, Dh)' in note


@pytest.mark.parametrize('build,needle', [
    (CNN, 'not a ViT the harness can map: no repeated blocks'),
    (lambda c: UserViT(c, depth=3), 'your model has 3 encoder blocks (layers) where the checkpoint has 2'),
    (lambda c: 3, 'not a torch.nn.Module or a flax.linen.Module'),
    (lambda: None, 'cannot be called as BUILD(config)'),
])
def test_what_does_not_fit_is_one_error_line(setup, build, needle):
    params, x, _ = setup
    with pytest.raises(UserError) as e:
        automap.run_module(build, 'user.py:build', CFG, params, x)
    assert needle in str(e.value) and '\n' not in str(e.value)


def test_verify_module_on_the_scratch_example(setup, tmp_path, capsys):
    """End to end: the teaching example maps with no adapter and stops at erf GELU (docs/harness.md runs the
    one-line fix to its PASS)."""
    params, x, _ = setup
    weights.save_npz(str(tmp_path / 'ckpt.npz'), params)  # the tests' tiny config: its reference is compiled
    np.save(tmp_path / 'x.npy', x)
    args = ['--module', '--checkpoint', str(tmp_path / 'ckpt.npz'), '--input', str(tmp_path / 'x.npy')]
    assert verify.main([f'{REPO}/examples/scratch_vit.py:build', *args, '--json', str(tmp_path / 'a.json')]) == 1
    report = json.loads((tmp_path / 'a.json').read_text())  # the command whole, its child process included
    assert report['first_divergence'] == 'encoderblock_0' and 'erf_gelu' in causes(report)
    assert row(report, 'embedding/kernel') == {
        'canonical': 'embedding/kernel', 'user': 'to_patch.weight',
        'transform': 'kernel (p, p, C, D) -> Linear weight (D, p*p*C) over patches flattened (p1 p2 c)'}
    assert 'mapping (canonical <- yours):' in capsys.readouterr().out


# --------------------------------------------------------------------------- --grad: the training step

LABELS = np.array([1, 3])


def module_step(setup, **kw) -> dict:
    """UserViT(**kw)'s cross-entropy gradients through the mapping against vit_jax's, in-process."""
    params, x, _ = setup
    got, _, extra = automap.run_module(lambda c: UserViT(c, **kw), 'user.py:build', CFG, params, x,
                                       grad={'labels': LABELS.tolist(), 'label_smoothing': 0.1})
    _, grads, _ = stepcheck.split(got)
    return stepcheck.compare(CFG, params, x, LABELS, 0.1, extra['loss'], grads)


def test_grad_passes_on_a_faithful_model_and_stops_at_a_detached_parameter(setup):
    result = module_step(setup, patch='c p1 p2', layout='fusedH')
    assert result['ok'] and result['loss_row']['ok'] and len(result['rows']) == len(weights.param_shapes(CFG))
    result = module_step(setup, fault='detached_posemb')
    assert not result['ok'] and result['first'] == 'grad/Transformer/posembed_input/pos_embedding'
    assert result['loss_row']['ok'] and result['findings'][0]['where'] == result['first']


def torch_step(smoothing: str, adamw: bool = False):
    """A user's STEP(params, images, labels) on vit_torch's model, with label smoothing spread one way or the other;
    `adamw`: then one torch.optim.AdamW update without parameter groups, the updated parameters returned third."""
    from vit_torch.params import build_model, params_from_state_dict

    def step(params, images, labels):
        model = build_model(CFG, params).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        logits = model(torch.from_numpy(images).permute(0, 3, 1, 2))
        onehot = F.one_hot(torch.from_numpy(labels), CFG.num_classes).float()
        eps, C = 0.1, CFG.num_classes
        target = onehot * (1 - eps) + (eps / C if smoothing == 'all' else (1 - onehot) * eps / (C - 1))
        loss = -(target * logits.log_softmax(-1)).sum(-1).mean()
        loss.backward()
        grads = params_from_state_dict({n: p.grad.clone() for n, p in model.named_parameters()}, CFG, 'gradients')
        if not adamw:
            return loss, grads
        opt.step()
        return loss, grads, params_from_state_dict({n: p.detach() for n, p in model.named_parameters()}, CFG, 'p')

    return step


def test_a_users_step_is_named_by_its_habit(setup):
    params, x, _ = setup
    loss, grads, _, _ = stepcheck.user_step(torch_step('others'), 'step.py:step', params, x, LABELS)
    result = stepcheck.compare(CFG, params, x, LABELS, 0.1, loss, grads)
    assert result['first'] == 'loss' and [f['cause'] for f in result['findings']] == ['smoothing_others']


def test_a_faithful_step_then_an_update_without_parameter_groups_is_named(setup):
    """The loss and gradients of a faithful STEP agree; its torch.optim.AdamW update over every parameter does not."""
    params, x, _ = setup
    loss, grads, after, _ = stepcheck.user_step(torch_step('all', adamw=True), 'step.py:step', params, x, LABELS,
                                                updated=True)
    result = stepcheck.compare(CFG, params, x, LABELS, 0.1, loss, grads, after,
                               {'optimizer': 'adamw', 'lr': 1e-3, 'weight_decay': 0.05})
    assert result['loss_row']['ok'] and all(r['ok'] for r in result['rows'])
    assert result['first'].startswith('updated/') and [f['cause'] for f in result['findings']] == ['decay_all']


# --------------------------------------------------------------------------- Flax models

def flax_vit(config, layout='fused3', patch='conv', fault=None):
    """A user's Flax (linen) ViT: its own names, a fused Dense qkv in either order or flax's own attention, a Conv
    or a Dense patch embedding."""
    import flax.linen as fnn
    import jax.numpy as jnp

    D, H, M, p = config['hidden_size'], config['num_heads'], config['mlp_dim'], config['patch_size']
    gelu = (lambda v: fnn.gelu(v, approximate=False)) if fault == 'erf_gelu' else fnn.gelu

    class Attention(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            if layout == 'mha':
                return fnn.MultiHeadDotProductAttention(num_heads=H, qkv_features=D)(x, x)
            B, N, _ = x.shape
            qkv = fnn.Dense(3 * D, name='qkv')(x)
            shape, axes = ((B, N, 3, H, D // H), (2, 0, 3, 1, 4)) if layout == 'fused3' else \
                ((B, N, H, 3, D // H), (3, 0, 2, 1, 4))
            q, k, v = jnp.transpose(qkv.reshape(shape), axes)  # each (B, H, N, Dh)
            w = fnn.softmax((q / jnp.sqrt(D // H)) @ jnp.swapaxes(k, -1, -2))
            return fnn.Dense(D, name='proj')(jnp.swapaxes(w @ v, 1, 2).reshape(B, N, D))

    class Block(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            x = x + Attention()(fnn.LayerNorm(epsilon=1e-6)(x))
            y = fnn.LayerNorm(epsilon=1e-6)(x)
            return x + fnn.Dense(D)(gelu(fnn.Dense(M)(y)))

    class ViT(fnn.Module):
        @fnn.compact
        def __call__(self, img):
            B, h, w, C = img.shape
            if patch == 'conv':
                x = fnn.Conv(D, (p, p), strides=(p, p), padding='VALID')(img).reshape(B, -1, D)
            else:
                x = img.reshape(B, h // p, p, w // p, p, C).transpose(0, 1, 3, 5, 2, 4)  # (B, gh, gw, c, p1, p2)
                x = fnn.Dense(D)(x.reshape(B, -1, p * p * C))
            cls = self.param('cls', fnn.initializers.zeros, (1, 1, D))
            x = jnp.concatenate([jnp.broadcast_to(cls, (B, 1, D)), x], 1)
            x = x + self.param('pos_embedding', fnn.initializers.normal(0.02), (1, x.shape[1], D))
            for _ in range(config['num_layers']):
                x = Block()(x)
            return fnn.Dense(config['num_classes'])(fnn.LayerNorm(epsilon=1e-6)(x)[:, 0])

    return ViT()


def test_flax_models_are_mapped_too(setup, tmp_path):
    """flax's own attention and a Dense patch embedding over (c p1 p2) patches, with erf GELU planted."""
    code, report = check(setup, tmp_path, build=lambda c: flax_vit(c, 'mha', 'dense', 'erf_gelu'))
    assert report['unmapped'] == {'user': [], 'canonical': []}
    assert code == 1 and report['first_divergence'] == 'encoderblock_0' and 'erf_gelu' in causes(report)
    assert row(report, QUERY)['user'].endswith('MultiHeadDotProductAttention_0/query/kernel')
    assert '(c p1 p2)' in row(report, 'embedding/kernel')['transform']


def test_grad_on_a_flax_model(setup):
    params, x, _ = setup
    got, _, extra = automap.run_module(lambda c: flax_vit(c, 'mha'), 'user.py:build', CFG, params, x,
                                       grad={'labels': LABELS.tolist(), 'label_smoothing': 0.1})
    _, grads, _ = stepcheck.split(got)
    result = stepcheck.compare(CFG, params, x, LABELS, 0.1, extra['loss'], grads)
    assert result['ok'] and len(grads) == len(weights.param_shapes(CFG)), result['findings']
