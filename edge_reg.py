"""EdgeReg: make the input gradient look like the image's edges, as the authors' code computes it
(gradient_teachers.py: ContourEnergy; adversarial_training_logit.py: the loss).
Copy alone: needs only torch (tested with 2.14.1); pass x in [0,1] and norm=the model's (mean, std) or None.

The teacher is an edge-energy map E(x): Gaussian blur -> Sobel -> sqrt(sum over channels of
dx^2 + dy^2) -> blur, broadcast to every channel; the Gaussian is the discrete (Bessel) kernel and
every filter pads by reflection. The student is g = d logit_c / dx for a class c sampled from
softmax(logits / 0.5). Each is divided by its RMS over the whole batch (not per image), so only
their shape is compared. The authors' model eats normalized images, so their g and E live in
normalized space: given the model's (mean, std), so do ours (g * std, E((x - mean) / std)).
"""
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def bessel_kernel(t=1.0):
    """The discrete Gaussian exp(-t) I_n(t), n in [-ceil(3t), ceil(3t)], renormalized: the authors'
    make_gaussian_filter(stddev=t). Its variance is t (its standard deviation sqrt(t)): their "stddev"
    is a variance, the two agree only at their t=1. I_n by its power series, in float64."""
    r = math.ceil(3 * t)

    def i_n(n):
        return sum((t / 2) ** (2 * k + n) / (math.factorial(k) * math.factorial(k + n)) for k in range(40))

    h = torch.tensor([math.exp(-t) * i_n(abs(n)) for n in range(-r, r + 1)], dtype=torch.float64)
    return h / h.sum()


def _filter(x, k):
    """Per-channel correlation with a 2-D kernel k (kh, kw), reflect-padded to keep the size."""
    C, (kh, kw) = x.shape[1], k.shape
    x = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2), mode='reflect')
    return F.conv2d(x, k.to(x)[None, None].expand(C, 1, kh, kw), groups=C)


def blur(x, t=1.0):
    """The discrete Gaussian of variance t (bessel_kernel), along H, then along W."""
    h = bessel_kernel(t)
    return _filter(_filter(x, h[:, None]), h[None, :])


def edge_energy(x, t=1.0):
    """(B, C, H, W) -> the edge map E, (B, C, H, W): C copies of one map; t: both blurs' variance
    (the authors' sigma=1)."""
    B, C, H, W = x.shape
    # the authors' 3x3 Sobel: x / (x^2 + y^2) on the grid {-1, 0, 1}^2, half the textbook one
    sobel = torch.tensor([[-0.5, 0., 0.5], [-1., 0., 1.], [-0.5, 0., 0.5]], dtype=torch.float64)
    s = blur(x, t)
    dx, dy = _filter(s, sobel), _filter(s, sobel.T)
    e = (dx.pow(2) + dy.pow(2)).sum(1, keepdim=True).sqrt()
    return blur(e, t).expand(B, C, H, W)


def batch_rms(v):
    return v.pow(2).mean().sqrt()


def edge_reg(model, x, y, alpha, *, norm, temperature=0.5, smoothing=0.1):
    """CE + alpha * MSE(g / RMS(g), E / RMS(E)), g the sampled-class logit gradient (differentiable).
    norm (required): the model's (mean, std), (1, C, 1, 1) each, to compare in its input space as the
    authors do; None compares in pixel space, which differs when std differs between channels."""
    if not x.requires_grad:  # under torch.compile, make x a leaf before the call instead
        x = x.detach().requires_grad_()
    with sdpa_kernel(SDPBackend.MATH):  # fused attention kernels have no double backward
        logits = model(x)
    ce = F.cross_entropy(logits, y, label_smoothing=smoothing)
    # the draw torch.distributions.Categorical(logits=logits / temperature).sample() makes
    c = torch.multinomial(F.softmax(logits.detach().double() / temperature, 1), 1, True)
    (g,) = torch.autograd.grad(logits.gather(1, c).sum(), x, create_graph=True)
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):  # the teacher in >= float32
        xn = x if norm is None else (x - norm[0]) / norm[1]
        e = edge_energy(xn.detach().to(torch.promote_types(x.dtype, torch.float32)))
        e = e / batch_rms(e)
    g = g if norm is None else g * norm[1]
    mse = F.mse_loss(g / batch_rms(g), e.to(g.dtype))
    return ce + alpha * mse, {'ce': ce.detach(), 'edge_mse': mse.detach()}
