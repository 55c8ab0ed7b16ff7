"""Compact ResNets and ViTs, and any timm model (`swin_base_patch4_window7_224`, `timm/resnet50`), each
with its activation by name and eating images in [0,1]: normalization is inside, attacks in pixel space."""
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ACTS = {'relu': nn.ReLU, 'gelu': nn.GELU, 'silu': nn.SiLU}  # nn.GELU is the exact (erf) GELU


def make_act(name):
    if name not in ACTS:
        raise ValueError(f'unknown activation {name!r}; choose one of {", ".join(ACTS)}')
    return ACTS[name]()


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        # not persistent: torchvision state_dicts (which lack them) still load with strict=True
        self.register_buffer('mean', torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return (x - self.mean) / self.std


# ---------------------------------------------------------------- a convolution for double backprop
# Copyable as one block, from here to CONVS; it needs only torch (>= 2.4, torch.library.custom_op).
# PyTorch's double backward of a convolution runs its weight term as a convolution whose kernel is
# the output gradient, a shape with no fast cuDNN algorithm. Here each gradient is an op whose
# derivatives are again conv2d, conv2d_input and conv2d_weight: the same numbers on the standard
# kernels. Custom ops, because autograd.Functions gave wrong double backwards under torch.compile.

def _needed(ctx, i):
    """Whether this backward wants input i's gradient (needs_input_grad says only that it could)."""
    node = ctx.next_functions[i][0]
    if node is None:
        return False
    try:
        return torch._C._will_engine_execute_node(node)
    except RuntimeError:  # raised for a leaf that autograd.grad was asked for: it is wanted
        return True


def _op(fn):
    """A custom op running fn; fn on fake tensors gives torch.compile the output's shape and strides."""
    op = torch.library.custom_op('gradnorm::' + fn.__name__.lstrip('_'), fn, mutates_args=())
    op.register_fake(fn)
    return op


@_op
def _conv2d(x: Tensor, w: Tensor, b: Optional[Tensor], stride: List[int], padding: List[int],
            dilation: List[int], groups: int) -> Tensor:
    return F.conv2d(x, w, b, stride, padding, dilation, groups)


@_op
def _conv2d_input(gy: Tensor, w: Tensor, x_shape: List[int], stride: List[int], padding: List[int],
                  dilation: List[int], groups: int) -> Tensor:
    return torch.nn.grad.conv2d_input(x_shape, w, gy, stride, padding, dilation, groups)


@_op
def _conv2d_weight(x: Tensor, gy: Tensor, w_shape: List[int], stride: List[int], padding: List[int],
                   dilation: List[int], groups: int) -> Tensor:
    return torch.nn.grad.conv2d_weight(x, w_shape, gy, stride, padding, dilation, groups)


def _save(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:2])
    ctx.conv = inputs[-4:]  # stride, padding, dilation, groups


def _conv2d_backward(ctx, gy):
    x, w = ctx.saved_tensors
    has_b = len(ctx.next_functions) > 2  # only tensors have edges, and b may be None
    return (_conv2d_input(gy, w, x.shape, *ctx.conv) if _needed(ctx, 0) else None,
            _conv2d_weight(x, gy, w.shape, *ctx.conv) if _needed(ctx, 1) else None,
            gy.sum((0, 2, 3)) if has_b and _needed(ctx, 2) else None) + (None,) * 4


def _conv2d_input_backward(ctx, ggx):
    gy, w = ctx.saved_tensors
    return (_conv2d(ggx, w, None, *ctx.conv) if _needed(ctx, 0) else None,
            _conv2d_weight(ggx, gy, w.shape, *ctx.conv) if _needed(ctx, 1) else None) + (None,) * 5


def _conv2d_weight_backward(ctx, ggw):
    x, gy = ctx.saved_tensors
    return (_conv2d_input(gy, ggw, x.shape, *ctx.conv) if _needed(ctx, 0) else None,
            _conv2d(x, ggw, None, *ctx.conv) if _needed(ctx, 1) else None) + (None,) * 5


_conv2d.register_autograd(_conv2d_backward, setup_context=_save)
_conv2d_input.register_autograd(_conv2d_input_backward, setup_context=_save)
_conv2d_weight.register_autograd(_conv2d_weight_backward, setup_context=_save)


def conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    """F.conv2d with the double backward above; inputs cast here as F.conv2d's autocast rule would
    (custom ops pass autocast through uncast)."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w, b = (t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                   for t in (x, w, b))
    return _conv2d(x, w, b, _pair(stride), _pair(padding), _pair(dilation), groups)


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, state_dict and arguments) whose double backward is fast."""

    def _conv_forward(self, x, w, b):
        if isinstance(self.padding, str) or self.padding_mode != 'zeros':  # rare: the native double backward
            return super()._conv_forward(x, w, b)
        return conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)


CONVS = {'fast': Conv2d, 'native': nn.Conv2d}


def conv_bn(cin, cout, k, stride, conv):
    return nn.Sequential(conv(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, width, stride, act, conv=nn.Conv2d):
        super().__init__()
        self.conv1 = conv(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.act = make_act(act)
        self.downsample = conv_bn(cin, width, 1, stride, conv) if stride != 1 or cin != width else None

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride, act, conv=nn.Conv2d):
        super().__init__()
        cout = width * 4
        self.conv1 = conv(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv(width, width, 3, stride, 1, bias=False)  # stride here: torchvision's v1.5
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.act = make_act(act)
        self.downsample = conv_bn(cin, cout, 1, stride, conv) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """torchvision's parameter names and shapes: its weights load strictly, whichever conv."""

    def __init__(self, block, layers, widths=(64, 128, 256, 512), act='relu', in_ch=3,
                 num_classes=1000, small_stem=False, stem_stride=1, stem_pool=1,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, conv='native'):
        super().__init__()
        conv = CONVS[conv]
        self.normalize = Normalize(mean, std)
        # small inputs (28-32 px): a 3x3 stem and no max-pool instead of ImageNet's 4x downsampling
        self.conv1 = conv(in_ch, widths[0], 3 if small_stem else 7, stem_stride if small_stem else 2,
                          1 if small_stem else 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act = make_act(act)
        # stem_pool=2: a stride-2 3x3 stem prints a 2-pixel checkerboard into d loss / d x, average
        # pooling does not (docs/demo_science.md)
        self.maxpool = (nn.AvgPool2d(stem_pool) if stem_pool > 1 else nn.Identity()) if small_stem \
            else nn.MaxPool2d(3, 2, 1)
        cin = widths[0]
        for i, (n, w) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, w, 2 if i > 0 and j == 0 else 1, act, conv))
                cin = w * block.expansion
            setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
        self.stages = len(layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.act(self.bn1(self.conv1(self.normalize(x)))))
        for i in range(self.stages):
            x = getattr(self, f'layer{i + 1}')(x)
        return self.fc(x.mean((2, 3)))


class PreActBlock(nn.Module):
    """He et al. 2016's block: BN, act, conv, BN, act, conv, plus the input; where the shape changes, a 1x1
    conv of it, or of the BN-act output with preact_shortcut (He et al., the authors' prn18)."""

    def __init__(self, cin, width, stride, act, conv, preact_shortcut):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), conv(cin, width, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(width), conv(width, width, 3, 1, 1, bias=False)
        self.act, self.preact_shortcut = make_act(act), preact_shortcut
        if stride != 1 or cin != width:  # a Sequential, so its key is theirs: shortcut.0.weight
            self.shortcut = nn.Sequential(conv(cin, width, 1, stride, bias=False))

    def forward(self, x):
        out = self.act(self.bn1(x))
        skip = self.shortcut(out if self.preact_shortcut else x) if hasattr(self, 'shortcut') else x
        return self.conv2(self.act(self.bn2(self.conv1(out)))) + skip


class PreActResNet(nn.Module):
    """PreAct ResNet-18 for 32 px images: a 3x3 stride-1 stem, four stages of two PreActBlocks (64 to 512
    channels), then BN and act (final_norm), global average pooling, linear. fast_adversarial's parameter
    names (and the authors'), so their state_dicts load strictly."""

    def __init__(self, act='relu', in_ch=3, num_classes=10, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 conv='native', final_norm=True, preact_shortcut=False):
        super().__init__()
        conv, cin = CONVS[conv], 64
        self.normalize, self.conv1 = Normalize(mean, std), conv(in_ch, 64, 3, 1, 1, bias=False)
        for i, width in enumerate((64, 128, 256, 512)):
            blocks = [PreActBlock(cin, width, 1 if i == 0 else 2, act, conv, preact_shortcut),
                      PreActBlock(width, width, 1, act, conv, preact_shortcut)]
            setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
            cin = width
        if final_norm:  # the last block's sum is never normalized otherwise
            self.bn, self.act = nn.BatchNorm2d(cin), make_act(act)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.conv1(self.normalize(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.act(self.bn(x)) if hasattr(self, 'bn') else x
        return self.linear(x.mean((2, 3)))  # = their 4x4 average pool at 32 px


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
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), Attention(dim, heads), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), make_act(act), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, img_size=224, patch=16, dim=192, depth=12, heads=3, act='gelu', in_ch=3,
                 num_classes=1000, mean=IMAGENET_MEAN, std=IMAGENET_STD, conv='native'):
        super().__init__()
        if img_size % patch:  # the convolution would drop them silently
            raise ValueError(f'{patch} px patches do not tile {img_size} px images: their last '
                             f'{img_size % patch} pixel rows and columns would never reach the model; '
                             f'use a multiple of {patch}')
        self.normalize = Normalize(mean, std)
        self.patch_embed = CONVS[conv](in_ch, dim, patch, patch)
        self.pos_embed = nn.Parameter(torch.randn(1, (img_size // patch) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, act) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(self.normalize(x)).flatten(2).transpose(1, 2) + self.pos_embed
        return self.head(self.norm(self.blocks(x)).mean(1))  # mean-pooled tokens, no class token


def _demo(**kw):
    return ResNet(BasicBlock, [1, 1, 1], (16, 32, 64), small_stem=True, **kw)


MODELS = {
    'resnet18': lambda **kw: ResNet(BasicBlock, [2, 2, 2, 2], **kw),
    'resnet50': lambda **kw: ResNet(Bottleneck, [3, 4, 6, 3], **kw),
    'resnet18_small': lambda **kw: ResNet(BasicBlock, [2, 2, 2, 2], small_stem=True, **kw),
    # the CPU demo: 28 px -> 14 -> 7 -> 4, ~20x cheaper than resnet18_small
    'resnet_demo': lambda **kw: _demo(stem_stride=2, **kw),
    # the demo with a stem whose input gradients carry no 2-pixel checkerboard (1.3x the step cost)
    'resnet_demo_pool': lambda **kw: _demo(stem_pool=2, **kw),
    # CIFAR-10's PreAct ResNet-18: fast_adversarial's (Wong et al. 2020; RobustBench's PreActResNet-18
    # entries), and the authors' prn18 (kuangliu's pytorch-cifar), which their CIFAR-10 recipes train
    'preact_resnet18': lambda **kw: PreActResNet(**kw),
    'prn18': lambda **kw: PreActResNet(final_norm=False, preact_shortcut=True, **kw),
    'vit_tiny': lambda **kw: ViT(patch=16, dim=192, depth=12, heads=3, **kw),
    'vit_small': lambda **kw: ViT(patch=16, dim=384, depth=12, heads=6, **kw),
    'vit_demo': lambda **kw: ViT(patch=4, dim=96, depth=4, heads=3, **kw),
}


# ---------------------------------------------------------------- timm's models

def timm_name(name):
    """The timm model a --model name means, or None for a compact model of this file."""
    if name in MODELS:
        return None
    base = name.removeprefix('timm/')
    try:
        import timm
    except ImportError:
        return None
    return base if timm.is_model(base) else None


def is_model(name):
    return name in MODELS or timm_name(name) is not None


class TimmModel(nn.Module):
    """A timm model behind our Normalize (images in [0,1]); its state_dict is timm's under 'model.'."""

    def __init__(self, model, mean, std):
        super().__init__()
        self.normalize, self.model = Normalize(mean, std), model

    def forward(self, x):
        return self.model(self.normalize(x))


def build_timm(name, act, in_ch, num_classes, img_size, mean, std, pretrained):
    """timm.create_model without dropout or stochastic depth (as the paper's runs), at img_size where the
    architecture fixes it, act swapped in."""
    import timm
    base = timm_name(name)
    cfg = timm.models.get_pretrained_cfg(base)
    kw = dict(img_size=img_size) if cfg and cfg.fixed_input_size else {}
    kw.update(num_classes=num_classes, in_chans=in_ch, drop_rate=0.0, drop_path_rate=0.0)
    try:
        model = timm.create_model(base, pretrained=pretrained, **kw)
    except TypeError as e:  # architectures without stochastic depth (VGG, DenseNet, ...) refuse the argument
        if 'drop_path_rate' not in str(e):
            raise
        del kw['drop_path_rate']
        model = timm.create_model(base, pretrained=pretrained, **kw)
    except OSError as e:  # neither in timm's cache nor downloadable (Hugging Face's LocalEntryNotFoundError)
        from huggingface_hub.constants import HF_HUB_CACHE
        fetch = f"python -c \"import timm; timm.create_model('{base}', pretrained=True)\""
        raise ValueError(f"timm's weights for {base} are not in {HF_HUB_CACHE} and cannot be downloaded "
                         f"({str(e).splitlines()[0][:100]}): run {fetch} on a machine with network and copy "
                         f"{HF_HUB_CACHE} here, or point HF_HUB_CACHE at a copy") from None
    set_activation(model, act)
    from timm.layers.activations import HardSigmoid
    # squeeze-excite gates (MobileNetV3, GhostNet, ...): the same function, twice differentiable
    # (aten's hardsigmoid backward has no derivative)
    replace_modules(model, nn.Hardsigmoid, HardSigmoid)
    mean = mean or (cfg.mean if cfg else IMAGENET_MEAN)[:in_ch]
    return TimmModel(model, mean, std or (cfg.std if cfg else IMAGENET_STD)[:in_ch])


# ---------------------------------------------------------------- any model

def build_model(name, act='gelu', in_ch=3, num_classes=1000, img_size=224, mean=None, std=None,
                pretrained=False, conv='native'):
    """pretrained: timm's weights (timm models only). conv: 'native' (nn.Conv2d) or 'fast' (Conv2d, for
    double backward), the same parameters."""
    if not is_model(name):
        raise ValueError(f'unknown model {name!r}; choose one of {", ".join(MODELS)} or a timm model')
    if conv not in CONVS:
        raise ValueError(f'unknown conv {conv!r}; choose one of {", ".join(CONVS)}')
    if timm_name(name):
        return use_conv(build_timm(name, act, in_ch, num_classes, img_size, mean, std, pretrained), conv)
    if pretrained:
        raise ValueError(f'{name} is a compact model of models.py: timm has no weights for it')
    kw = dict(act=act, in_ch=in_ch, num_classes=num_classes, conv=conv)
    kw.update(mean=mean or IMAGENET_MEAN[:in_ch], std=std or IMAGENET_STD[:in_ch])
    if name.startswith('vit'):
        kw['img_size'] = img_size
    return MODELS[name](**kw)


def use_conv(model, conv):
    """Every plain nn.Conv2d of model the given kind, in place (timm's Conv2dSame, StdConv2d, ... stay)."""
    for m in model.modules():
        if type(m) in (nn.Conv2d, Conv2d):
            m.__class__ = CONVS[conv]  # same attributes and parameters: only the forward differs
    return model


def activation_types():
    """Ours and timm's ReLU/GELU/SiLU kinds; not the sigmoid gates of squeeze-excite blocks."""
    kinds = tuple(ACTS.values())
    try:
        from timm.layers import activations as t
    except ImportError:
        return kinds
    return kinds + (t.GELU, t.GELUTanh, t.QuickGELU, t.Swish)


def replace_modules(model, kinds, make):
    """Every submodule of the given classes replaced in place by make()."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, kinds):
                setattr(module, name, make())
    return model


def set_activation(model, act):
    """Swap every activation module in place, e.g. ReLU -> GELU after loading pretrained weights."""
    return replace_modules(model, activation_types(), lambda: make_act(act))


def no_weight_decay(model):
    """Parameters AdamW leaves undecayed, as timm's optimizer factory: 1-D ones and those timm lists."""
    import fnmatch
    inner = getattr(model, 'model', None)
    listed = [f'model.{n}' for n in inner.no_weight_decay()] if hasattr(inner, 'no_weight_decay') else []
    return {name for name, p in model.named_parameters()
            if p.ndim <= 1 or any(fnmatch.fnmatch(name, pattern) for pattern in listed)}


def param_groups(model, weight_decay):
    """AdamW's two groups: weight decay on all parameters but no_weight_decay's (norms, biases, and what the
    architecture names, e.g. timm's Swin: relative positions)."""
    skip = no_weight_decay(model)
    decay = [p for n, p in model.named_parameters() if n not in skip]
    rest = [p for n, p in model.named_parameters() if n in skip]
    return [{'params': decay, 'weight_decay': weight_decay}, {'params': rest, 'weight_decay': 0.0}]


def normalization(model):
    """(mean, std) of the Normalize inside model, shaped (1, C, 1, 1); None if it has none."""
    norm = next((m for m in model.modules() if isinstance(m, Normalize)), None)
    return None if norm is None else (norm.mean, norm.std)
