"""The science of the CPU demo (issue 16): why GradNorm's robustness moves while it trains, and
whether its input gradients show the paper's point. Measurements, not guesses:

    python science.py measure runs/base_gelu_s0 [--n 1000] [--square 1000]  # every ckpt-*.pt -> science.jsonl
    python science.py table runs/base_*_s* [--png docs/demo_curves.png]       # per-epoch mean +- sd over seeds
    python science.py eps runs/base_gelu_s*/ckpt.pt --eps 0.02 0.05 0.1 0.2   # robust accuracy against eps
    python science.py pictures runs/a/ckpt.pt runs/b/ckpt.pt --out docs/x.png # |grad| maps, edge corr, Nyquist

Per checkpoint (first n test images, eval-mode model unless said otherwise):
- clean accuracy (10k test images); PGD ce-20, margin-20, dlr-20 and their per-sample worst case;
  optionally a gradient-free Square attack on the images every PGD attack failed on;
- first_order_ratio: the CE increase PGD achieves over the increase the input gradient predicts
  (eps * ||grad||_1): 1 on a linear model, > 1 where the loss curves up inside the eps-ball;
- bn_gradient_norms: mean ||grad_x CE_i||_1 with batch statistics (how the penalty sees the model)
  and with running statistics (how the attack sees it);
- nyquist_fraction of the |grad| maps and of the images, and edge alignment (characterize.py).
"""
import argparse
import copy
import glob
import json
import math
import os
import re
import sys

import torch
import torch.nn.functional as F

from attack import LOSSES, UserError, parse_attack, parse_eps, pgd
from characterize import edge_alignment, gradient_grid, input_gradients

ATTACKS = ('ce-20', 'margin-20', 'dlr-20')


# ---------------------------------------------------------------- how first-order is the model?

def max_loss_pgd(model, x, y, eps, steps=20, loss='ce'):
    """Per-sample highest loss seen by L-inf PGD started at x itself (no random start: on a model
    that is linear in x the first step already points at the optimal corner, so the answer is
    exact), sign steps of 2.5*eps/steps, projected onto the eps-ball and [0,1]. Unlike the
    evaluator's PGD it never stops at a misclassification: it measures how far the loss climbs."""
    loss_fn, size = LOSSES[loss], 2.5 * eps / steps
    x, x_adv = x.detach(), x.detach().clone()
    best = torch.full(y.shape, float('-inf'), dtype=x.dtype, device=x.device)
    for i in range(steps + 1):
        x_adv.requires_grad_(i < steps)
        with torch.enable_grad() if i < steps else torch.no_grad():
            l = loss_fn(model(x_adv), y).to(x.dtype)
        best = torch.maximum(best, l.detach())
        if i == steps:
            break
        (g,) = torch.autograd.grad(l.sum(), x_adv)
        x_adv = (x + (x_adv.detach() + size * g.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    return best


def loss_and_input_gradient(model, x, y, loss='ce'):
    """Per-sample loss and its gradient in x; valid per sample because the model has no batch
    coupling in eval mode (the gradient of the summed loss holds each sample's own gradient)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        l = LOSSES[loss](model(x), y).to(x.dtype)
        (g,) = torch.autograd.grad(l.sum(), x)
    return l.detach(), g


def first_order_ratio(model, batches, eps, steps=20, loss='ce'):
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
        inc.append(max_loss_pgd(model, x, y, eps, steps, loss) - l0)
        pred.append(eps * g.abs().flatten(1).sum(1))
        room = torch.where(g > 0, (1 - x).clamp(max=eps), x.clamp(max=eps))  # how far each pixel may go
        box.append((g.abs() * room).flatten(1).sum(1))
    model.train(was_training)
    inc, pred, box = torch.cat(inc).double(), torch.cat(pred).double(), torch.cat(box).double()
    ok = pred > 1e-12
    return {'actual': inc.mean().item(), 'predicted': pred.mean().item(), 'predicted_box': box.mean().item(),
            'ratio': (inc.mean() / pred.mean()).item(), 'ratio_box': (inc.mean() / box.mean()).item(),
            'median_ratio': (inc[ok] / pred[ok]).median().item(), 'n': len(inc)}


def first_order_vs_eps(model, batches, eps_list, steps=10, loss='ce'):
    """first_order_ratio at several eps on one model: where does the first-order picture (the one
    GradNorm's penalty is built on) stop describing the attack? -> {eps: ratio}"""
    return {eps: first_order_ratio(model, batches, eps, steps, loss)['ratio'] for eps in eps_list}


def fd_vs_exact(model, x, y, eps=0.1):
    """Is the finite-difference GradNorm (the CPU default for GELU/SiLU) the gradient of the
    penalty? Relative error and cosine between its parameter gradient and double backprop's, on one
    batch in train mode (copies, so the running statistics stay). -> {'rel_err', 'cos'}"""
    import gradnorm
    grads = []
    for fn in (gradnorm.gradnorm, gradnorm.gradnorm_fd):
        m = copy.deepcopy(model).train().requires_grad_(True)
        loss, _ = fn(m, x.detach().clone().requires_grad_(), y, eps, torch.tensor(1.0))
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(m.parameters()))]).double())
    a, b = grads
    return {'rel_err': ((a - b).norm() / a.norm()).item(), 'cos': F.cosine_similarity(a, b, 0).item()}


# ---------------------------------------------------------------- train- vs eval-mode BatchNorm

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


def activation_stats(model, batches, slope=0.1, curve=0.1):
    """Where the units sit on their activation, over every activation module's input z: the share
    that is flat but curved (|act'(z)| < slope and act''(z) > curve: GELU's dip near z = -0.75,
    SiLU's near -1.28; never ReLU, whose act'' is 0), which gives a zero gradient at x and a loss
    that still rises within the eps-ball, and the mean |act'(z)| and |act''(z)| (how curved the
    units are where the data puts them). -> {'flat_curved', 'mean_slope', 'mean_curv'}"""
    acts = [m for m in model.modules() if isinstance(m, (torch.nn.GELU, torch.nn.SiLU, torch.nn.ReLU))]
    seen, hooks = [], [m.register_forward_hook(lambda m, i, o: seen.append((m, i[0].detach()))) for m in acts]
    flat, slopes, curv, total = 0, 0.0, 0.0, 0
    try:
        for x, _ in batches:
            seen.clear()
            with torch.no_grad():
                model(x)
            for m, z in list(seen):
                z = z.double().requires_grad_(True)
                with torch.enable_grad():
                    (d1,) = torch.autograd.grad(m.forward(z).sum(), z, create_graph=True)  # forward: no hook
                    d2 = torch.autograd.grad(d1.sum(), z, allow_unused=True)[0] if d1.requires_grad else None
                d2 = torch.zeros_like(z) if d2 is None else d2
                flat += ((d1.abs() < slope) & (d2 > curve)).sum().item()
                slopes += d1.detach().abs().sum().item()
                curv += d2.abs().sum().item()
                total += z.numel()
    finally:
        for h in hooks:
            h.remove()
    return {'flat_curved': flat / total, 'mean_slope': slopes / total, 'mean_curv': curv / total}


def true_class_probability(model, batches):
    """Mean softmax probability of the true class: 0.91 is where label-smoothed CE (0.1, 10
    classes) has zero gradient, so a model calibrated there zeroes the penalty's gradient."""
    with torch.no_grad():
        p = torch.cat([F.softmax(model(x).double(), 1).gather(1, y[:, None]).squeeze(1) for x, y in batches])
    return p.mean().item()


# ---------------------------------------------------------------- checkerboards

def nyquist_fraction(maps):
    """Per map, the share of its spectral energy (mean removed) on the Nyquist lines k_y = H/2 or
    k_x = W/2: the 2-pixel periodic patterns (checkerboards, stripes) that a stride-2 convolution
    with a kernel not divisible by its stride prints into its input gradient. 1 for a pure
    checkerboard, ~0 for smooth maps, (H+W-1)/(H*W-1) for white noise. maps: (B, [C,] H, W),
    channels summed; H and W even (odd sizes have no Nyquist bin)."""
    m = maps.double().sum(1) if maps.ndim == 4 else maps.double()
    H, W = m.shape[-2:]
    if H % 2 or W % 2:
        raise UserError(f'nyquist_fraction needs even sizes, not {H}x{W}')
    p = torch.fft.fft2(m - m.mean((-2, -1), keepdim=True)).abs().pow(2)
    nyq = p[:, H // 2, :].sum(-1) + p[:, :, W // 2].sum(-1) - p[:, H // 2, W // 2]
    return nyq / p.sum((-2, -1)).clamp_min(1e-30)


def pixel_edges(x):
    """|finite-difference gradient| of the images at pixel resolution: what a perfectly edge-aligned
    |grad| map would look like, sharp edges and all (the reference for the Nyquist share of |grad|)."""
    dx = F.pad(x[..., :, 1:] - x[..., :, :-1], (0, 1))
    dy = F.pad(x[..., 1:, :] - x[..., :-1, :], (0, 0, 0, 1))
    return (dx ** 2 + dy ** 2).sqrt()


def gradient_picture_stats(model, batches):
    """Mean edge alignment (Pearson of |g| with edge energy) and Nyquist share of |g|, of the images
    and of their pixel edges (pixel_edges); nyq_rel and nyq_edges_rel are the latter two over the images'."""
    model.eval()
    align, nyq_g, nyq_x, nyq_e = [], [], [], []
    for x, y in batches:
        g = input_gradients(model, x, y)
        align.append(edge_alignment(g, x))
        nyq_g.append(nyquist_fraction(g.abs()))
        nyq_x.append(nyquist_fraction(x))
        nyq_e.append(nyquist_fraction(pixel_edges(x)))
    a, ng, nx, ne = (torch.cat(v).double().mean().item() for v in (align, nyq_g, nyq_x, nyq_e))
    return {'edge_corr': a, 'nyq_grad': ng, 'nyq_img': nx, 'nyq_rel': ng / max(nx, 1e-30), 'nyq_edges_rel': ne / max(nx, 1e-30)}


# ---------------------------------------------------------------- attacks with per-sample results

def robust_masks(model, x, y, eps, attacks=ATTACKS, seed=0):
    """-> {attack: bool mask of the samples that attack failed on, 'worst': failed on all}. Each
    attack is the evaluator's (attack.pgd, keep_best: a sample counts as fooled if any iterate was
    misclassified), seeded alike, so a checkpoint's numbers repeat exactly."""
    out = {}
    for spec in attacks:
        loss, steps, restarts = parse_attack(spec)
        torch.manual_seed(seed)
        x_adv, fooled = pgd(model, x, y, eps, steps, keep_best=True, loss=loss, restarts=restarts)
        if (x_adv - x).abs().max() > eps * (1 + 1e-5) + 1e-6:  # never trust, verify
            raise RuntimeError(f'{spec} left the eps-ball')
        out[spec] = ~fooled
    out['worst'] = torch.stack([out[a] for a in attacks]).all(0)
    return out


def square_robust(model, x, y, eps, n_queries=1000, seed=0):
    """Gradient-free Square attack (Andriushchenko et al. 2020, pyautoattack's port, margin loss):
    a check that PGD's failures are real and not gradient masking. -> bool mask of survivors."""
    from pyautoattack.square import SquareAttack
    if len(y) == 0:
        return torch.zeros(0, dtype=torch.bool)
    attack = SquareAttack(model, norm='Linf', n_queries=n_queries, eps=eps, seed=seed, device=x.device)
    with torch.no_grad():
        x_adv = attack.perturb(x, y)
        if (x_adv - x).abs().max() > eps * (1 + 1e-5) + 1e-6 or x_adv.min() < 0 or x_adv.max() > 1:
            raise RuntimeError('Square left the eps-ball or [0,1]')
        return model(x_adv).argmax(1) == y


# ---------------------------------------------------------------- one checkpoint, one run folder

def load_for_science(path, n=1000):
    """-> model (eval, no parameter gradients), its config, the 10k test loader and the first n
    test images as one (x, y) pair; always the in-memory loader, so every number repeats exactly."""
    import gradnorm
    ck = gradnorm.load_checkpoint(path)
    model = gradnorm.model_from_checkpoint(ck).eval().requires_grad_(False)
    cfg = gradnorm.Config(**{**ck['config'], 'eval_n': n, 'loader': 'torchvision'})
    _, val, robust_val, _ = gradnorm.make_loaders(cfg, 0, 1, torch.device('cpu'))
    xs, ys = zip(*robust_val)
    return model, ck, val, (torch.cat(xs).contiguous(), torch.cat(ys))


def chunks(x, y, size, drop_last=False):
    stop = len(y) - len(y) % size if drop_last else len(y)
    return [(x[i:i + size], y[i:i + size]) for i in range(0, stop, size)]


PARTS = ('attacks', 'fo', 'fo_margin', 'acts', 'bn', 'pictures')


def measure_checkpoint(path, n=1000, square=0, have=None, fo_n=500, fo_steps=10, parts=PARTS, square_all=False):
    """Every number issue 16 asks for, for one checkpoint (see the module docstring), or, given an
    earlier record `have`, only the parts it lacks (all are seeded or deterministic, so a part
    computed later equals the same part computed with the rest); `parts` limits the work to the
    PARTS named (the attacks always run). -> the completed record"""
    model, ck, val, (x, y) = load_for_science(path, n)
    r, eps = dict(have or {}), ck['config']['eps']
    have = set(r) | {key for part, key in zip(PARTS, ('worst', 'fo_ratio', 'fo_margin_ratio', 'flat_curved',
                                                       'bn_ratio', 'nyq_rel')) if part not in parts}
    final = ck['epoch'] == ck['config']['epochs']
    need_square = square and (final or square_all) and 'square' not in r  # the final epoch unless square_all
    if 'worst' not in r or need_square:
        with torch.no_grad():
            clean = sum((model(a).argmax(1) == b).sum().item() for a, b in val) / len(val.labels)
        masks = [robust_masks(model, a, b, eps) for a, b in chunks(x, y, 500)]
        rob = {k: torch.cat([m[k] for m in masks]) for k in masks[0]}
        r.update(step=ck['step'], epoch=ck['epoch'] - 1, eps=eps, n=len(y), clean=clean,
                 **{k: v.double().mean().item() for k, v in rob.items()})
    if need_square:
        idx = rob['worst'].nonzero().squeeze(1)  # Square only where every PGD attack failed
        alive = square_robust(model, x[idx], y[idx], eps, square)
        r.update(square_queries=square, square=alive.sum().item() / len(y))
    fo_batches = chunks(x[:fo_n], y[:fo_n], 500)
    if 'fo_ratio' not in have:  # PGD without early stopping: the costly part
        r.update({f'fo_{k}': v for k, v in first_order_ratio(model, fo_batches, eps, fo_steps).items() if k != 'n'})
    if 'fo_margin_ratio' not in have:  # the logits alone: is the curvature in the network or in the softmax?
        fo = first_order_ratio(model, fo_batches, eps, fo_steps, loss='margin')
        r.update({f'fo_margin_{k}': v for k, v in fo.items() if k != 'n'})
    if 'flat_curved' not in have:
        r.update(activation_stats(model, chunks(x, y, 500)), p_true=true_class_probability(model, chunks(x, y, 500)))
    if 'bn_ratio' not in have:
        bn = bn_gradient_norms(model, chunks(x, y, ck['config']['batch_size'], drop_last=True))
        r.update(gnorm_train=bn['train'], gnorm_eval=bn['eval'], bn_ratio=bn['ratio'])
    if 'nyq_rel' not in have:
        r.update(gradient_picture_stats(model, chunks(x, y, 500)))
    return r


def measure_run(run, n=1000, square=0, final=False, parts=PARTS, square_all=False):
    """Completes run/science.jsonl: one record per ckpt-*.pt, each measured once (the file is
    rewritten after every checkpoint, so an interrupted run loses one checkpoint at most); Square
    on the final epoch only. Adds the training log's terms of that epoch (the penalty as training
    saw it: batch statistics, averaged over the epoch). final: the final epoch's checkpoint only."""
    out = os.path.join(run, 'science.jsonl')
    recs = {r['step']: r for r in map(json.loads, open(out))} if os.path.exists(out) else {}
    log_path = os.path.join(run, 'metrics.jsonl')
    log = {m['epoch']: m for m in map(json.loads, open(log_path))} if os.path.exists(log_path) else {}
    paths = sorted(glob.glob(os.path.join(run, 'ckpt-*.pt')))
    for path in paths[-1:] if final else paths:
        step = int(re.search(r'ckpt-(\d+)\.pt$', path).group(1))
        r = measure_checkpoint(path, n, square, recs.get(step), parts=parts, square_all=square_all)
        if r == recs.get(step):
            continue
        m = log.get(r['epoch'], {})
        recs[step] = {**r, 'train_penalty': m.get('gradnorm'), 'train_ce': m.get('ce'), 'log_pgd': m.get('pgd_acc')}
        with open(out + '.tmp', 'w') as f:
            f.writelines(json.dumps(recs[k]) + '\n' for k in sorted(recs))
        os.replace(out + '.tmp', out)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in recs[step].items()}), flush=True)


# ---------------------------------------------------------------- tables over seeds

def group_name(run):
    """runs/base_gelu_s2 -> base_gelu: runs that differ only in the seed form one group."""
    return re.sub(r'_s\d+$', '', os.path.basename(os.path.normpath(run)))


def load_groups(runs, per_run=False):
    """-> {group: {epoch: [record per seed]}} from each run's science.jsonl (last record per epoch),
    on top of its training log (metrics.jsonl: clean accuracy on the 10k test images, computed exactly as
    here, the log's PGD ce-20 and the penalty), so every trained epoch has a record; per_run: every run
    its own group."""
    groups = {}
    for run in runs:
        path, log_path = os.path.join(run, 'science.jsonl'), os.path.join(run, 'metrics.jsonl')
        if not os.path.exists(log_path):
            print(f'warning: {log_path} missing, skipped', file=sys.stderr)
            continue
        per_epoch = {m['epoch']: {'epoch': m['epoch'], 'clean': m['clean_acc'], 'log_pgd': m['pgd_acc'],
                                  'train_penalty': m.get('gradnorm'), 'train_ce': m.get('ce')}
                     for m in map(json.loads, open(log_path))}
        for r in map(json.loads, open(path)) if os.path.exists(path) else []:
            per_epoch[r['epoch']] = {**per_epoch.get(r['epoch'], {}), **r}
        for epoch, r in per_epoch.items():
            name = os.path.basename(os.path.normpath(run)) if per_run else group_name(run)
            groups.setdefault(name, {}).setdefault(epoch, []).append(r)
    return groups


def mean_sd(values):
    """-> (mean, sample sd, n) of the values that exist; sd is 0 for a single value."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return None, None, 0
    m = sum(v) / len(v)
    return m, (sum((x - m) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else 0.0, len(v)


# column: (header, key, scale, digits)
COLUMNS = [('clean %', 'clean', 100, 1), ('PGD worst %', 'worst', 100, 1), ('PGD+Square worst %', 'square', 100, 1),
           ('ce-20 %', 'ce-20', 100, 1), ('log ce-20 % (eval_n imgs)', 'log_pgd', 100, 1), ('penalty (train BN)', 'train_penalty', 1, 3),
           ('eps·‖g‖₁ (eval BN)', 'fo_predicted', 1, 3), ('PGD CE gain', 'fo_actual', 1, 3),
           ('first-order ratio', 'fo_ratio', 1, 2), ('margin ratio', 'fo_margin_ratio', 1, 2),
           ('BN eval/train ‖g‖₁', 'bn_ratio', 1, 2),
           ('edge corr', 'edge_corr', 1, 3), ('Nyquist abs(g) / img', 'nyq_rel', 1, 2)]


def table(groups, columns=COLUMNS):
    """Markdown: one row per group and epoch, each cell mean +- sd over seeds (n seeds in a column)."""
    cols = [c for c in columns if any(r.get(c[1]) is not None for g in groups.values() for rs in g.values() for r in rs)]
    lines = ['| run | epoch | seeds | ' + ' | '.join(c[0] for c in cols) + ' |', '|' + '---|' * (len(cols) + 3)]
    for name, epochs in groups.items():
        for epoch in sorted(epochs):
            cells = []
            for _, key, scale, digits in cols:
                m, sd, k = mean_sd(r.get(key) for r in epochs[epoch])
                few = f' (n={k})' if 0 < k < len(epochs[epoch]) else ''  # fewer seeds measured than trained
                spread = f' ± {scale * sd:.{digits}f}' if k > 1 else ''  # one value has no spread to show
                cells.append('' if m is None else f'{scale * m:.{digits}f}{spread}{few}')
            lines.append(f'| {name} | {epoch} | {len(epochs[epoch])} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def log_table(runs):
    """Markdown from the training logs alone (every seed, every epoch, no extra compute): clean accuracy
    on the 10k test images and the log's PGD ce-20 accuracy on its first eval_n test images, mean +- sd
    over seeds, then the seeds' own values."""
    groups = {}
    for run in runs:
        for m in map(json.loads, open(os.path.join(run, 'metrics.jsonl'))):
            groups.setdefault(group_name(run), {}).setdefault(m['epoch'], []).append((m['clean_acc'], m['pgd_acc']))
    lines = ['| run | epoch | seeds | clean % (10k) | PGD ce-20 % (log) | per seed: clean / PGD |', '|---|---|---|---|---|---|']
    for name, epochs in groups.items():
        for e, v in sorted(epochs.items()):
            (c, cs, _), (p, ps, _) = mean_sd(a for a, _ in v), mean_sd(b for _, b in v)
            seeds = ', '.join(f'{100 * a:.1f} / {100 * b:.1f}' for a, b in v)
            lines.append(f'| {name} | {e} | {len(v)} | {100 * c:.1f} ± {100 * cs:.1f} | {100 * p:.1f} ± {100 * ps:.1f} | {seeds} |')
    return '\n'.join(lines)


# ---------------------------------------------------------------- per-epoch curves (Pillow only)

PANELS = [('clean accuracy % (10k test images)', 'clean', 100),
          ('robust %: worst of PGD ce/margin/dlr-20 (solid), +Square (dashed)', ('worst', 'square'), 100),
          ('training log: PGD ce-20 % on its eval_n test images', 'log_pgd', 100),
          ('penalty eps*mean|g|_1: train log (solid), eval BN (dashed)', ('train_penalty', 'fo_predicted'), 1),
          ('CE gain: PGD reaches (solid), eps*|g|_1 predicts (dashed)', ('fo_actual', 'fo_predicted'), 1),
          ('first-order ratio (gain/prediction): CE solid, margin dashed', ('fo_ratio', 'fo_margin_ratio'), 1),
          ('|g|_1 eval-mode BN / train-mode BN', 'bn_ratio', 1), ('edge corr of |g|', 'edge_corr', 1),
          ('Nyquist share of |g| / of the images', 'nyq_rel', 1)]
COLORS = ['#d62728', '#1f77b4', '#2ca02c', '#9467bd', '#ff7f0e', '#8c564b', '#e377c2', '#17becf']


def nice_range(values):
    lo, hi = min(values), max(values)
    pad = 0.08 * (hi - lo or abs(hi) or 1)
    return lo - pad, hi + pad


def draw_panel(d, box, title, series, epochs):
    """One panel: series = [(color, [[value per epoch] per seed], dashed)]; thin lines and open
    dots per seed, a thick line for the mean over the seeds measured at every epoch."""
    left, top, right, bottom = box
    vals = [v for _, seeds, _ in series for s in seeds for v in s if v is not None]
    if not vals:
        return
    lo, hi = nice_range(vals)
    px = lambda e: left + (e - epochs[0]) / max(epochs[-1] - epochs[0], 1) * (right - left)
    py = lambda v: bottom - (v - lo) / (hi - lo) * (bottom - top)
    d.rectangle([left, top, right, bottom], outline='black')
    d.text((left, top - 14), title, fill='black')
    for k in range(5):  # y ticks
        v = lo + k * (hi - lo) / 4
        d.line([(left - 4, py(v)), (left, py(v))], fill='black')
        d.text((left - 44, py(v) - 5), f'{v:.3g}', fill='black')
    for e in epochs:
        d.text((px(e) - 3, bottom + 4), str(e), fill='black')
    for color, seeds, dashed in series:
        for s in seeds:
            pts = [(px(e), py(v)) for e, v in zip(epochs, s) if v is not None]
            d.line(pts, fill=color, width=1) if len(pts) > 1 else None
            for p in pts:
                d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], outline=color)
        full = [s for s in seeds if all(v is not None for v in s)]  # the mean of seeds measured every epoch
        mean = [mean_sd([s[i] for s in full])[0] for i in range(len(epochs))]
        pts = [(px(e), py(v)) for e, v in zip(epochs, mean) if v is not None]
        for a, b in zip(pts, pts[1:]):
            if dashed:  # dashes: every other ninth of the segment
                for j in range(0, 9, 2):
                    d.line([(a[0] + (b[0] - a[0]) * j / 9, a[1] + (b[1] - a[1]) * j / 9),
                            (a[0] + (b[0] - a[0]) * (j + 1) / 9, a[1] + (b[1] - a[1]) * (j + 1) / 9)], fill=color, width=2)
            else:
                d.line([a, b], fill=color, width=3)
        for p in pts:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=color)


def plot_curves(groups, path, panels=PANELS, cols=3, w=330, h=230):
    """Per-epoch curves of every group (a color each; thin: seeds, thick: mean) in one PNG."""
    from PIL import Image, ImageDraw
    epochs = sorted({e for g in groups.values() for e in g})
    rows = -(-len(panels) // cols)
    img = Image.new('RGB', (cols * w + 20, rows * h + 40), 'white')
    d = ImageDraw.Draw(img)
    for i, (title, keys, scale) in enumerate(panels):
        keys = keys if isinstance(keys, tuple) else (keys,)
        series = []
        for c, (name, g) in enumerate(groups.items()):
            for j, key in enumerate(keys):
                n_seeds = max(len(g.get(e, [])) for e in epochs)
                seeds = [[scale * g[e][s][key] if e in g and s < len(g[e]) and g[e][s].get(key) is not None
                          else None for e in epochs] for s in range(n_seeds)]
                series.append((COLORS[c % len(COLORS)], seeds, j > 0))
        x0, y0 = (i % cols) * w + 60, (i // cols) * h + 30
        draw_panel(d, (x0, y0, x0 + w - 80, y0 + h - 60), title, series, epochs)
    for c, name in enumerate(groups):  # legend along the bottom
        x = 20 + c * 160
        d.rectangle([x, rows * h + 18, x + 12, rows * h + 30], fill=COLORS[c % len(COLORS)])
        d.text((x + 16, rows * h + 18), name[:24], fill='black')
    d.text((cols * w - 110, rows * h + 18), 'x: epoch', fill='black')
    img.save(path, optimize=True)


# ---------------------------------------------------------------- robust accuracy against eps

def robust_vs_eps(ckpts, eps_list, n=1000, attacks=ATTACKS, fo_n=500):
    """-> {ckpt: {'clean', eps: worst-case robust accuracy, 'fo_ratio': {eps: first-order ratio}}}
    over the first n test images (the ratio over the first fo_n)."""
    out = {}
    for path in ckpts:
        model, ck, _, (x, y) = load_for_science(path, n)
        with torch.no_grad():
            clean = (model(x).argmax(1) == y).double().mean().item()
        out[path] = {'clean': clean, 'objective': ck['config']['objective'], 'act': ck['config']['act'],
                     'train_eps': ck['config']['eps'], 'fo_ratio': {}}
        for eps in eps_list:
            rob = torch.cat([robust_masks(model, a, b, eps, attacks)['worst'] for a, b in chunks(x, y, 500)])
            out[path][eps] = rob.double().mean().item()
            out[path]['fo_ratio'][eps] = first_order_ratio(model, chunks(x[:fo_n], y[:fo_n], 500), eps, 10)['ratio']
        print(json.dumps({'ckpt': path, **{str(k): v for k, v in out[path].items() if k != 'fo_ratio'},
                          'fo_ratio': {str(k): v for k, v in out[path]['fo_ratio'].items()}}), flush=True)
    return out


def eps_table(results, eps_list):
    """Markdown: one row per group (ckpt's run folder, seed stripped), mean +- sd over seeds."""
    groups = {}
    for path, r in results.items():
        groups.setdefault(group_name(os.path.dirname(path)), []).append(r)
    lines = ['| run | seeds | clean % | ' + ' | '.join(f'eps {e:g}' for e in eps_list) + ' |',
             '|' + '---|' * (len(eps_list) + 3)]
    for name, rs in groups.items():
        cells = [mean_sd(r[k] for r in rs) for k in ['clean', *eps_list]]
        lines.append(f'| {name} | {len(rs)} | ' + ' | '.join(f'{100 * m:.1f} ± {100 * s:.1f}' for m, s, _ in cells) + ' |')
    lines += ['', '| run: first-order ratio (PGD-10 CE gain / eps·mean‖g‖₁) | seeds | | '
              + ' | '.join(f'eps {e:g}' for e in eps_list) + ' |', '|' + '---|' * (len(eps_list) + 3)]
    for name, rs in groups.items():
        cells = [mean_sd(r['fo_ratio'][e] for r in rs) for e in eps_list]
        lines.append(f'| {name} | {len(rs)} | | ' + ' | '.join(f'{m:.2f} ± {s:.2f}' for m, s, _ in cells) + ' |')
    return '\n'.join(lines)


# ---------------------------------------------------------------- gradient pictures

def pictures(ckpts, out, n=1000, rows=8, names=None):
    """|grad| maps of each checkpoint on the same first `rows` test images (characterize.py's
    grid: input, one column per checkpoint, edge energy), and each one's edge correlation and
    Nyquist fractions over the first n test images. -> [stats per checkpoint]"""
    grads, stats, images = [], [], None
    for path in ckpts:
        model, ck, _, (x, y) = load_for_science(path, n)
        images = images if images is not None else (x[:rows], y[:rows])
        grads.append(input_gradients(model, *images))
        s = gradient_picture_stats(model, chunks(x, y, 500))
        stats.append({'ckpt': path, 'model': ck['config']['model'], 'act': ck['config']['act'], **s})
        print(json.dumps(stats[-1]), flush=True)
    labels = names or [f'{s["model"].replace("resnet_", "")} r={s["edge_corr"]:.2f}' for s in stats]  # <= 18 chars
    gradient_grid(images[0], grads, labels, out)
    return stats


def screen_stems(names, n=500, seeds=(0, 1, 2), act='gelu'):
    """Nyquist share and edge correlation of |grad| at initialization, per stem: the stem's own
    bias, before any training (white noise would give a Nyquist ratio of ~14.6 against these images)."""
    import gradnorm
    from data import FASHION_MEAN, FASHION_STD, load_fashion_mnist
    _, (xte, yte) = load_fashion_mnist(gradnorm.Config.data)
    x, y = xte[:n].float() / 255, yte[:n]
    out = {}
    for name in names:
        stats = []
        for seed in seeds:
            torch.manual_seed(seed)
            m = gradnorm.build_model(name, act, in_ch=1, num_classes=10, mean=FASHION_MEAN, std=FASHION_STD)
            stats.append(gradient_picture_stats(m.eval(), [(x, y)]))
        out[name] = {k: mean_sd(s[k] for s in stats)[:2] for k in stats[0]}
    return out


# ---------------------------------------------------------------- the command

def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='cmd', required=True)
    m = sub.add_parser('measure', help='every checkpoint of each run folder -> RUN/science.jsonl')
    m.add_argument('runs', nargs='+')
    m.add_argument('--n', type=int, default=1000, help='first n test images for the attacks')
    m.add_argument('--square', type=int, default=0, help='Square queries at the final epoch (0: none)')
    m.add_argument('--final', action='store_true', help='the final checkpoint only')
    m.add_argument('--square-all', action='store_true', help='Square at every epoch, not just the final one')
    m.add_argument('--parts', default=','.join(PARTS), help='comma-separated subset of ' + ','.join(PARTS))
    t = sub.add_parser('table', help='per-epoch mean +- sd over seeds, markdown; --png draws the curves')
    t.add_argument('runs', nargs='+')
    t.add_argument('--png', default=None)
    t.add_argument('--final', action='store_true', help='only the last epoch of each group')
    t.add_argument('--per-run', action='store_true', help='one row per run instead of mean +- sd over seeds')
    lg = sub.add_parser('logs', help='per-epoch clean and PGD accuracy from the training logs, every seed')
    lg.add_argument('runs', nargs='+')
    e = sub.add_parser('eps', help='worst-case robust accuracy against eps, mean +- sd over seeds')
    e.add_argument('ckpts', nargs='+')
    e.add_argument('--eps', nargs='+', default=['0.02', '0.05', '0.1', '0.15', '0.2'])
    e.add_argument('--n', type=int, default=1000)
    e.add_argument('--json', default=None, help='also write the results here')
    g = sub.add_parser('pictures', help='|grad| maps, edge correlation, Nyquist fraction')
    g.add_argument('ckpts', nargs='+')
    g.add_argument('--out', required=True)
    g.add_argument('--n', type=int, default=1000)
    g.add_argument('--rows', type=int, default=8)
    f = sub.add_parser('fdcheck', help='finite-difference GradNorm against double backprop, per checkpoint')
    f.add_argument('ckpts', nargs='+')
    ac = sub.add_parser('acts', help="where the units sit on their activation (activation_stats), per checkpoint")
    ac.add_argument('ckpts', nargs='+')
    ac.add_argument('--n', type=int, default=1000)
    st = sub.add_parser('stems', help='Nyquist share and edge correlation of |grad| at initialization')
    st.add_argument('models', nargs='+')
    a = p.parse_args(argv)
    torch.manual_seed(0)
    if a.cmd == 'measure':
        for run in a.runs:
            measure_run(run, a.n, a.square, a.final, tuple(a.parts.split(',')), a.square_all)
    elif a.cmd == 'table':
        groups = load_groups(a.runs, a.per_run)
        if a.final:
            groups = {k: {max(v): v[max(v)]} for k, v in groups.items()}
        print(table(groups))
        if a.png:
            plot_curves(groups, a.png)
            print(f'wrote {a.png}')
    elif a.cmd == 'logs':
        print(log_table(a.runs))
    elif a.cmd == 'eps':
        eps_list = [parse_eps(x) for x in a.eps]
        res = robust_vs_eps(a.ckpts, eps_list, a.n)
        if a.json:
            with open(a.json, 'w') as f:
                json.dump({k: {str(e): ({str(a): b for a, b in v.items()} if isinstance(v, dict) else v)
                               for e, v in r.items()} for k, r in res.items()}, f, indent=1)
        print(eps_table(res, eps_list))
    elif a.cmd == 'fdcheck':
        import gradnorm
        from data import load_fashion_mnist
        (xtr, ytr), _ = load_fashion_mnist(gradnorm.Config.data)
        for path in a.ckpts:
            model, ck, _, _ = load_for_science(path, 1)
            r = fd_vs_exact(model, xtr[:128].float() / 255, ytr[:128], ck['config']['eps'])
            print(f'{path}: relative error {r["rel_err"]:.4f}, cosine {r["cos"]:.6f}')
    elif a.cmd == 'acts':
        print("| checkpoint | flat & curved units | mean act' | mean act'' | p(true class) |\n|---|---|---|---|---|")
        for path in a.ckpts:
            model, _, _, (x, y) = load_for_science(path, a.n)
            r = activation_stats(model, chunks(x, y, 500))
            p = true_class_probability(model, chunks(x, y, 500))
            print(f'| {path} | {r["flat_curved"]:.3f} | {r["mean_slope"]:.3f} | {r["mean_curv"]:.3f} | {p:.3f} |')
    elif a.cmd == 'stems':
        print('| model | Nyquist abs(g) / image | edge corr |\n|---|---|---|')
        for name, r in screen_stems(a.models).items():
            print(f'| {name} | {r["nyq_rel"][0]:.1f} ± {r["nyq_rel"][1]:.1f} | {r["edge_corr"][0]:.3f} ± {r["edge_corr"][1]:.3f} |')
    else:
        stats = pictures(a.ckpts, a.out, a.n, a.rows)
        print('| checkpoint | edge corr | Nyquist share of abs(g) | of the images | abs(g) / images | '
              'pixel edges / images |\n|---|---|---|---|---|---|')
        for s in stats:
            print(f'| {s["ckpt"]} | {s["edge_corr"]:.3f} | {s["nyq_grad"]:.4f} | {s["nyq_img"]:.4f} | {s["nyq_rel"]:.2f} | '
                  f'{s["nyq_edges_rel"]:.2f} |')
        print(f'wrote {a.out}')


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except UserError as e:
        sys.exit(f'error: {e}')
