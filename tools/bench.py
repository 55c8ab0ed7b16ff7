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
step: standard, GradNorm (exact eager and compiled, each with nn.Conv2d and models.Conv2d: native
and fast; finite-difference where float32 runs), EdgeReg and PGD-3 adversarial training, on one
batch of the data (--data), timed interleaved, medians after warm-up and compile, as ratios to
standard and to PGD-3. A step is everything the training loop does: objective, backward,
clipping, AdamW. Peak memory is torch's allocator peak on CUDA, the peak resident-set growth over
the step on the CPU.
"""

import argparse
import copy
import ctypes
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

import models
from attack import pgd, pgd_at
from augment import BatchAugment, randaug_transform
from config import RULES, ArgumentParser, Config, UserError, checked, cli
from data import (
    FASHION_MEAN,
    FASHION_STD,
    VAL_SIDE,
    data_kind,
    ffcv_loader,
    make_loaders,
    need_ffcv,
    torchvision_loader,
)
from edge_reg import edge_reg
from gradnorm import FD_H, choose_impl, gradnorm, gradnorm_fd, standard
from models import IMAGENET_MEAN, IMAGENET_STD, build_model
from tools.beton import write_beton
from train import plan

LIBC = ctypes.CDLL(None)


def bind(fn, *args, compiled=False, dynamic=None):
    """fn(model, x, y, *args) as objective(model, x, y), compiled as training compiles it (fullgraph,
    except PGD: its attack loop needs a graph break, see train.objective); dynamic: torch.compile's."""
    f = torch.compile(fn, fullgraph=fn is not pgd_at, dynamic=dynamic) if compiled else fn
    return lambda m, x, y: f(m, x, y, *args)


def methods(compile_all, compile_gradnorm, eps, h, device, amp=False, act='gelu', dynamic=None):
    """-> {name: (objective(model, x, y), compiled?, the Config training would run it with)};
    input-gradient objectives need x a leaf. The finite-difference row where choose_impl allows it
    (float32: on the CPU, or CUDA without autocast). dynamic=True: one compile for every batch size."""
    alpha = torch.tensor(1.0, device=device)  # a tensor: the value is not baked into a compiled graph
    cfg = lambda **kw: Config(amp=amp, act=act, **kw)
    std, exact, fd = cfg(objective='standard'), cfg(gradnorm_impl='exact'), cfg(gradnorm_impl='fd')
    edge, pgd = cfg(objective='edge'), cfg(objective='pgd')
    rows = {'standard': (bind(standard), False, std)}
    if compile_all:
        rows['standard compiled'] = (bind(standard, compiled=True, dynamic=dynamic), True, std)
    rows['gradnorm exact'] = (bind(gradnorm, eps, alpha), False, exact)
    if compile_gradnorm:
        fn = bind(gradnorm, eps, alpha, compiled=True, dynamic=dynamic)
        rows['gradnorm exact compiled'] = (fn, True, exact)
    try:
        choose_impl('fd', device.type, amp, act)
        rows['gradnorm fd'] = (bind(gradnorm_fd, eps, alpha, h), False, fd)
    except ValueError:  # bf16 autocast
        pass
    rows['edgereg'] = (bind(edge_reg, alpha), False, edge)
    if compile_all:
        rows['edgereg compiled'] = (bind(edge_reg, alpha, compiled=True, dynamic=dynamic), True, edge)
    rows['pgd3 at'] = (bind(pgd_at, eps, 3), False, pgd)
    if compile_all:
        rows['pgd3 at compiled'] = (bind(pgd_at, eps, 3, compiled=True, dynamic=dynamic), True, pgd)
    return rows


def hardware(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name()
    return f'{platform.processor() or platform.machine()} CPU'


def rss_kib(key):
    return int(re.search(key + r':\s+(\d+)', open('/proc/self/status').read()).group(1))


def timed_step(model, opt, fn, x, y, device, autocast):
    """One training step -> (seconds, peak bytes above the memory in use before it)."""
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        LIBC.malloc_trim(0)  # hand cached free memory back, so the step's allocations show in the RSS
        open('/proc/self/clear_refs', 'w').write('5')  # resets the peak RSS (Linux >= 4.0)
        base = rss_kib('VmRSS') * 1024
    t0 = time.perf_counter()
    x = x.detach().requires_grad_()  # a leaf before any compiled code; standard and PGD ignore it
    with autocast:
        loss, _ = fn(model, x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if device.type == 'cuda':
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = rss_kib('VmHWM') * 1024 - base
    return time.perf_counter() - t0, peak


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
        help='auto: all objectives on CUDA, none on the CPU (Inductor compiles a double backward '
        'there for minutes; --compile=gradnorm adds that row)',
    )
    p.add_argument('--threads', type=int, default=0, help='CPU threads (0: torch default)')
    p.add_argument('--skip', default='', help="comma-separated methods to leave out, e.g. 'edgereg compiled'")
    p.add_argument(
        '--memory_format',
        default='auto',
        choices=['auto', 'channels_last', 'contiguous'],
        help='auto: as training uses it (train.memory_format): channels_last except for double backward',
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


def step_rows(args, device, amp, mode):
    """-> {row name: (objective, compiled?, Config, conv)}: each method, exact GradNorm once per conv
    with --conv=both, less --skip."""
    rows = {}
    for name, (fn, compiled, cfg) in methods(
        mode == 'all', mode in ('all', 'gradnorm'), args.eps, args.fd_h, device, amp, args.act
    ).items():
        convs = (
            ('native', 'fast')
            if args.conv == 'both' and name.startswith('gradnorm exact')
            else (plan(cfg, device).conv if args.conv in ('both', 'auto') else args.conv,)
        )
        for conv in convs:
            rows[f'{name} {conv}' if len(convs) > 1 else name] = (fn, compiled, cfg, conv)
    return {n: r for n, r in rows.items() if n not in args.skip.split(',')}


def warm_up(rows, args, info, x, y, device, autocast, build=None):
    """Each row's model (the same weights), optimizer and input in training's memory format, after
    --warmup untimed steps (the first compiles); a row that fails is reported and left out.
    build(conv) -> model: build_model(args.model, args.act, conv=conv, **info) unless given.
    -> {name: dict(model, opt, x, fmt, fn, layout, warm (s), times, peaks)}"""
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
        state[name] = dict(
            model=model, opt=opt, x=x_, fmt=fmt, fn=fn, layout=layout, warm=warm, times=[], peaks=[]
        )
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
    """Each row's median step time, as a ratio to standard and to PGD-3, warm-up apart; then GradNorm's
    best (and auto's) cost over PGD-3's."""
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
    std = med.get('standard')
    pgds = [t for n, t in med.items() if n.startswith('pgd3')]
    pgd = min(pgds) if pgds else None
    ratio = lambda t, ref: f'{t / ref:9.2f}x' if ref else f'{"-":>10}'
    print(
        f'{"method":<30} {"warm-up s":>9} {"step ms":>8} {"img/s":>8} {"peak MiB":>9} {"x standard":>10} '
        f'{"x pgd3":>10}  format  conv'
    )
    for name, s in state.items():
        print(
            f'{name:<30} {s["warm"]:9.1f} {1000 * med[name]:8.1f} {args.batch / med[name]:8.0f} '
            f'{statistics.median(s["peaks"]) / 2**20:9.1f} {ratio(med[name], std)} '
            f'{ratio(med[name], pgd)}  {s["layout"]}'
        )
    gn = {n: t for n, t in med.items() if n.startswith('gradnorm')}
    if not (gn and pgd):
        return
    best = min(gn, key=gn.get)
    exact = ', '.join(f'{n[len("gradnorm ") :]} {t / pgd:.2f}' for n, t in gn.items() if 'exact' in n)
    auto, why = choose_impl('auto', device.type, amp, args.act)
    print(
        f'gradnorm/pgd3 {gn[best] / pgd:.2f} (best: {best}) | double backprop: {exact} | '
        + (f'fd {gn["gradnorm fd"] / pgd:.2f} | ' if 'gradnorm fd' in gn else '')
        + (f'pgd3/standard {pgd / std:.2f} | ' if std else '')
        + f'auto picks {why}'
    )


def bench_step(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    amp = device.type == 'cuda' and args.amp == 'true'  # training autocasts on CUDA only
    mode = {'auto': 'all' if device.type == 'cuda' else 'none'}.get(args.compile, args.compile)
    if mode != 'none':
        torch._dynamo.config.trace_autograd_ops = True  # lets the inner autograd.grad compile
    if device.type == 'cuda':  # float32 as the paper runs it, and as fd needs it (gradnorm.fd_float32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = amp
    autocast = torch.autocast('cuda', torch.bfloat16) if amp else nullcontext()
    x, y, info = bench_input(args, device)
    rows = step_rows(args, device, amp, mode)
    print(
        f'bench step: {len(rows)} methods x ({args.warmup} warm-up + {args.repeats} timed steps), '
        f'{args.model} {tuple(x.shape[1:])}, batch {args.batch} on {device.type}: {", ".join(rows)}',
        flush=True,
    )
    state = warm_up(rows, args, info, x, y, device, autocast)
    time_rows(state, args, y, device, autocast)
    step_table(state, args, info, device, amp)


# ---------------------------------------------------------------- fd_error: finite differences' error


def param_grad(model, fn, x, y, eps, autocast=None, **kw):
    """The flat parameter gradient (float64) of one GradNorm loss at alpha 1, the end of the ramp."""
    model.zero_grad(set_to_none=True)
    alpha = torch.tensor(1.0, dtype=x.dtype, device=x.device)
    with autocast or nullcontext():
        loss, _ = fn(model, x.clone().requires_grad_(), y, eps, alpha, **kw)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]).double()


def reference_grad(model, x, y, eps, weights=(0.8, 1.2)):
    """Double backprop in float64, of a float64 copy of model: the reference every error is against."""
    return param_grad(copy.deepcopy(model).double(), gradnorm, x.double(), y, eps, weights=weights)


def fd_error(model, x, y, eps, h=FD_H, ref=None, autocast=None, weights=(0.8, 1.2), fn=gradnorm_fd):
    """||g - g_ref|| / ||g_ref||: the float32 parameter gradient of fn (finite differences at h, or
    fn=gradnorm: double backprop) against float64 double backprop of the same weights."""
    ref = reference_grad(model, x, y, eps, weights) if ref is None else ref
    kw = dict(h=h) if fn is gradnorm_fd else {}
    g = param_grad(model, fn, x, y, eps, autocast, weights=weights, **kw)
    return ((g - ref).norm() / ref.norm()).item()


def calibrate_bn(model, res, n=16, rounds=4, in_ch=3):
    """BatchNorm in eval mode with running statistics of (random) images, as the paper's ResNet-50
    runs train (bn_eval: pretrained statistics). Train mode at 2 images of 32 px would normalize the
    last stage over 2 numbers, which float32 double backprop already gets 3% wrong."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # a cumulative average
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        for _ in range(rounds):
            model(torch.rand(n, in_ch, res, res))
    return model.eval()


def fd_cases(res, names):
    """-> {label: (model, x, y, eps)}: random weights, seed 0; the paper's eps on the timm models."""
    cases = {}
    for name in names:
        torch.manual_seed(0)
        if name.startswith('demo'):
            act = name.split('_')[1]
            model = build_model('resnet_demo_pool', act, in_ch=1, num_classes=10, img_size=28).train()
            cases[f'demo ResNet {act}, train mode, 32 x 1x28x28, eps 0.1'] = (
                model,
                torch.rand(32, 1, 28, 28),
                torch.randint(0, 10, (32,)),
                0.1,
            )
            continue
        model = build_model(name, 'gelu', num_classes=10, img_size=res)
        model = calibrate_bn(model, res) if 'resnet' in name else model.train()
        mode = 'eval mode, BN statistics of 64 images' if 'resnet' in name else 'train mode'
        cases[f'{name} gelu, {mode}, 2 x 3x{res}x{res}, eps 4/255'] = (
            model,
            torch.rand(2, 3, res, res),
            torch.randint(0, 10, (2,)),
            4 / 255,
        )
    return cases


def bench_fd_error(args):
    """Relative error of the float32 parameter gradient against float64 double backprop: exact, fd
    at several h, fd of the penalty alone, fd under bf16 autocast (CPU)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    hs = (1e-3, 3e-4, 1e-4, 3e-5)
    cols = ['exact f32'] + [f'fd h={h:g}' for h in hs] + [f'fd {FD_H:g} penalty only', f'fd {FD_H:g} bf16']
    print(
        f'relative L2 error of the parameter gradient vs float64 double backprop (GradNorm, weights '
        f'0.8/1.2, alpha 1; penalty only: weights 0/1) | torch {torch.__version__}, '
        f'{hardware(torch.device("cpu"))}'
    )
    print('| model | ' + ' | '.join(cols) + ' |\n|---|' + '---|' * len(cols), flush=True)
    bf16 = torch.autocast('cpu', torch.bfloat16)
    for label, (model, x, y, eps) in fd_cases(args.res, args.models).items():
        ref = reference_grad(model, x, y, eps)
        errs = [fd_error(model, x, y, eps, ref=ref, fn=gradnorm)]
        errs += [fd_error(model, x, y, eps, h, ref) for h in hs]
        errs.append(fd_error(model, x, y, eps, weights=(0.0, 1.0)))
        errs.append(fd_error(model, x, y, eps, ref=ref, autocast=bf16))
        pct = lambda e: f'{100 * e:.2g}%' if e < 1 else f'{100 * e:.0f}%'
        print(f'| {label} | ' + ' | '.join(map(pct, errs)) + ' |', flush=True)


# ---------------------------------------------------------------- loader

PHOTOS = (
    'astronaut',
    'chelsea',
    'coffee',
    'rocket',
    'immunohistochemistry',
    'hubble_deep_field',
    'stereo_motorcycle',
    'retina',
)


def photo_folder(
    root, per_class=8, classes=4, sizes=((500, 375), (375, 500), (500, 333), (400, 400)), quality=90
):
    """An ImageFolder of real photographs (skimage.data) at ImageNet-like sizes, as JPEG files."""
    import skimage.data

    photos = [getattr(skimage.data, n)() for n in PHOTOS]
    photos = [p[0] if isinstance(p, tuple) else p for p in photos]  # a stereo pair: the left image
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f'c{c}'), exist_ok=True)
            for i in range(per_class):
                p = Image.fromarray(photos[(c * per_class + i) % len(photos)][..., :3])
                w, h = sizes[(c + i) % len(sizes)]
                s = rng.uniform(0.6, 1.0)  # a random crop, so no two files are the same
                cw, ch = int(p.width * s), int(p.height * s)
                x, y = rng.integers(0, p.width - cw + 1), rng.integers(0, p.height - ch + 1)
                p.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC).save(
                    os.path.join(root, split, f'c{c}', f'{i}.JPEG'), quality=quality
                )
    return root


def bench_loader(n=512, res=224, batch=64, workers=2, rounds=5, val_side=VAL_SIDE, randaug='', reprob=0.0):
    """Same JPEG files, crops, augmentations, resolution, batch size and worker count; side by side,
    alternating. randaug, reprob: as train.py's --randaug, --reprob (training loaders only)."""
    need_ffcv()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        photo_folder(tmp, per_class=n // 4)
        write_beton(tmp, os.path.join(tmp, 'beton'), workers=workers, val_side=val_side)
        aug = dict(
            randaug=randaug_transform(randaug, res, IMAGENET_MEAN) if randaug else None,
            on_batch=BatchAugment(0, 0, 4, IMAGENET_MEAN, IMAGENET_STD, reprob) or None,
        )
        train_what = (
            'random-resized crop + flip'
            + (f' + {randaug}' if randaug else '')
            + (f' + erasing {reprob}' if reprob else '')
        )
        for train, what in ((True, train_what), (False, 'center crop 224/256')):
            split = 'train' if train else 'val'
            kw = aug if train else {}
            loaders = {
                'ffcv': ffcv_loader(
                    f'{tmp}/beton/{split}.beton', batch, 'cpu', train, res, workers=workers, **kw
                ),
                'torchvision': torchvision_loader(
                    f'{tmp}/{split}', batch, 'cpu', train, res, workers=workers, **kw
                ),
            }
            best = {}
            for r in range(rounds + 1):  # round 0: numba compilation, worker start-up
                for name, loader in loaders.items():
                    loader.set_epoch(r)
                    t0, seen = time.perf_counter(), 0
                    for x, _ in loader:
                        seen += len(x)
                    if r:
                        best[name] = max(best.get(name, 0), seen / (time.perf_counter() - t0))
            print(
                f'{split:5} ({what}, {res} px, batch {batch}, {workers} workers, {n} JPEGs): '
                f'ffcv {best["ffcv"]:.0f} img/s, torchvision {best["torchvision"]:.0f} img/s, '
                f'ratio {best["ffcv"] / best["torchvision"]:.2f}',
                flush=True,
            )


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


# ---------------------------------------------------------------- conv: the choices behind models.Conv2d


class PrimitiveBatchNorm2d(nn.BatchNorm2d):
    """Train-mode BatchNorm from mean, var and elementwise ops (same parameters, buffers and running-
    statistics update), whose double backward is a few reductions instead of BatchNorm's own."""

    def forward(self, x):
        if not (self.training and self.track_running_stats and self.momentum is not None):
            return super().forward(x)
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        with torch.no_grad():
            n = x.numel() // x.shape[1]
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), self.momentum)
            self.num_batches_tracked.add_(1)
        scale = self.weight * torch.rsqrt(var + self.eps)
        return x * scale[:, None, None] + (self.bias - mean * scale)[:, None, None]


def primitive_bn(model):
    """model with every nn.BatchNorm2d a PrimitiveBatchNorm2d (same state), in place."""
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = PrimitiveBatchNorm2d
    return model


@contextmanager
def weight_grads_computed():
    """models.Conv2d as if it read only ctx.needs_input_grad: every gradient its inputs require."""
    needed = models._needed
    models._needed = lambda ctx, i: ctx.next_functions[i][0] is not None
    try:
        yield
    finally:
        models._needed = needed


def weight_grad_ops_compiled(skip):
    """conv2d_weight ops in the compiled forward graph, which holds the inner input-gradient pass."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []
    grab = lambda gm, _: graphs.append(gm) or make_boxed_func(gm.forward)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = models.ResNet(
        models.BasicBlock, [1, 1], (8, 16), act='gelu', num_classes=10, small_stem=True, conv='fast'
    )
    with nullcontext() if skip else weight_grads_computed():
        fn = torch.compile(gradnorm, backend=aot_autograd(fw_compiler=grab, bw_compiler=grab), fullgraph=True)
        fn(model, torch.rand(8, 3, 16, 16, requires_grad=True), torch.arange(8), 0.1, torch.tensor(1.0))
    return sum(str(n.target) == 'gradnorm.conv2d_weight.default' for n in graphs[0].graph.nodes)


def conv_variants(what, model, alpha, eager):
    """-> {label: (model, objective(model, x, y))}; the first row is the reference."""
    gn = lambda m, x, y: gradnorm(m, x, y, 0.1, alpha)
    if what == 'skip':

        def computed(m, x, y):
            with weight_grads_computed():
                return gn(m, x, y)

        return {
            'fast, weight grads skipped': (model('fast'), gn),
            'fast, weight grads computed': (model('fast'), computed),
        }
    if what == 'batchnorm':
        rows = {}
        for compiled in (False,) if eager else (False, True):
            fn = torch.compile(gradnorm, fullgraph=True) if compiled else gradnorm
            for bn in ('nn.BatchNorm2d', 'primitive BN'):
                m = model('fast')
                rows[f'{bn}{" compiled" if compiled else ""}'] = (
                    primitive_bn(m) if bn == 'primitive BN' else m,
                    lambda m, x, y, f=fn: f(m, x, y, 0.1, alpha),
                )
        return rows
    pgd3 = lambda m, x, y: pgd_at(m, x, y, 0.1, 3)
    return {
        f'{name} {conv}': (model(conv), fn)
        for name, fn in (('standard', standard), ('pgd3', pgd3))
        for conv in ('native', 'fast')
    }


def bench_conv(args):
    """GradNorm (or first-order) steps of resnet variants side by side, as ratios to the first row."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    autocast = torch.autocast('cuda', torch.bfloat16) if device.type == 'cuda' else nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as bench_step, training
    torch._dynamo.config.trace_autograd_ops = True
    torch.manual_seed(0)
    kw = dict(num_classes=10, img_size=args.res)
    base = build_model(args.model, 'gelu', **kw)

    def model(conv):
        m = build_model(args.model, 'gelu', conv=conv, **kw)
        m.load_state_dict(base.state_dict())
        return m.to(device).train()

    x, y = (
        torch.rand(args.batch, 3, args.res, args.res, device=device),
        torch.randint(0, 10, (args.batch,), device=device),
    )
    if args.what == 'skip':
        print(
            f'compiled forward graph: {weight_grad_ops_compiled(True)} conv2d_weight ops with the skip, '
            f'{weight_grad_ops_compiled(False)} without (dead code either way)',
            flush=True,
        )
    rows = conv_variants(args.what, model, torch.tensor(1.0, device=device), args.eager)
    state, grads = {}, {}
    for label, (m, fn) in rows.items():
        m.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # PGD's random start: the same for every row
        with autocast:
            loss, _ = fn(m, x.clone().requires_grad_(), y)
        loss.backward()  # also the first warm-up step: compiles
        grads[label] = torch.cat([p.grad.flatten().float() for p in m.parameters()])
        opt = torch.optim.AdamW(m.parameters(), 1e-4)
        for _ in range(args.warmup):
            timed_step(m, opt, fn, x, y, device, autocast)
        state[label] = (m, opt, fn, [])
    for _ in range(args.repeats):
        for m, opt, fn, times in state.values():
            times.append(timed_step(m, opt, fn, x, y, device, autocast)[0])
    hw = (
        torch.cuda.get_device_name()
        if device.type == 'cuda'
        else f'{platform.processor() or platform.machine()} CPU'
    )
    print(
        f'\nconv {args.what}: {hw}, {torch.get_num_threads()} threads | torch {torch.__version__} | '
        f'{args.model} {args.res} px batch {args.batch} | median of {args.repeats} interleaved steps'
    )
    first = None
    for label, (*_, times) in state.items():
        med = statistics.median(times)
        first = first or med
        # the gradient against the first row's, or against native's for the same objective
        ref = grads[label.replace(' fast', ' native') if args.what == 'first_order' else next(iter(grads))]
        print(
            f'{label:<30} {1000 * med:8.1f} ms {med / first:6.2f}x  parameter gradient vs '
            f'{"native" if args.what == "first_order" else "first row"}: '
            f'rel. err. {((grads[label] - ref).norm() / ref.norm()).item():.1e}'
        )


# ---------------------------------------------------------------- timm's models, differentiated twice

# the smallest of each family timm 1.0.31 has (CNNs, ViTs, hybrids, MLPs): one per architecture file
TWICE = (
    'resnet18 resnetv2_50 resnext26ts seresnext26d_32x4d res2net50_14w_8s resnest14d skresnet18 '
    'efficientnet_b0 efficientnetv2_rw_t mobilenetv2_050 mobilenetv3_small_050 mobilenetv4_conv_small '
    'mnasnet_small fbnetc_100 ghostnet_100 lcnet_050 rexnet_100 regnetx_002 densenet121 dla34 dpn48b '
    'vgg11 inception_v3 xception41 hrnet_w18_small cspresnet50 darknet17 dm_nfnet_f0 nf_resnet26 '
    'repvgg_a0 mobileone_s0 selecsls42 tresnet_m vovnet39a ese_vovnet19b_dw hgnetv2_b0 convnext_atto '
    'convnextv2_atto inception_next_atto poolformer_s12 mambaout_femto starnet_s1 rdnet_tiny fastvit_t8 '
    'repvit_m1 efficientvit_b0 efficientformer_l1 edgenext_xx_small mobilevit_xxs mobilevitv2_050 '
    'levit_128s tiny_vit_5m_224 vit_tiny_patch16_224 deit_tiny_patch16_224 eva02_tiny_patch14_224 '
    'beit_base_patch16_224 cait_xxs24_224 convit_tiny crossvit_tiny_240 xcit_nano_12_p16_224 pit_ti_224 '
    'tnt_s_patch16_224 twins_svt_small visformer_tiny nest_tiny volo_d1_224 swin_tiny_patch4_window7_224 '
    'swinv2_tiny_window8_256 swinv2_cr_tiny_ns_224 gcvit_xxtiny davit_tiny focalnet_tiny_srf '
    'maxvit_nano_rw_256 coatnet_nano_rw_224 coat_tiny hiera_tiny_224 mixer_s16_224 resmlp_12_224 '
    'gmlp_ti16_224 sequencer2d_s botnet26t_256 halonet26t lambda_resnet26t gernet_s fasternet_t0 '
    'vitamin_small_224 nextvit_small'
).split()


def bench_twice(args):
    """Build each architecture without weights at a small size and run one exact GradNorm step (the
    double backward the paper's objectives need): ok, or the first line of the error. Where a model
    refuses the small size, its own size."""
    import timm

    ok, failed = [], []
    for name in args.models or TWICE:
        cfg = timm.models.get_pretrained_cfg(name)
        sizes = [args.res] + ([cfg.input_size[-1]] if cfg and cfg.input_size[-1] != args.res else [])
        for size in sizes:
            torch.manual_seed(0)
            try:
                model = build_model(f'timm/{name}', 'gelu', num_classes=10, img_size=size)
            except Exception as e:
                failed.append((name, f'build: {str(e).splitlines()[0][:150]}'))
                break
            x, y = torch.rand(2, 3, size, size), torch.tensor([0, 1])
            try:
                model(x)
            except Exception:
                continue  # not this size
            try:
                gradnorm(model, x, y, 4 / 255, torch.tensor(1.0))[0].backward()
                ok.append(name)
            except Exception as e:
                failed.append((name, str(e).splitlines()[0][:200]))
            break
        else:
            failed.append((name, f'no forward at {sizes} px'))
        print(f'{name}: {"ok" if ok and ok[-1] == name else failed[-1][1]}', flush=True)
    print(
        f'\n{len(ok)} of {len(ok) + len(failed)} differentiate twice; not: '
        + '; '.join(f'{n} ({w})' for n, w in failed)
    )


def main(argv):
    positive = checked(int, lambda v: v >= 1, 'at least 1')
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='cmd', required=True)
    step_args(sub.add_parser('step', help='a training step of every objective'))
    b = sub.add_parser('loader', help='FFCV vs torchvision images/s on the same JPEGs')
    b.add_argument('--n', type=positive, default=512)
    b.add_argument('--workers', type=positive, default=2)
    b.add_argument('--batch', type=positive, default=64)
    b.add_argument(
        '--val-side',
        type=checked(int, lambda v: v == 0 or v >= 32, '0 or at least 32'),
        default=VAL_SIDE,
        help='as for tools/beton.py (0: val stored like train)',
    )
    b.add_argument(
        '--randaug',
        type=checked(str, *RULES['randaug']),
        default='',
        help="timm's RandAugment on both training loaders, e.g. rand-m9-mstd0.5-inc1 (train.py's --randaug)",
    )
    b.add_argument(
        '--reprob',
        type=checked(float, lambda v: 0 <= v <= 1, 'in [0, 1]'),
        default=0.0,
        help="random erasing on both training loaders' batches (train.py's --reprob)",
    )
    a = sub.add_parser('attack', help='PGD seconds per 1,000 images, eager vs compiled')
    a.add_argument('--model', default='resnet_demo_pool')
    a.add_argument('--batch', type=positive, default=500)
    a.add_argument('--images', type=positive, default=1000)
    a.add_argument('--steps', type=positive, default=10)
    c = sub.add_parser(
        'conv', help="the fast conv's choices: skipped weight gradients, BatchNorm, first-order cost"
    )
    c.add_argument('what', choices=['skip', 'batchnorm', 'first_order'])
    c.add_argument('--model', default='resnet18_small')
    c.add_argument('--res', type=positive, default=32)
    c.add_argument('--batch', type=positive, default=32)
    c.add_argument('--warmup', type=positive, default=2)
    c.add_argument('--repeats', type=positive, default=10)
    c.add_argument('--eager', action='store_true', help='batchnorm: leave out the compiled rows')
    c.add_argument('--threads', type=int, default=0, help='CPU threads (0: torch default)')
    f = sub.add_parser('fd_error', help='finite-difference GradNorm against float64 double backprop (CPU)')
    f.add_argument(
        '--models',
        nargs='*',
        default=['swin_base_patch4_window7_224', 'timm/resnet50', 'demo_gelu', 'demo_silu', 'demo_relu'],
        help='timm names and demo_ACT (the demo ResNet with that activation)',
    )
    f.add_argument(
        '--res',
        type=checked(int, lambda v: v >= 32, 'at least 32'),
        default=32,
        help='image size of the timm models',
    )
    f.add_argument('--threads', type=int, default=0, help='CPU threads (0: torch default)')
    w = sub.add_parser('twice', help='which timm architectures survive a double backward (CPU)')
    w.add_argument('--models', nargs='*', default=None, help='timm names (default: one of each family)')
    w.add_argument('--res', type=checked(int, lambda v: v >= 16, 'at least 16'), default=64)
    args = p.parse_args(argv)
    if args.cmd == 'twice':
        bench_twice(args)
    elif args.cmd == 'fd_error':
        bench_fd_error(args)
    elif args.cmd == 'step':
        bench_step(args)
    elif args.cmd == 'conv':
        bench_conv(args)
    elif args.cmd == 'loader':
        bench_loader(
            args.n,
            batch=args.batch,
            workers=args.workers,
            val_side=args.val_side,
            randaug=args.randaug,
            reprob=args.reprob,
        )
    else:
        bench_attack(args)


if __name__ == '__main__':
    sys.exit(cli(main, sys.argv[1:]))
