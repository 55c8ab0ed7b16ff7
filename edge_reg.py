"""EdgeReg: make the input gradient look like the image's edges.

The teacher is an edge-energy map E(x): Gaussian blur -> Sobel magnitude summed over channels ->
blur, broadcast to every channel. The student is g = d logit_c / dx for a class c sampled from
softmax(logits / 0.5). Both are scaled to unit RMS per image, so only their shape is compared.
"""
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def gaussian_blur(x, sigma=1.0):
    r = math.ceil(3 * sigma)
    k = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device).pow(2).div(-2 * sigma ** 2).exp()
    k = k / k.sum()
    C = x.shape[1]
    # separable and per channel; replicate padding so the image border is not an edge
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode='replicate'), k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode='replicate'), k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


def edge_energy(x, sigma=1.0):
    B, C, H, W = x.shape
    sobel = torch.tensor([[-1., 0., 1.], [-2., 0., 2.], [-1., 0., 1.]], dtype=x.dtype, device=x.device)
    k = torch.stack([sobel, sobel.T]).unsqueeze(1).repeat(C, 1, 1, 1)  # (2C, 1, 3, 3): d/dx, d/dy
    g = F.conv2d(F.pad(gaussian_blur(x, sigma), (1, 1, 1, 1), mode='replicate'), k, groups=C)
    magnitude = g.reshape(B, C, 2, H, W).pow(2).sum(2).sqrt().sum(1, keepdim=True)
    return gaussian_blur(magnitude, sigma).expand(B, C, H, W)


def unit_rms(t):
    return t / t.pow(2).mean((1, 2, 3), keepdim=True).sqrt().clamp_min(1e-12)


def edge_reg(model, x, y, alpha, temperature=0.5, smoothing=0.1):
    """CE + alpha * MSE(g / RMS(g), E / RMS(E)), g the sampled-class logit gradient (differentiable)."""
    if not x.requires_grad:  # under torch.compile, make x a leaf before the call instead
        x = x.detach().requires_grad_()
    with sdpa_kernel(SDPBackend.MATH):  # fused attention kernels have no double backward
        logits = model(x)
    ce = F.cross_entropy(logits, y, label_smoothing=smoothing)
    c = torch.multinomial(F.softmax(logits.detach().float() / temperature, 1), 1)
    (g,) = torch.autograd.grad(logits.gather(1, c).sum(), x, create_graph=True)
    mse = F.mse_loss(unit_rms(g), unit_rms(edge_energy(x.detach())))
    return ce + alpha * mse, {'ce': ce, 'edge_mse': mse}
