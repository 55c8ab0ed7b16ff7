"""Long runs that survive: kill -9, preemption signals, truncated checkpoints, full disks."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint as CK
import config as C
import data as D
import train as T
from test_smoke import HERE, run, train_args
from tests.conftest import one_thread_env
from tools.check_gpu import write_idx

# training in this process: one thread (conftest.one_thread), as the commands the tests start get
pytestmark = pytest.mark.usefixtures('one_thread')


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
        a, b = (CK.load_checkpoint(str(next(d.glob(f'ckpt-{step:08d}-*.pt')))) for d in (cut, full))
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
    assert same_weights(CK.load_checkpoint(str(cut / 'ckpt.pt')), CK.load_checkpoint(str(full / 'ckpt.pt')))


def ffcv_demo(tiny_data, tmp_path, monkeypatch):
    """The demo's .beton written once here, into a cache the runs find through XDG_CACHE_HOME. -> env"""
    if D.ffcv_error():
        pytest.skip(f'FFCV: {D.ffcv_error()}')
    monkeypatch.setattr(D, 'CACHE', str(tmp_path / 'cache' / 'gradnorm'))
    D.small_betons(tiny_data, 1)
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
    assert same_weights(CK.load_checkpoint(str(cut / 'ckpt.pt')), CK.load_checkpoint(str(full / 'ckpt.pt')))


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
    assert same_weights(CK.load_checkpoint(str(cut / 'ckpt.pt')), CK.load_checkpoint(str(full / 'ckpt.pt')))


def test_sigterm_checkpoints_and_exits_75(tiny_data, tmp_path):
    out = tmp_path / 'run'
    proc = subprocess.Popen(
        [sys.executable, *train_args(tiny_data, out, '--epochs=50')],
        cwd=HERE,
        env=one_thread_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(out, 'ckpt.pt', proc)  # epoch 0 trained, its checkpoint written before its evaluation
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert 'preempted' in err and '--resume=auto' in err
    ck = CK.load_checkpoint(str(out / 'ckpt.pt'))
    assert 8 <= ck['step'] < 50 * 8  # stopped mid-run: in epoch 0's evaluation or at a later step


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
    assert proc.returncode != 0  # plain torchrun: 1 (python -m tools.torchrun: 75, test_train_stops)
    assert err.count('preempted: SIGTERM: checkpoint at step') == 1, err[-3000:]  # rank 0 alone says it
    step = CK.load_checkpoint(str(out / 'ckpt.pt'))['step']
    assert step >= 8  # the global batch is split over the ranks: still 8 steps per epoch

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
    assert 'resumed from' in r.stdout
    assert CK.load_checkpoint(str(out / 'ckpt.pt'))['step'] == (step // 8 + 2) * 8
    epochs = [json.loads(line)['epoch'] for line in (out / 'metrics.jsonl').read_text().splitlines()]
    assert epochs == list(range(step // 8 + 2))  # one line per epoch, the one stopped in included


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
    assert CK.load_checkpoint(str(tmp_path / 'run' / 'ckpt.pt'))['step'] == 16


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


# ---------------------------------------------------------------- resuming with other settings or data


@pytest.fixture(scope='module')
def every_step(tiny_data, tmp_path_factory):
    """2 epochs x 8 steps of 64 images, a checkpoint at every step. -> its folder"""
    out = tmp_path_factory.mktemp('every_step') / 'run'
    r = run(train_args(tiny_data, out, '--ckpt_every=1', '--keep=100'))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def resume(full, step, out, data, *extra, capsys, ts=None, monkeypatch=None):
    """train.py --resume=auto in out, a fresh folder holding full's checkpoint of step. ts: gets
    (t, images) of each step taken. -> (exit status, stdout, stderr)"""
    if not out.exists():
        out.mkdir()
        shutil.copy(next(full.glob(f'ckpt-{step:08d}-*.pt')), out)
    if ts is not None:
        real = T.train_step
        step = lambda r, x, y, t, stop: ts.append((t, len(y))) or real(r, x, y, t, stop)
        monkeypatch.setattr(T, 'train_step', step)
    code = C.cli(T.main, train_args(data, out, '--resume=auto', *extra)[1:])
    out_err = capsys.readouterr()
    return code, out_err.out, out_err.err


def error_line(code, err):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith('error: '), err
    return lines[0]


def epoch_lines(out):
    return [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]


@pytest.mark.parametrize(
    'batch,step,at', [(128, 12, 'step 2'), (32, 12, 'step 8'), (128, 9, 'step 0 (+64 images)')]
)
def test_another_batch_size_is_refused_or_continues_at_the_same_image(
    every_step, tiny_data, tmp_path, capsys, monkeypatch, batch, step, at
):
    """Up, down, and to a size the images done are no multiple of: the same epoch, the same image, the
    schedule continuous (t = epoch + images done / images per epoch), the epoch's line written once."""
    out = tmp_path / 'run'
    line = error_line(*resume(every_step, step, out, tiny_data, f'--batch_size={batch}', capsys=capsys)[::2])
    assert f'batch_size 64 -> {batch}' in line and '--resume_changes=batch_size' in line
    ts, done = [], (step - 8) * 64  # images of epoch 1 done before the checkpoint
    code, stdout, _ = resume(
        every_step,
        step,
        out,
        tiny_data,
        f'--batch_size={batch}',
        '--resume_changes=batch_size',
        capsys=capsys,
        ts=ts,
        monkeypatch=monkeypatch,
    )
    assert code is None and f'at epoch 1 {at}' in stdout, stdout
    assert ts[0] == (1 + done / 512, min(batch, 512 - done) - done % batch)
    assert [t for t, _ in ts] == [1 + (done + sum(n for _, n in ts[:i])) / 512 for i in range(len(ts))]
    assert sum(n for _, n in ts) == 512 - done  # the rest of epoch 1, each image once
    ck = CK.load_checkpoint(str(out / 'ckpt.pt'), CK.RESUME_KEYS)
    change = dict(key='batch_size', old=64, new=batch, step=step, epoch=1, images=done)
    assert (
        ck['changes'] == [change]
        and ck['config']['batch_size'] == batch
        and ck['steps_per_epoch'] == 512 // batch
    )
    assert [(m['epoch'], m['changes']) for m in epoch_lines(out)] == [(1, [change])]


def test_data_of_another_size_is_refused_or_accepted_and_other_images_warned(
    every_step, tiny_data, tmp_path, capsys
):
    (xtr, ytr), (xte, yte) = D.load_fashion_mnist(tiny_data)
    half, flipped = tmp_path / 'half', tmp_path / 'flipped'
    for folder, (x, y) in ((half, (xtr[:256], ytr[:256])), (flipped, (xtr.flip(3), ytr))):
        folder.mkdir()
        for name, t in (
            ('train-images-idx3', x[:, 0]),
            ('train-labels-idx1', y),
            ('t10k-images-idx3', xte[:, 0]),
            ('t10k-labels-idx1', yte),
        ):
            write_idx(folder / f'{name}-ubyte.gz', t.to(torch.uint8))
    line = error_line(*resume(every_step, 10, tmp_path / 'a', str(half), capsys=capsys)[::2])
    assert 'data 512 training images -> 256 training images' in line and '--resume_changes=data' in line
    code, stdout, _ = resume(
        every_step, 10, tmp_path / 'a', str(half), '--resume_changes=data', capsys=capsys
    )
    assert code is None and 'at epoch 1 step 2' in stdout  # 128 of epoch 1's images done: 2 of 4 steps
    assert CK.load_checkpoint(str(tmp_path / 'a' / 'ckpt.pt'), CK.RESUME_KEYS)['step'] == 12
    code, _, err = resume(every_step, 12, tmp_path / 'b', str(flipped), capsys=capsys)
    was, now = CK.identity(tiny_data)['fingerprint'], CK.identity(str(flipped))['fingerprint']
    warnings = [line for line in err.splitlines() if line.startswith('warning: ')]
    assert code is None and len(warnings) == 1 and was in warnings[0] and now in warnings[0] and was != now


def test_fewer_or_more_epochs(every_step, tiny_data, tmp_path, capsys):
    """--epochs may shrink (nothing is trained again) or grow (training longer, recorded)."""
    code, stdout, _ = resume(every_step, 16, tmp_path / 'a', tiny_data, '--epochs=1', capsys=capsys)
    assert code is None and 'the run finished 2 epochs (--epochs=1): nothing to train' in stdout
    assert not (tmp_path / 'a' / 'metrics.jsonl').exists()
    code, stdout, _ = resume(every_step, 12, tmp_path / 'b', tiny_data, '--epochs=1', capsys=capsys)
    assert code is None and 'the run finished 1 epoch (--epochs=1)' in stdout
    code, _, _ = resume(every_step, 16, tmp_path / 'c', tiny_data, '--epochs=3', capsys=capsys)
    change = dict(key='epochs', old=2, new=3, step=16, epoch=2, images=0)
    lines = [(m['epoch'], m.get('changes')) for m in epoch_lines(tmp_path / 'c')]
    assert code is None and lines == [(1, None), (2, [change])]  # epoch 1, trained, is evaluated first
    assert CK.load_checkpoint(str(tmp_path / 'c' / 'ckpt.pt'), CK.RESUME_KEYS)['step'] == 24


def test_every_setting_that_changes_the_run_is_compared(every_step, tiny_data, tmp_path, capsys):
    new = ['--lr=0.001', '--smoothing=0.2', '--mixup=0.5', '--eval_n=32', '--workers=1']  # the last two: free
    line = error_line(*resume(every_step, 12, tmp_path / 'a', tiny_data, *new, capsys=capsys)[::2])
    assert 'lr 0.002 -> 0.001, smoothing 0.1 -> 0.2, mixup 0.0 -> 0.5' in line, line
    assert line.endswith('--resume_changes=lr,smoothing,mixup')
    line = error_line(
        *resume(every_step, 12, tmp_path / 'a', tiny_data, *new, '--resume_changes=lr', capsys=capsys)[::2]
    )
    assert 'lr' not in line.split(':')[1] and 'smoothing' in line
    code, _, _ = resume(
        every_step, 12, tmp_path / 'a', tiny_data, *new, '--resume_changes=lr,smoothing,mixup', capsys=capsys
    )
    ck = CK.load_checkpoint(str(tmp_path / 'a' / 'ckpt.pt'), CK.RESUME_KEYS)
    assert code is None and [(c['key'], c['old'], c['new'], c['step']) for c in ck['changes']] == [
        ('lr', 0.002, 0.001, 12),
        ('smoothing', 0.1, 0.2, 12),
        ('mixup', 0.0, 0.5, 12),
    ]
    assert (ck['config']['lr'], ck['config']['smoothing']) == (0.001, 0.2)  # the settings it trains with now
    with pytest.raises(C.UserError, match='settings a resume may change'):
        C.parse_config(['--resume_changes=lr,out'])


def test_a_resumed_epoch_reports_the_whole_epoch(every_step, tiny_data, tmp_path, capsys):
    """The epoch's running sums travel in the checkpoint: the metrics line of an epoch resumed mid-way is
    the uninterrupted run's (bit for bit, the weights being); a checkpoint of an earlier version, without
    the new keys, resumes, said in one line each."""
    (tmp_path / 'a').mkdir()  # in a process of its own, as the uninterrupted run: the same threads
    shutil.copy(next(every_step.glob('ckpt-00000012-*.pt')), tmp_path / 'a')
    r = run(train_args(tiny_data, tmp_path / 'a', '--resume=auto'))
    full, cut = epoch_lines(every_step)[1], epoch_lines(tmp_path / 'a')
    assert r.returncode == 0 and [m['epoch'] for m in cut] == [1], r.stderr[-3000:]
    assert same_weights(*(CK.load_checkpoint(str(d / 'ckpt.pt')) for d in (every_step, tmp_path / 'a')))
    assert {k: v for k, v in cut[0].items() if k != 'img_per_s'} == {
        k: v for k, v in full.items() if k != 'img_per_s'
    }
    old = tmp_path / 'old'
    old.mkdir()
    ck = CK.load_checkpoint(str(next(every_step.glob('ckpt-00000012-*.pt'))), CK.RESUME_KEYS)
    new_keys = ('images', 'steps_per_epoch', 'batch_size', 'sums', 'done', 'changes', 'data_id')
    CK.save_checkpoint(str(old / 'ckpt-00000012-old.pt'), {k: v for k, v in ck.items() if k not in new_keys})
    code, stdout, err = resume(every_step, 12, old, tiny_data, capsys=capsys)
    assert code is None and 'at epoch 1 step 4' in stdout and 'an earlier version' in stdout
    assert 'records no class names or data fingerprint' in err
