"""L-inf attacks on images in [0,1]: PGD (CE, margin or DLR loss, restarts), PGD-k and FGSM-RS adversarial
training, and AutoAttack and Square from the authors' reference code (pyautoattack, imported when called).
Copy alone: needs only torch (tested with 2.14.1); pass x in [0,1], the model normalizing inside.
evaluate.py builds on it."""
import hashlib
import json
import logging
import os
import sys
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F

# ---------------------------------------------------------------- losses (per sample, maximized)

def ce_loss(logits, y):
    return F.cross_entropy(logits.float(), y, reduction='none')


def margin_loss(logits, y):
    """Carlini-Wagner's margin, best wrong logit minus the true one (> 0 when fooled): it never saturates."""
    z = logits.float()
    other = z.scatter(1, y[:, None], float('-inf')).amax(1)
    return other - z.gather(1, y[:, None]).squeeze(1)


def dlr_loss(logits, y):
    """Croce & Hein's DLR: the margin over z_(1) - z_(3) of the sorted logits, blind to logit scaling."""
    if logits.shape[1] < 3:
        raise ValueError('the DLR loss needs at least 3 classes: use the margin loss (margin-STEPS)')
    s = logits.float().sort(1, descending=True).values
    return margin_loss(logits, y) / (s[:, 0] - s[:, 2] + 1e-12)


LOSSES = {'ce': ce_loss, 'margin': margin_loss, 'dlr': dlr_loss}


def inside(x_adv, x, eps):
    """Per sample: in the eps-ball around x (up to float rounding) and in [0,1]: never trust, verify."""
    flat, gap = x_adv.flatten(1), (x_adv - x).flatten(1).abs().amax(1)
    return (gap <= eps * (1 + 1e-5) + 1e-6) & (flat.amin(1) >= 0) & (flat.amax(1) <= 1)


def step(x, x_adv, grad, size, eps):
    """Steepest L-inf ascent (the gradient's sign), back into the ball, then [0,1] (which only shrinks it)."""
    return (x + (x_adv + size * grad.sign() - x).clamp(-eps, eps)).clamp(0, 1)


def pgd(model, x, y, eps, steps, step_size=None, random_start=True, keep_best=False, loss='ce',
        restarts=1, max_loss=False):
    """PGD in the eps-ball around x and [0,1]; step_size defaults to 2.5*eps/steps.

    keep_best=False (training): the last iterate of one run; max_loss=True adds each sample's highest
    loss over the iterates. keep_best=True (evaluation): -> (x_adv, fooled), fooled if the clean input
    or any iterate of any restart was misclassified, x_adv that point or else the highest-loss one.
    Restarts and later steps attack only the samples still standing: the same result, cheaper."""
    if loss not in LOSSES:
        raise ValueError(f'unknown attack loss {loss!r}; choose one of {", ".join(LOSSES)}')
    loss_fn, size, x = LOSSES[loss], step_size or 2.5 * eps / steps, x.detach()

    def start(x0):  # a uniform random point of the ball (clipped to [0,1]), or x0 itself
        return (x0 + torch.empty_like(x0).uniform_(-eps, eps)).clamp(0, 1) if random_start else x0.clone()

    if not keep_best:
        x_adv, top = start(x), torch.full((len(x),), float('-inf'), device=x.device)
        for _ in range(steps):
            with torch.enable_grad():  # the attack needs input gradients, even called under no_grad
                x_adv.requires_grad_(True)
                value = loss_fn(model(x_adv), y)
                (g,) = torch.autograd.grad(value.sum(), x_adv)
            if max_loss:
                top = torch.maximum(top, value.detach())
            x_adv = step(x, x_adv.detach(), g, size, eps)
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
        x_adv = start(xa)
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
            x_adv = step(xa[keep], x_adv.detach()[keep], g[keep], size, eps)
            act, xa, ya = act[keep], xa[keep], ya[keep]
        if fooled.all():
            break
    return best, fooled


def pgd_at(model, x, y, eps, steps=3, smoothing=0.1):
    """The adversarial-training baseline: CE on PGD-k examples (random start, step 2*eps/k)."""
    x_adv = pgd(model, x, y, eps, steps, 2 * eps / steps)
    ce = F.cross_entropy(model(x_adv), y, label_smoothing=smoothing)
    return ce, {'ce_adv': ce.detach()}


def fgsm_at(model, x, y, eps, smoothing=0.1):
    """FGSM-RS adversarial training (Wong, Rice & Kolter 2020, "Fast is better than free"): a uniform
    random start in the eps-ball, one signed-gradient step of 1.25*eps back into the ball and [0,1]
    (PGD-1 with that step), then CE on the result."""
    x_adv = pgd(model, x, y, eps, 1, 1.25 * eps)
    ce = F.cross_entropy(model(x_adv), y, label_smoothing=smoothing)
    return ce, {'ce_adv': ce.detach()}


def loss_gain(model, x, y, eps, loss, steps=10):
    """'The loss must rise along the attack' (Carlini et al. 2019): PGD from the clean image (no random
    start) on the correctly classified ones. -> (how many images, how many end with a higher loss)"""
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    x, y = x[ok], y[ok]
    x_adv = pgd(model, x, y, eps, steps, random_start=False, loss=loss)
    with torch.no_grad():
        gain = LOSSES[loss](model(x_adv), y) - LOSSES[loss](model(x), y)
    return len(y), (gain > 0).sum().item()


# ---------------------------------------------------------------- AutoAttack and Square (pyautoattack)

VERSION = 'standard'  # APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square (5,000 queries)


@contextmanager
def aa_logs():
    """pyautoattack's warnings (its checks), collected instead of printed; its progress is dropped."""
    logger, handler, messages = logging.getLogger('auto-attack'), logging.Handler(logging.WARNING), []
    handler.emit = lambda record: messages.append(record.getMessage())
    old = logger.propagate, logger.level
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.WARNING)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = old[0]
        logger.setLevel(old[1])


def write_json(path, obj, **kw):
    """obj as JSON at path, atomically (a temporary file renamed over it, removed if that fails)."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'w') as f:
            json.dump(obj, f, **kw)
        os.replace(tmp, path)
    except BaseException:  # OSError from json and the file system; a stop signal too
        if os.path.isfile(tmp):
            os.remove(tmp)
        raise


def _digest(saved):
    content = json.dumps([saved.get('key'), saved.get('done')], sort_keys=True)
    return hashlib.sha256(content.encode()).hexdigest()


class State:
    """AutoAttack's progress on disk: the images standing per (eps, batch, component), rewritten after each
    step with a digest. A run with the same key resumes; a damaged file warns and starts afresh.
    (pyautoattack 0.2.0's own state_path cannot be restored: it compares a set with a JSON list.)"""

    def __init__(self, path, key):
        self.path, self.key, self.done = path, key, {}
        try:
            with open(path) as f:
                saved = json.load(f)
            if not isinstance(saved, dict) or saved.get('sha256') != _digest(saved):
                raise ValueError('its content does not match its digest')
            if saved['key'] == key:
                self.done = saved['done']
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:  # UnicodeDecodeError and JSON's errors are ValueErrors
            print(f'warning: {path}: damaged ({type(e).__name__}: {e}): starting AutoAttack afresh',
                  file=sys.stderr, flush=True)
        self.resumed = len(self.done)

    def get(self, eps, batch, component):
        """The images standing after component (bool tensor), or None if not recorded."""
        bits = self.done.get(f'{eps:.10g}/{batch}/{component}')
        return None if bits is None else torch.tensor([b == '1' for b in bits])

    def put(self, eps, batch, component, standing):
        self.done[f'{eps:.10g}/{batch}/{component}'] = ''.join('1' if s else '0' for s in standing.tolist())
        saved = {'key': self.key, 'done': self.done}
        write_json(self.path, {**saved, 'sha256': _digest(saved)})

    def remove(self):
        if os.path.exists(self.path):
            os.remove(self.path)


def summed(values, device):
    """values (numbers) summed over the torchrun ranks, as floats."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        t = t.to(device)  # NCCL reduces GPU tensors only
        dist.all_reduce(t)
    return t.tolist()


def fooled_at(model, x, y, x_adv, eps):
    """Fooled only if the point is in the eps-ball and [0,1] and misclassified by the model as it is."""
    with torch.no_grad():
        wrong = model(x_adv).argmax(1) != y
    return wrong & inside(x_adv, x, eps)


def autoattack(model, batches, eps, seed=0, state=None, components=None, progress=None):
    """AutoAttack's standard version (components: a subset, for tests), each component on what the
    earlier ones left standing, run per component and batch so `state` records each step; under
    torchrun each rank passes its shard. -> {'n', 'after': {'clean' and each component: accuracy},
    'standing': {same keys: bool tensor over this rank's images}, 'warnings': [all ranks']}"""
    from pyautoattack import AutoAttack, checks
    aa, standing, invalid, device = None, {}, 0, torch.device('cpu')
    with aa_logs() as messages:
        for b, (x, y) in enumerate(batches):
            # AutoAttack .view()s its gradients: channels_last breaks that
            x, device = x.contiguous(), x.device
            if aa is None:
                aa = AutoAttack(model, norm='Linf', eps=eps, version=VERSION, seed=seed, device=x.device)
                names = list(components or aa.attacks_to_run)
            with torch.no_grad():
                alive = model(x).argmax(1) == y
            standing.setdefault('clean', []).append(alive.cpu())
            for c in names:
                done = state.get(eps, b, c) if state else None
                if done is not None:
                    alive = done.to(alive.device)
                elif alive.any():
                    idx = alive.nonzero().squeeze(1)
                    aa.attacks_to_run = [c]
                    trace = sys.gettrace()  # AutoAttack's dynamic-defense check ends in sys.settrace(None),
                    x_adv, y_adv = aa.run_standard_evaluation(x[idx], y[idx], batch_size=len(idx))
                    sys.settrace(trace)  # which would switch a debugger or coverage off for good
                    fooled = fooled_at(model, x[idx], y[idx], x_adv, eps)
                    alive, invalid = alive.clone(), invalid + int(((y_adv != y[idx]) & ~fooled).sum())
                    alive[idx[fooled]] = False
                if done is None and state:
                    state.put(eps, b, c, alive)
                standing.setdefault(c, []).append(alive.cpu())
                if progress:
                    progress(b, c, int(alive.sum()), len(y), done is not None)
        standing = {k: torch.cat(v) for k, v in standing.items()}
        stood = [v.sum().item() for v in standing.values()]
        counts = summed([len(standing['clean'])] + stood + [invalid], device)
        after = {k: c / counts[0] for k, c in zip(standing, counts[1:])}
        checks.check_square_sr(after, logger=logging.getLogger('auto-attack'))
        warnings = list(messages)
    if counts[-1]:
        warnings.append(f'{int(counts[-1])} points AutoAttack called adversarial are outside the eps-ball or '
                        '[0,1] or classified correctly when checked: counted as robust')
    if dist.is_initialized():
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, warnings)
        warnings = [w for ws in every for w in ws]
    return {'n': int(counts[0]), 'after': after, 'standing': standing, 'warnings': warnings}


def aa_checks(warnings):
    """AutoAttack's own checks (pyautoattack/checks.py: randomness, logits not probabilities, gradients
    inside the forward, zero gradients, Square's gain), from the warnings it logged -> [(ok, message)]."""
    if not warnings:
        return [(True, "AutoAttack's own checks: no warning")]
    return [(False, f'AutoAttack: {w}') for w in dict.fromkeys(warnings)]


def square_broken(model, batches, standing, eps, queries=1000, seed=0):
    """pyautoattack's Square on the images `standing` marks -> bool tensor: those it fooled (verified)."""
    from pyautoattack.square import SquareAttack
    sq, parts, start = None, [], 0
    for x, y in batches:
        keep = standing[start:start + len(y)].to(x.device)
        start += len(y)
        hit = torch.zeros_like(keep)
        if keep.any():
            sq = sq or SquareAttack(model, norm='Linf', n_queries=queries, eps=eps, seed=seed,
                                    device=x.device)
            x_adv = sq.perturb(x[keep].contiguous(), y[keep])
            hit[keep] = fooled_at(model, x[keep], y[keep], x_adv, eps)
        parts.append(hit.cpu())
    return torch.cat(parts) if parts else torch.zeros_like(standing)


def square_check(model, batches, gradient_standing, eps, queries=1000, seed=0, aa=None, slack_images=2,
                 slack_share=0.01):
    """A gradient-free attack must not break images every gradient attack failed on (Carlini et al. 2019).
    gradient_standing: this rank's images robust to every PGD attack. With an AutoAttack result (aa) its
    own Square run is used, else square_broken runs. -> (ok, message)"""
    before = gradient_standing
    if aa and 'square' in aa['standing']:
        names = list(aa['standing'])
        before = gradient_standing & aa['standing'][names[names.index('square') - 1]]
        broken, queries = before & ~aa['standing']['square'], 5000
    else:
        broken = square_broken(model, batches, before, eps, queries, seed)
    device = batches[0][0].device if batches else torch.device('cpu')
    attacked, fooled = summed([before.sum().item(), broken.sum().item()], device)
    allowed = max(slack_images, slack_share * attacked)
    rule = f'allowed {allowed:.3g}, the larger of {slack_images} and {slack_share:.0%}'  # 6.97 is not 7
    return fooled <= allowed, (f'Square ({queries} queries, no gradients) broke {fooled:.0f} of the '
                               f'{attacked:.0f} images every gradient attack failed on ({rule}; more: masked '
                               'gradients)')
