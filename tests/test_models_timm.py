"""timm's models as the paper runs them: Swin-B, ResNet-50 and a ViT (forward, double backward,
activation swap), their pretrained weights offline (from a Hugging Face cache written here: no
network), and squeeze-excite gates made twice differentiable."""
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gradnorm as G
import models as M
from edge_reg import edge_reg
from tests.conftest import HERE, SWINB, fake_hub, offline_env

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


def edge_term(model, x, y, norm):
    """EdgeReg's MSE term with its graph (the terms it returns are detached): the loss at alpha 1
    less the loss at alpha 0, the same class sampled."""
    torch.manual_seed(0)
    with_term = edge_reg(model, x, y, torch.tensor(1.0), norm=norm)[0]
    torch.manual_seed(0)
    return with_term - edge_reg(model, x, y, torch.tensor(0.0), norm=norm)[0]


@pytest.mark.parametrize('name', list(TIMM_CASES))
def test_timm_model_double_backward(name, timm_models):
    """GradNorm's penalty and EdgeReg's gradient match reach the weights: both differentiate the
    input gradient again (attention through the math path)."""
    model = timm_models[name].train()
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([0, 3])
    mean, std = M.normalization(model)
    for term, run in (
        ('gradnorm', lambda: G.gradnorm(model, x, y, 4 / 255, torch.tensor(1.0), weights=(0.0, 1.0))[0]),
        ('edge_mse', lambda: edge_term(model, x, y, (mean, std))),
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
