"""Benchmarks, each printing ratios measured side by side in one process (never absolute timings alone).

    python -m tools.bench step                           # a training step of every objective (make bench)
    python -m tools.bench step --model=resnet50 --data=  # random 224 px images; on a GPU: bf16 autocast
    python -m tools.bench loader                         # FFCV vs torchvision images/s (make bench-loader)
    python -m tools.bench loader --randaug=rand-m9-mstd0.5-inc1 --reprob=0.25  # the ImageNet recipe's
    python -m tools.bench attack                         # PGD-10, eager vs compiled (make bench-attack)
    python -m tools.bench fd_error                       # finite differences vs float64 double backprop
    python -m tools.bench twice                          # which timm architectures survive a double backward
    python -m tools.bench conv skip|batchnorm|first_order  # models.Conv2d's choices (skipped weight
                                                   # gradients, a primitive-op BatchNorm, first-order steps)
step: standard, GradNorm (exact, with nn.Conv2d and models.Conv2d: native and fast; finite-difference
where float32 runs), EdgeReg, FGSM-RS and PGD-3 adversarial training, each as training runs it (compiled
on CUDA, eager on the CPU; --compile for more), on one batch of the data (--data), timed interleaved,
medians after warm-up and compile, as ratios to standard and to PGD-3 run the same way (compiled to
compiled, eager to eager). A step is everything the training loop does: objective, backward,
clipping, AdamW. Peak memory is torch's allocator peak on CUDA, the peak resident-set growth over
the step on the CPU. loader is in tools/bench_loader.py; fd_error, conv and twice in tools/bench_grad.py.
"""

import statistics
import sys
import time
from contextlib import nullcontext

import torch

import attack
from attack import fgsm_at, pgd, pgd_at
from config import ArgumentParser, Config, UserError, checked, cli
from data import (
    FASHION_MEAN,
    FASHION_STD,
    data_kind,
    make_loaders,
)
from edge_reg import edge_reg
from gradnorm import FD_H, choose_impl, gradnorm, gradnorm_fd, standard
from models import build_model, normalization
from tools import bench_grad, bench_loader
from tools.bench_grad import hardware, timed_step
from train import plan


def bind(fn, *args, compiled=False, dynamic=None):
    """fn(model, x, y, *args) as objective(model, x, y), compiled as training compiles it (fullgraph,
    except the attacks: they need graph breaks, see train.objective), EdgeReg in the model's input
    space as training runs it; dynamic: torch.compile's."""
    f = torch.compile(fn, fullgraph=fn not in (pgd_at, fgsm_at), dynamic=dynamic) if compiled else fn
    if fn is edge_reg:
        return lambda m, x, y: f(m, x, y, *args, norm=normalization(m))
    return lambda m, x, y: f(m, x, y, *args)


def methods(compile_all, compile_gradnorm, eps, h, device, amp=False, act='gelu', dynamic=None, which=None):
    """-> {name: (objective(model, x, y), compiled?, the Config training would run it with)}, a compiled
    row named '<method> compiled'; input-gradient objectives need x a leaf. which(method, compiled) ->
    bool picks the rows; without it every method eager, compiled too with compile_all, and exact
    GradNorm compiled with compile_gradnorm. The finite-difference rows where choose_impl allows them
    (float32: on the CPU, or CUDA without autocast). dynamic=True: one compile for every batch size."""
    alpha = torch.tensor(1.0, device=device)  # a tensor: the value is not baked into a compiled graph
    table = {'standard': (standard, (), dict(objective='standard')),
             'gradnorm exact': (gradnorm, (eps, alpha), dict(gradnorm_impl='exact')),
             'gradnorm fd': (gradnorm_fd, (eps, alpha, h), dict(gradnorm_impl='fd')),
             'edgereg': (edge_reg, (alpha,), dict(objective='edge')),
             'fgsm at': (fgsm_at, (eps,), dict(objective='fgsm')),
             'pgd3 at': (pgd_at, (eps, 3), dict(objective='pgd'))}
    try:
        choose_impl('fd', device.type, amp, act)
    except ValueError:  # bf16 autocast
        del table['gradnorm fd']
    which = which or (lambda name, c: not c or compile_all or (compile_gradnorm and name == 'gradnorm exact'))
    rows = {}
    for name, (fn, args, kw) in table.items():
        for c in (False, True):
            if which(name, c):
                f = bind(fn, *args, compiled=c, dynamic=dynamic)
                rows[name + ' compiled' * c] = (f, c, Config(amp=amp, act=act, **kw))
    return rows


def step_args(p):
    p.add_argument('--model', default='resnet_demo_pool')
    p.add_argument(
        '--data',
        default=Config.data,
        help="the model's input comes from the data: one training batch of it, its channels, "
        "classes and size (Fashion-MNIST, an ImageFolder or .beton files); empty: random "
        "images of ImageNet's shape, 3 x --res x --res, 1000 classes",
    )
    p.add_argument(
        '--res',
        type=int,
        default=0,
        help='image size of ImageFolder/.beton data or of --data= (default 224); Fashion-MNIST is 28',
    )
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--act', default='gelu')
    p.add_argument('--eps', type=float, default=0.1)
    p.add_argument('--fd_h', type=float, default=FD_H)
    p.add_argument(
        '--amp',
        type=checked(str, lambda v: v in ('true', 'false'), 'true or false'),
        default='true',
        help='CUDA: bf16 autocast (true, as training by default) or float32 with TF32 off in '
        'matmuls and cuDNN (false: the paper\'s setting, and the only one with the fd row); '
        'the CPU runs float32 either way',
    )
    p.add_argument('--warmup', type=int, default=3, help='untimed steps per method (the first compiles)')
    p.add_argument('--repeats', type=int, default=15, help='timed steps per method, interleaved')
    p.add_argument(
        '--compile',
        default='auto',
        choices=['auto', 'all', 'gradnorm', 'none'],
        help='auto: each method as training runs it, compiled on CUDA, eager on the CPU; none: all '
        'eager; all: each method eager and compiled; gradnorm: auto, plus exact GradNorm and PGD-3 '
        'the other way (on the CPU compiled: Inductor compiles a double backward there for minutes)',
    )
    p.add_argument('--threads', type=int, default=0, help='CPU threads (0: torch default)')
    p.add_argument('--skip', default='', help="comma-separated rows to leave out, e.g. 'edgereg compiled'; "
                   "a method's name ('edgereg') leaves out all its rows")
    p.add_argument('--json', default='', help='also write each row\'s median step seconds here')
    p.add_argument(
        '--memory_format',
        default='auto',
        choices=['auto', 'channels_last', 'contiguous'],
        help='auto: as training uses it (train.plan): channels_last except for double backward',
    )
    p.add_argument(
        '--conv',
        default='both',
        choices=['both', 'auto', 'fast', 'native'],
        help='both: exact GradNorm with each convolution, nn.Conv2d (native) and models.Conv2d '
        '(fast), the others as training picks (train.plan); auto: every method as '
        'training picks',
    )


def bench_input(args, device):
    """-> (x, y, info): one training batch of --data as training's loader delivers it, and what the
    model knows of the data (build_model's kwargs: channels, classes, size, mean/std); --data= :
    random images of ImageNet's shape at --res (default 224), 1000 classes."""
    if not args.data:
        res, g = args.res or 224, torch.Generator().manual_seed(0)
        x = torch.rand(args.batch, 3, res, res, generator=g)
        y = torch.randint(0, 1000, (args.batch,), generator=g)
        return x.to(device), y.to(device), dict(in_ch=3, num_classes=1000, img_size=res)
    kind = data_kind(args.data)
    if kind == 'fashion' and args.res not in (0, 28):
        raise UserError(
            f'--res={args.res}: Fashion-MNIST ({args.data}) is 28 px; --res sizes ImageFolder or '
            '.beton data, or random images with --data='
        )
    cfg = Config(
        data=args.data,
        batch_size=args.batch,
        loader='ffcv' if kind == 'beton' else 'torchvision',
        res=args.res or Config.res,
        workers=2,
        eval_n=1,
    )
    train, *_, info = make_loaders(cfg, 0, 1, device)
    x, y = next(iter(train))
    return x.contiguous(), y, info


def step_rows(args, device, amp):
    """-> {row name: (objective, compiled?, Config, conv)}: each method compiled or not per --compile,
    exact GradNorm once per conv with --conv=both, less --skip."""
    cuda = device.type == 'cuda'
    which = {'auto': lambda n, c: c == cuda, 'none': lambda n, c: not c, 'all': lambda n, c: True,
             'gradnorm': lambda n, c: c == cuda or n in ('gradnorm exact', 'pgd3 at')}[args.compile]
    rows = {}
    for name, (fn, compiled, cfg) in methods(
        False, False, args.eps, args.fd_h, device, amp, args.act, which=which
    ).items():
        convs = (
            ('native', 'fast')
            if args.conv == 'both' and name.startswith('gradnorm exact')
            else (plan(cfg, device).conv if args.conv in ('both', 'auto') else args.conv,)
        )
        for conv in convs:
            rows[f'{name} {conv}' if len(convs) > 1 else name] = (fn, compiled, cfg, conv)
    skip = [k for k in args.skip.split(',') if k]
    return {n: r for n, r in rows.items() if not any(n == k or n.startswith(k + ' ') for k in skip)}


def warm_up(rows, args, info, x, y, device, autocast, build=None):
    """Each row's model (the same weights), optimizer and input in training's memory format, after
    --warmup untimed steps (the first compiles); a row that fails is reported and left out.
    build(conv) -> model: build_model(args.model, args.act, conv=conv, **info) unless given.
    -> {name: dict(model, opt, x, fmt, fn, layout, warm (s), times, peaks, compiled)}"""
    build = build or (lambda conv: build_model(args.model, args.act, conv=conv, **info))
    torch.manual_seed(0)
    weights = build('native').state_dict()
    state = {}
    for name, (fn, compiled, cfg, conv) in rows.items():
        fmt = {'channels_last': torch.channels_last, 'contiguous': torch.contiguous_format}.get(
            args.memory_format, plan(cfg, device).fmt
        )
        model = build(conv)
        model.load_state_dict(weights)
        model = model.to(device, memory_format=fmt).train()
        opt = torch.optim.AdamW(model.parameters(), 1e-4, fused=device.type == 'cuda')
        x_, t0 = x.contiguous(memory_format=fmt), time.perf_counter()
        try:
            for _ in range(args.warmup):
                timed_step(model, opt, fn, x_, y, device, autocast)
        except Exception as e:  # a compiler bug in one row should not hide the others
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            if 'CUDA error' in first:  # sticky: every later CUDA call fails too
                raise UserError(
                    f'warm-up {name}: {first} (seen with torch 2.11 on an H100 for "gradnorm '
                    f'exact compiled native" on resnet50); rerun with --skip="{name}"'
                ) from e
            print(f'warm-up {name}: FAILED, left out: {type(e).__name__}: {first}', flush=True)
            continue
        warm = time.perf_counter() - t0
        print(f'warm-up {name}: {warm:.1f} s' + (' (includes compiling)' if compiled else ''), flush=True)
        layout = ('channels_last' if fmt == torch.channels_last else 'contiguous') + f'  {conv}'
        state[name] = dict(model=model, opt=opt, x=x_, fmt=fmt, fn=fn, layout=layout, warm=warm, times=[],
                           peaks=[], compiled=compiled)
    return state


def time_rows(state, args, y, device, autocast):
    """--repeats rounds of one step per row, interleaved: load from other processes hits every method
    alike. A progress line per round."""
    t0, tty = time.perf_counter(), sys.stdout.isatty()
    for r in range(args.repeats):
        for s in state.values():
            t, m = timed_step(s['model'], s['opt'], s['fn'], s['x'], y, device, autocast)
            s['times'].append(t)
            s['peaks'].append(m)
        print(
            f'timing: round {r + 1}/{args.repeats} of {len(state)} steps, {time.perf_counter() - t0:.0f} s',
            end='\r' if tty and r + 1 < args.repeats else '\n',
            flush=True,
        )


def step_table(state, args, info, device, amp):
    """Each row's median step time, as a ratio to standard and to PGD-3 run the same way (compiled or
    eager), warm-up apart; then, per way, GradNorm's best (and auto's) cost over PGD-3's."""
    res, precision = info['img_size'], 'bf16 autocast' if amp else 'float32'
    precision += ', TF32 off' if device.type == 'cuda' and not amp else ''
    print(
        f'\n{hardware(device)}, {torch.get_num_threads()} threads | torch {torch.__version__} | '
        f'{args.model} {args.act} '
        f'{info["in_ch"]}x{res}x{res}, {info["num_classes"]} classes, batch {args.batch} | {precision} | '
        f'memory format {args.memory_format} | eps {args.eps} fd_h {args.fd_h:g} | '
        f'median of {args.repeats} interleaved steps after {args.warmup} warm-up'
    )
    med = {name: statistics.median(s['times']) for name, s in state.items()}
    way = lambda c: 'compiled' if c else 'eager'
    ref = lambda method, c: med.get(method + ' compiled' * c)  # the same method run the same way
    ratio = lambda t, r: f'{t / r:9.2f}x' if r else f'{"-":>10}'
    print(
        f'{"method":<30} {"warm-up s":>9} {"step ms":>8} {"img/s":>8} {"peak MiB":>9} {"x standard":>10} '
        f'{"x pgd3":>10}  format  conv  run'
    )
    for name, s in state.items():
        c = s['compiled']
        print(
            f'{name:<30} {s["warm"]:9.1f} {1000 * med[name]:8.1f} {args.batch / med[name]:8.0f} '
            f'{statistics.median(s["peaks"]) / 2**20:9.1f} {ratio(med[name], ref("standard", c))} '
            f'{ratio(med[name], ref("pgd3 at", c))}  {s["layout"]}  {way(c)}'
        )
    _, why = choose_impl('auto', device.type, amp, args.act)
    for c in sorted({s['compiled'] for s in state.values()}):
        gn = {n: t for n, t in med.items() if n.startswith('gradnorm') and state[n]['compiled'] == c}
        pgd, std, fgsm = ref('pgd3 at', c), ref('standard', c), ref('fgsm at', c)
        if not (gn and pgd):
            continue
        best = min(gn, key=gn.get)
        exact = ', '.join(f'{n[len("gradnorm ") :]} {t / pgd:.2f}' for n, t in gn.items() if 'exact' in n)
        fd = [t for n, t in gn.items() if 'fd' in n]
        print(
            f'gradnorm/pgd3 {gn[best] / pgd:.2f} (best: {best}) | {way(c)} vs {way(c)} | double backprop: '
            f'{exact} | ' + (f'fd {fd[0] / pgd:.2f} | ' if fd else '')
            + (f'fgsm/pgd3 {fgsm / pgd:.2f} | ' if fgsm else '')
            + (f'pgd3/standard {pgd / std:.2f} | ' if std else '')
            + f'auto picks {why}'
        )
    return med


def bench_step(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    amp = device.type == 'cuda' and args.amp == 'true'  # training autocasts on CUDA only
    if device.type == 'cuda':  # float32 as the paper runs it, and as fd needs it (gradnorm.fd_float32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = amp
    autocast = torch.autocast('cuda', torch.bfloat16) if amp else nullcontext()
    x, y, info = bench_input(args, device)
    rows = step_rows(args, device, amp)
    if any(compiled for _, compiled, *_ in rows.values()):
        torch._dynamo.config.trace_autograd_ops = True  # lets the inner autograd.grad compile
    print(
        f'bench step: {len(rows)} methods x ({args.warmup} warm-up + {args.repeats} timed steps), '
        f'{args.model} {tuple(x.shape[1:])}, batch {args.batch} on {device.type}: {", ".join(rows)}',
        flush=True,
    )
    state = warm_up(rows, args, info, x, y, device, autocast)
    time_rows(state, args, y, device, autocast)
    med = step_table(state, args, info, device, amp)
    if args.json:  # tools/cost.py reads it
        rows = {n: dict(seconds=t, compiled=state[n]['compiled']) for n, t in med.items()}
        attack.write_json(args.json, dict(hardware=hardware(device), threads=torch.get_num_threads(),
                                          torch=torch.__version__, model=args.model, batch=args.batch,
                                          repeats=args.repeats, rows=rows), indent=1)
        print(f'wrote {args.json}')


# ---------------------------------------------------------------- attack


def bench_attack(args):
    """PGD-10 seconds per 1,000 images on the demo model, eager vs torch.compile, same process."""
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    torch.manual_seed(0)
    model = (
        build_model(
            args.model, 'gelu', in_ch=1, num_classes=10, img_size=28, mean=FASHION_MEAN, std=FASHION_STD
        )
        .to(device)
        .eval()
        .requires_grad_(False)
    )
    x, y = (
        torch.rand(args.batch, 1, 28, 28, device=device),
        torch.randint(0, 10, (args.batch,), device=device),
    )
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)

    def per_1000(fwd):
        t0 = time.time()
        pgd(fwd, x, y, 0.1, args.steps)  # warm-up: compilation happens here
        sync()
        warm, t0, done = time.time() - t0, time.time(), 0
        while done < args.images:
            pgd(fwd, x, y, 0.1, args.steps)
            done += args.batch
        sync()
        return (time.time() - t0) / done * 1000, warm

    eager, _ = per_1000(model)
    compiled, warm = per_1000(torch.compile(model))
    print(
        f'PGD-{args.steps} {args.model} {device.type} batch {args.batch}: eager {eager:.2f} s/1000 img | '
        f'compiled {compiled:.2f} s/1000 img (warm-up {warm:.0f} s) | '
        f'compiled speed-up {eager / compiled:.2f}x'
    )


def main(argv):
    positive = checked(int, lambda v: v >= 1, 'at least 1')
    p = ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest='cmd', required=True)
    step_args(sub.add_parser('step', help='a training step of every objective'))
    a = sub.add_parser('attack', help='PGD seconds per 1,000 images, eager vs compiled')
    a.add_argument('--model', default='resnet_demo_pool')
    a.add_argument('--batch', type=positive, default=500)
    a.add_argument('--images', type=positive, default=1000)
    a.add_argument('--steps', type=positive, default=10)
    bench_grad.add_args(sub)
    bench_loader.add_args(sub)
    args = p.parse_args(argv)
    run = dict(step=bench_step, attack=bench_attack, loader=bench_loader.run, twice=bench_grad.bench_twice,
               fd_error=bench_grad.bench_fd_error, conv=bench_grad.bench_conv)
    run[args.cmd](args)


if __name__ == '__main__':
    sys.exit(cli(main, sys.argv[1:]))
