"""Accidents in training that must neither lose a run, nor mix two, nor call a bad checkpoint good:
two runs in one folder, --overwrite with a bad option, divergence, a full disk, checkpoints of
another run, kind or shape."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import checkpoint as CK
import config as C
import train as T
from test_smoke import HERE, train_args
from tests.conftest import one_thread_env

# training in this process: one thread (conftest.one_thread), as the commands the tests start get
pytestmark = pytest.mark.usefixtures('one_thread')


def trained(tiny_data, out, *extra):
    """One short in-process run (1 epoch, 8 steps) into out."""
    T.train(C.parse_config(train_args(tiny_data, out, '--epochs=1', *extra)[1:]))
    return out


def fails(argv, capsys):
    """train.py's command line in-process: -> its one error line (exit status 2)."""
    capsys.readouterr()
    assert C.cli(T.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()  # warnings may come before it
    assert err[-1].startswith('error: ') and not [e for e in err[:-1] if not e.startswith('warning: ')], err
    return err[-1]


@pytest.fixture(scope='module')
def base(tiny_data, tmp_path_factory):
    """A finished 1-epoch GradNorm run (step 8) with --ckpt_every=4: ckpt-4, ckpt-8, metrics."""
    return trained(tiny_data, tmp_path_factory.mktemp('base') / 'run', '--ckpt_every=4')


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != 'run.lock'}


def test_two_runs_started_together_into_one_folder_one_trains(tiny_data, tmp_path):
    out, env = tmp_path / 'run', dict(os.environ, OMP_NUM_THREADS='1')
    procs = [
        subprocess.Popen(
            [sys.executable, *train_args(tiny_data, out, '--epochs=1')],
            cwd=HERE,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=600), p.communicate()[1]) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    err = next(e for rc, e in results if rc == 2).strip()
    assert err.startswith('error: ') and 'in use by another run (pid ' in err and '\n' not in err, err
    lines = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    runs = {p.name.split('-')[2][:-3] for p in out.glob('ckpt-*.pt')}
    assert len(lines) == 1 and runs == {
        lines[0]['run']
    }  # one run's checkpoints and metrics, and they say whose
    assert CK.load_checkpoint(str(out / 'ckpt.pt'))['run'] == lines[0]['run']


def test_a_run_into_a_locked_folder_stops_before_writing(base, tmp_path, capsys):
    """The lock of a live run (here: held by this process) stops a later one; released, it is free."""
    out = tmp_path / 'run'
    shutil.copytree(base, out)
    cfg = C.parse_config(['--epochs=1', f'--out={out}', '--resume=auto'])
    claim = CK.claim_out(cfg)
    before = snapshot(out)
    assert 'in use by another run' in fails([f'--out={out}', '--resume=auto', '--epochs=2'], capsys)
    assert snapshot(out) == before
    CK.release(claim, cfg)
    assert (out / 'run.lock').exists()  # not this run's folder to remove: it holds a run


def test_overwrite_deletes_the_old_run_only_after_every_check(tiny_data, base, tmp_path, capsys):
    out, empty, vit = tmp_path / 'run', tmp_path / 'not-fashion', tmp_path / 'vit'
    shutil.copytree(base, out)
    empty.mkdir()
    trained(tiny_data, vit, '--model=vit_demo', '--objective=standard')
    before = snapshot(out)
    for bad in (f'--data={empty}', f'--init={vit}/ckpt.pt'):
        fails(train_args(tiny_data, out, '--overwrite', bad)[1:], capsys)
        assert snapshot(out) == before, bad
    trained(tiny_data, out, '--overwrite')
    assert not (set(before) - {'ckpt.pt', 'metrics.jsonl'}) & set(
        snapshot(out)
    )  # the old run's files are gone
    assert len((out / 'metrics.jsonl').read_text().splitlines()) == 1


def test_divergence_keeps_every_checkpoint_finite_and_names_the_newest(tiny_data, tmp_path, capsys):
    """lr 1e9: the weights blow up within a few steps; a skipped step's forward pass must not leave
    inf in BatchNorm's running statistics, and no checkpoint may hold non-finite numbers."""
    out = tmp_path / 'run'
    err = fails(
        train_args(
            tiny_data,
            out,
            '--lr=1e9',
            '--ckpt_every=1',
            '--keep=100',
            '--max_bad_steps=2',
            '--warmup_epochs=0',
        )[1:],
        capsys,
    )
    saved = sorted(out.glob('ckpt-*.pt'))
    assert saved, err
    assert f'its newest checkpoint, {saved[-1]}' in err and 'is finite' in err
    for path in saved + [out / 'ckpt.pt']:
        ck = CK.load_checkpoint(str(path))
        assert all(torch.isfinite(v).all() for v in ck['model'].values() if v.is_floating_point()), path


def test_skipped_step_changes_no_parameter_or_buffer(tiny_data, tmp_path, monkeypatch):
    """A NaN batch in train mode: BatchNorm's running statistics and step count stay as they were."""
    cfg = C.parse_config(train_args(tiny_data, tmp_path / 'run', '--epochs=1')[1:])
    run, _ = T.start(cfg, 0, 1, torch.device('cpu'), print)
    run.net.train()
    x, y = next(iter(run.loaders[0]))
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    parts, _ = T.train_step(run, torch.full_like(x, float('nan')), y, 0.5, [])
    assert parts is None and run.bad_steps == 1
    assert all(torch.equal(before[k], v) for k, v in run.model.state_dict().items())


def tiny_disk(path, size):
    """A real file system of size bytes at path (tmpfs), or None where mounting is not allowed."""
    path.mkdir()
    r = subprocess.run(
        ['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)], capture_output=True
    )
    return path if r.returncode == 0 else None


def test_full_disk_one_line_no_temp_file_and_resume_later(tiny_data, tmp_path):
    """--out on a 2.5 MB tmpfs: each checkpoint is ~0.95 MB, so the third write fails inside torch.save's
    zip writer (a RuntimeError, not an OSError). Without mount rights, a file-size limit in the child."""
    disk = tiny_disk(tmp_path / 'disk', '2500k')
    limit = None
    if disk is None:
        disk, limit = tmp_path / 'disk', 2_500_000
    out = disk / 'run'

    def child():
        if limit:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit // 3, limit // 3))

    try:
        args = [sys.executable, *train_args(tiny_data, out, '--ckpt_every=1', '--keep=100', '--epochs=1')]
        r = subprocess.run(args, cwd=HERE, capture_output=True, text=True, timeout=600, preexec_fn=child,
                           env=one_thread_env())
        assert r.returncode == 2, r.stderr[-3000:]
        err = r.stderr.strip().splitlines()
        assert (
            len(err) == 1 and err[0].startswith('error: cannot write') and 'then --resume=auto' in err[0]
        ), err
        assert not list(out.glob('*.tmp'))
        good = sorted(out.glob('ckpt-*.pt'))
        assert good and all(CK.load_checkpoint(str(p)) for p in good + [out / 'ckpt.pt'])
        if limit:
            return
        subprocess.run(['mount', '-o', 'remount,size=50m', str(disk)], check=True)
        r = subprocess.run(
            args[:-3] + ['--resume=auto'], cwd=HERE, capture_output=True, text=True, timeout=600,
            env=one_thread_env()
        )
        assert r.returncode == 0, r.stderr[-3000:]
        assert CK.load_checkpoint(str(out / 'ckpt.pt'))['step'] == 16
    finally:
        if not limit:
            subprocess.run(['umount', str(disk)])


def test_resume_refuses_checkpoints_of_another_kind(tiny_data, base, tmp_path, capsys):
    broken = tmp_path / 'no-config.pt'
    ck = CK.load_checkpoint(str(base / 'ckpt.pt'))
    CK.save_checkpoint(str(broken), {k: v for k, v in ck.items() if k != 'config'})
    out = tmp_path / 'run'
    cases = {
        f'--resume={broken}': "'config' is missing",
        f'--resume={base}/ckpt.pt --objective=pgd': 'is a gradnorm run, not pgd',
        f'--resume={base}/ckpt.pt --act=silu': 'resnet_demo_pool/gelu model',
        f'--resume={base}/ckpt.pt --data={folder(tmp_path / "two", 2)} --recipe= --res=28': 'in_ch=1',
    }
    for extra, why in cases.items():
        err = fails(train_args(tiny_data, out, *extra.split())[1:], capsys)
        assert why in err, (extra, err)
    assert not out.exists()  # failed at start: no empty folder left behind


def folder(root, classes):
    """An ImageFolder of 28 px RGB images: train/ and val/, 32 images per class each."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ('train', 'val'):
        for c in range(classes):
            (root / split / f'c{c}').mkdir(parents=True)
            for i in range(32):
                pixels = torch.randint(0, 256, (28, 28, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / f'c{c}' / f'{i}.png')
    return root


def test_resume_says_what_it_does(tiny_data, base, tmp_path, capsys):
    """A finished run, an empty folder, weights of another objective: each said in one line."""
    out = tmp_path / 'run'
    shutil.copytree(base, out)
    before = snapshot(out)
    trained(tiny_data, out, '--resume=auto')
    assert 'finished 1 epoch (--epochs=1): nothing to train' in capsys.readouterr().out
    assert snapshot(out) == before
    trained(tiny_data, tmp_path / 'new', '--resume=auto')
    assert f'--resume=auto: no checkpoint in {tmp_path / "new"}' in capsys.readouterr().out
    trained(tiny_data, tmp_path / 'pgd', '--objective=pgd', '--pgd_steps=1', f'--init={base}/ckpt.pt')
    assert 'the weights of a gradnorm run, trained on with pgd' in capsys.readouterr().out


def test_a_failed_start_leaves_no_empty_folder(tiny_data, tmp_path, capsys):
    out = tmp_path / 'run'
    assert 'larger than the training set' in fails(
        train_args(tiny_data, out, '--batch_size=1024')[1:], capsys
    )
    assert not out.exists()


def test_finite_differences_with_relu_are_announced(tiny_data, tmp_path, capsys):
    """ReLU's gradient is piecewise constant: fd may be asked for, but not silently."""
    trained(tiny_data, tmp_path / 'run', '--act=relu', '--gradnorm_impl=fd')
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith('warning: --gradnorm_impl=fd: inaccurate')], err
