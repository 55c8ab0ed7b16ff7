"""Long runs that survive: kill -9, preemption signals, truncated checkpoints, full disks."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import config as C
import data as D
import train as T
from test_smoke import HERE, run, train_args


def wait_for(folder, pattern, proc, timeout=300):
    start = time.time()
    while not list(folder.glob(pattern)):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - start < timeout, f'{folder}/{pattern} never appeared'
        time.sleep(0.02)


def same_weights(a, b):
    return all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])


def same_run(full, cut, steps):
    """cut's checkpoints (written before it was killed) hold full's weights at the same steps."""
    for step in steps:
        a, b = (C.load_checkpoint(str(next(d.glob(f'ckpt-{step:08d}-*.pt')))) for d in (cut, full))
        assert same_weights(a, b), step


def kill_and_resume(command, full, cut, kill_at, env=None):
    """Runs command(full) and command(cut, '--ckpt_every=1', ...) side by side, kills the cut run
    (SIGKILL to it and every process it started) once checkpoint kill_at is written, and checks that
    every checkpoint it left matches full's at that step. -> the steps cut had checkpointed"""
    import psutil

    procs = [
        subprocess.Popen(
            command(out, '--ckpt_every=1', '--keep=100'),
            cwd=HERE,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for out in (full, cut)
    ]
    wait_for(cut, f'ckpt-{kill_at:08d}-*.pt', procs[1])
    cut_proc = psutil.Process(procs[1].pid)
    for p in cut_proc.children(recursive=True) + [cut_proc]:  # torchrun's ranks are in sessions of their own
        p.kill()
    procs[1].wait()
    _, err = procs[0].communicate(timeout=600)
    assert procs[0].returncode == 0, err[-3000:]
    steps = sorted(int(p.name.split('-')[1]) for p in cut.glob('ckpt-*.pt'))
    same_run(full, cut, steps)  # two runs, one seed: the same weights at every step
    return steps


def test_sigkill_then_resume_auto_matches_uninterrupted_run(tiny_data, tmp_path):
    """The in-memory demo (--loader=torchvision), with RandAugment, random erasing and Mixup/CutMix.
    One torch thread per process: two processes side by side on two cores, each with two OpenMP
    threads spinning at barriers, run ~10x slower."""
    full, cut, env = tmp_path / 'full', tmp_path / 'cut', dict(os.environ, OMP_NUM_THREADS='1')
    aug = ['--randaug=rand-m9-mstd0.5-inc1', '--reprob=0.25', '--mixup=0.8', '--cutmix=1.0']
    steps = kill_and_resume(
        lambda out, *extra: [sys.executable, *train_args(tiny_data, out, *aug, *extra)], full, cut, 10, env
    )
    assert 10 <= steps[-1] < 16  # killed inside epoch 1
    newest = sorted(cut.glob('ckpt-*.pt'))[-1]
    newest.write_bytes(newest.read_bytes()[:1000])  # and the newest file is truncated, as by a dying disk

    r = run(train_args(tiny_data, cut, *aug, '--resume=auto'), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'skipping cannot load checkpoint {str(newest)!r}' in r.stdout
    step = int(r.stdout.split('at epoch 1 step ')[1].split()[0])
    assert 1 <= step < 8  # ckpt-00000009-*.pt or later: inside epoch 1
    assert same_weights(C.load_checkpoint(str(cut / 'ckpt.pt')), C.load_checkpoint(str(full / 'ckpt.pt')))


def ffcv_demo(tiny_data, tmp_path, monkeypatch):
    """The demo's .beton written once here, into a cache the runs find through XDG_CACHE_HOME. -> env"""
    if D.ffcv_error():
        pytest.skip(f'FFCV: {D.ffcv_error()}')
    monkeypatch.setattr(D, 'CACHE', str(tmp_path / 'cache' / 'gradnorm'))
    D.fashion_betons(tiny_data, 1)
    return dict(os.environ, XDG_CACHE_HOME=str(tmp_path / 'cache'))


def test_ffcv_default_path_sigkill_then_resume_matches_uninterrupted_run(tiny_data, tmp_path, monkeypatch):
    """The default path, the demo through FFCV (seeded flips), 32 steps: two runs agree at every step,
    and one killed mid-epoch and resumed ends with the same weights. One loader thread: on two busy
    cores FFCV's second thread only slows training; thread counts are the loader tests' business."""
    env, full, cut = ffcv_demo(tiny_data, tmp_path, monkeypatch), tmp_path / 'full', tmp_path / 'cut'
    args = lambda out, *extra: train_args(
        tiny_data, out, '--loader=ffcv', '--workers=1', '--batch_size=32', *extra
    )
    steps = kill_and_resume(lambda out, *extra: [sys.executable, *args(out, *extra)], full, cut, 17, env)
    assert 17 <= steps[-1] < 32  # inside epoch 1
    r = run(args(cut, '--resume=auto'), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'at epoch 1 step {steps[-1] - 16}' in r.stdout
    assert same_weights(C.load_checkpoint(str(cut / 'ckpt.pt')), C.load_checkpoint(str(full / 'ckpt.pt')))


def test_torchrun_two_ranks_sigkill_then_resume_matches_uninterrupted_run(tiny_data, tmp_path, monkeypatch):
    """2 gloo ranks through FFCV, each its shard; PGD-AT (random starts per rank and step) and random
    erasing + Mixup/CutMix (per rank and batch): killed mid-epoch (torchrun and both ranks) and
    resumed, the same weights as the uninterrupted 2-rank run."""
    env, full, cut = ffcv_demo(tiny_data, tmp_path, monkeypatch), tmp_path / 'full', tmp_path / 'cut'
    torchrun = [
        os.path.join(os.path.dirname(sys.executable), 'torchrun'),
        '--standalone',
        '--nproc_per_node=2',
    ]
    args = lambda out, *extra: (
        torchrun
        + train_args(
            tiny_data,
            out,
            '--loader=ffcv',
            '--workers=1',
            '--batch_size=32',
            '--objective=pgd',
            '--pgd_steps=1',
            '--reprob=0.25',
            '--mixup=0.8',
            '--cutmix=1.0',
            *extra,
        )
    )
    steps = kill_and_resume(args, full, cut, 17, env)
    assert 17 <= steps[-1] < 32  # inside epoch 1
    r = subprocess.run(
        args(cut, '--resume=auto'), cwd=HERE, env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'at epoch 1 step {steps[-1] - 16}' in r.stdout
    assert same_weights(C.load_checkpoint(str(cut / 'ckpt.pt')), C.load_checkpoint(str(full / 'ckpt.pt')))


def test_sigterm_checkpoints_and_exits_75(tiny_data, tmp_path):
    out = tmp_path / 'run'
    proc = subprocess.Popen(
        [sys.executable, *train_args(tiny_data, out, '--epochs=50')],
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(out, 'ckpt.pt', proc)  # epoch 0 done
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert 'preempted' in err and '--resume=auto' in err
    ck = C.load_checkpoint(str(out / 'ckpt.pt'))
    assert 8 < ck['step'] < 50 * 8  # stopped mid-run, at a step boundary after epoch 0


def test_sigterm_stops_both_torchrun_ranks_and_resume_continues(tiny_data, tmp_path):
    out = tmp_path / 'ddp'
    torchrun = os.path.join(os.path.dirname(sys.executable), 'torchrun')
    proc = subprocess.Popen(
        [torchrun, '--standalone', '--nproc_per_node=2', *train_args(tiny_data, out, '--epochs=50')],
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(out, 'ckpt.pt', proc)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to every rank
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert err.count('preempted: signal') == 2, err[-3000:]  # both ranks stopped cleanly
    step = C.load_checkpoint(str(out / 'ckpt.pt'))['step']
    assert step > 8  # the global batch is split over the ranks: still 8 steps per epoch

    r = subprocess.run(
        [
            torchrun,
            '--standalone',
            '--nproc_per_node=2',
            *train_args(tiny_data, out, '--resume=auto', f'--epochs={step // 8 + 2}'),
        ],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'at epoch {step // 8} step {step % 8}' in r.stdout
    assert C.load_checkpoint(str(out / 'ckpt.pt'))['step'] == (step // 8 + 2) * 8


def poison(monkeypatch, bad):
    """make_loaders whose training batches number i are NaN when bad(i), like corrupt images."""
    real = T.make_loaders

    def with_nan_batches(cfg, rank, world, device):
        train, *rest = real(cfg, rank, world, device)

        class Poisoned:
            set_epoch, __len__ = train.set_epoch, train.__len__

            def __iter__(self):
                for i, (x, y) in enumerate(train):
                    yield (torch.full_like(x, float('nan')) if bad(i) else x), y

        return (Poisoned(), *rest)

    monkeypatch.setattr(T, 'make_loaders', with_nan_batches)


def test_nan_batch_is_skipped_and_counted(tiny_data, tmp_path, monkeypatch, capsys):
    poison(monkeypatch, lambda i: i == 2)  # the third batch of every epoch
    cfg = C.parse_config(train_args(tiny_data, tmp_path / 'run')[1:])
    mine = signal.getsignal(signal.SIGTERM)
    model = T.train(cfg)
    assert signal.getsignal(signal.SIGTERM) is mine  # train() called from Python leaves no handler behind
    out = capsys.readouterr().out
    assert out.count('step skipped (1 in a row)') == 2  # once per epoch, and training went on
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert C.load_checkpoint(str(tmp_path / 'run' / 'ckpt.pt'))['step'] == 16


def test_handlers_come_back_when_training_fails(tiny_data, tmp_path, monkeypatch):
    """A SIGTERM handler left behind by train() would swallow SIGTERM for good: a forked worker
    (multiprocessing.Pool) could then never be terminated."""
    poison(monkeypatch, lambda i: True)
    cfg = C.parse_config(train_args(tiny_data, tmp_path / 'run')[1:] + ['--max_bad_steps=2'])
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        T.train(cfg)
        raise AssertionError('training on NaN batches should stop')
    except C.UserError as e:
        assert 'non-finite' in str(e)
    assert {s: signal.getsignal(s) for s in before} == before
