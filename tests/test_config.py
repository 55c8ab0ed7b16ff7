"""The command lines cannot be broken, runs cannot overwrite each other, and the code reads in one
direction: every bad value ends in one `error:` line and exit status 2 before any data is read or
any model is built; one run per output folder; no import cycles between the top-level modules and tools/'s."""

import ast
import dataclasses
import glob
import os
import subprocess
import sys
import time

import pytest

import checkpoint as CK
import config as C
import evaluate
import train as T
from tests.conftest import HERE, parse_file
from tools import beton, characterize


class Reached(Exception):
    """Raised by a guard standing where data would be read or a model built: the check came too late."""


def guard(*_, **__):
    raise Reached('the bad value was not caught before reading data or building a model')


# every Config field with bad values: wrong type, out of range, NaN, zero, negative, too large, empty
BAD_CONFIG = {
    'objective': ['adv', ''],
    'gradnorm_impl': ['fast'],
    'model': ['resnet9000', ''],
    'act': ['tanh', ''],
    'data': ['/nonexistent', ''],
    'epochs': ['two', '0', '-1', '1.5'],
    'batch_size': ['0', '-8', 'x'],
    'lr': ['nan', '0', '-1', 'inf', 'x'],
    'weight_decay': ['-0.1', 'nan'],
    'warmup_epochs': ['-1', 'inf'],
    'min_lr': ['-1', 'nan', '1'],
    'smoothing': ['1', '-0.1', 'nan'],
    'clip': ['0', '-1', 'nan'],
    'eps': ['-0.1', '0', '2', 'nan', 'inf', '1/0', ''],
    'ramp_epochs': ['-1', 'nan'],
    'edge_alpha': ['1,2', 'a,b,c', '', '1,nan,3'],
    'pgd_steps': ['0', '-3'],
    'ema': ['1', '-0.5', 'nan'],
    'eval_n': ['0'],
    'eval_steps': ['0'],
    'compile': ['maybe'],
    'out': ['HERE/tests/test_config.py/sub'],
    'overwrite': ['maybe'],
    'resume': ['/nonexistent.pt'],
    'resume_changes': ['model', 'lr,bogus', 'out'],
    'ckpt_every': ['-1'],
    'keep': ['0'],
    'max_bad_steps': ['0'],
    'seed': ['-1', 'x', '99999999999'],
    'loader': ['dali'],
    'res': ['0', '8', '100000'],
    'workers': ['-1', '1000'],
    'init': ['imagenet', 'torchvision', '/nonexistent.pt'],
    'fd_h': ['0', '-1', '1'],
    'mixup': ['-1', 'nan'],
    'cutmix': ['-0.5', 'inf', 'nan'],
    'randaug': ['rand-x9', 'rand-m9-mstdfoo', 'rand-m9-mmax20', 'autoaug', 'm9', 'x'],
    'reprob': ['-0.1', '1.5', 'nan'],
    'pad': ['-1', '17', 'x'],
    'recipe': ['swinb', 'x'],
    'accum': ['0', '-2', '1.5'],
    'amp': ['maybe'],
    'bn_eval': ['maybe'],
    'gn_weights': ['0.8', '-1,1', 'a,b', '1,nan'],
    'conv': ['cudnn', 'Fast', ''],
}


def test_every_config_field_has_bad_values():
    assert set(BAD_CONFIG) == {f.name for f in dataclasses.fields(C.Config)}


def one_line_error(capsys, main, argv):
    """-> the error line; asserts exit status 2, one line, no traceback, in under 10 seconds."""
    t0 = time.time()
    code = C.cli(main, argv)
    out, err = capsys.readouterr()
    assert code == 2, (argv, code, err[-2000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and 'Traceback' not in err, (argv, err)
    assert time.time() - t0 < 10, argv
    return lines[0]


@pytest.fixture
def guarded(monkeypatch):
    """Data reads and model builds raise Reached: an error must come before them."""
    for module, name in (
        (T, 'make_loaders'),
        (T, 'build_model'),
        (evaluate, 'load_checkpoint'),
        (characterize, 'load_checkpoint'),
        (beton, 'write_beton'),
    ):
        monkeypatch.setattr(module, name, guard)


@pytest.mark.parametrize('key,bad', [(k, v) for k, vals in BAD_CONFIG.items() for v in vals])
def test_bad_config_value_is_one_line_error_before_any_work(key, bad, guarded, capsys, tmp_path):
    argv = (
        [f'--{key}={bad.replace("HERE", HERE)}', f'--out={tmp_path / "run"}']
        if key != 'out'
        else [f'--out={bad.replace("HERE", HERE)}']
    )
    line = one_line_error(capsys, T.main, argv)
    assert f'--{key}' in line or key == 'out', line  # names the option


@pytest.mark.parametrize(
    'argv',
    [
        ['--bogus=1'],
        ['epochs=2'],
        ['--init=pretrained'],  # timm's weights: only for timm's models
        ['--recipe=rn50_gelu_gradnorm'],  # stage 2 without stage 1's checkpoint
        ['--lr=1e-3', '--min_lr=1e-2'],
    ],
)
def test_bad_combinations_and_spellings(argv, guarded, capsys, tmp_path):
    one_line_error(capsys, T.main, argv + [f'--out={tmp_path / "run"}'])


def test_batch_larger_than_training_set(tiny_data, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(T, 'make_loaders', guard)  # the size is read from the IDX headers: no loader yet
    line = one_line_error(
        capsys,
        T.main,
        [f'--data={tiny_data}', '--loader=torchvision', '--batch_size=1024', f'--out={tmp_path / "run"}'],
    )
    assert '--batch_size=1024' in line and 'larger than the training set' in line


@pytest.fixture(scope='module')
def some_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('f') / 'ckpt.pt'
    path.write_bytes(b'x')
    return str(path)


BAD_ATTACK = [
    [],
    ['--ckpt=/nonexistent.pt'],
    ['--eps', '-1'],
    ['--eps', '0'],
    ['--eps', '1/0'],
    ['--eps', '2'],
    ['--eps', 'abc'],
    ['--eps', 'nan'],
    ['--attacks', 'ce20'],
    ['--attacks', 'foo-10'],
    ['--attacks', 'ce-0'],
    ['--steps', '0'],
    ['--step-size', '0'],
    ['--step-size', 'nan'],
    ['--n', '0'],
    ['--n', '-5'],
    ['--data', '/nonexistent'],
    ['--json', '/nonexistent/dir/x.json'],
    ['--seed', '-1'],
    ['--compile', 'maybe'],
    ['--foo'],
    ['--model', 'resnet9000'],
    ['--act', 'tanh'],
    ['--model', 'swin_base_patch4_window7_224'],  # official only
    ['--weights', 'both'],
    ['--square-queries', '-1'],
    ['--autoattack', 'yes'],
    ['--images', '0'],
]


@pytest.mark.parametrize('argv', BAD_ATTACK)
def test_bad_attack_argument(argv, some_file, guarded, capsys):
    one_line_error(
        capsys,
        evaluate.main,
        ([f'--ckpt={some_file}'] if argv and argv[0] != '--ckpt=/nonexistent.pt' else []) + argv,
    )


BAD_CHARACTERIZE = [
    [],
    ['/nonexistent.pt'],
    ['--n', '0'],
    ['--rows', '0'],
    ['--rows', '100'],
    ['--eps', '2'],
    ['--eps', '-1'],
    ['--steps', '0'],
    ['--data', '/nonexistent'],
    ['--out', 'HERE/tests/test_config.py/x'],
    ['--fo-n', '-1'],
    ['--fo-n', 'x'],
]


@pytest.mark.parametrize('argv', BAD_CHARACTERIZE)
def test_bad_characterize_argument(argv, some_file, guarded, capsys):
    argv = [a.replace('HERE', HERE) for a in argv]
    one_line_error(
        capsys, characterize.main, ([some_file] if argv and argv[0].startswith('--') else []) + argv
    )


@pytest.mark.parametrize(
    'argv',
    [
        [],
        ['SRC'],
        ['/nonexistent', 'out'],
        ['a', 'b', 'c'],
        ['SRC', 'OUT', '--max-side=0'],
        ['SRC', 'OUT', '--quality=101'],
        ['SRC', 'OUT', '--compress=2'],
        ['SRC', 'OUT', '--compress=nan'],
        ['SRC', 'OUT', '--val-side=10'],
        ['SRC', 'OUT', '--workers=0'],
        ['SRC', 'HERE/tests/test_config.py/out'],
    ],
)
def test_bad_data_argument(argv, guarded, capsys, tmp_path):
    (tmp_path / 'src' / 'train').mkdir(parents=True)
    (tmp_path / 'src' / 'val').mkdir()
    subs = {'SRC': str(tmp_path / 'src'), 'OUT': str(tmp_path / 'out'), 'HERE': HERE}
    argv = [subs.get(a, a.replace('HERE', HERE)) for a in argv]
    one_line_error(capsys, beton.main, argv)


@pytest.mark.parametrize(
    'script,argv',
    [
        ('train.py', ['--eps=-0.1']),
        ('evaluate.py', ['--ckpt=x', '--eps', '1/0']),
        ('characterize.py', ['/nonexistent.pt']),
        ('beton.py', ['/x', '/y']),
        ('science.py', ['stems', 'resnet9000']),
    ],
)
def test_entry_points_exit_2_with_one_line(script, argv):
    cmd = [script] if script in ('train.py', 'evaluate.py') else ['-m', 'tools.' + script[:-3]]
    r = subprocess.run([sys.executable, *cmd, *argv], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith('error: '), r.stderr


# ---------------------------------------------------------------- one run per output folder


def small_run(data, out, *extra):
    return T.main(
        [
            f'--data={data}',
            f'--out={out}',
            '--epochs=1',
            '--batch_size=64',
            '--eval_n=32',
            '--eval_steps=1',
            '--loader=torchvision',
            *extra,
        ]
    )


def snapshot(folder):
    return {p: open(p, 'rb').read() for p in sorted(glob.glob(os.path.join(folder, '*')))}


def test_second_run_never_touches_the_first(tiny_data, tmp_path, capsys):
    """The user's sequence: a demo run, then a different run (other model) aimed at the same folder."""
    out = tmp_path / 'run'
    assert small_run(tiny_data, out, '--keep=1') is None
    first = snapshot(out)
    assert any(p.endswith('metrics.jsonl') for p in first) and any(p.endswith('ckpt.pt') for p in first)
    capsys.readouterr()
    line = one_line_error(
        capsys, T.main, [f'--data={tiny_data}', f'--out={out}', '--model=vit_demo', '--epochs=1']
    )
    assert '--resume=auto' in line and '--overwrite' in line
    assert snapshot(out) == first  # checkpoints, metrics and ckpt.pt untouched
    # without --out, different data or models get different folders
    a, b = (
        C.parse_config([f'--data={tiny_data}']),
        C.parse_config([f'--data={tiny_data}', '--model=vit_demo']),
    )
    assert a.out != b.out and 'resnet_demo' in a.out and 'vit_demo' in b.out
    assert os.path.basename(tiny_data) in a.out and 'gradnorm-gelu' in a.out


def test_retention_deletes_only_its_own_run(tiny_data, tmp_path):
    out = tmp_path / 'run'
    assert small_run(tiny_data, out, '--keep=1') is None
    mine = glob.glob(str(out / 'ckpt-*.pt'))
    assert len(mine) == 1
    foreign = out / 'ckpt-00000099-deadbeef.pt'  # another run's, copied in by hand
    foreign.write_bytes(open(mine[0], 'rb').read())
    assert small_run(tiny_data, out, f'--resume={mine[0]}', '--epochs=2', '--keep=1') is None
    left = sorted(os.path.basename(p) for p in glob.glob(str(out / 'ckpt-*.pt')))
    assert foreign.exists() and len(left) == 2 and left[0].startswith('ckpt-00000016-')


def test_overwrite_starts_afresh(tiny_data, tmp_path):
    out = tmp_path / 'run'
    assert small_run(tiny_data, out) is None
    old = CK.load_checkpoint(str(out / 'ckpt.pt'))['run']
    assert small_run(tiny_data, out, '--overwrite') is None
    assert CK.load_checkpoint(str(out / 'ckpt.pt'))['run'] != old
    assert len(glob.glob(str(out / 'ckpt-*.pt'))) == 1 and len(open(out / 'metrics.jsonl').readlines()) == 1


# ---------------------------------------------------------------- one direction


def import_graph():
    """module -> modules of the repository it imports, anywhere in its source (function-level imports
    count): the top-level modules and tools/'s (as tools.NAME)."""
    files = glob.glob(os.path.join(HERE, '*.py')) + glob.glob(os.path.join(HERE, 'tools', '*.py'))
    mods = {
        os.path.relpath(f, HERE)[:-3].replace(os.sep, '.')
        for f in files
        if not os.path.basename(f).startswith(('test_', 'conftest', '__init__'))
    }
    graph = {}
    for m in mods:
        deps = set()
        for node in ast.walk(parse_file(os.path.join(HERE, m.replace('.', os.sep) + '.py'))):
            if isinstance(node, ast.Import):
                deps |= {'.'.join(a.name.split('.')[:2]) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                deps.add('.'.join(node.module.split('.')[:2]))
                deps |= {f'{node.module}.{a.name}' for a in node.names}  # from tools import bench
        graph[m] = {d if d in mods else d.split('.')[0] for d in deps} & mods - {m}
    return graph


def cycle(graph):
    """One import cycle of graph as a list of modules, or None."""
    state = {}

    def visit(m, path):
        if state.get(m) == 'open':
            return path[path.index(m) :] + [m]
        if m not in state:
            state[m] = 'open'
            for d in sorted(graph[m]):
                found = visit(d, path + [m])
                if found:
                    return found
            state[m] = 'done'
        return None

    for m in sorted(graph):
        found = visit(m, [])
        if found:
            return found
    return None


def test_no_import_cycles():
    graph = import_graph()
    found = cycle(graph)
    assert found is None, 'import cycle: ' + ' -> '.join(found)
    assert cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == list('abca')  # the check can fail
    assert 'tools.bench_grad' in graph['tools.bench'] and 'tools.check_gpu_paper' in graph['tools.check_gpu']
    assert graph['models'] == set() and graph['gradnorm'] == set() and graph['edge_reg'] == set()
    assert 'train' not in graph['attack'] | graph['evaluate'] | graph['data'] | graph['config']
    core = [m for m in graph if not m.startswith('tools.')]
    assert not any(d.startswith('tools.') for m in core for d in graph[m])  # tools/ on top


def test_no_function_over_80_lines():
    for f in glob.glob(os.path.join(HERE, '*.py')):
        for node in ast.walk(parse_file(f)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno < 80, f'{os.path.basename(f)}: {node.name}'


def test_check_gpu_without_a_gpu_says_so_in_one_line_and_exits_0():
    r = subprocess.run(
        [sys.executable, '-m', 'tools.check_gpu'],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES=''),
    )  # no GPU even on a GPU machine
    assert r.returncode == 0 and r.stderr == '', r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and 'no CUDA GPU' in lines[0], r.stdout


@pytest.mark.parametrize('arg', ['--skp=bench', '--ckpt=no/such/ckpt.pt', '--data=no/such/folder'])
def test_check_gpu_refuses_a_bad_option_before_looking_for_a_gpu(arg):
    r = subprocess.run(
        [sys.executable, '-m', 'tools.check_gpu', arg], cwd=HERE, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2 and r.stdout.count('error:') == 1 and 'Traceback' not in r.stderr, (
        r.stdout + r.stderr
    )
