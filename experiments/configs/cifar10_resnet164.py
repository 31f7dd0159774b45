"""CIFAR10 ResNet-164 with Neural Rejuvenation: the official README row (method.md 5.2).

Official command: `cifar.py -a resnet --depth 110 --epochs 300 --schedule 150 225 --gamma 0.1 --wd 1e-4
--nr-target 0.25 --nr-sparsity 0.00015` (batch 64, lr 0.1, momentum 0.9).
Commands here (variants: nr, baseline, quick):
    python -m experiments.main --config experiments/configs/cifar10_resnet164.py --workdir runs/cifar10_resnet164
    python -m experiments.main --config experiments/configs/cifar10_resnet164.py:baseline \
        --workdir runs/cifar10_resnet164_baseline

Should reach (official README): 5.13% test error with 0.88M effective parameters, after
300 + k epochs on a GPU. Needs CIFAR10 (see README, "Data").
"""

from experiments.configs.common import cifar


def get_config(variant: str = "nr"):
    return cifar("cifar10", "resnet164_cifar", 0.00015, variant)
