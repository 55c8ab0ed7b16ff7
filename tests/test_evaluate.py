"""AutoAttack against exact answers (linear models), its resumption and its shards under torchrun;
the gradient-masking checks on deliberately masked models; the ImageNet protocol's defaults; the
command line's final line."""

import functools
import json
import os
import re
import sys

import pytest
import torch
import torch.nn as nn

import attack
import checkpoint as CK
import config
import data
import evaluate
from data import FASHION_MEAN, FASHION_STD
from models import build_model


def linear10(n=80, seed=1):
    """10 classes, logits W x + b on 8x8 inputs in [0.3, 0.7] (the box never binds at these eps):
    misclassified within eps iff some j has z_y - z_j <= eps ||w_y - w_j||_1, so the exact L-inf
    distance is min_j (z_y - z_j) / ||w_y - w_j||_1 (0 for the images labelled wrongly on purpose)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(10, 64, generator=g) / 8)
        model[1].bias.copy_(torch.randn(10, generator=g) / 8)
    model.eval().requires_grad_(False)
    x = 0.3 + 0.4 * torch.rand(n, 1, 8, 8, generator=g)
    with torch.no_grad():
        z = model(x)
    y = z.argmax(1)
    y[:10] = (y[:10] + 1) % 10
    W = model[1].weight
    gap = z.gather(1, y[:, None]) - z
    dual = (W[y][:, None, :] - W[None]).abs().sum(2)
    dist = (gap / dual.clamp_min(1e-12)).scatter(1, y[:, None], float('inf')).amin(1).clamp_min(0)
    return model, x, y, dist


def test_autoattack_gives_exact_robust_accuracy_of_linear_model(one_thread):
    model, x, y, dist = linear10()
    eps = dist[dist > 0].median().item()
    ok = (dist - eps).abs() > 1e-3 * eps  # none on the boundary itself
    x, y, dist = x[ok], y[ok], dist[ok]
    r = attack.autoattack(model, [(x[:40], y[:40]), (x[40:], y[40:])], eps)
    assert list(r['after']) == ['clean', 'apgd-ce', 'apgd-t', 'fab-t', 'square'] and r['n'] == len(y)
    assert r['after']['square'] == pytest.approx((dist >= eps).float().mean().item())
    assert torch.equal(r['standing']['square'], dist >= eps)  # image by image, not just the count
    steps = list(r['after'].values())
    assert all(a >= b for a, b in zip(steps, steps[1:]))
    assert all(ok for ok, _ in attack.aa_checks(r['warnings'])), r['warnings']


class Stop(Exception):
    pass


def test_interrupted_autoattack_resumes_where_it_stopped(tmp_path, one_thread):
    model, x, y, dist = linear10()
    batches, eps = [(x[:40], y[:40]), (x[40:], y[40:])], dist[dist > 0].median().item()
    comps, path, key = ['apgd-ce', 'apgd-t'], str(tmp_path / 'state.json'), {'ckpt': 'a'}
    whole = attack.autoattack(model, batches, eps, components=comps)

    def stop_after(b, c, *_):
        if (b, c) == (1, 'apgd-ce'):
            raise Stop

    with pytest.raises(Stop):
        state = attack.State(path, key)
        attack.autoattack(model, batches, eps, state=state, components=comps, progress=stop_after)
    steps = []
    state = attack.State(path, key)
    assert state.resumed == 3  # both components of batch 0, the first of batch 1
    again = attack.autoattack(
        model,
        batches,
        eps,
        state=state,
        components=comps,
        progress=lambda b, c, left, n, res: steps.append(res),
    )
    assert steps == [True, True, True, False]
    assert again['after'] == whole['after'] and all(
        torch.equal(again['standing'][k], whole['standing'][k]) for k in comps
    )
    assert attack.State(path, {'ckpt': 'b'}).resumed == 0  # another evaluation's state is not used


def _ddp_worker(rank, world, init_file, x, y, model, eps, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    shard = [(x[rank::world], y[rank::world])]
    r = attack.autoattack(model, shard, eps, components=['apgd-ce', 'apgd-t'])
    ok = attack.square_check(model, shard, r['standing']['apgd-t'], eps, queries=100)
    if rank == 0:
        torch.save((r['n'], r['after'], ok), out)
    dist.destroy_process_group()


def test_autoattack_under_torchrun_sums_the_shards(tmp_path, one_thread):
    model, x, y, dist = linear10(n=61)
    eps = dist[dist > 0].median().item()
    ok = (dist - eps).abs() > 1e-3 * eps
    x, y, dist = x[ok], y[ok], dist[ok]
    out = str(tmp_path / 'r.pt')
    torch.multiprocessing.spawn(_ddp_worker, (2, str(tmp_path / 'pg'), x, y, model, eps, out), nprocs=2)
    n, after, (square_ok, msg) = torch.load(out)
    assert n == len(y) and after['apgd-t'] == pytest.approx((dist >= eps).float().mean().item())
    assert square_ok and f'of the {int((dist >= eps).sum())} images' in msg  # both shards' survivors


# ---------------------------------------------------------------- masking checks (more in test_attack.py)


def test_autoattack_own_checks_are_surfaced(one_thread):
    model, x, y, _ = linear10(n=20)
    r = attack.autoattack(nn.Sequential(model, nn.Softmax(1)), [(x, y)], 0.01, components=['apgd-ce'])
    flags = [m for ok, m in attack.aa_checks(r['warnings']) if not ok]
    assert len(flags) == 1 and 'probability distribution' in flags[0], flags


# ---------------------------------------------------------------- the protocol and the command


def test_imagenet_defaults_are_the_papers_protocol(tmp_path):
    path = tmp_path / 'ck.pt'
    path.write_bytes(b'x')
    imagenet = {'data_info': {'num_classes': 1000}, 'config': {'eps': 4 / 255}, 'ema': {'w': 0}}
    a = evaluate.resolve(evaluate.parse_args(['--ckpt', str(path)]), imagenet)
    assert evaluate.parse_eps(a.eps[0]) == 4 / 255 and a.eps == ['4/255']
    assert a.n == 5000 and a.autoattack and attack.VERSION == 'standard' and a.weights == 'ema'
    with open(data.ROBUSTBENCH_LIST) as f:
        assert (
            len(f.read().split()[: a.n]) == 5000
        )  # RobustBench's list (data.robustbench_indices picks them)
    demo = {'data_info': {'num_classes': 10}, 'config': {'eps': 0.1}, 'ema': None}
    a = evaluate.resolve(evaluate.parse_args(['--ckpt', str(path)]), demo)
    assert a.eps == ['0.1'] and a.n == 1000 and not a.autoattack and a.weights == 'model'
    a = evaluate.resolve(
        evaluate.parse_args(['--ckpt', str(path), '--no-autoattack', '--weights=model']), imagenet
    )
    assert not a.autoattack and a.weights == 'model'
    with pytest.raises(config.UserError):
        evaluate.resolve(evaluate.parse_args(['--ckpt', str(path), '--weights=ema']), demo)


def test_command_prints_autoattack_line_and_json(tiny_data, tmp_path, capsys, monkeypatch):
    # APGD-CE alone (the full standard version is tested above): the command's plumbing, in seconds
    monkeypatch.setattr(attack, 'autoattack', functools.partial(attack.autoattack, components=['apgd-ce']))
    info = dict(in_ch=1, num_classes=10, img_size=28, mean=FASHION_MEAN, std=FASHION_STD)
    torch.manual_seed(0)
    ckpt = str(tmp_path / 'ckpt.pt')
    CK.save_checkpoint(
        ckpt,
        dict(
            model=build_model('resnet_demo', 'gelu', **info).state_dict(),
            ema=None,
            config=vars(config.Config(data=tiny_data, loader='torchvision', model='resnet_demo')),
            data_info=info,
        ),
    )
    evaluate.main(
        [
            '--ckpt',
            ckpt,
            '--n',
            '24',
            '--autoattack',
            '--attacks',
            'ce-5',
            'margin-5',
            '--square-queries',
            '50',
        ]
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r'autoattack 0\.1 \d+\.\d', out[-1]), out[-5:]
    assert any('apgd-ce' in line and 'PGD worst' in line for line in out)
    assert sum(line.startswith(('  ok ', '  FLAG ')) for line in out) >= 8 + 1  # ours, then AutoAttack's own
    res = json.load(open(tmp_path / 'eval_linf.json'))
    assert res['weights'] == 'model' and list(res['autoattack']) == ['0.1']
    assert f'{100 * res["autoattack"]["0.1"]["robust"]:.1f}' == out[-1].split()[-1]
    assert not [
        f for f in os.listdir(tmp_path) if 'autoattack-rank' in f
    ]  # the resume state is gone when done


def test_autoattack_takes_channels_last_colour_batches(one_thread):
    """The loaders hand out channels_last batches; AutoAttack .view()s its gradients, which a
    3-channel channels_last tensor (a convolution's input gradient) cannot do; a 1-channel one can."""
    g = torch.Generator().manual_seed(0)
    model = (
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)).eval().requires_grad_(False)
    )
    x = torch.rand(16, 3, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = model(x).argmax(1)
    # its DLR loss checks for zero gradients
    r = attack.autoattack(model, [(x, y)], 0.05, components=['apgd-t'])
    assert r['after']['clean'] == 1 and 0 <= r['after']['apgd-t'] < 1


def test_autoattack_leaves_the_trace_function_as_it_was(one_thread):
    """AutoAttack's dynamic-defense check ends in sys.settrace(None), which would switch a debugger or
    coverage off for the rest of the process."""
    model, x, y, _ = linear10()
    tracer, old = (lambda frame, event, arg: None), sys.gettrace()
    sys.settrace(tracer)
    try:
        attack.autoattack(model, [(x[10:18], y[10:18])], 0.01, components=['apgd-ce'])  # all correct
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(old)
