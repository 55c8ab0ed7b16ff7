"""science.py against answers known in closed form: linear and saturating models for the
first-order ratio, pure patterns for the Nyquist measure, a hand-written batch norm for the
train- vs eval-mode gradient norms."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import science as S


class Linear2(nn.Module):
    """Two logits: z0 = 0, z1 = f(w.x + b) per image, with f = identity or a saturating f. The
    attack losses are computed in float32 (attack.LOSSES), hence tolerances of 1e-6, not 1e-12."""

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
    b = torch.randn(n, generator=g, dtype=torch.float64)
    return w, b, x, torch.zeros(n, dtype=torch.long)


def test_linear_model_ratio_is_exactly_one():
    """margin loss = z1 - z0 = w.x + b is linear in x: PGD's gain is eps*||w||_1, the prediction."""
    w, b, x, y = setup()
    model = Linear2(w, 0.0)
    r = S.first_order_ratio(model, [(x, y)], 0.05, loss='margin')
    assert abs(r['ratio'] - 1) < 1e-6 and abs(r['ratio_box'] - 1) < 1e-6 and abs(r['median_ratio'] - 1) < 1e-6
    assert abs(r['actual'] - 0.05 * w.abs().sum().item()) < 1e-6


def test_convex_loss_ratio_matches_closed_form_above_one():
    """CE of the linear model is softplus(m), m = w.x: convex, so PGD gains more than predicted;
    PGD reaches the corner x + eps*sign(w), so the gain is softplus(m + d) - softplus(m), d = eps*||w||_1."""
    w, _, x, y = setup()
    eps, model = 0.05, Linear2(w, 0.0)
    m, d = model.score(x), eps * w.abs().sum()
    gain, pred = F.softplus(m + d) - F.softplus(m), torch.sigmoid(m) * d
    r = S.first_order_ratio(model, [(x, y)], eps, loss='ce')
    assert abs(r['ratio'] - (gain.mean() / pred.mean()).item()) < 1e-6
    assert r['ratio'] > 1


def test_saturating_loss_ratio_matches_closed_form_below_one():
    """margin loss tanh(s), s = w.x + b > 0: concave where PGD climbs, so the gain falls short."""
    w, _, x, y = setup()
    eps = 0.05
    model = Linear2(w, 0.0)
    model.b = 0.5 - model.score(x) + torch.rand(len(y), dtype=torch.float64)  # s in [0.5, 1.5]
    model.f = torch.tanh
    s, d = model.score(x), eps * w.abs().sum()
    gain, pred = torch.tanh(s + d) - torch.tanh(s), (1 - torch.tanh(s) ** 2) * d
    r = S.first_order_ratio(model, [(x, y)], eps, loss='margin')
    assert abs(r['ratio'] - (gain.mean() / pred.mean()).item()) < 1e-6
    assert r['ratio'] < 1


def test_box_aware_prediction_on_black_pixels():
    """Images at 0 (Fashion-MNIST's background) cannot move down: PGD gets eps * sum(w+), which is
    the box-aware prediction; the plain eps*||w||_1 overstates it by ||w||_1 / sum(w+)."""
    w, _, x, y = setup()
    x = torch.zeros_like(x)
    r = S.first_order_ratio(Linear2(w, 0.0), [(x, y)], 0.05, loss='margin')
    assert abs(r['ratio_box'] - 1) < 1e-6
    assert abs(r['ratio'] - (w.clamp(min=0).sum() / w.abs().sum()).item()) < 1e-6


def test_nyquist_fraction_of_known_patterns():
    i, j = torch.meshgrid(torch.arange(28.), torch.arange(28.), indexing='ij')
    checker = 1 + (-1) ** (i + j)                      # |g|-like: non-negative, 2-pixel periodic
    stripes = 1 + (-1) ** j
    blob = torch.exp(-((i - 13) ** 2 + (j - 15) ** 2) / 30)
    nyq = S.nyquist_fraction(torch.stack([checker, stripes, blob])[:, None])
    assert abs(nyq[0] - 1) < 1e-12 and abs(nyq[1] - 1) < 1e-12 and nyq[2] < 1e-6
    noise = S.nyquist_fraction(torch.rand(2000, 28, 28, generator=torch.Generator().manual_seed(0)))
    assert abs(noise.mean() - 55 / 783) < 0.005       # white noise: its share of the bins


class TinyBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.Linear(4 * 16, 3)

    def forward(self, x):
        return self.fc(F.gelu(self.bn(self.conv(x))).flatten(1))


def test_bn_gradient_norms_match_independent_computation():
    torch.manual_seed(0)
    model = TinyBN().double()
    model.bn.running_mean.uniform_(-1, 1), model.bn.running_var.uniform_(0.5, 2)
    model.bn.weight.data.uniform_(0.5, 2), model.bn.bias.data.uniform_(-1, 1)
    before = model.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    batches = [(torch.rand(8, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (8,))) for _ in range(2)]
    got = S.bn_gradient_norms(model, batches, smoothing=0.1)

    def norms(forward, per_sample):
        out = []
        for x, y in batches:
            groups = [(x[k:k + 1], y[k:k + 1]) for k in range(len(y))] if per_sample else [(x, y)]
            for xs, ys in groups:  # eval: one image at a time; train: the batch, B * grad of the mean
                xs = xs.clone().requires_grad_(True)
                (g,) = torch.autograd.grad(F.cross_entropy(forward(xs), ys, label_smoothing=0.1) * len(ys), xs)
                out.append(g.abs().flatten(1).sum(1))
        return torch.cat(out).mean().item()

    def batch_stats_forward(x):  # batch norm by hand: batch mean and biased variance
        h = model.conv(x)
        mu, var = h.mean((0, 2, 3), keepdim=True), h.var((0, 2, 3), unbiased=False, keepdim=True)
        h = (h - mu) / torch.sqrt(var + model.bn.eps) * model.bn.weight.view(1, -1, 1, 1) + model.bn.bias.view(1, -1, 1, 1)
        return model.fc(F.gelu(h).flatten(1))

    assert abs(got['eval'] - norms(model.eval(), True)) < 1e-10
    assert abs(got['train'] - norms(batch_stats_forward, False)) < 1e-10
    assert abs(got['ratio'] - got['eval'] / got['train']) < 1e-12
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # running stats untouched


def test_table_and_curves(tmp_path):
    recs = [{'epoch': e, 'clean': 0.5 + 0.1 * s + 0.01 * e, 'worst': 0.4, 'fo_ratio': 1.0 + s} for s in range(3) for e in range(2)]
    groups = {'base_gelu': {e: [r for r in recs if r['epoch'] == e] for e in range(2)}}
    md = S.table(groups)
    assert '| base_gelu | 0 | 3 | 60.0 ± 10.0 | 40.0 ± 0.0 |' in md and '2.00 ± 1.00' in md
    S.plot_curves(groups, tmp_path / 'c.png')
    from PIL import Image
    assert Image.open(tmp_path / 'c.png').size[0] > 500


def test_measures_run_on_the_demo_model():
    """End to end on a random demo ResNet: finite numbers, gains >= 0, the ball respected."""
    import gradnorm as G
    from data import FASHION_MEAN, FASHION_STD
    torch.manual_seed(0)
    model = G.build_model('resnet_demo', 'gelu', in_ch=1, num_classes=10, mean=FASHION_MEAN, std=FASHION_STD).eval()
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    r = S.first_order_ratio(model, [(x, y)], 0.1, steps=5)
    assert r['actual'] >= 0 and math.isfinite(r['ratio'])
    masks = S.robust_masks(model, x, y, 0.1, ('ce-5', 'margin-5'))
    assert torch.equal(masks['worst'], masks['ce-5'] & masks['margin-5'])
    st = S.gradient_picture_stats(model, [(x, y)])
    assert 0 <= st['nyq_grad'] <= 1 and -1 <= st['edge_corr'] <= 1


def test_activation_stats_find_gelus_dip_and_never_relu():
    """GELU at its stationary point z = -0.7518 is flat (slope 0) and curved (act'' = 0.43);
    ReLU's act'' is 0 everywhere, so it never counts; far from 0, GELU is not curved."""
    z = torch.full((4, 1, 2, 2), -0.7518)
    assert S.activation_stats(nn.Sequential(nn.GELU()), [(z, None)])['flat_curved'] == 1
    assert S.activation_stats(nn.Sequential(nn.ReLU()), [(z, None)])['flat_curved'] == 0
    assert S.activation_stats(nn.Sequential(nn.GELU()), [(z - 5, None)])['flat_curved'] == 0
    assert abs(S.activation_stats(nn.Sequential(nn.SiLU()), [(z * 0 + 3, None)])['mean_slope'] - 1.0881) < 1e-3


def test_pixel_edges_mark_a_step_only_at_the_step():
    x = torch.zeros(1, 1, 8, 8)
    x[..., 4:] = 1  # a vertical edge between columns 3 and 4
    e = S.pixel_edges(x)[0, 0]
    assert torch.equal(e[:, 3], torch.ones(8)) and e.sum() == 8
