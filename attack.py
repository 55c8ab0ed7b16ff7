"""L-inf PGD and the evaluator: clean and robust accuracy of a checkpoint for a list of eps.

    python attack.py --ckpt runs/demo/ckpt.pt --eps 0.05 0.1 --steps 20 --n 1000
"""
import argparse
import json
import sys
from fractions import Fraction

import torch
import torch.distributed as dist
import torch.nn.functional as F


class UserError(Exception):
    """A problem the user can fix: printed as one line, never as a traceback."""


def pgd(model, x, y, eps, steps, step_size, random_start=True, keep_best=False):
    """L-inf PGD on the cross-entropy from a random start in the eps-ball; the result stays in
    the ball and in [0,1]. keep_best (for evaluation): return, per sample, a point that fools
    the model if the clean input or any iterate did, else the one with the highest loss, so a
    sample counts as robust only if nothing the attack visited fooled it."""
    x = x.detach()
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1) if random_start else x.clone()
    if keep_best:
        with torch.no_grad():
            logits = model(x)
        best, fooled = x.clone(), logits.argmax(1) != y
        best_loss = F.cross_entropy(logits, y, reduction='none')
    for i in range(steps + keep_best):
        x_adv.requires_grad_(True)
        logits = model(x_adv)
        loss = F.cross_entropy(logits, y, reduction='none')
        if keep_best:
            wrong = logits.argmax(1) != y
            better = (wrong & ~fooled) | ((wrong == fooled) & (loss > best_loss))
            best = torch.where(better.view(-1, 1, 1, 1), x_adv.detach(), best)
            best_loss = torch.where(better, loss.detach(), best_loss)
            fooled |= wrong
            if i == steps:
                break
        (grad,) = torch.autograd.grad(loss.sum(), x_adv)
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return best if keep_best else x_adv.detach()


def robust_accuracy(model, batches, eps_list, steps, step_size=None):
    """Clean and PGD accuracy over an iterable of (x, y); under torchrun each rank passes its
    shard and the counts are summed. Step size defaults to 2.5*eps/steps (Madry et al.)."""
    was_training = model.training
    grads = [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)  # attacks need input gradients only
    counts = torch.zeros(2 + len(eps_list), dtype=torch.float64)
    for x, y in batches:
        with torch.no_grad():
            counts[0] += len(y)
            counts[1] += (model(x).argmax(1) == y).sum().item()
        for j, eps in enumerate(eps_list):
            x_adv = pgd(model, x, y, eps, steps, step_size or 2.5 * eps / steps, keep_best=True)
            with torch.no_grad():
                counts[2 + j] += (model(x_adv).argmax(1) == y).sum().item()
    model.train(was_training)
    for p, g in zip(model.parameters(), grads):
        p.requires_grad_(g)
    if dist.is_initialized():
        dist.all_reduce(counts)
    n = counts[0].item()
    return {'n': int(n), 'clean': counts[1].item() / n,
            'robust': {eps: counts[2 + j].item() / n for j, eps in enumerate(eps_list)}}


def parse_eps(text):
    """'4/255' -> 0.01568..., '0.1' -> 0.1"""
    try:
        return float(Fraction(text))
    except ValueError:
        raise UserError(f'cannot read eps {text!r}: write it like 0.1 or 4/255') from None


def main(argv):
    import gradnorm
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ckpt', required=True)
    p.add_argument('--eps', nargs='+', default=['0.1'], help='L-inf budgets, e.g. 0.1 or 4/255')
    p.add_argument('--steps', type=int, default=20)
    p.add_argument('--n', type=int, default=1000, help='first n validation images')
    p.add_argument('--data', default=None, help='data path (default: the one used in training)')
    p.add_argument('--ema', action='store_true', help='evaluate the EMA weights')
    p.add_argument('--json', default=None, help='also write the results here')
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    eps_list = [parse_eps(e) for e in args.eps]
    torch.manual_seed(args.seed)
    ck = gradnorm.load_checkpoint(args.ckpt)
    model = gradnorm.model_from_checkpoint(ck, 'ema' if args.ema else 'model')
    cfg = gradnorm.Config(**{**ck['config'], 'eval_n': args.n})
    cfg.data = args.data or cfg.data
    _, _, robust_val, _ = gradnorm.make_loaders(cfg, 0, 1, torch.device('cpu'))
    r = robust_accuracy(model, robust_val, eps_list, args.steps)
    print(f'{args.ckpt}: {cfg.objective} {cfg.model}/{cfg.act}, {r["n"]} images, PGD-{args.steps}, seed {args.seed}')
    print(f'{"eps":>10} {"accuracy":>9}')
    print(f'{"clean":>10} {100 * r["clean"]:8.1f}%')
    for eps, text in zip(eps_list, args.eps):
        print(f'{text:>10} {100 * r["robust"][eps]:8.1f}%')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'ckpt': args.ckpt, 'steps': args.steps, 'seed': args.seed, 'n': r['n'], 'clean': r['clean'],
                       'robust': {t: r['robust'][e] for e, t in zip(eps_list, args.eps)}}, f, indent=1)


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except UserError as e:
        sys.exit(f'error: {e}')
