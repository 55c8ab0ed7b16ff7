"""tools/characterize.py's first-order ratio and Nyquist share against answers known in closed form:
linear and saturating models (the attack losses are float32, attack.LOSSES: tolerances 1e-6),
pure periodic patterns, white noise; its gradient norms and edge alignment against direct
computations, and its pictures and numbers from two real checkpoints."""

import dataclasses
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import checkpoint as CK
import config
import models
import tools.characterize as C
from data import FASHION_MEAN, FASHION_STD, load_fashion_mnist
from edge_reg import edge_energy
from tests.conftest import FASHION


class Linear2(nn.Module):
    """Two logits: z0 = 0, z1 = f(w.x + b) per image, with f = identity or a saturating f."""

    def __init__(self, w, b, f=lambda s: s):
        super().__init__()
        self.w, self.b, self.f = w, b, f

    def score(self, x):
        return (x.flatten(1) * self.w.flatten()).sum(1) + self.b

    def forward(self, x):
        z1 = self.f(self.score(x))
        return torch.stack([torch.zeros_like(z1), z1], 1)


def setup(n=16, hw=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(1, hw, hw, generator=g, dtype=torch.float64)
    x = 0.3 + 0.4 * torch.rand(n, 1, hw, hw, generator=g, dtype=torch.float64)  # eps 0.05 never hits [0,1]
    return w, x, torch.zeros(n, dtype=torch.long)


def test_linear_model_pgd_gain_equals_first_order_prediction():
    """margin loss = z1 - z0 = w.x is linear in x: PGD's gain is eps*||w||_1, the prediction."""
    w, x, y = setup()
    r = C.first_order_ratio(Linear2(w, 0.0), [(x, y)], 0.05, loss='margin')
    assert abs(r['ratio'] - 1) < 1e-6 and abs(r['ratio_box'] - 1) < 1e-6 and abs(r['median_ratio'] - 1) < 1e-6
    assert abs(r['actual'] - 0.05 * w.abs().sum().item()) < 1e-6 and r['n'] == 16


def test_convex_loss_ratio_matches_closed_form_above_one():
    """CE of the linear model is softplus(m), m = w.x: convex, so PGD gains more than predicted;
    PGD reaches the corner x + eps*sign(w), so the gain is softplus(m + d) - softplus(m), d = eps*||w||_1."""
    w, x, y = setup()
    eps, model = 0.05, Linear2(w, 0.0)
    m, d = model.score(x), eps * w.abs().sum()
    gain, pred = F.softplus(m + d) - F.softplus(m), torch.sigmoid(m) * d
    r = C.first_order_ratio(model, [(x, y)], eps, loss='ce')
    assert abs(r['ratio'] - (gain.mean() / pred.mean()).item()) < 1e-6 and r['ratio'] > 1


def test_saturating_loss_ratio_matches_closed_form_below_one():
    """margin loss tanh(s), s = w.x + b in [0.5, 1.5]: concave where PGD climbs, so the gain falls short."""
    w, x, y = setup()
    eps, model = 0.05, Linear2(w, 0.0)
    model.b = (
        0.5
        - model.score(x)
        + torch.rand(len(y), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    )
    model.f = torch.tanh
    s, d = model.score(x), eps * w.abs().sum()
    gain, pred = torch.tanh(s + d) - torch.tanh(s), (1 - torch.tanh(s) ** 2) * d
    r = C.first_order_ratio(model, [(x, y)], eps, loss='margin')
    assert abs(r['ratio'] - (gain.mean() / pred.mean()).item()) < 1e-6 and r['ratio'] < 1


def test_box_aware_prediction_on_black_pixels():
    """Images at 0 (Fashion-MNIST's background) cannot move down: PGD gets eps * sum(w+), which is
    the box-aware prediction; the plain eps*||w||_1 overstates it by ||w||_1 / sum(w+)."""
    w, x, y = setup()
    r = C.first_order_ratio(Linear2(w, 0.0), [(torch.zeros_like(x), y)], 0.05, loss='margin')
    assert abs(r['ratio_box'] - 1) < 1e-6
    assert abs(r['ratio'] - (w.clamp(min=0).sum() / w.abs().sum()).item()) < 1e-6


def test_nyquist_fraction_of_known_patterns():
    i, j = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing='ij')
    checker = 1 + (-1) ** (i + j)  # |g|-like: non-negative, 2-pixel periodic
    stripes = 1 + (-1) ** j
    blob = torch.exp(-((i - 13) ** 2 + (j - 15) ** 2) / 30)
    nyq = C.nyquist_fraction(torch.stack([checker, stripes, blob])[:, None])
    assert abs(nyq[0] - 1) < 1e-12 and abs(nyq[1] - 1) < 1e-12 and nyq[2] < 1e-6
    noise = C.nyquist_fraction(torch.rand(2000, 28, 28, generator=torch.Generator().manual_seed(0)))
    assert abs(noise.mean() - 55 / 783) < 0.005  # white noise: its share of the bins


def test_gradient_stats_nyquist_of_a_checkerboard_model():
    """A model whose input gradient is a fixed checkerboard times the loss's slope: |g|'s Nyquist
    share is 1, so its ratio to the images' is 1 / (the images' share)."""
    i, j = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing='ij')
    w = ((-1) ** (i + j) + 2)[None]  # non-negative, periodic around its mean
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    *_, nyq = C.gradient_stats(Linear2(w, 0.0), [(x, torch.zeros(4, dtype=torch.long))])
    img = C.nyquist_fraction(x).mean().item()
    assert abs(nyq['grad'] - 1) < 1e-5 and abs(nyq['image'] - img) < 1e-6 and abs(nyq['rel'] - 1 / img) < 1e-3


def test_pixel_edges_mark_a_step_only_at_the_step():
    x = torch.zeros(1, 1, 8, 8)
    x[..., 4:] = 1  # a vertical edge between columns 3 and 4
    e = C.pixel_edges(x)[0, 0]
    assert torch.equal(e[:, 3], torch.ones(8)) and e.sum() == 8


def test_column_headers_drop_what_every_run_folder_shares_whole_words_only():
    runs = ['resnet_demo_pool-standard-gelu', 'resnet_demo_pool-gradnorm-gelu', 'resnet_demo_pool-pgd-gelu']
    assert C.short_names(runs) == ['standard', 'gradnorm', 'pgd']
    assert C.short_names(['x-gelu', 'x-relu']) == ['gelu', 'relu']  # not 'g', 'r'
    assert C.short_names(['run', 'run']) == ['run', 'run'] and C.short_names(['solo']) == ['solo']


# ---------------------------------------------------------------- on a real model and real data


def small_model(seed):
    torch.manual_seed(seed)
    return models.build_model(
        'resnet_demo', 'gelu', in_ch=1, num_classes=10, img_size=28, mean=FASHION_MEAN, std=FASHION_STD
    ).eval()


def test_gradient_norms_match_one_image_at_a_time():
    model = small_model(0)
    torch.manual_seed(1)
    x, y = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,))
    l1, l2, align, channels, nyq = C.gradient_stats(model, [(x[:4], y[:4]), (x[4:], y[4:])])
    for i in range(6):
        xi = x[i : i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xi), y[i : i + 1]), xi)
        assert l1[i].item() == pytest.approx(g.abs().sum().item(), rel=1e-4)
        assert l2[i].item() == pytest.approx(g.pow(2).sum().sqrt().item(), rel=1e-4)
    assert channels[0]['l1_share'] == pytest.approx(1.0)
    assert channels[0]['mean_abs'] * 6 * 28 * 28 == pytest.approx(l1.sum().item(), rel=1e-4)
    s = C.summary(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert s['median'] == 3 and s['mean'] == 3 and s['q25'] == 2


def test_edge_alignment_of_teacher_is_one_and_of_noise_near_zero():
    torch.manual_seed(0)
    x = torch.rand(8, 3, 32, 32)
    x = F.avg_pool2d(x, 5, 1, 2)  # smoother, image-like structure
    teacher = edge_energy(x)
    assert torch.allclose(C.edge_alignment(teacher, x), torch.ones(8), atol=1e-5)
    assert torch.allclose(C.edge_alignment(-teacher, x), torch.ones(8), atol=1e-5)  # |g|
    noise = C.edge_alignment(torch.randn(8, 3, 32, 32), x)
    assert noise.abs().max() < 0.1


def test_characterize_writes_pictures_and_numbers(tmp_path):
    if not os.path.exists(os.path.join(FASHION, 't10k-labels-idx1-ubyte.gz')):
        pytest.skip('no Fashion-MNIST: run `make data`')
    info = dict(in_ch=1, num_classes=10, img_size=28, mean=FASHION_MEAN, std=FASHION_STD)
    paths = []
    for i in range(2):
        os.makedirs(tmp_path / f'run{i}')
        paths.append(str(tmp_path / f'run{i}' / 'ckpt.pt'))
        cfg = config.Config(data=FASHION, model='resnet_demo')  # small_model's architecture
        CK.save_checkpoint(
            paths[-1],
            dict(model=small_model(i).state_dict(), config=dataclasses.asdict(cfg), data_info=info, epoch=0),
        )
    out = str(tmp_path / 'out')
    C.main(paths + ['--n', '40', '--rows', '3', '--steps', '2', '--fo-n', '16', '--out', out])
    grid = Image.open(os.path.join(out, 'gradients.png'))
    assert grid.size == (4 * (112 + 2) + 2, 14 + 3 * (112 + 2) + 2)  # 4 columns: input, 2 runs, edges
    assert Image.open(os.path.join(out, 'norm_vs_robust.png')).size == (520, 360)
    res = json.load(open(os.path.join(out, 'characterize.json')))
    assert [r['name'] for r in res] == ['run0', 'run1'] and res[0]['n'] == 40
    assert (
        res[0]['first_order']['n'] == 16
        and res[0]['first_order']['ratio'] > 0
        and res[0]['nyquist']['rel'] > 0
    )
    _, (xte, yte) = load_fashion_mnist(
        FASHION
    )  # the same number from the untouched model: nothing moved its BN stats
    direct = C.first_order_ratio(
        small_model(0), [(xte[:16].float() / 255, yte[:16])], res[0]['eps']
    )
    assert res[0]['first_order']['ratio'] == pytest.approx(direct['ratio'], rel=1e-4)
    assert open(os.path.join(out, 'characterize.csv')).read().count('\n') == 3
