"""Read robustness from natural input gradients: robust models have small, image-like, edge-aligned
gradients of the loss on clean images; vulnerable ones have large, noise-like ones.

    python -m tools.characterize runs/fashion-mnist/resnet_demo_pool-{standard,gradnorm}-gelu/ckpt.pt --n 1000
Per checkpoint, on the same first n test images: per-image L1 and L2 norms of g = d CE_i / d x_i
(mean, quantiles), per-channel statistics of g, edge alignment (Pearson correlation between |g|
and the EdgeReg teacher's edge energy, per image), clean and PGD accuracy (evaluate.evaluate), the
Nyquist share of |g| over the images' (a 2-pixel checkerboard printed by a strided stem: ~1 for
image-like maps), and on the first --fo-n images the first-order ratio at the eval eps (the CE
gain PGD-10 reaches over eps * ||g||_1, the gain GradNorm's penalty predicts: 1 on a linear model).
Writes to --out: characterize.json, characterize.csv, gradients.png, norm_vs_robust.png.
"""

import argparse
import csv
import json
import os
import sys

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torchvision.utils import make_grid, save_image

from attack import LOSSES, pgd
from checkpoint import check_data, load_checkpoint
from config import ArgumentParser, Config, UserError, checked, cli
from data import data_shape, make_loaders
from edge_reg import edge_energy
from evaluate import evaluate, model_from_checkpoint, parse_eps

QUANTILES = {'q10': 0.1, 'q25': 0.25, 'median': 0.5, 'q75': 0.75, 'q90': 0.9}


def input_gradients(model, x, y):
    """d CE_i / d x_i per image. In eval mode images do not interact (no batch statistics), so
    the gradient of the summed loss holds each image's own gradient."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction='sum'), x)
    return g


def pearson(a, b):
    """Correlation per row of two (B, ...) tensors."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)).float()


def edge_alignment(g, x):
    """Per image: correlation of |g| with the edge energy of x (1: the gradient is the edges)."""
    return pearson(g.abs(), edge_energy(x))


def nyquist_fraction(maps):
    """Per map, the share of its spectral energy (mean removed) on the Nyquist lines k_y = H/2 or
    k_x = W/2: the 2-pixel periodic patterns (checkerboards, stripes) that a stride-2 convolution
    with a kernel not divisible by its stride prints into its input gradient. 1 for a pure
    checkerboard, ~0 for smooth maps, (H+W-1)/(H*W-1) for white noise. maps: (B, [C,] H, W),
    channels summed; H and W even (odd sizes have no Nyquist bin)."""
    m = maps.double().sum(1) if maps.ndim == 4 else maps.double()
    H, W = m.shape[-2:]
    if H % 2 or W % 2:
        raise ValueError(f'nyquist_fraction needs even sizes, not {H}x{W}')
    p = torch.fft.fft2(m - m.mean((-2, -1), keepdim=True)).abs().pow(2)
    nyq = p[:, H // 2, :].sum(-1) + p[:, :, W // 2].sum(-1) - p[:, H // 2, W // 2]
    return nyq / p.sum((-2, -1)).clamp_min(1e-30)


def pixel_edges(x):
    """|finite-difference gradient| of the images at pixel resolution: what a perfectly edge-aligned
    |grad| map would look like, sharp edges and all (a reference for the Nyquist share of |grad|)."""
    dx = F.pad(x[..., :, 1:] - x[..., :, :-1], (0, 1))
    dy = F.pad(x[..., 1:, :] - x[..., :-1, :], (0, 0, 0, 1))
    return (dx**2 + dy**2).sqrt()


# ---------------------------------------------------------------- how first-order is the model?


def loss_and_input_gradient(model, x, y, loss='ce'):
    """Per-sample loss (attack.LOSSES) and its gradient in x, per sample as in input_gradients."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        value = LOSSES[loss](model(x), y).to(x.dtype)
        (g,) = torch.autograd.grad(value.sum(), x)
    return value.detach(), g


def first_order_ratio(model, batches, eps, steps=10, loss='ce'):
    """Actual loss increase of PGD-steps over the first-order prediction eps * ||grad_x loss||_1
    (the quantity GradNorm penalizes). ratio > 1: the loss curves up inside the ball, so a small
    penalty no longer means a small attack; ratio < 1: it flattens (saturation, or PGD too weak).
    ratio_box uses the prediction that respects [0,1] (a pixel at 0 cannot move down), which is
    what a perfect first-order attacker could get on Fashion-MNIST's black backgrounds.
    -> {'actual', 'predicted', 'predicted_box', 'ratio', 'ratio_box', 'median_ratio', 'n'}"""
    was_training = model.training
    model.eval()
    inc, pred, box = [], [], []
    for x, y in batches:
        l0, g = loss_and_input_gradient(model, x, y, loss)
        # PGD from x itself (on a model linear in x the first step already reaches the optimal corner),
        # never stopping at a misclassification: how far the loss climbs
        _, top = pgd(model, x, y, eps, steps, random_start=False, loss=loss, max_loss=True)
        inc.append(top.to(x.dtype) - l0)
        pred.append(eps * g.abs().flatten(1).sum(1))
        room = torch.where(g > 0, (1 - x).clamp(max=eps), x.clamp(max=eps))  # how far each pixel may go
        box.append((g.abs() * room).flatten(1).sum(1))
    model.train(was_training)
    inc, pred, box = torch.cat(inc).double(), torch.cat(pred).double(), torch.cat(box).double()
    ok = pred > 1e-12
    return {
        'actual': inc.mean().item(),
        'predicted': pred.mean().item(),
        'predicted_box': box.mean().item(),
        'ratio': (inc.mean() / pred.mean()).item(),
        'ratio_box': (inc.mean() / box.mean()).item(),
        'median_ratio': (inc[ok] / pred[ok]).median().item(),
        'n': len(inc),
    }


def summary(v):
    v = v.double()
    return {'mean': v.mean().item(), **{k: v.quantile(q).item() for k, q in QUANTILES.items()}}


def gradient_stats(model, batches):
    """-> per-image L1, L2, edge alignment (tensors over all images), per-channel statistics and the
    mean Nyquist share of |g| and of the images ({'grad', 'image', 'rel': grad / image}; None for odd
    sizes, which have no Nyquist bin)."""
    model.eval().requires_grad_(False)
    l1, l2, align, nyq, abs_sum, signed_sum, n = [], [], [], [], 0, 0, 0
    for x, y in batches:
        g = input_gradients(model, x, y).float()
        l1.append(g.flatten(1).abs().sum(1))
        l2.append(g.flatten(1).norm(dim=1))
        align.append(edge_alignment(g, x))
        if g.shape[-1] % 2 == 0 and g.shape[-2] % 2 == 0:
            nyq.append(torch.stack([nyquist_fraction(g.abs()), nyquist_fraction(x)], 1))
        abs_sum = abs_sum + g.abs().sum((0, 2, 3)).double()
        signed_sum = signed_sum + g.sum((0, 2, 3)).double()
        n += g.shape[0] * g.shape[2] * g.shape[3]
    channels = [
        {'mean_abs': (a / n).item(), 'mean': (s / n).item(), 'l1_share': (a / abs_sum.sum()).item()}
        for a, s in zip(abs_sum, signed_sum)
    ]
    grad, image = torch.cat(nyq).mean(0).tolist() if nyq else (None, None)
    nyq = {'grad': grad, 'image': image, 'rel': grad / max(image, 1e-30)} if nyq else None
    return torch.cat(l1), torch.cat(l2), torch.cat(align), channels, nyq


# ---------------------------------------------------------------- pictures


def display(t, size):
    """(B, C, H, W) -> (B, 3, size, size) for a grid: gray -> RGB, nearest-neighbour upscaling."""
    t = t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t[:, :3]
    return F.interpolate(t.float(), size=(size, size), mode='nearest')


def normalized_map(m):
    """Sum over channels, divide by the image's own 99th percentile, clip to [0,1]: every map is
    scaled alone, so the picture compares shape (edges vs noise), the table compares size."""
    m = m.sum(1, keepdim=True)
    return (m / m.flatten(1).quantile(0.99, dim=1).clamp_min(1e-30).view(-1, 1, 1, 1)).clamp(0, 1)


def text_strip(labels, width, height, x_positions):
    """A black strip with white labels (Pillow's built-in bitmap font: no font files needed)."""
    from PIL import Image, ImageDraw
    from torchvision.transforms.functional import pil_to_tensor

    img = Image.new('RGB', (width, height))
    draw = ImageDraw.Draw(img)
    for x, label in zip(x_positions, labels):
        draw.text((x, 2), label, fill=(255, 255, 255))
    return pil_to_tensor(img).float() / 255


def short_names(names):
    """Run folders without what they all share ('resnet_demo_pool-gradnorm-gelu' and
    'resnet_demo_pool-pgd-gelu' -> 'gradnorm', 'pgd'): column headers have room for ~18 letters."""
    if len(set(names)) < 2:
        return names
    cut = lambda common: max(common.rfind('-'), common.rfind('_')) + 1  # whole words only
    head, tail = cut(os.path.commonprefix(names)), cut(os.path.commonprefix([n[::-1] for n in names]))
    short = [n[head : len(n) - tail].strip('-_') for n in names]
    return short if all(short) and len(set(short)) == len(short) else names


def gradient_grid(x, grads, names, path, size=112, pad=2):
    """Rows: images. Columns: input, |g| per checkpoint (normalized_map), edge energy (same)."""
    cols = [display(x, size)] + [display(normalized_map(g.abs()), size) for g in grads]
    cols.append(display(normalized_map(edge_energy(x)), size))
    tiles = torch.stack(cols, 1).flatten(0, 1)  # row-major: image by image
    grid = make_grid(tiles, nrow=len(cols), padding=pad, pad_value=1.0)
    labels = ['input'] + [n[: size // 6] for n in short_names(names)] + ['edge energy']
    header = text_strip(labels, grid.shape[2], 14, [pad + i * (size + pad) + 2 for i in range(len(cols))])
    save_image(torch.cat([header, grid], 1), path)


def scatter_plot(points, path):
    """Robust accuracy (y) against the median per-image L1 gradient norm (x, log scale): one point per
    checkpoint. A Figure without pyplot renders with Agg: no display, no global state."""
    fig = Figure(figsize=(5.2, 3.6), dpi=100)  # 520 x 360 px
    ax = fig.subplots()
    for name, l1, acc in points:
        ax.scatter(max(l1, 1e-12), 100 * acc, label=name[:22])
    ax.set_xscale('log')
    ax.set_ylim(0, 100)
    ax.set_yticks(range(0, 101, 20))
    ax.set_xlabel('median per-image L1 norm of d CE / d x')
    ax.set_ylabel('PGD accuracy (%)')
    ax.set_title('robust accuracy against input-gradient norm')
    ax.legend(fontsize='small')
    fig.tight_layout()
    fig.savefig(path)


# ---------------------------------------------------------------- the command


def head(batches, k):
    """The first k images of a loader, as a list of (x, y) batches."""
    out, got = [], 0
    for x, y in batches:
        if got >= k:
            break
        out.append((x[: k - got], y[: k - got]))
        got += len(out[-1][1])
    return out


def measure(model, batches, eps, steps, fo_n, fo_steps=10):
    """One checkpoint's numbers (see the module docstring): the gradient statistics on every image,
    PGD-steps, and the first-order ratio on the first fo_n images (none for fo_n=0)."""
    l1, l2, align, channels, nyq = gradient_stats(model, batches)
    r = evaluate(model, batches, [eps], [f'ce-{steps}'])
    fo = first_order_ratio(model, head(batches, fo_n), eps, fo_steps) | {'steps': fo_steps} if fo_n else None
    return {
        'n': r['n'],
        'clean': r['clean'],
        'eps': eps,
        'attack': f'PGD-{steps} CE L-inf',
        'pgd': r['robust'][eps]['worst'],
        'l1': summary(l1),
        'l2': summary(l2),
        'edge_alignment': summary(align),
        'channels': channels,
        'nyquist': nyq,
        'first_order': fo,
    }


def characterize(ckpts, n=None, rows=8, eps=None, steps=20, out='runs/characterize', data=None, fo_n=500):
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserError(f'cannot create --out {out!r} ({e.strerror})') from None
    torch.manual_seed(0)
    n_flag, n = ('--n' if n else None), n or 1000  # more than there are: all, said only if asked for
    results, grads, images, info0 = [], [], None, None
    for path in ckpts:
        ck = load_checkpoint(path)
        if info0 is not None and ck['data_info'] != info0:
            raise UserError(f'{path} was trained on other data than {ckpts[0]}: characterize them separately')
        info0 = ck['data_info']
        # eval mode: in train mode BatchNorm's running statistics would move
        model = model_from_checkpoint(ck, 'model', path).eval().requires_grad_(False)
        cfg = Config(**{**ck['config'], 'eval_n': n})
        cfg.data = data or cfg.data
        check_data(path, ck, data_shape(cfg.data), cfg.data)
        _, _, batches, _ = make_loaders(cfg, 0, 1, torch.device('cpu'), n_flag, from_checkpoint=True)
        images = images or head(batches, rows)[0]
        grads.append(input_gradients(model, *images))
        c = ck['config']
        name = os.path.basename(os.path.dirname(os.path.abspath(path)))
        results.append(
            {
                'name': name,
                'ckpt': path,
                'objective': c['objective'],
                'act': c['act'],
                **measure(model, batches, eps if eps is not None else c['eps'], steps, min(fo_n, cfg.eval_n)),
            }
        )
    names = [r['name'] for r in results]
    gradient_grid(images[0], grads, names, os.path.join(out, 'gradients.png'))
    points = [(r['name'], r['l1']['median'], r['pgd']) for r in results]
    scatter_plot(points, os.path.join(out, 'norm_vs_robust.png'))
    with open(os.path.join(out, 'characterize.json'), 'w') as f:
        json.dump(results, f, indent=1)
    flat = []
    for r in results:  # a CSV row per checkpoint: its numbers, each summary's fields, each channel's
        row = {k: v for k, v in r.items() if not isinstance(v, (dict, list))}
        for s in ('l1', 'l2', 'edge_alignment', 'nyquist', 'first_order'):
            row |= {f'{s}_{k}': v for k, v in (r[s] or {}).items()}
        for i, ch in enumerate(r['channels']):
            row |= {f'ch{i}_{k}': v for k, v in ch.items()}
        flat.append(row)
    with open(os.path.join(out, 'characterize.csv'), 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(flat[0]))
        w.writeheader()
        w.writerows(flat)
    return results


def main(argv):
    positive = checked(int, lambda v: v >= 1, 'at least 1')
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('ckpts', nargs='+', type=checked(str, os.path.isfile, 'an existing checkpoint file'),
                   help='checkpoints of train.py')
    p.add_argument('--n', type=positive, default=None, help='first n test images (default 1000)')
    p.add_argument(
        '--rows',
        type=checked(int, lambda v: 1 <= v <= 64, 'in [1, 64]'),
        default=8,
        help='images in the picture grid',
    )
    p.add_argument(
        '--eps',
        default=None,
        type=checked(parse_eps, lambda v: 0 < v <= 1, 'in (0, 1]'),
        help='PGD budget (default: each checkpoint\'s training eps)',
    )
    p.add_argument('--steps', type=positive, default=20, help='PGD steps')
    p.add_argument('--out', default='runs/characterize', help='folder for the pictures and the JSON')
    p.add_argument('--data', default=None, type=checked(str, os.path.isdir, 'an existing folder'),
                   help='data path (default: the one each checkpoint was trained on)')
    p.add_argument(
        '--fo-n',
        type=checked(int, lambda v: v >= 0, 'at least 0'),
        default=500,
        help='first-order ratio (PGD-10) on the first FO_N of the n images; 0: skip it',
    )
    args = p.parse_args(argv)
    res = characterize(args.ckpts, args.n, args.rows, args.eps, args.steps, args.out, args.data, args.fo_n)
    w = max(10, *(len(r['name']) for r in res))
    print(
        f'{res[0]["n"]} test images | per-image gradient norms of CE | edge corr = Pearson(|g|, edge energy)'
    )
    print(
        "Nyquist = share of |g|'s spectrum on the 2-pixel period over the images' share (a checkerboard: "
        f'>> 1) | first-order = CE gain of PGD-10 / eps*|g|_1 on {min(args.fo_n, res[0]["n"])} images '
        '(1: linear)'
    )
    print(
        f'{"checkpoint":<{w}} {"clean":>6} {"PGD":>6} {"eps":>5} {"L1 median":>10} {"L1 mean":>9} '
        f'{"L2 median":>10} {"edge corr":>9} {"Nyquist":>8} {"first-order":>11}'
    )
    for r in res:
        nyq = f'{r["nyquist"]["rel"]:8.2f}' if r['nyquist'] else f'{"-":>8}'
        fo = f'{r["first_order"]["ratio"]:11.2f}' if r['first_order'] else f'{"-":>11}'
        print(
            f'{r["name"]:<{w}} {100 * r["clean"]:6.1f} {100 * r["pgd"]:6.1f} {r["eps"]:5.3g} '
            f'{r["l1"]["median"]:10.4g} {r["l1"]["mean"]:9.4g} {r["l2"]["median"]:10.4g} '
            f'{r["edge_alignment"]["mean"]:9.3f} {nyq} {fo}'
        )
    print(
        f'wrote {args.out}/characterize.json, characterize.csv, gradients.png (columns: input, |grad| of '
        f'{", ".join(r["name"] for r in res)}, edge energy), norm_vs_robust.png'
    )


if __name__ == '__main__':
    sys.exit(cli(main, sys.argv[1:]))
