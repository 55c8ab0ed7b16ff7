"""The evaluator: PGD attacks and AutoAttack (attack.py), the worst case per sample, and checks that flag
gradient masking. PGD is fast and an upper bound; AutoAttack is the number the paper reports.

    python evaluate.py --ckpt runs/fashion-mnist/resnet_demo_pool-gradnorm-gelu/ckpt.pt --eps 0.1 --autoattack
    torchrun --nproc_per_node=8 evaluate.py --ckpt imagenet.pt  # 4/255, 5,000 images, AutoAttack
    python evaluate.py --ckpt cifar10.pt --eps 8/255 4/255      # CIFAR-10: 10,000 images, AutoAttack
An attack is LOSS-STEPS[xRESTARTS]: ce-20, dlr-50x2, margin-100. The authors' checkpoints: tools/official.py.
"""
import argparse
import math
import os
import sys
import time
from fractions import Fraction

import torch

import attack
import config
from checkpoint import check_data, check_identity, identity, load_checkpoint
from config import ArgumentParser, Config, Stopped, Stops, UserError, checked, cli
from data import data_shape, make_loaders
from models import build_model

UNBOUNDED = ('ce-10', 'margin-10')  # at an eps where any image can become any other
# RobustBench's L-inf protocols, AutoAttack's standard version: eps, images (ImageNet: their list)
PROTOCOLS = {'imagenet': ('4/255', 5000), 'cifar': ('8/255', 10000)}


# ---------------------------------------------------------------- PGD: the worst case over attacks

def parse_attack(spec):
    """'dlr-50x2' -> ('dlr', 50, 2)"""
    try:
        loss, _, rest = spec.partition('-')
        steps, _, restarts = rest.partition('x')
        a = (loss, int(steps), int(restarts or 1))
        assert loss in attack.LOSSES and a[1] > 0 and a[2] > 0
        return a
    except (ValueError, AssertionError):
        raise UserError(f'cannot read attack {spec!r}: write LOSS-STEPS[xRESTARTS] with LOSS in '
                        f'{"/".join(attack.LOSSES)}, e.g. ce-20 or dlr-50x2') from None


def _attack(fwd, x, y, eps, spec, step_size):
    """One attack of the evaluator; -> fooled (bool per sample), after checking every point."""
    loss, steps, restarts = spec
    if not len(x):
        return torch.zeros_like(y, dtype=torch.bool)
    x_adv, fooled = attack.pgd(fwd, x, y, eps, steps, step_size and step_size * eps, keep_best=True,
                               loss=loss, restarts=restarts)
    if not attack.inside(x_adv, x, eps).all():
        d = (x_adv - x).abs().max().item()
        raise RuntimeError(f'attack left the eps-ball or [0,1]: distance {d} (eps {eps})')
    return fooled


def evaluate(model, batches, eps_list, attacks=('ce-20',), step_size=None, checks=False, chain=False,
             compile=False, gain_n=256):
    """Clean accuracy and, per eps, robust accuracy per attack and the worst case (robust only if every
    attack failed). chain: each attack only on what the earlier ones left (cheaper). checks: UNBOUNDED
    attacks at eps 1 and attack.loss_gain on gain_n images, for sanity_checks. Under torchrun each rank
    passes its shard. -> {'n', 'clean', 'robust': {eps: {attack: acc, 'worst': acc}}, 'standing': {eps:
    bool tensor, robust to every attack}, 'unbounded': {'eps', attack: acc}, 'gain': {loss: (n, rose)}}"""
    specs, names = [parse_attack(a) for a in attacks], list(attacks) + ['worst']
    was_training, grads = model.training, [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)  # no dropout or batch statistics; input gradients only
    fwd = torch.compile(model, dynamic=True) if compile else model  # AOTAutograd compiles its backward too
    losses = list(dict.fromkeys(s[0] for s in specs)) if checks else []
    unbounded = UNBOUNDED if checks else ()
    keys = ['n', 'clean'] + [(e, a) for e in eps_list for a in names] + [('unbounded', a) for a in unbounded]
    keys += [(g, loss) for loss in losses for g in ('gain_n', 'gain')]
    counts, standing = dict.fromkeys(keys, 0.0), {e: [] for e in eps_list}
    for b, (x, y) in enumerate(batches):
        with torch.no_grad():
            counts['n'] += len(y)
            counts['clean'] += (fwd(x).argmax(1) == y).sum().item()
        for eps in eps_list:
            alive = torch.ones_like(y, dtype=torch.bool)
            for a, spec in zip(attacks, specs):
                idx = alive.nonzero().squeeze(1) if chain else torch.arange(len(y), device=y.device)
                robust = torch.zeros_like(alive)
                robust[idx] = ~_attack(fwd, x[idx], y[idx], eps, spec, step_size)
                counts[(eps, a)] += robust.sum().item()
                alive &= robust
            counts[(eps, 'worst')] += alive.sum().item()
            standing[eps].append(alive.cpu())
        for a in unbounded:
            fooled = _attack(fwd, x, y, 1.0, parse_attack(a), None)
            counts[('unbounded', a)] += (~fooled).sum().item()
        for loss in losses if b == 0 else ():
            n, rose = attack.loss_gain(fwd, x[:gain_n], y[:gain_n], max(eps_list), loss)
            counts[('gain_n', loss)], counts[('gain', loss)] = n, rose
    model.train(was_training)
    for p, g in zip(model.parameters(), grads):
        p.requires_grad_(g)
    c = dict(zip(keys, attack.summed([counts[k] for k in keys], next(model.parameters()).device)))
    acc = lambda k: c[k] / c['n']
    robust = {e: {a: acc((e, a)) for a in names} for e in eps_list}
    none = torch.zeros(0, dtype=torch.bool)
    r = {'n': int(c['n']), 'clean': acc('clean'), 'robust': robust, 'unbounded': None, 'gain': None,
         'standing': {e: torch.cat(v) if v else none for e, v in standing.items()}}
    if checks:
        r['unbounded'] = {'eps': 1.0, **{a: acc(('unbounded', a)) for a in unbounded}}
        r['gain'] = {loss: (int(c[('gain_n', loss)]), int(c[('gain', loss)])) for loss in losses}
    return r


def epoch_metrics(model, val, robust_val, eps, steps, seed):
    """Clean accuracy on the validation set and pgd_upper, the worst of CE and margin PGD on its fixed
    subset; under its own seed, so every epoch runs the same attack and training's RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.eval()
        with torch.no_grad():
            right, n = 0, 0
            for x, y in val:
                right += (model(x).argmax(1) == y).sum().item()
                n += len(y)
        right, n = attack.summed([right, n], next(model.parameters()).device)
        r = evaluate(model, robust_val, [eps], [f'ce-{steps}', f'margin-{steps}'], chain=True)
    return {'clean_acc': right / n, 'pgd_upper': r['robust'][eps]['worst']}


def pgd_name(cfg):
    """What epoch_metrics' pgd_upper measures, in words, for training's log."""
    return (f'PGD-{cfg.eval_steps} (worst of CE and margin) L-inf eps={cfg.eps:.4g} on {cfg.eval_n} '
            'held-out images')


def sanity_checks(result, attacks, gap=0.1, slack_images=2, min_gain=0.95):
    """Symptoms of gradient masking (Carlini et al. 2019) -> [(ok, message)]. Independent random runs
    can differ by an image or two through luck: comparisons tolerate slack_images."""
    eps_list, out, slack = sorted(result['robust']), [], slack_images / result['n'] + 1e-12
    acc = lambda e, a: result['robust'][e][a]
    for name in list(attacks) + ['worst']:
        bad = [(a, b) for a, b in zip(eps_list, eps_list[1:]) if acc(b, name) > acc(a, name) + slack]
        out.append((not bad, f'{name}: robust accuracy never increases with eps'
                    + (f' (it does from eps {bad[0][0]:.4g} to {bad[0][1]:.4g})' if bad else '')))
    if result.get('unbounded'):
        u = result['unbounded']
        reached = ', '.join(f'{a} {100 * u[a]:.1f}%' for a in UNBOUNDED)
        out.append((all(u[a] <= slack for a in UNBOUNDED), f'unbounded eps {u["eps"]:.4g} (any image can '
                    f'become any other): {reached}, must reach 0 (allowed {slack_images} images)'))
    for loss, (n, rose) in (result.get('gain') or {}).items():
        out.append((rose >= min_gain * n, f'{loss} loss rises along PGD-10 from the clean image on {rose} of '
                    f'{n} correctly classified images (needs {100 * min_gain:.0f}%; else the gradient does '
                    'not lead up)'))
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


# ---------------------------------------------------------------- the command

def parse_eps(text):
    """'4/255' -> 0.01568..., '0.1' -> 0.1"""
    try:
        return float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise UserError(f'cannot read eps {text!r}: write it like 0.1 or 4/255') from None


def parser(doc=__doc__):
    nonneg = checked(int, lambda v: v >= 0, 'an integer >= 0')
    positive = checked(int, lambda v: v >= 1, 'at least 1')
    in_folder = lambda v: os.path.isdir(os.path.dirname(os.path.abspath(v)))
    eps = checked(str, lambda t: 0 < parse_eps(t) < math.inf, 'positive')
    p = ArgumentParser(description=doc)
    p.add_argument('--ckpt', type=checked(str, os.path.exists, 'an existing checkpoint file'), required=True,
                   help='a checkpoint of train.py (its ckpt.pt)')
    p.add_argument('--eps', nargs='+', default=None, type=eps,
                   help='budgets in pixel units, e.g. 0.1 or 4/255 (default: 4/255 on ImageNet, 8/255 on '
                        'CIFAR-10, else the training eps)')
    p.add_argument('--attacks', nargs='+', default=['ce-20', 'dlr-20', 'ce-50x2'],
                   type=checked(str, parse_attack, 'LOSS-STEPS[xRESTARTS], e.g. ce-20 or dlr-50x2'),
                   help='LOSS-STEPS[xRESTARTS]')
    p.add_argument('--steps', type=positive, default=None, help='shorthand for --attacks ce-STEPS')
    p.add_argument('--step-size', type=checked(float, lambda v: 0 < v <= 10, 'in (0, 10]'), default=None,
                   help='as a fraction of eps (default 2.5/steps)')
    p.add_argument('--autoattack', action=argparse.BooleanOptionalAction, default=None,
                   help='AutoAttack (standard version) after the PGD attacks (default: ImageNet, CIFAR-10)')
    p.add_argument('--n', '--images', dest='n', type=positive, default=None,
                   help='first n validation images (default 5000 on ImageNet, 10000 on CIFAR-10, else '
                        '1000); torchrun takes --n as its own')
    p.add_argument('--data', default=None, type=checked(str, os.path.isdir, 'an existing folder'),
                   help='data path (default: the one used in training)')
    p.add_argument('--weights', default='auto', choices=['auto', 'model', 'ema'],
                   help='auto: the EMA weights if the run kept them, else the model\'s')
    p.add_argument('--json', default=None, help='write the results here (default: next to the checkpoint)',
                   type=checked(str, in_folder, 'in an existing folder'))
    p.add_argument('--seed', type=nonneg, default=0, help='random starts of the attacks')
    p.add_argument('--compile', default='auto', choices=['auto', 'on', 'off'], help='auto = on CUDA only')
    p.add_argument('--square-queries', type=nonneg, default=1000,
                   help='Square queries of the masking check when AutoAttack is off (0: skip it)')
    p.add_argument('--no-checks', action='store_true', help='skip the gradient-masking checks')
    return p


def parse_args(argv):
    return check_args(parser().parse_args(argv))


def check_args(args):
    """The combinations parse_args cannot check one option at a time; fills in derived values."""
    args.attacks = [f'ce-{args.steps}'] if args.steps else args.attacks
    args.json = args.json or os.path.join(os.path.dirname(args.ckpt) or '.', 'eval_linf.json')
    if args.eps and max(map(parse_eps, args.eps)) > 1:
        raise UserError(f'--eps {max(args.eps, key=parse_eps)}: an L-inf budget above 1 is larger than the '
                        'whole pixel range [0, 1]')
    return args


def resolve(args, ck):
    """Defaults from the checkpoint: RobustBench's protocol (PROTOCOLS) on ImageNet and CIFAR-10 (the kind
    checkpoint.identity recorded); elsewhere the training eps on 1,000 test images. EMA weights if kept."""
    imagenet, has_ema = ck['data_info'].get('num_classes') == 1000, ck.get('ema') is not None
    args.protocol = 'imagenet' if imagenet else (ck.get('data_id') or {}).get('kind')
    eps, n = PROTOCOLS.get(args.protocol, (f'{ck["config"]["eps"]:g}', 1000))
    args.eps, args.n = args.eps or [eps], args.n or n
    args.autoattack = args.protocol in PROTOCOLS if args.autoattack is None else args.autoattack
    if args.weights == 'ema' and not has_ema:
        raise UserError(f'{args.ckpt} holds no EMA weights (trained with --ema=0): leave out --weights=ema')
    if args.weights == 'auto':
        args.weights = 'ema' if has_ema else 'model'
    return args


def model_from_checkpoint(ck, key='model', path='the checkpoint'):
    """nn.Conv2d whatever --conv trained it (the same state_dict): evaluation differentiates once."""
    cfg = ck['config']
    try:
        model = build_model(cfg['model'], cfg['act'], **ck['data_info'])
        model.load_state_dict(ck[key])
    except (RuntimeError, TypeError, ValueError, KeyError) as e:
        why = ' '.join(str(e).split())[:300]
        raise UserError(f'the {key!r} weights of {path} do not fit the {cfg["model"]}/{cfg["act"]} model it '
                        f'names: {why}') from None
    return model


def ours(args):
    """A checkpoint of train.py, its defaults filled in (resolve) -> (checkpoint, model)."""
    ck = load_checkpoint(args.ckpt)
    resolve(args, ck)
    return ck, model_from_checkpoint(ck, args.weights, args.ckpt)


def load(args, rank, world, device, checkpoint):
    """-> checkpoint, model (eval mode, on the device), this rank's robust-val batches (copies: FFCV reuses
    its buffers), data info; args.n at most the number of images there are."""
    n_flag = '--n' if args.n else None  # before resolve fills in the default
    ck, model = checkpoint(args)
    model = model.to(device).eval().requires_grad_(False)
    cfg = Config(**{**ck['config'], 'eval_n': args.n, 'data': args.data or ck['config']['data']})
    if not os.path.isdir(cfg.data):
        raise UserError(f'{args.ckpt} was trained on {cfg.data}, which is not here: pass --data=DIR')
    check_data(args.ckpt, ck, data_shape(cfg.data), cfg.data, subset=ck.get('run') == 'official')
    args.data_id = identity(cfg.data)
    order = None if ck.get('run') == 'official' else check_identity(args.ckpt, ck, args.data_id, remap=True)
    threads = torch.get_num_threads()
    _, _, robust_val, info = make_loaders(cfg, rank, world, device, n_flag, from_checkpoint=True)
    args.n, order = cfg.eval_n, order and torch.tensor(order, device=device)
    batches = [(x.clone(), order[y] if order is not None else y.clone()) for x, y in robust_val]
    torch.set_num_threads(threads)  # FFCV sets torch's threads to its worker count
    return ck, model, batches, info


def check_outputs(args):
    """Before any work: the results and AutoAttack's state can be written where they go."""
    for path in (args.json, args.state):
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
    """Per eps: AutoAttack (if asked) and the Square check. -> ({eps: result}, {eps: (ok, message)}, state)"""
    state = None
    if args.autoattack:
        from pyautoattack import __version__ as aa_version
        key = dict(ckpt=os.path.abspath(args.ckpt), size=os.path.getsize(args.ckpt),
                   mtime=os.path.getmtime(args.ckpt), weights=args.weights, n=args.n,
                   world=world, seed=args.seed, data=args.data, pyautoattack=aa_version)
        state = attack.State(args.state, key)
    if state and state.resumed and rank == 0:
        print(f'AutoAttack: resuming from {state.path} ({state.resumed} steps done)')
    aa, square, t0 = {}, {}, time.time()
    for eps, text in zip(eps_list, args.eps):
        progress = lambda b, c, left, n, resumed, text=text: rank == 0 and print(
            f'  autoattack eps {text} batch {b + 1}/{len(batches)} {c:8} {left:5} of {n} standing '
            f'({"resumed" if resumed else f"{time.time() - t0:.0f} s"})', flush=True)
        try:
            if args.autoattack:
                aa[eps] = attack.autoattack(fwd, batches, eps, args.seed, state, progress=progress)
        except OSError as e:
            raise UserError(f'cannot write the AutoAttack state {state.path} ({e.strerror or e}): free '
                            'some space or pass --json=FILE elsewhere (the state goes next to it), then run '
                            'again: it resumes') from None
        if not args.no_checks and (args.autoattack or args.square_queries):
            square[eps] = attack.square_check(fwd, batches, r['standing'][eps], eps, args.square_queries,
                                              args.seed, aa.get(eps))
    return aa, square, state


def report(args, r, checks, aa, ck, eps_list, seconds, compiled):
    c = ck['config']
    also = ' (the run kept EMA weights too)' if ck.get('ema') is not None else ''
    weights = 'EMA weights' if args.weights == 'ema' else f'model weights{also}'
    eps, n = PROTOCOLS.get(args.protocol, (None, None))  # said: this run keeps it, or not
    protocol = eps and (f' | {"" if args.autoattack and args.eps[0] == eps and r["n"] == n else "not "}'
                        f'RobustBench\'s protocol (AutoAttack, L-inf {eps}, {n} images)')
    print(f'{args.ckpt}: {c["objective"]} {c["model"]}/{c["act"]} | {weights} | eval mode | {r["n"]} images '
          f'| linf | seed {args.seed} | {seconds:.0f} s{" | compiled" * compiled}{protocol or ""}\ndata: '
          f'{args.data_id["path"]} (fingerprint {args.data_id["fingerprint"]})')
    names = args.attacks + ['worst']
    print(f'PGD: {"eps":>8} {"clean":>7} ' + ' '.join(f'{a:>8}' for a in names))
    for e, t in zip(eps_list, args.eps):
        cells = ' '.join(f'{100 * r["robust"][e][a]:8.1f}' for a in names)
        print(f'     {t:>8} {100 * r["clean"]:7.1f} {cells}')
    if aa:
        comps = list(next(iter(aa.values()))['after'])
        print(f'AutoAttack {attack.VERSION} (pyautoattack), robust accuracy after each component, which '
              'attacks what the earlier ones left:')
        print(f'     {"eps":>8} ' + ' '.join(f'{k:>8}' for k in comps) + ' | PGD worst    gap')
        for e, t in zip(eps_list, args.eps):
            worst, final = r['robust'][e]['worst'], aa[e]['after'][comps[-1]]
            print(f'     {t:>8} ' + ' '.join(f'{100 * aa[e]["after"][k]:8.1f}' for k in comps)
                  + f' | {100 * worst:9.1f} {100 * (worst - final):6.1f}')
    for ok, msg in checks:
        print(f'  {"ok  " if ok else "FLAG"} {msg}')
    result = {
        'ckpt': args.ckpt, 'data': {k: args.data_id[k] for k in ('path', 'fingerprint')},
        'weights': args.weights, 'objective': c['objective'], 'model': c['model'],
        'act': c['act'], 'norm': 'linf', 'attacks': args.attacks,
        'n': r['n'], 'seed': args.seed, 'seconds': seconds, 'clean': r['clean'],
        'robust': {t: r['robust'][e] for e, t in zip(eps_list, args.eps)},
        'autoattack': {t: {'version': attack.VERSION, 'after': aa[e]['after'],
                           'robust': list(aa[e]['after'].values())[-1], 'pgd_worst': r['robust'][e]['worst']}
                       for e, t in zip(eps_list, args.eps) if e in aa},
        'unbounded': r['unbounded'], 'gain': r['gain'],
        'checks': [{'ok': ok, 'check': m} for ok, m in checks]}
    try:
        attack.write_json(args.json, result, indent=1)
    except OSError as e:
        raise UserError(f'cannot write {args.json} ({e.strerror or e}); the results are above: free some '
                        'space or pass --json=FILE elsewhere') from None
    print(f'wrote {args.json}')
    for e, t in zip(eps_list, args.eps):
        if e in aa:
            print(f'autoattack {t} {100 * list(aa[e]["after"].values())[-1]:.1f}')


def run(args, checkpoint=ours):
    """Attacks, checks and the report of the model checkpoint(args) gives: (checkpoint dict, model)."""
    rank, world, device = config.setup_distributed()
    args.state = f'{os.path.splitext(args.json)[0]}.autoattack-rank{rank}.json'
    check_outputs(args)
    ck, model, batches, info = load(args, rank, world, device, checkpoint)
    if info['num_classes'] < 3 and any(parse_attack(a)[0] == 'dlr' for a in args.attacks):
        raise UserError('the DLR loss needs at least 3 classes: use the margin loss (margin-STEPS)')
    eps_list = [parse_eps(t) for t in args.eps]
    torch.manual_seed(args.seed + rank)
    compiled, t0 = args.compile == 'on' or (args.compile == 'auto' and device.type == 'cuda'), time.time()
    r = evaluate(model, batches, eps_list, args.attacks, args.step_size, not args.no_checks, compile=compiled)
    fwd = torch.compile(model, dynamic=True) if compiled else model
    aa, square, state = run_autoattack(args, fwd, batches, eps_list, r, rank, world)
    if rank == 0:
        checks = [] if args.no_checks else sanity_checks(r, args.attacks)
        checks += [(square[e][0], f'eps {t}: {square[e][1]}')
                   for e, t in zip(eps_list, args.eps) if e in square]
        if aa and not args.no_checks:
            checks += attack.aa_checks([w for a in aa.values() for w in a['warnings']])
        report(args, r, checks, aa, ck, eps_list, time.time() - t0, compiled)
    if state:
        state.remove()
    config.end_distributed()


def main(argv):
    """A stop signal ends it where it lands: AutoAttack's progress is on disk after each of its steps."""
    args = parse_args(argv)
    with Stops() as stops, stops.at_once():
        try:
            run(args)
        except Stopped as e:
            kept = os.path.exists(getattr(args, 'state', ''))
            where = (f'AutoAttack\'s progress is in {args.state}: the same command resumes it' if kept else
                     'nothing to resume before AutoAttack: run the same command again')
            raise Stopped(e.signum, where) from None
        finally:
            config.end_distributed()


if __name__ == '__main__':
    sys.exit(cli(main, sys.argv[1:]))
