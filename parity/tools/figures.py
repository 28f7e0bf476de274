"""The ViT paper's inspection figures: arrays in NumPy (framework-neutral), pictures in matplotlib.

Arrays, each computed from what either framework hands over (attention weights from its
forward pass, parameters in its own layout), in float64:

- `attention_rollout`: Abnar & Zuidema's rollout as the ViT paper uses it (Appendix D.8):
  per layer, average the heads, add the identity for the residual path, renormalise the
  rows, and multiply through the layers; the class token's row over the patch grid. A
  model without a class token (`gap`) has no such row: the mean over its query tokens is
  used instead, and the figure says so.
- `position_similarity`: cosine similarity of each patch's position embedding with every
  other's (Figure 7, centre).
- `filter_pca`: principal components of the patch-embedding filters (Figure 7, left).
- `mean_attention_distance`: per layer and head, the distance in pixels between query and
  key patch centres, averaged with the attention weights over keys, then over queries and
  images (Figure 7, right).

Rendering writes PNGs at a fixed size (`FIGURE_SIZES`, in pixels at `DPI`), so a figure's
size depends only on the model's grid and the chosen layers and heads.

Shapes: B images, L layers, H heads, N tokens (the patches, after the class token when there
is one), h x w the patch grid, n = h * w patches, D width, ph x pw x C a patch-embedding
filter, K principal components.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from parity.cli.plotting import pyplot, save_figure

DPI = 100


# --------------------------------------------------------------------------- arrays

def _patch_rows(attention: np.ndarray, prefix_tokens: int) -> np.ndarray:
    """(..., N, N) attention over all tokens -> its (..., n, n) patch-to-patch block.

    `prefix_tokens` (here and below): the tokens before the patches, the class token and
    DeiT's distillation token (`ViTConfig.num_prefix_tokens`); 0 for a gap model.
    """
    s = prefix_tokens
    return attention[..., s:, s:]


def attention_rollout(attentions: Sequence[np.ndarray], grid: tuple[int, int], prefix_tokens: int) -> np.ndarray:
    """(B, h, w): how much of each patch flows into the class token (or, without one, the mean token).

    `attentions` holds one (B, H, N, N) softmax array per layer, first layer first.
    """
    joint = None
    for a in attentions:
        a = np.asarray(a, np.float64).mean(axis=1)  # (B, N, N)
        a = a + np.eye(a.shape[-1])  # the residual path carries each token on unchanged
        a = a / a.sum(axis=-1, keepdims=True)
        joint = a if joint is None else a @ joint  # (B, N, N): later layers mix the earlier mixtures
    B = joint.shape[0]
    row = joint[:, 0, prefix_tokens:] if prefix_tokens else joint.mean(axis=1)  # (B, n)
    return row.reshape(B, *grid)


def query_attention(attentions: Sequence[np.ndarray], layers: Sequence[int], heads: Sequence[int],
                    grid: tuple[int, int], prefix_tokens: int, query: Optional[tuple[int, int]] = None
                    ) -> np.ndarray:
    """(B, len(layers), len(heads), h, w): raw attention of one query over the patches.

    The query is the class token by default (the mean over patch queries without one), or
    the patch at (row, column) `query`.
    """
    s = prefix_tokens
    out = []
    for i in layers:
        a = np.asarray(attentions[i], np.float64)[:, list(heads)]  # (B, heads, N, N)
        if query is not None:
            row = a[:, :, s + query[0] * grid[1] + query[1], s:]  # (B, heads, n)
        elif prefix_tokens:
            row = a[:, :, 0, s:]
        else:
            row = a[:, :, s:, s:].mean(axis=2)
        out.append(row.reshape(*row.shape[:2], *grid))
    return np.stack(out, axis=1)


def patch_distances(grid: tuple[int, int], patch_px: tuple[int, int]) -> np.ndarray:
    """(n, n) Euclidean distance in pixels between the centres of every two patches, row-major."""
    rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing='ij')
    centres = np.stack([rows.ravel() * patch_px[0], cols.ravel() * patch_px[1]], axis=-1).astype(np.float64)
    return np.sqrt(((centres[:, None] - centres[None]) ** 2).sum(-1))


def mean_attention_distance(attentions: Sequence[np.ndarray], grid: tuple[int, int], patch_px: tuple[int, int],
                            prefix_tokens: int) -> np.ndarray:
    """(L, H): mean distance in pixels each head reaches, over patch queries and images.

    Only patch-to-patch attention has a distance: the class token's column is left out
    and each query's weights over the patches renormalised to sum to one, so a head that
    mostly reads the class token still reports where its patch attention goes.
    """
    dist = patch_distances(grid, patch_px)
    out = []
    for a in attentions:
        p = _patch_rows(np.asarray(a, np.float64), prefix_tokens)  # (B, H, n, n)
        p = p / p.sum(axis=-1, keepdims=True)
        out.append((p * dist).sum(axis=-1).mean(axis=(0, 2)))  # (H,)
    return np.stack(out)


def position_similarity(posemb: np.ndarray, grid: tuple[int, int], prefix_tokens: int) -> np.ndarray:
    """(h, w, h, w): cosine similarity between the position embeddings of every two patches.

    `posemb` is the (1, N, D) parameter; `[r, c]` is patch (r, c)'s similarity map.
    """
    p = np.asarray(posemb, np.float64).reshape(-1, posemb.shape[-1])[prefix_tokens:]  # (n, D)
    p = p / np.linalg.norm(p, axis=-1, keepdims=True)
    return (p @ p.T).reshape(*grid, *grid)


def filter_pca(filters: np.ndarray, components: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Principal components of the D patch-embedding filters, each a (ph, pw, C) image.

    `filters` is (D, ph, pw, C). Returns (K, ph, pw, C) components, strongest first, and the
    fraction of the filters' variance each explains. A component's sign is arbitrary in
    PCA; it is fixed so that its largest entry is positive, so two runs draw the same picture.
    """
    D = filters.shape[0]
    x = np.asarray(filters, np.float64).reshape(D, -1)  # (D, ph*pw*C)
    x = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    K = min(components, len(s))
    v = vt[:K]  # (K, ph*pw*C)
    v = v * np.sign(v[np.arange(K), np.abs(v).argmax(axis=1)])[:, None]
    variance = s ** 2 / (s ** 2).sum()
    return v.reshape(K, *filters.shape[1:]), variance[:K]


# --------------------------------------------------------------------------- pictures

def _show_image(ax, image: np.ndarray) -> None:
    """An NHWC-style (h, w, 3) image in [-1, 1], as it entered the model."""
    ax.imshow(np.clip((image + 1) / 2, 0, 1))
    ax.set_xticks([])
    ax.set_yticks([])


def _overlay(ax, image: np.ndarray, values: np.ndarray, vmin: float, vmax: float, alpha: float = 0.55):
    """`values` (h, w) on the patch grid, smoothly upsampled over the image."""
    _show_image(ax, image)
    H, W = image.shape[:2]
    return ax.imshow(values, cmap='inferno', vmin=vmin, vmax=vmax, alpha=alpha, extent=(0, W, H, 0),
                     interpolation='bilinear')


def _upsample(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) to (H, W), bilinear."""
    from PIL import Image

    return np.asarray(Image.fromarray(values.astype(np.float32), mode='F').resize(size[::-1], Image.BILINEAR))


def rollout_size() -> tuple[float, float]:
    return (17.5, 4.7)


def attention_size(rows: int, cols: int) -> tuple[float, float]:
    return (1.9 * cols + 1.2, 2.1 * rows + 0.9)


def position_similarity_size() -> tuple[float, float]:
    return (8.4, 7.6)


def filter_pca_size(components: int) -> tuple[float, float]:
    rows = -(-components // 7)
    return (1.4 * min(components, 7) + 0.4, 1.55 * rows + 0.9)


def attention_distance_size() -> tuple[float, float]:
    return (8.0, 5.6)


def pixels(size_inches: tuple[float, float]) -> tuple[int, int]:
    """(width, height) in pixels of a figure of this size, as saved."""
    return tuple(int(round(v * DPI)) for v in size_inches)


def render_rollout(path: str, image: np.ndarray, rollout: np.ndarray, title: str, has_cls_token: bool) -> str:
    """The input, the rollout on the patch grid, the rollout over the input, and the input weighted by it.

    The last panel is the paper's rendering (Figure 6): pixels scaled by the rollout
    divided by its maximum, so what the output token does not read fades to black.
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=rollout_size())
    fig.subplots_adjust(left=0.02, right=0.98, top=0.8, bottom=0.1, wspace=0.3)
    source = 'class token' if has_cls_token else 'mean over all tokens (gap model: no class token)'
    fig.suptitle(f'Attention rollout to the {source}\n{title}', fontsize=11)
    _show_image(axes[0], image)
    axes[0].set_title('input (as the model sees it)', fontsize=10)
    lo, hi = float(rollout.min()), float(rollout.max())
    h, w = rollout.shape
    grid = axes[1].imshow(rollout, cmap='inferno', vmin=lo, vmax=hi, interpolation='nearest')
    axes[1].set_title(f'rollout on the {h}x{w} patch grid', fontsize=10)
    axes[1].set_xlabel('patch column')
    axes[1].set_ylabel('patch row')
    cbar = fig.colorbar(grid, ax=axes[1], fraction=0.046, pad=0.04)
    cbar.set_label('share of the input reaching the output token', fontsize=8)
    _overlay(axes[2], image, rollout, lo, hi)
    axes[2].set_title('rollout over the input (alpha 0.55)', fontsize=10)
    mask = _upsample(rollout / hi if hi > 0 else rollout, image.shape[:2])
    _show_image(axes[3], (np.clip((image + 1) / 2, 0, 1) * mask[..., None]) * 2 - 1)
    axes[3].set_title('input x rollout / max (as in the paper)', fontsize=10)
    return save_figure(fig, path, DPI)


def render_attention(path: str, image: np.ndarray, maps: np.ndarray, layers: Sequence[int], heads: Sequence[int],
                     query: str, query_patch: Optional[tuple[int, int]] = None) -> str:
    """One panel per (layer, head): that head's attention from `query` over the image.

    Each panel is scaled to its own maximum (printed in its title): heads differ by orders
    of magnitude in how peaked they are, and one shared scale would blank most of them.
    A query patch (row, column) is outlined in every panel.
    """
    plt = pyplot()
    from matplotlib.patches import Rectangle

    rows, cols = len(layers), len(heads)
    fig, axes = plt.subplots(rows, cols, figsize=attention_size(rows, cols), squeeze=False)
    fig.subplots_adjust(left=0.04, right=0.9, top=1 - 0.75 / attention_size(rows, cols)[1], bottom=0.02,
                        wspace=0.08, hspace=0.3)
    fig.suptitle(f'Raw attention from {query}, per encoder block and head', fontsize=11)
    im = None
    for r, layer in enumerate(layers):
        for c, head in enumerate(heads):
            m = maps[r, c]
            peak = float(m.max())
            im = _overlay(axes[r, c], image, m / peak if peak > 0 else m, 0.0, 1.0, alpha=0.65)
            if query_patch is not None:
                ph, pw = image.shape[0] / m.shape[0], image.shape[1] / m.shape[1]
                axes[r, c].add_patch(Rectangle((query_patch[1] * pw, query_patch[0] * ph), pw, ph, fill=False,
                                               edgecolor='cyan', linewidth=1.5))
            axes[r, c].set_title(f'block {layer}, head {head}\nmax {peak:.3g}', fontsize=8)
        axes[r, 0].set_ylabel(f'block {layer}')
    cbar = fig.colorbar(im, ax=axes, fraction=0.03, pad=0.02)
    cbar.set_label("attention / panel's maximum")
    return save_figure(fig, path, DPI)


def render_position_similarity(path: str, similarity: np.ndarray, title: str) -> str:
    """The paper's Figure 7 (centre): one small map per patch, tiled in patch order."""
    plt = pyplot()
    h, w = similarity.shape[:2]
    # One image with a one-pixel gap between tiles: one imshow, however large the grid.
    mosaic = np.full((h * (h + 1) - 1, w * (w + 1) - 1), np.nan)
    for r in range(h):
        for c in range(w):
            mosaic[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = similarity[r, c]
    fig, ax = plt.subplots(figsize=position_similarity_size())
    fig.subplots_adjust(left=0.1, right=0.88, top=0.88, bottom=0.09)
    cmap = plt.get_cmap('viridis').with_extremes(bad='white')  # the gaps between tiles
    im = ax.imshow(mosaic, cmap=cmap, vmin=-1, vmax=1, interpolation='nearest')
    step = max(1, h // 8)
    ax.set_yticks([r * (h + 1) + (h - 1) / 2 for r in range(0, h, step)], [str(r) for r in range(0, h, step)])
    step = max(1, w // 8)
    ax.set_xticks([c * (w + 1) + (w - 1) / 2 for c in range(0, w, step)], [str(c) for c in range(0, w, step)])
    ax.set_xlabel('input patch column')
    ax.set_ylabel('input patch row')
    ax.set_title(f'Position embedding similarity\n{title}', fontsize=11)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.03).set_label('cosine similarity')
    return save_figure(fig, path, DPI)


def render_filter_pca(path: str, components: np.ndarray, variance: np.ndarray, title: str) -> str:
    """The paper's Figure 7 (left): each principal component drawn as an RGB patch."""
    plt = pyplot()
    K = len(components)
    cols = min(K, 7)
    rows = -(-K // 7)
    size = filter_pca_size(K)
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False)
    fig.subplots_adjust(left=0.02, right=0.98, top=1 - 0.8 / size[1], bottom=0.02, wspace=0.1, hspace=0.35)
    fig.suptitle(f'RGB embedding filters: first {K} principal components\n{title}', fontsize=10)
    for ax in axes.ravel():
        ax.axis('off')
    for k, (v, share) in enumerate(zip(components, variance)):
        lo, hi = v.min(), v.max()
        ax = axes[k // cols, k % cols]
        ax.imshow((v - lo) / (hi - lo) if hi > lo else np.zeros_like(v), interpolation='nearest')
        ax.set_title(f'PC{k + 1}  {share:.1%}', fontsize=8)
    return save_figure(fig, path, DPI)


def render_attention_distance(path: str, distance: np.ndarray, image_size: int, title: str) -> str:
    """The paper's Figure 7 (right): each head's mean attention distance against depth."""
    plt = pyplot()
    L, H = distance.shape
    fig, ax = plt.subplots(figsize=attention_distance_size())
    fig.subplots_adjust(left=0.1, right=0.8, top=0.86, bottom=0.11)
    colors = plt.get_cmap('tab20' if H > 10 else 'tab10')
    for head in range(H):
        ax.scatter(np.arange(L), distance[:, head], s=22, color=colors(head % colors.N), label=f'head {head}')
    ax.set_xlabel('network depth (encoder block)')
    ax.set_ylabel('mean attention distance (pixels)')
    ax.set_xticks(np.arange(L))
    ax.set_ylim(0, max(float(distance.max()) * 1.1, image_size / 4))
    ax.grid(alpha=0.3)
    ax.set_title(f'Mean attention distance per head\n{title}', fontsize=11)
    ax.legend(loc='upper left', bbox_to_anchor=(1.01, 1.0), fontsize=8, ncol=1 if H <= 16 else 2, frameon=False)
    return save_figure(fig, path, DPI)
