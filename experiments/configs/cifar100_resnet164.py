"""CIFAR100 ResNet-164 with Neural Rejuvenation: the official README row (method.md 5.2).

Official command: `cifar.py -a resnet --depth 110 --epochs 300 --schedule 150 225 --gamma 0.1 --wd 1e-4
--nr-target 0.25 --nr-sparsity 0.00025` (batch 64, lr 0.1, momentum 0.9).
Commands here (variants: nr, baseline, quick):
    python -m experiments.main --config experiments/configs/cifar100_resnet164.py --workdir runs/cifar100_resnet164
    python -m experiments.main --config experiments/configs/cifar100_resnet164.py:baseline \
        --workdir runs/cifar100_resnet164_baseline

Should reach (official README): 23.84% test error with 0.92M effective parameters, after
300 + k epochs on a GPU. Needs CIFAR100 (see README, "Data").
"""

from experiments.configs.common import cifar


def get_config(variant: str = "nr"):
    return cifar("cifar100", "resnet164_cifar", 0.00025, variant)
