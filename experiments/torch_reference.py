"""PyTorch CPU train steps equivalent to nr_jax's benchmark families (a reference, not a
dependency).

Run by `experiments/benchmark.py` (efficiency section) with an interpreter that has torch:

    python experiments/torch_reference.py '{"families": [["vgg_fmnist", 64]], "reps": 5,
        "steps": 5}'

prints one JSON object: images/s and ms per step of each family, in NCHW and channels-last memory
formats (the faster counts). The nets mirror `nr_jax.models` layer for layer — bias-free 3x3/1x1
convolutions, BatchNorm, ReLU, 2x2 max-pools (VGG), CIFAR-stem ResNets with 1x1 projection
shortcuts, global average pooling and a linear classifier — trained as nr_jax's default step
trains them: SGD with momentum 0.9, weight decay 1e-4, cross-entropy, BatchNorm in train mode.
Plain PyTorch has no L1 pressure, liveness or masks, so it stands against both nr_jax steps.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch
from torch import nn

VGG_CFGS = {
    "vgg_fmnist": (16, 16, "M", 32, 32, "M", 64, 64),
    "vgg19_cifar": (64, 64, 128, 128, "M", 256, 256, 256, 256, 512, 512, "M") + (512,) * 6,
}
RESNETS = {  # blocks per stage, planes, block kind
    "resnet_fmnist": (2, (8, 16, 32), "bottleneck"),
    "resnet20_cifar": (3, (16, 32, 64), "basic"),
}
INPUTS = {"vgg_fmnist": (1, 28), "resnet_fmnist": (1, 28), "resnet20_cifar": (3, 32)}


def _unit(c_in: int, c_out: int, k: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False), nn.BatchNorm2d(c_out)]
    return nn.Sequential(*layers, *([nn.ReLU(inplace=True)] if relu else []))


class VGG(nn.Module):
    def __init__(self, cfg: tuple, c_in: int, classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers.append(_unit(c_in, v, 3))
                c_in = v
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


class Block(nn.Module):
    def __init__(self, c_in: int, planes: int, stride: int, kind: str):
        super().__init__()
        if kind == "basic":
            c_out = planes
            self.body = nn.Sequential(
                _unit(c_in, planes, 3, stride), _unit(planes, c_out, 3, relu=False)
            )
        else:
            c_out = 4 * planes
            self.body = nn.Sequential(
                _unit(c_in, planes, 1),
                _unit(planes, planes, 3, stride),
                _unit(planes, c_out, 1, relu=False),
            )
        project = stride != 1 or c_in != c_out
        self.shortcut = _unit(c_in, c_out, 1, stride, relu=False) if project else nn.Identity()
        self.c_out = c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, n: int, planes: tuple, kind: str, c_in: int, classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [_unit(c_in, planes[0], 3)]
        width = planes[0]
        for s, p in enumerate(planes):
            for b in range(n):
                block = Block(width, p, 2 if s > 0 and b == 0 else 1, kind)
                layers.append(block)
                width = block.c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def build(name: str) -> tuple[nn.Module, tuple[int, int]]:
    channels, hw = INPUTS.get(name, (3, 32))
    if name in VGG_CFGS:
        return VGG(VGG_CFGS[name], channels), (channels, hw)
    if name in RESNETS:
        return ResNet(*RESNETS[name], channels), (channels, hw)
    raise ValueError(
        f"no PyTorch reference for {name!r}; known: {sorted(VGG_CFGS) + sorted(RESNETS)}"
    )


def time_family(name: str, batch: int, reps: int, steps: int, channels_last: bool) -> float:
    """Median seconds per train step."""
    torch.manual_seed(0)
    model, (c, hw) = build(name)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, c, hw, hw).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    for _ in range(2):
        step()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - t) / steps)
    return statistics.median(times)


def main(spec: dict) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    out: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(), "families": {}}
    for name, batch in spec["families"]:
        r = {
            fmt: time_family(name, batch, spec["reps"], spec["steps"], fmt == "channels_last")
            for fmt in ("nchw", "channels_last")
        }
        best = min(r, key=r.get)
        out["families"][name] = {
            "batch": batch,
            "ms_per_step": {k: 1e3 * v for k, v in r.items()},
            "best_format": best,
            "images_per_s": batch / r[best],
        }
    return out


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
