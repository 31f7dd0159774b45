"""Compiled-HLO fingerprint of the benchmark's timed steps, runnable at 8ceb7e7 and at HEAD."""

import collections
import json
import re
import sys

from absl import flags

try:
    import experiments.benchmark.__main__  # noqa
    from experiments.benchmark.common import force_rejuvenation, make_trainer, synthetic_batch

    def trainer(model, scheme="removed", mode="auto"):
        return make_trainer(model, True, scheme, "fashion_mnist", None, conv_weight_grad=mode)
except ImportError:
    import experiments.benchmark as b
    from nr_jax import layers as nr_layers

    make_trainer, synthetic_batch, force_rejuvenation = b._trainer, b._batch, b._force_rejuvenation

    def trainer(model, scheme="removed", mode="auto"):
        nr_layers.set_conv_weight_grad(mode)
        return b._trainer(model, True, scheme, "fashion_mnist", None)


flags.FLAGS(["x"])
out = {}
batch = synthetic_batch(64, 28, 1)
for model in ("vgg_fmnist", "resnet_fmnist"):
    for name, scheme, mode, post in [
        ("search", "removed", "auto", False),
        ("search_xla", "removed", "xla", False),
        ("post_removed", "removed", "auto", True),
        ("post_attention", "attention", "auto", True),
        ("post_dense", "dense", "auto", True),
    ]:
        t, s = trainer(model, scheme, mode)
        if post:
            s, _ = force_rejuvenation(t, s, 0.5)
        c = t.steps.train.lower(s, batch).compile()
        txt = c.as_text()
        txt = re.sub(r", metadata=\{[^}]*\}", "", txt)
        ops = collections.Counter(re.findall(r"= [a-z0-9\[\],{}: ]*? ([a-z\-]+)\(", txt))
        cost = c.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        conv_shapes = sorted(re.findall(r"(f32\[[0-9,]*\]\{[0-9,]*\}) convolution", txt))
        out[f"{model}/{name}"] = {
            "flops": cost.get("flops"),
            "bytes": cost.get("bytes accessed"),
            "ops": dict(ops),
            "convs": len(conv_shapes),
            "conv_shapes": conv_shapes,
            "fusions": txt.count(" fusion("),
        }
with open(sys.argv[1], "w") as f:
    json.dump(out, f, indent=1, sort_keys=True)
print("ok")
