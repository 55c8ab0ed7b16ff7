"""The demo's cost-robustness study: what each method buys for its training compute (Fashion-MNIST).

    python -m tools.cost run --seeds=0,1,2      # trains and evaluates every run not done yet (CPU hours)
    python -m tools.cost bench                  # each method's step time over PGD-3's -> OUT/bench.json
    python -m tools.cost report --png=docs/cost_robustness.png     # the tables (markdown) and the figure

The runs are `python train.py --objective=X --seed=S --out=OUT/X-sS` with the demo's defaults (4
epochs), and PGD-3 AT given about GradNorm's cost: 2 epochs with the warm-up halved, the same
schedule shape (epochs are whole: 2 of 4 is below GradNorm's cost, so the comparison favours GradNorm).
Each is evaluated by evaluate.py: the worst case of CE and margin PGD-20 at six eps on the first 500
test images, then AutoAttack (standard) at eps 0.1 on the first 1,000, with the masking checks. A
run's cost is its method's median step time over PGD-3's (`tools.bench step --json`: interleaved,
eager on the CPU as training runs it) times its steps, in units of the 4-epoch PGD-3 AT run; wall
and CPU time are measured around its train.py.
"""

import glob
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

import torch

from config import ArgumentParser, Config, UserError, cli

METHODS = {  # name: (train.py arguments, the bench row timing its step, label)
    'standard': (['--objective=standard'], 'standard', 'standard'),
    'gradnorm': (['--objective=gradnorm'], 'gradnorm fd', 'GradNorm'),
    'edge': (['--objective=edge'], 'edgereg', 'EdgeReg'),
    'fgsm': (['--objective=fgsm'], 'fgsm at', 'FGSM-RS AT'),
    'pgd': (['--objective=pgd'], 'pgd3 at', 'PGD-3 AT'),
    'pgd2': (['--objective=pgd', '--epochs=2', '--warmup_epochs=0.5'], 'pgd3 at', 'PGD-3 AT, 2 epochs'),
}
SWEEP = ('2/255', '4/255', '8/255', '0.05', '0.1', '0.15')
SWEEP_N = 500  # PGD at six eps on 500 images costs less than AutoAttack at one on 1,000
AA_EPS = '0.1'
TIME = re.compile(r'wall ([\d.]+) s user ([\d.]+) s sys ([\d.]+) s')


# ---------------------------------------------------------------- running

def timed(cmd, log):
    """Runs cmd with its output in log -> 'wall W s user U s sys S s' (the format of /usr/bin/time -f)."""
    t0, r0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, 'w') as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code:
        raise UserError(f'{" ".join(cmd)} exited with {code}: see {log}')
    user, system = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
    return f'wall {time.time() - t0:.2f} s user {user:.2f} s sys {system:.2f} s'


def run_one(out, name, seed):
    """Trains OUT/name-sS unless its time.txt says it did, then the evaluations it lacks."""
    d, py = os.path.join(out, f'{name}-s{seed}'), sys.executable
    if not os.path.isfile(os.path.join(d, 'time.txt')):
        print(f'training {d}', flush=True)
        spent = timed([py, 'train.py', *METHODS[name][0], f'--seed={seed}', f'--out={d}', '--overwrite'],
                      d + '.log')  # outside d: train.py owns its folder until it ends
        os.replace(d + '.log', os.path.join(d, 'train.log'))
        with open(os.path.join(d, 'time.txt'), 'w') as f:
            f.write(spent + '\n')
    evaluate = [py, 'evaluate.py', '--ckpt', os.path.join(d, 'ckpt.pt')]
    if not os.path.isfile(os.path.join(d, 'sweep.json')):
        print(f'PGD at {len(SWEEP)} eps: {d}', flush=True)
        timed([*evaluate, '--eps', *SWEEP, '--attacks', 'ce-20', 'margin-20', '--n', str(SWEEP_N),
               '--no-autoattack', '--no-checks', '--json', f'{d}/sweep.json'], os.path.join(d, 'sweep.log'))
    if not os.path.isfile(os.path.join(d, 'aa.json')):
        print(f'AutoAttack at {AA_EPS}: {d}', flush=True)
        timed([*evaluate, '--eps', AA_EPS, '--autoattack', '--json', f'{d}/aa.json'],
              os.path.join(d, 'aa.log'))


def run(args):
    os.makedirs(args.out, exist_ok=True)
    for seed in args.seeds:
        for name in args.methods:
            run_one(args.out, name, seed)


def bench(args):
    cmd = [sys.executable, '-m', 'tools.bench', 'step', '--conv=auto', f'--threads={args.threads}',
           f'--repeats={args.repeats}', f'--json={args.out}/bench.json']
    sys.exit(subprocess.call(cmd))


# ---------------------------------------------------------------- the numbers

def load_run(d, steps_per_epoch):
    """One run folder -> its numbers (None where an evaluation has not run yet)."""
    read = lambda f: json.load(open(os.path.join(d, f))) if os.path.isfile(os.path.join(d, f)) else None
    with open(os.path.join(d, 'metrics.jsonl')) as f:
        epochs = [json.loads(line) for line in f]
    with open(os.path.join(d, 'time.txt')) as f:
        wall, user, sys_ = map(float, TIME.search(f.read()).groups())
    sweep, aa = read('sweep.json'), read('aa.json')
    return dict(clean=epochs[-1]['clean_acc'], upper=epochs[-1]['pgd_upper'],
                steps=len(epochs) * steps_per_epoch, pgd_steps=Config.epochs * steps_per_epoch, wall=wall,
                cpu=user + sys_, pgd={e: sweep['robust'][e]['worst'] for e in SWEEP} if sweep else None,
                aa=aa['autoattack'][AA_EPS]['robust'] if aa else None,
                checks=[c['ok'] for c in aa.get('checks', [])] if aa else [])


def load(out):
    """-> {method: [run dict per seed]} with each run's cost, and the bench's metadata."""
    if not os.path.isfile(os.path.join(out, 'bench.json')):
        raise UserError(f'{out}/bench.json is missing: run `python -m tools.cost bench --out={out}` first')
    with open(os.path.join(out, 'bench.json')) as f:
        b = json.load(f)
    t = {name: r['seconds'] for name, r in b['rows'].items()}
    runs = {}
    for name, (_, row, _) in METHODS.items():
        for d in sorted(glob.glob(os.path.join(out, f'{name}-s*'))):
            if os.path.isfile(os.path.join(d, 'time.txt')):
                runs.setdefault(name, []).append(dict(load_run(d, steps_per_epoch(d)), row=row, dir=d))
    for r in (r for rs in runs.values() for r in rs):
        r['cost'] = t[r['row']] / t['pgd3 at'] * r['steps'] / r['pgd_steps']
    return runs, b


def steps_per_epoch(d):
    """The run's steps per epoch, as its checkpoint records them."""
    return torch.load(os.path.join(d, 'ckpt.pt'), map_location='cpu', weights_only=True)['steps_per_epoch']


def stats(values):
    """-> (mean, sd, n) of the values that exist; sd 0 for one."""
    v = [x for x in values if x is not None]
    if not v:
        return None, None, 0
    return statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)


def cell(values, scale=100, digits=1):
    m, s, n = stats(values)
    if m is None:
        return '-'
    if n == 1:
        return f'{scale * m:.{digits}f} (1)'
    return f'{scale * m:.{digits}f} ± {scale * s:.{digits}f}' + ('' if n > 2 else f' ({n})')


# ---------------------------------------------------------------- the report

def table(runs):
    """Mean ± sd over seeds per method (a count in brackets where fewer than three runs were evaluated)."""
    head = ['method', 'runs', 'cost', 'wall min', 'CPU min', 'clean', f'AutoAttack {AA_EPS}',
            f'training\'s PGD {AA_EPS}', *(f'PGD {e}' for e in SWEEP)]
    lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
    for name, rs in runs.items():
        get = lambda key, rs=rs: [r[key] for r in rs]
        pgd = [[r['pgd'][e] if r['pgd'] else None for r in rs] for e in SWEEP]
        cells = [METHODS[name][2], str(len(rs)), cell(get('cost'), 1, 2), cell(get('wall'), 1 / 60, 1),
                 cell(get('cpu'), 1 / 60, 1), cell(get('clean')), cell(get('aa')), cell(get('upper')),
                 *(cell(p) for p in pgd)]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def run_table(runs):
    """One line per run: the points of the figure, and the masking checks of its AutoAttack evaluation."""
    head = ['run', 'cost', 'wall min', 'CPU min', 'clean', f'AutoAttack {AA_EPS}', 'PGD 4/255',
            f'PGD {AA_EPS}', 'checks']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
    for r in (r for rs in runs.values() for r in rs):
        checks = f'{sum(r["checks"])} of {len(r["checks"])} ok' if r['checks'] else '-'
        cells = [os.path.basename(r['dir']), f'{r["cost"]:.2f}', f'{r["wall"] / 60:.1f}',
                 f'{r["cpu"] / 60:.1f}', pct(r['clean']), pct(r['aa']), pct(r['pgd'] and r['pgd']['4/255']),
                 pct(r['pgd'] and r['pgd'][AA_EPS]), checks]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def short_table(runs):
    """The README's: cost, clean and PGD at 0.1 over every seed; PGD at 4/255, AutoAttack and the masking
    checks of the runs evaluated so (seed 0 first)."""
    head = ['method', 'cost', 'clean', f'PGD-20 {AA_EPS}', 'PGD-20 4/255', f'**AutoAttack {AA_EPS}**',
            'checks']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
    for name, rs in runs.items():
        get = lambda key, rs=rs: [r[key] for r in rs]
        checks = [c for r in rs for c in r['checks']]
        cells = [METHODS[name][2], f'{stats(get("cost"))[0]:.2f}', cell(get('clean')), cell(get('upper')),
                 cell([r['pgd'] and r['pgd']['4/255'] for r in rs]), f'**{cell(get("aa"))}**',
                 f'{sum(checks)} of {len(checks)} ok' if checks else '-']
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def pct(v):
    return '-' if v is None else f'{100 * v:.1f}'


def mean_of(runs, name, key, eps=None):
    values = [(r[key][eps] if r[key] else None) if eps else r[key] for r in runs.get(name, [])]
    return stats(values)[0]


def answers(runs):
    """The README's questions, answered from the means."""
    lines, gn, pgd = [], 'gradnorm', 'pgd'
    share = {e: mean_of(runs, gn, 'pgd', e) / mean_of(runs, pgd, 'pgd', e) for e in SWEEP
             if mean_of(runs, gn, 'pgd', e) is not None and mean_of(runs, pgd, 'pgd', e)}
    if not share:
        return ['no GradNorm and PGD-3 AT runs with PGD sweeps yet']
    reach = []  # the eps from the smallest up to the first below 0.90
    for e in SWEEP:
        if share.get(e, 0) < 0.9:
            break
        reach.append(e)
    lines.append('GradNorm / PGD-3 AT robust accuracy (PGD worst) per eps: '
                 + ', '.join(f'{e} {s:.2f}' for e, s in share.items())
                 + f'; at least 0.90 up to eps {reach[-1] if reach else "none"}'
                 + f', at cost {mean_of(runs, gn, "cost"):.2f} of PGD-3 AT')
    for other in ('fgsm', 'pgd2'):
        if other not in runs:
            continue
        aa, at4 = ([pct(mean_of(runs, m, key, eps)) for m in (gn, other)] for key, eps in
                   (('aa', None), ('pgd', '4/255')))
        lines.append(f'GradNorm (cost {mean_of(runs, gn, "cost"):.2f}) vs {METHODS[other][2]} (cost '
                     f'{mean_of(runs, other, "cost"):.2f}): AutoAttack {AA_EPS} {aa[0]} vs {aa[1]}; '
                     f'PGD 4/255 {at4[0]} vs {at4[1]}')
    return lines


def plot(runs, path):
    """Left: AutoAttack accuracy against cost, a dot per run, mean ± sd per method. Right: PGD's worst
    case against eps per method, mean ± sd over seeds. A Figure without pyplot: no display needed."""
    from fractions import Fraction

    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 4), dpi=100)
    left, right = fig.subplots(1, 2)
    x = [float(Fraction(e)) for e in SWEEP]
    for c, (name, rs) in enumerate(runs.items()):
        color, label = f'C{c}', METHODS[name][2]
        done = [r for r in rs if r['aa'] is not None]
        left.scatter([r['cost'] for r in done], [100 * r['aa'] for r in done], color=color, s=12, alpha=0.5)
        if done:
            (cm, cs, _), (am, as_, _) = stats([r['cost'] for r in done]), stats([r['aa'] for r in done])
            left.errorbar(cm, 100 * am, xerr=cs, yerr=100 * as_, color=color, marker='o', capsize=3,
                          label=label)
        means = [stats([r['pgd'][e] for r in rs if r['pgd']]) for e in SWEEP]
        if all(m is not None for m, _, _ in means):
            right.errorbar(x, [100 * m for m, _, _ in means], yerr=[100 * s for _, s, _ in means],
                           color=color, marker='o', ms=3, capsize=2, label=label)
    left.set(xlabel='training cost (PGD-3 AT, 4 epochs = 1)', title='robustness for the compute',
             ylabel=f'AutoAttack accuracy at eps {AA_EPS} (%)')
    right.set(xlabel='eps (L-inf, pixels in [0,1])', ylabel='PGD worst-case accuracy (%)',
              title='robust accuracy against eps')
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def report(args):
    runs, b = load(args.out)
    pgd = b['rows']['pgd3 at']['seconds']
    print(f'step times: {b["hardware"]}, {b["threads"]} thread(s), torch {b["torch"]}, {b["model"]} batch '
          f'{b["batch"]}, median of {b["repeats"]} interleaved steps; over PGD-3: '
          + ', '.join(f'{n} {r["seconds"] / pgd:.2f}' for n, r in b['rows'].items()))
    print(short_table(runs), table(runs), run_table(runs), sep='\n\n', end='\n\n')
    print('\n'.join(answers(runs)))
    if args.png:
        plot(runs, args.png)
        print(f'wrote {args.png}')


def main(argv):
    p = ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest='cmd', required=True)
    r = sub.add_parser('run', help='train and evaluate the runs not done yet')
    r.add_argument('--seeds', type=lambda s: [int(v) for v in s.split(',')], default=[0, 1, 2])
    r.add_argument('--methods', type=lambda s: s.split(','), default=list(METHODS))
    b = sub.add_parser('bench', help='step times relative to PGD-3 -> OUT/bench.json')
    b.add_argument('--threads', type=int, default=1, help='as the runs were trained (OMP_NUM_THREADS)')
    b.add_argument('--repeats', type=int, default=15)
    t = sub.add_parser('report', help='tables and the figure')
    t.add_argument('--png', default='', help='write the figure here')
    for s in (r, b, t):
        s.add_argument('--out', default='runs/cost', help='the study\'s folder')
    args = p.parse_args(argv)
    if args.cmd == 'run' and not set(args.methods) <= set(METHODS):
        raise UserError(f'--methods: choose from {", ".join(METHODS)}')
    {'run': run, 'bench': bench, 'report': report}[args.cmd](args)


if __name__ == '__main__':
    sys.exit(cli(main, sys.argv[1:]))
