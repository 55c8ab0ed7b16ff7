"""`make check-gpu`: proves the CUDA path on a fresh GPU box in about 12 minutes on one GPU, with
whatever torch the machine has (FFCV, timm and pyautoattack are not needed; numpy, Pillow and
pytest are). Without a GPU it says so in one line and exits 0.

    python -m tools.check_gpu             # every step below, each under its own time limit, then a summary
    python -m tools.check_gpu profile     # only the profile of one ResNet-50 GradNorm step per conv
    python -m tools.check_gpu --dry-run   # the same steps on the CPU at toy sizes (the script itself, not the GPU)
    python -m tools.check_gpu --ckpt=runs/fashion-mnist/resnet_demo_pool-gradnorm-gelu/ckpt.pt --skip=batchnorm
        # AutoAttack on a checkpoint already evaluated on the CPU (compare with its eval_linf.json);
        # --data=DIR: Fashion-MNIST's IDX files when not at /usr/share/datasets/fashion-mnist

1. the CUDA tests (test_conv.py, test_compile.py: the fast conv against native, compiled against eager)
2. one demo epoch under a 1-process torchrun (NCCL): compiled exact GradNorm with the fast conv and
   its per-epoch evaluation; then attack.py on its checkpoint, also under torchrun
   then: attack.py --autoattack (needs pyautoattack) on --ckpt, else on that epoch's checkpoint, alone
   on the GPU so that its time per 1,000 images means something
3. bench.py step, resnet50 and vit_small at 224, bf16: standard, exact GradNorm eager and compiled
   with each conv (native, fast), PGD-3, peak memory
4. bench.py conv batchnorm: nn.BatchNorm2d against a BatchNorm of primitive ops, ResNet-50 eager
5. the top CUDA kernels of one ResNet-50 GradNorm step with each conv, from torch.profiler
Logs go to runs/check_gpu/. Exit status: 0 when every step passed.
"""
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
NEEDS = ('numpy', 'PIL')  # every step imports data.py (train.py, bench.py, attack.py)


def fashion_or_synthetic(out, n, fashion=FASHION):
    """The real Fashion-MNIST if it is there, else n random images in its format (the check is about
    the CUDA path, not accuracy)."""
    if n is None and os.path.exists(os.path.join(fashion, 't10k-labels-idx1-ubyte.gz')):
        return fashion, 'Fashion-MNIST'
    from data import write_idx  # numpy: imported once the script said what this machine has
    n = n or 10000
    os.makedirs(out, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for split, m in (('train', n), ('t10k', n // 4)):
        for kind, t in (('images-idx3', torch.randint(0, 256, (m, 28, 28), generator=g)),
                        ('labels-idx1', torch.randint(0, 10, (m,), generator=g))):
            write_idx(os.path.join(out, f'{split}-{kind}-ubyte.gz'), t)
    return out, f'{n} random images in Fashion-MNIST format'


def steps(logs, dry, fashion=FASHION, ckpt=None):
    """-> groups of (name, commands run one after the other, seconds allowed, strings the output must
    hold, modules needed); the steps of a group run at the same time (correctness only), timed ones
    alone. dry: toy models on the CPU and no compiling (Inductor on a CPU takes minutes), so some
    expected strings differ."""
    py = sys.executable
    data, what = fashion_or_synthetic(os.path.join(logs, 'fashion'), 512 if dry else None, fashion)
    torchrun = [py, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1']
    demo = os.path.join(logs, 'demo')
    train = [*torchrun, 'train.py', '--objective=gradnorm', '--gradnorm_impl=exact', '--epochs=1', f'--data={data}',
             '--loader=torchvision', f'--out={demo}', '--overwrite=true',
             *(['--batch_size=64', '--eval_n=64', '--eval_steps=2', '--compile=off'] if dry else ['--eval_n=500'])]
    evaluate = [*torchrun, 'attack.py', '--ckpt', os.path.join(demo, 'ckpt.pt'), '--images', '64' if dry else '500',
                '--attacks', 'ce-10', 'margin-10', '--no-autoattack', '--square-queries', '0',
                '--json', os.path.join(logs, 'demo_eval.json')]
    autoattack = [py, 'attack.py', '--ckpt', ckpt or os.path.join(demo, 'ckpt.pt'), '--autoattack', f'--data={data}',
                  '--json', os.path.join(logs, 'autoattack.json'), *(['--images=64', '--compile=off'] if dry else [])]
    cnn, vit = ('resnet_demo', 'vit_demo') if dry else ('resnet50', 'vit_small')
    sizes = ['--res=28', '--batch=8', '--warmup=1', '--repeats=2'] if dry else \
        ['--res=224', '--batch=128', '--warmup=2', '--repeats=5']
    bench = [py, '-m', 'tools.bench', 'step', *sizes, '--compile=none' if dry else '--compile=gradnorm']
    compiled = '' if dry else ' compiled'
    bn = [py, '-m', 'tools.bench', 'conv', 'batchnorm', '--eager', f'--model={cnn}', *sizes[:1], '--batch=8' if dry else '--batch=64',
          *sizes[2:]]
    return [
        [('CUDA tests', [[py, '-m', 'pytest', '-q', '-rs', '-k', 'cuda', 'test_conv.py', 'test_compile.py']], 260,
          ['skipped' if dry else 'passed'], NEEDS + ('pytest',)),
         (f'torchrun demo epoch and evaluation ({what})', [train, evaluate], 240,
          ['conv=fast', 'final: clean', 'PGD:'] + ([] if dry else ['compile=True', 'torch.compile: 1 graph(s)']), NEEDS)],
        [(f'autoattack {"--ckpt" if ckpt else "demo epoch"}', [autoattack], 120, ['autoattack '], NEEDS + ('pyautoattack',))],
        # compiled native: "CUDA error: misaligned address" on resnet50 (torch 2.11, H100), which kills the process
        [(f'bench {cnn}', [[*bench, f'--model={cnn}', '--skip=edgereg,gradnorm exact compiled native']], 240,
          [f'exact{compiled} fast', 'double backprop: exact native'], NEEDS)],
        # the ViT's only convolution is its patch embedding: one compile (fast) instead of two
        [(f'bench {vit}', [[*bench, f'--model={vit}', '--skip=edgereg,gradnorm exact compiled native']], 120,
          [f'exact{compiled} fast'], NEEDS)],
        [(f'batchnorm {cnn}', [bn], 60, ['primitive BN'], NEEDS)],
        [(f'profile {cnn}', [[py, '-m', 'tools.check_gpu', 'profile', *(['--dry-run'] if dry else [])]], 60, ['top kernels, fast conv'], ())],
    ]


def start(name, cmds, limit, logs):
    """Runs cmds one after the other (stopping at the first failure) in their own process group, so
    that torchrun's workers die with it when the time limit kills it."""
    log, t0 = os.path.join(logs, name.split(' (')[0].replace(' ', '_') + '.log'), time.time()
    p = subprocess.Popen(' && '.join(shlex.join(c) for c in cmds), shell=True, cwd=HERE, stdout=open(log, 'w'),
                         stderr=subprocess.STDOUT, start_new_session=True)
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

        def step():
            with torch.autocast(device, torch.bfloat16, enabled=not dry):
                loss, _ = gradnorm.gradnorm(net, x.clone().requires_grad_(), y, 4 / 255, alpha)
            loss.backward()
            net.zero_grad(set_to_none=True)

        for _ in range(2):
            step()
        if not dry:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with torch.profiler.profile(activities=[activity]) as prof:
            step()
            if not dry:
                torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if kernel_time(e, device) > 0]
        total = sum(kernel_time(e, device) for e in events)
        peak = f', peak {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB' if not dry else ''
        print(f'\ntop kernels, {conv} conv: {total / 1e3:.1f} ms of {device} time in one step{peak}')
        for e in sorted(events, key=lambda e: -kernel_time(e, device))[:12]:
            t = kernel_time(e, device)
            print(f'{t / 1e3:9.2f} ms {100 * t / total:5.1f}% {e.count:5d}x  {e.key[:110]}')
        slow = sum(kernel_time(e, device) for e in events if 'precomputed_convolve_sgemm' in e.key)
        print(f'precomputed_convolve_sgemm: {slow / 1e3:.1f} ms ({100 * slow / total:.0f}%)', flush=True)
        del net


def run_all(dry, skip=(), fashion=FASHION, ckpt=None):
    logs = os.path.join(HERE, 'runs', 'check_gpu-dry' if dry else 'check_gpu')
    os.makedirs(logs, exist_ok=True)
    found = {m: importlib.util.find_spec(m) is not None for m in NEEDS + ('pytest', 'torchvision', 'timm', 'ffcv',
                                                                           'pyautoattack')}
    device = 'CPU (dry run: toy sizes)' if dry else f'{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})'
    print(f'check-gpu: {device} | torch {torch.__version__} | Python {sys.version.split()[0]} | '
          + ' '.join(f'{m}:{"yes" if ok else "no"}' for m, ok in found.items()) + f' | logs in {logs}', flush=True)
    t0, results = time.time(), []
    for group in steps(logs, dry, fashion, ckpt):
        for name in (s[0] for s in group if any(w in s[0] for w in skip)):
            results.append((name, 'SKIPPED (--skip)', 0, '-'))
        group = [s for s in group if not any(w in s[0] for w in skip)]
        missing = {name: [m for m in needs if not found[m]] for name, _, _, _, needs in group}
        for name in (n for n, m in missing.items() if m):
            results.append((name, f'SKIPPED (no {", ".join(missing[name])}: pip install it)', 0, '-'))
        group = [s for s in group if not missing[s[0]]]
        if not group:
            continue
        print(f'\n==== running: {", ".join(f"{n} (limit {l * SLACK:.0f} s)" for n, _, l, _, _ in group)}', flush=True)
        running = [(name, want, start(name, cmds, limit, logs)) for name, cmds, limit, want, _ in group]
        results += [(name, *finish(name, want, *handle)) for name, want, handle in running]
    print(f'\n==== check-gpu summary ({(time.time() - t0) / 60:.1f} min, {device})')
    for name, status, seconds, log in results:
        print(f'{status:<14} {seconds:6.0f} s  {name}  ({os.path.relpath(log, HERE) if log != "-" else ""})')
    return 0 if all(status == 'PASS' for _, status, *_ in results) else 1


def main(argv):
    opts = dict(a.removeprefix('--').split('=', 1) for a in argv if a.startswith('--') and '=' in a)
    unknown = set(opts) - {'skip', 'data', 'ckpt'}
    bad = [f'unknown option --{k}' for k in unknown]
    if 'ckpt' in opts and not os.path.isfile(opts['ckpt']):
        bad.append(f'no file {opts["ckpt"]}')
    if 'data' in opts and not os.path.isdir(opts['data']):
        bad.append(f'no folder {opts["data"]}')
    if bad:
        print(f'check-gpu: error: {bad[0]} '
              '(options: profile, --dry-run, --skip=STEP,..., --data=FASHION_MNIST_DIR, --ckpt=DEMO_CKPT)')
        return 2
    dry = '--dry-run' in argv
    if not dry and not torch.cuda.is_available():
        print(f'check-gpu: no CUDA GPU visible to torch {torch.__version__} here; nothing to check')
        return 0
    if 'profile' in argv:
        profile(dry)
        return 0
    return run_all(dry, [w for w in opts.get('skip', '').split(',') if w], opts.get('data', FASHION), opts.get('ckpt'))


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
