"""Compact ResNet and ViT for robustness from natural input gradients.

Both take the activation by name (GradNorm needs a smooth one: GELU or SiLU) and the number of
input channels and classes, and both eat images in [0,1]: normalization is a buffer inside the
model, so input gradients and attacks live in pixel space. `resnet50` keeps torchvision's
parameter names and shapes, so its pretrained weights load with strict=True.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from attack import UserError
from data import IMAGENET_MEAN, IMAGENET_STD

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
                 num_classes=1000, small_stem=False, stem_stride=1, stem_kernel=3, stem_pool=1,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.normalize = Normalize(mean, std)
        # small inputs (28-32 px): a small stem and no max-pool instead of ImageNet's 4x downsampling;
        # an even kernel k gets padding (k - stride) // 2, so 4x4/2 and 2x2/2 halve the size exactly
        k = stem_kernel if small_stem else 7
        self.conv1 = nn.Conv2d(in_ch, widths[0], k, stem_stride if small_stem else 2,
                               (k // 2 if k % 2 else (k - stem_stride) // 2) if small_stem else 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act = make_act(act)
        # stem_pool=2 (small stem): 2x2 average pooling after a stride-1 stem. Its input gradient
        # spreads each pooled cell's gradient evenly over its 4 pixels, where a stride-2 3x3 conv
        # hits every other pixel twice and prints a 2-pixel checkerboard into d loss / d x.
        self.maxpool = (nn.AvgPool2d(stem_pool) if stem_pool > 1 else nn.Identity()) if small_stem \
            else nn.MaxPool2d(3, 2, 1)
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
    # the demo with stems free of the 2-pixel checkerboard in |d loss / d x| (docs/demo_science.md):
    # stride-1 3x3 conv then 2x2 average pooling; or a kernel divisible by its stride (4x4/2, 2x2/2)
    'resnet_demo_pool': lambda **kw: ResNet(BasicBlock, [1, 1, 1], (16, 32, 64), small_stem=True, stem_pool=2, **kw),
    'resnet_demo_k4': lambda **kw: ResNet(BasicBlock, [1, 1, 1], (16, 32, 64), small_stem=True, stem_stride=2,
                                          stem_kernel=4, **kw),
    'resnet_demo_k2': lambda **kw: ResNet(BasicBlock, [1, 1, 1], (16, 32, 64), small_stem=True, stem_stride=2,
                                          stem_kernel=2, **kw),
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
