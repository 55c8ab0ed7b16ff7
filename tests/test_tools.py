"""tools/bench.py step (the model's input from the data, ratios to PGD-3) and tools/check_gpu.py:
its dry run on the CPU, and the micro-batch search against a real allocation limit."""

import os
import re
import resource
import subprocess
import sys

import pytest
import torch

from tests.conftest import HERE
from tools import check_gpu
from tools.check_gpu_paper import largest_batch, out_of_memory


def run(*args, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run(
        [sys.executable, '-m', *args], cwd=HERE, capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.parametrize('data,shape', [('tiny', '1x28x28, 10 classes'), ('', '3x32x32, 1000 classes')])
def test_bench_step_takes_the_input_from_the_data(tiny_data, data, shape):
    """The demo model at the data's size (not 3x224x224 with 1000 classes); --data= is ImageNet's shape."""
    data = tiny_data if data == 'tiny' else data
    res = [] if data else ['--res=32']
    p = run(
        'tools.bench', 'step', f'--data={data}', *res, '--batch=8', '--warmup=1', '--repeats=1', '--threads=1'
    )
    assert p.returncode == 0, p.stderr
    assert f'resnet_demo_pool gelu {shape}, batch 8' in p.stdout
    assert re.search(r'warm-up s +step ms .* x standard +x pgd3', p.stdout)
    methods = 'standard', 'gradnorm exact native', 'gradnorm exact fast', 'gradnorm fd', 'edgereg', 'pgd3 at'
    for method in methods:
        assert re.search(rf'^{method} +\d', p.stdout, re.M), method
    assert re.search(r'^pgd3 at .* 1\.00x  channels_last', p.stdout, re.M)
    line = r'^gradnorm/pgd3 \d+\.\d\d \(best: gradnorm .*\| auto picks fd: float32 on cpu'
    assert re.search(line, p.stdout, re.M)


def test_bench_step_refuses_a_size_the_data_does_not_have(tiny_data):
    p = run('tools.bench', 'step', f'--data={tiny_data}', '--res=64')
    assert p.returncode == 2 and p.stderr.startswith('error: --res=64: Fashion-MNIST'), p.stderr


def search_under_a_cap():
    """fits(b) allocates b MiB under one address-space limit, 64 MiB above the size at the start.
    -> (lo, hi, {b: whether it fit})"""
    with open('/proc/self/status') as f:
        limit = int(f.read().split('VmSize:')[1].split()[0]) * 1024 + 64 * 2**20
    old, answers = resource.getrlimit(resource.RLIMIT_AS), {}

    def fits(b):
        resource.setrlimit(resource.RLIMIT_AS, (limit, old[1]))
        try:
            torch.ones(b * 2**18)  # b MiB of float32
            answers[b] = True
        except Exception as e:
            if not out_of_memory(e):
                raise
            answers[b] = False
        finally:
            resource.setrlimit(resource.RLIMIT_AS, old)
        return answers[b]

    lo, hi = largest_batch(fits, 1, 4096, seconds=60)
    return lo, hi, answers


def test_micro_batch_search_finds_a_real_allocation_limit():
    """The CPU allocator fails above the limit, as CUDA's would on a full card; out_of_memory
    recognizes the error and the search brackets the limit. In a fresh process with one malloc arena
    and every large block mapped anew (a fixed mmap threshold), so freed memory cannot hide the limit."""
    code = (
        'import torch; torch.set_num_threads(1)\n'
        'from tests.test_tools import search_under_a_cap\nprint(repr(search_under_a_cap()))'
    )
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='131072', MALLOC_ARENA_MAX='1', OMP_NUM_THREADS='1')
    p = subprocess.run(
        [sys.executable, '-c', code], cwd=HERE, capture_output=True, text=True, timeout=120, env=env
    )
    assert p.returncode == 0, p.stderr[-3000:]
    lo, hi, answers = eval(p.stdout.strip().splitlines()[-1])
    assert 48 <= lo <= 80, (lo, answers)  # 64 MiB, give or take what the process maps besides the tensor
    assert hi is not None and hi - lo <= max(1, lo // 16), (lo, hi, answers)
    assert answers[lo] and not answers[hi], answers
    assert all(fit == (b <= lo) for b, fit in answers.items()), answers  # one threshold, no flicker


def test_check_gpu_dry_run_runs_every_step(capsys):
    """Every step of make check-gpu at toy sizes on the CPU: the CUDA tests (skipped), both torchrun
    epochs (the ImageFolder one with EMA, checkpoints and --resume=auto), the paper's table (a toy
    Swin, both precisions, micro-batch search) and AutoAttack. 45 s here at load 2, 90 s at load 5:
    most of it the torchrun runs (two interpreters each, importing torch) and the paper table's 20 s."""
    code = check_gpu.main(['--dry-run'])  # as python -m tools.check_gpu runs it, less an interpreter's start
    summary = capsys.readouterr().out.split('==== check-gpu summary')[-1]
    assert code == 0, summary
    for step in (
        'CUDA tests',
        'torchrun demo epoch',
        'torchrun ImageFolder epoch and resume',
        'paper Swin-B table',
        'autoattack',
    ):
        assert re.search(rf'^PASS +\d+ s  {step}', summary, re.M), summary
    paper = open(os.path.join(HERE, 'runs', 'check_gpu-dry', 'paper_Swin-B_table.log')).read()
    table = paper.split('largest micro-batch  --accum')[-1]
    for precision, method in [
        ('float32, TF32 off', m) for m in ('standard', 'gradnorm exact', 'gradnorm fd', 'edgereg', 'pgd3 at')
    ] + [('bf16 autocast', m) for m in ('standard', 'gradnorm exact', 'edgereg', 'pgd3 at')]:
        assert re.search(rf'^{precision} +{method} +\d', table, re.M), (precision, method)
    assert 'bf16 autocast      gradnorm fd' not in table  # fd refuses bf16
    assert re.search(r'fd, float32 TF32 off (\d|0\.)[\d.e-]*%', paper)
