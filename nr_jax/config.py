"""The run configuration: every field with its default (`base_config`) and its validation.

Experiment configs (`experiments/configs/*.py`) start from `base_config()` and override fields.
`validate` refuses a bad configuration before any compute, with one message naming the field, the
value and what is allowed.
"""

from __future__ import annotations

import difflib
from typing import Any

import ml_collections


class ConfigError(ValueError):
    """A configuration field has a value that is not allowed."""


def base_config() -> ml_collections.ConfigDict:
    """All fields of a run, with defaults (a short Fashion-MNIST NR run)."""
    c = ml_collections.ConfigDict()
    c.model = "vgg_fmnist"
    c.model_kwargs = ml_collections.ConfigDict()  # extra keyword arguments of the model factory
    c.dataset = "fashion_mnist"
    c.data_dir = ""  # tfds data dir ("" = default: $NR_JAX_DATA_DIR or ~/tensorflow_datasets)
    # validation images held out of the training split by a fixed permutation (independent of
    # seed and train_limit; nr_jax.data.run.validation_split), evaluated every epoch; with a
    # validation split the test set is evaluated only at the final and best-validation epochs
    c.val_size = 0  # 0 = no validation split (test every epoch)
    c.train_limit = 0  # use the first N training examples after the validation split (0 = all)
    c.test_limit = 0
    c.augment = False
    c.seed = 0
    # "improved": survivors' moments kept, bias once; "official": the official code's choices
    # (fresh optimiser after rejuvenation, classifier bias in both heads). README lists each.
    c.preset = "improved"

    c.batch_size = 64
    c.eval_batch_size = 500
    c.epochs = 10  # E: epochs after the search (the official schedule length)
    c.optimizer = "sgd"  # "sgd" (official nr.SGD semantics) or "adamw"
    c.lr = 0.1
    c.momentum = 0.9
    c.weight_decay = 1e-4
    c.lr_milestones = (5, 8)  # epochs (since the search ended) where the LR is multiplied by
    c.lr_gamma = 0.1  # lr_gamma

    c.nr = ml_collections.ConfigDict()
    c.nr.enabled = True  # False: a plain baseline (no L1, no rejuvenation)
    c.nr.target = 0.25  # utilisation target T_r (CIFAR 0.25, ImageNet 0.5)
    c.nr.lam = 1.5e-4  # sparsity coefficient λ (start value if adaptive)
    c.nr.adaptive = False  # the official ImageNet controller: λ += lam_step when U fell < thres
    c.nr.lam_step = 5e-5
    c.nr.lam_threshold = 0.01
    c.nr.lam_after = 0.0  # λ after rejuvenation (official: 0)
    # when λ changes during the search: "epoch" (the official rules: fixed, or `adaptive`, once
    # per epoch); "steps" (beyond the paper, nr_jax.controller.steer_lambda): every
    # `lam_control_every` steps λ *= exp(lam_control_gain * (U - U_goal) / (1 - target)), U_goal
    # falling linearly from 1 to the target over `lam_control_epochs` epochs, λ kept within
    # [lam / lam_control_range, lam * lam_control_range] (the upper bound guards against collapse)
    c.nr.lam_control = "epoch"
    c.nr.lam_control_every = 50
    c.nr.lam_control_epochs = 6
    c.nr.lam_control_gain = 1.0
    c.nr.lam_control_range = 4.0
    # at the decision: True = rejuvenate (NR); False = the Network Slimming control
    # (nr_jax.slimming.prune: dead channels dropped, nothing widened or added, one classifier)
    c.nr.regrow = True
    # repeated rejuvenation (beyond the paper, issue 16): `cycles` rejuvenations; after each but
    # the last, `cycle_epochs` epochs of training, then the network is merged back into an
    # ordinary one (nr_jax.merge), λ comes back on and the search starts again; the LR schedule
    # restarts at each rejuvenation and the last cycle trains the full `epochs`
    c.nr.cycles = 1
    c.nr.cycle_epochs = 0
    # during the search, also evaluate the validation split with BN statistics recomputed over
    # this many training batches (metric val_bn_accuracy_sum; the eval-lag check; 0 = off)
    c.nr.recompute_bn_batches = 0
    c.nr.scheme = "removed"  # old/new neurons: "removed" (cross connections), "attention(4)"
    c.nr.resource = "params"  # budget measure: "params" or "flops"
    # liveness criterion (nr_jax.criteria, issue 16): "auto" (nr_jax.criteria.suggest: "bn" for
    # BatchNorm networks, the official rule; "norm" for GroupNorm / LayerNorm; "outgoing"
    # without a scale), "bn", "norm" (any normalisation's scale), "outgoing" (‖outgoing
    # weights‖₂) or "dormancy" (ReDo: mean |activation| over `activity_images` images / the
    # layer's mean, dead at or below `dormancy_tau`); resolved by nr_jax.run_liveness
    c.nr.criterion = "auto"
    # sparsity pressure (nr_jax.sparsity.resolve): "auto" (suggest's: "l1" with a scale, else
    # "group_lasso"), "l1" (L1 on the normalisation scales), "group_lasso" (on each channel's
    # outgoing weights) or "none"; λ is `lam` whichever it is
    c.nr.pressure = "auto"
    c.nr.dormancy_tau = 0.1  # ReDo's τ of the "dormancy" criterion (nr_jax.criteria.Dormancy)
    # "dormancy" at the epoch end: the activity over the first this many training images
    # (evaluation preprocessing; a fixed batch); during an epoch each training batch's own
    c.nr.activity_images = 512
    c.nr.threshold = 1e-2  # channel live iff |γ| >= threshold * max |γ| of its unit
    c.nr.dead_threshold = 1e-3  # unit all-dead iff max |γ| < dead_threshold
    c.nr.max_search_epochs = 30  # search epochs before giving up on the target
    c.nr.on_search_timeout = "rejuvenate"  # "rejuvenate" (at the utilisation reached) or "stop"
    # width rule: "auto" (improved preset: "round8", official: "sqrt"), "sqrt" (D = floor(L*r)),
    # "integer" (D = L*int(r), CIFAR DenseNet), "round8"/"round16" (multiples, budget within 1%)
    c.nr.allocation = "auto"
    c.nr.min_width = 1  # every unit keeps at least this many channels
    c.nr.new_gamma = 0.5  # BN γ of new channels
    c.nr.rescale_target = 0.0  # neural rescaling target t after rejuvenation (0 = off; paper 0.5)
    c.nr.compress_only = False  # stop right after rejuvenation (ImageNet two-step flow, step 1)

    c.compute_dtype = "float32"  # "bfloat16": mixed precision (float32 params and BN statistics)
    # conv kernel gradient, the models' `conv_weight_grad` field (nr_jax.layers.NRConv): "auto" =
    # shifted matmuls on CPU, XLA's elsewhere; "matmul"; "xla"
    c.conv_weight_grad = "auto"
    c.compilation_cache_dir = ""  # persistent XLA compilation cache ("" = off)
    c.data_parallel = True  # shard the batch over all devices (jax.sharding Mesh), state replicated
    # several processes (hosts) form one job: jax.distributed.initialize() before anything else
    # (nr_jax.multihost.start); a field left unset ("" / 0 / -1) is detected by jax (TPU pods,
    # SLURM, Open MPI). On CPU the processes' collectives use jax_cpu_collectives_implementation
    # (gloo, jax's default).
    c.distributed = False
    c.coordinator_address = ""  # "host:port" of process 0's coordinator service ("" = detected)
    c.coordinator_bind_address = ""  # where process 0's service listens ("" = [::]:port, all)
    c.num_processes = 0  # processes in the job (0 = detected)
    c.process_id = -1  # this process's id, 0 .. num_processes - 1 (-1 = detected)
    # a process silent this long (killed, its host lost) is declared dead: the others stop
    c.heartbeat_timeout_seconds = 100  # (exit status non-zero; jax's default)
    # a process at its end waits this long for the others; past it every process stops, so one
    # that failed alone (the others blocked in a collective) stops the job within this time
    c.shutdown_timeout_seconds = 120  # (jax's default: 300)
    c.log_every_steps = 50
    c.progress = True  # progress bar
    c.tensorboard = True
    c.plots = True  # PNG plots in the run directory at the end
    c.checkpoint = True
    c.checkpoint_every_steps = (
        0  # also checkpoint mid-epoch every this many steps (0 = epochs only)
    )
    c.keep_checkpoints = 3
    return c


def refuse(field: str, value: Any, allowed: str) -> None:
    """Raises the one-line `ConfigError` for `config.<field> = value` (what is allowed instead).

    Used here and by the registries that resolve names (models, datasets, schemes, kernel-gradient
    modes, allocation rules), so every refusal reads the same.
    """
    raise ConfigError(f"config.{field} = {value!r} is not allowed: {allowed}")


def check_field(config: ml_collections.ConfigDict, path: str) -> None:
    """Raises the one-line `ConfigError` when `config.<path>` names no field of `config`.

    The message names the nearest valid field (`difflib.get_close_matches`), e.g.
    `config.nr.lamda is not a field: did you mean config.nr.lam?`, or lists the fields there.

    Args:
      config: the configuration whose fields are valid (e.g. `base_config()`).
      path: a dotted field path without the leading `config.`, e.g. `"nr.lam"`.
    """
    node, walked = config, "config"
    for part in path.split("."):
        group = isinstance(node, ml_collections.ConfigDict)
        fields = list(node.keys()) if group else []
        if part not in fields:
            near = difflib.get_close_matches(part, fields, n=1)
            hint = f"the fields of {walked} are {sorted(fields)}"
            if near:
                hint = f"did you mean {walked}.{near[0]}?"
            elif not group:
                hint = f"{walked} is a value, not a group of fields"
            raise ConfigError(f"config.{path} is not a field: {hint}")
        node, walked = node[part], f"{walked}.{part}"


def _field_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Dotted paths of the leaves of `config` (the free-form `model_kwargs` group excluded)."""
    paths = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict) and path != "model_kwargs":
            paths += _field_paths(value, f"{path}.")
        elif path != "model_kwargs":
            paths.append(path)
    return paths


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises `ConfigError` naming the first bad field; returns None when all is well.

    Checks that every field is one of `base_config()`'s (`check_field`: the nearest valid name
    for a misspelt one; `model_kwargs` is free-form, checked by `nr_jax.models.get`), then the
    values. Names are checked where their registry resolves them, with the same one-line message
    (`refuse`): `config.model`, `config.nr.scheme` and `config.conv_weight_grad` by
    `nr_jax.models.get`, `config.dataset` by `nr_jax.data.dataset_info`, `config.nr.allocation` by
    `nr_jax.allocation.resolve`, `config.nr.criterion` and `config.nr.pressure` by
    `nr_jax.run_liveness` (which also refuses a criterion, pressure or switch the model's
    normalisation cannot serve); `nr_jax.train.Trainer` resolves all of them before any compute.
    """
    missing = [k for k in base_config() if k not in config]
    if missing:
        raise ConfigError(
            f"config lacks the fields {missing}; start from nr_jax.config.base_config()"
        )
    base = base_config()
    for path in _field_paths(config):
        check_field(base, path)  # a misspelt field would be silently ignored otherwise
    for field in ("batch_size", "eval_batch_size", "epochs", "log_every_steps", "keep_checkpoints"):
        value = config[field]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            refuse(field, value, "an integer >= 1")
    _validate_distributed(config)
    import jax

    # the devices of a job that has not started yet are unknown (and asking jax for them now
    # would start its backend before jax.distributed): train_and_evaluate checks after the start
    job_pending = config.distributed and not jax.distributed.is_initialized()
    if config.data_parallel and not job_pending:
        n = jax.device_count()
        for field in ("batch_size", "eval_batch_size"):
            if config[field] % n:
                refuse(
                    field, config[field], f"a multiple of the {n} devices (or data_parallel=False)"
                )
    for field in ("val_size", "train_limit", "test_limit", "checkpoint_every_steps"):
        if not isinstance(config[field], int) or config[field] < 0:
            refuse(field, config[field], "an integer >= 0 (0 = all examples / off)")
    if config.preset not in ("improved", "official"):
        refuse("preset", config.preset, "'improved' or 'official'")
    if config.compute_dtype not in ("float32", "bfloat16"):
        refuse("compute_dtype", config.compute_dtype, "'float32' or 'bfloat16'")
    if config.optimizer not in ("sgd", "adamw"):
        refuse("optimizer", config.optimizer, "'sgd' or 'adamw'")
    for field in ("lr", "weight_decay"):
        if not config[field] >= 0:
            refuse(field, config[field], "a number >= 0")
    if not 0 <= config.momentum < 1:
        refuse("momentum", config.momentum, "a number in [0, 1)")
    if not 0 < config.lr_gamma <= 1:
        refuse("lr_gamma", config.lr_gamma, "a number in (0, 1]")
    ms = tuple(config.lr_milestones)
    if any(not isinstance(m, int) or m < 0 for m in ms) or list(ms) != sorted(ms):
        refuse("lr_milestones", ms, "increasing non-negative integers (epochs)")
    nr = config.nr
    if nr.enabled and not 0 < nr.target < 1:
        refuse("nr.target", nr.target, "a utilisation in (0, 1) while nr.enabled")
    for field in ("lam", "lam_step", "lam_after"):
        if not nr[field] >= 0:
            refuse(f"nr.{field}", nr[field], "a number >= 0")
    if nr.resource not in ("params", "flops"):
        refuse("nr.resource", nr.resource, "'params' or 'flops'")
    if not 0 < nr.threshold < 1:
        refuse("nr.threshold", nr.threshold, "a relative threshold in (0, 1)")
    if not nr.dead_threshold >= 0:
        refuse("nr.dead_threshold", nr.dead_threshold, "a number >= 0")
    if not isinstance(nr.max_search_epochs, int) or nr.max_search_epochs < 1:
        refuse("nr.max_search_epochs", nr.max_search_epochs, "an integer >= 1")
    if nr.on_search_timeout not in ("rejuvenate", "stop"):
        refuse("nr.on_search_timeout", nr.on_search_timeout, "'rejuvenate' or 'stop'")
    if not isinstance(nr.min_width, int) or nr.min_width < 1:
        refuse("nr.min_width", nr.min_width, "an integer >= 1")
    if not nr.rescale_target >= 0:
        refuse("nr.rescale_target", nr.rescale_target, "a number >= 0 (0 = no rescaling)")
    if not nr.new_gamma > 0:
        refuse("nr.new_gamma", nr.new_gamma, "a number > 0")
    if nr.lam_control not in ("epoch", "steps"):
        refuse("nr.lam_control", nr.lam_control, "'epoch' (the official rules) or 'steps'")
    if nr.lam_control == "steps":
        if nr.adaptive:
            refuse("nr.adaptive", nr.adaptive, "False with nr.lam_control = 'steps' (one rule)")
        for field in ("lam_control_every", "lam_control_epochs"):
            if not isinstance(nr[field], int) or isinstance(nr[field], bool) or nr[field] < 1:
                refuse(f"nr.{field}", nr[field], "an integer >= 1")
        if not nr.lam_control_gain > 0:
            refuse("nr.lam_control_gain", nr.lam_control_gain, "a number > 0")
        if not nr.lam_control_range >= 1:
            refuse("nr.lam_control_range", nr.lam_control_range, "a number >= 1")
        if not nr.lam > 0:
            refuse("nr.lam", nr.lam, "a number > 0 with nr.lam_control = 'steps'")
    if not isinstance(nr.regrow, bool):
        refuse("nr.regrow", nr.regrow, "True (rejuvenate) or False (the slimming control)")
    if not nr.regrow and nr.rescale_target > 0:
        refuse("nr.rescale_target", nr.rescale_target, "0 with nr.regrow = False (no new channels)")
    if not isinstance(nr.cycles, int) or isinstance(nr.cycles, bool) or nr.cycles < 1:
        refuse("nr.cycles", nr.cycles, "an integer >= 1 (rejuvenations)")
    if nr.cycles > 1:
        ce = nr.cycle_epochs
        if not isinstance(ce, int) or isinstance(ce, bool) or ce < 1:
            refuse("nr.cycle_epochs", ce, "an integer >= 1 with nr.cycles > 1")
        if nr.scheme != "removed":
            refuse("nr.scheme", nr.scheme, "'removed' with nr.cycles > 1 (only it merges)")
        if not nr.regrow or nr.compress_only or nr.rescale_target > 0:
            refuse("nr.cycles", nr.cycles, "1 with nr.regrow = False, compress_only or rescaling")
    for field in ("criterion", "pressure"):
        if not isinstance(nr[field], str):
            refuse(f"nr.{field}", nr[field], "a name ('auto' = the model's suggestion)")
    if not nr.dormancy_tau >= 0:
        refuse("nr.dormancy_tau", nr.dormancy_tau, "a number >= 0 (ReDo's τ)")
    n_act = nr.activity_images
    if not isinstance(n_act, int) or isinstance(n_act, bool) or n_act < 1:
        refuse("nr.activity_images", n_act, "an integer >= 1 (training images)")
    b = nr.recompute_bn_batches
    if not isinstance(b, int) or isinstance(b, bool) or b < 0:
        refuse("nr.recompute_bn_batches", b, "an integer >= 0 (0 = off)")


def _validate_distributed(config: ml_collections.ConfigDict) -> None:
    """The multi-process fields: types and ranges, and unset unless `config.distributed`."""
    if not isinstance(config.distributed, bool):
        refuse("distributed", config.distributed, "True or False")
    for field in ("coordinator_address", "coordinator_bind_address"):
        address = config[field]
        host, _, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
        if address != "" and not (host and port.isdigit() and 0 < int(port) < 65536):
            refuse(field, address, "'host:port' (port 1-65535) or '' (detected)")
    n, i = config.num_processes, config.process_id
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        refuse("num_processes", n, "an integer >= 1, or 0 (detected)")
    if not isinstance(i, int) or isinstance(i, bool) or i < -1 or (n and i >= n):
        refuse("process_id", i, f"an integer in [0, {n or 'num_processes'}), or -1 (detected)")
    for field in ("heartbeat_timeout_seconds", "shutdown_timeout_seconds"):
        t = config[field]
        if not isinstance(t, int) or isinstance(t, bool) or t < 1:
            refuse(field, t, "an integer >= 1 (seconds)")
    if not config.distributed:
        unset = {"coordinator_address": "", "coordinator_bind_address": "", "num_processes": 0}
        for field, value in {**unset, "process_id": -1}.items():
            if config[field] != value:
                refuse(field, config[field], f"{value!r} unless config.distributed = True")
