"""Performance figures of nr_jax, measured side by side in one process (medians of interleaved
repetitions). Writes `benchmark.json` and `benchmark.md` into --out.

    python -m experiments.benchmark --out runs/benchmark            # quick CPU setting
    python -m experiments.benchmark --out runs/benchmark --paper_scale  # + VGG-19 at CIFAR size
    python -m experiments.benchmark --out runs/benchmark --full     # more repetitions, all of it

1. watching overhead: the NR train step (L1 transform + in-jit liveness/utilisation + masks)
   against the same model without NR, and against a plain Flax model of the same shapes;
2. compilations of the train/eval steps in a short run with one rejuvenation;
3. rejuvenation latency (variables + optimiser-state surgery + new graph) of full-size ResNet-50
   and DenseNet-121, no compilation involved;
4. post-rejuvenation cost: step time of the rejuvenated network with cross connections removed
   (two convolutions) and with cross-attention, against the dense network of the same allocated
   widths;
5. efficiency: achieved FLOP/s of the train step (XLA cost analysis) against a measured matmul peak
   (the best repetition of n x n matmuls, n 1024 and 2048), and the same step with XLA's own
   convolution kernel gradient instead of nr_jax's shifted matmuls (the CPU default), interleaved;
6. input pipeline throughput (Fashion-MNIST in-memory arrays) against the train step's consumption;
7. width granularity: train-step time per FLOP of a conv stack over a sweep of widths, and for each
   granularity g in {1, 2, 4, 8, 16} the expected step time when a target width is rounded up to a
   multiple of g (the measurement behind `rounded_allocation`);
8. image pipelines on fabricated files in their real formats: CIFAR-10 (python-pickle archive ->
   tfds array_record -> in-memory crop + flip + normalise) and ImageNet (tfds array_record of JPEGs
   -> decode + RandomResizedCrop 224 + flip, and Resize 256 + CentreCrop 224), with and without
   `prefetch`, against the train step's consumption (resnet_tiny_cifar; resnet18 at 224).

`--sections granularity,pipeline_images` runs only the named sections. One module per section
(`watching`, `compilations`, `latency`, `post`, `efficiency` with the `pytorch` driver,
`pipeline`, `granularity`, `images`), `common` (flags, timing helpers), `report` (the writer).
"""
