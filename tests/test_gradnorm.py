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


# ---------------------------------------------------------------- what a copier of gradnorm.py can rely on


def demo_batch():
    torch.manual_seed(0)
    model = M.build_model('resnet_demo_pool', 'gelu', in_ch=1, num_classes=10, img_size=28).train()
    return model, torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))


def test_fd_refuses_autocast_and_exact_does_not():
    """bf16 rounds to ~4e-3, 40x the difference quotient's step: refused, with how to avoid it."""
    model, x, y = demo_batch()
    with torch.autocast('cpu', torch.bfloat16):
        with pytest.raises(ValueError, match='autocast is on: call it outside torch.autocast'):
            G.gradnorm_fd(model, x, y, 0.1, torch.tensor(1.0))
        G.gradnorm(model, x, y, 0.1, torch.tensor(1.0))[0].backward()  # double backprop takes bf16
    G.gradnorm_fd(model, x, y, 0.1, torch.tensor(1.0))[0].backward()


@pytest.fixture
def tf32_flags():
    """Sets the two TF32 flags, restored after the test (monkeypatch cannot: they are not attributes)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32

    def put(matmul, cudnn):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn

    yield put
    put(*old)


def test_fd_refuses_tf32_where_it_applies(tf32_flags):
    """The TF32 flags govern CUDA only. No GPU here: fd_check takes the device type, so the CUDA branch
    runs on flags set by hand; test_cuda_fd_refuses_tf32 below runs it on a real CUDA tensor."""
    model, x, y = demo_batch()
    for matmul, cudnn in ((True, False), (False, True), (True, True)):
        tf32_flags(matmul, cudnn)
        with pytest.raises(ValueError, match=r'TF32 is on: set torch\.backends\.cuda\.matmul\.allow_tf32'):
            G.fd_check('cuda')
        G.fd_check('cpu')
        G.gradnorm_fd(model, x, y, 0.1, torch.tensor(1.0))  # CPU tensors: the flags do not apply
    G.fd_float32('cuda')  # what train.py calls before an fd run: what the check asks for
    G.fd_check('cuda')


def test_fd_checks_compile_into_one_graph():
    """train.py compiles the objective with fullgraph=True: the checks must trace, and still refuse."""
    model, x, y = demo_batch()
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):  # as train.py sets it
        fn = torch.compile(G.gradnorm_fd, backend='eager', fullgraph=True)
        loss, _ = fn(model, x.clone().requires_grad_(), y, 0.1, torch.tensor(1.0))
        want, _ = G.gradnorm_fd(model, x.clone().requires_grad_(), y, 0.1, torch.tensor(1.0))
        torch.testing.assert_close(loss, want)
        with torch.autocast('cpu', torch.bfloat16), pytest.raises(Exception, match='autocast is on'):
            fn(model, x.clone().requires_grad_(), y, 0.1, torch.tensor(1.0))
    torch._dynamo.reset()


@pytest.mark.parametrize('fn', ['standard', 'gradnorm', 'gradnorm_fd'])
def test_terms_are_detached(fn):
    """The terms are for logging: a caller keeping them (a running sum) must not keep the graph."""
    model, x, y = demo_batch()
    args = () if fn == 'standard' else (0.1, torch.tensor(1.0))
    loss, terms = getattr(G, fn)(model, x.clone().requires_grad_(), y, *args)
    assert loss.requires_grad and terms
    assert all(not v.requires_grad and v.grad_fn is None for v in terms.values()), terms


@cuda
def test_cuda_fd_refuses_tf32(tf32_flags):
    model, x, y = demo_batch()
    model, x, y = model.cuda(), x.cuda(), y.cuda()
    tf32_flags(False, True)
    with pytest.raises(ValueError, match='TF32 is on'):
        G.gradnorm_fd(model, x, y, 0.1, torch.tensor(1.0, device='cuda'))
    tf32_flags(False, False)
    G.gradnorm_fd(model, x, y, 0.1, torch.tensor(1.0, device='cuda'))[0].backward()
