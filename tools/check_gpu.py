"""`make check-gpu`: proves the CUDA path on a fresh GPU box in about 10 minutes on one GPU, with
whatever torch the machine has (FFCV and pyautoattack are not needed; numpy, Pillow, pytest,
torchvision and timm are). Without a GPU it says so in one line and exits 0.

    python -m tools.check_gpu             # every default step, each under its own time limit, then a summary
    python -m tools.check_gpu --all       # also the fast conv's measurements (steps 6-9, ~8 minutes more)
    python -m tools.check_gpu paper       # only step 4: the paper's Swin-B table
    python -m tools.check_gpu profile     # only the profile of one ResNet-50 GradNorm step per conv
    python -m tools.check_gpu --dry-run   # the same steps on the CPU, toy sizes (tests the script only)
    python -m tools.check_gpu --ckpt=runs/fashion-mnist/resnet_demo_pool-gradnorm-gelu/ckpt.pt
        # AutoAttack on a checkpoint already evaluated on the CPU (compare with its eval_linf.json);
        # --data=DIR: Fashion-MNIST's IDX files when not at /usr/share/datasets/fashion-mnist

Steps 1-3 run at the same time (correctness only), the timed ones alone:
1. the CUDA tests (tests/test_models.py, test_train_compile.py, test_gradnorm.py: the fast conv against
   native, compiled against eager, finite differences without TF32 against float64)
2. one demo epoch under a 1-process torchrun (NCCL): compiled exact GradNorm with the fast conv and
   its per-epoch evaluation; then evaluate.py on its checkpoint, also under torchrun
3. one epoch of a small synthetic ImageFolder (JPEG files) through --loader=torchvision under
   torchrun: compiled GradNorm, EMA, checkpoints; then a second epoch from them with --resume=auto
4. paper: timm's swin_base_patch4_window7_224 (GELU) at 224 px, float32 (TF32 off, the paper's
   setting) and bf16: standard, exact GradNorm compiled, finite-difference GradNorm (float32),
   EdgeReg, PGD-3 AT; step time, peak memory per image, the largest micro-batch that fits, --accum
   for the recipes; and the finite difference's error against float64 double backprop
5. evaluate.py --autoattack (needs pyautoattack) on --ckpt, else on step 2's checkpoint, alone on the
   GPU so that its time per 1,000 images means something
With --all: 6-7. bench.py step, resnet50 and vit_small at 224, bf16; 8. bench.py conv batchnorm;
9. the top CUDA kernels of one ResNet-50 GradNorm step with each conv, from torch.profiler.
Logs go to runs/check_gpu/. Exit status: 0 when every step passed.
"""

import gzip
import importlib.util
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = '/usr/share/datasets/fashion-mnist'
SLACK = float(os.environ.get('CHECK_GPU_SLACK', 1))  # multiplies every step's time limit
NEEDS = ('numpy', 'PIL')  # every step imports data.py (train.py, bench.py, evaluate.py)


def write_idx(path, t):
    """t (uint8) as one gzipped IDX file, data.read_idx's inverse."""
    header = bytes([0, 0, 8, t.ndim]) + b''.join(int(n).to_bytes(4, 'big') for n in t.shape)
    with gzip.open(path, 'wb') as f:
        f.write(header + t.to(torch.uint8).contiguous().numpy().tobytes())


def fashion_or_synthetic(out, n, fashion=FASHION):
    """The real Fashion-MNIST if it is there, else n random images in its format (the check is about
    the CUDA path, not accuracy)."""
    if n is None and os.path.exists(os.path.join(fashion, 't10k-labels-idx1-ubyte.gz')):
        return fashion, 'Fashion-MNIST'
    n = n or 10000
    os.makedirs(out, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for split, m in (('train', n), ('t10k', n // 4)):
        for kind, t in (
            ('images-idx3', torch.randint(0, 256, (m, 28, 28), generator=g)),
            ('labels-idx1', torch.randint(0, 10, (m,), generator=g)),
        ):
            write_idx(os.path.join(out, f'{split}-{kind}-ubyte.gz'), t)
    return out, f'{n} random images in Fashion-MNIST format'


def image_folder(root, classes=4, train=8, val=4, seed=0):
    """A small ImageNet-style ImageFolder, root/{train,val}/<class>/<i>.JPEG: random JPEG files of
    a few sizes (the random-resized crop and the resize of --loader=torchvision get work to do)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (('train', train), ('val', val)):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f'c{c}'), exist_ok=True)
            for i in range(n):
                h, w = ((40, 48), (48, 40), (44, 44))[(c + i) % 3]
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, f'c{c}', f'{i}.JPEG'), quality=90)
    return root


def steps(logs, dry, fashion=FASHION, ckpt=None, extra=False):
    """-> groups of (name, commands run one after the other, seconds allowed, strings the output must
    hold, modules needed); the steps of a group run at the same time (correctness only), timed ones
    alone. dry: toy models on the CPU and no compiling (Inductor on a CPU takes minutes), so some
    expected strings differ. extra: the fast conv's measurements too (docs/speed.md, section 3)."""
    py = sys.executable
    data, what = fashion_or_synthetic(os.path.join(logs, 'fashion'), 256 if dry else None, fashion)
    train, evaluate, autoattack, folder_run = commands(py, logs, data, dry, ckpt)
    compiled = [] if dry else ['compile=True', 'torch.compile: 1 graph(s)']
    tests = ['tests/test_models.py', 'tests/test_train_compile.py', 'tests/test_gradnorm.py']
    dry_flag = ['--dry-run'] if dry else []
    exact = 'gradnorm exact ' if dry else 'gradnorm exact compiled'  # a table row of each precision
    exact_rows = [f'float32, TF32 off  {exact}', f'bf16 autocast      {exact}']
    groups = [
        [
            ('CUDA tests', [[py, '-m', 'pytest', '-q', '-rs', '-k', 'cuda', *tests]], 240,
             ['skipped' if dry else 'passed'], NEEDS + ('pytest', 'timm')),
            (f'torchrun demo epoch and evaluation ({what})', [train, evaluate], 240,
             ['conv=fast', 'final: clean', 'PGD:', *compiled], NEEDS),
            ('torchrun ImageFolder epoch and resume (EMA, checkpoints, --resume=auto)',
             [[*folder_run, '--epochs=1', '--overwrite=true'], [*folder_run, '--epochs=2', '--resume=auto']],
             240, ['ema_clean_acc', 'resumed from', 'at epoch 1 step 0', 'final: clean', *compiled],
             NEEDS + ('torchvision',)),
        ],
        [
            ('paper Swin-B table', [[py, '-m', 'tools.check_gpu', 'paper', *dry_flag]], 270,
             ['fd, float32 TF32 off', 'largest micro-batch', 'float32, TF32 off  gradnorm fd', *exact_rows],
             NEEDS + ('timm',)),
        ],
        [
            (f'autoattack {"--ckpt" if ckpt else "demo epoch"}', [autoattack], 90, ['autoattack '],
             NEEDS + ('pyautoattack',)),
        ],
    ]
    if dry:  # nothing is timed on the CPU: the paper's table runs beside steps 1-3
        groups = [groups[0] + groups[1], *groups[2:]]
    return groups + (conv_steps(py, data, dry) if extra else [])


def commands(py, logs, data, dry, ckpt):
    """-> the demo's torchrun epoch and evaluation, AutoAttack on its checkpoint (or ckpt), and an
    ImageFolder run under torchrun (without its --epochs)."""
    torchrun = [py, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1']
    demo = os.path.join(logs, 'demo')
    train = [*torchrun, 'train.py', '--objective=gradnorm', '--gradnorm_impl=exact', '--epochs=1',
             f'--data={data}', '--loader=torchvision', f'--out={demo}', '--overwrite=true',
             *(['--batch_size=64', '--eval_n=64', '--eval_steps=2', '--compile=off'] if dry
               else ['--eval_n=500'])]
    evaluate = [*torchrun, 'evaluate.py', '--ckpt', os.path.join(demo, 'ckpt.pt'),
                '--images', '64' if dry else '500',
                '--attacks', 'ce-10', 'margin-10', '--no-autoattack', '--square-queries', '0',
                '--json', os.path.join(logs, 'demo_eval.json')]
    autoattack = [py, 'evaluate.py', '--ckpt', ckpt or os.path.join(demo, 'ckpt.pt'), '--autoattack',
                  f'--data={data}', '--json', os.path.join(logs, 'autoattack.json'),
                  *(['--images=64', '--compile=off'] if dry else [])]
    folder = image_folder(os.path.join(logs, 'imagefolder'))
    # --recipe= keeps the plain defaults: ImageNet-like data would get the paper's Swin-B run
    folder_run = [*torchrun, 'train.py', f'--data={folder}', '--loader=torchvision', '--recipe=', '--res=32',
                  '--objective=gradnorm', '--batch_size=16', '--ema=0.9', '--ckpt_every=1', '--eval_n=16',
                  '--eval_steps=2', '--workers=2', f'--out={os.path.join(logs, "imagefolder_run")}',
                  *(['--compile=off'] if dry else [])]
    return train, evaluate, autoattack, folder_run


def conv_steps(py, data, dry):
    """Steps 6-9: the fast conv against native, measured (docs/speed.md, section 3)."""
    cnn, vit = ('resnet_demo', 'vit_demo') if dry else ('resnet50', 'vit_small')
    sizes = (
        ['--res=28', '--batch=8', '--warmup=1', '--repeats=2']
        if dry
        else ['--res=224', '--batch=128', '--warmup=2', '--repeats=5']
    )
    # --data=: random 224 px images, ImageNet's shape; the dry run's models eat Fashion-MNIST
    bench = [
        py,
        '-m',
        'tools.bench',
        'step',
        f'--data={data}' if dry else '--data=',
        *sizes[1:],
        '--compile=none' if dry else '--compile=gradnorm',
        *([] if dry else sizes[:1]),
    ]
    compiled = '' if dry else ' compiled'
    bn = [
        py,
        '-m',
        'tools.bench',
        'conv',
        'batchnorm',
        '--eager',
        f'--model={cnn}',
        *sizes[:1],
        '--batch=8' if dry else '--batch=64',
        *sizes[2:],
    ]
    profile = [py, '-m', 'tools.check_gpu', 'profile', *(['--dry-run'] if dry else [])]
    return [
        # compiled native: "CUDA error: misaligned address" on resnet50 (torch 2.11, H100) kills the process
        [
            (
                f'bench {cnn}',
                [[*bench, f'--model={cnn}', '--skip=edgereg,gradnorm exact compiled native']],
                240,
                [f'exact{compiled} fast', 'double backprop: exact native'],
                NEEDS,
            )
        ],
        # the ViT's only convolution is its patch embedding: one compile (fast) instead of two
        [
            (
                f'bench {vit}',
                [[*bench, f'--model={vit}', '--skip=edgereg,gradnorm exact compiled native']],
                120,
                [f'exact{compiled} fast'],
                NEEDS,
            )
        ],
        [(f'batchnorm {cnn}', [bn], 60, ['primitive BN'], NEEDS)],
        [(f'profile {cnn}', [profile], 60, ['top kernels, fast conv'], ())],
    ]


def start(name, cmds, limit, logs, env=None):
    """Runs cmds one after the other (stopping at the first failure) in their own process group, so
    that torchrun's workers die with it when the time limit kills it."""
    log, t0 = os.path.join(logs, name.split(' (')[0].replace(' ', '_') + '.log'), time.time()
    p = subprocess.Popen(
        ' && '.join(shlex.join(c) for c in cmds),
        shell=True,
        cwd=HERE,
        stdout=open(log, 'w'),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )
    expired = threading.Event()
    timer = threading.Timer(limit * SLACK, lambda: expired.set() or os.killpg(p.pid, signal.SIGKILL))
    timer.start()
    return p, timer, expired, log, t0


def finish(name, want, p, timer, expired, log, t0):
    """-> (status, seconds, log) once the step ended: PASS when it exited 0 in time and its output
    holds every string in want."""
    p.wait()
    timer.cancel()
    seconds = time.time() - t0
    out = open(log, errors='replace').read()
    print(f'\n==== {name} ({seconds:.0f} s)\n{out}', flush=True)
    missing = [w for w in want if w not in out]
    if expired.is_set():
        return 'TIMEOUT', seconds, log
    if p.returncode or missing:
        return f'FAIL (exit {p.returncode}' + (f', no {missing[0]!r})' if missing else ')'), seconds, log
    return 'PASS', seconds, log


def kernel_time(e, device):
    """An event's own time on the device (the attribute's name changed across torch versions)."""
    if device == 'cpu':
        return e.self_cpu_time_total
    return getattr(e, 'self_device_time_total', None) or getattr(e, 'self_cuda_time_total', 0)


def profile(dry):
    """One GradNorm step of ResNet-50 (bf16, batch 64, contiguous, as training runs it) per conv:
    its top kernels, the share of cuDNN's legacy precomputed_convolve_sgemm, peak memory."""
    import gradnorm
    import models

    device, model, n, res = ('cpu', 'resnet_demo', 8, 28) if dry else ('cuda', 'resnet50', 64, 224)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    x, y = torch.rand(n, 3, res, res, device=device), torch.randint(0, 10, (n,), device=device)
    alpha = torch.tensor(1.0, device=device)
    activity = torch.profiler.ProfilerActivity.CPU if dry else torch.profiler.ProfilerActivity.CUDA
    for conv in ('native', 'fast'):
        torch.manual_seed(0)
        net = models.build_model(model, 'gelu', conv=conv).to(device).train()

        def step(net):
            with torch.autocast(device, torch.bfloat16, enabled=not dry):
                loss, _ = gradnorm.gradnorm(net, x.clone().requires_grad_(), y, 4 / 255, alpha)
            loss.backward()
            net.zero_grad(set_to_none=True)

        for _ in range(2):
            step(net)
        if not dry:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with torch.profiler.profile(activities=[activity]) as prof:
            step(net)
            if not dry:
                torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if kernel_time(e, device) > 0]
        total = sum(kernel_time(e, device) for e in events)
        peak = f', peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB' if not dry else ''
        print(f'\ntop kernels, {conv} conv: {total / 1e3:.1f} ms of {device} time in one step{peak}')
        for e in sorted(events, key=lambda e: -kernel_time(e, device))[:12]:
            t = kernel_time(e, device)
            print(f'{t / 1e3:9.2f} ms {100 * t / total:5.1f}% {e.count:5d}x  {e.key[:110]}')
        slow = sum(kernel_time(e, device) for e in events if 'precomputed_convolve_sgemm' in e.key)
        print(f'precomputed_convolve_sgemm: {slow / 1e3:.1f} ms ({100 * slow / total:.0f}%)', flush=True)
        del net


def run_all(dry, skip=(), fashion=FASHION, ckpt=None, extra=False):
    logs = os.path.join(HERE, 'runs', 'check_gpu-dry' if dry else 'check_gpu')
    os.makedirs(logs, exist_ok=True)
    found = {
        m: importlib.util.find_spec(m) is not None
        for m in NEEDS + ('pytest', 'torchvision', 'timm', 'ffcv', 'pyautoattack')
    }
    device = (
        'CPU (dry run: toy sizes)' if dry else f'{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})'
    )
    print(
        f'check-gpu: {device} | torch {torch.__version__} | Python {sys.version.split()[0]} | '
        + ' '.join(f'{m}:{"yes" if ok else "no"}' for m, ok in found.items())
        + f' | logs in {logs}',
        flush=True,
    )
    t0, results = time.time(), []
    # toy sizes on the CPU: parallel steps with one thread each, not two spinning against each other
    env = dict(os.environ, OMP_NUM_THREADS='1') if dry else None
    for group in steps(logs, dry, fashion, ckpt, extra):
        for name in (s[0] for s in group if any(w in s[0] for w in skip)):
            results.append((name, 'SKIPPED (--skip)', 0, '-'))
        group = [s for s in group if not any(w in s[0] for w in skip)]
        missing = {name: [m for m in needs if not found[m]] for name, _, _, _, needs in group}
        for name in (n for n, m in missing.items() if m):
            results.append((name, f'SKIPPED (no {", ".join(missing[name])}: pip install it)', 0, '-'))
        group = [s for s in group if not missing[s[0]]]
        if not group:
            continue
        limits = [f'{n} (limit {limit * SLACK:.0f} s)' for n, _, limit, _, _ in group]
        print(f'\n==== running: {", ".join(limits)}', flush=True)
        running = [(name, want, start(name, cmds, limit, logs, env)) for name, cmds, limit, want, _ in group]
        results += [(name, *finish(name, want, *handle)) for name, want, handle in running]
    print(f'\n==== check-gpu summary ({(time.time() - t0) / 60:.1f} min, {device})')
    for name, status, seconds, log in results:
        print(f'{status:<14} {seconds:6.0f} s  {name}  ({os.path.relpath(log, HERE) if log != "-" else ""})')
    return 0 if all(status == 'PASS' for _, status, *_ in results) else 1


def main(argv):
    if {'-h', '--help'} & set(argv):
        print(__doc__.strip())  # its options are the words and --key=value forms shown there
        return 0
    opts = dict(a.removeprefix('--').split('=', 1) for a in argv if a.startswith('--') and '=' in a)
    unknown = set(opts) - {'skip', 'data', 'ckpt'}
    bad = [f'unknown option --{k}' for k in unknown]
    words = ('paper', 'profile', '--dry-run', '--all')
    bad += [f'unknown option {a}' for a in argv if '=' not in a and a not in words]
    if 'ckpt' in opts and not os.path.isfile(opts['ckpt']):
        bad.append(f'no file {opts["ckpt"]}')
    if 'data' in opts and not os.path.isdir(opts['data']):
        bad.append(f'no folder {opts["data"]}')
    if bad:
        print(
            f'check-gpu: error: {bad[0]} '
            '(options: paper, profile, --dry-run, --all, --skip=STEP,..., --data=FASHION_MNIST_DIR, '
            '--ckpt=DEMO_CKPT)'
        )
        return 2
    dry = '--dry-run' in argv
    if not dry and not torch.cuda.is_available():
        print(f'check-gpu: no CUDA GPU visible to torch {torch.__version__} here; nothing to check')
        return 0
    if 'profile' in argv:
        profile(dry)
        return 0
    if 'paper' in argv:
        from tools.check_gpu_paper import paper

        paper(dry)
        return 0
    skip = [w for w in opts.get('skip', '').split(',') if w]
    return run_all(dry, skip, opts.get('data', FASHION), opts.get('ckpt'), '--all' in argv)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
