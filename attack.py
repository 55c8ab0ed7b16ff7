"""PGD and an evaluator you can trust: L-inf and L2, restarts, CE / margin / DLR losses, the worst
case per sample over steps, restarts and attacks, and checks that flag gradient masking.

    python attack.py --ckpt runs/gradnorm_gelu/ckpt.pt --eps 0.05 0.1 --attacks ce-20 dlr-20 ce-50x2
    torchrun --nproc_per_node=8 attack.py --ckpt imagenet.pt --eps 4/255   # counts summed over ranks
    python attack.py --ckpt official:gradnorm_swinb.pth.tar --model swin_base_patch4_window7_224 --data IMAGENET
The last evaluates a checkpoint the authors released (its EMA weights, as the paper).
An attack is LOSS-STEPS[xRESTARTS]: ce-20, dlr-50x2, margin-100.
"""
import argparse
import json
import math
import os
import sys
import time
from fractions import Fraction

import torch
import torch.distributed as dist
import torch.nn.functional as F

from config import (ArgumentParser, Config, UserError, checked, cli, data_kind, load_checkpoint, load_official,
                    model_from_checkpoint, setup_distributed)
from models import ACTS, is_model
from data import make_loaders


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


def evaluate(model, batches, eps_list, attacks=('ce-20',), norm='linf', schedule='constant',
             step_size=None, big_eps=None, compile=False, bf16=False):
    """Clean accuracy and, per eps, robust accuracy per attack and the worst case over attacks
    (per sample: robust only if every attack failed). Under torchrun each rank passes its shard
    and the counts are summed. big_eps adds one ce-10 attack at that eps for the sanity checks.
    -> {'n', 'clean', 'robust': {eps: {attack: acc, 'worst': acc}}, 'big_eps': acc or None}"""
    specs = [parse_attack(a) for a in attacks]
    was_training, grads = model.training, [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)  # no dropout or batch statistics; input gradients only
    fwd = forward_fn(model, compile, bf16)
    counts = torch.zeros(2 + len(eps_list) * (len(specs) + 1) + 1, dtype=torch.float64)
    for x, y in batches:
        with torch.no_grad():
            counts[0] += len(y)
            counts[1] += (fwd(x).argmax(1) == y).sum().item()
        k = 2
        for eps in eps_list:
            robust_all = torch.ones_like(y, dtype=torch.bool)
            for loss, steps, restarts in specs:
                x_adv, fooled = pgd(fwd, x, y, eps, steps, step_size and step_size * eps, keep_best=True,
                                    norm=norm, loss=loss, restarts=restarts, schedule=schedule)
                d = distance(x_adv, x, norm).max().item()
                if d > eps * (1 + 1e-5) + 1e-6 or x_adv.min() < 0 or x_adv.max() > 1:  # never trust, verify
                    raise RuntimeError(f'attack left the eps-ball or [0,1]: distance {d} > eps {eps}')
                counts[k] += (~fooled).sum().item()
                robust_all &= ~fooled
                k += 1
            counts[k] += robust_all.sum().item()
            k += 1
        if big_eps:
            counts[k] += (~pgd(fwd, x, y, big_eps, 10, keep_best=True, norm=norm)[1]).sum().item()
    model.train(was_training)
    for p, g in zip(model.parameters(), grads):
        p.requires_grad_(g)
    if dist.is_initialized():
        counts = counts.to(next(model.parameters()).device)  # NCCL reduces GPU tensors only
        dist.all_reduce(counts)
    acc = (counts / counts[0]).tolist()
    names, per = list(attacks) + ['worst'], len(specs) + 1
    robust = {eps: dict(zip(names, acc[2 + j * per: 2 + (j + 1) * per])) for j, eps in enumerate(eps_list)}
    return {'n': int(counts[0]), 'clean': acc[1], 'robust': robust, 'big_eps': acc[-1] if big_eps else None}


def robust_accuracy(model, batches, eps_list, steps):
    """The per-epoch number in training: clean and PGD-steps accuracy (CE, one restart, step
    2.5*eps/steps, worst iterate). -> {'n', 'clean', 'robust': {eps: acc}}"""
    r = evaluate(model, batches, eps_list, [f'ce-{steps}'])
    return {'n': r['n'], 'clean': r['clean'], 'robust': {e: r['robust'][e]['worst'] for e in eps_list}}


def sanity_checks(result, attacks, big_eps, num_classes, gap=0.1, slack_images=2):
    """Symptoms of gradient masking, each -> (ok, message). Attacks at different eps or with
    different steps are independent random runs, so a weaker one can win by an image or two
    through luck: comparisons tolerate slack_images; more than that means do not trust."""
    eps_list, out, slack = sorted(result['robust']), [], slack_images / result['n'] + 1e-12
    acc = lambda e, a: result['robust'][e][a]
    for name in list(attacks) + ['worst']:
        bad = [(a, b) for a, b in zip(eps_list, eps_list[1:]) if acc(b, name) > acc(a, name) + slack]
        out.append((not bad, f'{name}: robust accuracy never increases with eps'
                    + (f' (it does from eps {bad[0][0]:.4g} to {bad[0][1]:.4g})' if bad else '')))
    if big_eps:
        chance = 1 / num_classes
        out.append((result['big_eps'] <= chance, f'eps {big_eps:.4g} (reaches uniform gray from any image): '
                    f'ce-10 robust accuracy {100 * result["big_eps"]:.1f}% <= chance {100 * chance:.0f}%'))
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
    p.add_argument('--n', type=positive, default=None, help='first n validation images (default 5000 on ImageNet, else 1000)')
    p.add_argument('--data', default=None, type=checked(str, os.path.isdir, 'an existing folder'),
                   help='data path (default: the one used in training)')
    p.add_argument('--ema', action='store_true', help='evaluate the EMA weights')
    p.add_argument('--json', default=None, help='write the results here (default: next to the checkpoint)',
                   type=checked(str, lambda v: os.path.isdir(os.path.dirname(os.path.abspath(v))), 'in an existing folder'))
    p.add_argument('--seed', type=nonneg, default=0)
    p.add_argument('--compile', default='auto', choices=['auto', 'on', 'off'], help='auto = on CUDA only')
    p.add_argument('--bf16', action='store_true', help='bf16 autocast (CUDA)')
    p.add_argument('--no-checks', action='store_true', help='skip the gradient-masking sanity checks')
    args = p.parse_args(argv)
    args.attacks = [f'ce-{args.steps}'] if args.steps else args.attacks
    if args.ckpt.startswith('official:') != bool(args.model):
        raise UserError('--model names the timm model of an official:PATH checkpoint (ours name their own): '
                        + ('pass --model=swin_base_patch4_window7_224 or --model=timm/resnet50' if args.model is None
                           else 'leave it out'))
    if args.model and not args.data:
        raise UserError('official checkpoints do not name their data: pass --data=IMAGENET (an ImageFolder or .beton folder)')
    if args.norm == 'linf' and args.eps and max(map(parse_eps, args.eps)) > 1:
        raise UserError(f'--eps {max(args.eps, key=parse_eps)}: an L-inf budget above 1 is larger than the whole '
                        'pixel range [0, 1]')
    return args


def parse_attack_text(spec):
    parse_attack(spec)
    return spec


def load_model(args):
    """-> the checkpoint (ours, or a description of an official one) and its model, on the CPU:
    whatever attack follows, the weights come from here."""
    if args.ckpt.startswith('official:'):
        args.ema = True  # they release and evaluate the EMA weights
        return load_official(args.ckpt.removeprefix('official:'), args.model, args.act)
    ck = load_checkpoint(args.ckpt)
    if args.ema and ck.get('ema') is None:
        raise UserError(f'{args.ckpt} holds no EMA weights (trained with --ema=0): leave out --ema')
    return ck, model_from_checkpoint(ck, 'ema' if args.ema else 'model')


def load(args, rank, world, device):
    """-> the checkpoint, its model on the device, the robust-val batches of this rank, data info."""
    ck, model = load_model(args)
    model = model.to(device)
    imagenet = ck['data_info'].get('num_classes') == 1000
    cfg = Config(**{**ck['config'], 'eval_n': args.n or (5000 if imagenet else 1000)})
    cfg.data = args.data or cfg.data
    if args.model:  # official: read ImageNet as it is stored
        cfg.loader = 'ffcv' if data_kind(cfg.data) == 'beton' else 'torchvision'
    if not os.path.isdir(cfg.data):
        raise UserError(f'{args.ckpt} was trained on {cfg.data}, which is not here: pass --data=DIR')
    _, _, robust_val, info = make_loaders(cfg, rank, world, device)
    return ck, model, robust_val, info


def report(args, r, checks, ck, eps_text, eps_list, seconds, compiled):
    c = ck['config']
    print(f'{args.ckpt}: {c["objective"]} {c["model"]}/{c["act"]} | {"EMA" if args.ema else "model"} weights | '
          f'{r["n"]} images | {args.norm} | seed {args.seed} | {seconds:.0f} s'
          f'{" | bf16" if args.bf16 else ""}{" | compiled" if compiled else ""}')
    names = args.attacks + ['worst']
    print(f'{"eps":>8} {"clean":>7} ' + ' '.join(f'{a:>8}' for a in names))
    for e, t in zip(eps_list, eps_text):
        print(f'{t:>8} {100 * r["clean"]:7.1f} ' + ' '.join(f'{100 * r["robust"][e][a]:8.1f}' for a in names))
    for ok, msg in checks:
        print(f'  {"ok  " if ok else "WARN"} {msg}')
    path = args.json or os.path.join(os.path.dirname(args.ckpt.removeprefix('official:')) or '.', f'eval_{args.norm}.json')
    with open(path, 'w') as f:
        json.dump({'ckpt': args.ckpt, 'weights': 'ema' if args.ema else 'model', 'objective': c['objective'],
                   'model': c['model'], 'act': c['act'], 'norm': args.norm, 'attacks': args.attacks,
                   'schedule': args.schedule, 'n': r['n'], 'seed': args.seed, 'seconds': seconds, 'clean': r['clean'],
                   'big_eps_acc': r['big_eps'], 'robust': {t: r['robust'][e] for e, t in zip(eps_list, eps_text)},
                   'checks': [{'ok': ok, 'check': m} for ok, m in checks]}, f, indent=1)
    print(f'wrote {path}')


def main(argv):
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    ck, model, robust_val, info = load(args, rank, world, device)
    imagenet = ck['data_info']['num_classes'] == 1000  # the model's classes (official: ImageNet's)
    eps_text = args.eps or (['4/255'] if imagenet else [f'{ck["config"]["eps"]:g}'])
    eps_list = [parse_eps(t) for t in eps_text]
    big_eps = None
    if not args.no_checks:  # a budget that reaches uniform gray from any image
        big_eps = 0.5 if args.norm == 'linf' else 0.5 * math.sqrt(info['in_ch'] * info.get('img_size', 28) ** 2)
    torch.manual_seed(args.seed + rank)
    compiled = args.compile == 'on' or (args.compile == 'auto' and device.type == 'cuda')
    t0 = time.time()
    r = evaluate(model, robust_val, eps_list, args.attacks, args.norm, args.schedule, args.step_size, big_eps,
                 compiled, args.bf16 and device.type == 'cuda')
    if rank == 0:
        checks = [] if args.no_checks else sanity_checks(r, args.attacks, big_eps, info['num_classes'])
        report(args, r, checks, ck, eps_text, eps_list, time.time() - t0, compiled)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == '__main__':
    sys.exit(cli(main, sys.argv[1:]))
