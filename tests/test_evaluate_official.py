"""The authors' released checkpoint format through the evaluator (tools/official.py), and `make train
RECIPE=swinb_gradnorm` then `make eval` end to end on the CPU."""
import argparse
import json
import os
import re
import subprocess

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import checkpoint as CK
import config as C
import models as M
from tests.conftest import HERE, SWINB, fake_hub, offline_env
from tools import official


def official_file(path, ema, other, **args):
    """timm's CheckpointSaver format, as the authors' training script writes it."""
    torch.save(
        dict(
            epoch=99,
            arch=args.get('model'),
            state_dict=other,
            optimizer={},
            version=2,
            metric=1.0,
            args=argparse.Namespace(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], **args),
            state_dict_ema=ema,
        ),
        path,
    )


def original_swin_layout(sd, depths=(2, 2, 18, 2), window=7):
    """timm's Swin keys -> the original layout their Swin-B was saved in (swin_transformer_timm_version.py:
    patch merging at the end of stage i, not the start of i + 1; `head.weight`; persistent
    relative_position_index and attn_mask buffers)."""
    out = {
        re.sub(r'layers\.(\d+)\.downsample', lambda m: f'layers.{int(m.group(1)) - 1}.downsample', k).replace(
            'head.fc.', 'head.'
        ): v
        for k, v in sd.items()
    }
    for i, d in enumerate(depths):
        for j in range(d):
            out[f'layers.{i}.blocks.{j}.attn.relative_position_index'] = torch.zeros(
                window**2, window**2, dtype=torch.long
            )
            if j % 2 and i < 3:
                out[f'layers.{i}.blocks.{j}.attn_mask'] = torch.zeros(1, window**2, window**2)
    return out


def test_official_swin_checkpoint_loads_its_ema_weights(tmp_path):
    torch.manual_seed(0)
    ref = M.build_model(SWINB, 'gelu').eval()
    sd = ref.model.state_dict()
    old = original_swin_layout(sd)
    assert 'layers.0.downsample.reduction.weight' in old and 'head.weight' in old
    official_file(
        tmp_path / 'gradnorm_swinb.pth.tar',
        old,
        {k: v + 1 for k, v in old.items() if v.is_floating_point()},
        model=SWINB,
    )
    ck, model = official.load_official(str(tmp_path / 'gradnorm_swinb.pth.tar'), SWINB)
    assert all(
        torch.equal(model.model.state_dict()[k], v) for k, v in sd.items()
    )  # the EMA weights, converted
    assert (ck['config']['model'], ck['data_info']['img_size'], ck['data_info']['mean']) == (
        SWINB,
        224,
        (0.485, 0.456, 0.406),
    )
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref(x))


def image_tree(root, counts, size=80):
    """ImageFolder train/ and val/ of random photos-to-be: counts[split] = images per class."""
    g = np.random.default_rng(0)
    for split, per_class in counts.items():
        for c, n in enumerate(per_class):
            os.makedirs(root / split / f'class{c}', exist_ok=True)
            for i in range(n):
                Image.fromarray(g.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                    root / split / f'class{c}' / f'{i}.png'
                )
    return root


def make(*args, env=None, timeout=900):
    # -o: never (re)install into the shared virtualenv from a test
    return subprocess.run(
        ['make', '-o', '.venv/.installed', *args],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(env or os.environ, OMP_NUM_THREADS='1'),  # conftest.one_thread_env
    )


def test_make_eval_of_an_official_resnet50(tmp_path):
    """The whole path, `make eval CKPT=official:...`, on a checkpoint whose EMA weights answer
    class 1 whatever the image and whose training weights answer class 0: accuracy is exactly the
    share of class 1 among the first 6 val images (3 of 6), clean and under attack."""
    import timm

    data = image_tree(tmp_path / 'imnet', {'train': [1, 1, 1], 'val': [1, 3, 2]})
    sd = timm.create_model('resnet50').state_dict()
    head = lambda c: {
        'fc.weight': torch.zeros(1000, 2048),
        'fc.bias': 10 * F.one_hot(torch.tensor(c), 1000).float(),
    }
    official_file(tmp_path / 'rn50_gelu.pth.tar', {**sd, **head(1)}, {**sd, **head(0)}, model='resnet50')
    r = make(
        'eval',
        f'CKPT=official:{tmp_path / "rn50_gelu.pth.tar"}',
        'MODEL=timm/resnet50',
        f'DATA={data}',
        'AA=0',
        f'ARGS=--n 6 --attacks ce-1 --no-checks --json {tmp_path / "eval.json"}',
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    result = json.load(open(tmp_path / 'eval.json'))
    assert (result['model'], result['weights'], result['n'], result['objective']) == (
        'timm/resnet50',
        'ema',
        6,
        'official',
    )
    assert result['clean'] == 0.5 and result['robust']['4/255']['worst'] == 0.5


def test_official_checkpoint_errors(tmp_path, capsys):
    torch.save({'state_dict': {}}, tmp_path / 'x.pth.tar')
    ckpt, data = f'--ckpt={tmp_path}/x.pth.tar', f'--data={tmp_path}'
    for argv, words in (
        ([ckpt, data], ['--model']),
        ([ckpt, f'--model={SWINB}'], ['--data']),
        ([ckpt, '--model=resnet50', data], ['timm']),
        ([ckpt, '--model=resnet9000', data], ['resnet9000']),
        ([ckpt, f'--model={SWINB}', '--act=tanh', data], ['tanh']),
        ([ckpt, f'--model={SWINB}', '--weights=model', data], ['EMA']),
        ([ckpt, f'--model={SWINB}', data], ['state_dict_ema']),
    ):
        assert C.cli(official.main, argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith('error: ') and len(err.splitlines()) == 1 and all(w in err for w in words), err


# ---------------------------------------------------------------- the real path, end to end


def test_make_train_swinb_gradnorm_recipe_then_eval(tmp_path):
    """`make train-gradnorm RECIPE=swinb_gradnorm` at 64 px: timm's Swin-B from (random) pretrained
    weights in a Hugging Face cache, GradNorm with 2 accumulated micro-batches, EMA, fp32; then
    `make eval` on its checkpoint."""
    data = image_tree(tmp_path / 'tiny', {'train': [2, 2, 2], 'val': [2, 1, 1]})
    fake_hub(tmp_path / 'hub', SWINB)
    env, out = offline_env(tmp_path / 'hub'), tmp_path / 'run'
    r = make(
        'train-gradnorm',
        'RECIPE=swinb_gradnorm',
        f'DATA={data}',
        f'OUT={out}',
        'ARGS=--res=64 --epochs=1 --batch_size=4 --eval_n=4 --eval_steps=1 --loader=torchvision --workers=0',
        env=env,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    first = lines[
        lines.index(next(line for line in lines if 'train.py' in line)) + 1
    ]  # make echoes the command first
    assert first.startswith('recipe swinb_gradnorm: objective=gradnorm ')
    assert all(
        w in first for w in (' model=swin_base_patch4_window7_224 ', ' res=64* ', ' batch_size=4* ',
                             ' accum=2 ', ' amp=False ', ' init=pretrained ')
    )
    ck = CK.load_checkpoint(str(out / 'ckpt.pt'))
    assert ck['step'] == 1 and ck['ema'] is not None and ck['config']['recipe'] == 'swinb_gradnorm'
    r = make(
        'eval',
        f'CKPT={out / "ckpt.pt"}',
        'AA=0',
        'ARGS=--n 4 --attacks ce-1 --no-checks --weights=ema',
        env=env,
    )
    assert r.returncode == 0 and 'EMA weights' in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
