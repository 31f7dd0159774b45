"""ImageNet DenseNet-121 with Neural Rejuvenation: the official README row (method.md 5.2).

Official command: `imagenet.py -a densenet121_nr --epochs 100 --schedule 30 60 90 --gamma 0.1
--nr-target 0.5 --train-batch 128` (adaptive λ from 0, +5e-5 when U fell by < 0.01 in an epoch,
cross-attention).
Commands here (variants: nr, baseline, quick):
    python -m experiments.main --config experiments/configs/imagenet_densenet121.py --workdir runs/imagenet_densenet121
    python -m experiments.main --config experiments/configs/imagenet_densenet121.py:baseline \
        --workdir runs/imagenet_densenet121_baseline

Should reach (official README): top-1 / top-5 error 24.50 / 7.49%, 8.22M parameters, 3.13G FLOPs,
after 100 + k epochs on GPUs. Needs ImageNet prepared for tfds in array_record (README, "Data").
"""

from experiments.configs.common import imagenet


def get_config(variant: str = "nr"):
    return imagenet("densenet121", variant)
