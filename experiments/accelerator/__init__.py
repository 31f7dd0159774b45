"""The accelerator check (issue 15 item 3): one command on a GPU machine, under 5 minutes.

    python -m experiments.accelerator_bundle --dest .accel        # here: data subset + wheels
    python -m experiments.accelerator_check --out DIR             # there (the bundle prints the
                                                                  # exact `run` command line)
    python -m experiments.accelerator_check --out DIR --cpu_smoke # the reduced CPU mode (tests)

Sections, in priority order, each with its own deadline (`settings.GPU.budgets`); the JSON
(`DIR/accelerator_check.json`) and the markdown table (`DIR/accelerator_check.md`) are rewritten
after every section, so a cut-short run still reports what it measured:

1. `tests`: a subset of the project's tests that needs no CPU-only path, by pytest in a subprocess;
2. `compiles`: traces and XLA compilations of the train/eval steps per width configuration, before
   and after a rejuvenation, and none when only values (LR, λ, epoch) change;
3. `throughput`: float32 and bfloat16 train-step images/s and model-FLOP utilisation (XLA's cost
   analysis of the compiled step against the measured bf16 matmul peak of the same device) of
   ResNet-50 at 224 and VGG-19 at 32, synthetic on-device data;
4. `post`: removed-cross and cross-attention step time against dense at the same allocated widths
   (VGG-19 at 32x32, batch 128, U about 0.25 set through γ);
5. `eval_short`: the evaluation issue's short GPU section: the VGG NR run and its epoch-matched
   baseline on a fixed short schedule over a carried Fashion-MNIST subset (`.npz`), accuracy and
   time, compared with a CPU run of the same setting when one is given;
6. `export`: inference time of the compact export against the training form, if `nr_jax.export`
   exists (else skipped: not available).

Modules, one idea each: `requirements` (the packages, checked before anything imports them),
`deadline` (deadlines and the section outcomes), `settings` (the sizes of the GPU and the CPU-smoke
modes), `runner` (sections in order, budgets, slack, the JSON after each), `report` (JSON and
markdown), `fmnist_subset` (the carried `.npz` and its use as the dataset cache), one module per
section (`pytest_subset`, `compiles`, `throughput`, `post_cost`, `eval_short`, `export_timing`),
`driver` (flags, fail-fast checks, the run), and `bundle` (what travels: the subset file, the
wheels and the `run` call, for `experiments.accelerator_bundle`).
"""
