"""What a user does by accident on the evaluation and data side ends in a true number or one line: more
images than exist, unwritable outputs (a folder in the way, a read-only or full disk), a damaged AutoAttack
state, checkpoints and data that do not fit, a bad make value, timm's weights offline, pointless options."""

import json
import os
import resource
import signal
import subprocess
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import attack
import augment as A
import checkpoint as CK
import config as C
import data as D
import evaluate
import models as M
from tests.conftest import HERE, run
from tools import beton, characterize

CPU = torch.device('cpu')
FASHION_INFO = dict(in_ch=1, num_classes=10, img_size=28, mean=D.FASHION_MEAN, std=D.FASHION_STD)


def demo_ckpt(path, data, loader='torchvision', **changes):
    """A random resnet_demo as train.py saves it; changes replace (None: remove) top-level keys."""
    torch.manual_seed(0)
    ck = dict(
        model=M.build_model('resnet_demo', 'gelu', **FASHION_INFO).state_dict(),
        ema=None,
        config=vars(C.Config(data=data, loader=loader, model='resnet_demo')),
        data_info=FASHION_INFO,
        data_id=CK.identity(data) if os.path.isdir(data) else None,
    )
    ck = {k: v for k, v in {**ck, **changes}.items() if v is not None}
    CK.save_checkpoint(str(path), ck)
    return str(path)


def one_error(code, err):
    """-> the error line: exit status 2, one `error:` line, no traceback."""
    lines = [line for line in err.strip().splitlines() if line.startswith('error: ')]
    assert code == 2 and len(lines) == 1 and 'Traceback' not in err, (code, err[-3000:])
    return lines[0]



def image_tree(root, counts, size=32):
    """ImageFolder root/{train,val}/<class>/*.png of random pixels; counts[split][class] images."""
    g = np.random.default_rng(0)
    for split, per_class in counts.items():
        for name, n in per_class.items():
            os.makedirs(root / split / name, exist_ok=True)
            for i in range(n):
                pixels = g.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f'{i}.png')
    return root


# ---------------------------------------------------------------- more images than there are


@pytest.mark.parametrize('loader', ['ffcv', 'torchvision'])
def test_n_beyond_the_test_set_gives_the_same_numbers(loader, tiny_data, tmp_path, monkeypatch, capsys):
    """256 test images: --n=300 evaluates those 256 and says so (FFCV read 44 phantom samples)."""
    if loader == 'ffcv':
        if D.ffcv_error():
            pytest.skip(f'FFCV: {D.ffcv_error()}')
        monkeypatch.setattr(D, 'CACHE', str(tmp_path / 'cache'))
    ckpt = demo_ckpt(tmp_path / 'ckpt.pt', tiny_data, loader)
    results = {}
    for n in (256, 300):
        evaluate.main(
            [
                '--ckpt',
                ckpt,
                '--n',
                str(n),
                '--attacks',
                'ce-2',
                '--no-checks',
                '--json',
                str(tmp_path / f'{n}.json'),
            ]
        )
        results[n] = json.load(open(tmp_path / f'{n}.json'))
        err = capsys.readouterr().err
    said = 'warning: --n=300 is more than the 256 validation images: using all 256'
    assert err.strip().splitlines() == [said]
    assert results[300]['n'] == results[256]['n'] == 256
    assert (results[300]['clean'], results[300]['robust']) == (results[256]['clean'], results[256]['robust'])


def test_train_eval_n_is_lowered_to_the_validation_set_and_said(tiny_data, capsys):
    cfg = C.parse_config([f'--data={tiny_data}', '--eval_n=2048', '--loader=torchvision'])
    _, _, robust_val, _ = D.make_loaders(cfg, 0, 1, CPU)
    said = 'warning: --eval_n=2048 is more than the 256 validation images: using all 256\n'
    assert capsys.readouterr().err == said
    assert cfg.eval_n == 256 and sum(len(y) for _, y in robust_val) == 256
    assert evaluate.pgd_name(cfg).endswith('on 256 held-out images')
    cfg = C.parse_config([f'--data={tiny_data}', '--eval_n=2048', '--loader=torchvision'])
    _, _, robust_val, _ = D.make_loaders(cfg, 1, 2, CPU)  # torchrun's second rank: the same n, no second line
    assert capsys.readouterr().err == '' and cfg.eval_n == 256 and sum(len(y) for _, y in robust_val) == 128
    cfg = C.parse_config([f'--data={tiny_data}', '--loader=torchvision'])
    D.make_loaders(cfg, 0, 1, CPU)  # the default, 1000, means up to 1000: lowered without a word
    assert capsys.readouterr().err == '' and cfg.eval_n == 256


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """3 classes; 2, 1, 3 val images."""
    return image_tree(
        tmp_path_factory.mktemp('imagefolder'),
        {'train': {'a': 2, 'b': 2, 'c': 2}, 'val': {'a': 2, 'b': 1, 'c': 3}},
    )


@pytest.mark.parametrize('loader', ['ffcv', 'torchvision'])
def test_imagefolder_and_beton_paths_yield_exactly_their_images(loader, folder, tmp_path, capsys):
    data = folder
    if loader == 'ffcv':
        if D.ffcv_error():
            pytest.skip(f'FFCV: {D.ffcv_error()}')
        data = tmp_path / 'beton'
        beton.write_beton(str(folder), str(data), workers=1)
        with pytest.raises(ValueError, match='holds samples 0..5, not 0..8'):  # no caller reads past the end
            A.ffcv_loader(str(data / 'val.beton'), 4, CPU, train=False, res=32, indices=range(9))
    capsys.readouterr()
    cfg = C.parse_config(
        [
            f'--data={data}',
            '--recipe=',
            f'--loader={loader}',
            '--res=32',
            '--eval_n=9',
            '--batch_size=2',
            '--workers=1',
        ]
    )
    _, val, robust_val, _ = D.make_loaders(cfg, 0, 1, CPU)
    assert 'warning: --eval_n=9 is more than the 6 validation images: using all 6' in capsys.readouterr().err
    labels = [torch.cat([y for _, y in loader]).tolist() for loader in (robust_val, val)]
    assert cfg.eval_n == 6 and labels[0] == [0, 0, 1, 2, 2, 2] == labels[1]


# ---------------------------------------------------------------- outputs that cannot be written


@contextmanager
def small_fs(path, options):
    """A tmpfs at path (mount -o options) -> path, or None where mounting is not permitted."""
    path.mkdir()
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(path)], capture_output=True)
    try:
        yield None if r.returncode else path
    finally:
        if not r.returncode:
            subprocess.run(['umount', str(path)], check=True)


def guard(*_, **__):
    raise AssertionError('the checkpoint was loaded: the output path was checked too late')


def test_output_path_problems_end_before_any_work(tiny_data, tmp_path, monkeypatch, capsys):
    ckpt = demo_ckpt(tmp_path / 'ckpt.pt', tiny_data)
    monkeypatch.setattr(evaluate, 'load_checkpoint', guard)
    (tmp_path / 'taken').mkdir()
    code = C.cli(evaluate.main, ['--ckpt', ckpt, '--json', str(tmp_path / 'taken')])
    line = one_error(code, capsys.readouterr().err)
    assert str(tmp_path / 'taken') in line and 'a folder is in its place' in line
    (tmp_path / 'eval_linf.autoattack-rank0.json').mkdir()  # the resume state, next to the default JSON
    line = one_error(C.cli(evaluate.main, ['--ckpt', ckpt]), capsys.readouterr().err)
    assert 'eval_linf.autoattack-rank0.json' in line
    with small_fs(tmp_path / 'ro', 'ro,size=64k') as ro:
        if ro is None:
            pytest.skip('mount is not permitted here')
        code = C.cli(evaluate.main, ['--ckpt', ckpt, '--json', str(ro / 'e.json')])
        line = one_error(code, capsys.readouterr().err)
        assert f'{ro} is read-only' in line


def fill(folder):
    """Writes until the file system is full."""
    with open(folder / 'filler', 'wb', buffering=0) as f:
        try:
            while True:
                f.write(b'x' * 4096)
        except OSError:
            pass


def at_most_100_bytes():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG) instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))


@pytest.mark.parametrize('autoattack', [False, True])
def test_full_disk_ends_in_one_line_and_leaves_no_temporary_file(autoattack, tiny_data, tmp_path):
    """The results JSON (or, first, AutoAttack's resume state) on a full tmpfs; where mount is not
    permitted, in a process whose files may not grow past 100 bytes."""
    ckpt = demo_ckpt(tmp_path / 'ckpt.pt', tiny_data)
    argv = ['evaluate.py', '--ckpt', ckpt, '--n', '8', '--attacks', 'ce-1', '--no-checks']
    argv += ['--autoattack'] if autoattack else []
    with small_fs(tmp_path / 'full', 'size=1m') as full:
        out = full or tmp_path / 'full'
        if full:
            fill(full)
        r = run(
            argv + ['--json', str(out / 'e.json')],
            env=dict(os.environ, OMP_NUM_THREADS='1'),
            preexec_fn=None if full else at_most_100_bytes,
        )
        line = one_error(r.returncode, r.stderr)
        name = 'e.autoattack-rank0.json' if autoattack else 'e.json'
        assert line.startswith(f'error: cannot write {"the AutoAttack state " if autoattack else ""}'), line
        assert name in line and r.stderr.strip().endswith(line), r.stderr[-2000:]
        assert sorted(os.listdir(out)) == (['filler'] if full else []), os.listdir(out)


# ---------------------------------------------------------------- a damaged AutoAttack state


def linear(n=32, seed=1):
    """10 classes, logits W x + b on 8x8 inputs; the first 4 labels wrong on purpose."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval().requires_grad_(False)
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(10, 64, generator=g) / 8)
        x = torch.rand(n, 1, 8, 8, generator=g)
        y = model(x).argmax(1)
    y[:4] = (y[:4] + 1) % 10
    return model, [(x[:16], y[:16]), (x[16:], y[16:])]


def damage(kind, saved):
    done, up = saved['done'], lambda bits, i: bits[:i] + '1' + bits[i + 1 :]
    if kind == 'shorter':
        done['0.03/1/apgd-t'] = done['0.03/1/apgd-t'][:-1]
    elif kind == 'longer':
        done['0.03/0/apgd-ce'] += '1'
    elif kind == 'rises':  # image 0 (labelled wrong) fell before any attack, yet stands after APGD-T
        done['0.03/0/apgd-t'] = up(done['0.03/0/apgd-t'], 0)
    elif kind == 'gap':
        del done['0.03/0/apgd-ce']
    elif kind == 'not 0/1':
        done['0.03/1/apgd-ce'] = done['0.03/1/apgd-ce'].replace('1', '7', 1)
    elif kind == 'entry type':
        done['0.03/1/apgd-ce'] = 7
    elif kind == 'done type':
        saved['done'] = list(done)
    elif kind == 'file type':
        return [saved]
    return saved


@pytest.fixture(scope='module')
def aa_run(tmp_path_factory):
    """A fresh AutoAttack (APGD-CE, APGD-T) and the state file of a run that recorded every step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a linear model: extra threads only synchronize
    model, batches = linear()
    path = str(tmp_path_factory.mktemp('aa') / 'state.json')
    fresh = attack.autoattack(model, batches, 0.03, components=COMPS)
    attack.autoattack(model, batches, 0.03, state=attack.State(path, {'ckpt': 'a'}), components=COMPS)
    yield model, batches, fresh, json.load(open(path))
    torch.set_num_threads(threads)


COMPS = ['apgd-ce', 'apgd-t']


@pytest.mark.parametrize(
    'kind',
    ['shorter', 'longer', 'rises', 'gap', 'not 0/1', 'entry type', 'done type', 'file type', 'truncated'],
)
def test_damaged_autoattack_state_starts_afresh_with_a_warning(kind, aa_run, tmp_path, capsys):
    model, batches, fresh, saved = aa_run
    saved, path = json.loads(json.dumps(saved)), str(tmp_path / 'state.json')
    assert saved['done']['0.03/0/apgd-ce'][0] == '0' and len(saved['done']) == 4
    with open(path, 'w') as f:
        f.write(json.dumps(saved)[:40] if kind == 'truncated' else json.dumps(damage(kind, saved)))
    capsys.readouterr()
    again = attack.autoattack(model, batches, 0.03, state=attack.State(path, {'ckpt': 'a'}), components=COMPS)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f'warning: {path}: ')
    assert err[0].endswith('starting AutoAttack afresh')
    assert again['after'] == fresh['after']
    assert all(torch.equal(again['standing'][c], fresh['standing'][c]) for c in COMPS)


# ---------------------------------------------------------------- checkpoints and data that do not fit


@pytest.mark.parametrize(
    'changes,words',
    [
        (dict(config=None), ["'config'"]),
        (dict(model=None), ["'model'"]),
        (dict(data_info=None), ["'data_info'"]),
        (dict(data_info='x'), ["'data_info'", 'not a dict']),
        (
            dict(config={**vars(C.Config(loader='torchvision')), 'model': 'resnet18_small'}),
            ['do not fit', 'resnet18_small'],
        ),
        (dict(config={**vars(C.Config(loader='torchvision')), 'res_start': 16}), ["unknown key 'res_start'"]),
    ],
)
def test_checkpoint_without_a_key_or_misfit_weights_is_one_line(changes, words, tiny_data, tmp_path, capsys):
    ckpt = demo_ckpt(tmp_path / 'ckpt.pt', tiny_data, **changes)
    for main, argv in (
        (evaluate.main, ['--ckpt', ckpt, '--n', '8', '--attacks', 'ce-1', '--no-checks']),
        (characterize.main, [ckpt, '--n', '8', '--out', str(tmp_path / 'c')]),
    ):
        line = one_error(C.cli(main, argv), capsys.readouterr().err)
        assert ckpt in line and all(w in line for w in words), line


def test_checkpoint_of_an_earlier_version_loads_if_it_left_retired_options_alone(tiny_data, tmp_path):
    """A run of the version with progressive resizing (--res_start, 0 = off) evaluates and resumes."""
    config = {**vars(C.Config(data=tiny_data, loader='torchvision', model='resnet_demo')), 'res_start': 0}
    ckpt = demo_ckpt(tmp_path / 'ckpt.pt', tiny_data, config=config)
    assert 'res_start' not in CK.load_checkpoint(ckpt)['config']
    evaluate.main(['--ckpt', ckpt, '--n', '8', '--attacks', 'ce-1', '--no-checks'])
    assert json.load(open(tmp_path / 'eval_linf.json'))['n'] == 8


def test_data_with_other_classes_than_the_checkpoint_is_one_line(folder, tiny_data, tmp_path, capsys):
    ckpt = demo_ckpt(tmp_path / 'ckpt.pt', tiny_data)
    for main, argv in (
        (evaluate.main, ['--ckpt', ckpt, '--data', str(folder), '--attacks', 'ce-1']),
        (characterize.main, [ckpt, '--data', str(folder), '--out', str(tmp_path / 'c')]),
    ):
        code, err = C.cli(main, argv), capsys.readouterr().err
        assert one_error(code, err) == err.strip(), err  # the only line: refused before the data are read
        assert '10 classes of 1-channel images' in err and '3 classes of 3-channel images' in err, err


# ---------------------------------------------------------------- make, timm's weights


def test_make_eval_with_a_bad_value_is_one_error_line():
    for target in ('eval', 'characterize'):
        # -o: never (re)install into the shared virtualenv from a test
        r = subprocess.run(
            ['make', '-o', '.venv/.installed', target, 'ACT=tanh'],
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode != 0 and 'python' not in r.stdout, r.stdout  # nothing ran
        assert one_error(2, r.stderr) == 'error: --act=tanh: must be relu, gelu, silu'


def hub_env(home, **extra):
    unset = ('HF_HUB_CACHE', 'HUGGINGFACE_HUB_CACHE', 'HF_HUB_OFFLINE')
    env = {k: v for k, v in os.environ.items() if k not in unset}
    return dict(env, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY='1', **extra)


def test_pretrained_weights_missing_offline_is_one_line_naming_model_cache_and_fix(tiny_data, tmp_path):
    home = tmp_path / 'hf'
    args = [f'--data={tiny_data}', '--model=timm/resnet18', '--init=pretrained', f'--out={tmp_path / "run"}',
            '--loader=torchvision', '--epochs=1']
    r = run(['train.py'] + args, env=hub_env(home, HF_HUB_OFFLINE='1'))
    line = one_error(r.returncode, r.stderr)
    words = ('resnet18', f'{home / "hub"}', "timm.create_model('resnet18', pretrained=True)")
    assert all(w in line for w in words), line
    assert not os.path.exists(tmp_path / 'run')  # failed at start: no folder left behind


# ---------------------------------------------------------------- options the data make meaningless


def test_val_class_that_train_lacks_is_refused(tmp_path, capsys):
    data = image_tree(tmp_path / 'f', {'train': {'a': 1, 'b': 1}, 'val': {'a': 1, 'b': 1, 'zebra': 2}})
    cfg = C.parse_config([f'--data={data}', '--recipe=', '--loader=torchvision', '--res=32'])
    with pytest.raises(C.UserError, match='zebra is a class folder the 2 training classes lack'):
        D.make_loaders(cfg, 0, 1, CPU)
    if not D.ffcv_error():
        with pytest.raises(C.UserError, match='zebra'):
            beton.write_beton(str(data), str(tmp_path / 'beton'), workers=1)
        assert not os.path.exists(tmp_path / 'beton' / 'train.beton')  # refused before any writing


def test_res_on_fashion_mnist_is_announced_as_ignored(tiny_data, capsys):
    ignored = "warning: --res=64 is ignored: Fashion-MNIST's images are 28 px and are used as they are"
    for res, said in ((64, [ignored]), (224, [])):
        cfg = C.parse_config([f'--data={tiny_data}', f'--res={res}', '--loader=torchvision', '--eval_n=8'])
        D.make_loaders(cfg, 0, 1, CPU)
        assert capsys.readouterr().err.splitlines() == said


def test_vit_patch_must_tile_the_images(tiny_data, tmp_path, capsys):
    import train as T

    argv = [f'--data={tiny_data}', '--model=vit_tiny', '--loader=torchvision', f'--out={tmp_path / "run"}']
    line = one_error(C.cli(T.main, argv), capsys.readouterr().err)  # Fashion-MNIST: 28 px whatever --res
    assert '--model=vit_tiny: 16 px patches do not tile 28 px images' in line, line
    assert not (tmp_path / 'run').exists()
    C.cli(T.main, argv[:1] + ['--model=vit_demo', '--epochs=1', '--eval_n=8', '--eval_steps=1'] + argv[2:])
    assert (tmp_path / 'run' / 'ckpt.pt').exists()  # 4 px patches tile 28 px
    with pytest.raises(ValueError, match='16 px patches do not tile 200 px'):
        M.build_model('vit_small', img_size=200)


def test_the_data_evaluated_are_checked_and_recorded(folder, tmp_path, capsys):
    """Header and JSON name the data and their fingerprint; the checkpoint's classes in another order are
    mapped by name (one line), other class names refused (one line), other images warned (one line); a
    checkpoint without the record is said to lack it."""
    info = dict(in_ch=3, num_classes=3, img_size=32)
    cfg = vars(C.Config(data=str(folder), loader='torchvision', model='resnet_demo', res=32, recipe=''))
    torch.manual_seed(0)
    state = M.build_model('resnet_demo', 'gelu', **info).state_dict()
    state['fc.bias'] = torch.tensor([100.0, 0.0, 0.0])  # always its class 0
    data_id = CK.identity(str(folder))  # classes a, b, c; val: 2, 1, 3 images

    def evaluated(**changes):
        ckpt = demo_ckpt(tmp_path / 'ckpt.pt', str(folder), model=state, config=cfg, data_info=info,
                         data_id={**data_id, **changes})
        code = C.cli(evaluate.main, ['--ckpt', ckpt, '--attacks', 'ce-1', '--no-checks', '--n=6'])
        out, err = capsys.readouterr()
        ours = [line for line in err.splitlines() if 'fingerprint' in line or 'class' in line]
        return code, out, ours, (json.load(open(tmp_path / 'eval_linf.json')) if code is None else None)

    code, out, err, res = evaluated()
    assert code is None and not err and f'data: {folder} (fingerprint {data_id["fingerprint"]})' in out
    assert res['data'] == {'path': str(folder), 'fingerprint': data_id['fingerprint']}
    assert res['clean'] == 2 / 6  # class a
    code, out, err, res = evaluated(classes=['b', 'a', 'c'])  # its class 0 is b
    assert len(err) == 1 and 'labels mapped by name' in err[0] and res['clean'] == 1 / 6
    # a resume maps nothing: another order is refused
    with pytest.raises(C.UserError, match="another order: class 0 is 'b' there, 'a' here"):
        CK.check_identity('ckpt.pt', {'data_id': {**data_id, 'classes': ['b', 'a', 'c']}}, data_id)
    code, out, err, res = evaluated(classes=['a', 'b', 'dog'])
    assert code == 2 and len(err) == 1 and err[0].startswith('error: ') and "'dog' there, 'c' here" in err[0]
    code, out, err, res = evaluated(fingerprint='0123456789abcdef')
    assert code is None and len(err) == 1 and err[0].startswith('warning: ') and '0123456789abcdef' in err[0]
    assert data_id['fingerprint'] in err[0]
    ckpt = demo_ckpt(tmp_path / 'ckpt.pt', str(folder), model=state, config=cfg, data_info=info, data_id=None)
    assert C.cli(evaluate.main, ['--ckpt', ckpt, '--attacks', 'ce-1', '--no-checks', '--n=6']) is None
    assert 'records no class names or data fingerprint' in capsys.readouterr().err
