"""GradNorm (Rodriguez-Munoz, Wang, Torralba, ECCV 2024): robustness from small input gradients on
clean images, and the plain cross-entropy it is compared with. Each objective is
(model, x, y, ...) -> (loss, {term: value}), x images in [0,1] (normalization lives in the model);
call loss.backward(). Imports only torch. EdgeReg is in edge_reg.py, PGD adversarial training in attack.py.
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def standard(model, x, y, smoothing=0.1):
    ce = F.cross_entropy(model(x), y, label_smoothing=smoothing)
    return ce, {'ce': ce}


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
    return weights[0] * ce + weights[1] * alpha * penalty, {'ce': ce, 'gradnorm': penalty}


def gradnorm_fd(model, x, y, eps, alpha, h=1e-3, smoothing=0.1, weights=(0.8, 1.2)):
    """GradNorm without second derivatives (Finlay & Oberman 2019): two forward-backward passes.

    With s = sign(grad_x CE) held fixed, the penalty's parameter gradient is eps times the derivative
    of grad_theta CE along s: eps * [grad_theta CE(x + h*s) - grad_theta CE(x)] / h + O(h).
    Pass 1 gets grad_x (for s and the penalty) and G0 = grad_theta CE(x) from one backward. Pass 2's
    CE(x + h*s) goes into a surrogate whose backward (the training loop's, so DDP syncs as usual) is
    w0*G0 + k*(G1 - G0), k = w1*alpha*eps/h, and whose value is the true loss (w0, w1 = weights).
    Error vs double backprop (demo ResNet, GELU): ~7*h relative from the O(h) term, plus float32
    rounding ~1.4e-7/h, so h=1e-3 gives ~0.7%. Needs float32 and a smooth activation (ReLU: >80%).
    No second derivative, so fused attention kernels work; BatchNorm's running stats see both passes.
    """
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
    return surrogate + (loss - surrogate).detach(), {'ce': ce.detach(), 'gradnorm': penalty}
