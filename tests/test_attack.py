"""The evaluator against exact answers (linear models), its invariants on a trained GradNorm model,
and the gradient-masking checks on deliberately masked models."""

import ast
import functools
import json
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

import attack
import checkpoint as CK
import config
import evaluate
import gradnorm
import models
import train
from attack import square_check
from data import FASHION_MEAN, FASHION_STD, TensorLoader, load_fashion_mnist
from test_smoke import train_args
from tests.conftest import FASHION, HERE, parse_file


class Linear2(nn.Module):
    """Two classes, logits (-s/2, s/2) with s = w.x + b: the minimal L-inf distance from x to the
    decision boundary is |s| / ||w||_1 (the dual norm) when the box does not bind."""

    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = nn.Parameter(w), nn.Parameter(torch.tensor(b))

    def forward(self, x):
        s = x.flatten(1) @ self.w + self.b
        return torch.stack([-s / 2, s / 2], 1)


def linear_problem(n=400, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g)
    # inside [0.3, 0.7]: the optimal perturbation (at most 0.3 per pixel here) never meets the box
    x = 0.3 + 0.4 * torch.rand(n, 1, 8, 8, generator=g)
    model = Linear2(w, -(0.5 * w.sum()).item())
    s = model(x)[:, 1] * 2
    y = (s > 0).long()
    y[:20] = 1 - y[:20]  # some mistakes: distance 0, never robust
    dist = s.detach().abs() / w.norm(p=1)
    dist[:20] = 0
    return model, x, y, dist


@pytest.mark.parametrize('loss', ['ce', 'margin'])
def test_pgd_matches_exact_distance_on_linear_model(loss, one_thread):
    model, x, y, dist = linear_problem()
    for q in (0.3, 0.6):
        eps = dist[dist > 0].quantile(q).item()
        ok = (dist - eps).abs() > 1e-3 * eps  # sign steps reach the optimal corner exactly
        torch.manual_seed(0)
        x_adv, fooled = attack.pgd(model, x[ok], y[ok], eps, 20, keep_best=True, loss=loss)
        assert torch.equal(fooled, dist[ok] < eps)  # every sample below eps found, none above
        assert ((x_adv - x[ok]).flatten(1).abs().amax(1) <= eps * (1 + 1e-5)).all()
        assert attack.inside(x_adv, x[ok], eps).all()
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert torch.equal(model(x_adv).argmax(1) != y[ok], fooled)  # the returned points do fool
        r = evaluate.evaluate(model, [(x[ok], y[ok])], [eps], [f'{loss}-20'])
        assert r['robust'][eps]['worst'] == pytest.approx((dist[ok] >= eps).float().mean().item())
        assert r['clean'] == pytest.approx((dist[ok] > 0).float().mean().item())


def test_multiclass_linear_never_beats_exact_distance(one_thread):
    """10 classes: misclassified iff some j has z_j > z_y, so the exact distance is
    min_j (z_y - z_j) / ||w_y - w_j||_1. No attack may beat it; a good one nearly reaches it."""
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x = 0.3 + 0.4 * torch.rand(500, 1, 8, 8, generator=g)
    with torch.no_grad():
        z = model(x)
    y = z.argmax(1)
    W = model[1].weight.detach()
    gap = z.gather(1, y[:, None]) - z
    dual = (W[y][:, None, :] - W[None]).abs().sum(2)
    dist = (gap / dual.clamp_min(1e-12)).scatter(1, y[:, None], float('inf')).amin(1)
    eps = dist.median().item()
    torch.manual_seed(0)
    r = evaluate.evaluate(model, [(x, y)], [eps], ['ce-50x2', 'dlr-50x2'])
    exact = (dist >= eps).float().mean().item()
    assert r['robust'][eps]['worst'] >= exact - 1e-9
    assert r['robust'][eps]['worst'] <= exact + 0.02


def test_step_stays_in_the_ball_and_the_pixel_range(one_thread):
    """A step far outside the ball lands on its surface, clipped to [0,1]; inside() agrees."""
    torch.manual_seed(0)
    x, eps = torch.rand(64, 3, 8, 8), 0.03
    x_adv = attack.step(x, x, torch.randn_like(x), 10.0, eps)
    assert torch.equal(x_adv, (x + eps * torch.sign(x_adv - x)).clamp(0, 1))
    assert attack.inside(x_adv, x, eps).all() and not attack.inside(x + 2 * eps, x, eps).any()
    with pytest.raises(config.UserError):
        evaluate.parse_attack('ce20')


def _ddp_worker(rank, world, init_file, x, y, model, eps, out):
    import torch.distributed as dist

    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    r = evaluate.evaluate(model, [(x[rank::world], y[rank::world])], [eps], ['ce-20'])
    if rank == 0:
        torch.save(r, out)
    dist.destroy_process_group()


def test_ddp_sums_counts(tmp_path, one_thread):
    """Two ranks with shards of 201 and 200 images: the summed counts equal one process's."""
    model, x, y, dist = linear_problem(n=401)
    eps = dist[dist > 0].median().item()
    single = evaluate.evaluate(model, [(x, y)], [eps], ['ce-20'])
    out = str(tmp_path / 'r.pt')
    torch.multiprocessing.spawn(_ddp_worker, (2, str(tmp_path / 'pg'), x, y, model, eps, out), nprocs=2)
    r = torch.load(out)
    assert r['n'] == 401 and r['clean'] == single['clean'] and r['robust'] == single['robust']


# ---------------------------------------------------------------- a trained GradNorm model


@pytest.fixture(scope='module')
def trained():
    """resnet_demo/GELU, GradNorm at eps 0.1, one epoch on 8,000 Fashion-MNIST images (62 steps)."""
    if not os.path.exists(os.path.join(FASHION, 't10k-labels-idx1-ubyte.gz')):
        pytest.skip('no Fashion-MNIST: run `make data`')
    torch.manual_seed(0)
    (xtr, ytr), (xte, yte) = load_fashion_mnist(FASHION)
    info = dict(in_ch=1, num_classes=10, img_size=28, mean=FASHION_MEAN, std=FASHION_STD)
    model = models.build_model('resnet_demo', 'gelu', **info)
    cfg = config.Config(epochs=1, warmup_epochs=0.2, ramp_epochs=0.3, lr=4e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loader = TensorLoader(xtr[:8000], ytr[:8000], 128, torch.device('cpu'), True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the one_thread fixture, which a module's fixture cannot use
    for i, (x, y) in enumerate(loader):
        t = i / len(loader)
        for group in opt.param_groups:
            group['lr'] = train.lr_at(cfg, t)
        loss, _ = gradnorm.gradnorm(model, x, y, 0.1, torch.tensor(min(t / cfg.ramp_epochs, 1.0)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    return model, TensorLoader(xte[:200], yte[:200], 200, torch.device('cpu'), False), info


def test_evaluator_invariants_on_gradnorm_model(trained, one_thread):
    model, val, info = trained
    attacks, eps_list = ['ce-20', 'margin-20'], [0.03, 0.1, 0.2]
    torch.manual_seed(0)
    r = evaluate.evaluate(model, val, eps_list, attacks, checks=True)
    assert r['clean'] > 0.5  # it learned something, so the robust numbers mean something
    assert r['robust'][0.03]['worst'] > 0.3  # and the attack has something to break
    checks = evaluate.sanity_checks(r, attacks) + [
        square_check(model, list(val), r['standing'][0.1], 0.1, queries=300)
    ]
    assert len(checks) == 8 and all(ok for ok, _ in checks), [m for ok, m in checks if not ok]
    for a, b in zip(eps_list, eps_list[1:]):  # spelled out: what the checks promise
        assert r['robust'][b]['worst'] <= r['robust'][a]['worst']
    for e in eps_list:
        assert abs(r['robust'][e]['margin-20'] - r['robust'][e]['ce-20']) <= 0.08  # measured: ~5 points
        assert r['robust'][e]['worst'] <= min(r['robust'][e][a] for a in attacks)
    assert r['unbounded']['eps'] == 1 and max(r['unbounded'][a] for a in evaluate.UNBOUNDED) <= 2 / 200
    assert r['standing'][0.1].sum().item() == round(200 * r['robust'][0.1]['worst'])
    r = evaluate.evaluate(model, val, [0.1], ['ce-10', 'ce-50x2'])
    # independent random starts: PGD-10 may luck into one sample PGD-50x2 misses (seen: 89 vs 90
    # of 200), never into more than the checks' slack of 2 images
    assert r['robust'][0.1]['ce-50x2'] <= r['robust'][0.1]['ce-10'] + 2 / 200
    assert evaluate.sanity_checks(r, ['ce-10', 'ce-50x2'])[-1][0]


class Scale(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, z):
        return z * self.c


class Quantize(nn.Module):
    """Inputs rounded to 16 levels: a zero gradient almost everywhere, and robust to nothing."""

    def forward(self, x):
        return torch.round(x * 16) / 16


def masking_checks(model, x, y, eps, attacks):
    torch.manual_seed(0)
    r = evaluate.evaluate(model, [(x, y)], [eps], attacks, checks=True)
    return evaluate.sanity_checks(r, attacks) + [
        square_check(model, [(x, y)], r['standing'][eps], eps, queries=200)
    ]


@pytest.mark.parametrize('masked', ['saturated softmax', 'quantized input'])
def test_masked_models_trip_checks_and_plain_model_passes(masked, one_thread):
    """Logits x 1e4 saturate the softmax in float32: CE and its gradient are exactly 0 for most
    images, so CE-PGD stands still. Rounded inputs: no gradient at all. Either looks robust to PGD."""
    model, x, y, dist = linear_problem()
    eps = dist[dist > 0].quantile(0.6).item()
    if masked == 'saturated softmax':
        checks = masking_checks(nn.Sequential(model, Scale(1e4)), x, y, eps, ['ce-10', 'margin-10'])
        tripped = {'unbounded', 'ce loss rises', 'stronger than CE'}
    else:
        checks = masking_checks(nn.Sequential(Quantize(), model), x, y, eps, ['ce-10', 'margin-10'])
        tripped = {'unbounded', 'ce loss rises', 'margin loss rises', 'Square'}
    assert {t for t in tripped for ok, m in checks if not ok and t in m} == tripped, checks
    plain = masking_checks(model, x, y, eps, ['ce-10', 'margin-10'])
    assert all(ok for ok, _ in plain), [m for ok, m in plain if not ok]
    with_ce_only = masking_checks(nn.Sequential(model, Scale(1e4)), x, y, eps, ['ce-10'])
    assert not with_ce_only[-1][
        0
    ]  # no margin attack to compare with: Square (margin loss) finds what CE missed


# ---------------------------------------------------------------- what a copier of attack.py can rely on


def test_pgd_under_no_grad_reaches_the_worst_corner(one_thread):
    """Called from an evaluation loop under torch.no_grad(), training's PGD still takes its gradients:
    on the linear model the loss is highest at x -/+ eps * sign(w), which 5 steps of 0.5 eps reach from
    any start in the ball (the box does not bind: x in [0.3, 0.7])."""
    model, x, y, _ = linear_problem(n=100)
    eps, corner = 0.05, model.w.detach().sign().view(1, 1, 8, 8)
    want = x - eps * corner * (2 * y - 1).view(-1, 1, 1, 1).float()
    torch.manual_seed(0)
    with torch.no_grad():
        x_adv = attack.pgd(model, x, y, eps, 5)
        x_top, top = attack.pgd(model, x, y, eps, 5, max_loss=True)
        clean, adv = attack.ce_loss(model(x), y), attack.ce_loss(model(x_adv), y)
    for point in (x_adv, x_top):
        assert not point.requires_grad and attack.inside(point, x, eps).all()
        torch.testing.assert_close(point, want, rtol=0, atol=1e-6)
    assert (adv > clean).all() and torch.allclose(top, adv)


class Affine(nn.Module):
    """logits = W x + b, keeping every input it is called with."""

    def __init__(self, W, b):
        super().__init__()
        self.W, self.b, self.seen = nn.Parameter(W), nn.Parameter(b), []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return x.flatten(1) @ self.W.T + self.b


def test_fgsm_at_is_one_signed_step_of_1_25_eps_from_a_uniform_start(one_thread):
    """FGSM-RS on a linear model against its closed form: the start x + U(-eps, eps) clipped to [0,1]
    (the same seed), then start + 1.25 eps sign(W^T (softmax(W start + b) - onehot(y))), clipped to the
    ball and [0,1]; CE with label smoothing on that point. Pixels near 0 and 1: the box binds too."""
    g, f64 = torch.Generator().manual_seed(0), torch.float64
    W, b = torch.randn(5, 48, generator=g, dtype=f64), torch.randn(5, generator=g, dtype=f64)
    x, y = torch.rand(64, 3, 4, 4, generator=g, dtype=f64), torch.randint(0, 5, (64,), generator=g)
    model, eps = Affine(W, b), 0.1
    torch.manual_seed(3)
    loss, terms = attack.fgsm_at(model, x, y, eps)
    start, x_adv = model.seen  # the attack's forward, then the training forward
    torch.manual_seed(3)
    assert torch.equal(start, (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1))
    p = torch.softmax(start.flatten(1) @ W.T + b, 1)
    grad = ((p - F.one_hot(y, 5)) @ W).view_as(x)
    want = torch.minimum(torch.maximum(start + 1.25 * eps * grad.sign(), x - eps), x + eps).clamp(0, 1)
    torch.testing.assert_close(x_adv, want, rtol=0, atol=1e-12)
    assert attack.inside(x_adv, x, eps).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    assert ((x_adv - x).abs() > eps - 1e-9).double().mean() > 0.5  # 1.25 eps: most land on the surface
    torch.testing.assert_close(loss, F.cross_entropy(x_adv.flatten(1) @ W.T + b, y, label_smoothing=0.1))
    assert loss.requires_grad and not terms['ce_adv'].requires_grad and terms['ce_adv'] == loss


def test_fgsm_compiled_as_training_compiles_it(monkeypatch, one_thread):
    """train.objective compiles the attacks with graph breaks: the same loss and parameter gradient."""
    counter = CompileCounterWithBackend('aot_eager_decomp_partition')
    monkeypatch.setattr(torch, 'compile', functools.partial(torch.compile, backend=counter))
    cfg, cpu = config.Config(objective='fgsm', eps=0.1), torch.device('cpu')
    torch.manual_seed(0)
    model = models.build_model('resnet_demo_pool', 'gelu', in_ch=1, num_classes=10, img_size=28).train()
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    out = []
    torch._dynamo.reset()
    for fn in (train.objective(cfg, cpu), train.objective(cfg, cpu, compiled=True)):
        model.zero_grad()
        torch.manual_seed(1)  # the same random start
        loss, _ = fn(model, x, y, 0.0)
        loss.backward()
        out.append((loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    torch._dynamo.reset()
    assert counter.frame_count >= 1
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=0)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-4, atol=1e-6)


def test_train_py_with_fgsm_runs_end_to_end(tiny_data, tmp_path, one_thread):
    """One epoch (8 steps) of --objective=fgsm: its term in the metrics, the objective in the checkpoint."""
    out = tmp_path / 'fgsm'
    train.train(config.parse_config(train_args(tiny_data, out, '--epochs=1', '--objective=fgsm')[1:]))
    line = json.loads((out / 'metrics.jsonl').read_text().splitlines()[-1])
    assert math.isfinite(line['ce_adv']) and 0 <= line['pgd_upper'] <= line['clean_acc'] <= 1
    ck = CK.load_checkpoint(str(out / 'ckpt.pt'))
    assert ck['config']['objective'] == 'fgsm' and ck['step'] == 8


def test_no_name_shadows_an_import():
    """In the three files a reader copies, no argument, variable, function or inner import rebinds a
    module-level import (attack.inside's `dist` once hid torch.distributed)."""
    for name in ('attack.py', 'gradnorm.py', 'edge_reg.py'):
        tree = parse_file(os.path.join(HERE, name))
        imported = {(a.asname or a.name).split('.')[0] for node in tree.body
                    if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names}
        bound = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                bound.append(node.id)
            elif isinstance(node, ast.arg):
                bound.append(node.arg)
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                bound.append(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)) and node not in tree.body:
                bound += [(a.asname or a.name).split('.')[0] for a in node.names]
        assert imported and not set(bound) & imported, (name, set(bound) & imported)
