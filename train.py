"""Train a model robust to adversarial perturbations from its natural input gradients
(Rodriguez-Munoz, Wang, Torralba, ECCV 2024), or one of the baselines it is compared with.

    python train.py --objective=gradnorm --act=gelu         # one process: the Fashion-MNIST demo
    python -m tools.torchrun --nproc_per_node=8 train.py   # DDP (torchrun; exit 75 when preempted)

Options are config.py's Config fields, --key=value. Read top to bottom: the objective, the step, the
epoch, checkpoints, the loop.
"""
import copy
import dataclasses
import json
import math
import os
import secrets
import sys
import time
import types
from contextlib import nullcontext, suppress

import torch
import torch.distributed as dist
import torch.nn as nn

import checkpoint
import config
from attack import fgsm_at, pgd_at
from augment import STEP, rand_u32
from config import Stopped, Stops, UserError, cli
from data import check_sizes, data_info, make_loaders
from edge_reg import edge_reg
from evaluate import epoch_metrics, pgd_name
from gradnorm import SMOOTH_ACTS, choose_impl, fd_float32, gradnorm, gradnorm_fd, standard
from models import build_model, normalization, param_groups

# ---------------------------------------------------------------- the objective, as training runs it

def plan(cfg, device):
    """GradNorm's impl (gradnorm.choose_impl) and why; double backward (exact GradNorm, EdgeReg) gets
    models.Conv2d and contiguous tensors, first-order ones nn.Conv2d and channels_last (docs/speed.md)."""
    impl, why, amp = None, '', device.type == 'cuda' and cfg.amp
    if cfg.objective == 'gradnorm':
        try:
            impl, why = choose_impl(cfg.gradnorm_impl, device.type, amp, cfg.act)
        except ValueError as e:
            raise UserError(f'--gradnorm_impl={cfg.gradnorm_impl}: {e}') from None
    second = cfg.objective == 'edge' or impl == 'exact'
    conv = ('fast' if second else 'native') if cfg.conv == 'auto' else cfg.conv
    fmt = torch.contiguous_format if second else torch.channels_last
    return types.SimpleNamespace(impl=impl, why=why, conv=conv, fmt=fmt)


def objective(cfg, device, compiled=False, norm=None):
    """-> fn(model, x, y, t), t = epochs elapsed (alphas grow within an epoch, as the authors'). norm: the
    model's (mean, std), for EdgeReg. Alphas go in as tensors: the compiled objective never recompiles."""
    fd = plan(cfg, device).impl == 'fd'
    fn = {'standard': standard, 'gradnorm': gradnorm_fd if fd else gradnorm, 'pgd': pgd_at,
          'fgsm': fgsm_at, 'edge': edge_reg}[cfg.objective]
    # fullgraph, so a double backward cannot silently fall back to eager; the attacks (PGD, FGSM) make
    # intermediates require grad, which Dynamo can only handle with a graph break
    fn = torch.compile(fn, fullgraph=cfg.objective not in ('pgd', 'fgsm')) if compiled else fn
    scalar = lambda v: torch.tensor(float(v), device=device)
    if cfg.objective == 'standard':
        return lambda m, x, y, t: fn(m, x, y, cfg.smoothing)
    if cfg.objective == 'pgd':
        return lambda m, x, y, t: fn(m, x, y, cfg.eps, cfg.pgd_steps, cfg.smoothing)
    if cfg.objective == 'fgsm':
        return lambda m, x, y, t: fn(m, x, y, cfg.eps, cfg.smoothing)
    if cfg.objective == 'edge':
        a, b, c = map(float, cfg.edge_alpha.split(','))
        alpha = lambda t: scalar(min(a + b * t, c))
        return lambda m, x, y, t: fn(m, x, y, alpha(t), norm=norm, smoothing=cfg.smoothing)
    weights = tuple(map(float, cfg.gn_weights.split(',')))
    h = {'h': cfg.fd_h} if fd else {}
    ramp = lambda t: scalar(min(t / max(cfg.ramp_epochs, 1e-9), 1.0))
    return lambda m, x, y, t: fn(m, x, y, cfg.eps, ramp(t), smoothing=cfg.smoothing, weights=weights, **h)


class Step(nn.Module):
    """Model and objective as one module for DDP: DDP's forward runs eagerly, the objective compiled."""
    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, x, y, t):
        return self.loss_fn(self.model, x, y, t)


def lr_at(cfg, t):
    """Linear warm-up, then cosine decay to min_lr; t = epochs elapsed."""
    if t < cfg.warmup_epochs:
        return cfg.lr * t / cfg.warmup_epochs
    p = (t - cfg.warmup_epochs) / max(cfg.epochs - cfg.warmup_epochs, 1e-9)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))


# ---------------------------------------------------------------- a run and its state

@dataclasses.dataclass
class Run:
    cfg: object
    model: nn.Module
    ema: nn.Module | None
    opt: torch.optim.Optimizer
    net: nn.Module      # Step(model, objective), DDP-wrapped under torchrun
    loaders: tuple      # train, val, robust val
    info: dict          # what the model knows of the data (build_model's kwargs)
    run_id: str         # names this run's checkpoints, so retention never deletes another run's
    rank: int
    world: int
    device: torch.device
    plan: types.SimpleNamespace  # plan(cfg, device)
    step: int = 0       # optimizer steps taken (or skipped) since the start of training
    bad_steps: int = 0  # non-finite steps in a row
    ema_pairs: list = dataclasses.field(default_factory=list)  # (EMA, model) state_dict tensors, in place
    epoch: int = 0      # the epoch under way and this rank's images of it done: where a resume continues,
    pos: int = 0        # whatever the batch size
    sums: dict = dataclasses.field(default_factory=dict)  # the epoch's running sums of the terms over
    done: int = 0       # its steps done, checkpointed: a resumed epoch reports the whole epoch's means
    changes: list = dataclasses.field(default_factory=list)  # settings changed at resumes (--resume_changes)
    data_id: dict = dataclasses.field(default_factory=dict)  # checkpoint.identity of the training data

    @property
    def steps(self):  # per epoch
        return len(self.loaders[0])


def initial_model(cfg, info, conv, log):
    """Random, timm's pretrained weights, or a checkpoint's (a recipe's stage 2 starts from stage 1's)."""
    try:
        model = build_model(cfg.model, cfg.act, pretrained=cfg.init == 'pretrained', conv=conv, **info)
    except ValueError as e:  # a ViT's patches that do not tile the images; timm's weights not found
        raise UserError(f'--model={cfg.model}: {e}') from None
    if cfg.init not in ('', 'pretrained'):
        ck = checkpoint.load_checkpoint(cfg.init, weights=True)
        old = ck['model']  # the trained weights, not the EMA (the authors' stage 2 too)
        if ck['config'] and ck['config']['objective'] != cfg.objective:
            was = ck['config']['objective']
            log(f'--init={cfg.init}: the weights of a {was} run, trained on with {cfg.objective}')
        new = model.state_dict()
        if old.keys() != new.keys() or any(v.shape != new[k].shape for k, v in old.items()):
            raise UserError(f'--init={cfg.init} holds another model than --model={cfg.model} with this '
                            'data\'s classes')
        model.load_state_dict(old)
    return model


def start(cfg, rank, world, device, log):
    """Loaders, model (pretrained or resumed), EMA, optimizer and DDP: everything training needs."""
    how = plan(cfg, device)
    torch.manual_seed(cfg.seed)
    info = data_info(cfg)  # every option is checked before an image is read: weights, checkpoints, sizes
    model = initial_model(cfg, info, how.conv, log)
    path, ck = checkpoint.find_resume(cfg, log) if cfg.resume else (None, None)
    data_id = checkpoint.identity(cfg.data)
    if ck:
        changes = checkpoint.check_resume(cfg, ck, path, info, data_id)
        model.load_state_dict(ck['model'])
    check_sizes(cfg, data_id['size'], rank, world)
    *loaders, info = make_loaders(cfg, rank, world, device)
    if device.type == 'cuda' and not cfg.amp:
        # float32 as the paper (cuDNN's convolutions: PyTorch's default)
        torch.backends.cuda.matmul.allow_tf32 = False
    if how.impl == 'fd':
        fd_float32(device.type)
    model = model.to(device, memory_format=how.fmt)
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema else None
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, fused=device.type == 'cuda')
    compiled = cfg.compile == 'on' or (cfg.compile == 'auto' and device.type == 'cuda')
    if compiled:
        torch._dynamo.config.trace_autograd_ops = True  # lets the inner autograd.grad compile
        torch._dynamo.config.optimize_ddp = False       # one graph: DDP syncs after backward
    net = Step(model, objective(cfg, device, compiled, normalization(model)))
    if world > 1:  # gloo: a group of DDP's own, which outlives destroy_process_group (config.end_distributed)
        group = dist.new_group() if device.type == 'cpu' else None
        net = nn.parallel.DistributedDataParallel(net, process_group=group)
    run_id = (ck or {}).get('run') or secrets.token_hex(4)
    run = Run(cfg, model, ema, opt, net, loaders, info, run_id, rank, world, device, how, data_id=data_id)
    if ema is not None:
        run.ema_pairs = list(zip(ema.state_dict().values(), model.state_dict().values()))
    if ck:
        run.opt.load_state_dict(ck['optimizer'])
        if ema is not None and ck['ema'] is not None:
            ema.load_state_dict(ck['ema'])
        checkpoint.restore(run, ck, path, changes, log)
    if rank == 0:
        checkpoint.clear_old_run(cfg)
    return run, compiled


# ---------------------------------------------------------------- one step, one epoch

def micro_steps(run, x, y, t):
    """Forward and backward of each --accum micro-batch, loss / accum: the global batch's mean gradient
    whatever the split; DDP syncs on the last. -> (mean loss, mean terms)"""
    cfg, n = run.cfg, run.cfg.accum
    x = x.contiguous(memory_format=run.plan.fmt)  # the loaders deliver channels_last
    amp = torch.autocast('cuda', torch.bfloat16) if run.device.type == 'cuda' and cfg.amp else nullcontext()
    run.opt.zero_grad(set_to_none=True)
    loss, parts = 0.0, {}
    for i, (xi, yi) in enumerate(zip(x.chunk(n), y.chunk(n))):
        # a leaf outside any compiled code
        xi = xi.detach().requires_grad_(cfg.objective in ('gradnorm', 'edge'))
        sync = run.net.no_sync() if run.world > 1 and i < n - 1 else nullcontext()
        with sync:
            with amp:
                li, pi = run.net(xi, yi, t)
            (li / n).backward()
        loss = loss + li.detach() / n
        parts = {k: parts.get(k, 0.0) + v.detach() / n for k, v in pi.items()}
    return loss, parts


def train_step(run, x, y, t, stop):
    """Objective, backward, clipping, AdamW, EMA; a non-finite step is skipped on every rank.
    -> (terms or None if skipped, the stop signal any rank received, or 0)"""
    cfg = run.cfg
    for group in run.opt.param_groups:
        group['lr'] = lr_at(cfg, t)
    # PGD starts, EdgeReg's sampled classes: a function of (seed, step, rank), so a resumed run (any
    # rank) draws what the uninterrupted one drew, with no generator state to save
    torch.manual_seed(rand_u32(cfg.seed, run.step, run.rank, STEP))
    buffers = [b.clone() for b in run.model.buffers()]  # BatchNorm's statistics, kept if the step is skipped
    loss, parts = micro_steps(run, x, y, t)
    grad_norm = nn.utils.clip_grad_norm_(run.model.parameters(), cfg.clip)
    finite = torch.isfinite(loss) and torch.isfinite(grad_norm)
    flags = torch.tensor([float(stop[0] if stop else 0), float(not finite)], device=run.device)
    if run.world > 1:
        dist.all_reduce(flags, dist.ReduceOp.MAX)
    run.step += 1
    if flags[1]:
        with torch.no_grad():
            for b, old in zip(run.model.buffers(), buffers):
                b.copy_(old)
        run.bad_steps += 1
        bad = [k for k, v in parts.items() if not torch.isfinite(v)] or ['gradient']
        where = f'epoch {int(t)} step {(run.step - 1) % run.steps}'
        if run.bad_steps >= cfg.max_bad_steps:
            raise UserError(f'non-finite {bad[0]} for {run.bad_steps} steps in a row at {where}: training '
                            f'stopped; {newest_checkpoint(run)} (try a lower --lr)')
        if run.rank == 0:
            config.say(f'warning: non-finite {bad[0]} at {where}: step skipped ({run.bad_steps} in a row)',
                       sys.stdout)
        return None, int(flags[0])
    run.bad_steps = 0
    run.opt.step()
    with torch.no_grad():
        for e, p in run.ema_pairs:
            e.lerp_(p, 1 - cfg.ema) if e.is_floating_point() else e.copy_(p)
    return {k: v.detach().float() for k, v in parts.items()}, int(flags[0])


def train_epoch(run, epoch, stop):
    """One pass over this rank's shard (from where a resumed run left off). -> (mean terms, img/s)"""
    train_loader, steps = run.loaders[0], run.steps
    train_loader.set_epoch(epoch)
    run.net.train(not run.cfg.bn_eval)
    skip, seen, t0, per_epoch = run.pos, 0, time.time(), steps * (run.cfg.batch_size // run.world)
    for i, (x, y) in enumerate(train_loader if run.pos < per_epoch else ()):  # else stopped in its evaluation
        if skip >= len(y):  # resuming inside this epoch: same order, skip what was done
            skip -= len(y)
            continue
        if skip:  # resumed with another batch size: the rest of this batch
            x, y, skip = x[skip:], y[skip:], 0
        parts, stopping = train_step(run, x, y, epoch + run.pos / per_epoch, stop)
        run.pos += len(y)
        for k, v in (parts or {}).items():
            run.sums[k] = run.sums.get(k, 0.0) + v
        run.done += parts is not None
        seen += len(y) * run.world
        if stopping:
            save(run)
            raise Stopped(stopping, f'checkpoint at step {run.step} in {run.cfg.out}; continue with '
                          '--resume=auto')
        if run.cfg.ckpt_every and run.step % run.cfg.ckpt_every == 0 and i < steps - 1:
            save(run)
        if run.rank == 0:
            progress(run, epoch, i, seen / (time.time() - t0))
    if run.rank == 0 and sys.stdout.isatty():
        print()  # the bar's line ends
    terms = {k: v.item() / max(run.done, 1) for k, v in run.sums.items()}
    return terms, seen / max(time.time() - t0, 1e-9) if seen else None


def progress(run, epoch, i, speed):
    """The progress bar: drawn over itself on a terminal, else a whole line 10 times an epoch (a log)."""
    tty = sys.stdout.isatty()
    if (i % 20 and i != run.steps - 1) if tty else 10 * (i + 1) // run.steps == 10 * i // run.steps:
        return
    terms = ' '.join(f'{k} {v.item() / max(run.done, 1):.3f}' for k, v in run.sums.items())
    bar = '#' * int(30 * (i + 1) / run.steps)
    print(f'{chr(13) * tty}epoch {epoch} [{bar:.<30}] {terms} {speed:.0f} img/s', end='\n' * (not tty),
          flush=True)


# ---------------------------------------------------------------- checkpoints, the end of an epoch

def newest_checkpoint(run):
    """For the divergence message: every checkpoint is of finite weights (save checks)."""
    saved = checkpoint.checkpoints(run.cfg.out, run.run_id)
    if not saved:
        return f'this run wrote no checkpoint to {run.cfg.out}'
    step = int(os.path.basename(saved[-1]).split('-')[1])
    return f'its newest checkpoint, {saved[-1]} (step {step}), is finite'


def save(run):
    """Rank 0 writes OUT/ckpt-<step>-<run id>.pt (finite weights only), hard-links OUT/ckpt.pt to it and
    keeps this run's newest --keep."""
    if run.rank != 0:
        return
    cfg = run.cfg
    state = [run.model.state_dict()] + ([run.ema.state_dict()] if run.ema else [])
    if not all(torch.isfinite(v).all() for sd in state for v in sd.values() if v.is_floating_point()):
        raise UserError(f'the weights are not finite at step {run.step}: not saved; {newest_checkpoint(run)} '
                        '(try a lower --lr)')
    path = os.path.join(cfg.out, f'ckpt-{run.step:08d}-{run.run_id}.pt')
    checkpoint.save_checkpoint(path, dict(
        model=run.model.state_dict(), ema=run.ema.state_dict() if run.ema else None,
        optimizer=run.opt.state_dict(), step=run.step, epoch=run.epoch, images=run.pos * run.world,
        steps_per_epoch=run.steps, batch_size=cfg.batch_size, sums={k: v.cpu() for k, v in run.sums.items()},
        done=run.done, changes=run.changes, data_id=run.data_id, config=dataclasses.asdict(cfg),
        data_info=run.info, run=run.run_id, version=config.__version__))
    latest = os.path.join(cfg.out, 'ckpt.pt')
    try:
        with suppress(FileNotFoundError):
            os.remove(latest + '.tmp')  # left by a crash between the two lines below
        os.link(path, latest + '.tmp')
        os.replace(latest + '.tmp', latest)
        for old in checkpoint.checkpoints(cfg.out, run.run_id)[:-cfg.keep]:
            os.remove(old)
    except OSError as e:
        raise UserError(f'cannot point {latest} at {path} ({e.strerror}): {path} is complete; '
                        'continue with --resume=auto') from None


def end_epoch(run, epoch, terms, img_per_s, log, stops):
    """Checkpoint (a resume from it evaluates the epoch), evaluate the model (and its EMA), where a stop
    signal ends the program at once, then a line in OUT/metrics.jsonl; the next epoch starts."""
    cfg, (_, val, robust_val) = run.cfg, run.loaders
    save(run)
    try:
        with stops.at_once():
            metrics = dict(run=run.run_id, epoch=epoch, lr=lr_at(cfg, epoch + 1), img_per_s=img_per_s,
                           **terms, **epoch_metrics(run.model, val, robust_val, cfg.eps, cfg.eval_steps,
                                                    cfg.seed))
            if run.ema is not None:
                ema = epoch_metrics(run.ema, val, robust_val, cfg.eps, cfg.eval_steps, cfg.seed)
                metrics.update({f'ema_{k}': v for k, v in ema.items()})
    except Stopped as e:
        raise Stopped(e.signum, f'checkpoint at step {run.step} in {cfg.out}; continue with --resume=auto '
                      f'(it evaluates epoch {epoch} first)') from None
    if changes := [c for c in run.changes if c['epoch'] == epoch]:  # settings changed at a resume in it
        metrics['changes'] = changes
    log(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()}))
    if run.rank == 0:
        checkpoint.append_line(os.path.join(cfg.out, 'metrics.jsonl'), json.dumps(metrics))
    run.epoch, run.pos, run.sums, run.done = epoch + 1, 0, {}, 0
    return metrics


# ---------------------------------------------------------------- the loop

def train(cfg):
    """Claims --out for this run (rank 0), then trains: loop."""
    rank, world, device = config.setup_distributed()
    log = print if rank == 0 else (lambda *a, **k: None)
    if cfg.recipe:
        log(config.describe_recipe(cfg))
    if cfg.batch_size % (world * cfg.accum):
        raise UserError(f'--batch_size={cfg.batch_size} does not split into {world} ranks x '
                        f'--accum={cfg.accum} micro-batches: make it a multiple of {world * cfg.accum}')
    claim = checkpoint.claim_out(cfg) if rank == 0 else None
    try:
        with Stops() as stops:
            return loop(cfg, rank, world, device, log, stops)
    finally:
        if claim:
            checkpoint.release(claim, cfg)


def loop(cfg, rank, world, device, log, stops):
    """For each epoch: a pass over the data with the objective, a checkpoint, then evaluation. Stop signals:
    at the next step, or at once in the evaluation (config.Stops)."""
    run, compiled = start(cfg, rank, world, device, log)
    if run.epoch >= cfg.epochs:
        n = run.epoch + (run.pos >= run.steps * (cfg.batch_size // world))  # trained through, not evaluated
        log(f'{cfg.out}: the run finished {n} epoch{"s" * (n != 1)} (--epochs={cfg.epochs}): nothing to '
            'train (to train longer: --epochs=N)')
        return run.model
    params = sum(p.numel() for p in run.model.parameters())
    log(f'{cfg.objective} | {cfg.model} {cfg.act} | {params:,} params | {world} x {device.type} '
        f'| compile={compiled} | eps={cfg.eps:.4g} | {cfg.out} | v{config.__version__}'
        + (f' | gradnorm_impl={run.plan.why}' if run.plan.why else '') + f' | conv={run.plan.conv}')
    if rank == 0 and run.plan.impl == 'fd' and cfg.act not in SMOOTH_ACTS:
        config.warn(f'--gradnorm_impl={run.plan.why}')
    log(f'per epoch: clean accuracy on the validation set; pgd_upper = {pgd_name(cfg)}, an upper bound on '
        'robust accuracy (AutoAttack, the number to report: evaluate.py --autoattack)')
    metrics = {}
    for epoch in range(run.epoch, cfg.epochs):
        terms, img_per_s = train_epoch(run, epoch, stops)
        if compiled and not metrics:  # once; a fullgraph objective is one graph, each extra one a recompile
            graphs = torch._dynamo.utils.counters['stats']['unique_graphs']
            more = f', {graphs - 1} recompile(s)' if cfg.objective != 'pgd' else ' (PGD: graph breaks)'
            log(f'torch.compile: {graphs} graph(s) in the first epoch' + more)
        metrics = end_epoch(run, epoch, terms, img_per_s, log, stops)
    if metrics:
        clean, upper = 100 * metrics['clean_acc'], 100 * metrics['pgd_upper']
        log(f'final: clean {clean:.1f}% | {pgd_name(cfg)} {upper:.1f}% (an upper bound; AutoAttack: '
            f'python evaluate.py --ckpt {cfg.out}/ckpt.pt --autoattack) | {cfg.out}/ckpt.pt')
    config.end_distributed()
    return run.model


def main(argv):
    """A stop signal ends it with one line on rank 0 and exit status 75, 130 for Ctrl-C (config.cli)."""
    if {'-h', '--help'} & set(argv):
        return config.print_help(__doc__)
    try:
        train(config.parse_config(argv))
    finally:
        config.end_distributed()  # a stopped run's too: its exit status must stay 75


if __name__ == '__main__':
    sys.exit(cli(main, sys.argv[1:]))
