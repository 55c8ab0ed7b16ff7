"""EdgeReg against a transcription of the authors' formulas (their ContourEnergy and loss)."""
import math

import numpy as np
import scipy.special
import torch
import torch.nn as nn
import torch.nn.functional as F

import config as C
import models as M
import train as T
from edge_reg import edge_reg


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
    ours, parts = edge_reg(model, x, y, alpha, temperature=0.5, mean=mean, std=std)
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
