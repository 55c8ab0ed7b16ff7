"""Robustness from natural input gradients (Rodriguez-Munoz, Wang, Torralba, ECCV 2024).

Read top to bottom: config -> objectives -> checkpoints -> training loop (models in models.py,
data in data.py, PGD in attack.py, EdgeReg in edge_reg.py).
    python gradnorm.py --objective=gradnorm --act=gelu          # one process
    torchrun --nproc_per_node=8 gradnorm.py --objective=gradnorm  # DDP, same code path
Every model eats images in [0,1]; normalization is a buffer inside the model, so input
gradients and attacks live in pixel space.
"""
import copy
import dataclasses
import glob
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext, suppress

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attack import UserError, pgd, robust_accuracy
from data import data_kind, make_loaders
from edge_reg import edge_reg
from models import build_model

__version__ = '0.1.0'


@dataclasses.dataclass
class Config:
    objective: str = 'gradnorm'   # standard | gradnorm | pgd | edge
    gradnorm_impl: str = 'auto'   # auto: fd on the CPU with a smooth activation, else exact (double backprop)
    model: str = 'resnet_demo'
    act: str = 'gelu'             # relu | gelu | silu: GradNorm needs a smooth one
    data: str = '/usr/share/datasets/fashion-mnist'
    epochs: int = 4
    batch_size: int = 128         # global, split over ranks
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr: float = 1e-5
    smoothing: float = 0.1        # label smoothing
    clip: float = 1.0             # gradient-norm clipping
    eps: float = 0.1              # L-inf budget in pixel units: GradNorm's eps and the eval's
    ramp_epochs: float = 1.0      # GradNorm alpha: 0 -> 1 over these epochs (paper: 5)
    edge_alpha: str = '1,0.09,19' # EdgeReg alpha = min(a + b*epoch, c)
    pgd_steps: int = 3            # adversarial-training baseline: PGD-k, step 2*eps/k
    ema: float = 0.0              # EMA decay of the weights, 0 = off
    eval_n: int = 1000            # fixed validation subset for PGD accuracy
    eval_steps: int = 20          # PGD steps for the per-epoch robust accuracy
    compile: str = 'auto'         # auto (= on CUDA only) | on | off
    out: str = 'runs/demo'
    resume: str = ''              # a checkpoint to continue from, or 'auto': the newest valid one in --out
    ckpt_every: int = 0           # also checkpoint every N steps (0: at epoch ends only)
    keep: int = 3                 # checkpoints kept in --out
    max_bad_steps: int = 5        # non-finite steps in a row before training stops
    seed: int = 0
    loader: str = 'ffcv'          # ffcv | torchvision (fallback for ImageFolder data)
    res: int = 224                # ImageNet training/eval resolution
    workers: int = 8
    init: str = ''                # '' | torchvision: start from torchvision's pretrained weights
    fd_h: float = 1e-3            # finite-difference step of --gradnorm_impl=fd (pixel units)
    res_start: int = 0            # progressive resizing: train res ramps res_start -> res (0 = off)
    mixup: float = 0.0            # Mixup/CutMix alpha (one of the two per batch), 0 = off


# The paper's ImageNet recipe: the defaults when --data is ImageNet (.beton files or an ImageFolder).
# epochs and batch_size are this repo's choice (the recipe scales lr with the global batch).
IMAGENET_RECIPE = dict(model='resnet50', epochs=100, batch_size=1024, weight_decay=0.05, warmup_epochs=5.0,
                       min_lr=1e-5, smoothing=0.1, ema=0.9998, clip=1.0, ramp_epochs=5.0, eps=4 / 255, res=224,
                       eval_n=5000)


CHOICES = dict(objective=('standard', 'gradnorm', 'pgd', 'edge'), gradnorm_impl=('exact', 'fd', 'auto'),
               compile=('auto', 'on', 'off'), loader=('ffcv', 'torchvision'))


def parse_config(argv):
    cfg, fields, given = Config(), {f.name: f for f in dataclasses.fields(Config)}, set()
    for arg in argv:
        key, _, val = arg.lstrip('-').partition('=')
        key = key.replace('-', '_')
        if key not in fields:
            raise UserError(f'unknown option --{key}; known: ' + ' '.join(fields))
        try:
            setattr(cfg, key, type(getattr(cfg, key))(val))
        except ValueError:
            raise UserError(f'--{key}={val}: expected a {type(getattr(cfg, key)).__name__}')
        given.add(key)
    for key, ok in CHOICES.items():
        if getattr(cfg, key) not in ok:
            raise UserError(f'--{key}={getattr(cfg, key)}: choose one of {", ".join(ok)}')
    if data_kind(cfg.data) != 'fashion':
        for key, val in IMAGENET_RECIPE.items():
            setattr(cfg, key, getattr(cfg, key) if key in given else val)
        if 'lr' not in given:
            cfg.lr = 1.25e-3 * cfg.batch_size / 512
        if 'init' not in given and cfg.model == 'resnet50':
            cfg.init = 'torchvision'  # the paper fine-tunes torchvision's ResNet-50 with GELU swapped in
    return cfg


# ---------------------------------------------------------------- objectives
# Each is (model, x, y, ...) -> (loss, {term: value}); x holds images in [0,1].

def standard(model, x, y, smoothing=0.1):
    ce = F.cross_entropy(model(x), y, label_smoothing=smoothing)
    return ce, {'ce': ce}


def gradnorm(model, x, y, eps, alpha, smoothing=0.1):
    """0.8*CE + 1.2*alpha*eps*mean_i ||grad_x CE_i||_1, the first-order cost of an L-inf attack.

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
    return 0.8 * ce + 1.2 * alpha * penalty, {'ce': ce, 'gradnorm': penalty}


def gradnorm_fd(model, x, y, eps, alpha, h=1e-3, smoothing=0.1):
    """GradNorm without second derivatives (Finlay & Oberman 2019): two forward-backward passes.

    With s = sign(grad_x CE) held fixed, the penalty's parameter gradient is eps times the derivative
    of grad_theta CE along s: eps * [grad_theta CE(x + h*s) - grad_theta CE(x)] / h + O(h).
    Pass 1 gets grad_x (for s and the penalty) and G0 = grad_theta CE(x) from one backward. Pass 2's
    CE(x + h*s) goes into a surrogate whose backward (the training loop's, so DDP syncs as usual) is
    0.8*G0 + k*(G1 - G0), k = 1.2*alpha*eps/h, and whose value is the true loss.
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
    k = 1.2 * alpha * eps / h
    ce_h = F.cross_entropy(model(x.detach() + h * gx.sign()), y, label_smoothing=smoothing)
    surrogate = k * ce_h + (0.8 - k) * sum((g * p).sum() for g, p in zip(g0, params))
    loss = 0.8 * ce + 1.2 * alpha * penalty
    return surrogate + (loss - surrogate).detach(), {'ce': ce.detach(), 'gradnorm': penalty}


def pgd_at(model, x, y, eps, steps=3, smoothing=0.1):
    """Adversarial-training baseline: CE on PGD-k examples (random start, step 2*eps/k)."""
    x_adv = pgd(model, x, y, eps, steps, 2 * eps / steps)
    ce = F.cross_entropy(model(x_adv), y, label_smoothing=smoothing)
    return ce, {'ce_adv': ce}


def gradnorm_impl(cfg, device):
    """auto: finite differences where they are accurate (float32 on the CPU, smooth activation) and
    cheaper; double backprop on CUDA, whose bf16/TF32 rounding swamps the difference quotient."""
    impl = cfg.gradnorm_impl
    if impl == 'auto':
        impl = 'fd' if device.type == 'cpu' and cfg.act != 'relu' else 'exact'
    if impl == 'fd' and device.type == 'cuda':
        raise UserError('--gradnorm_impl=fd needs float32, but CUDA training runs bf16 and TF32: use exact')
    return impl


def memory_format(cfg, device):
    """channels_last for first-order objectives; contiguous for double backward (exact GradNorm,
    EdgeReg), where channels_last measured slower (CPU 1.3-6x, H100 ResNet-50 bf16 eager 1.14x) and
    crashed torch 2.11's compiled ResNet backward on CUDA (misaligned address)."""
    second_order = cfg.objective == 'edge' or (cfg.objective == 'gradnorm' and gradnorm_impl(cfg, device) == 'exact')
    return torch.contiguous_format if second_order else torch.channels_last


def objective(cfg, device, compiled=False):
    """-> fn(model, x, y, t) for the configured objective; t = epochs elapsed (float).
    Only the objective itself is compiled, and alphas go in as tensors, so nothing recompiles
    when they change."""
    a, b, c = map(float, cfg.edge_alpha.split(','))
    scalar = lambda v: torch.tensor(float(v), device=device)
    fd = cfg.objective == 'gradnorm' and gradnorm_impl(cfg, device) == 'fd'
    fn = {'standard': standard, 'gradnorm': gradnorm_fd if fd else gradnorm, 'pgd': pgd_at,
          'edge': edge_reg}[cfg.objective]
    # fullgraph, so a double backward cannot silently fall back to eager; PGD's attack loop makes
    # intermediates require grad, which Dynamo can only handle with a graph break
    fn = torch.compile(fn, fullgraph=cfg.objective != 'pgd') if compiled else fn
    h = {'h': cfg.fd_h} if fd else {}
    return {
        'standard': lambda m, x, y, t: fn(m, x, y, cfg.smoothing),
        'gradnorm': lambda m, x, y, t: fn(
            m, x, y, cfg.eps, scalar(min(t / max(cfg.ramp_epochs, 1e-9), 1.0)), smoothing=cfg.smoothing, **h),
        'pgd': lambda m, x, y, t: fn(m, x, y, cfg.eps, cfg.pgd_steps, cfg.smoothing),
        'edge': lambda m, x, y, t: fn(m, x, y, scalar(min(a + b * int(t), c)), smoothing=cfg.smoothing),
    }[cfg.objective]


class Step(nn.Module):
    """The model and its objective as one module, for DDP to wrap: DDP's forward must run eagerly
    (Dynamo cannot trace it) and the objective, input gradient included, compiled. -> (loss, parts)"""
    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, x, y, t):
        return self.loss_fn(self.model, x, y, t)


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(path, state):
    """Atomic (temp file, fsync, rename): a crash or a full disk mid-write leaves the earlier
    checkpoints as they were, never a truncated file under a valid name."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.isfile(tmp):
            os.remove(tmp)
        raise UserError(f'cannot write checkpoint {path!r} ({e.strerror}); earlier checkpoints are '
                        'intact: free some disk space or pass --out=DIR, then --resume=auto') from None


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise UserError(f'no checkpoint at {path!r}')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # weights_only refuses pickled code; a truncated file fails to unzip
        why = 'it holds pickled Python objects, refused by torch.load(weights_only=True)' \
            if 'weights_only' in str(e) else 'it is truncated or corrupt'
        raise UserError(f'cannot load checkpoint {path!r}: {why}') from None


def find_resume(cfg, log):
    """--resume=PATH, or --resume=auto: the newest checkpoint in --out that loads."""
    if cfg.resume != 'auto':
        return cfg.resume, load_checkpoint(cfg.resume)
    for path in sorted(glob.glob(os.path.join(cfg.out, 'ckpt-*.pt')), reverse=True):
        try:
            return path, load_checkpoint(path)
        except UserError as e:
            log(f'warning: skipping {e}')
    return None, None


def check_same_model(ck, cfg, path):
    old = ck['config']
    if (old['model'], old['act']) != (cfg.model, cfg.act):
        raise UserError(f'{path} holds a {old["model"]}/{old["act"]} model, not the requested '
                        f'{cfg.model}/{cfg.act}: pass --model={old["model"]} --act={old["act"]} or another --out')


def model_from_checkpoint(ck, key='model'):
    cfg = ck['config']
    model = build_model(cfg['model'], cfg['act'], **ck['data_info'])
    model.load_state_dict(ck[key])
    return model


# ---------------------------------------------------------------- training

class Preempted(Exception):
    """SIGTERM/SIGUSR1 (SLURM, Kubernetes): a checkpoint was written; rerun with --resume=auto."""


def lr_at(cfg, t):
    """Linear warm-up, then cosine decay to min_lr; t = epochs elapsed."""
    if t < cfg.warmup_epochs:
        return cfg.lr * t / cfg.warmup_epochs
    p = (t - cfg.warmup_epochs) / max(cfg.epochs - cfg.warmup_epochs, 1e-9)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))


def evaluate(model, val, robust_val, eps, steps, seed):
    """Clean accuracy on the validation set, PGD accuracy on its fixed subset. Its own RNG stream:
    the same attack every epoch, and training's random numbers are left as they were."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.eval()
        with torch.no_grad():
            counts = sum(torch.tensor([(model(x).argmax(1) == y).sum().item(), len(y)], dtype=torch.float64)
                         for x, y in val)
        if dist.is_initialized():
            counts = counts.to(next(model.parameters()).device)  # NCCL reduces GPU tensors only
            dist.all_reduce(counts)
        robust = robust_accuracy(model, robust_val, [eps], steps)
    return {'clean_acc': (counts[0] / counts[1]).item(), 'pgd_acc': robust['robust'][eps]}


def setup_distributed():
    distributed = 'RANK' in os.environ  # set by torchrun
    if distributed:
        dist.init_process_group('nccl' if torch.cuda.is_available() else 'gloo')
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if torch.cuda.is_available():
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device('cpu')
    return distributed, rank, world, device


def train(cfg):
    distributed, rank, world, device = setup_distributed()
    log = print if rank == 0 else (lambda *a, **k: None)
    if rank == 0:
        try:
            os.makedirs(cfg.out, exist_ok=True)
        except OSError as e:
            raise UserError(f'cannot create output directory {cfg.out!r} ({e.strerror}): pass --out=DIR') from None
    torch.manual_seed(cfg.seed)
    train_loader, val, robust_val, info = make_loaders(cfg, rank, world, device)
    model = build_model(cfg.model, cfg.act, **info)
    if cfg.init:  # torchvision's ImageNet ResNet-50: same parameter names; the activation stays cfg.act
        if (cfg.init, cfg.model, info['num_classes']) != ('torchvision', 'resnet50', 1000):
            raise UserError(f'--init={cfg.init} means --init=torchvision: ImageNet-1k ResNet-50 weights, for '
                            f'--model=resnet50 and 1000 classes (not {cfg.model}, {info["num_classes"]}); or pass --init=')
        import torchvision
        model.load_state_dict(torchvision.models.resnet50(weights='IMAGENET1K_V2').state_dict(), strict=True)
    resume_path, ck = find_resume(cfg, log) if cfg.resume else (None, None)
    if ck:
        check_same_model(ck, cfg, resume_path)
        model.load_state_dict(ck['model'])
    compiled = cfg.compile == 'on' or (cfg.compile == 'auto' and device.type == 'cuda')
    fmt = memory_format(cfg, device)
    model = model.to(device, memory_format=fmt)
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema else None
    decay = [p for p in model.parameters() if p.ndim > 1]  # no weight decay on norms and biases
    rest = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{'params': decay, 'weight_decay': cfg.weight_decay},
                             {'params': rest, 'weight_decay': 0.0}], lr=cfg.lr, fused=device.type == 'cuda')
    steps = len(train_loader)
    step, bad_steps = 0, 0  # step: optimizer steps taken (or skipped) since the start of training
    torch.manual_seed(cfg.seed + rank)  # PGD starts, EdgeReg's sampled classes: differ across ranks
    if ck:
        opt.load_state_dict(ck['optimizer'])
        if ema is not None and ck['ema'] is not None:
            ema.load_state_dict(ck['ema'])
        step = ck['step']
        if rank == 0:
            torch.set_rng_state(ck['rng'])
        log(f'resumed from {resume_path} at epoch {step // steps} step {step % steps}')

    if compiled:
        torch._dynamo.config.trace_autograd_ops = True  # lets the inner autograd.grad compile
        torch._dynamo.config.optimize_ddp = False       # one graph: DDP syncs after backward
    net = Step(model, objective(cfg, device, compiled))
    net = nn.parallel.DistributedDataParallel(net) if distributed else net
    autocast = torch.autocast('cuda', torch.bfloat16) if device.type == 'cuda' else nullcontext()
    log(f'{cfg.objective} | {cfg.model} {cfg.act} | {sum(p.numel() for p in model.parameters()):,} params '
        f'| {world} x {device.type} | compile={compiled} | eps={cfg.eps:.4g} | v{__version__}'
        + (f' | gradnorm_impl={gradnorm_impl(cfg, device)}' if cfg.objective == 'gradnorm' else ''))

    def checkpoint():
        if rank != 0:
            return
        path = os.path.join(cfg.out, f'ckpt-{step:08d}.pt')
        save_checkpoint(path, dict(
            model=model.state_dict(), ema=ema.state_dict() if ema else None, optimizer=opt.state_dict(),
            step=step, epoch=step // steps, rng=torch.get_rng_state(), config=dataclasses.asdict(cfg),
            data_info=info, version=__version__))
        latest = os.path.join(cfg.out, 'ckpt.pt')  # a hard link to the newest, for eval and users
        with suppress(FileNotFoundError):
            os.remove(latest + '.tmp')  # left by a crash between the two lines below
        os.link(path, latest + '.tmp')
        os.replace(latest + '.tmp', latest)
        for old in sorted(glob.glob(os.path.join(cfg.out, 'ckpt-*.pt')))[:-cfg.keep]:
            os.remove(old)

    # (EMA tensor, model tensor) pairs, built once: state_dict() values share storage with the
    # parameters and buffers, which the optimizer and BatchNorm update in place
    ema_pairs = list(zip(ema.state_dict().values(), model.state_dict().values())) if ema is not None else []
    stop = []  # the signal that asked us to stop, if any; the caller's handlers come back at the end
    handlers = {s: signal.signal(s, lambda signum, frame: stop.append(signum))
                for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        metrics = {}
        for epoch in range(step // steps, cfg.epochs):
            train_loader.set_epoch(epoch)
            net.train()
            sums, seen, t0 = {}, 0, time.time()
            for i, (x, y) in enumerate(train_loader):
                if i < step - epoch * steps:  # resuming inside this epoch: same order, skip what was done
                    continue
                t = epoch + i / steps
                for group in opt.param_groups:
                    group['lr'] = lr_at(cfg, t)
                x = x.contiguous(memory_format=fmt)  # the loaders deliver channels_last
                x.requires_grad_(cfg.objective in ('gradnorm', 'edge'))  # a leaf outside any compiled code
                with autocast:
                    loss, parts = net(x, y, t)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
                # one all-reduce a step: every rank skips the same steps and stops at the same one
                finite = torch.isfinite(loss) and torch.isfinite(grad_norm)
                flags = torch.tensor([float(bool(stop)), float(not finite)], device=device)
                if distributed:
                    dist.all_reduce(flags, dist.ReduceOp.MAX)
                if flags[1]:
                    bad_steps += 1
                    bad = [k for k, v in parts.items() if not torch.isfinite(v)] or ['gradient']
                    log(f'\nwarning: non-finite {bad[0]} at epoch {epoch} step {i}: '
                        f'step skipped ({bad_steps} in a row)')
                    if bad_steps >= cfg.max_bad_steps:
                        raise UserError(f'non-finite {bad[0]} for {bad_steps} steps in a row at epoch {epoch} '
                                        f'step {i}: training stopped, the last good checkpoint in {cfg.out} '
                                        f'is intact (try a lower --lr)')
                else:
                    bad_steps = 0
                    opt.step()
                    with torch.no_grad():
                        for e, p in ema_pairs:
                            e.lerp_(p, 1 - cfg.ema) if e.is_floating_point() else e.copy_(p)
                    for k, v in parts.items():
                        sums[k] = sums.get(k, 0.0) + v.detach().float()
                step += 1
                seen += len(y) * world
                if flags[0]:
                    checkpoint()
                    raise Preempted(f'signal {stop[0] if stop else "on another rank"}: checkpoint at step {step} '
                                    f'in {cfg.out}; continue with --resume=auto')
                if cfg.ckpt_every and step % cfg.ckpt_every == 0 and i < steps - 1:
                    checkpoint()
                if rank == 0 and (i % 20 == 0 or i == steps - 1):
                    done = int(30 * (i + 1) / steps)
                    terms = ' '.join(f'{k} {v.item() / (i + 1):.3f}' for k, v in sums.items())
                    print(f'\repoch {epoch} [{"#" * done}{"." * (30 - done)}] {terms} '
                          f'{seen / (time.time() - t0):.0f} img/s', end='', flush=True)
            seconds = time.time() - t0
            log()
            if compiled and not metrics:  # once; a fullgraph objective is one graph, each extra one a recompile
                graphs = torch._dynamo.utils.counters['stats']['unique_graphs']
                log(f'torch.compile: {graphs} graph(s) in the first epoch' + (
                    f', {graphs - 1} recompile(s)' if cfg.objective != 'pgd' else ' (PGD: graph breaks)'))
            metrics = dict(epoch=epoch, lr=lr_at(cfg, epoch + 1), img_per_s=seen / seconds, seconds=seconds,
                           **{k: v.item() / steps for k, v in sums.items()},
                           **evaluate(model, val, robust_val, cfg.eps, cfg.eval_steps, cfg.seed))
            if ema is not None:
                metrics.update({f'ema_{k}': v for k, v in
                                evaluate(ema, val, robust_val, cfg.eps, cfg.eval_steps, cfg.seed).items()})
            log(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()}))
            if rank == 0:
                with open(os.path.join(cfg.out, 'metrics.jsonl'), 'a') as f:
                    f.write(json.dumps(metrics) + '\n')
            checkpoint()
        if metrics:
            log(f'final: clean {100 * metrics["clean_acc"]:.1f}% | PGD-{cfg.eval_steps} L-inf eps={cfg.eps:.4g} '
                f'on {cfg.eval_n} test images {100 * metrics["pgd_acc"]:.1f}% | {cfg.out}/ckpt.pt')
        if distributed:
            dist.destroy_process_group()
        return model
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


if __name__ == '__main__':
    try:
        train(parse_config(sys.argv[1:]))
    except UserError as e:
        sys.exit(f'\nerror: {e}')
    except Preempted as e:
        print(f'\npreempted: {e}', file=sys.stderr)
        sys.exit(75)  # EX_TEMPFAIL: try again, e.g. requeue with --resume=auto
