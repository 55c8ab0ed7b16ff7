"""Step 4 of tools/check_gpu.py (python -m tools.check_gpu paper): the paper's Swin-B on this GPU, its
step costs in float32 and bf16, the largest micro-batch and the --accum each recipe needs."""

import gc
import math
import statistics
import time
from contextlib import nullcontext

import torch

# ---------------------------------------------------------------- paper: the paper's model, costs and sizes

SWINB = 'swin_base_patch4_window7_224'
# the rows, and the recipe whose per-GPU batch each would train (config.RECIPES); each row runs as
# training runs it (compiled on the GPU, eager on the dry run's CPU), so 'x pgd3' is like against like
PAPER_ROWS = {
    'standard': 'swinb_standard',
    'gradnorm exact': 'swinb_gradnorm',
    'gradnorm fd': 'swinb_gradnorm',
    'edgereg': 'swinb_edge',
    'fgsm at': 'swinb_pgd',
    'pgd3 at': 'swinb_pgd',
}


def toy_swin(conv='native'):
    """The dry run's stand-in for Swin-B: timm's Swin at 32 px, two stages of one block, width 24."""
    from timm.models.swin_transformer import SwinTransformer

    import models

    torch.manual_seed(0)
    net = SwinTransformer(
        img_size=32,
        patch_size=4,
        window_size=4,
        embed_dim=24,
        depths=(1, 1),
        num_heads=(1, 2),
        num_classes=10,
        drop_path_rate=0.0,
    )
    return models.use_conv(models.TimmModel(net, models.IMAGENET_MEAN, models.IMAGENET_STD), conv)


def swinb(conv='native'):
    import models

    torch.manual_seed(0)
    return models.build_model(SWINB, 'gelu', conv=conv)


# how running out of memory reads: CUDA's caching allocator, cuBLAS/cuDNN workspaces, the CPU allocator
OOM_WORDS = ('out of memory', 'ALLOC_FAILED', "can't allocate memory")


def out_of_memory(e):
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and any(w in str(e) for w in OOM_WORDS)
    )


def largest_batch(fits, start, cap, seconds, grow=2.0):
    """The largest micro-batch b <= cap with fits(b): growing by `grow` from start until one does not
    fit, then bisection to within 1/16, for at most `seconds` (checked between trials).
    -> (largest that fit or 0, smallest that did not or None)"""
    lo, hi, b, t0 = 0, None, max(1, min(start, cap)), time.time()
    while True:
        if fits(b):
            lo = b
        else:
            hi = b
        if hi is None and b >= cap or hi is not None and hi - lo <= max(1, lo // 16):
            return lo, hi
        if time.time() - t0 > seconds:
            return lo, hi
        b = min(max(int(grow * b), b + 1), cap) if hi is None else (lo + hi) // 2


def park(s, device):
    """Move one row's model, gradients and optimizer state to device: each micro-batch search has
    the card to itself."""
    s['model'].to(device)
    for st in s['opt'].state.values():
        for k, v in st.items():
            if torch.is_tensor(v):  # fused AdamW's step count too: it lives beside the parameters
                st[k] = v.to(device)


def fits(s, b, classes, device, autocast, cap_bytes):
    """Whether one training step of row s at micro-batch b runs without running out of memory. On the
    CPU (the dry run) the card is cap_bytes: the step's peak memory growth must stay below it (making
    allocations fail for real, under an address-space limit, crashed oneDNN's bf16 kernels)."""
    from tools.bench_grad import timed_step

    x = torch.rand(b, *s['x'].shape[1:], device=device).contiguous(memory_format=s['fmt'])
    y = torch.randint(0, classes, (b,), device=device)
    try:
        _, peak = timed_step(s['model'], s['opt'], s['fn'], x, y, device, autocast)
        return device.type == 'cuda' or peak <= cap_bytes
    except Exception as e:
        if not out_of_memory(e):
            raise
        return False
    finally:
        del x, y
        s['model'].zero_grad(set_to_none=True)
        gc.collect()
        if device.type == 'cuda':
            torch.cuda.empty_cache()


def search(state, p, device, autocast, deadline):
    """The largest micro-batch of each row, alone on the card, starting from what its peak memory per
    image predicts; rows past the deadline are left unsearched."""
    for s in state.values():
        park(s, torch.device('cpu'))
    for name, s in state.items():
        if time.time() > deadline:
            s['fit'] = 'no time'
            continue
        park(s, device)
        gc.collect()
        if device.type == 'cuda':
            torch.cuda.empty_cache()  # cached blocks back to the driver, where mem_get_info sees them
        per_image = max(statistics.median(s['peaks']) / p['batch'], 1)
        free = torch.cuda.mem_get_info()[0] if device.type == 'cuda' else p['cap_bytes']
        start = max(p['batch'], int(0.8 * free / per_image))  # activations grow with the batch, the rest not
        trial = lambda b, s=s: fits(s, b, p['classes'], device, autocast, p['cap_bytes'])
        lo, hi = largest_batch(trial, start, p['cap'], min(p['search_s'], deadline - time.time()), grow=1.25)
        if hi is None:
            s['fit'] = f'>= {lo}' + (' (cap)' if lo == p['cap'] else ' (time)')
        else:
            s['fit'] = f'{lo}' if hi - lo <= max(1, lo // 16) else f'{lo}-{hi - 1} (time)'
        s['micro'] = lo
        oom = f', too large at {hi}' if hi else ''
        print(f'largest micro-batch {name}: {s["fit"]}{oom}', flush=True)
        park(s, torch.device('cpu'))


def fd_accuracy(p, device):
    """The finite difference's parameter-gradient error against float64 double backprop, on the
    paper's model at 2 images: float32 without TF32 (what fd runs), with TF32, under bf16 autocast."""
    from gradnorm import gradnorm
    from tools.bench_grad import fd_error, reference_grad

    model = p['build']().to(device).train()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, p['res'], p['res'], generator=g).to(device)
    y = torch.randint(0, p['classes'], (2,), generator=g).to(device)
    tf32(device, False)
    ref = reference_grad(model, x, y, 4 / 255)
    errs = {
        'exact, float32 TF32 off': fd_error(model, x, y, 4 / 255, ref=ref, fn=gradnorm),
        'fd, float32 TF32 off': fd_error(model, x, y, 4 / 255, ref=ref),
    }
    if device.type == 'cuda':
        tf32(device, True)
        errs['fd, float32 TF32 on'] = fd_error(model, x, y, 4 / 255, ref=ref)
    bf16 = torch.autocast(device.type, torch.bfloat16)
    errs['fd, bf16 autocast'] = fd_error(model, x, y, 4 / 255, ref=ref, autocast=bf16)
    print(
        'parameter gradient vs float64 double backprop (2 images, eps 4/255): '
        + ', '.join(f'{k} {100 * v:.2g}%' for k, v in errs.items()),
        flush=True,
    )
    del model, ref


def tf32(device, on):
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on


def paper_settings(dry):
    if dry:
        return dict(
            device='cpu',
            build=toy_swin,
            name='toy Swin (2 stages, width 24)',
            res=32,
            classes=10,
            batch=2,
            warmup=1,
            repeats=2,
            cap=256,
            search_s=1,
            cap_bytes=16 * 2**20,
            budget=20,
        )
    return dict(
        device='cuda',
        build=swinb,
        name=SWINB,
        res=224,
        classes=1000,
        batch=32,
        warmup=2,
        repeats=5,
        cap=4096,
        search_s=20,
        cap_bytes=0,
        budget=230,
    )


def paper(dry):
    """Step 4: the paper's Swin-B at 224 px in float32 (TF32 off) and bf16, side by side; then the
    largest micro-batch of each row, and the --accum it gives each recipe."""
    import argparse

    from gradnorm import FD_H
    from tools.bench import methods, time_rows, warm_up
    from tools.bench_grad import hardware
    from train import plan

    p = paper_settings(dry)
    if dry:  # toy sizes: a second thread only spins against the other steps of the dry run
        torch.set_num_threads(1)
    device, t0 = torch.device(p['device']), time.time()
    deadline = t0 + p['budget']
    torch._dynamo.config.trace_autograd_ops = True
    fd_accuracy(p, device)
    info = dict(in_ch=3, num_classes=p['classes'], img_size=p['res'])
    args = argparse.Namespace(
        model=p['name'], act='gelu', memory_format='auto', warmup=p['warmup'], repeats=p['repeats']
    )
    g = torch.Generator().manual_seed(0)
    x = torch.rand(p['batch'], 3, p['res'], p['res'], generator=g).to(device)
    y = torch.randint(0, p['classes'], (p['batch'],), generator=g).to(device)
    tables = {}
    for amp in (False, True):
        tf32(device, amp)
        autocast = torch.autocast(device.type, torch.bfloat16) if amp else nullcontext()
        # dynamic: one compile serves every micro-batch of the search; no Inductor on the dry run's CPU
        rows = methods(False, False, 4 / 255, FD_H, device, amp, 'gelu', dynamic=True,
                       which=lambda name, c: name in PAPER_ROWS and c != dry)
        rows = {n: (fn, c, cfg, plan(cfg, device).conv) for n, (fn, c, cfg) in rows.items()}
        precision = 'bf16 autocast' if amp else 'float32, TF32 off'
        print(f'\n{precision}: {", ".join(rows)}', flush=True)
        state = warm_up(rows, args, info, x, y, device, autocast, build=p['build'])
        time_rows(state, args, y, device, autocast)
        tables[precision] = state
        search(state, p, device, autocast, deadline)
    paper_table(tables, p, hardware(device), time.time() - t0)


def accum_for(per_gpu, micro):
    """--accum for a per-GPU batch: ceil(per_gpu / micro), raised to a divisor of per_gpu (train.py
    refuses a batch that does not split evenly into micro-batches)."""
    return next(k for k in range(math.ceil(per_gpu / micro), per_gpu + 1) if per_gpu % k == 0)


def paper_table(tables, p, hw, seconds):
    from config import RECIPES

    print(
        f'\n{p["name"]} gelu 3x{p["res"]}x{p["res"]}, {p["classes"]} classes | {hw} | '
        f'torch {torch.__version__} | eps 4/255 | micro-batch {p["batch"]} timed: median of {p["repeats"]} '
        f'interleaved steps after {p["warmup"]} warm-up | {seconds:.0f} s'
    )
    print(
        f'{"precision":<18} {"method":<24} {"warm-up s":>9} {"step ms":>8} {"img/s":>7} {"x pgd3":>7} '
        f'{"MiB/img":>8} {"largest micro-batch":>20} {"--accum x micro (8 GPUs)":>24}'
    )
    for precision, state in tables.items():
        med = {n: statistics.median(s['times']) for n, s in state.items()}
        pgd = med.get('pgd3 at compiled', med.get('pgd3 at', math.nan))
        for name, s in state.items():
            per_gpu = RECIPES[PAPER_ROWS[name.removesuffix(' compiled')]]['batch_size'] // 8
            accum = accum_for(per_gpu, s['micro']) if s.get('micro') else None
            split = f'{accum} x {per_gpu // accum}' if accum else '-'
            mib = statistics.median(s['peaks']) / p['batch'] / 2**20
            print(
                f'{precision:<18} {name:<24} {s["warm"]:9.1f} {1000 * med[name]:8.1f} '
                f'{p["batch"] / med[name]:7.1f} {med[name] / pgd:6.2f}x {mib:8.1f} {s.get("fit", "-"):>20} '
                f'{f"{split} ({per_gpu}/GPU)":>24}'
            )
    print(
        '--accum: the smallest divisor of the recipe\'s per-GPU batch that is >= per-GPU batch / largest '
        'micro-batch (train.py splits it evenly); training also holds an EMA copy and DDP\'s gradient '
        'buckets: leave a margin',
        flush=True,
    )


if __name__ == '__main__':  # a part of another command: --help says which
    print(__doc__)
