"""The paper's runs as recipes: every value against the authors' configs, overrides, the lr
scaling, and accumulation giving the batch's gradient."""
import math
import types

import pytest
import torch

import config as C
import models as M
import train as T
from tests.conftest import SWINB


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
CIFAR_COMMON = dict(  # configs_cifar/*_prn18_gelu.yaml, on 2 GPUs: 128 x 2 images, lr 1.25e-3 x 256 / 512
    model='prn18',
    act='gelu',
    batch_size=256,
    lr=1.25e-3 / 2,
    weight_decay=0.05,
    warmup_epochs=5.0,
    min_lr=1e-5,
    smoothing=0.1,
    mixup=0.8,
    cutmix=1.0,
    randaug='rand-m9-mstd0.5-inc1',
    reprob=0.25,
    pad=4,
    amp=False,
    bn_eval=True,
    eps=8 / 255,
    accum=1,
)
CIFAR_STAGE2 = dict(CIFAR_COMMON, epochs=300, ema=0.9998, init='runs/cifar/prn18-standard-gelu/ckpt.pt')
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
    'cifar_standard': dict(CIFAR_COMMON, objective='standard', init='', epochs=51, clip=math.inf, ema=0.0),
    # their 1.2 x (4/255) ||g||_1 written at 8/255: the penalty weight halves
    'cifar_gradnorm': dict(
        CIFAR_STAGE2, objective='gradnorm', clip=1.0, ramp_epochs=5.0, gn_weights='0.8,0.6'
    ),
    'cifar_pgd': dict(CIFAR_STAGE2, objective='pgd', pgd_steps=3, clip=math.inf),
    'cifar_fgsm': dict(CIFAR_STAGE2, objective='fgsm', clip=math.inf),
}


def test_every_recipe_resolves_to_the_papers_values(tmp_path, monkeypatch):
    assert set(EXPECTED) == set(C.RECIPES)
    for act in ('gelu', 'relu', 'silu'):  # stage 2 starts from stage 1's default output folder
        stage1 = tmp_path / 'runs' / 'imnet' / f'timm-resnet50-standard-{act}'
        stage1.mkdir(parents=True)
        (stage1 / 'ckpt.pt').write_bytes(b'x')
    (tmp_path / 'runs' / 'cifar' / 'prn18-standard-gelu').mkdir(parents=True)
    (tmp_path / 'runs' / 'cifar' / 'prn18-standard-gelu' / 'ckpt.pt').write_bytes(b'x')
    (tmp_path / 'imnet').mkdir()
    (tmp_path / 'cifar').mkdir()
    monkeypatch.chdir(tmp_path)
    for name, want in EXPECTED.items():
        cfg = resolved(name, '--data=' + ('cifar' if name.startswith('cifar') else 'imnet'))
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


def test_cifar_lr_follows_the_batch_and_the_penalty_is_theirs():
    """lr = 1.25e-3 x batch / 512 (their 1-GPU run: 128 images, 3.125e-4); GradNorm's weight x eps is
    their DBP's 1.2 x 4/255."""
    cfg = resolved('cifar_standard', '--batch_size=128')
    assert cfg.lr == pytest.approx(1.25e-3 * 128 / 512, rel=1e-12) and cfg.min_lr == 1e-5
    assert ' batch_size=128* ' in C.describe_recipe(cfg) and ' epochs=51 ' in C.describe_recipe(cfg)
    gradnorm = C.RECIPES['cifar_gradnorm']
    assert float(gradnorm['gn_weights'].split(',')[1]) * gradnorm['eps'] == pytest.approx(1.2 * 4 / 255)


@pytest.mark.parametrize(
    'act,first', [('gelu', '--recipe=cifar_standard '), ('relu', '--recipe=cifar_standard --act=relu ')]
)
def test_cifar_stage2_without_the_standard_run_names_it(act, first, tmp_path, monkeypatch, capsys):
    (tmp_path / 'cifar').mkdir()
    monkeypatch.chdir(tmp_path)
    for name in ('cifar_gradnorm', 'cifar_pgd', 'cifar_fgsm'):
        assert C.cli(C.parse_config, [f'--recipe={name}', '--data=cifar', f'--act={act}']) == 2
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and err.startswith('error: ') and f'run {first}first' in err, err
        assert f'runs/cifar/prn18-standard-{act}/ckpt.pt' in err


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
            plan=T.plan(cfg, torch.device('cpu')),
            world=1,
            net=T.Step(model, T.objective(cfg, torch.device('cpu'))),
            opt=torch.optim.SGD(model.parameters(), 0.1),
        )
        torch.manual_seed(1)
        x, y = torch.rand(8, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (8,))
        loss, parts = T.micro_steps(run, x, y, 0.5)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-14)
