"""tools/cost.py on hand-made run folders: each run's cost from the bench's step times and its steps,
the means and spreads of the table, the answers' ratios, the figure; the runner's time line from a
real child process and its skipping of finished work."""

import json
import os
import statistics
import sys

import torch

import tools.cost as C

SPE = 10  # steps per epoch of the hand-made runs
BENCH = {'standard': 0.3, 'gradnorm fd': 0.6, 'edgereg': 1.4, 'fgsm at': 0.55, 'pgd3 at': 1.0}


def write_run(out, name, seed, epochs, clean, pgd, aa, wall=60.0, cpu=50.0):
    d = os.path.join(out, f'{name}-s{seed}')
    os.makedirs(d)
    with open(os.path.join(d, 'metrics.jsonl'), 'w') as f:
        for e in range(epochs):
            last = e == epochs - 1  # pgd_upper: training's PGD at eps 0.1, as the sweep's 0.1
            line = {'epoch': e, 'clean_acc': clean if last else 0.1, 'pgd_upper': pgd[4] if last else 0}
            f.write(json.dumps(line) + '\n')
    with open(os.path.join(d, 'time.txt'), 'w') as f:
        f.write(f'wall {wall} s user {cpu - 1} s sys 1.00 s\n')
    torch.save({'steps_per_epoch': SPE}, os.path.join(d, 'ckpt.pt'))
    with open(os.path.join(d, 'sweep.json'), 'w') as f:
        json.dump({'robust': {e: {'worst': p} for e, p in zip(C.SWEEP, pgd)}}, f)
    if aa is not None:
        with open(os.path.join(d, 'aa.json'), 'w') as f:
            json.dump({'autoattack': {C.AA_EPS: {'robust': aa}}}, f)


def study(tmp_path):
    out = str(tmp_path)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'bench.json'), 'w') as f:
        json.dump(dict(hardware='cpu', threads=1, torch='x', model='m', batch=128, repeats=3,
                       rows={n: {'seconds': t, 'compiled': False} for n, t in BENCH.items()}), f)
    for s, (gn, pg) in enumerate([(0.50, 0.70), (0.54, 0.72), (0.52, 0.74)]):
        write_run(out, 'gradnorm', s, 4, 0.81, [0.8, 0.71, 0.6, 0.6, gn, 0.3], gn - 0.02)
        write_run(out, 'pgd', s, 4, 0.84, [0.82, 0.78, 0.75, 0.74, pg, 0.5], pg - 0.01)
    write_run(out, 'pgd2', 0, 2, 0.80, [0.8, 0.75, 0.7, 0.7, 0.65, 0.4], None)
    return out


def test_cost_is_step_time_over_pgd3_times_steps_over_the_4_epoch_run(tmp_path):
    runs, _ = C.load(study(tmp_path))
    assert [r['cost'] for r in runs['gradnorm']] == [0.6] * 3
    assert [r['cost'] for r in runs['pgd']] == [1.0] * 3
    assert runs['pgd2'][0]['cost'] == 0.5  # half the epochs at PGD-3's step time
    assert runs['pgd2'][0]['aa'] is None and runs['gradnorm'][1]['cpu'] == 50.0


def test_table_and_answers_are_the_means(tmp_path):
    runs, _ = C.load(study(tmp_path))
    text = C.table(runs)
    gn = statistics.mean([0.48, 0.52, 0.50]) * 100, statistics.stdev([0.48, 0.52, 0.50]) * 100
    assert '| GradNorm | 3 | 0.60 ± 0.00 |' in text and f'{gn[0]:.1f} ± {gn[1]:.1f}' in text
    assert '| PGD-3 AT, 2 epochs | 1 | 0.50 (1) |' in text  # fewer than 3 runs: counted
    assert f'| {gn[0] + 2:.1f} ± {gn[1]:.1f} |' in text  # training's PGD at 0.1: the last epoch's pgd_upper
    lines = C.answers(runs)
    share = 0.52 / 0.72  # the eps-0.1 means
    assert f'0.1 {share:.2f}' in lines[0] and 'at least 0.90 up to eps 4/255' in lines[0]
    assert 'AutoAttack 0.1 50.0 vs -' in lines[1]


def test_the_figure_is_written(tmp_path):
    out = study(tmp_path)
    C.plot(C.load(out)[0], os.path.join(out, 'f.png'))
    with open(os.path.join(out, 'f.png'), 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_a_run_is_timed_and_finished_work_is_not_repeated(tmp_path, monkeypatch):
    line = C.timed([sys.executable, '-c', 'sum(range(10**6))'], str(tmp_path / 'log'))
    wall, user, system = map(float, C.TIME.match(line).groups())
    assert wall > 0 and user + system > 0
    out = study(tmp_path / 'study')
    calls = []
    monkeypatch.setattr(C.subprocess, 'call', lambda cmd, **kw: calls.append(cmd) or 0)
    C.run_one(out, 'gradnorm', 0)  # trained, swept and attacked: nothing to do
    C.run_one(out, 'pgd2', 0)  # no AutoAttack yet
    assert len(calls) == 1 and calls[0][-3:] == ['--autoattack', '--json', f'{out}/pgd2-s0/aa.json']
