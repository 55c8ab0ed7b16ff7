"""Compiled GradNorm/EdgeReg == the eager double-backprop reference; finite-difference GradNorm ~= exact.

Compiling uses the aot_eager_decomp_partition backend: Dynamo capture, AOT autograd, decompositions
and the forward/backward partition, i.e. everything torch.compile does except Inductor's C++/Triton
code generation, which costs minutes on a CPU. `make bench` runs the Inductor path.
"""

import functools
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch._dynamo.testing import CompileCounterWithBackend

import config as C
import gradnorm as G
import models as M
import train as T
from edge_reg import edge_reg
from tests.conftest import param_grad, rel

BACKEND = 'aot_eager_decomp_partition'
# EdgeReg in pixel space: the tiny models normalize nothing
OBJECTIVES = {'gradnorm': functools.partial(G.gradnorm, eps=0.1),
              'edge': functools.partial(edge_reg, norm=None)}


def tiny(name, act='gelu', conv='native'):
    torch.manual_seed(0)
    if name == 'resnet':  # BatchNorm, in train mode throughout
        return M.ResNet(
            M.BasicBlock, [1, 1], (8, 16), act=act, in_ch=3, num_classes=10, small_stem=True, conv=conv
        ).train()
    return M.ViT(img_size=16, patch=4, dim=24, depth=2, heads=2, act=act, num_classes=10, conv=conv).train()


def batch(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)



@pytest.fixture(autouse=True)
def dynamo():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize('arch', ['resnet', 'vit'])
@pytest.mark.parametrize('objective', ['gradnorm', 'edge'])
def test_compiled_step_matches_eager_and_alpha_does_not_recompile(arch, objective):
    model, (x, y) = tiny(arch), batch()
    fn = OBJECTIVES[objective]
    counter = CompileCounterWithBackend(BACKEND)
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    grads = []
    for alpha in (0.3, 0.7):
        loss, ref = param_grad(model, fn, x, y, alpha=torch.tensor(alpha))
        loss_c, got = param_grad(model, compiled, x, y, alpha=torch.tensor(alpha))
        assert rel(got, ref) < 1e-4 and abs(loss_c - loss) < 1e-5 * abs(loss), (alpha, rel(got, ref))
        grads.append(got)
    assert rel(grads[0], grads[1]) > 1e-3  # alpha reached the compiled graph as a live input
    assert counter.frame_count == 1, f'{counter.frame_count} compilations: alpha recompiled'


def test_objective_compiled_as_in_training_does_not_recompile_as_alpha_ramps(monkeypatch):
    counter = CompileCounterWithBackend(BACKEND)
    monkeypatch.setattr(torch, 'compile', functools.partial(torch.compile, backend=counter))
    cfg = C.Config(objective='gradnorm', gradnorm_impl='exact', ramp_epochs=2.0)
    fn, ref = T.objective(cfg, torch.device('cpu'), compiled=True), T.objective(cfg, torch.device('cpu'))
    model, (x, y) = tiny('resnet'), batch()
    for t in (0.25, 0.5, 1.75, 3.0):  # alpha 0.125 .. 1
        assert rel(param_grad(model, fn, x, y, t)[1], param_grad(model, ref, x, y, t)[1]) < 1e-4
    assert counter.frame_count == 1


@pytest.mark.parametrize('arch', ['resnet', 'vit'])
def test_fd_gradnorm_converges_to_exact_gradient_as_h_shrinks(arch):
    """Forward-difference error is O(h): ~7*h relative on the demo ResNet (float32 rounding ~1e-7/h
    only matters below h~1e-4). Here: < 3% at the default h=1e-3, and 10x h gives ~10x the error."""
    model, (x, y) = tiny(arch), batch(32)
    alpha = torch.tensor(1.0)
    loss, exact = param_grad(model, G.gradnorm, x, y, 0.1, alpha)
    err = {}
    for h in (1e-2, 1e-3):
        loss_fd, fd = param_grad(model, G.gradnorm_fd, x, y, 0.1, alpha, h=h)
        assert abs(loss_fd - loss) < 1e-5 * loss  # the value returned is the true GradNorm loss
        err[h] = rel(fd, exact)
    assert err[1e-3] < 0.03, err
    assert 5 < err[1e-2] / err[1e-3] < 20, err


def test_fd_gradnorm_chosen_by_config():
    cfg = C.Config(objective='gradnorm', gradnorm_impl='fd', fd_h=1e-3)
    model, (x, y) = tiny('resnet'), batch()
    got = param_grad(model, T.objective(cfg, torch.device('cpu')), x, y, 5.0)[1]  # t past the ramp: alpha 1
    want = param_grad(model, G.gradnorm_fd, x, y, 0.1, torch.tensor(1.0), h=1e-3)[1]
    assert rel(got, want) < 1e-6
    assert T.plan(C.Config(gradnorm_impl='auto', act='relu'), torch.device('cpu')).impl == 'exact'


IMPLS = 'fd', 'exact compiled'


def _ddp_rank(rank, init_file, x, y, out):
    """FD, then the compiled exact objective, each on its own model and DDP wrapper (one spawn for both:
    a rank's start costs seconds)."""
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    torch.set_num_threads(1)  # as the parent's reference: FD divides any change of rounding order by h
    grads = {}
    for impl in IMPLS:
        cfg = C.Config(objective='gradnorm', gradnorm_impl=impl.split()[0], ramp_epochs=1.0)
        compiled = impl != 'fd'
        model = tiny('resnet', conv=T.plan(cfg, torch.device('cpu')).conv)  # exact: the fast conv, as train()
        with torch._dynamo.config.patch(trace_autograd_ops=True, optimize_ddp=False):
            if compiled:  # as train() does it, with the test backend
                torch.compile = functools.partial(torch.compile, backend=BACKEND)
            net = nn.parallel.DistributedDataParallel(
                T.Step(model, T.objective(cfg, torch.device('cpu'), compiled))
            )
            shard = slice(rank * 8, (rank + 1) * 8)
            loss, _ = net(x[shard].clone().requires_grad_(), y[shard], 5.0)
            loss.backward()
        grads[impl] = torch.cat([p.grad.flatten() for p in model.parameters()])
        del net
    if rank == 0:
        torch.save(grads, out)
    dist.destroy_process_group()


def test_training_step_under_ddp_averages_the_ranks_gradients(one_thread):
    """The step as train() runs it under torchrun: DDP wraps model + objective (T.Step); FD makes two
    forwards and one backward, the compiled exact objective runs its double backward inside Dynamo
    (which cannot trace DDP's own forward). The synced gradient is the mean of each shard's."""
    x, y = batch(16)
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, 'grad.pt')
        mp.spawn(_ddp_rank, args=(os.path.join(d, 'init'), x, y, out), nprocs=2)
        got = torch.load(out)
    for impl in IMPLS:
        model = tiny('resnet')
        fn = G.gradnorm_fd if impl == 'fd' else G.gradnorm
        shards = slice(0, 8), slice(8, 16)
        want = sum(param_grad(model, fn, x[s], y[s], 0.1, torch.tensor(1.0))[1] for s in shards) / 2
        assert rel(got[impl], want) < 1e-5, impl


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


@cuda
@pytest.mark.parametrize('arch', ['resnet', 'vit'])
@pytest.mark.parametrize('objective', ['gradnorm', 'edge'])
def test_cuda_inductor_step_matches_eager_in_float32_and_bf16(arch, objective):
    """The training configuration on a GPU: Inductor, training's memory format; float32 must match to
    1e-4, and bf16 autocast must be no less accurate compiled than eager (both against float32 eager)."""
    # assigned and restored by hand: monkeypatch's undo of these backend flags raises AttributeError
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        inductor_matches_eager(arch, objective)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def inductor_matches_eager(arch, objective):
    cfg, cuda = C.Config(objective=objective), torch.device('cuda')
    fmt = T.plan(cfg, cuda).fmt
    model = tiny(arch, conv=T.plan(cfg, cuda).conv).cuda().to(memory_format=fmt)  # the fast conv, as training
    x, y = (t.cuda() for t in batch(32))
    x = x.contiguous(memory_format=fmt)
    fn = OBJECTIVES[objective]
    compiled = torch.compile(fn, fullgraph=True)
    alpha = torch.tensor(1.0, device='cuda')
    ref = param_grad(model, fn, x, y, alpha=alpha)[1]
    assert rel(param_grad(model, compiled, x, y, alpha=alpha)[1], ref) < 1e-4
    with torch.autocast('cuda', torch.bfloat16):
        eager_bf16 = rel(param_grad(model, fn, x, y, alpha=alpha)[1], ref)
        compiled_bf16 = rel(param_grad(model, compiled, x, y, alpha=alpha)[1], ref)
    assert eager_bf16 < 0.1 and compiled_bf16 < 2 * eager_bf16 + 1e-2, (eager_bf16, compiled_bf16)


@cuda
def test_cuda_training_picks_exact_and_refuses_fd():
    dev = torch.device('cuda')
    assert T.plan(C.Config(objective='gradnorm'), dev).impl == 'exact'
    with pytest.raises(C.UserError):
        T.plan(C.Config(objective='gradnorm', gradnorm_impl='fd'), dev)
