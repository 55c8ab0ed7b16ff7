"""PGD on inputs in [0,1] (L-inf, L2; restarts; CE / margin / DLR losses; the worst case per sample) and
PGD-k adversarial training. Imports only torch, so it can be copied as it is; evaluate.py builds on it."""
import math

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------- losses (per sample, maximized)

def ce_loss(logits, y):
    return F.cross_entropy(logits.float(), y, reduction='none')


def margin_loss(logits, y):
    """Carlini-Wagner logit margin: best wrong logit minus the true one; > 0 exactly when fooled.
    Unlike CE it does not saturate when the softmax is confident."""
    z = logits.float()
    other = z.scatter(1, y[:, None], float('-inf')).amax(1)
    return other - z.gather(1, y[:, None]).squeeze(1)


def dlr_loss(logits, y):
    """Croce & Hein's DLR: the margin over z_(1) - z_(3) of the sorted logits, so rescaling the
    logits (a cheap way to mask CE gradients) changes nothing."""
    if logits.shape[1] < 3:
        raise ValueError('the DLR loss needs at least 3 classes: use the margin loss (margin-STEPS)')
    s = logits.float().sort(1, descending=True).values
    return margin_loss(logits, y) / (s[:, 0] - s[:, 2] + 1e-12)


LOSSES = {'ce': ce_loss, 'margin': margin_loss, 'dlr': dlr_loss}


def _per_sample(v, like):
    return v.view(-1, *[1] * (like.ndim - 1))


def project(delta, eps, norm):
    """Nearest point of the eps-ball (L-inf: clip; L2: rescale)."""
    if norm == 'linf':
        return delta.clamp(-eps, eps)
    n = delta.flatten(1).norm(dim=1)
    return delta * _per_sample((eps / n.clamp_min(1e-12)).clamp(max=1), delta)


def distance(a, b, norm):
    d = (a - b).flatten(1)
    return d.abs().amax(1) if norm == 'linf' else d.norm(dim=1)


def inside(x_adv, x, eps, norm):
    """Per sample: in the eps-ball around x (up to float rounding) and in [0,1]: never trust, verify."""
    flat = x_adv.flatten(1)
    return (distance(x_adv, x, norm) <= eps * (1 + 1e-5) + 1e-6) & (flat.amin(1) >= 0) & (flat.amax(1) <= 1)


def random_delta(x, eps, norm):
    """Uniform in the L-inf ball; uniform in the L2 ball (Gaussian direction, radius eps*U^(1/d))."""
    if norm == 'linf':
        return torch.empty_like(x).uniform_(-eps, eps)
    d = torch.randn_like(x)
    r = eps * torch.rand(len(x), device=x.device).pow(1 / x[0].numel())
    return d * _per_sample(r / d.flatten(1).norm(dim=1), d)


def step(x, x_adv, grad, size, eps, norm):
    """Steepest ascent for the norm (sign / normalized gradient), back into the ball and [0,1].
    Clamping to [0,1] only shrinks each |delta_i| (x is in [0,1]), so it never leaves the ball."""
    if norm == 'linf':
        d = grad.sign()
    else:
        d = grad / _per_sample(grad.flatten(1).norm(dim=1).clamp_min(1e-12), grad)
    return (x + project(x_adv + size * d - x, eps, norm)).clamp(0, 1)


def step_size_at(size, i, steps, schedule):
    """constant, or cosine from size down to 0 (big moves first, fine search last)."""
    if schedule == 'constant':
        return size
    if schedule == 'cosine':
        return size * 0.5 * (1 + math.cos(math.pi * i / steps))
    raise ValueError(f'unknown step-size schedule {schedule!r}: use constant or cosine')


def pgd(model, x, y, eps, steps, step_size=None, random_start=True, keep_best=False,
        norm='linf', loss='ce', restarts=1, schedule='constant', max_loss=False):
    """PGD on inputs in [0,1]; every point returned is in the eps-ball around x and in [0,1].

    keep_best=False (adversarial training): one run, the last iterate, one forward and one backward
    per step; max_loss=True adds the per-sample highest loss over all iterates (how far the loss
    climbs). keep_best=True (evaluation): returns (x_adv, fooled). A sample counts as fooled if the
    clean input or any iterate of any restart was misclassified; x_adv is that point, else the
    highest-loss point seen. Restarts and later steps attack only the samples still standing, which
    changes nothing but the cost. step_size defaults to 2.5*eps/steps."""
    if norm not in ('linf', 'l2'):
        raise ValueError(f'unknown norm {norm!r}: use linf or l2')
    if loss not in LOSSES:
        raise ValueError(f'unknown attack loss {loss!r}; choose one of {", ".join(LOSSES)}')
    loss_fn, size, x = LOSSES[loss], step_size or 2.5 * eps / steps, x.detach()
    if not keep_best:
        x_adv = (x + random_delta(x, eps, norm)).clamp(0, 1) if random_start else x.clone()
        top = torch.full((len(x),), float('-inf'), device=x.device)
        for i in range(steps):
            x_adv.requires_grad_(True)
            value = loss_fn(model(x_adv), y)
            if max_loss:
                top = torch.maximum(top, value.detach())
            (g,) = torch.autograd.grad(value.sum(), x_adv)
            x_adv = step(x, x_adv.detach(), g, step_size_at(size, i, steps, schedule), eps, norm)
        if not max_loss:
            return x_adv.detach()
        with torch.no_grad():
            return x_adv.detach(), torch.maximum(top, loss_fn(model(x_adv), y))

    with torch.no_grad():
        fooled = model(x).argmax(1) != y
    best, best_loss = x.clone(), torch.full(y.shape, float('-inf'), device=x.device)
    for _ in range(restarts):
        act = (~fooled).nonzero().squeeze(1)  # indices of the samples still standing
        xa, ya = x[act], y[act]
        x_adv = (xa + random_delta(xa, eps, norm)).clamp(0, 1) if random_start else xa.clone()
        for i in range(steps + 1):
            with torch.enable_grad() if i < steps else torch.no_grad():
                x_adv.requires_grad_(i < steps)
                logits = model(x_adv)
                value = loss_fn(logits, ya)
            wrong = logits.argmax(1) != ya
            take = wrong | (value.detach() > best_loss[act])
            best[act[take]] = x_adv.detach()[take]
            best_loss[act[take]] = value.detach()[take]
            fooled[act[wrong]] = True
            if i == steps or wrong.all():
                break
            (g,) = torch.autograd.grad(value.sum(), x_adv)
            keep = ~wrong
            size_i = step_size_at(size, i, steps, schedule)
            x_adv = step(xa[keep], x_adv.detach()[keep], g[keep], size_i, eps, norm)
            act, xa, ya = act[keep], xa[keep], ya[keep]
        if fooled.all():
            break
    return best, fooled


def pgd_at(model, x, y, eps, steps=3, smoothing=0.1):
    """The adversarial-training baseline as an objective (model, x, y, ...) -> (loss, terms): CE on
    PGD-k examples (random start, step 2*eps/k), the last iterate."""
    x_adv = pgd(model, x, y, eps, steps, 2 * eps / steps)
    ce = F.cross_entropy(model(x_adv), y, label_smoothing=smoothing)
    return ce, {'ce_adv': ce}
