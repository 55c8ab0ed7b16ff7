"""Stops and messages: Ctrl-C and preemption signals sent to real processes (one, and torchrun's), each
stop in one line; logs that read as logs; every checkpoint argument described as what it is; every option
checked before an image is read; --help."""

import dataclasses
import gzip
import json
import os
import pty
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint as CK
import config as C
import evaluate as E
import train as T
from test_smoke import HERE, train_args
from tests.conftest import needs_ffcv, offline_env, one_thread_env
from tests.test_train_faults import fails, tiny_disk, trained
from tests.test_train_resume import wait_for

TORCHRUN = [sys.executable, '-m', 'tools.torchrun', '--standalone', '--nproc_per_node=2']


def start(args, env=None, **kw):
    """A command as a shell's foreground job gets it: SIGINT at its default (bash starts `&` jobs with
    SIGINT ignored, and a child inherits that). env: conftest.one_thread_env() unless given."""
    return subprocess.Popen(args, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            env=one_thread_env() if env is None else env, **kw)


def stopped(proc, *signals, gap=0.0):
    """Sends the signals, gap seconds apart. -> (exit status, stdout, stderr, seconds from signal to exit)"""
    t0 = time.time()
    for s in signals:
        proc.send_signal(s)
        time.sleep(gap)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err, time.time() - t0


def one_line(err, prefix):
    """stderr holds one line, starting with prefix, and no traceback (warnings may come before it)."""
    lines = [line for line in err.splitlines() if not line.startswith('warning: ')]
    assert len(lines) == 1 and lines[0].startswith(prefix) and 'Traceback' not in err, err[-3000:]
    return lines[0]


def step_of(line):
    return int(line.split('checkpoint at step ')[1].split()[0])


# ---------------------------------------------------------------- Ctrl-C and preemption

def test_ctrl_c_checkpoints_the_current_step_and_exits_130(tiny_data, tmp_path):
    out = tmp_path / 'run'
    proc = start([sys.executable, *train_args(tiny_data, out, '--epochs=50', '--ckpt_every=3')])
    wait_for(out, 'ckpt-00000003-*.pt', proc)
    rc, _, err, _ = stopped(proc, signal.SIGINT)
    line = one_line(err, 'interrupted: checkpoint at step ')
    assert rc == 130 and line.endswith(f'in {out}; continue with --resume=auto'), (rc, line)
    assert CK.load_checkpoint(str(out / 'ckpt.pt'))['step'] == step_of(line) > 3
    assert not list(out.glob('*.tmp'))


def test_a_second_ctrl_c_exits_at_once_leaving_no_partial_file(tiny_data, tmp_path):
    """Two Ctrl-C in a row: the second ends the program where it lands, a checkpoint write included."""
    out = tmp_path / 'run'
    proc = start([sys.executable, *train_args(tiny_data, out, '--epochs=50', '--ckpt_every=1', '--keep=100')])
    wait_for(out, 'ckpt-00000002-*.pt', proc)
    rc, _, err, _ = stopped(proc, signal.SIGINT, signal.SIGINT)
    one_line(err, 'interrupted: ')
    assert rc == 130 and not list(out.glob('*.tmp')), err[-3000:]
    for path in out.glob('ckpt*.pt'):
        CK.load_checkpoint(str(path), CK.RESUME_KEYS)


def test_a_signal_in_the_evaluation_stops_it_and_the_resume_evaluates_that_epoch(tiny_data, tmp_path):
    """The epoch's checkpoint is on disk before its evaluation (a long one here: PGD-2000); SIGTERM
    there stops it between two attack steps, and --resume=auto evaluates the epoch and goes on."""
    out = tmp_path / 'run'
    proc = start([sys.executable, *train_args(tiny_data, out, '--epochs=2', '--eval_steps=2000')])
    wait_for(out, 'ckpt.pt', proc)
    rc, _, err, seconds = stopped(proc, signal.SIGTERM)
    line = one_line(err, 'preempted: SIGTERM: checkpoint at step 8 ')
    assert rc == 75 and 'it evaluates epoch 0 first' in line, (rc, err[-3000:])
    assert CK.load_checkpoint(str(out / 'ckpt.pt'))['step'] == 8 and not (out / 'metrics.jsonl').exists()
    print(f'signal to exit during the evaluation: {seconds:.1f} s')
    r = subprocess.run([sys.executable, *train_args(tiny_data, out, '--resume=auto')], cwd=HERE,
                       capture_output=True, text=True, timeout=600, env=one_thread_env())
    assert r.returncode == 0, r.stderr[-3000:]
    epochs = [json.loads(line)['epoch'] for line in (out / 'metrics.jsonl').read_text().splitlines()]
    assert epochs == [0, 1] and CK.load_checkpoint(str(out / 'ckpt.pt'))['step'] == 16


@pytest.mark.parametrize('sig,rc,prefix', [(signal.SIGTERM, 75, 'preempted: SIGTERM: '),
                                           (signal.SIGINT, 130, 'interrupted: ')])
def test_a_signal_to_the_torchrun_launcher_stops_both_ranks_in_one_line(tiny_data, tmp_path, sig, rc, prefix):
    out = tmp_path / 'ddp'
    proc = start([*TORCHRUN, *train_args(tiny_data, out, '--epochs=50')])
    wait_for(out, 'ckpt.pt', proc)
    time.sleep(0.5)  # into epoch 1's steps
    code, _, err, _ = stopped(proc, sig)
    lines = [line for line in err.splitlines() if line.startswith(('preempted', 'interrupted', 'error'))]
    assert code == rc and lines and len(lines) == 1 and lines[0].startswith(prefix), err[-3000:]
    assert 'Traceback' not in err and 'SignalException' not in err, err[-3000:]
    assert CK.load_checkpoint(str(out / 'ckpt.pt'))['step'] == step_of(lines[0])


def test_evaluate_stops_in_autoattack_keeping_its_progress(tiny_data, tmp_path):
    trained(tiny_data, tmp_path / 'run')
    args = [sys.executable, 'evaluate.py', f'--ckpt={tmp_path}/run/ckpt.pt', '--n=64', '--autoattack',
            '--attacks', 'ce-2', '--no-checks']
    proc = start(args)
    while 'autoattack eps' not in proc.stdout.readline():  # AutoAttack's first batch is done
        assert proc.poll() is None, proc.communicate()[1][-3000:]
    rc, _, err, _ = stopped(proc, signal.SIGINT)
    line = one_line(err, 'interrupted: AutoAttack\'s progress is in ')
    assert rc == 130 and os.path.exists(line.split(' is in ')[1].split(':')[0]), err[-3000:]


# ---------------------------------------------------------------- logs

def rendered(raw):
    """What a terminal shows: each line's text after its last carriage return, with erase-line removed."""
    return [line.split('\r')[-1].replace('\x1b[K', '') for line in raw.replace('\r\n', '\n').split('\n')]


def test_full_disk_error_stands_alone_on_a_terminal_with_a_progress_bar(tiny_data, tmp_path):
    """The full-disk case of test_train_faults, stdout and stderr on one terminal (a pty) while the bar
    is drawn over itself: the error line starts at the beginning of a line of its own."""
    disk = tiny_disk(tmp_path / 'disk', '2500k')
    if disk is None:
        pytest.skip('no mount rights for a small tmpfs')
    try:
        main, child = pty.openpty()
        extra = ('--ckpt_every=1', '--keep=100', '--epochs=1')
        args = [sys.executable, *train_args(tiny_data, disk / 'run', *extra)]
        proc = subprocess.Popen(args, cwd=HERE, stdout=child, stderr=child, env=one_thread_env())
        os.close(child)
        raw = b''
        while chunk := _read(main):
            raw += chunk
        assert proc.wait(timeout=600) == 2, raw[-3000:]
        lines = rendered(raw.decode())
        assert '\repoch 0 [' in raw.decode(), raw  # the bar was drawn, over itself
        errors = [line for line in lines if 'error:' in line]
        assert len(errors) == 1 and errors[0].startswith('error: cannot write checkpoint'), lines
    finally:
        subprocess.run(['umount', str(disk)])


def _read(fd):
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the other end closed
        return b''


def test_a_log_written_to_a_file_reads_as_lines(tiny_data, tmp_path):
    """stdout not a terminal: the bar is a whole line about 10 times an epoch, never a carriage return."""
    log = tmp_path / 'log.txt'
    with open(log, 'w') as f:
        args = [sys.executable, *train_args(tiny_data, tmp_path / 'run', '--eval_n=600')]
        r = subprocess.run(args, cwd=HERE, stdout=f, stderr=subprocess.STDOUT, timeout=600,
                           env=one_thread_env())
    text = log.read_text()
    assert r.returncode == 0 and '\r' not in text and '\x1b' not in text, text[-3000:]
    lines = text.splitlines()
    bars = [line for line in lines if line.startswith('epoch ')]
    assert len(bars) == 16 and all(line.endswith(' img/s') for line in bars), lines  # 8 steps, 2 epochs
    assert lines[0].startswith('warning: --eval_n=600 is more than the 256 validation images')
    assert [json.loads(line)['epoch'] for line in lines if line.startswith('{')] == [0, 1]


# ---------------------------------------------------------------- files described as what they are

KINDS = {
    'text': ('it is a text file', lambda p, ck: p.write_text('# notes\n')),
    'empty': ('it is empty (0 bytes)', lambda p, ck: p.write_bytes(b'')),
    'directory': ('it is a directory', lambda p, ck: p.mkdir()),
    'truncated': ('truncated or corrupt zip', lambda p, ck: p.write_bytes(ck.read_bytes()[:50_000])),
    'code': ('pickled Python code', lambda p, ck: torch.save({'f': os.system}, p)),
    'state_dict': ('is a bare state_dict', lambda p, ck: torch.save(torch.load(ck)['model'], p)),
    'timm': ("timm's layout", lambda p, ck: torch.save({'state_dict': torch.load(ck)['model'], 'epoch': 3},
                                                        p)),
}


@pytest.fixture(scope='module')
def base(tiny_data, tmp_path_factory):
    return trained(tiny_data, tmp_path_factory.mktemp('base') / 'run')


@pytest.mark.parametrize('kind', KINDS)
def test_a_checkpoint_argument_is_described_as_what_it_is(kind, base, tiny_data, tmp_path, capsys):
    words, make = KINDS[kind]
    path = tmp_path / f'{kind}.pt'
    make(path, base / 'ckpt.pt')
    for flag in ('--resume', '--init'):
        if (kind, flag) == ('state_dict', '--init'):
            continue  # weights alone: --init takes them (below)
        err = fails(train_args(tiny_data, tmp_path / 'run', f'{flag}={path}')[1:], capsys)
        assert words in err and str(path) in err, (flag, err)
    capsys.readouterr()
    assert C.cli(E.main, [f'--ckpt={path}']) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and '\n' not in err and words in err, err
    if kind == 'state_dict':
        assert '--init takes weights alone' in err
        out = trained(tiny_data, tmp_path / 'from-weights', f'--init={path}', '--lr=1e-9', '--min_lr=0')
        first, now = torch.load(path), CK.load_checkpoint(str(out / 'ckpt.pt'))['model']
        assert all(torch.allclose(v, first[k], atol=1e-6) for k, v in now.items()
                   if v.is_floating_point() and 'running' not in k)  # the run started from these weights


# ---------------------------------------------------------------- every option before any image

@pytest.fixture
def unreadable(tiny_data, tmp_path):
    """tiny_data whose image files hold their IDX headers alone (the labels are whole): reading an image
    fails loudly."""
    d = tmp_path / 'unreadable'
    shutil.copytree(tiny_data, d)
    for name in ('train-images-idx3-ubyte.gz', 't10k-images-idx3-ubyte.gz'):
        (d / name).write_bytes(gzip.compress(gzip.decompress((d / name).read_bytes())[:16]))
    return d


def test_every_option_is_checked_before_an_image_is_read(unreadable, base, tmp_path, capsys):
    cases = {'--batch_size=1024': 'larger than the training set', f'--resume={HERE}/README.md': 'a text file',
             f'--init={HERE}/README.md': 'a text file', f'--resume={base}/ckpt.pt --act=silu': 'gelu model',
             f'--init={base}/ckpt.pt --model=vit_demo': 'another model'}
    for extra, words in cases.items():
        err = fails(train_args(str(unreadable), tmp_path / 'run', *extra.split())[1:], capsys)
        assert words in err, (extra, err)
    with pytest.raises(ValueError, match='buffer length .0.'):  # the images come last
        T.train(C.parse_config(train_args(str(unreadable), tmp_path / 'run', '--eval_n=5000')[1:]))
    assert capsys.readouterr().err.startswith('warning: --eval_n=5000 is more than the 256 validation')
    assert C.cli(E.main, [f'--ckpt={HERE}/README.md', f'--data={unreadable}']) == 2
    # timm's weights, looked up offline in an empty cache
    args = train_args(str(unreadable), tmp_path / 'run', '--model=timm/resnet18', '--init=pretrained')
    r = subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=300,
                       env=offline_env(tmp_path / 'hub'))
    assert r.returncode == 2 and one_line(r.stderr, 'error: ') and 'resnet18' in r.stderr, r.stderr[-3000:]


# ---------------------------------------------------------------- --help

def test_help_lists_every_option_with_its_default_and_meaning():
    r = subprocess.run([sys.executable, 'train.py', '--help'], cwd=HERE, capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr, r.stderr
    for f in dataclasses.fields(C.Config):
        line = next(line for line in r.stdout.splitlines() if line.strip().startswith(f'--{f.name}='))
        default = str(f.default) or "''"
        assert line.split()[0] == f'--{f.name}={default}' and len(line.split()) > 1, line
    for group in ('the method:', 'the model:', 'optimization:', 'the run folder:'):
        assert f'\n{group}\n' in r.stdout


COMMANDS = [['evaluate.py'], ['-m', 'tools.beton'], ['-m', 'tools.characterize'], ['-m', 'tools.science'],
            ['-m', 'tools.official'], ['-m', 'tools.bench'], ['-m', 'tools.check_gpu'],
            ['-m', 'tools.torchrun']]
# the parts of those commands: their --help names the command that runs them
PARTS = sorted({f'tools.{f[:-3]}' for f in os.listdir(os.path.join(HERE, 'tools')) if f.endswith('.py')}
               - {c[1] for c in COMMANDS[1:]})


@pytest.mark.parametrize('command', COMMANDS + [['-m', part] for part in PARTS])
def test_every_command_has_help(command, monkeypatch, capsys):
    """Run as `python COMMAND --help` runs it (its __main__ block, here in-process: seconds less each)."""
    monkeypatch.setattr(sys, 'argv', [command[-1], '--help'])
    run = runpy.run_module if command[0] == '-m' else runpy.run_path
    code = 0
    try:
        run(command[-1] if command[0] == '-m' else os.path.join(HERE, command[0]), run_name='__main__')
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert code in (0, None) and not err.strip(), err[-2000:]
    if command in COMMANDS:
        assert len(out.splitlines()) > 5, out
    else:
        assert re.search(r'python -m tools\.\w+', out), out


# ---------------------------------------------------------------- other tools' betons

@needs_ffcv
def test_betons_without_val_files_train_on_the_first_images(betons, tmp_path, capfd):
    data = tmp_path / 'other'
    data.mkdir()
    for name in ('train.beton', 'val.beton'):
        shutil.copy(betons[0] / name, data / name)
    model = trained(str(data), tmp_path / 'run', '--recipe=', '--res=32', '--batch_size=4', '--eval_n=4',
                    '--workers=1', '--loader=ffcv')
    assert model is not None
    warnings = [line for line in capfd.readouterr().err.splitlines() if 'val_files.txt' in line]
    assert len(warnings) == 1 and warnings[0].startswith('warning: robust accuracy on the first 4 val images')
