"""The demo study's tables and curves (python -m tools.science table|logs): per-epoch mean +- sd over
seeds from the records tools/science.py measure writes (RUN/science.jsonl) or from the training logs."""

import json
import os
import re
import sys

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

# ---------------------------------------------------------------- tables over seeds


def read_log(run):
    """The training log (metrics.jsonl) by epoch; its PGD key is pgd_upper (pgd_acc before)."""
    path = os.path.join(run, 'metrics.jsonl')
    log = {m['epoch']: m for m in map(json.loads, open(path))} if os.path.exists(path) else {}
    return {e: {**m, 'pgd': m.get('pgd_upper', m.get('pgd_acc'))} for e, m in log.items()}


def group_name(run):
    """runs/base_gelu_s2 -> base_gelu: runs that differ only in the seed form one group."""
    return re.sub(r'_s\d+$', '', os.path.basename(os.path.normpath(run)))


def load_groups(runs, per_run=False):
    """-> {group: {epoch: [record per seed]}} from each run's science.jsonl (last record per epoch),
    on top of its training log (clean accuracy on the 10k test images, computed exactly as here, the
    log's PGD and the penalty), so every trained epoch has a record; per_run: every run its own group."""
    groups = {}
    for run in runs:
        path, log = os.path.join(run, 'science.jsonl'), read_log(run)
        if not log:
            print(f'warning: {run}/metrics.jsonl missing, skipped', file=sys.stderr)
            continue
        per_epoch = {
            e: {
                'epoch': e,
                'clean': m['clean_acc'],
                'log_pgd': m['pgd'],
                'train_penalty': m.get('gradnorm'),
                'train_ce': m.get('ce'),
            }
            for e, m in log.items()
        }
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
COLUMNS = [
    ('clean %', 'clean', 100, 1),
    ('PGD worst %', 'worst', 100, 1),
    ('PGD+Square worst %', 'square', 100, 1),
    ('ce-20 %', 'ce-20', 100, 1),
    ('log PGD % (eval_n imgs)', 'log_pgd', 100, 1),
    ('penalty (train BN)', 'train_penalty', 1, 3),
    ('eps·‖g‖₁ (eval BN)', 'fo_predicted', 1, 3),
    ('PGD CE gain', 'fo_actual', 1, 3),
    ('first-order ratio', 'fo_ratio', 1, 2),
    ('margin ratio', 'fo_margin_ratio', 1, 2),
    ('BN eval/train ‖g‖₁', 'bn_ratio', 1, 2),
    ('edge corr', 'edge_corr', 1, 3),
    ('Nyquist abs(g) / img', 'nyq_rel', 1, 2),
]


def table(groups, columns=COLUMNS):
    """Markdown: one row per group and epoch, each cell mean +- sd over seeds (n seeds in a column)."""
    records = [r for g in groups.values() for rs in g.values() for r in rs]
    cols = [c for c in columns if any(r.get(c[1]) is not None for r in records)]
    lines = [
        '| run | epoch | seeds | ' + ' | '.join(c[0] for c in cols) + ' |',
        '|' + '---|' * (len(cols) + 3),
    ]
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
    """Markdown from the training logs alone: clean accuracy on the 10k test images and the log's PGD
    accuracy on its first eval_n test images, mean +- sd over seeds, then the seeds' own values."""
    groups = {}
    for run in runs:
        for m in read_log(run).values():
            per_epoch = groups.setdefault(group_name(run), {})
            per_epoch.setdefault(m['epoch'], []).append((m['clean_acc'], m['pgd']))
    lines = [
        '| run | epoch | seeds | clean % (10k) | PGD % (log) | per seed: clean / PGD |',
        '|---|---|---|---|---|---|',
    ]
    for name, epochs in groups.items():
        for e, v in sorted(epochs.items()):
            (c, cs, _), (p, ps, _) = mean_sd(a for a, _ in v), mean_sd(b for _, b in v)
            seeds = ', '.join(f'{100 * a:.1f} / {100 * b:.1f}' for a, b in v)
            lines.append(
                f'| {name} | {e} | {len(v)} | {100 * c:.1f} ± {100 * cs:.1f} | '
                f'{100 * p:.1f} ± {100 * ps:.1f} | {seeds} |'
            )
    return '\n'.join(lines)


# ---------------------------------------------------------------- per-epoch curves

PANELS = [
    ('clean accuracy % (10k test images)', 'clean', 100),
    ('robust %: PGD worst (solid), +Square (dashed)', ('worst', 'square'), 100),
    ("training log's PGD % (its eval_n images)", 'log_pgd', 100),
    ('eps*mean|g|_1: train log (solid), eval BN (dashed)', ('train_penalty', 'fo_predicted'), 1),
    ('CE gain: PGD (solid), eps*|g|_1 (dashed)', ('fo_actual', 'fo_predicted'), 1),
    ('first-order ratio: CE (solid), margin (dashed)', ('fo_ratio', 'fo_margin_ratio'), 1),
    ('|g|_1 eval-mode BN / train-mode BN', 'bn_ratio', 1),
    ('edge corr of |g|', 'edge_corr', 1),
    ('Nyquist share of |g| / of the images', 'nyq_rel', 1),
]


def draw_series(ax, epochs, seeds, color, style):
    """A thin line per seed, a thick one for the mean over the seeds measured at every epoch."""
    for s in seeds:
        points = [(e, v) for e, v in zip(epochs, s) if v is not None]
        if points:
            ax.plot(*zip(*points), style, color=color, lw=0.8, alpha=0.5, marker='o', ms=2)
    full = [s for s in seeds if all(v is not None for v in s)]
    if full:
        mean = [mean_sd([s[i] for s in full])[0] for i in range(len(epochs))]
        ax.plot(epochs, mean, style, color=color, lw=2)


def plot_curves(groups, path, panels=PANELS, cols=3):
    """Per-epoch curves of every group (a colour each) in one PNG, 330 x 230 px per panel. A Figure
    without pyplot renders with Agg: no display, no global state."""
    epochs = sorted({e for g in groups.values() for e in g})
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(cols * 3.3 + 0.2, rows * 2.3 + 0.4), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax, (title, keys, scale) in zip(axes, panels):
        for c, g in enumerate(groups.values()):
            n_seeds = max(len(g.get(e, [])) for e in epochs)
            for j, key in enumerate(keys if isinstance(keys, tuple) else (keys,)):
                seeds = [
                    [
                        scale * g[e][s][key]
                        if e in g and s < len(g[e]) and g[e][s].get(key) is not None
                        else None
                        for e in epochs
                    ]
                    for s in range(n_seeds)
                ]
                draw_series(ax, epochs, seeds, f'C{c}', '--' if j else '-')
        ax.set_title(title, fontsize=8)
        ax.set_xlabel('epoch', fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    lines = [Line2D([], [], color=f'C{c}', lw=2) for c in range(len(groups))]
    fig.legend(lines, list(groups), loc='lower center', ncol=min(len(groups), 6), fontsize=8)
    fig.suptitle('per epoch: thin lines one seed each, thick the mean over seeds', fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(path)


if __name__ == '__main__':  # a part of another command: --help says which
    print(__doc__)
