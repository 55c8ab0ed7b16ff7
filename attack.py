"""PGD and an evaluator you can trust: L-inf and L2, restarts, CE / margin / DLR losses, the worst
case per sample over steps, restarts and attacks, checks that flag gradient masking, and AutoAttack
(autoattack_eval.py), the number to report.

    python attack.py --ckpt runs/fashion-mnist/resnet_demo_pool-gradnorm-gelu/ckpt.pt --eps 0.05 0.1 --autoattack
    torchrun --nproc_per_node=8 attack.py --ckpt imagenet.pt   # 4/255, 5,000 images, AutoAttack; ranks summed
    python attack.py --ckpt official:gradnorm_swinb.pth.tar --model swin_base_patch4_window7_224 --data IMAGENET
The last evaluates a checkpoint the authors released (its EMA weights, as the paper).
An attack is LOSS-STEPS[xRESTARTS]: ce-20, dlr-50x2, margin-100. PGD is fast and an upper bound on
robust accuracy; AutoAttack is what the paper, RobustBench and readers compare.
"""
import argparse
import math
import os
import sys
import time
from fractions import Fraction

import torch
import torch.distributed as dist
import torch.nn.functional as F

from config import (ArgumentParser, Config, UserError, checked, cli, data_kind, end_distributed, load_checkpoint,
                    load_official, model_from_checkpoint, setup_distributed)
from models import ACTS, is_model
from autoattack_eval import VERSION, State, StateError, aa_checks, autoattack, square_check, write_json
from data import data_shape, make_loaders


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
        raise UserError('the DLR loss needs at least 3 classes: use the margin loss (margin-STEPS)')
    s = logits.float().sort(1, descending=True).values
    return margin_loss(logits, y) / (s[:, 0] - s[:, 2] + 1e-12)


LOSSES = {'ce': ce_loss, 'margin': margin_loss, 'dlr': dlr_loss}


# ---------------------------------------------------------------- threat models

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
    raise UserError(f'unknown step-size schedule {schedule!r}: use constant or cosine')


# ---------------------------------------------------------------- PGD

def pgd(model, x, y, eps, steps, step_size=None, random_start=True, keep_best=False,
        norm='linf', loss='ce', restarts=1, schedule='constant'):
    """PGD on inputs in [0,1]; every point returned is in the eps-ball around x and in [0,1].

    keep_best=False (adversarial training): one run, the last iterate, one forward and one
    backward per step. keep_best=True (evaluation): returns (x_adv, fooled). A sample counts as
    fooled if the clean input or any iterate of any restart was misclassified; x_adv is that
    point, else the highest-loss point seen. Restarts and later steps attack only the samples
    still standing, which changes nothing but the cost. step_size defaults to 2.5*eps/steps."""
    if norm not in ('linf', 'l2'):
        raise UserError(f'unknown norm {norm!r}: use linf or l2')
    if loss not in LOSSES:
        raise UserError(f'unknown attack loss {loss!r}; choose one of {", ".join(LOSSES)}')
    loss_fn, size, x = LOSSES[loss], step_size or 2.5 * eps / steps, x.detach()
    if not keep_best:
        x_adv = (x + random_delta(x, eps, norm)).clamp(0, 1) if random_start else x.clone()
        for i in range(steps):
            x_adv.requires_grad_(True)
            (g,) = torch.autograd.grad(loss_fn(model(x_adv), y).sum(), x_adv)
            x_adv = step(x, x_adv.detach(), g, step_size_at(size, i, steps, schedule), eps, norm)
        return x_adv.detach()

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
                l = loss_fn(logits, ya)
            wrong = logits.argmax(1) != ya
            take = wrong | (l.detach() > best_loss[act])
            best[act[take]] = x_adv.detach()[take]
            best_loss[act[take]] = l.detach()[take]
            fooled[act[wrong]] = True
            if i == steps or wrong.all():
                break
            (g,) = torch.autograd.grad(l.sum(), x_adv)
            keep = ~wrong
            x_adv = step(xa[keep], x_adv.detach()[keep], g[keep], step_size_at(size, i, steps, schedule), eps, norm)
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


# ---------------------------------------------------------------- evaluator

def parse_attack(spec):
    """'dlr-50x2' -> ('dlr', 50, 2)"""
    try:
        loss, _, rest = spec.partition('-')
        steps, _, restarts = rest.partition('x')
        a = (loss, int(steps), int(restarts or 1))
        assert loss in LOSSES and a[1] > 0 and a[2] > 0
        return a
    except (ValueError, AssertionError):
        raise UserError(f'cannot read attack {spec!r}: write LOSS-STEPS[xRESTARTS] with LOSS in '
                        f'{"/".join(LOSSES)}, e.g. ce-20 or dlr-50x2') from None


def forward_fn(model, compile=False, bf16=False):
    """The model's forward, optionally compiled (AOTAutograd compiles its backward too) and in
    bf16 autocast; losses are computed in float32 either way."""
    fwd = torch.compile(model, dynamic=True) if compile else model
    if not bf16:
        return fwd

    def autocast_fwd(x):
        with torch.autocast(x.device.type, torch.bfloat16):
            return fwd(x)
    return autocast_fwd


def _attack(fwd, x, y, eps, spec, norm, schedule, step_size):
    """One attack of the evaluator; -> fooled (bool per sample), after checking every point."""
    loss, steps, restarts = spec
    if not len(x):
        return torch.zeros_like(y, dtype=torch.bool)
    x_adv, fooled = pgd(fwd, x, y, eps, steps, step_size and step_size * eps, keep_best=True,
                        norm=norm, loss=loss, restarts=restarts, schedule=schedule)
    d = distance(x_adv, x, norm).max().item()
    if d > eps * (1 + 1e-5) + 1e-6 or x_adv.min() < 0 or x_adv.max() > 1:  # never trust, verify
        raise RuntimeError(f'attack left the eps-ball or [0,1]: distance {d} > eps {eps}')
    return fooled


UNBOUNDED = ('ce-10', 'margin-10')  # at an eps where any image can become any other


def loss_gain(model, x, y, eps, loss, steps=10, norm='linf'):
    """'The loss must increase along the attack' (Carlini et al. 2019): PGD-steps from the clean
    image, no random start (so a zero gradient leaves the image where it is), on the correctly
    classified images. -> (how many images, how many end with a higher loss than they started)"""
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    x, y = x[ok], y[ok]
    x_adv = pgd(model, x, y, eps, steps, random_start=False, norm=norm, loss=loss)
    with torch.no_grad():
        gain = LOSSES[loss](model(x_adv), y) - LOSSES[loss](model(x), y)
    return len(y), (gain > 0).sum().item()


def evaluate(model, batches, eps_list, attacks=('ce-20',), norm='linf', schedule='constant',
             step_size=None, checks=False, chain=False, compile=False, bf16=False, gain_n=256):
    """Clean accuracy and, per eps, robust accuracy per attack and the worst case over attacks (per
    sample: robust only if every attack failed). chain=True: each attack attacks only what the
    earlier ones left standing (cheaper; each attack's number is then 'after it and those before').
    checks=True adds what the masking checks need: UNBOUNDED attacks at an eps that reaches every
    image, and loss_gain per loss on the first gain_n images at the largest eps. Under torchrun each
    rank passes its shard and the counts are summed.
    -> {'n', 'clean', 'robust': {eps: {attack: acc, 'worst': acc}}, 'standing': {eps: bool tensor over
    this rank's images, robust to every attack}, 'unbounded': {'eps', attack: acc}, 'gain': {loss: (n, rose)}}"""
    specs = [parse_attack(a) for a in attacks]
    was_training, grads = model.training, [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)  # no dropout or batch statistics; input gradients only
    fwd = forward_fn(model, compile, bf16)
    losses = list(dict.fromkeys(s[0] for s in specs)) if checks else []
    keys = ['n', 'clean'] + [(e, a) for e in eps_list for a in list(attacks) + ['worst']] \
        + [('unbounded', a) for a in (UNBOUNDED if checks else ())] + [(g, l) for l in losses for g in ('gain_n', 'gain')]
    counts, standing, big = dict.fromkeys(keys, 0.0), {e: [] for e in eps_list}, None
    for b, (x, y) in enumerate(batches):
        with torch.no_grad():
            counts['n'] += len(y)
            counts['clean'] += (fwd(x).argmax(1) == y).sum().item()
        for eps in eps_list:
            alive = torch.ones_like(y, dtype=torch.bool)
            for a, spec in zip(attacks, specs):
                idx = alive.nonzero().squeeze(1) if chain else torch.arange(len(y), device=y.device)
                robust = torch.zeros_like(alive)
                robust[idx] = ~_attack(fwd, x[idx], y[idx], eps, spec, norm, schedule, step_size)
                counts[(eps, a)] += robust.sum().item()
                alive &= robust
            counts[(eps, 'worst')] += alive.sum().item()
            standing[eps].append(alive.cpu())
        big = 1.0 if norm == 'linf' else math.sqrt(x[0].numel())  # the whole cube: its side, its diagonal
        for a in UNBOUNDED if checks else ():
            counts[('unbounded', a)] += (~_attack(fwd, x, y, big, parse_attack(a), norm, 'constant', None)).sum().item()
        for l in losses if b == 0 else ():
            counts[('gain_n', l)], counts[('gain', l)] = loss_gain(fwd, x[:gain_n], y[:gain_n], max(eps_list), l, norm=norm)
    model.train(was_training)
    for p, g in zip(model.parameters(), grads):
        p.requires_grad_(g)
    total = torch.tensor([counts[k] for k in keys], dtype=torch.float64)
    if dist.is_initialized():
        total = total.to(next(model.parameters()).device)  # NCCL reduces GPU tensors only
        dist.all_reduce(total)
    c = dict(zip(keys, total.tolist()))
    acc = lambda k: c[k] / c['n']
    return {'n': int(c['n']), 'clean': acc('clean'),
            'robust': {e: {a: acc((e, a)) for a in list(attacks) + ['worst']} for e in eps_list},
            'standing': {e: torch.cat(v) if v else torch.zeros(0, dtype=torch.bool) for e, v in standing.items()},
            'unbounded': {'eps': big, **{a: acc(('unbounded', a)) for a in UNBOUNDED}} if checks else None,
            'gain': {l: (int(c[('gain_n', l)]), int(c[('gain', l)])) for l in losses} if checks else None}


def robust_accuracy(model, batches, eps_list, steps):
    """The per-epoch number in training: clean accuracy and the worst case of CE and margin PGD-steps
    (one restart each, step 2.5*eps/steps, the margin attack on what CE left standing). Fast, and an
    upper bound: AutoAttack (attack.py --autoattack) is the number to report.
    -> {'n', 'clean', 'robust': {eps: acc}}"""
    r = evaluate(model, batches, eps_list, [f'ce-{steps}', f'margin-{steps}'], chain=True)
    return {'n': r['n'], 'clean': r['clean'], 'robust': {e: r['robust'][e]['worst'] for e in eps_list}}


def sanity_checks(result, attacks, gap=0.1, slack_images=2, min_gain=0.95):
    """Symptoms of gradient masking (Carlini et al. 2019), each -> (ok, message). Attacks at different
    eps or with different steps are independent random runs, so a weaker one can win by an image or
    two through luck: comparisons tolerate slack_images; more than that means do not trust."""
    eps_list, out, slack = sorted(result['robust']), [], slack_images / result['n'] + 1e-12
    acc = lambda e, a: result['robust'][e][a]
    for name in list(attacks) + ['worst']:
        bad = [(a, b) for a, b in zip(eps_list, eps_list[1:]) if acc(b, name) > acc(a, name) + slack]
        out.append((not bad, f'{name}: robust accuracy never increases with eps'
                    + (f' (it does from eps {bad[0][0]:.4g} to {bad[0][1]:.4g})' if bad else '')))
    if result.get('unbounded'):
        u = result['unbounded']
        out.append((all(u[a] <= slack for a in UNBOUNDED), f'unbounded eps {u["eps"]:.4g} (any image can become any '
                    f'other): ' + ', '.join(f'{a} {100 * u[a]:.1f}%' for a in UNBOUNDED) + f', must reach 0 '
                    f'(allowed {slack_images} images)'))
    for loss, (n, rose) in (result.get('gain') or {}).items():
        out.append((rose >= min_gain * n, f'{loss} loss rises along PGD-10 from the clean image on {rose} of {n} '
                    f'correctly classified images (needs {100 * min_gain:.0f}%; else the gradient does not lead up)'))
    specs = {a: parse_attack(a) for a in attacks}
    for a in attacks:
        for b in attacks:
            (la, sa, ra), (lb, sb, rb) = specs[a], specs[b]
            if a != b and la == lb and sb >= sa and rb >= ra:
                worse = [e for e in eps_list if acc(e, b) > acc(e, a) + slack]
                out.append((not worse, f'{b} (more steps/restarts) <= {a} at every eps'
                            + (f' (not at {worse[0]:.4g})' if worse else '')))
    ce = [a for a in attacks if specs[a][0] == 'ce']
    mg = [a for a in attacks if specs[a][0] != 'ce']
    if ce and mg:
        d = max(min(acc(e, a) for a in ce) - min(acc(e, a) for a in mg) for e in eps_list)
        out.append((d <= gap, f'margin/DLR attacks at most {100 * gap:.0f} points stronger than CE '
                    f'(largest gap {100 * d:.1f}; a big gap means CE gradients are masked)'))
    return out


def parse_eps(text):
    """'4/255' -> 0.01568..., '0.1' -> 0.1"""
    try:
        return float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise UserError(f'cannot read eps {text!r}: write it like 0.1 or 4/255') from None


# ---------------------------------------------------------------- the command

def parse_args(argv):
    nonneg, positive = checked(int, lambda v: v >= 0, 'an integer >= 0'), checked(int, lambda v: v >= 1, 'at least 1')
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ckpt', required=True, help="a checkpoint of ours, or official:PATH (the authors' .pth.tar)",
                   type=checked(str, lambda v: os.path.isfile(v.removeprefix('official:')), 'an existing checkpoint file'))
    p.add_argument('--model', type=checked(str, is_model, 'a model of models.py or timm'), default=None,
                   help='with official:PATH, its timm model: swin_base_patch4_window7_224 or timm/resnet50')
    p.add_argument('--act', choices=list(ACTS), default='gelu', help='with official:PATH, the activation (GELU: as released)')
    p.add_argument('--eps', nargs='+', default=None, type=checked(str, lambda t: 0 < parse_eps(t) < math.inf, 'positive'),
                   help='budgets in pixel units, e.g. 0.1 or 4/255 (default: 4/255 on ImageNet, else the training eps)')
    p.add_argument('--norm', default='linf', choices=['linf', 'l2'])
    p.add_argument('--attacks', nargs='+', default=['ce-20', 'dlr-20', 'ce-50x2'], help='LOSS-STEPS[xRESTARTS]',
                   type=checked(parse_attack_text, bool, 'LOSS-STEPS[xRESTARTS], e.g. ce-20 or dlr-50x2'))
    p.add_argument('--steps', type=positive, default=None, help='shorthand for --attacks ce-STEPS')
    p.add_argument('--schedule', default='constant', choices=['constant', 'cosine'])
    p.add_argument('--step-size', type=checked(float, lambda v: 0 < v <= 10, 'in (0, 10]'), default=None,
                   help='as a fraction of eps (default 2.5/steps)')
    p.add_argument('--autoattack', action=argparse.BooleanOptionalAction, default=None,
                   help='AutoAttack (standard version) after the PGD attacks (default: on ImageNet only)')
    p.add_argument('--n', '--images', dest='n', type=positive, default=None,
                   help='first n validation images (default 5000 on ImageNet, else 1000); torchrun takes --n as its own')
    p.add_argument('--data', default=None, type=checked(str, os.path.isdir, 'an existing folder'),
                   help='data path (default: the one used in training)')
    p.add_argument('--weights', default='auto', choices=['auto', 'model', 'ema'],
                   help='auto: the EMA weights if the run kept them, else the model\'s')
    p.add_argument('--json', default=None, help='write the results here (default: next to the checkpoint)',
                   type=checked(str, lambda v: os.path.isdir(os.path.dirname(os.path.abspath(v))), 'in an existing folder'))
    p.add_argument('--seed', type=nonneg, default=0)
    p.add_argument('--compile', default='auto', choices=['auto', 'on', 'off'], help='auto = on CUDA only')
    p.add_argument('--bf16', action='store_true', help='bf16 autocast (CUDA)')
    p.add_argument('--square-queries', type=nonneg, default=1000,
                   help='Square queries of the masking check when AutoAttack is off (0: skip it)')
    p.add_argument('--no-checks', action='store_true', help='skip the gradient-masking checks')
    args = p.parse_args(argv)
    args.attacks = [f'ce-{args.steps}'] if args.steps else args.attacks
    if args.ckpt.startswith('official:') != bool(args.model):
        raise UserError('--model names the timm model of an official:PATH checkpoint (ours name their own): '
                        + ('pass --model=swin_base_patch4_window7_224 or --model=timm/resnet50' if args.model is None
                           else 'leave it out'))
    if args.weights == 'model' and args.ckpt.startswith('official:'):  # checked before loading a large file
        raise UserError('an official checkpoint is evaluated with its EMA weights, as the paper: leave out --weights')
    if args.model and not args.data:
        raise UserError('official checkpoints do not name their data: pass --data=IMAGENET (an ImageFolder or .beton folder)')
    if args.norm == 'linf' and args.eps and max(map(parse_eps, args.eps)) > 1:
        raise UserError(f'--eps {max(args.eps, key=parse_eps)}: an L-inf budget above 1 is larger than the whole '
                        'pixel range [0, 1]')
    return args


def parse_attack_text(spec):
    parse_attack(spec)
    return spec


def resolve(args, ck, official=False):
    """The defaults that depend on the checkpoint. ImageNet (1000 classes): the paper's and
    RobustBench's protocol, L-inf 4/255 on RobustBench's 5,000 val images (data.py picks them) with
    AutoAttack's standard version; elsewhere the training eps on the first 1,000 test images.
    Weights: the EMA weights whenever the run kept them (the authors' checkpoints: always)."""
    imagenet, has_ema = ck['data_info'].get('num_classes') == 1000, official or ck.get('ema') is not None
    args.eps = args.eps or (['4/255'] if imagenet else [f'{ck["config"]["eps"]:g}'])
    args.n = args.n or (5000 if imagenet else 1000)
    args.autoattack = imagenet if args.autoattack is None else args.autoattack
    if args.weights == 'ema' and not has_ema:
        raise UserError(f'{args.ckpt} holds no EMA weights (trained with --ema=0): leave out --weights=ema')
    if args.weights == 'auto':
        args.weights = 'ema' if has_ema else 'model'
    return args


def check_data(path, ck, info, data, subset=False):
    """UserError unless the data are what the checkpoint's model was built for (classes, channels).
    subset: fewer classes may do (the authors' ImageNet-1k models on a folder of some of its classes)."""
    want = {k: ck['data_info'].get(k) for k in ('num_classes', 'in_ch')}
    have = {k: info[k] for k in want}
    n_here, n_trained = have['num_classes'], want['num_classes']
    if want['in_ch'] != have['in_ch'] or not (n_here <= n_trained if subset else n_here == n_trained):
        trained, here = (f'{d["num_classes"]} classes of {d["in_ch"]}-channel images' for d in (want, have))
        raise UserError(f'{path} was trained on {trained}, {data} has {here}: pass the data it was '
                        'trained on (--data=DIR)')


def load(args, rank, world, device):
    """-> the checkpoint, its model on the device (eval mode, no parameter gradients), this rank's
    robust-val batches (copies: FFCV reuses its buffers), data info. args.n becomes the number of
    images there are, if it was more."""
    n_flag = '--n' if args.n else None  # before resolve fills in the default
    if args.ckpt.startswith('official:'):  # the authors release and evaluate their EMA weights
        ck, model = load_official(ckpt_path(args), args.model, args.act)
        resolve(args, ck, official=True)
    else:
        ck = load_checkpoint(args.ckpt)
        resolve(args, ck)
        model = model_from_checkpoint(ck, args.weights, args.ckpt)
    model = model.to(device).eval().requires_grad_(False)
    cfg = Config(**{**ck['config'], 'eval_n': args.n})
    cfg.data = args.data or cfg.data
    if args.model:  # official: read ImageNet as it is stored
        cfg.loader = 'ffcv' if data_kind(cfg.data) == 'beton' else 'torchvision'
    if not os.path.isdir(cfg.data):
        raise UserError(f'{args.ckpt} was trained on {cfg.data}, which is not here: pass --data=DIR')
    check_data(args.ckpt, ck, data_shape(cfg.data), cfg.data, subset=bool(args.model))
    threads = torch.get_num_threads()
    _, _, robust_val, info = make_loaders(cfg, rank, world, device, n_flag, from_checkpoint=True)
    args.n = cfg.eval_n
    batches = [(x.clone(), y.clone()) for x, y in robust_val]
    torch.set_num_threads(threads)  # FFCV sets torch's threads to its worker count (ffcv/pipeline/compiler.py)
    return ck, model, batches, info


def ckpt_path(args):
    return args.ckpt.removeprefix('official:')


def json_path(args):
    return args.json or os.path.join(os.path.dirname(ckpt_path(args)) or '.', f'eval_{args.norm}.json')


def state_path(args, rank):
    return f'{os.path.splitext(json_path(args))[0]}.autoattack-rank{rank}.json'


def check_outputs(args, rank):
    """Before any work: the results and AutoAttack's state can be written where they go (not into
    a missing or read-only folder, nor where a folder stands)."""
    for path in (json_path(args), state_path(args, rank)):
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            why = 'a folder is in its place'
        elif not os.path.isdir(folder):
            why = f'there is no folder {folder}'
        elif not os.access(folder, os.W_OK):
            why = f'{folder} is read-only'
        else:
            continue
        raise UserError(f'cannot write {path} ({why}): pass --json=FILE in a writable folder '
                        "(AutoAttack's resume state goes next to it)")


def run_autoattack(args, fwd, batches, eps_list, r, rank, world):
    """Per eps: AutoAttack (if asked) and the Square check on what every gradient attack left.
    -> ({eps: AutoAttack result}, {eps: (ok, message)}, the resume state: remove it once reported)"""
    state = None
    if args.autoattack:
        from pyautoattack import __version__ as aa_version
        key = dict(ckpt=os.path.abspath(ckpt_path(args)), size=os.path.getsize(ckpt_path(args)),
                   mtime=os.path.getmtime(ckpt_path(args)),
                   weights=args.weights, norm=args.norm, n=args.n, world=world, seed=args.seed, bf16=args.bf16,
                   data=args.data, pyautoattack=aa_version)
        state = State(state_path(args, rank), key)
    if state and state.resumed and rank == 0:
        print(f'AutoAttack: resuming from {state.path} ({state.resumed} steps done)')
    aa, square, t0 = {}, {}, time.time()
    for eps, text in zip(eps_list, args.eps):
        progress = lambda b, c, left, n, resumed, text=text: rank == 0 and print(
            f'  autoattack eps {text} batch {b + 1}/{len(batches)} {c:8} {left:5} of {n} standing '
            f'({"resumed" if resumed else f"{time.time() - t0:.0f} s"})', flush=True)
        if args.autoattack:
            try:
                aa[eps] = autoattack(fwd, batches, eps, args.norm, args.seed, state, progress=progress)
            except StateError as e:
                raise UserError(f'{e}: free some space or pass --json=FILE elsewhere (the state goes next to '
                                'it), then run again: it resumes') from None
        if not args.no_checks and (args.autoattack or args.square_queries):
            square[eps] = square_check(fwd, batches, r['standing'][eps], eps, args.norm, args.square_queries,
                                       args.seed, aa.get(eps))
    return aa, square, state


def report(args, r, checks, aa, ck, eps_list, seconds, compiled):
    c = ck['config']
    weights = 'EMA weights' if args.weights == 'ema' else 'model weights' + (' (the run kept EMA weights too)'
                                                                              if ck.get('ema') is not None else '')
    print(f'{args.ckpt}: {c["objective"]} {c["model"]}/{c["act"]} | {weights} | eval mode | {r["n"]} images | '
          f'{args.norm} | seed {args.seed} | {seconds:.0f} s{" | bf16" if args.bf16 else ""}{" | compiled" if compiled else ""}')
    names = args.attacks + ['worst']
    print(f'PGD: {"eps":>8} {"clean":>7} ' + ' '.join(f'{a:>8}' for a in names))
    for e, t in zip(eps_list, args.eps):
        print(f'     {t:>8} {100 * r["clean"]:7.1f} ' + ' '.join(f'{100 * r["robust"][e][a]:8.1f}' for a in names))
    if aa:
        comps = list(next(iter(aa.values()))['after'])
        print(f'AutoAttack {VERSION} (pyautoattack), robust accuracy after each component, which attacks what the '
              f'earlier ones left:\n     {"eps":>8} ' + ' '.join(f'{k:>8}' for k in comps) + ' | PGD worst    gap')
        for e, t in zip(eps_list, args.eps):
            worst, final = r['robust'][e]['worst'], aa[e]['after'][comps[-1]]
            print(f'     {t:>8} ' + ' '.join(f'{100 * aa[e]["after"][k]:8.1f}' for k in comps)
                  + f' | {100 * worst:9.1f} {100 * (worst - final):6.1f}')
    for ok, msg in checks:
        print(f'  {"ok  " if ok else "FLAG"} {msg}')
    path, result = json_path(args), {
        'ckpt': args.ckpt, 'weights': args.weights, 'objective': c['objective'], 'model': c['model'],
        'act': c['act'], 'norm': args.norm, 'attacks': args.attacks, 'schedule': args.schedule,
        'n': r['n'], 'seed': args.seed, 'seconds': seconds, 'clean': r['clean'],
        'robust': {t: r['robust'][e] for e, t in zip(eps_list, args.eps)},
        'autoattack': {t: {'version': VERSION, 'after': aa[e]['after'],
                           'robust': list(aa[e]['after'].values())[-1], 'pgd_worst': r['robust'][e]['worst']}
                       for e, t in zip(eps_list, args.eps) if e in aa},
        'unbounded': r['unbounded'], 'gain': r['gain'],
        'checks': [{'ok': ok, 'check': m} for ok, m in checks]}
    try:
        write_json(path, result, indent=1)
    except OSError as e:
        raise UserError(f'cannot write {path} ({e.strerror or e}); the results are above: free some space '
                        'or pass --json=FILE elsewhere') from None
    print(f'wrote {path}')
    for e, t in zip(eps_list, args.eps):
        if e in aa:
            print(f'autoattack {t} {100 * list(aa[e]["after"].values())[-1]:.1f}')


def main(argv):
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    check_outputs(args, rank)
    ck, model, batches, info = load(args, rank, world, device)
    eps_list = [parse_eps(t) for t in args.eps]
    torch.manual_seed(args.seed + rank)
    compiled = args.compile == 'on' or (args.compile == 'auto' and device.type == 'cuda')
    bf16 = args.bf16 and device.type == 'cuda'
    t0 = time.time()
    r = evaluate(model, batches, eps_list, args.attacks, args.norm, args.schedule, args.step_size,
                 not args.no_checks, compile=compiled, bf16=bf16)
    aa, square, state = run_autoattack(args, forward_fn(model, compiled, bf16), batches, eps_list, r, rank, world)
    if rank == 0:
        checks = [] if args.no_checks else sanity_checks(r, args.attacks)
        checks += [(ok, f'eps {t}: {m}') for e, t in zip(eps_list, args.eps) if e in square for ok, m in [square[e]]]
        checks += aa_checks([w for a in aa.values() for w in a['warnings']]) if aa and not args.no_checks else []
        report(args, r, checks, aa, ck, eps_list, time.time() - t0, compiled)
    if state:
        state.remove()
    end_distributed()


if __name__ == '__main__':
    sys.exit(cli(main, sys.argv[1:]))
