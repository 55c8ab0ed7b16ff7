"""GradNorm (Rodriguez-Munoz, Wang, Torralba, ECCV 2024): robustness from small input gradients on
clean images, and the plain cross-entropy it is compared with.
Copy alone: needs only torch (tested with 2.14.1); pass x in [0,1], the model normalizing inside.
Each objective is (model, x, y, ...) -> (loss, {term: detached value}); call loss.backward().
EdgeReg is in edge_reg.py, PGD and FGSM adversarial training in attack.py.
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def standard(model, x, y, smoothing=0.1):
    ce = F.cross_entropy(model(x), y, label_smoothing=smoothing)
    return ce, {'ce': ce.detach()}


def gradnorm(model, x, y, eps, alpha, smoothing=0.1, weights=(0.8, 1.2)):
    """0.8*CE + 1.2*alpha*eps*mean_i ||grad_x CE_i||_1, the first-order cost of an L-inf attack
    (weights: the CE and penalty weights, 0.8 and 1.2 in the paper's GELU runs).

    The penalty is differentiated again (double backprop). CE is a batch mean, so B*grad gives
    each sample's own gradient; with BatchNorm in train mode samples are coupled and this is the
    batch-mean gradient scaled by B, exactly as the paper computes it.
    """
    if not x.requires_grad:  # under torch.compile, make x a leaf before the call instead
        x = x.detach().requires_grad_()
    with sdpa_kernel(SDPBackend.MATH):
        ce = F.cross_entropy(model(x), y, label_smoothing=smoothing)
    (g,) = torch.autograd.grad(ce * x.shape[0], x, create_graph=True)
    penalty = eps * g.abs().flatten(1).sum(1).mean()
    return weights[0] * ce + weights[1] * alpha * penalty, {'ce': ce.detach(), 'gradnorm': penalty.detach()}


# the finite-difference step (pixel units): truncation error is O(h), float32 rounding takes over below ~1e-4
FD_H = 1e-4


def gradnorm_fd(model, x, y, eps, alpha, h=FD_H, smoothing=0.1, weights=(0.8, 1.2)):
    """GradNorm without second derivatives (Finlay & Oberman 2019): two forward-backward passes.

    With s = sign(grad_x CE) held fixed, the penalty's parameter gradient is eps times the derivative
    of grad_theta CE along s: eps * [grad_theta CE(x + h*s) - grad_theta CE(x)] / h + O(h).
    Pass 1 gets grad_x (for s and the penalty) and G0 = grad_theta CE(x) from one backward. Pass 2's
    CE(x + h*s) goes into a surrogate whose backward (the training loop's, so DDP syncs as usual) is
    w0*G0 + k*(G1 - G0), k = w1*alpha*eps/h, and whose value is the true loss (w0, w1 = weights).
    Needs float32 and a smooth activation (choose_impl; its error: docs/speed.md): raises ValueError
    under autocast or with TF32 on (fd_check). BatchNorm's running stats see both passes.
    """
    fd_check(x.device.type)
    return gradnorm_fd_unchecked(model, x, y, eps, alpha, h, smoothing, weights)


def gradnorm_fd_unchecked(model, x, y, eps, alpha, h=FD_H, smoothing=0.1, weights=(0.8, 1.2)):
    """gradnorm_fd without fd_check: only to measure the error of what the check refuses."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not x.requires_grad:
        x = x.detach().requires_grad_()
    ce = F.cross_entropy(model(x), y, label_smoothing=smoothing)
    gx, *g0 = torch.autograd.grad(ce, [x, *params])
    penalty = eps * x.shape[0] * gx.abs().flatten(1).sum(1).mean()
    k = weights[1] * alpha * eps / h
    ce_h = F.cross_entropy(model(x.detach() + h * gx.sign()), y, label_smoothing=smoothing)
    surrogate = k * ce_h + (weights[0] - k) * sum((g * p).sum() for g, p in zip(g0, params))
    loss = weights[0] * ce + weights[1] * alpha * penalty
    return surrogate + (loss - surrogate).detach(), {'ce': ce.detach(), 'gradnorm': penalty.detach()}


# ---------------------------------------------------------------- which implementation where

# activations whose gradient is smooth enough for the difference quotient
SMOOTH_ACTS = ('gelu', 'silu')


def choose_impl(requested, device_type, amp, act):
    """-> (impl, why): 'fd' or 'exact', and why, for the log. auto picks fd where it is cheaper and was
    measured within 1% of float64 double backprop (docs/speed.md): float32 and a smooth activation."""
    if requested not in ('auto', 'exact', 'fd'):
        raise ValueError(f'unknown GradNorm implementation {requested!r}: auto, exact or fd')
    if requested == 'fd' and amp:
        raise ValueError('fd needs float32, but bf16 autocast rounds to ~4e-3, more than the difference '
                         'quotient measures: turn amp off or use exact')
    rough = f"{act}'s gradient is piecewise constant, the difference quotient is 200-1700% off"
    if requested != 'auto':
        if requested == 'fd' and act not in SMOOTH_ACTS:
            return 'fd', f'fd: inaccurate, as requested: {rough}; use exact'
        return requested, f'{requested}: as requested'
    if amp:
        return 'exact', 'exact: bf16 autocast swamps the difference quotient'
    if act not in SMOOTH_ACTS:
        return 'exact', f'exact: {rough}'
    tf32 = ', TF32 off' if device_type == 'cuda' else ''
    return 'fd', f'fd: float32 on {device_type} with {act}{tf32}: 2 passes instead of double backprop'


def fd_check(device_type):
    """Raises ValueError where the difference quotient would divide rounding by h: under autocast (bf16
    rounds to ~4e-3) or, on CUDA, with TF32 matmuls or cuDNN convolutions (~5e-4)."""
    if torch.is_autocast_enabled(device_type):
        raise ValueError(f'gradnorm_fd needs float32, but {device_type} autocast is on: call it outside '
                         'torch.autocast, or use gradnorm (double backprop)')
    if device_type == 'cuda' and (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32):
        raise ValueError('gradnorm_fd needs float32, but TF32 is on: set torch.backends.cuda.matmul.'
                         'allow_tf32 = torch.backends.cudnn.allow_tf32 = False (fd_float32("cuda"))')


def fd_float32(device_type):
    """What fd needs on CUDA: TF32 off for matmuls and cuDNN convolutions (TF32 keeps 10 mantissa bits,
    a rounding of ~5e-4 that the difference quotient divides by h); nothing elsewhere."""
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
