"""The paper's models and runs: timm's Swin-B, ResNet-50 and a ViT (forward, double backward,
activation swap, pretrained weights offline), EdgeReg against a transcription of the authors'
formulas, the recipes against the numbers of their configs, their released checkpoint format, and
`make train-gradnorm RECIPE=swinb_gradnorm` end to end on the CPU. No network: timm's weights
come from a Hugging Face cache written here."""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import scipy.special
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import config as C
import gradnorm as G
import models as M
import train as T
from edge_reg import edge_reg
from tests.conftest import HERE

SWINB = 'swin_base_patch4_window7_224'
# name -> activation modules of the architecture: Swin-B 2+2+18+2 blocks with one MLP activation
# each; ResNet-50 the stem's and 3 per bottleneck (16); ViT-Ti 12 blocks
TIMM_CASES = {SWINB: 24, 'timm/resnet50': 49, 'vit_tiny_patch16_224': 12}


@pytest.fixture(scope='module')
def timm_models():
    """Each built once without weights, at 32 px, with SiLU swapped in (none of them has SiLU)."""
    torch.manual_seed(0)
    return {n: M.build_model(n, 'silu', num_classes=5, img_size=32) for n in TIMM_CASES}


@pytest.mark.parametrize('name', list(TIMM_CASES))
def test_activation_swap_reaches_every_activation(name, timm_models, monkeypatch):
    model = timm_models[name].eval()
    acts = [m for m in model.modules() if isinstance(m, M.activation_types())]
    assert len(acts) == TIMM_CASES[name] and all(type(m) is nn.SiLU for m in acts)

    def refuse(*a, **k):
        raise AssertionError('an activation other than SiLU ran')

    for fn in ('gelu', 'relu'):  # nothing computes the old activation, not even functionally
        monkeypatch.setattr(F, fn, refuse)
    monkeypatch.setattr(torch, 'relu', refuse)
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 5)


@pytest.mark.parametrize('name', list(TIMM_CASES))
def test_timm_model_double_backward(name, timm_models):
    """GradNorm's penalty and EdgeReg's gradient match reach the weights: both differentiate the
    input gradient again (attention through the math path)."""
    model = timm_models[name].train()
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([0, 3])
    mean, std = M.normalization(model)
    for term, run in (
        ('gradnorm', lambda: G.gradnorm(model, x, y, 4 / 255, torch.tensor(1.0))[1]['gradnorm']),
        ('edge_mse', lambda: edge_reg(model, x, y, torch.tensor(1.0), mean=mean, std=std)[1]['edge_mse']),
    ):
        model.zero_grad()
        torch.manual_seed(0)
        run().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), term
        assert sum(g.abs().sum() for g in grads) > 0, term
    assert torch.equal(
        mean.flatten(), torch.tensor(model.model.pretrained_cfg['mean'])
    )  # timm's own normalization


def test_timm_attention_double_backward_matches_finite_differences():
    """ViT's attention is F.scaled_dot_product_attention (timm's fused_attn): under the objectives'
    math backend its second derivative is right. Derivative of the GradNorm loss along a random
    direction of the first block's qkv weights, float64, central differences."""
    torch.manual_seed(0)
    model = M.build_model('vit_tiny_patch16_224', 'gelu', num_classes=5, img_size=32).double().eval()
    assert model.model.blocks[0].attn.fused_attn
    x, y = torch.rand(2, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 3])
    w = model.model.blocks[0].attn.qkv.weight
    f = lambda: G.gradnorm(model, x, y, 4 / 255, torch.tensor(1.0, dtype=torch.float64))[0]
    (grad,) = torch.autograd.grad(f(), [w])
    v, h, values = torch.randn_like(w), 1e-6, []
    for sign in (1, -2):
        with torch.no_grad():
            w.add_(v, alpha=sign * h)
        values.append(f().item())
    numeric, analytic = (values[0] - values[1]) / (2 * h), (grad * v).sum().item()
    assert abs(numeric - analytic) <= 1e-6 * abs(analytic), (numeric, analytic)


# ---------------------------------------------------------------- timm's weights, offline


def fake_hub(cache, name, seed=0):
    """Random weights for timm's default pretrained tag of name, in the Hugging Face cache layout,
    where timm's loader finds them with HF_HUB_OFFLINE=1. -> the state_dict written"""
    import safetensors.torch
    import timm

    repo = timm.models.get_pretrained_cfg(name).hf_hub_id
    with torch.device('meta'):
        shapes = timm.create_model(name).state_dict()
    g = torch.Generator().manual_seed(seed)
    sd = {
        k: (torch.ones(v.shape) if k.endswith('running_var') else 0.02 * torch.randn(v.shape, generator=g))
        if v.is_floating_point()
        else torch.zeros(v.shape, dtype=v.dtype)
        for k, v in shapes.items()
    }
    folder = os.path.join(cache, f'models--{repo.replace("/", "--")}')
    commit = 'c0ffee' * 6 + 'c0ff'
    os.makedirs(os.path.join(folder, 'refs'), exist_ok=True)
    os.makedirs(os.path.join(folder, 'snapshots', commit), exist_ok=True)
    with open(os.path.join(folder, 'refs', 'main'), 'w') as f:
        f.write(commit)
    safetensors.torch.save_file(sd, os.path.join(folder, 'snapshots', commit, 'model.safetensors'))
    return sd


def offline_env(cache):
    return dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE='1', HF_HUB_DISABLE_TELEMETRY='1')


def test_pretrained_tags_are_the_papers():
    """What --init=pretrained fetches: the ImageNet-22k -> 1k Swin-B the authors started from
    (Microsoft's 22kto1k release), and timm's default ResNet-50 of their timm 1.0.9 (a1_in1k)."""
    import timm

    swin, rn50 = timm.models.get_pretrained_cfg(SWINB), timm.models.get_pretrained_cfg('resnet50')
    assert swin.hf_hub_id == f'timm/{SWINB}.ms_in22k_ft_in1k' and swin.url.endswith(
        'swin_base_patch4_window7_224_22kto1k.pth'
    )
    assert rn50.hf_hub_id == 'timm/resnet50.a1_in1k'
    assert timm.__version__ == '1.0.31'


def test_init_pretrained_loads_timms_weights_offline(tmp_path):
    """Through timm's real loader (hf_hub_download + safetensors), from a cache with random weights."""
    sd = fake_hub(tmp_path, 'resnet18')
    torch.save(sd, tmp_path / 'expected.pt')
    script = (
        'import sys, torch, models as M\n'
        'm = M.build_model("timm/resnet18", "gelu", num_classes=1000, pretrained=True)\n'
        f'sd = torch.load({str(tmp_path / "expected.pt")!r})\n'
        'assert all(torch.equal(m.model.state_dict()[k], v) for k, v in sd.items()), "weights differ"\n'
        'assert sum(isinstance(a, torch.nn.GELU) for a in m.modules()) == 17\n'
        'print("loaded", len(sd))\n'
    )
    r = subprocess.run(
        [sys.executable, '-c', script],
        cwd=HERE,
        env=offline_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and 'loaded' in r.stdout, r.stderr[-3000:]


# ---------------------------------------------------------------- EdgeReg as the authors compute it


def official_edge_loss(net, x_norm, y, alpha, temp, sigma=1.0, smoothing=0.1):
    """A transcription of adversarial_training_logit.py's loss and gradient_teachers.ContourEnergy
    (numpy/scipy kernels, reflect padding, their filter order); net eats normalized images."""
    order = math.ceil(3 * sigma)
    h = math.exp(-sigma) * scipy.special.iv(np.arange(-order, order + 1), sigma)
    gauss = torch.from_numpy(h / h.sum())
    r = np.linspace(-1, 1, 3)
    gx, gy = np.meshgrid(r, r)
    den = gx**2 + gy**2
    den[:, 1] = 1
    sobel = torch.from_numpy(gx / den)

    def teacher(img):
        N, C, H, W = img.shape
        p = (len(gauss) - 1) // 2
        img = F.pad(img, (p,) * 4, 'reflect')
        img = F.conv2d(img, gauss[None, None, :, None].expand(C, -1, -1, -1), groups=C)
        img = F.conv2d(img, gauss[None, None, None, :].expand(C, -1, -1, -1), groups=C)
        img = F.pad(img, (1,) * 4, 'reflect')
        dx = F.conv2d(img, sobel[None, None].expand(C, -1, -1, -1), groups=C)
        dy = F.conv2d(img, sobel.T[None, None].expand(C, -1, -1, -1), groups=C)
        E = (dx**2 + dy**2).sum(-3, keepdim=True) ** 0.5
        E = F.pad(E, (p,) * 4, 'reflect')
        E = F.conv2d(E, gauss[None, None, :, None])
        E = F.conv2d(E, gauss[None, None, None, :])
        return E.expand(-1, C, -1, -1)

    x_norm = x_norm.clone().requires_grad_(True)
    output = net(x_norm)
    sample = torch.distributions.one_hot_categorical.OneHotCategorical(
        logits=output / temp, validate_args=False
    ).sample()
    gradient = torch.autograd.grad((output * sample).sum(-1).sum(), x_norm, create_graph=True)[0]
    gradient = gradient / gradient.square().mean() ** 0.5
    with torch.no_grad():
        ref = teacher(x_norm)
        ref = ref / ref.square().mean() ** 0.5
    loss_class = F.cross_entropy(output, y, label_smoothing=smoothing)
    return loss_class + alpha * F.mse_loss(gradient, ref)


def test_edge_reg_is_the_authors_formula():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GELU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.GELU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).double()
    mean, std = (
        torch.tensor(M.IMAGENET_MEAN).view(1, 3, 1, 1).double(),
        torch.tensor(M.IMAGENET_STD).view(1, 3, 1, 1).double(),
    )
    model = nn.Sequential(M.Normalize(M.IMAGENET_MEAN, M.IMAGENET_STD).double(), net)
    x, y = torch.rand(6, 3, 20, 24, dtype=torch.float64), torch.randint(0, 10, (6,))
    alpha = 1 + 0.09 * 2.5
    torch.manual_seed(1)
    ours, parts = edge_reg(model, x, y, alpha, temperature=0.5, mean=mean, std=std)
    torch.manual_seed(1)
    theirs = official_edge_loss(net, (x - mean) / std, y, alpha, temp=0.5)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=0)
    assert parts['edge_mse'] > 0.1  # a real mismatch to compare, not two zeros


def test_edge_alpha_grows_within_the_epoch():
    cfg = C.parse_config(['--objective=edge', '--edge_alpha=1,0.09,19'])
    fn = T.objective(cfg, torch.device('cpu'))
    torch.manual_seed(0)
    model = M.build_model('vit_demo', 'gelu', in_ch=1, num_classes=10, img_size=28)
    for t, alpha in ((2.5, 1.225), (500.0, 19.0)):
        loss, parts = fn(model, torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3]), t)
        torch.testing.assert_close(loss, parts['ce'] + alpha * parts['edge_mse'])


# ---------------------------------------------------------------- recipes


def resolved(name, *extra):
    return C.parse_config([f'--recipe={name}', *extra])


SWIN_COMMON = dict(
    model=SWINB,
    init='pretrained',
    act='gelu',
    epochs=100,
    weight_decay=0.05,
    warmup_epochs=5.0,
    min_lr=1e-5,
    smoothing=0.1,
    ema=0.9998,
    eps=4 / 255,
    res=224,
    mixup=0.8,
    cutmix=1.0,
    randaug='rand-m9-mstd0.5-inc1',
    reprob=0.25,
    amp=False,
    eval_n=5000,
)
RN50_COMMON = dict(
    model='timm/resnet50',
    batch_size=256,
    weight_decay=0.05,
    warmup_epochs=5.0,
    min_lr=1e-5,
    smoothing=0.1,
    eps=4 / 255,
    res=224,
    mixup=0.8,
    cutmix=1.0,
    randaug='rand-m9-mstd0.5-inc1',
    reprob=0.25,
    amp=False,
    bn_eval=True,
    eval_n=5000,
)
EXPECTED = {  # the authors' configs: per-GPU batch x accumulation x GPUs; lr = base lr x batch / 512
    'swinb_gradnorm': dict(
        SWIN_COMMON,
        objective='gradnorm',
        batch_size=38 * 2 * 8,
        accum=2,
        lr=0.625e-3 * 608 / 512,
        clip=0.5,
        ramp_epochs=5.0,
        gn_weights='0.8,1.2',
        bn_eval=True,
    ),
    'swinb_edge': dict(
        SWIN_COMMON,
        objective='edge',
        batch_size=608,
        accum=2,
        lr=0.625e-3 * 608 / 512,
        clip=0.5,
        edge_alpha='1,0.09,19',
        bn_eval=False,
    ),
    'swinb_pgd': dict(
        SWIN_COMMON,
        objective='pgd',
        pgd_steps=3,
        batch_size=64 * 8,
        accum=1,
        lr=1.25e-3,
        clip=math.inf,
        bn_eval=True,
    ),
    'swinb_standard': dict(
        SWIN_COMMON,
        objective='standard',
        batch_size=74 * 8,
        accum=1,
        lr=0.625e-3 * 592 / 512,
        clip=1.0,
        bn_eval=True,
    ),
    'rn50_gelu_stage1': dict(
        RN50_COMMON,
        objective='standard',
        act='gelu',
        init='pretrained',
        epochs=4,
        ema=0.0,
        lr=1.25e-3 / 2,
        clip=1.0,
        accum=1,
    ),
    'rn50_relu_stage1': dict(
        RN50_COMMON,
        objective='standard',
        act='relu',
        init='pretrained',
        epochs=4,
        ema=0.0,
        lr=1.25e-3 / 2,
        clip=1.0,
    ),
    'rn50_silu_stage1': dict(
        RN50_COMMON,
        objective='standard',
        act='silu',
        init='pretrained',
        epochs=4,
        ema=0.0,
        lr=1.25e-3 / 2,
        clip=1.0,
    ),
    'rn50_gelu_gradnorm': dict(
        RN50_COMMON,
        objective='gradnorm',
        act='gelu',
        epochs=83,
        ema=0.9998,
        lr=1.25e-3 / 2,
        clip=1.0,
        accum=1,
        ramp_epochs=5.0,
        gn_weights='0.8,1.2',
    ),
    'rn50_relu_gradnorm': dict(
        RN50_COMMON,
        objective='gradnorm',
        act='relu',
        epochs=50,
        ema=0.9998,
        lr=0.625e-3 / 2,
        clip=1.0,
        ramp_epochs=10.0,
        gn_weights='0.5,0.5',
    ),
    'rn50_silu_gradnorm': dict(
        RN50_COMMON,
        objective='gradnorm',
        act='silu',
        epochs=50,
        ema=0.9998,
        lr=1.25e-3 / 2,
        accum=2,
        clip=0.5,
        ramp_epochs=5.0,
        gn_weights='0.5,0.5',
    ),
}


def test_every_recipe_resolves_to_the_papers_values(tmp_path, monkeypatch):
    assert set(EXPECTED) == set(C.RECIPES)
    for act in ('gelu', 'relu', 'silu'):  # stage 2 starts from stage 1's default output folder
        stage1 = tmp_path / 'runs' / 'imnet' / f'timm-resnet50-standard-{act}'
        stage1.mkdir(parents=True)
        (stage1 / 'ckpt.pt').write_bytes(b'x')
    (tmp_path / 'imnet').mkdir()
    monkeypatch.chdir(tmp_path)
    for name, want in EXPECTED.items():
        cfg = resolved(name, '--data=imnet')
        got = {k: getattr(cfg, k) for k in want}
        assert got['lr'] == pytest.approx(want['lr'], rel=1e-12), name
        assert {**got, 'lr': 0} == {**want, 'lr': 0}, name
        if name.startswith('rn50') and name.endswith('_gradnorm'):
            assert cfg.init == f'runs/imnet/timm-resnet50-standard-{cfg.act}/ckpt.pt'


def test_recipe_overrides_and_lr_scaling():
    cfg = resolved('swinb_gradnorm', '--epochs=3', '--batch_size=532')  # the 7 GPUs of run_train.sh
    assert (cfg.epochs, cfg.batch_size, cfg.clip) == (3, 532, 0.5)
    assert cfg.lr == pytest.approx(0.625e-3 * 532 / 512, rel=1e-12)
    assert resolved('swinb_gradnorm', '--lr=1e-4').lr == 1e-4
    line = C.describe_recipe(cfg)
    assert (
        line.startswith('recipe swinb_gradnorm: objective=gradnorm ')
        and ' epochs=3* ' in line
        and ' clip=0.5 ' in line
    )


def test_accumulation_gives_the_same_gradient():
    """--accum=2 on a batch == one pass over it: each half's loss counts 1/2 (the penalty is a
    per-image mean, and the model has no BatchNorm)."""
    grads = []
    for accum in (1, 2):
        torch.manual_seed(0)
        cfg = C.parse_config(['--model=vit_demo', '--gradnorm_impl=exact', f'--accum={accum}'])
        model = M.build_model('vit_demo', 'gelu', in_ch=1, num_classes=10, img_size=28).double()
        run = types.SimpleNamespace(
            cfg=cfg,
            device=torch.device('cpu'),
            world=1,
            net=T.Step(model, T.objective(cfg, torch.device('cpu'))),
            opt=torch.optim.SGD(model.parameters(), 0.1),
        )
        torch.manual_seed(1)
        x, y = torch.rand(8, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (8,))
        loss, parts = T.micro_steps(run, x, y, 0.5)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------- the authors' released checkpoints


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
    ck, model = C.load_official(str(tmp_path / 'gradnorm_swinb.pth.tar'), SWINB)
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
        env=env,
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
    import evaluate

    torch.save({'state_dict': {}}, tmp_path / 'x.pth.tar')
    for argv, words in (
        ([f'--ckpt=official:{tmp_path}/x.pth.tar', '--data', str(tmp_path)], ['--model']),
        ([f'--ckpt=official:{tmp_path}/x.pth.tar', f'--model={SWINB}'], ['--data']),
        ([f'--ckpt=official:{tmp_path}/x.pth.tar', '--model=resnet50', '--data', str(tmp_path)], ['timm']),
        (
            [f'--ckpt=official:{tmp_path}/x.pth.tar', f'--model={SWINB}', '--data', str(tmp_path)],
            ['state_dict_ema'],
        ),
    ):
        assert C.cli(evaluate.main, argv) == 2
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
    assert first.startswith('recipe swinb_gradnorm: objective=gradnorm model=swin_base_patch4_window7_224 ')
    assert all(
        w in first for w in (' res=64* ', ' batch_size=4* ', ' accum=2 ', ' amp=False ', ' init=pretrained ')
    )
    ck = C.load_checkpoint(str(out / 'ckpt.pt'))
    assert ck['step'] == 1 and ck['ema'] is not None and ck['config']['recipe'] == 'swinb_gradnorm'
    r = make(
        'eval',
        f'CKPT={out / "ckpt.pt"}',
        'AA=0',
        'ARGS=--n 4 --attacks ce-1 --no-checks --weights=ema',
        env=env,
    )
    assert r.returncode == 0 and 'EMA weights' in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def test_hardsigmoid_gates_are_made_twice_differentiable():
    """aten's hardsigmoid backward has no derivative: MobileNetV3's squeeze-excite gates get
    relu6(x + 3) / 6 instead, the same function (outputs equal timm's own model's)."""
    import timm

    torch.manual_seed(0)
    ours = M.build_model('mobilenetv3_small_050', 'relu', num_classes=5).eval()  # relu: its own activation
    theirs = timm.create_model('mobilenetv3_small_050', num_classes=5).eval()
    theirs.load_state_dict(ours.model.state_dict())
    assert any(isinstance(m, nn.Hardsigmoid) for m in theirs.modules())
    assert not any(isinstance(m, nn.Hardsigmoid) for m in ours.modules())
    x, (mean, std) = torch.rand(2, 3, 64, 64), M.normalization(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs((x - mean) / std))
    G.gradnorm(ours, x, torch.tensor([0, 1]), 4 / 255, torch.tensor(1.0))[0].backward()
