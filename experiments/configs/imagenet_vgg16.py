"""ImageNet VGG-16 (vgg16_nr) with Neural Rejuvenation: the official README row (method.md 5.2).

Official command: `imagenet.py -a vgg16_nr --epochs 100 --schedule 30 60 90 --gamma 0.1
--nr-target 0.5 --train-batch 128` (adaptive λ from 0, +5e-5 when U fell by < 0.01 in an epoch,
cross-attention).
Commands here (variants: nr, baseline, quick):
    python -m experiments.main --config experiments/configs/imagenet_vgg16.py --workdir runs/imagenet_vgg16
    python -m experiments.main --config experiments/configs/imagenet_vgg16.py:baseline \
        --workdir runs/imagenet_vgg16_baseline

Should reach (official README): top-1 / top-5 error 23.11 / 6.69%, 36.4M parameters, 23.5G FLOPs,
after 100 + k epochs on GPUs. Needs ImageNet prepared for tfds in array_record (README, "Data").
"""

from experiments.configs.common import imagenet


def get_config(variant: str = "nr"):
    return imagenet("vgg16_imagenet", variant)
