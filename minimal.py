"""Robustness from natural input gradients (Rodriguez-Munoz, Wang, Torralba, ECCV 2024) in one file.
A model becomes robust to L-inf attacks of size eps when the gradient of its loss with respect to the clean
image is kept small: GradNorm adds eps * ||d CE / d x||_1 to the loss and sees no adversarial example.
It needs a smooth activation (GELU, SiLU): both models here take theirs by name. The losses are those of
gradnorm.py, edge_reg.py and attack.py (torch only); this file is everything around them.

The full trainer is train.py + evaluate.py: resume, checkpoints, run-folder locking, FFCV, AutoAttack and the
paper's recipes live there, not here. Read top to bottom: settings, data, model, training, evaluation, main.

    python minimal.py                               # the Fashion-MNIST GradNorm-GELU demo (CPU is fine)
    python minimal.py --objective=pgd --act=relu    # any setting below as --key=value (--help lists them)
    torchrun --nproc_per_node=2 minimal.py          # DDP, the same code path
"""
import functools
import gzip
import math
import os
import sys
import time

import torch
import torch._dynamo  # here, before any process group: imported after one, it keeps gloo's alive at exit
import torch.distributed as dist
import torch.nn as nn
import torchvision

import attack
import edge_reg
import gradnorm

# ---------------------------------------------------------------- settings

objective = 'gradnorm'        # standard | gradnorm | edge | pgd (PGD-3 AT) | fgsm (FGSM-RS AT)
gradnorm_impl = 'auto'        # auto: fd in float32 with gelu/silu, else exact (double backprop) | exact | fd
arch = 'resnet'               # resnet | vit (compact ones, built below)
act = 'gelu'                  # relu | gelu | silu: GradNorm needs a smooth one
data = '/usr/share/datasets/fashion-mnist'  # Fashion-MNIST's IDX .gz files, or an ImageFolder: train/, val/
res = 224                     # ImageFolder images: training crop and validation side
epochs = 4                    # passes over the training images
batch_size = 128              # global, split over ranks
lr = 2e-3                     # AdamW's peak learning rate
min_lr = 1e-5                 # the end of the cosine decay
warmup_epochs = 1.0           # linear warm-up from 0
weight_decay = 0.05           # not on biases and norms
clip = 1.0                    # gradient-norm clipping
smoothing = 0.1               # label smoothing
eps = 0.1                     # L-inf budget, pixels in [0,1]: GradNorm's, the adversaries', the evaluation's
ramp_epochs = 1.0             # GradNorm's alpha: 0 -> 1 over these epochs
edge_alpha = '1,0.09,19'      # EdgeReg's alpha = min(a + b*epoch, c)
train_n = 0                   # train on the first N images only (0: all): quick tries
val_n = 0                     # clean accuracy on the first N held-out images (0: all)
eval_n = 1000                 # robust accuracy on the first N held-out images
eval_steps = 20               # PGD steps of the final evaluation
compile = 'auto'              # auto (on CUDA) | on | off: torch.compile of the whole loss function
amp = True                    # bf16 autocast on CUDA (GradNorm then runs exact: fd needs float32)
workers = 4                   # ImageFolder decoding processes per rank
seed = 0                      # initial weights, data order, attack starts

SETTINGS = {k: v for k, v in globals().items() if k[0] != '_' and isinstance(v, (bool, int, float, str))}
CHOICES = dict(objective=('standard', 'gradnorm', 'edge', 'pgd', 'fgsm'), act=('relu', 'gelu', 'silu'),
               arch=('resnet', 'vit'), gradnorm_impl=('auto', 'exact', 'fd'), compile=('auto', 'on', 'off'))
POSITIVE = ('res', 'epochs', 'batch_size', 'lr', 'eps', 'eval_n', 'eval_steps')  # the other numbers: >= 0
BOOLS = {'true': True, '1': True, 'false': False, '0': False}
KINDS = {bool: 'true or false', int: 'an integer', float: 'a number', str: 'a string'}  # for error lines
UNIT = ('eps', 'smoothing')  # at most 1: pixels are in [0, 1]; smoothing is a probability


def fail(message):
    if os.environ.get('RANK', '0') == '0':  # under torchrun, once
        print(f'error: {message}', file=sys.stderr, flush=True)
    sys.exit(2)


def show_help():
    """Each setting, its default and its comment, read from the settings section above."""
    print(__doc__.strip() + '\n\nsettings (--key=value):')
    with open(__file__) as f:
        for line in f:
            key, _, rest = line.partition(' = ')
            if key in SETTINGS and '  # ' in rest:
                print(f'  --{key}={SETTINGS[key]!s}'.ljust(48), rest.split('  # ', 1)[1].strip())
    sys.exit(0)


def configure(argv):
    """--key=value overrides a setting, as nanoGPT's configurator: the value must be of the default's type."""
    for arg in argv:
        if arg in ('-h', '--help'):
            show_help()
        key, eq, text = arg.removeprefix('--').partition('=')
        if not arg.startswith('--') or not eq or key not in SETTINGS:
            fail(f'unknown setting {arg!r}: use --key=value with a key that --help lists')
        kind, value = type(SETTINGS[key]), BOOLS.get(text.lower())
        if kind is not bool:
            try:
                abc = [float(v) for v in text.split(',')] if key == 'edge_alpha' else 'abc'  # three numbers
                value = kind(text) if len(abc) == 3 else None
            except ValueError:
                value = None
        if value is None or value not in CHOICES.get(key, (value,)):
            fail(f'--{key}={text}: expected ' + ' | '.join(CHOICES.get(key, [KINDS[kind]])))
        if kind in (int, float) and not (value > 0 if key in POSITIVE else value >= 0):  # NaN fails too
            fail(f'--{key}={text}: must be ' + ('positive' if key in POSITIVE else '>= 0'))
        if key in UNIT and value > 1:
            fail(f'--{key}={text}: must be at most 1')
        globals()[key] = value


# ---------------------------------------------------------------- data

def read_idx(path):
    """One IDX file (MNIST's format): a 4-byte magic whose last byte is the number of dims, then the dims."""
    with gzip.open(path) as f:
        raw = f.read()
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], 'big') for i in range(raw[3])]
    return torch.frombuffer(bytearray(raw[4 + 4 * len(dims):]), dtype=torch.uint8).view(*dims)


def fashion_epoch(images, labels, batch, rank, world, epoch):
    """One epoch of training batches, x float in [0,1]: a seeded order (each rank every world-th image of it,
    the last partial batch dropped, as a new batch shape would recompile) and random horizontal flips."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    n = len(labels)
    order = torch.randperm(n, generator=g)[:n // world * world][rank::world]
    flips = torch.rand(n, generator=g) < 0.5
    for i in range(len(order) // batch):
        j = order[i * batch:(i + 1) * batch]
        x = torch.where(flips[j].view(-1, 1, 1, 1), images[j].flip(3), images[j])
        yield x.float() / 255, labels[j]


def fashion_mnist(rank, world):
    """-> (steps per epoch, epoch -> batches), the held-out set, and the model's (channels, classes, size,
    mean, std). The 28 px gray images are used as they are, one channel."""
    names = ['train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz', 't10k-images-idx3-ubyte.gz',
             't10k-labels-idx1-ubyte.gz']
    if not all(os.path.exists(os.path.join(data, n)) for n in names):
        fail(f'no Fashion-MNIST in {data!r}: apt-get install dataset-fashion-mnist, or --data=DIR')
    xtr, ytr, xte, yte = (read_idx(os.path.join(data, n)) for n in names)
    xtr, ytr = xtr[:train_n or None, None], ytr[:train_n or None].long()
    batch = batch_size // world
    epoch = functools.partial(fashion_epoch, xtr, ytr, batch, rank, world)
    held_out = torch.utils.data.TensorDataset(xte[:, None], yte.long())
    return (len(ytr) // world // batch, epoch), held_out, (1, 10, 28, (0.286,), (0.353,))


def image_folder(rank, world):
    """The same for an ImageFolder (train/, val/), through torchvision: random-resized crops and flips,
    then central crops."""
    T = torchvision.transforms
    train_set = torchvision.datasets.ImageFolder(os.path.join(data, 'train'), T.Compose(
        [T.RandomResizedCrop(res), T.RandomHorizontalFlip(), T.PILToTensor()]))
    val = T.Compose([T.Resize(res * 8 // 7), T.CenterCrop(res), T.PILToTensor()])
    held_out = torchvision.datasets.ImageFolder(os.path.join(data, 'val'), val)
    # ImageFolder sorts by class: a fixed shuffle, so that the first eval_n images span the classes
    shuffle = torch.randperm(len(held_out), generator=torch.Generator().manual_seed(0))
    held_out = torch.utils.data.Subset(held_out, shuffle.tolist())
    shape = (3, len(train_set.classes), res, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # ImageNet's
    train_set = torch.utils.data.Subset(train_set, range(train_n or len(train_set)))
    sampler = torch.utils.data.DistributedSampler(train_set, world, rank, shuffle=True, seed=seed)
    loader = torch.utils.data.DataLoader(train_set, batch_size // world, sampler=sampler, num_workers=workers,
                                         drop_last=True, persistent_workers=workers > 0)

    def epoch(e):
        sampler.set_epoch(e)
        return ((x.float() / 255, y) for x, y in loader)
    return (len(loader), epoch), held_out, shape


def held_out_batches(held_out, n):
    """The first n held-out images (0: all), this rank's every world-th, 500 at a time, x float in [0,1]."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = torch.utils.data.Subset(held_out, range(rank, min(n or len(held_out), len(held_out)), world))
    in_memory = isinstance(held_out, torch.utils.data.TensorDataset)  # else decoded by workers
    loader = torch.utils.data.DataLoader(mine, 500, num_workers=0 if in_memory else workers)
    return len(mine), ((x.float() / 255, y) for x, y in loader)


# ---------------------------------------------------------------- model

class Normalize(nn.Module):
    """Inside the model, so that inputs, input gradients and attacks all live in pixels in [0,1]."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer('mean', torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer('std', torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


ACTS = {'relu': nn.ReLU, 'gelu': nn.GELU, 'silu': nn.SiLU}  # nn.GELU: the exact (erf) GELU


class Block(nn.Module):
    """ResNet's basic block: two 3x3 convolutions and a shortcut (a 1x1 one where the shape changes)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.act = ACTS[act]()
        self.short = nn.Identity() if stride == 1 and cin == cout else \
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(out)) + self.short(x))


def resnet(cin, classes, size, mean, std, widths=(16, 32, 64)):
    """The demo's 78k-parameter ResNet (models.py's resnet_demo_pool at 28 px): a 3x3 stem, average pooling
    to 14 px (a strided stem prints a 2-pixel checkerboard into d loss / d x), three stages of one block."""
    stem = [nn.Conv2d(cin, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), ACTS[act]()]
    ins = (widths[0],) + widths[:-1]
    stages = [Block(a, b, 1 if i == 0 else 2) for i, (a, b) in enumerate(zip(ins, widths))]
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], classes)]
    return nn.Sequential(Normalize(mean, std), *stem, nn.AvgPool2d(max(size // 14, 1)), *stages, *head)


class ViT(nn.Module):
    """7x7 patches of any image size, pre-norm blocks, mean-pooled tokens (models.py's vit_demo at 28 px).
    Fused attention kernels have no double backward: gradnorm.py and edge_reg.py pick plain matmuls."""

    def __init__(self, cin, classes, size, mean, std, dim=96, depth=4, heads=3):
        super().__init__()
        patch = size // 7
        self.normalize, self.embed = Normalize(mean, std), nn.Conv2d(cin, dim, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2, dim) * 0.02)
        layer = lambda: nn.TransformerEncoderLayer(dim, heads, 4 * dim, 0.0, ACTS[act](), batch_first=True,
                                                   norm_first=True)
        self.layers = nn.Sequential(*[layer() for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(self.normalize(x)).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.layers(x)).mean(1))


# ---------------------------------------------------------------- training

def choose_impl(device):
    """GradNorm's implementation by gradnorm.py's rule: fd (two passes) in float32 with a smooth activation,
    exact (double backprop) otherwise; fd needs TF32 off on CUDA. None for the other objectives."""
    try:
        impl, _ = gradnorm.choose_impl(gradnorm_impl, device.type, device.type == 'cuda' and amp, act)
    except ValueError as e:
        fail(f'--gradnorm_impl={gradnorm_impl}: {e}')
    if impl == 'fd' and objective == 'gradnorm':
        gradnorm.fd_float32(device.type)
    return impl if objective == 'gradnorm' else None


def loss_function(impl, compiled, norm):
    """-> fn(model, x, y, alpha) -> (loss, terms), the whole of it compiled where asked: a compiled model
    cannot be differentiated twice, a compiled loss can (trace_autograd_ops). fullgraph, so a double backward
    cannot fall back to eager unnoticed; alpha is a tensor, so its ramp never recompiles. norm: the model's
    (mean, std), as EdgeReg compares gradients in the model's normalized input space (the authors')."""
    fns = {'standard': lambda m, x, y, a: gradnorm.standard(m, x, y, smoothing),
           'gradnorm': lambda m, x, y, a: gradnorm.gradnorm(m, x, y, eps, a, smoothing=smoothing),
           'fd': lambda m, x, y, a: gradnorm.gradnorm_fd(m, x, y, eps, a, smoothing=smoothing),
           'edge': lambda m, x, y, a: edge_reg.edge_reg(m, x, y, a, norm=norm, smoothing=smoothing),
           'pgd': lambda m, x, y, a: attack.pgd_at(m, x, y, eps, 3, smoothing),
           'fgsm': lambda m, x, y, a: attack.fgsm_at(m, x, y, eps, smoothing)}
    fn = fns['fd' if impl == 'fd' else objective]
    if compiled:
        torch._dynamo.config.trace_autograd_ops = True  # lets the autograd.grad inside the loss compile
        torch._dynamo.config.optimize_ddp = False       # one graph: DDP syncs after the backward
        # the adversaries' attack loops make tensors require grad mid-graph: Dynamo breaks the graph there
        fn = torch.compile(fn, fullgraph=objective in ('standard', 'gradnorm', 'edge'))
    return fn


class Step(nn.Module):
    """Model and loss as one module, so that DDP syncs the gradient of the whole loss (train.py's Step)."""

    def __init__(self, model, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, x, y, alpha):
        return self.fn(self.model, x, y, alpha)


def lr_at(t):
    """Linear warm-up, then cosine decay to min_lr; t = epochs elapsed."""
    if t < warmup_epochs:
        return lr * t / warmup_epochs
    p = min((t - warmup_epochs) / max(epochs - warmup_epochs, 1e-9), 1.0)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * p))


def alpha_at(t):
    """GradNorm's weight ramps 0 -> 1 over ramp_epochs; EdgeReg's grows with the epoch (the authors')."""
    if objective == 'edge':
        a, b, c = map(float, edge_alpha.split(','))
        return min(a + b * t, c)
    return min(t / max(ramp_epochs, 1e-9), 1.0)


def train_epoch(net, model, opt, train, epoch, device, fmt, log):
    """One pass over this rank's share of the training data. -> the mean of each loss term."""
    (steps, batches), sums = train, {}
    net.train()
    for i, (x, y) in enumerate(batches(epoch)):
        t = epoch + i / steps
        for group in opt.param_groups:
            group['lr'] = lr_at(t)
        # a leaf made outside the compiled loss: the objectives differentiate with respect to it
        x = x.to(device, memory_format=fmt).requires_grad_(objective in ('gradnorm', 'edge'))
        with torch.autocast('cuda', torch.bfloat16, enabled=device.type == 'cuda' and amp):
            loss, terms = net(x, y.to(device), torch.tensor(alpha_at(t), device=device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        if i % 50 == 0 or i == steps - 1:
            means = ' '.join(f'{k} {v.item() / (i + 1):.3f}' for k, v in sums.items())
            log(f'\repoch {epoch} step {i + 1}/{steps} {means}', end='', flush=True)
    return {k: v.item() / steps for k, v in sums.items()}


# ---------------------------------------------------------------- evaluation

def accuracy(model, held_out, device, n, attacked=False):
    """Accuracy on the first n held-out images (0: all), all ranks together. attacked: PGD's worst case per
    image, robust only if neither a CE attack nor, on what it left, a margin attack found a misclassified
    point (evaluate.py's pgd_upper); an upper bound, AutoAttack (evaluate.py) gives the number to report."""
    n, batches = held_out_batches(held_out, n)
    right = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same random starts whenever this seed's model is evaluated
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            for loss in ('ce', 'margin') if attacked else ():
                if len(y):
                    _, fooled = attack.pgd(model, x, y, eps, eval_steps, keep_best=True, loss=loss)
                    x, y = x[~fooled], y[~fooled]
            with torch.no_grad():
                right += (model(x).argmax(1) == y).sum().item()
    counts = torch.tensor([right, n], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(counts)  # each rank holds every world-th image
    return (counts[0] / counts[1]).item()


# ---------------------------------------------------------------- main

def main(argv):
    configure(argv)
    if 'RANK' in os.environ:  # torchrun: one process per GPU (NCCL) or per CPU slot (gloo), as nanoGPT
        dist.init_process_group('nccl' if torch.cuda.is_available() else 'gloo')
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.device('cpu')
    if torch.cuda.is_available():
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
    log = print if rank == 0 else (lambda *a, **k: None)  # rank 0 alone prints
    if batch_size % world:
        fail(f'--batch_size={batch_size} does not split into {world} ranks')
    folder = os.path.isdir(os.path.join(data, 'train')) and os.path.isdir(os.path.join(data, 'val'))
    train, held_out, shape = (image_folder if folder else fashion_mnist)(rank, world)
    impl = choose_impl(device)
    torch.manual_seed(seed)  # the same initial weights on every rank
    model = (resnet if arch == 'resnet' else ViT)(*shape)
    torch.manual_seed(seed + rank)  # each rank its own attack starts and crops
    # channels_last for speed; double backward stays contiguous (compiled CUDA kernels failed on it: README)
    fmt = torch.contiguous_format if objective == 'edge' or impl == 'exact' else torch.channels_last
    model = model.to(device, memory_format=fmt)
    decay = [p for p in model.parameters() if p.ndim > 1]  # no weight decay on biases and norms
    rest = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{'params': decay, 'weight_decay': weight_decay}, {'params': rest, 'weight_decay': 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, fused=device.type == 'cuda')
    compiled = compile == 'on' or (compile == 'auto' and device.type == 'cuda')
    norm = next((m.mean, m.std) for m in model.modules() if isinstance(m, Normalize))
    net = Step(model, loss_function(impl, compiled, norm))
    if world > 1:  # gloo: DDP gets a group of its own, so that the default one can be joined at the end
        group = dist.new_group() if device.type == 'cpu' else None
        net = nn.parallel.DistributedDataParallel(net, process_group=group)
    params = sum(p.numel() for p in model.parameters())
    log(f'{objective} ({impl or "-"}) | {arch} {act} | {params:,} params | {world} x {device.type} | '
        f'compile={compiled} | eps {eps:g}')
    t0 = time.time()
    for epoch in range(epochs):
        terms = train_epoch(net, model, opt, train, epoch, device, fmt, log)
        model.eval()
        clean = accuracy(model, held_out, device, val_n)
        means = ' '.join(f'{k} {v:.3f}' for k, v in terms.items())
        log(f'\repoch {epoch} {means} | clean {100 * clean:.1f}% | {time.time() - t0:.0f} s')
    robust = accuracy(model, held_out, device, eval_n, attacked=True)
    log(f'final: clean {100 * clean:.1f}% | PGD-{eval_steps} worst {100 * robust:.1f}% at eps {eps:g}')
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == '__main__':
    main(sys.argv[1:])
