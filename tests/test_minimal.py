"""minimal.py, the one-file version: its settings (--help, one-line errors), that the demo's GradNorm learns
on real Fashion-MNIST images, every objective and both models, an ImageFolder, and torchrun with 2 ranks.
Run in this process (fresh module globals for each test), torchrun as a subprocess."""
import importlib
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

from data import load_fashion_mnist
from tests.conftest import FASHION, HERE

FINAL = re.compile(r'final: clean (\d+\.\d)% \| PGD-(\d+) worst (\d+\.\d)% at eps 0\.1')
QUICK = ['--batch_size=64', '--eval_n=32', '--eval_steps=3']
BACKEND = 'aot_eager_decomp_partition'  # torch.compile without Inductor's code generation (minutes on a CPU)


@pytest.fixture
def minimal(one_thread):
    import minimal
    return importlib.reload(minimal)  # its settings are module globals: each test starts from the defaults


def lines(text):
    """Printed lines, the progress lines (ended by a carriage return) apart."""
    return [line for line in re.split(r'[\r\n]', text) if line]


def run(minimal, capsys, args):
    minimal.main(args)
    return lines(capsys.readouterr().out)


def test_help_lists_every_setting_with_its_default_and_comment(minimal, capsys):
    with pytest.raises(SystemExit) as e:
        minimal.main(['--eps=0.2', '--help'])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for key, value in minimal.SETTINGS.items():
        assert re.search(rf'^  --{key}={re.escape(str(value))} +\S', out, re.M), key
    assert re.search(r'--eps=0.1 +L-inf budget', out)  # the default, not the override before --help


BAD = ['--epoch=3', 'epochs=3', '--epochs', '--epochs=2.5', '--eps=abc', '--eps=nan', '--eps=0', '--eps=2',
       '--lr=-1', '--act=tanh', '--amp=maybe', '--objective=trades', '--edge_alpha=1,2', '--edge_alpha=a,b,c']


@pytest.mark.parametrize('arg', BAD)
def test_a_bad_setting_is_one_error_line_and_exit_2(minimal, capsys, arg):
    with pytest.raises(SystemExit) as e:
        minimal.main(['--epochs=1', arg])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == '' and len(err.splitlines()) == 1 and err.startswith('error: '), err


def test_settings_take_the_defaults_type(minimal):
    minimal.configure(['--epochs=7', '--eps=0.25', '--amp=False', '--act=silu', '--data=/x'])
    got = (minimal.epochs, minimal.eps, minimal.amp, minimal.act, minimal.data)
    assert got == (7, 0.25, False, 'silu', '/x')


def test_the_gradnorm_demo_learns(minimal, capsys, tiny_data):
    """512 real training images, 3 epochs of 8 steps: cross-entropy falls, clean accuracy is far above chance
    (10%), PGD's worst case counts only images classified correctly."""
    out = run(minimal, capsys, [f'--data={tiny_data}', '--epochs=3', '--warmup_epochs=0.5'] + QUICK)
    assert out[0].startswith('gradnorm (fd) | resnet gelu | 77,754 params | 1 x cpu | compile=False')
    epochs = [re.match(r'epoch \d ce ([\d.]+) gradnorm ([\d.]+) \| clean ([\d.]+)%', line) for line in out]
    ce = [float(m[1]) for m in epochs if m]
    assert len(ce) == 3 and ce[2] < ce[0] - 0.2, out
    final = FINAL.fullmatch(out[-1])
    assert final, out[-1]
    clean, steps, worst = float(final[1]), int(final[2]), float(final[3])
    assert clean > 30 and steps == 3 and worst <= clean


@pytest.mark.parametrize('args, header, term', [
    (['--objective=standard', '--act=relu'], 'standard (-) | resnet relu', 'ce'),
    (['--act=relu'], 'gradnorm (exact) | resnet relu', 'gradnorm'),  # fd needs a smooth activation
    (['--objective=edge'], 'edge (-) | resnet gelu', 'edge_mse'),
    (['--objective=pgd', '--act=silu'], 'pgd (-) | resnet silu', 'ce_adv'),
    (['--objective=fgsm'], 'fgsm (-) | resnet gelu', 'ce_adv'),
    (['--arch=vit', '--gradnorm_impl=exact'], 'gradnorm (exact) | vit gelu | 454,858 params', 'gradnorm'),
])
def test_every_objective_and_model_trains(minimal, capsys, tiny_data, args, header, term):
    few = [f'--data={tiny_data}', '--epochs=1', '--train_n=128', '--val_n=64']
    out = run(minimal, capsys, few + QUICK + args)
    assert out[0].startswith(header)
    assert re.match(rf'epoch 0 .*{term} [\d.]+ ', out[-2]) and FINAL.fullmatch(out[-1]), out


def test_an_image_folder(minimal, capsys, tmp_path):
    """train/ and val/ of 3 classes of real Fashion-MNIST images as PNG files, read at 28 px as RGB."""
    (x, y), _ = load_fashion_mnist(FASHION)
    for split, first in (('train', 0), ('val', 100)):
        for i in range(first, first + 60):
            if y[i] < 3:
                os.makedirs(tmp_path / split / f'c{y[i]}', exist_ok=True)
                Image.fromarray(x[i, 0].numpy()).save(tmp_path / split / f'c{y[i]}' / f'{i}.png')
    out = run(minimal, capsys, [f'--data={tmp_path}', '--res=28', '--workers=0', '--batch_size=8',
                                '--epochs=1', '--eval_n=8', '--eval_steps=2'])
    # the demo's 77,754 parameters with 3 input channels (+288) and 3 classes (-455)
    assert out[0].startswith('gradnorm (fd) | resnet gelu | 77,587 params') and FINAL.fullmatch(out[-1]), out


def test_torchrun_two_ranks_train_together_and_rank_0_alone_prints(tiny_data):
    cmd = [os.path.join(os.path.dirname(sys.executable), 'torchrun'), '--standalone', '--nproc_per_node=2',
           'minimal.py', f'--data={tiny_data}', '--epochs=1', '--train_n=128'] + QUICK
    p = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert p.returncode == 0, p.stderr[-3000:]
    out = lines(p.stdout)
    assert out[0].startswith('gradnorm (fd) | resnet gelu | 77,754 params | 2 x cpu'), out
    assert sum(line.startswith('epoch 0 step 1/2 ') for line in out) == 1  # 128 images, 64 a step: 2 steps
    assert sum(bool(FINAL.fullmatch(line)) for line in out) == 1, out


def test_the_compiled_loss_is_one_graph_and_trains(minimal, capsys, tiny_data, monkeypatch):
    """--compile=on: the whole GradNorm loss (its autograd.grad inside) compiled with fullgraph, as on CUDA
    (Dynamo raises if it cannot trace it as one graph)."""
    real = torch.compile
    monkeypatch.setattr(torch, 'compile', lambda fn, **kw: real(fn, backend=BACKEND, **kw))
    torch._dynamo.reset()
    out = run(minimal, capsys, [f'--data={tiny_data}', '--epochs=1', '--train_n=128', '--val_n=64',
                                '--compile=on', *QUICK])
    torch._dynamo.reset()
    assert 'compile=True' in out[0] and FINAL.fullmatch(out[-1])
