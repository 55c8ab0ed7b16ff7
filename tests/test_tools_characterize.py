"""characterize.py's first-order ratio and Nyquist share against answers known in closed form:
linear and saturating models (the attack losses are float32, attack.LOSSES: tolerances 1e-6),
pure periodic patterns, white noise."""

import torch
import torch.nn as nn
import torch.nn.functional as F

import tools.characterize as C


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
