"""Smoke tests: the math against independent computations, every model, the attack, the training
loop end to end (one process and torchrun), checkpoints, and the user-facing errors."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision

import checkpoint as CK
import config as C
import evaluate as E
import gradnorm as G
import models as M
import train as T
from attack import fgsm_at, pgd, pgd_at
from data import load_fashion_mnist
from edge_reg import edge_energy, edge_reg
from models import IMAGENET_MEAN, IMAGENET_STD
from tests.conftest import FASHION, HERE, demo_model, one_thread, run, tiny_data  # noqa: F401 (fixtures)

# one thread in this process: CI's two workers fill its two cores, a second thread only spins (docs/speed.md)
pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='session')
def batch():
    (xtr, ytr), _ = load_fashion_mnist(FASHION)
    return xtr[:64].float() / 255, ytr[:64]




# ---------------------------------------------------------------- the math


def test_gradnorm_term_matches_per_sample_float64(batch):
    """The penalty is eps * mean_i ||d CE_i / d x_i||_1, computed here one image at a time.
    BatchNorm in eval mode, so samples are independent and B*grad(mean CE) is exactly per-sample."""
    x, y = batch[0][:8].double(), batch[1][:8]
    model = demo_model().double().eval()
    eps, alpha = 0.1, torch.tensor(0.7, dtype=torch.float64)
    loss, parts = G.gradnorm(model, x, y, eps, alpha, smoothing=0.1)
    norms = []
    for i in range(len(y)):
        xi = x[i : i + 1].clone().requires_grad_()
        (g,) = torch.autograd.grad(F.cross_entropy(model(xi), y[i : i + 1], label_smoothing=0.1), xi)
        norms.append(g.abs().sum())
    penalty = eps * torch.stack(norms).mean()
    ce = F.cross_entropy(model(x), y, label_smoothing=0.1)
    torch.testing.assert_close(parts['gradnorm'], penalty, rtol=1e-10, atol=0)
    torch.testing.assert_close(loss, 0.8 * ce + 1.2 * alpha * penalty, rtol=1e-10, atol=0)


def test_gradnorm_parameter_gradient_matches_finite_differences(batch):
    x, y = batch[0][:8].double(), batch[1][:8]
    model = demo_model().double().eval()
    params = list(model.parameters())
    f = lambda: G.gradnorm(model, x, y, 0.1, torch.tensor(1.0, dtype=torch.float64))[0]
    grads = torch.autograd.grad(f(), params)
    torch.manual_seed(1)
    v = [torch.randn_like(p) for p in params]
    h = 1e-6  # small enough that no component of grad_x changes sign: |.| has a kink at 0
    with torch.no_grad():
        for p, d in zip(params, v):
            p.add_(d, alpha=h)
    up = f().detach()
    with torch.no_grad():
        for p, d in zip(params, v):
            p.add_(d, alpha=-2 * h)
    down = f().detach()
    numeric = (up - down) / (2 * h)
    analytic = sum((g * d).sum() for g, d in zip(grads, v))
    assert abs(numeric - analytic) / abs(analytic) < 1e-6, (numeric.item(), analytic.item())


MODEL_CASES = [(m, a, cl) for m in M.MODELS for a in M.ACTS for cl in (False, True)]


@pytest.mark.parametrize('name,act,channels_last', MODEL_CASES)
def test_every_model_forward_and_double_backward(name, act, channels_last):
    size = 16 if name.endswith(('_small', '_demo', '18')) else 32  # small: cheap, yet every stage runs
    torch.manual_seed(0)
    model = M.build_model(name, act, in_ch=3, num_classes=7, img_size=size)
    x = torch.rand(2, 3, size, size)
    if channels_last:
        model, x = (
            model.to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
        )
    y = torch.tensor([0, 3])
    loss, parts = G.gradnorm(model, x, y, 4 / 255, torch.tensor(1.0))
    loss.backward()
    assert model(x).shape == (2, 7)
    assert parts['gradnorm'] > 0
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # the penalty itself must reach the weights (double backprop, not a detached term)
    model.zero_grad()
    G.gradnorm(model, x, y, 4 / 255, torch.tensor(1.0), weights=(0.0, 1.0))[0].backward()  # the penalty alone
    assert sum(p.grad.abs().sum() for p in model.parameters() if p.grad is not None) > 0


def test_resnet50_loads_torchvision_weights_strictly():
    tv = torchvision.models.resnet50().eval()
    ours = M.build_model('resnet50', 'relu').eval()
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = torch.rand(2, 3, 64, 64)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv((x - mean) / std), rtol=1e-5, atol=1e-5)
    M.set_activation(ours, 'gelu')  # the paper's route: pretrained weights, then GELU
    assert not any(isinstance(m, torch.nn.ReLU) for m in ours.modules())
    assert sum(isinstance(m, torch.nn.GELU) for m in ours.modules()) == 17


# ---------------------------------------------------------------- attack and teacher


def test_pgd_stays_in_ball_and_raises_loss(batch):
    x, y = batch[0][:32], batch[1][:32]
    model = demo_model().eval()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(20):  # a model that fits the batch, so there is something to attack
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.requires_grad_(False)
    eps = 0.1
    for keep_best in (False, True):
        x_adv = pgd(model, x, y, eps, 10, 2.5 * eps / 10, keep_best=keep_best)
        x_adv, fooled = x_adv if keep_best else (x_adv, None)  # keep_best: also who was fooled
        assert (x_adv - x).abs().max() <= eps + 1e-6
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        with torch.no_grad():
            clean, adv = model(x), model(x_adv)
        clean_loss = F.cross_entropy(clean, y, reduction='none')
        adv_loss = F.cross_entropy(adv, y, reduction='none')
        if not keep_best:  # training's PGD: the last iterate, the loss it maximizes went up
            assert adv_loss.mean() > 2 * clean_loss.mean()
            assert (adv_loss >= clean_loss).float().mean() >= 0.9
        else:  # evaluation's PGD: fooled means a misclassified point was found and returned
            assert torch.equal(adv.argmax(1) != y, fooled)
            clean_wrong = clean.argmax(1) != y
            assert fooled[clean_wrong].all() and fooled.sum() > clean_wrong.sum()


def test_edge_teacher_marks_square_boundary():
    x = torch.zeros(1, 3, 32, 32)
    x[:, :, 8:24, 8:24] = 1.0
    e = edge_energy(x)
    assert e.shape == x.shape
    boundary = e[0, 0, 8, 8:24].mean()  # on the square's top edge
    assert e[0, 0, 16, 16] < 1e-3 * boundary  # center of the square: flat
    assert e[0, 0, 1, 1] < 1e-3 * boundary  # far outside: flat
    assert torch.equal(e[:, 0], e[:, 2])  # broadcast to every channel


# ---------------------------------------------------------------- objectives train


@pytest.mark.parametrize('name', ['standard', 'gradnorm', 'pgd', 'fgsm', 'edge'])
def test_each_objective_lowers_its_loss(name, batch):
    x, y = batch
    model = demo_model()
    one = torch.tensor(1.0)
    fn = {
        'standard': lambda: G.standard(model, x, y),
        'gradnorm': lambda: G.gradnorm(model, x, y, 0.1, one),
        'pgd': lambda: pgd_at(model, x, y, 0.1, 3),
        'fgsm': lambda: fgsm_at(model, x, y, 0.1),
        'edge': lambda: edge_reg(model, x, y, one, norm=M.normalization(model)),
    }[name]

    def loss(seed=0):
        torch.manual_seed(seed)  # same random start / sampled class for before and after
        return fn()[0].item()

    before = loss()
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    for step in range(15):
        torch.manual_seed(step)
        opt.zero_grad()
        fn()[0].backward()
        opt.step()
    assert loss() < 0.8 * before


# ---------------------------------------------------------------- training loop


def train_args(data, out, *extra):
    return [
        'train.py',
        f'--data={data}',
        f'--out={out}',
        '--epochs=2',
        '--batch_size=64',
        '--eval_n=64',
        '--eval_steps=2',
        '--warmup_epochs=0.5',
        '--ramp_epochs=1',
        '--loader=torchvision',
        *extra,
    ]  # in-memory Fashion-MNIST: no FFCV JIT warm-up per run


def test_torchrun_two_ranks_stay_identical(tiny_data, tmp_path):
    script = tmp_path / 'ddp.py'
    script.write_text(
        'import os, sys, torch\n'
        f'sys.path.insert(0, {HERE!r})\n'
        'import config as C, train as T\n'
        'import threading\n'
        'def threads():\n'
        '    return set(os.listdir("/proc/self/task")) - {str(threading.get_native_id())}\n'
        'cfg = C.parse_config(sys.argv[1:])\n'
        'C.setup_distributed()\n'
        'default_group = threads()  # gloo\'s workers and network loop\n'
        'model = T.train(cfg)\n'
        'left = len(default_group & threads())\n'
        'torch.save(dict(model.named_parameters()), f"{cfg.out}/rank{os.environ[\'RANK\']}.pt")\n'
        'print(f"default group: {len(default_group)} threads, {left} left after training")\n'
    )
    out = tmp_path / 'ddp'
    torchrun = os.path.join(os.path.dirname(sys.executable), 'torchrun')
    r = subprocess.run(
        [
            torchrun,
            '--standalone',
            '--nproc_per_node=2',
            str(script),
            *train_args(tiny_data, out, '--epochs=1', '--accum=2')[1:],
        ],  # DDP's no_sync on the first half
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # parameters, not BatchNorm's running stats: DDP broadcasts those from rank 0 before each
    # forward, and each rank's last forward then updates its own copy
    a, b = (torch.load(out / f'rank{i}.pt') for i in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a['fc.weight'], demo_model().state_dict()['fc.weight'])  # it trained
    lines = (out / 'metrics.jsonl').read_text().splitlines()
    assert len(lines) == 1  # rank 0 alone writes
    assert r.stdout.count('final:') == 1  # rank 0 alone prints
    # the per-epoch robust number says what it is: PGD, an upper bound, not the number to report
    assert 'pgd_upper' in json.loads(lines[0]) and r.stdout.count('an upper bound') == 2
    # the default group's gloo workers are joined before the interpreter exits: one left running could
    # free a Python tensor there and abort the process (config.end_distributed)
    assert r.stdout.count('default group: 3 threads, 0 left after training') == 2, r.stdout[-2000:]


def test_checkpoint_roundtrip_and_resume_continue_exactly(tiny_data, tmp_path):
    full = tmp_path / 'full'
    r = run(train_args(tiny_data, full, '--ckpt_every=3', '--keep=100'))  # 2 epochs x 8 steps
    assert r.returncode == 0, r.stderr[-3000:]
    ck = CK.load_checkpoint(str(full / 'ckpt.pt'))
    assert ck['step'] == 16 and ck['version'] == C.__version__
    model = E.model_from_checkpoint(ck).eval()
    CK.save_checkpoint(str(tmp_path / 'copy.pt'), ck)
    again = E.model_from_checkpoint(CK.load_checkpoint(str(tmp_path / 'copy.pt'))).eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))

    # resume from the step-12 checkpoint (inside epoch 1) in a fresh directory: same final weights
    part = tmp_path / 'part'
    part.mkdir()
    shutil.copy(next(full.glob('ckpt-00000012-*.pt')), part)
    r = run(train_args(tiny_data, part, '--resume=auto'))
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'resumed from' in r.stdout and 'at epoch 1 step 4' in r.stdout
    resumed = CK.load_checkpoint(str(part / 'ckpt.pt'))
    assert resumed['step'] == 16
    assert all(torch.equal(resumed['model'][k], ck['model'][k]) for k in ck['model'])
    assert [json.loads(line)['epoch'] for line in (part / 'metrics.jsonl').read_text().splitlines()] == [1]


# ---------------------------------------------------------------- errors a user can fix


def here(args, capfd):
    """python ARGS (train.py or evaluate.py) run in this process as its __main__ runs it (config.cli):
    the same exit status and stderr, without the seconds a new interpreter spends importing torch
    (tests/test_config.py runs both scripts as new processes)."""
    capfd.readouterr()
    code = C.cli({'train.py': T.main, 'evaluate.py': E.main}[args[0]], args[1:])
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(args, code or 0, out, err)


def one_line_error(r, *words):
    assert r.returncode != 0
    assert 'Traceback' not in r.stderr, r.stderr[-2000:]
    msg = r.stderr.strip().splitlines()[-1]
    assert msg.startswith('error:') and all(w in msg for w in words), msg


@pytest.mark.parametrize(
    'args,words',
    [
        (['--data=/nonexistent'], ['/nonexistent', 'make data']),
        (['--model=resnet9000'], ['resnet9000', 'resnet50']),
        (['--act=tanh'], ['tanh', 'gelu']),
        (['--epochs=two'], ['--epochs', 'int']),
        (['--bogus=1'], ['--bogus']),
    ],
)
def test_bad_arguments_get_one_line_errors(args, words, capfd):
    one_line_error(here(['train.py', *args], capfd), *words)


def test_bad_checkpoints_and_divergence_get_one_line_errors(tiny_data, tmp_path, capfd):
    out = tmp_path / 'run'
    train = lambda *extra, out=out: here(train_args(tiny_data, out, *extra), capfd)
    r = train('--epochs=1')
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = out / 'ckpt.pt'
    good = ckpt.read_bytes()

    one_line_error(train(f'--resume={ckpt}', '--act=relu'), 'gelu', 'relu')
    one_line_error(train(f'--resume={ckpt}', '--model=vit_demo'), 'resnet_demo', 'vit_demo')
    (tmp_path / 'cut.pt').write_bytes(good[: len(good) // 2])
    one_line_error(train(f'--resume={tmp_path / "cut.pt"}'), 'corrupt')
    one_line_error(here(['evaluate.py', f'--ckpt={tmp_path / "cut.pt"}'], capfd), 'corrupt')
    torch.save({'model': object.__new__(C.Config)}, tmp_path / 'pickled.pt')
    one_line_error(here(['evaluate.py', f'--ckpt={tmp_path / "pickled.pt"}'], capfd), 'pickled')

    # an absurd learning rate overflows the weights: the message names the term, the checkpoint survives
    r = train(f'--resume={ckpt}', '--lr=1e30', '--resume_changes=lr')
    one_line_error(r, 'non-finite ce', 'checkpoint', '--lr')
    assert ckpt.read_bytes() == good

    # output that cannot be written: a clear message, earlier checkpoints intact
    one_line_error(train(out=ckpt / 'sub'), 'cannot use output directory')
    (
        out / f'ckpt-00000016-{CK.load_checkpoint(str(ckpt))["run"]}.pt.tmp'
    ).mkdir()  # the next one's temporary name is taken
    one_line_error(train('--resume=auto'), 'cannot write checkpoint', 'intact')
    assert ckpt.read_bytes() == good
