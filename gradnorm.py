"""Robustness from natural input gradients (Rodriguez-Munoz, Wang, Torralba, ECCV 2024).

Read top to bottom: models -> objectives -> data -> training loop.
    python gradnorm.py --objective=gradnorm --act=gelu          # one process
    torchrun --nproc_per_node=8 gradnorm.py --objective=gradnorm  # DDP, same code path
Every model eats images in [0,1]; normalization is a buffer inside the model, so input
gradients and attacks live in pixel space.
"""
import dataclasses
import gzip
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attack import UserError, pgd, robust_accuracy
from edge_reg import edge_reg

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FASHION_MEAN, FASHION_STD = (0.286,), (0.353,)


@dataclasses.dataclass
class Config:
    objective: str = 'gradnorm'   # standard | gradnorm | pgd | edge
    gradnorm_impl: str = 'exact'  # exact (double backprop) | fd (finite differences, no 2nd derivative)
    model: str = 'resnet_demo'
    act: str = 'gelu'             # relu | gelu | silu: GradNorm needs a smooth one
    data: str = '/usr/share/datasets/fashion-mnist'
    epochs: int = 6
    batch_size: int = 128         # global, split over ranks
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr: float = 1e-5
    smoothing: float = 0.1        # label smoothing
    clip: float = 1.0             # gradient-norm clipping
    eps: float = 0.1              # L-inf budget in pixel units: GradNorm's eps and the eval's
    ramp_epochs: float = 2.0      # GradNorm alpha: 0 -> 1 over these epochs (paper: 5)
    edge_alpha: str = '1,0.09,19' # EdgeReg alpha = min(a + b*epoch, c)
    pgd_steps: int = 3            # adversarial-training baseline: PGD-k, step 2*eps/k
    ema: float = 0.0              # EMA decay of the weights, 0 = off
    eval_n: int = 1000            # fixed validation subset for PGD accuracy
    eval_steps: int = 20          # PGD steps for the per-epoch robust accuracy
    compile: str = 'auto'         # auto (= on CUDA only) | on | off
    out: str = 'runs/demo'
    resume: str = ''              # checkpoint path to continue from
    seed: int = 0
    loader: str = 'ffcv'          # ffcv | torchvision (fallback for ImageFolder data)
    res: int = 224                # ImageNet training/eval resolution
    workers: int = 8
    init: str = ''                # '' | torchvision: start from torchvision's pretrained weights


def parse_config(argv):
    cfg, fields = Config(), {f.name: f for f in dataclasses.fields(Config)}
    for arg in argv:
        key, _, val = arg.lstrip('-').partition('=')
        key = key.replace('-', '_')
        if key not in fields:
            raise UserError(f'unknown option --{key}; known: ' + ' '.join(fields))
        try:
            setattr(cfg, key, type(getattr(cfg, key))(val))
        except ValueError:
            raise UserError(f'--{key}={val}: expected a {type(getattr(cfg, key)).__name__}')
    return cfg


# ---------------------------------------------------------------- models

ACTS = {'relu': nn.ReLU, 'gelu': nn.GELU, 'silu': nn.SiLU}  # nn.GELU is the exact (erf) GELU


def make_act(name):
    if name not in ACTS:
        raise UserError(f'unknown activation {name!r}; choose one of {", ".join(ACTS)}')
    return ACTS[name]()


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        # not persistent: torchvision state_dicts (which lack them) still load with strict=True
        self.register_buffer('mean', torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return (x - self.mean) / self.std


def conv_bn(cin, cout, k, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, width, stride, act):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.act = make_act(act)
        self.downsample = conv_bn(cin, width, 1, stride) if stride != 1 or cin != width else None

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride, act):
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)  # stride here: torchvision's v1.5
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.act = make_act(act)
        self.downsample = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """torchvision's parameter names and shapes, so its pretrained weights load strictly."""

    def __init__(self, block, layers, widths=(64, 128, 256, 512), act='relu', in_ch=3,
                 num_classes=1000, small_stem=False, stem_stride=1, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.normalize = Normalize(mean, std)
        # small inputs (28-32 px): a 3x3 stem and no max-pool instead of ImageNet's 4x downsampling
        self.conv1 = nn.Conv2d(in_ch, widths[0], 3 if small_stem else 7, stem_stride if small_stem else 2,
                               1 if small_stem else 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act = make_act(act)
        self.maxpool = nn.Identity() if small_stem else nn.MaxPool2d(3, 2, 1)
        cin = widths[0]
        for i, (n, w) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, w, 2 if i > 0 and j == 0 else 1, act))
                cin = w * block.expansion
            setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
        self.stages = len(layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.act(self.bn1(self.conv1(self.normalize(x)))))
        for i in range(self.stages):
            x = getattr(self, f'layer{i + 1}')(x)
        return self.fc(x.mean((2, 3)))


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        # Fused kernels have no double backward; objectives that need one run this under
        # sdpa_kernel(SDPBackend.MATH), which is plain differentiable matmuls and softmax.
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim, heads, act):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), make_act(act), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, img_size=224, patch=16, dim=192, depth=12, heads=3, act='gelu', in_ch=3,
                 num_classes=1000, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.patch_embed = nn.Conv2d(in_ch, dim, patch, patch)
        self.pos_embed = nn.Parameter(torch.randn(1, (img_size // patch) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, act) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(self.normalize(x)).flatten(2).transpose(1, 2) + self.pos_embed
        return self.head(self.norm(self.blocks(x)).mean(1))  # mean-pooled tokens, no class token


MODELS = {
    'resnet18': lambda **kw: ResNet(BasicBlock, [2, 2, 2, 2], **kw),
    'resnet50': lambda **kw: ResNet(Bottleneck, [3, 4, 6, 3], **kw),
    'resnet18_small': lambda **kw: ResNet(BasicBlock, [2, 2, 2, 2], small_stem=True, **kw),
    # the CPU demo: 28 px -> 14 -> 7 -> 4, ~20x cheaper than resnet18_small
    'resnet_demo': lambda **kw: ResNet(BasicBlock, [1, 1, 1], (16, 32, 64), small_stem=True, stem_stride=2, **kw),
    'vit_tiny': lambda **kw: ViT(patch=16, dim=192, depth=12, heads=3, **kw),
    'vit_small': lambda **kw: ViT(patch=16, dim=384, depth=12, heads=6, **kw),
    'vit_demo': lambda **kw: ViT(patch=4, dim=96, depth=4, heads=3, **kw),
}


def build_model(name, act='gelu', in_ch=3, num_classes=1000, img_size=224, mean=None, std=None):
    if name not in MODELS:
        raise UserError(f'unknown model {name!r}; choose one of {", ".join(MODELS)}')
    kw = dict(act=act, in_ch=in_ch, num_classes=num_classes)
    kw.update(mean=mean or IMAGENET_MEAN[:in_ch], std=std or IMAGENET_STD[:in_ch])
    if name.startswith('vit'):
        kw['img_size'] = img_size
    return MODELS[name](**kw)


def set_activation(model, act):
    """Swap every activation in place, e.g. ReLU -> GELU after loading torchvision weights."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, tuple(ACTS.values())):
                setattr(module, name, make_act(act))
    return model


# ---------------------------------------------------------------- objectives
# Each is (model, x, y, ...) -> (loss, {term: value}); x holds images in [0,1].

def standard(model, x, y, smoothing=0.1):
    ce = F.cross_entropy(model(x), y, label_smoothing=smoothing)
    return ce, {'ce': ce}


def gradnorm(model, x, y, eps, alpha, smoothing=0.1):
    """0.8*CE + 1.2*alpha*eps*mean_i ||grad_x CE_i||_1, the first-order cost of an L-inf attack.

    The penalty is differentiated again (double backprop). CE is a batch mean, so B*grad gives
    each sample's own gradient; with BatchNorm in train mode samples are coupled and this is the
    batch-mean gradient scaled by B, exactly as the paper computes it.
    """
    if not x.requires_grad:  # under torch.compile, make x a leaf before the call instead
        x = x.detach().requires_grad_()
    with sdpa_kernel(SDPBackend.MATH):
        ce = F.cross_entropy(model(x), y, label_smoothing=smoothing)
    (g,) = torch.autograd.grad(ce * x.shape[0], x, create_graph=True)
    penalty = eps * g.abs().flatten(1).sum(1).mean()
    return 0.8 * ce + 1.2 * alpha * penalty, {'ce': ce, 'gradnorm': penalty}


def pgd_at(model, x, y, eps, steps=3, smoothing=0.1):
    """Adversarial-training baseline: CE on PGD-k examples (random start, step 2*eps/k)."""
    x_adv = pgd(model, x, y, eps, steps, 2 * eps / steps)
    ce = F.cross_entropy(model(x_adv), y, label_smoothing=smoothing)
    return ce, {'ce_adv': ce}


def objective(cfg, device):
    """-> fn(model, x, y, t) for the configured objective; t = epochs elapsed (float).
    Alphas go in as tensors, so a compiled step is not recompiled when they change."""
    a, b, c = map(float, cfg.edge_alpha.split(','))
    scalar = lambda v: torch.tensor(float(v), device=device)
    return {
        'standard': lambda m, x, y, t: standard(m, x, y, cfg.smoothing),
        'gradnorm': lambda m, x, y, t: gradnorm(
            m, x, y, cfg.eps, scalar(min(t / max(cfg.ramp_epochs, 1e-9), 1.0)), cfg.smoothing),
        'pgd': lambda m, x, y, t: pgd_at(m, x, y, cfg.eps, cfg.pgd_steps, cfg.smoothing),
        'edge': lambda m, x, y, t: edge_reg(m, x, y, scalar(min(a + b * int(t), c)), smoothing=cfg.smoothing),
    }[cfg.objective]


# ---------------------------------------------------------------- data

def read_idx(path):
    """One IDX file (the MNIST format): big-endian dims after a 4-byte magic."""
    with gzip.open(path) as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim)]
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8).view(*dims)


def load_fashion_mnist(root):
    names = ['train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz',
             't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz']
    missing = [n for n in names if not os.path.exists(os.path.join(root, n))]
    if missing:
        raise UserError(f'no Fashion-MNIST in {root!r} (missing {missing[0]}): run `make data` '
                        '(apt-get install dataset-fashion-mnist) or pass --data=DIR')
    xtr, ytr, xte, yte = (read_idx(os.path.join(root, n)) for n in names)
    return (xtr[:, None], ytr.long()), (xte[:, None], yte.long())


class TensorLoader:
    """In-memory uint8 images -> float batches in [0,1] on the device. Each rank reads its own
    shard of an order that changes every epoch and is reproducible from the seed."""

    def __init__(self, images, labels, batch_size, device, train, seed=0, rank=0, world=1):
        self.images, self.labels, self.train, self.seed = images, labels, train, seed
        self.device, self.rank, self.world = device, rank, world
        self.batch = batch_size // world if train else batch_size
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        per_rank = len(self.labels) // self.world if self.train else -(-len(self.labels) // self.world)
        return per_rank // self.batch if self.train else -(-per_rank // self.batch)

    def __iter__(self):
        n = len(self.labels)
        if self.train:  # drop_last: a new batch shape would make torch.compile recompile
            g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
            idx = torch.randperm(n, generator=g)[: n // self.world * self.world][self.rank::self.world]
        else:
            idx = torch.arange(self.rank, n, self.world)
        for i in range(len(self)):
            j = idx[i * self.batch:(i + 1) * self.batch]
            x = self.images[j].to(self.device, non_blocking=True).float().div_(255)
            if self.train:  # random horizontal flip
                flip = torch.rand(len(j), generator=g) < 0.5
                x = torch.where(flip.to(self.device).view(-1, 1, 1, 1), x.flip(3), x)
            yield x.contiguous(memory_format=torch.channels_last), self.labels[j].to(self.device)


def make_loaders(cfg, rank, world, device):
    """-> train loader, val loader, and what the model needs to know about the data.
    The seam for other datasets: return the same three things."""
    (xtr, ytr), (xte, yte) = load_fashion_mnist(cfg.data)
    info = dict(in_ch=1, num_classes=10, img_size=28, mean=FASHION_MEAN, std=FASHION_STD)
    train = TensorLoader(xtr, ytr, cfg.batch_size, device, True, cfg.seed, rank, world)
    val = TensorLoader(xte, yte, 500, device, False, rank=rank, world=world)
    robust_val = TensorLoader(xte[:cfg.eval_n], yte[:cfg.eval_n], 500, device, False, rank=rank, world=world)
    return train, val, robust_val, info


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(path, state):
    """Atomic: a crash mid-write leaves the previous checkpoint, never a truncated one."""
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise UserError(f'no checkpoint at {path!r}')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # weights_only refuses pickled code; truncation fails to unzip
        why = 'it holds pickled objects, refused by weights_only=True' if 'weights_only' in str(e) \
            else 'it is truncated or corrupt'
        raise UserError(f'cannot load checkpoint {path!r}: {why}') from None


def model_from_checkpoint(ck, key='model'):
    cfg = ck['config']
    model = build_model(cfg['model'], cfg['act'], **ck['data_info'])
    model.load_state_dict(ck[key])
    return model


# ---------------------------------------------------------------- training

def lr_at(cfg, t):
    """Linear warm-up, then cosine decay to min_lr; t = epochs elapsed."""
    if t < cfg.warmup_epochs:
        return cfg.lr * t / cfg.warmup_epochs
    p = (t - cfg.warmup_epochs) / max(cfg.epochs - cfg.warmup_epochs, 1e-9)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))


def evaluate(model, val, robust_val, eps, steps):
    correct, n = 0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for x, y in val:
            correct += (model(x).argmax(1) == y).sum().item()
            n += len(y)
    counts = torch.tensor([correct, n], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(counts)
    robust = robust_accuracy(model, robust_val, [eps], steps)
    model.train(was_training)
    return {'clean_acc': (counts[0] / counts[1]).item(), 'pgd_acc': robust['robust'][eps]}


def train(cfg):
    distributed = 'RANK' in os.environ  # set by torchrun
    if distributed:
        dist.init_process_group('nccl' if torch.cuda.is_available() else 'gloo')
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if torch.cuda.is_available():
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device('cpu')
    log = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed)
    train_loader, val, robust_val, info = make_loaders(cfg, rank, world, device)

    model = build_model(cfg.model, cfg.act, **info)
    resume = load_checkpoint(cfg.resume) if cfg.resume else None
    if resume:
        old = resume['config']
        if (old['model'], old['act']) != (cfg.model, cfg.act):
            raise UserError(f'{cfg.resume} holds a {old["model"]}/{old["act"]} model, not the '
                            f'requested {cfg.model}/{cfg.act}: pass --model={old["model"]} --act={old["act"]}')
        model.load_state_dict(resume['model'])
    model = model.to(device, memory_format=torch.channels_last)
    ema = None
    if cfg.ema:
        import copy
        ema = copy.deepcopy(model).requires_grad_(False)
        if resume:
            ema.load_state_dict(resume['ema'])
    decay = [p for p in model.parameters() if p.ndim > 1]  # no weight decay on norms and biases
    rest = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{'params': decay, 'weight_decay': cfg.weight_decay},
                             {'params': rest, 'weight_decay': 0.0}], lr=cfg.lr, fused=device.type == 'cuda')
    start_epoch = 0
    if resume:
        opt.load_state_dict(resume['optimizer'])
        start_epoch = resume['epoch'] + 1
        log(f'resumed from {cfg.resume} at epoch {start_epoch}')

    net = nn.parallel.DistributedDataParallel(model) if distributed else model
    loss_fn = objective(cfg, device)
    compiled = cfg.compile == 'on' or (cfg.compile == 'auto' and device.type == 'cuda')
    if compiled:
        torch._dynamo.config.trace_autograd_ops = True  # lets the inner autograd.grad compile
        torch._dynamo.config.optimize_ddp = False       # one graph: DDP syncs after backward
        loss_fn = torch.compile(loss_fn, fullgraph=True)
    autocast = torch.autocast('cuda', torch.bfloat16) if device.type == 'cuda' else nullcontext()
    os.makedirs(cfg.out, exist_ok=True) if rank == 0 else None
    ckpt_path = os.path.join(cfg.out, 'ckpt.pt')
    log(f'{cfg.objective} | {cfg.model} {cfg.act} | {sum(p.numel() for p in model.parameters()):,} params '
        f'| {world} x {device.type} | compile={compiled} | eps={cfg.eps:.4g}')

    steps = len(train_loader)
    metrics = {}
    for epoch in range(start_epoch, cfg.epochs):
        train_loader.set_epoch(epoch)
        net.train()
        sums, seen, t0 = {}, 0, time.time()
        for i, (x, y) in enumerate(train_loader):
            t = epoch + i / steps
            for group in opt.param_groups:
                group['lr'] = lr_at(cfg, t)
            x.requires_grad_(cfg.objective in ('gradnorm', 'edge'))  # a leaf outside any compiled code
            with autocast:
                loss, parts = loss_fn(net, x, y, t)
            if not torch.isfinite(loss):
                bad = [k for k, v in parts.items() if not torch.isfinite(v)] or ['loss']
                raise UserError(f'non-finite {bad[0]} at epoch {epoch} step {i}; training stopped, '
                                f'last good checkpoint {ckpt_path} is intact (try a lower --lr)')
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            if ema is not None:
                with torch.no_grad():
                    for e, p in zip(ema.state_dict().values(), model.state_dict().values()):
                        e.lerp_(p, 1 - cfg.ema) if e.is_floating_point() else e.copy_(p)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            seen += len(y) * world
            if rank == 0 and (i % 20 == 0 or i == steps - 1):
                done = int(30 * (i + 1) / steps)
                terms = ' '.join(f'{k} {v.item() / (i + 1):.3f}' for k, v in sums.items())
                print(f'\repoch {epoch} [{"#" * done}{"." * (30 - done)}] {terms} '
                      f'{seen / (time.time() - t0):.0f} img/s', end='', flush=True)
        seconds = time.time() - t0
        log()
        metrics = dict(epoch=epoch, lr=lr_at(cfg, epoch + 1), img_per_s=seen / seconds, seconds=seconds,
                       **{k: v.item() / steps for k, v in sums.items()},
                       **evaluate(model, val, robust_val, cfg.eps, cfg.eval_steps))
        if ema is not None:
            metrics.update({f'ema_{k}': v for k, v in
                            evaluate(ema, val, robust_val, cfg.eps, cfg.eval_steps).items()})
        log(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()}))
        if rank == 0:
            with open(os.path.join(cfg.out, 'metrics.jsonl'), 'a') as f:
                f.write(json.dumps(metrics) + '\n')
            save_checkpoint(ckpt_path, dict(
                model=model.state_dict(), ema=ema.state_dict() if ema else None,
                optimizer=opt.state_dict(), config=dataclasses.asdict(cfg), data_info=info, epoch=epoch))
    if metrics:
        log(f'final: clean {100 * metrics["clean_acc"]:.1f}% | PGD-{cfg.eval_steps} L-inf eps={cfg.eps:.4g} '
            f'on {cfg.eval_n} test images {100 * metrics["pgd_acc"]:.1f}% | checkpoint {ckpt_path}')
    if distributed:
        dist.destroy_process_group()
    return model


if __name__ == '__main__':
    try:
        train(parse_config(sys.argv[1:]))
    except UserError as e:
        sys.exit(f'\nerror: {e}')
