"""EdgeReg against a transcription of the authors' formulas (their ContourEnergy and loss)."""
import math

import numpy as np
import pytest
import scipy.special
import torch
import torch.nn as nn
import torch.nn.functional as F

import config as C
import models as M
import train as T
from edge_reg import bessel_kernel, blur, edge_reg


def official_edge_loss(net, x_norm, y, alpha, temp, sigma=1.0, smoothing=0.1):
    """A transcription of adversarial_training_logit.py's loss and gradient_teachers.ContourEnergy
    (numpy/scipy kernels, reflect padding, their filter order); net eats normalized images."""
    order = math.ceil(3 * sigma)
    h = math.exp(-sigma) * scipy.special.iv(np.arange(-order, order + 1), sigma)
    gauss = torch.from_numpy(h / h.sum())
    r = np.linspace(-1, 1, 3)
    gx, gy = np.meshgrid(r, r)
    den = gx**2 + gy**2
    den[:, 1] = 1
    sobel = torch.from_numpy(gx / den)

    def teacher(img):
        N, C, H, W = img.shape
        p = (len(gauss) - 1) // 2
        img = F.pad(img, (p,) * 4, 'reflect')
        img = F.conv2d(img, gauss[None, None, :, None].expand(C, -1, -1, -1), groups=C)
        img = F.conv2d(img, gauss[None, None, None, :].expand(C, -1, -1, -1), groups=C)
        img = F.pad(img, (1,) * 4, 'reflect')
        dx = F.conv2d(img, sobel[None, None].expand(C, -1, -1, -1), groups=C)
        dy = F.conv2d(img, sobel.T[None, None].expand(C, -1, -1, -1), groups=C)
        E = (dx**2 + dy**2).sum(-3, keepdim=True) ** 0.5
        E = F.pad(E, (p,) * 4, 'reflect')
        E = F.conv2d(E, gauss[None, None, :, None])
        E = F.conv2d(E, gauss[None, None, None, :])
        return E.expand(-1, C, -1, -1)

    x_norm = x_norm.clone().requires_grad_(True)
    output = net(x_norm)
    sample = torch.distributions.one_hot_categorical.OneHotCategorical(
        logits=output / temp, validate_args=False
    ).sample()
    gradient = torch.autograd.grad((output * sample).sum(-1).sum(), x_norm, create_graph=True)[0]
    gradient = gradient / gradient.square().mean() ** 0.5
    with torch.no_grad():
        ref = teacher(x_norm)
        ref = ref / ref.square().mean() ** 0.5
    loss_class = F.cross_entropy(output, y, label_smoothing=smoothing)
    return loss_class + alpha * F.mse_loss(gradient, ref)


def test_edge_reg_is_the_authors_formula():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GELU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.GELU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).double()
    mean, std = (
        torch.tensor(M.IMAGENET_MEAN).view(1, 3, 1, 1).double(),
        torch.tensor(M.IMAGENET_STD).view(1, 3, 1, 1).double(),
    )
    model = nn.Sequential(M.Normalize(M.IMAGENET_MEAN, M.IMAGENET_STD).double(), net)
    x, y = torch.rand(6, 3, 20, 24, dtype=torch.float64), torch.randint(0, 10, (6,))
    alpha = 1 + 0.09 * 2.5
    torch.manual_seed(1)
    ours, parts = edge_reg(model, x, y, alpha, norm=(mean, std), temperature=0.5)
    torch.manual_seed(1)
    theirs = official_edge_loss(net, (x - mean) / std, y, alpha, temp=0.5)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=0)
    assert parts['edge_mse'] > 0.1  # a real mismatch to compare, not two zeros


def test_edge_alpha_grows_within_the_epoch():
    cfg = C.parse_config(['--objective=edge', '--edge_alpha=1,0.09,19'])
    fn = T.objective(cfg, torch.device('cpu'))
    torch.manual_seed(0)
    model = M.build_model('vit_demo', 'gelu', in_ch=1, num_classes=10, img_size=28)
    for t, alpha in ((2.5, 1.225), (500.0, 19.0)):
        loss, parts = fn(model, torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3]), t)
        torch.testing.assert_close(loss, parts['ce'] + alpha * parts['edge_mse'])


# ---------------------------------------------------------------- what a copier of edge_reg.py can rely on


def gelu_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(32, 10)).double()


def test_the_input_space_must_be_stated():
    model, x, y = gelu_net(), torch.rand(2, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1])
    with pytest.raises(TypeError, match='norm'):
        edge_reg(model, x, y, 1.0)
    with pytest.raises(TypeError):  # positionally neither: the seventh argument is not the norm
        edge_reg(model, x, y, 1.0, None)


def test_normalized_space_is_the_authors_pixel_space_behind_normalize():
    """The authors' model eats (x - mean) / std: edge_reg with norm=(mean, std) on Normalize + net is
    edge_reg in pixel space on net at the normalized image (loss, terms, parameter gradient); pixel
    space on the whole model is another loss when std differs per channel, the same when it does not
    (a scalar std scales g and E alike, and each is divided by its RMS)."""
    net, y = gelu_net(), torch.randint(0, 10, (6,))
    x = torch.rand(6, 3, 12, 12, dtype=torch.float64)

    def run(model, inp, norm):
        model.zero_grad()
        torch.manual_seed(1)  # the same sampled classes
        loss, terms = edge_reg(model, inp, y, 2.0, norm=norm)
        loss.backward()
        return loss.detach(), terms, torch.cat([p.grad.flatten() for p in net.parameters()])

    for std in ((0.2, 0.3, 0.5), (0.25, 0.25, 0.25)):
        model = nn.Sequential(M.Normalize((0.4, 0.5, 0.6), std).double(), net)
        mean, std = M.normalization(model)
        ours, theirs = run(model, x, (mean, std)), run(net, (x - mean) / std, None)
        torch.testing.assert_close(ours[0], theirs[0], rtol=1e-10, atol=0)
        torch.testing.assert_close(ours[1], theirs[1], rtol=1e-10, atol=0)
        torch.testing.assert_close(ours[2], theirs[2], rtol=1e-8, atol=1e-12)
        pixel = run(model, x, None)[1]['edge_mse']
        if len(set(std.flatten().tolist())) > 1:
            assert abs(pixel - ours[1]['edge_mse']) > 1e-3 * ours[1]['edge_mse']
        else:
            torch.testing.assert_close(pixel, ours[1]['edge_mse'], rtol=1e-10, atol=0)


def test_terms_are_detached():
    model, x, y = gelu_net(), torch.rand(2, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1])
    loss, terms = edge_reg(model, x, y, 1.0, norm=None)
    assert loss.requires_grad and all(not v.requires_grad and v.grad_fn is None for v in terms.values())


@pytest.mark.parametrize('t,tol', [(4.0, 1e-5), (9.0, 1e-9), (1.0, 0.04)])
def test_blur_t_is_the_variance(t, tol):
    """The authors' stddev=t is the discrete Gaussian's variance: a blurred unit impulse spreads to
    variance t (standard deviation sqrt(t)). The kernel ends at ceil(3t), 3 standard deviations at
    t=1 (their setting), where the cut tails leave 0.964; more at larger t, where it is exact."""
    h = bessel_kernel(t)
    n = torch.arange(len(h), dtype=torch.float64) - len(h) // 2
    assert (h * n).sum().abs() < 1e-12 and abs((h * n**2).sum() - t) < tol * t
    impulse = torch.zeros(1, 1, 61, 61, dtype=torch.float64)
    impulse[..., 30, 30] = 1
    out, m = blur(impulse, t)[0, 0], torch.arange(61, dtype=torch.float64) - 30
    for marginal in (out.sum(0), out.sum(1)):  # along W, along H
        assert abs((marginal * m**2).sum() - t) < tol * t
