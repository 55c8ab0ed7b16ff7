"""Which GradNorm implementation runs where (gradnorm.choose_impl), and the measurement behind it:
the finite-difference parameter gradient in float32 (gradnorm_fd's default h) against double
backprop in float64 (tools.bench_grad.fd_error), on the paper's Swin-B and ResNet-50 (timm, random
weights, 32 px; ResNet-50 in eval mode, as the paper's runs) and the demo ResNet."""

import itertools

import pytest
import torch

import gradnorm as G
import models as M
from tools.bench_grad import calibrate_bn, fd_error

SMOOTH = ('gelu', 'silu')


CASES = list(itertools.product(('cpu', 'cuda'), (False, True), ('relu', 'gelu', 'silu')))


@pytest.mark.parametrize('device,amp,act', CASES)
def test_auto_picks_fd_only_in_float32_with_a_smooth_activation(device, amp, act):
    impl, why = G.choose_impl('auto', device, amp, act)
    assert impl == ('fd' if act in SMOOTH and not amp else 'exact')
    assert why.startswith(f'{impl}: ')
    if amp:
        assert 'bf16' in why
    elif act == 'relu':
        assert 'piecewise constant' in why
    else:
        assert 'double backprop' in why and ('TF32 off' in why) == (device == 'cuda')


@pytest.mark.parametrize('device', ['cpu', 'cuda'])
def test_explicit_requests(device):
    for amp, act in itertools.product((False, True), ('relu', 'gelu')):
        assert G.choose_impl('exact', device, amp, act)[0] == 'exact'
    with pytest.raises(ValueError, match='bf16'):
        G.choose_impl('fd', device, True, 'gelu')
    impl, why = G.choose_impl('fd', device, False, 'relu')
    assert impl == 'fd' and 'inaccurate' in why
    impl, why = G.choose_impl('fd', device, False, 'silu')
    assert impl == 'fd' and 'inaccurate' not in why
    with pytest.raises(ValueError, match='auto, exact or fd'):
        G.choose_impl('second_order', device, False, 'gelu')


def test_fd_turns_tf32_off_for_matmuls_and_cudnn_on_cuda_only():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        G.fd_float32('cpu')
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        G.fd_float32('cuda')
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize('act', ['gelu', 'silu', 'relu'])
def test_demo_resnet_fd_is_accurate_exactly_where_auto_picks_it(act):
    torch.manual_seed(0)
    model = M.build_model('resnet_demo_pool', act, in_ch=1, num_classes=10, img_size=28).train()
    x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    err = fd_error(model, x, y, 0.1)
    if G.choose_impl('auto', 'cpu', False, act)[0] == 'fd':
        assert err < 0.01, err
    else:
        assert err > 0.1, err


@pytest.mark.parametrize('name', ['swin_base_patch4_window7_224', 'timm/resnet50'])
def test_fd_is_within_1_percent_on_the_papers_models(name):
    torch.manual_seed(0)
    model = M.build_model(name, 'gelu', num_classes=10, img_size=32)
    model = calibrate_bn(model, 32) if 'resnet' in name else model.train()
    x, y = torch.rand(2, 3, 32, 32), torch.randint(0, 10, (2,))
    assert fd_error(model, x, y, 4 / 255) < 0.01


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')


@cuda
def test_cuda_fd_in_float32_without_tf32_is_within_1_percent():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        G.fd_float32('cuda')
        torch.manual_seed(0)
        model = M.build_model('resnet_demo_pool', 'gelu', in_ch=1, num_classes=10, img_size=28).cuda().train()
        x, y = torch.rand(32, 1, 28, 28, device='cuda'), torch.randint(0, 10, (32,), device='cuda')
        assert fd_error(model, x, y, 0.1) < 0.01
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
