"""models.Conv2d, the convolution whose double backward runs on the three standard kernels:
its derivatives against F.conv2d's (and finite differences), GradNorm on the ResNets against native
double backprop, torchvision weights, the weight gradients it skips, autocast and torch.compile."""

import itertools
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils._python_dispatch import TorchDispatchMode

import checkpoint as CK
import config as C
import evaluate
import gradnorm as G
import models as M
import train as T
from models import IMAGENET_MEAN, IMAGENET_STD
from tests.conftest import param_grad, rel
from tools import characterize

# kernel, stride, padding
SHAPES = list(itertools.product((1, 3, 7), (1, 2), (0, 1, 3)))
OPTIONS = list(itertools.product((1, 2), (False, True), (False, True)))  # groups, bias, channels_last
FEW_SHAPES = [(1, 1, 0), (1, 2, 0), (3, 1, 1), (3, 2, 1), (3, 2, 0), (7, 2, 3), (7, 1, 3)]  # every value once


# tiny convolutions: two threads on a busy 2-core machine spin ~10x slower than one
pytestmark = pytest.mark.usefixtures('one_thread')


def gradnorm_grad(model, fn, x, y):
    """The parameter gradient of one GradNorm step at eps 0.1, alpha 1."""
    return param_grad(model, fn, x, y, 0.1, torch.tensor(1.0, dtype=x.dtype))[1]


def inputs(k, groups, bias, channels_last, dtype=torch.float64, size=7):
    g = torch.Generator().manual_seed(k * 10 + groups)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 4, size, size, generator=g, dtype=dtype).contiguous(memory_format=fmt)
    w = torch.randn(4, 4 // groups, k, k, generator=g, dtype=dtype).contiguous(memory_format=fmt)
    b = torch.randn(4, generator=g, dtype=dtype) if bias else None
    return [t.requires_grad_() for t in (x, w, b) if t is not None]


def derivatives(conv, ts, kw, seed=0):
    """-> output, first derivatives, and the derivatives of a random function of those (the
    double backward, every term of it: the output-gradient, input and weight terms)."""
    y = conv(*ts, **kw)
    g = torch.Generator().manual_seed(seed)
    rand = lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device)
    gy = rand(y).requires_grad_()
    first = torch.autograd.grad(y, ts, gy, create_graph=True)
    r = sum((f * rand(f)).sum() for f in first)
    return [y, *first, *torch.autograd.grad(r, [*ts, gy], materialize_grads=True)]  # nothing depends on b


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('groups,bias,channels_last', OPTIONS)
def test_derivatives_equal_native_and_finite_differences(shape, groups, bias, channels_last):
    """Every derivative up to the second equals F.conv2d's; gradcheck and gradgradcheck against finite
    differences (fast_mode: a random projection of the Jacobian, so that the whole grid runs in seconds)."""
    k, stride, padding = shape
    ts = inputs(k, groups, bias, channels_last)
    kw = dict(stride=stride, padding=padding, groups=groups)
    got, want = derivatives(M.conv2d, ts, kw), derivatives(F.conv2d, ts, kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert got[0].is_contiguous(memory_format=torch.channels_last) == want[0].is_contiguous(
        memory_format=torch.channels_last
    )
    fast = lambda x, w, b=None: M.conv2d(x, w, b, stride, padding, 1, groups)
    assert torch.autograd.gradcheck(fast, ts, fast_mode=True)
    assert torch.autograd.gradgradcheck(fast, ts, fast_mode=True)


def test_dilation_and_module_options_equal_nn_conv2d():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 10, 10, dtype=torch.float64)
    for kw in (
        dict(dilation=2, padding=2),
        dict(padding=1, padding_mode='reflect'),
        dict(padding='same'),
        dict(padding=(0, 2), stride=(1, 2)),
    ):
        ours = M.Conv2d(4, 6, 3, **kw).double()
        native = nn.Conv2d(4, 6, 3, **kw).double()
        native.load_state_dict(ours.state_dict(), strict=True)
        ts = [x.clone().requires_grad_(), *ours.parameters()]
        tn = [ts[0], *native.parameters()]
        fn = lambda m: lambda x, *_: m(x)
        for a, b in zip(derivatives(fn(ours), ts, {}), derivatives(fn(native), tn, {})):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)




def twins(name, in_ch, dtype=torch.float64):
    torch.manual_seed(0)
    native = M.build_model(name, 'gelu', in_ch=in_ch, num_classes=10, conv='native').to(dtype).train()
    fast = M.build_model(name, 'gelu', in_ch=in_ch, num_classes=10, conv='fast').to(dtype).train()
    fast.load_state_dict(native.state_dict(), strict=True)
    assert (
        sum(isinstance(m, M.Conv2d) for m in fast.modules())
        == sum(isinstance(m, nn.Conv2d) for m in native.modules())
        > 0
    )
    return native, fast




@pytest.mark.parametrize(
    'name,in_ch,size',
    [('resnet_demo', 1, 28), ('resnet18_small', 3, 8), ('preact_resnet18', 3, 8), ('prn18', 3, 8)],
)  # 8 px: cheap
def test_gradnorm_parameter_gradient_equals_native_double_backprop(name, in_ch, size):
    native, fast = twins(name, in_ch)
    g = torch.Generator().manual_seed(0)
    x, y = (
        torch.rand(4, in_ch, size, size, generator=g, dtype=torch.float64),
        torch.randint(0, 10, (4,), generator=g),
    )
    want = gradnorm_grad(native, G.gradnorm, x, y)
    assert rel(gradnorm_grad(fast, G.gradnorm, x, y), want) < 1e-12
    for a, b in zip(native.buffers(), fast.buffers()):  # same BatchNorm running statistics
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)


@pytest.mark.parametrize(
    'name,params,norms', [('preact_resnet18', 11_172_170, 17), ('prn18', 11_171_146, 16)]
)
def test_preact_resnet18_size_shape_and_input_gradient(name, params, norms):
    """fast_adversarial's PreActResNet18 has 11,172,170 parameters for 10 classes; the authors' prn18 lacks
    only the final BatchNorm (2 x 512). Logits for 32 px images; fast and native convolutions give the
    same input gradient."""
    fast = M.build_model(name, 'gelu', num_classes=10, mean=CIFAR_MEAN, std=CIFAR_STD, conv='fast').eval()
    native = M.build_model(name, 'gelu', num_classes=10, mean=CIFAR_MEAN, std=CIFAR_STD).eval()
    native.load_state_dict(fast.state_dict(), strict=True)
    assert sum(p.numel() for p in fast.parameters()) == params
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fast.modules()) == norms
    assert sum(isinstance(m, M.Conv2d) for m in fast.modules()) == 20  # stem, 16 in blocks, 3 shortcuts
    keys = set(fast.state_dict())  # fast_adversarial's (and the authors') names: their weights load
    assert {'conv1.weight', 'layer2.0.shortcut.0.weight', 'layer4.1.conv2.weight', 'linear.bias'} <= keys
    assert 'layer1.0.shortcut.0.weight' not in keys and ('bn.weight' in keys) == (norms == 17)
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([3, 7])
    grads = []
    for model in (fast, native):
        xi = x.clone().requires_grad_()
        out = model(xi)
        assert out.shape == (2, 10)
        grads.append(torch.autograd.grad(F.cross_entropy(out, y), xi)[0])
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_preact_resnet18_activation_by_name_and_swapped():
    """--act builds it with that activation; set_activation swaps all 9 (8 blocks and the final one) in a
    built model, which then computes what a model built with the new one computes."""
    torch.manual_seed(0)
    relu = M.build_model('preact_resnet18', 'relu', num_classes=10).double().eval()
    silu = M.build_model('preact_resnet18', 'silu', num_classes=10).double().eval()
    silu.load_state_dict(relu.state_dict(), strict=True)
    assert sum(isinstance(m, nn.ReLU) for m in relu.modules()) == 9
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        before = relu(x)
        M.set_activation(relu, 'silu')
        assert not any(isinstance(m, nn.ReLU) for m in relu.modules())
        assert sum(isinstance(m, nn.SiLU) for m in relu.modules()) == 9
        assert torch.equal(relu(x), silu(x)) and not torch.allclose(before, silu(x))


def test_resnet50_loads_torchvision_weights_strictly_with_identical_logits():
    tv = pytest.importorskip('torchvision').models.resnet50().eval()
    ours = M.build_model('resnet50', 'relu', conv='fast').eval()
    ours.load_state_dict(tv.state_dict(), strict=True)
    assert set(ours.state_dict()) == set(tv.state_dict())
    x = torch.rand(2, 3, 64, 64)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.equal(ours(x), tv((x - mean) / std))


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_input_gradient_pass_skips_weight_gradients_and_weight_users_still_get_them():
    native, fast = twins('resnet_demo', 1)
    x, y = torch.rand(4, 1, 28, 28, dtype=torch.float64, requires_grad=True), torch.tensor([0, 1, 2, 3])
    ce = lambda m: F.cross_entropy(m(x), y)
    with OpCounter() as ops:
        torch.autograd.grad(ce(fast), x, create_graph=True)
    convs = sum(isinstance(m, M.Conv2d) for m in fast.modules())
    assert ops.calls['gradnorm.conv2d_input'] == convs and 'gradnorm.conv2d_weight' not in ops.calls, (
        ops.calls
    )
    with OpCounter() as ops:
        ce(fast).backward(inputs=[x])
    assert 'gradnorm.conv2d_weight' not in ops.calls
    # weights asked for, with create_graph: gradients and their own derivatives as native ones
    for params in (lambda m: list(m.parameters()), lambda m: [m.conv1.weight, x]):
        grads = []
        for m in (native, fast):
            m.zero_grad(set_to_none=True)
            x.grad = None
            g = torch.autograd.grad(ce(m), params(m), create_graph=True)
            sum(t.square().sum() for t in g).backward()
            grads.append(
                torch.cat(
                    [*(t.flatten() for t in g), x.grad.flatten(), *(p.grad.flatten() for p in m.parameters())]
                )
            )
        assert rel(grads[1], grads[0]) < 1e-12


def test_bf16_autocast_casts_as_f_conv2d_does():
    native, fast = twins('resnet_demo', 1, torch.float32)
    x, y = torch.rand(4, 1, 28, 28), torch.arange(4)
    ref = gradnorm_grad(native, G.gradnorm, x, y)
    with torch.autocast('cpu', torch.bfloat16):
        conv = fast.conv1
        out = conv(x)
        assert out.dtype == F.conv2d(x, conv.weight, None, conv.stride, conv.padding).dtype == torch.bfloat16
        assert M.conv2d(x.double(), conv.weight.double()).dtype == torch.float64  # autocast leaves float64
        errors = [rel(gradnorm_grad(m, G.gradnorm, x, y), ref) for m in (native, fast)]
    assert all(p.grad.dtype == torch.float32 for p in fast.parameters())
    assert errors[1] < 0.1 and errors[1] < 2 * errors[0] + 1e-2, errors


def test_timm_resnet_with_fast_conv_equals_native():
    """timm's models get the fast conv by class swap (use_conv): same parameters, same GradNorm gradient."""
    pytest.importorskip('timm')
    native, fast = (
        M.build_model('timm/resnet18', 'gelu', num_classes=10, conv=c) for c in ('native', 'fast')
    )
    fast.load_state_dict(native.state_dict(), strict=True)
    native, fast = native.double().train(), fast.double().train()
    assert (
        sum(type(m) is M.Conv2d for m in fast.modules())
        == sum(type(m) is nn.Conv2d for m in native.modules())
        > 0
    )
    x, y = torch.rand(2, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1])
    assert rel(gradnorm_grad(fast, G.gradnorm, x, y), gradnorm_grad(native, G.gradnorm, x, y)) < 1e-12


def test_conv_auto_is_fast_for_double_backward_only():
    cpu = torch.device('cpu')
    kind = lambda **kw: T.plan(C.Config(**kw), cpu).conv
    assert (
        kind(gradnorm_impl='exact') == kind(objective='edge') == kind(conv='fast', objective='pgd') == 'fast'
    )
    assert kind(gradnorm_impl='fd') == kind(objective='pgd') == kind(objective='standard') == 'native'
    assert kind(conv='native', gradnorm_impl='exact') == 'native'


def test_trained_with_fast_conv_then_evaluated_and_characterized(tiny_data, tmp_path, capsys):
    out = tmp_path / 'run'
    T.main(
        [
            f'--data={tiny_data}',
            f'--out={out}',
            '--epochs=1',
            '--batch_size=128',
            '--eval_n=32',
            '--eval_steps=1',
            '--loader=torchvision',
            '--gradnorm_impl=exact',
        ]
    )
    assert 'conv=fast' in capsys.readouterr().out
    ck = CK.load_checkpoint(str(out / 'ckpt.pt'))
    model = evaluate.model_from_checkpoint(ck).eval()  # nn.Conv2d: evaluation differentiates once
    fast = M.build_model(ck['config']['model'], 'gelu', conv='fast', **ck['data_info']).eval()
    fast.load_state_dict(ck['model'], strict=True)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-6)
    evaluate.main(
        [
            '--ckpt',
            str(out / 'ckpt.pt'),
            '--n',
            '32',
            '--attacks',
            'ce-2',
            '--no-autoattack',
            '--no-checks',
            '--json',
            str(tmp_path / 'eval.json'),
        ]
    )
    result = json.load(open(tmp_path / 'eval.json'))
    assert result['n'] == 32 and 0 <= result['robust'][f'{ck["config"]["eps"]:g}']['worst'] <= result['clean']
    characterize.main(
        [str(out / 'ckpt.pt'), '--n', '32', '--rows', '2', '--steps', '2', '--out', str(tmp_path / 'char')]
    )
    assert json.load(open(tmp_path / 'char' / 'characterize.json'))[0]['n'] == 32


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
# Dynamo alone; + AOT autograd, decompositions, partitioner; + Inductor (its C++ build: minutes on a CPU)
BACKENDS = [pytest.param(b, 'cpu', id=b) for b in ('eager', 'aot_eager_decomp_partition')] + [
    pytest.param('inductor', 'cuda', id='inductor-cuda', marks=cuda)
]


@pytest.mark.parametrize('backend,device', BACKENDS)
def test_compiled_gradnorm_with_fast_conv_is_one_graph_and_matches_eager(backend, device, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = (
        M.ResNet(
            M.BasicBlock, [1, 1], (8, 16), act='gelu', in_ch=3, num_classes=10, small_stem=True, conv='fast'
        )
        .to(device)
        .train()
    )
    assert any(isinstance(m, M.Conv2d) for m in model.modules())
    g = torch.Generator().manual_seed(1)
    x, y = (
        torch.rand(8, 3, 16, 16, generator=g).to(device),
        torch.randint(0, 10, (8,), generator=g).to(device),
    )
    counter = CompileCounterWithBackend(backend)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(G.gradnorm, backend=counter, fullgraph=True)
        want = gradnorm_grad(model, G.gradnorm, x, y)
        for _ in range(2):
            assert rel(gradnorm_grad(model, compiled, x, y), want) < 1e-4
    assert counter.frame_count == 1
    torch._dynamo.reset()


@cuda
@pytest.mark.parametrize('channels_last', [False, True], ids=['contiguous', 'channels_last'])
def test_cuda_derivatives_equal_native(channels_last):
    """float64 (no TF32, no bf16): the fast conv on cuDNN's standard kernels gives native's numbers."""
    for (k, stride, padding), groups in itertools.product(FEW_SHAPES, (1, 2)):
        ts = [t.detach().cuda().requires_grad_() for t in inputs(k, groups, True, channels_last)]
        kw = dict(stride=stride, padding=padding, groups=groups)
        for a, b in zip(derivatives(M.conv2d, ts, kw), derivatives(F.conv2d, ts, kw)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=cuda)])
def test_bf16_autocast_gradnorm_as_accurate_as_native(device, monkeypatch):
    """bf16 autocast moves GradNorm's parameter gradient ~17% from float32 (relative L2; measured on
    the CPU and on an H100 alike), and the fast conv by no more than native does."""
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    native, fast = (m.to(device) for m in twins('resnet18_small', 3, torch.float32))
    g = torch.Generator().manual_seed(0)
    x, y = (
        torch.rand(16, 3, 32, 32, generator=g).to(device),
        torch.randint(0, 10, (16,), generator=g).to(device),
    )
    ref = gradnorm_grad(native, G.gradnorm, x, y)
    assert rel(gradnorm_grad(fast, G.gradnorm, x, y), ref) < 1e-4  # float32, different kernels
    with torch.autocast(device, torch.bfloat16):
        assert fast.conv1(x).dtype == torch.bfloat16
        errors = [rel(gradnorm_grad(m, G.gradnorm, x, y), ref) for m in (native, fast)]
    assert 0 < errors[0] < 0.5 and errors[1] < 1.05 * errors[0] + 1e-3, errors
