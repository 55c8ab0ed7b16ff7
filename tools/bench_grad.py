"""The gradient machinery behind GradNorm's choices, measured side by side (python -m tools.bench CMD):

    fd_error  finite-difference GradNorm against float64 double backprop (CPU)
    conv      models.Conv2d's choices: skipped weight gradients, a primitive-op BatchNorm, first-order steps
    twice     which timm architectures survive a double backward (CPU)

and timed_step, the one timed training step that tools/bench.py's tables and these commands share.
"""

import copy
import ctypes
import platform
import re
import statistics
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn

import models
from attack import pgd_at
from config import checked
from gradnorm import FD_H, gradnorm, gradnorm_fd_unchecked, standard
from models import build_model

# ---------------------------------------------------------------- one timed training step

LIBC = ctypes.CDLL(None)


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


def fd_error(model, x, y, eps, h=FD_H, ref=None, autocast=None, weights=(0.8, 1.2),
             fn=gradnorm_fd_unchecked):
    """||g - g_ref|| / ||g_ref||: the float32 parameter gradient of fn (finite differences at h, or
    fn=gradnorm: double backprop) against float64 double backprop of the same weights. Unchecked: it
    also measures what gradnorm_fd refuses (autocast, TF32)."""
    ref = reference_grad(model, x, y, eps, weights) if ref is None else ref
    kw = dict(h=h) if fn is gradnorm_fd_unchecked else {}
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
    print(
        f'\nconv {args.what}: {hardware(device)}, {torch.get_num_threads()} threads | '
        f'torch {torch.__version__} | '
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


def add_args(sub):
    """The conv, fd_error and twice commands of tools/bench.py."""
    positive = checked(int, lambda v: v >= 1, 'at least 1')
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


if __name__ == '__main__':  # a part of another command: --help says which
    print(__doc__)
