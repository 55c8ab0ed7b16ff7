"""The science of the CPU demo: why GradNorm's robustness moves while it trains, and
whether its input gradients show the paper's point. Commands (python -m tools.science CMD --help):
measure (every ckpt-*.pt of a run folder -> RUN/science.jsonl), table (per epoch, mean +- sd over
seeds; --png the curves), logs (the training logs alone), eps (robust accuracy against eps),
pictures (|grad| maps), fdcheck (finite-difference GradNorm's error), stems (checkerboards at init).
The tables and curves are drawn by tools/science_tables.py.

Per checkpoint (first n test images, eval-mode model unless said otherwise): clean accuracy (10k
test images); PGD ce-20, margin-20, dlr-20 and their per-sample worst case (evaluate.evaluate); at
the final epoch optionally Square on the images every PGD attack failed on; the first-order ratio
(characterize.py) for CE and for the logit margin; mean ||grad_x CE_i||_1 with batch statistics
(as the penalty sees the model) and with running statistics (as the attack does); edge alignment
and the Nyquist share of the |grad| maps, of the images and of their pixel edges.
"""

import copy
import glob
import json
import os
import re
import sys

import torch
import torch.nn.functional as F

import gradnorm
from attack import square_broken
from checkpoint import load_checkpoint
from config import ArgumentParser, Config, checked, cli
from data import FASHION_MEAN, FASHION_STD, load_fashion_mnist, make_loaders
from evaluate import evaluate, model_from_checkpoint, parse_eps
from models import build_model, is_model
from tools.characterize import (
    first_order_ratio,
    gradient_grid,
    gradient_stats,
    input_gradients,
    nyquist_fraction,
    pixel_edges,
)
from tools.science_tables import group_name, load_groups, log_table, mean_sd, plot_curves, read_log, table

ATTACKS = ('ce-20', 'margin-20', 'dlr-20')


# ---------------------------------------------------------------- measures


def fd_vs_exact(model, x, y, eps=0.1):
    """Is the finite-difference GradNorm (the CPU default for GELU/SiLU) the gradient of the
    penalty? Relative error and cosine between its parameter gradient and double backprop's, on one
    batch in train mode (copies, so the running statistics stay). -> {'rel_err', 'cos'}"""
    grads = []
    for fn in (gradnorm.gradnorm, gradnorm.gradnorm_fd):
        m = copy.deepcopy(model).train().requires_grad_(True)
        loss, _ = fn(m, x.detach().clone().requires_grad_(), y, eps, torch.tensor(1.0))
        flat = [g.flatten() for g in torch.autograd.grad(loss, list(m.parameters()))]
        grads.append(torch.cat(flat).double())
    a, b = grads
    return {'rel_err': ((a - b).norm() / a.norm()).item(), 'cos': F.cosine_similarity(a, b, 0).item()}


def bn_gradient_norms(model, batches, smoothing=0.1):
    """mean_i ||d CE_i / d x_i||_1 two ways, on the same batches: 'train' with batch statistics, as
    GradNorm's penalty computes it (B * the gradient of the batch-mean CE, samples coupled through
    the statistics), and 'eval' with the running statistics the attacker faces. A copy runs in train
    mode so the model's running statistics stay as they were. -> {'train', 'eval', 'ratio': eval/train}"""
    out = {}
    for mode in ('train', 'eval'):
        m = copy.deepcopy(model).train(mode == 'train')
        norms = []
        for x, y in batches:
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                ce = F.cross_entropy(m(x), y, label_smoothing=smoothing)
                (g,) = torch.autograd.grad(ce * x.shape[0], x)
            norms.append(g.abs().flatten(1).sum(1))
        out[mode] = torch.cat(norms).double().mean().item()
    out['ratio'] = out['eval'] / out['train']
    return out


def picture_stats(model, batches):
    """Mean edge alignment and Nyquist share of |g| (characterize.gradient_stats), of the images and
    of their pixel edges; nyq_rel and nyq_edges_rel are the latter two over the images'."""
    _, _, align, _, nyq = gradient_stats(model, batches)
    edges = torch.cat([nyquist_fraction(pixel_edges(x)) for x, _ in batches]).mean().item()
    return {
        'edge_corr': align.double().mean().item(),
        'nyq_grad': nyq['grad'],
        'nyq_img': nyq['image'],
        'nyq_rel': nyq['rel'],
        'nyq_edges_rel': edges / max(nyq['image'], 1e-30),
    }


# ---------------------------------------------------------------- one checkpoint, one run folder


def load_for_science(path, n=1000):
    """-> model (eval, no parameter gradients), its checkpoint, the 10k test loader and the first n
    test images as one (x, y) pair; always the in-memory loader, so every number repeats exactly."""
    ck = load_checkpoint(path)
    model = model_from_checkpoint(ck).eval().requires_grad_(False)
    cfg = Config(**{**ck['config'], 'eval_n': n, 'loader': 'torchvision'})
    _, val, robust_val, _ = make_loaders(cfg, 0, 1, torch.device('cpu'))
    xs, ys = zip(*robust_val)
    return model, ck, val, (torch.cat(xs).contiguous(), torch.cat(ys))


def chunks(x, y, size, drop_last=False):
    stop = len(y) - len(y) % size if drop_last else len(y)
    return [(x[i : i + size], y[i : i + size]) for i in range(0, stop, size)]


def standing(model, x, y, eps):
    """-> {attack: bool mask of the images it failed on, 'worst': failed on all}; each attack seeded
    alike on each 500 images, so a checkpoint's numbers repeat (and equal the science branch's)."""
    out = {}
    for a in ATTACKS:
        masks = []
        for xb, yb in chunks(x, y, 500):
            torch.manual_seed(0)
            masks.append(evaluate(model, [(xb, yb)], [eps], [a])['standing'][eps])
        out[a] = torch.cat(masks)
    out['worst'] = torch.stack(list(out.values())).all(0)
    return out


def robust(model, val, x, y, eps, square=0):
    """Clean accuracy on the 10k test images; PGD per attack and the per-sample worst case on (x, y);
    square > 0: Square on the images every PGD attack failed on."""
    masks = standing(model, x, y, eps)
    out = dict(eps=eps, n=len(y), clean=evaluate(model, val, [])['clean'])
    out.update({k: v.double().mean().item() for k, v in masks.items()})
    if square:  # Square (gradient-free) on what every PGD attack failed on: PGD's failures are real
        broken = square_broken(model, [(x, y)], masks['worst'], eps, square)
        out.update(square_queries=square, square=(masks['worst'] & ~broken).sum().item() / len(y))
    return out


def measure_checkpoint(path, n=1000, square=0, have=None, square_all=False, fo_n=500):
    """Every number of the module docstring for one checkpoint, or, given an earlier record `have`,
    only those it lacks (all are seeded or deterministic, so a number computed later equals the same
    number computed with the rest). Square at the final epoch unless square_all. -> the record"""
    model, ck, val, (x, y) = load_for_science(path, n)
    r, eps, cfg = dict(have or {}), ck['config']['eps'], ck['config']
    square = square if (ck['epoch'] == cfg['epochs'] or square_all) and 'square' not in r else 0
    if 'worst' not in r or square:
        r.update(step=ck['step'], epoch=ck['epoch'] - 1, **robust(model, val, x, y, eps, square))
    for part, loss in (('fo', 'ce'), ('fo_margin', 'margin')):  # margin: curvature of the logits alone
        if f'{part}_ratio' not in r:
            fo = first_order_ratio(model, chunks(x[:fo_n], y[:fo_n], 500), eps, 10, loss)
            r.update({f'{part}_{k}': v for k, v in fo.items() if k != 'n'})
    if 'bn_ratio' not in r:
        bn = bn_gradient_norms(model, chunks(x, y, cfg['batch_size'], drop_last=True))
        r.update(gnorm_train=bn['train'], gnorm_eval=bn['eval'], bn_ratio=bn['ratio'])
    if 'nyq_rel' not in r:
        r.update(picture_stats(model, chunks(x, y, 500)))
    return r


def measure_run(run, n=1000, square=0, final=False, square_all=False):
    """Completes run/science.jsonl: one record per ckpt-*.pt, each measured once (the file is
    rewritten after every checkpoint, so an interrupted run loses one checkpoint at most), with the
    training log's terms of that epoch (the penalty as training saw it: batch statistics, averaged
    over the epoch). final: the final epoch's checkpoint only."""
    out = os.path.join(run, 'science.jsonl')
    recs = {r['step']: r for r in map(json.loads, open(out))} if os.path.exists(out) else {}
    log = read_log(run)
    paths = sorted(glob.glob(os.path.join(run, 'ckpt-*.pt')))  # ckpt-<step>[-<run id>].pt
    for path in paths[-1:] if final else paths:
        step = int(re.search(r'ckpt-(\d+)[^/]*\.pt$', path).group(1))
        r = measure_checkpoint(path, n, square, recs.get(step), square_all)
        if r == recs.get(step):
            continue
        m = log.get(r['epoch'], {})
        recs[step] = {
            **r,
            'train_penalty': m.get('gradnorm'),
            'train_ce': m.get('ce'),
            'log_pgd': m.get('pgd'),
        }
        with open(out + '.tmp', 'w') as f:
            f.writelines(json.dumps(recs[k]) + '\n' for k in sorted(recs))
        os.replace(out + '.tmp', out)
        rounded = {k: round(v, 4) if isinstance(v, float) else v for k, v in recs[step].items()}
        print(json.dumps(rounded), flush=True)


# ---------------------------------------------------------------- robust accuracy against eps


def robust_vs_eps(ckpts, eps_list, n=1000, fo_n=500):
    """-> {ckpt: {'clean', eps: worst-case robust accuracy, 'fo_ratio': {eps: first-order ratio}}}
    over the first n test images (the ratio over the first fo_n)."""
    out = {}
    for path in ckpts:
        model, ck, _, (x, y) = load_for_science(path, n)
        with torch.no_grad():
            clean = (model(x).argmax(1) == y).double().mean().item()
        c = ck['config']
        out[path] = {
            'clean': clean,
            'objective': c['objective'],
            'act': c['act'],
            'train_eps': c['eps'],
            **{e: standing(model, x, y, e)['worst'].double().mean().item() for e in eps_list},
            'fo_ratio': {
                e: first_order_ratio(model, chunks(x[:fo_n], y[:fo_n], 500), e, 10)['ratio'] for e in eps_list
            },
        }
        print(json.dumps({'ckpt': path, **out[path]}), flush=True)  # json writes eps keys as strings
    return out


def eps_table(results, eps_list):
    """Markdown: one row per group (ckpt's run folder, seed stripped), mean +- sd over seeds."""
    groups = {}
    for path, r in results.items():
        groups.setdefault(group_name(os.path.dirname(path)), []).append(r)
    lines = [
        '| run | seeds | clean % | ' + ' | '.join(f'eps {e:g}' for e in eps_list) + ' |',
        '|' + '---|' * (len(eps_list) + 3),
    ]
    for name, rs in groups.items():
        cells = [mean_sd(r[k] for r in rs) for k in ['clean', *eps_list]]
        row = ' | '.join(f'{100 * m:.1f} ± {100 * s:.1f}' for m, s, _ in cells)
        lines.append(f'| {name} | {len(rs)} | {row} |')
    lines += [
        '',
        '| run: first-order ratio (PGD-10 CE gain / eps·mean‖g‖₁) | seeds | | '
        + ' | '.join(f'eps {e:g}' for e in eps_list)
        + ' |',
        '|' + '---|' * (len(eps_list) + 3),
    ]
    for name, rs in groups.items():
        cells = [mean_sd(r['fo_ratio'][e] for r in rs) for e in eps_list]
        row = ' | '.join(f'{m:.2f} ± {s:.2f}' for m, s, _ in cells)
        lines.append(f'| {name} | {len(rs)} | | {row} |')
    return '\n'.join(lines)


# ---------------------------------------------------------------- gradient pictures


def pictures(ckpts, out, n=1000, rows=8):
    """|grad| maps of each checkpoint on the same first `rows` test images (characterize.py's grid:
    input, one column per checkpoint, edge energy), and each one's edge correlation and Nyquist
    shares over the first n test images. -> [stats per checkpoint]"""
    grads, stats, images = [], [], None
    for path in ckpts:
        model, ck, _, (x, y) = load_for_science(path, n)
        images = images or (x[:rows], y[:rows])
        grads.append(input_gradients(model, *images))
        stats.append(
            {
                'ckpt': path,
                'model': ck['config']['model'],
                'act': ck['config']['act'],
                **picture_stats(model, chunks(x, y, 500)),
            }
        )
        print(json.dumps(stats[-1]), flush=True)
    labels = [f'{s["model"].replace("resnet_", "")} r={s["edge_corr"]:.2f}' for s in stats]  # <= 18 chars
    gradient_grid(images[0], grads, labels, out)
    return stats


def screen_stems(names, n=500, seeds=(0, 1, 2), act='gelu', data=Config.data):
    """Nyquist share and edge correlation of |grad| at initialization, per model: the stem's own
    bias, before any training. -> {name: {stat: (mean, sd)}}"""
    _, (xte, yte) = load_fashion_mnist(data)
    x, y = xte[:n].float() / 255, yte[:n]
    out = {}
    for name in names:
        stats = []
        for seed in seeds:
            torch.manual_seed(seed)
            m = build_model(
                name, act, in_ch=1, num_classes=10, img_size=28, mean=FASHION_MEAN, std=FASHION_STD
            )
            stats.append(picture_stats(m.eval(), [(x, y)]))
        out[name] = {k: mean_sd(s[k] for s in stats)[:2] for k in stats[0]}
    return out


# ---------------------------------------------------------------- the command


def parser():
    positive = checked(int, lambda v: v >= 1, 'at least 1')
    p = ArgumentParser(description=__doc__.split('\n\n')[0])
    sub = p.add_subparsers(dest='cmd', required=True)
    m = sub.add_parser('measure', help='every checkpoint of each run folder -> RUN/science.jsonl')
    m.add_argument('runs', nargs='+', type=checked(str, os.path.isdir, 'a run folder'),
                   help='run folders (--out)')
    m.add_argument('--n', type=positive, default=1000, help='first n test images for the attacks')
    m.add_argument(
        '--square',
        type=checked(int, lambda v: v >= 0, 'at least 0'),
        default=0,
        help='Square queries at the final epoch (0: none)',
    )
    m.add_argument('--final', action='store_true', help='the final checkpoint only')
    m.add_argument('--square-all', action='store_true', help='Square at every epoch, not just the final one')
    t = sub.add_parser('table', help='per-epoch mean +- sd over seeds, markdown; --png draws the curves')
    t.add_argument('runs', nargs='+', help='run folders (--out)')
    t.add_argument('--png', default=None, help='draw the curves into this PNG file')
    t.add_argument('--final', action='store_true', help='only the last epoch of each group')
    t.add_argument('--per-run', action='store_true', help='one row per run instead of mean +- sd over seeds')
    logs = sub.add_parser('logs', help='per-epoch clean and PGD accuracy from the training logs')
    logs.add_argument('runs', nargs='+', help='run folders (--out)')
    e = sub.add_parser('eps', help='worst-case robust accuracy against eps, mean +- sd over seeds')
    e.add_argument('ckpts', nargs='+', help='checkpoints of train.py')
    e.add_argument(
        '--eps',
        nargs='+',
        type=checked(parse_eps, lambda v: 0 < v <= 1, 'in (0, 1]'),
        default=[0.02, 0.05, 0.1, 0.15, 0.2],
        help='L-inf budgets in pixel units',
    )
    e.add_argument('--n', type=positive, default=1000, help='first n test images')
    e.add_argument('--json', default=None, help='also write the results here')
    g = sub.add_parser('pictures', help='|grad| maps, edge correlation, Nyquist share')
    g.add_argument('ckpts', nargs='+', help='checkpoints of train.py')
    g.add_argument('--out', required=True, help='folder for the pictures')
    g.add_argument('--n', type=positive, default=1000, help='first n test images')
    g.add_argument('--rows', type=checked(int, lambda v: 1 <= v <= 64, 'in [1, 64]'), default=8,
                   help='images in the picture grid')
    fd = sub.add_parser('fdcheck', help='finite-difference GradNorm against double backprop')
    fd.add_argument('ckpts', nargs='+', help='checkpoints of train.py')
    st = sub.add_parser('stems', help='Nyquist share and edge correlation of |grad| at initialization')
    st.add_argument('models', nargs='+', type=checked(str, is_model, 'a model name (models.py)'),
                    help='model names of models.py')
    return p


def main(argv):
    a = parser().parse_args(argv)
    torch.manual_seed(0)
    if a.cmd == 'measure':
        for run in a.runs:
            measure_run(run, a.n, a.square, a.final, a.square_all)
    elif a.cmd == 'table':
        groups = load_groups(a.runs, a.per_run)
        groups = {k: {max(v): v[max(v)]} for k, v in groups.items()} if a.final else groups
        print(table(groups))
        if a.png:
            plot_curves(groups, a.png)
            print(f'wrote {a.png}')
    elif a.cmd == 'logs':
        print(log_table(a.runs))
    elif a.cmd == 'eps':
        res = robust_vs_eps(a.ckpts, a.eps, a.n)
        if a.json:
            with open(a.json, 'w') as f:
                json.dump(res, f, indent=1)
        print(eps_table(res, a.eps))
    elif a.cmd == 'fdcheck':
        for path in a.ckpts:
            model, ck, _, _ = load_for_science(path, 1)
            (xtr, ytr), _ = load_fashion_mnist(ck['config']['data'])
            r = fd_vs_exact(model, xtr[:128].float() / 255, ytr[:128], ck['config']['eps'])
            print(f'{path}: relative error {r["rel_err"]:.4f}, cosine {r["cos"]:.6f}')
    elif a.cmd == 'stems':
        print('| model | Nyquist abs(g) / image | edge corr |\n|---|---|---|')
        for name, r in screen_stems(a.models).items():
            print(
                f'| {name} | {r["nyq_rel"][0]:.1f} ± {r["nyq_rel"][1]:.1f} | '
                f'{r["edge_corr"][0]:.3f} ± {r["edge_corr"][1]:.3f} |'
            )
    else:
        print(
            '| checkpoint | edge corr | Nyquist share of abs(g) | of the images | abs(g) / images | '
            'pixel edges / images |\n|---|---|---|---|---|---|'
        )
        for s in pictures(a.ckpts, a.out, a.n, a.rows):
            print(
                f'| {s["ckpt"]} | {s["edge_corr"]:.3f} | {s["nyq_grad"]:.4f} | {s["nyq_img"]:.4f} | '
                f'{s["nyq_rel"]:.2f} | {s["nyq_edges_rel"]:.2f} |'
            )
        print(f'wrote {a.out}')


if __name__ == '__main__':
    sys.exit(cli(main, sys.argv[1:]))
