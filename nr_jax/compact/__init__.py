"""Compact export: an NR model as a plain inference network of standard layers.

    net, net_vars = nr_jax.export(model, variables)        # before or after rejuvenation
    logits = net.apply(net_vars, x)                        # = nr_jax.predict(model.apply(...))
    blob = nr_jax.export_inference(net, net_vars, x.shape) # serialised `jax.export`, batch "b"
    y = jax.export.deserialize(blob).call(x)               # any batch size, weights inside

`export(model, variables)` returns an `Exported(model, variables)` pair: an `ExportedNet` and its
variables, which hold only `{"params"}`, with the network in its eval-mode form. Every unit of
`nr_jax.layers` exports, convolutions (`NRConv`) and dense units (`NRDense`, which become
`nn.Dense`) alike, with any normalisation:

* BatchNorm is folded into its convolution, which gets a bias: W' = W·s, b' = β - μ·s with
  s = γ / sqrt(σ² + 1e-5), per output channel (running statistics, as `model.apply(...,
  train=False)`); a unit without normalisation (`norm=None`) keeps its own bias: conv + bias,
  then the activation;
* GroupNorm and LayerNorm depend on each input and cannot be folded: the convolution stays
  without bias and a `GroupNormalize` follows (`Normalized`), over exactly the channel groups
  of the training form (the regrouped layout after rejuvenation, `nr_jax.norms.regroup`). A
  masked channel is removed from the outputs, but where it shares a group with a kept channel
  the convolution still computes it: the training form masks after the normalisation, so its
  response counts in the group's statistics;
* there are no masks: masked-out channels are removed, and so are their consumers' input
  channels (the kernel rows that read them); a unit whose every live input is gone becomes its
  bias (`Bias`: b', or β under GroupNorm / LayerNorm), a unit whose every output is masked
  becomes zeros, without parameters;
* there are no zero blocks: a split unit of the ``"removed"`` scheme (method.md 4.2) becomes one
  `nn.Conv` per block it uses, on channel slices (`BlockConv`: old->old and new->new, or one
  convolution where the unit has no new inputs); a split unit of the ``"attention"`` scheme keeps
  its four blocks (the cross blocks are trained) and its gate, in `CrossAttention`, which also
  keeps the BN scale per channel, because the gate 2σ(·) reads the pre-BN response;
* the classifier is global average pooling and one `nn.Dense`: after rejuvenation its two heads
  become their sum, the prediction (`nr_jax.predict`, method.md 4.3), the bias counted twice if
  the model says so (`bias_in_both_heads`, method.md 7.6).

Its parameters are the effective conv weights (the blocks actually computed, between live
channels), one bias per live output channel, and the classifier's live columns and bias; plus,
per unit kind:

* a gated cross-attention unit with BatchNorm: its BN scale per live output channel;
* a GroupNorm / LayerNorm unit: its scale γ per live output channel (β is the bias), and the
  weights of the masked channels it computes for its groups' statistics (none unless a unit is
  masked in part: training masks whole units); one without live inputs is its β alone.

Modules: `modules` (the plain Flax building blocks), `network` (`ExportedUnit`, `ExportedNet`),
`channels` (which channels are kept), `folding` (one unit's parameters), `conversion`
(`export`), `serialised` (`export_inference`: the jitted function, weights inside, with a
symbolic batch, `jax.export.symbolic_shape("b, H, W, C")`).
"""

from nr_jax.compact.conversion import export
from nr_jax.compact.folding import BN_EPSILON
from nr_jax.compact.modules import Bias, BlockConv, CrossAttention, GroupNormalize, Normalized
from nr_jax.compact.network import Exported, ExportedNet, ExportedUnit, GroupLayout
from nr_jax.compact.serialised import export_inference

__all__ = [
    "BN_EPSILON",
    "Bias",
    "BlockConv",
    "CrossAttention",
    "Exported",
    "ExportedNet",
    "ExportedUnit",
    "GroupLayout",
    "GroupNormalize",
    "Normalized",
    "export",
    "export_inference",
]
