"""Tests for nr_jax.checkpoint (orbax-backed, shape-flexible checkpoints)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nr_jax.checkpoint import Checkpointer, CheckpointError, CheckpointNotFoundError

REPO_ROOT = Path(__file__).resolve().parents[1]
TMP_SUFFIX = ".orbax-checkpoint-tmp"


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: dict
    opt_state: tuple
    masked_opt_state: tuple
    adamw_state: tuple
    rng: jax.Array
    extra: dict
    apply_fn: str = flax.struct.field(pytree_node=False, default="model")


def _params(width: int, seed: int = 0) -> dict:
    # numpy-generated values: eager jax ops would compile once per new width.
    rng = np.random.default_rng(seed)
    return {
        "Conv_0": {
            "kernel": jnp.asarray(rng.standard_normal((3, 3, 3, width), np.float32)),
            "bias": jnp.asarray(np.arange(width, dtype=np.float32)),
        },
        "Dense_0": {
            "kernel": jnp.asarray(rng.standard_normal((width, 10), np.float32)),
            "bias": jnp.asarray(np.zeros((10,), np.float32)),
        },
    }


def _fill(tree, seed: int):
    """Replaces every array leaf by distinct non-zero values (a "trained" opt state)."""
    rng = np.random.default_rng(seed + 100)

    def fill(x):
        dtype = np.dtype(x.dtype)
        return jnp.asarray(rng.integers(1, 100, size=x.shape).astype(dtype))

    return jax.tree.map(fill, tree)


def _make_state(width: int, seed: int = 0) -> TrainState:
    params = _params(width, seed)
    chain = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))
    masked = optax.masked(
        optax.sgd(0.1, momentum=0.9), lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
    )
    adamw = optax.adamw(1e-3)
    init = jax.eval_shape  # abstract init, then filled with numpy values: no compilation
    return TrainState(
        step=jnp.asarray(7 + seed, jnp.int32),
        params=params,
        opt_state=_fill(init(chain.init, params), seed),
        masked_opt_state=_fill(init(masked.init, params), seed + 1),
        adamw_state=_fill(init(adamw.init, params), seed + 2),
        rng=jax.random.key(seed),
        extra={
            "keys": jax.random.split(jax.random.key(seed + 1), 3),
            "np_counts": np.arange(width, dtype=np.uint32),
            "np_scalar": np.float32(2.5),
            "zero_d": jnp.asarray(3, jnp.uint32),
            "empty": (),
            "none": None,
        },
    )


def _abstract_fn(meta: dict) -> TrainState:
    return jax.eval_shape(lambda: _make_state(meta["width"], meta["seed"]))


META = {
    "width": 4,
    "seed": 0,
    "nested": {"lr": 0.1, "tiny": 1e-300, "big": 2**62, "neg": -3, "flag": True},
    "list": [1, 2.5, "three", None, False, [{"a": []}], {}],
    "unicode": "Zürich ✓",
    "none": None,
}


def _save_steps(ckpt: Checkpointer, steps_widths: list[tuple[int, int]]) -> None:
    for step, width in steps_widths:
        ckpt.save(step, _make_state(width, seed=step), {"width": width, "seed": step})


def _has_warning(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(r.levelno == logging.WARNING and text in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- #
def test_round_trip_nested_state(tmp_path: Path) -> None:
    state = _make_state(4)
    # Sanity: the tree really contains MaskedNode leaves and empty tuples.
    treedef_str = str(jax.tree_util.tree_structure(state))
    assert "MaskedNode" in treedef_str
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(3, state, META)
        restored, meta, step = ckpt.restore(_abstract_fn_meta_width(META))

    assert step == 3
    assert meta == META
    assert isinstance(restored, TrainState)
    assert restored.apply_fn == "model"
    chex.assert_trees_all_equal_structs(restored, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(restored, state)
    chex.assert_trees_all_equal(restored, state)
    assert jax.dtypes.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(
        jax.random.key_data(restored.extra["keys"]), jax.random.key_data(state.extra["keys"])
    )
    # numpy leaves come back as jax arrays on the default device.
    for leaf in jax.tree.leaves(restored):
        assert isinstance(leaf, jax.Array)
    assert restored.extra["np_counts"].devices() == {jax.devices()[0]}
    # Restored keys are usable.
    jax.random.normal(restored.rng, (2,))


def _abstract_fn_meta_width(meta: dict):
    def fn(m: dict) -> TrainState:
        assert m == meta
        return _abstract_fn(m)

    return fn


def test_meta_round_trip_exact(tmp_path: Path) -> None:
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(0, {"x": jnp.ones(2)}, META)
        got = ckpt.read_meta()
        assert got == META
        assert got == ckpt.read_meta(0)
        # Types survive too (bool stays bool, int stays int, float stays float).
        assert type(got["nested"]["flag"]) is bool
        assert type(got["nested"]["big"]) is int
        assert type(got["list"][1]) is float
        assert got["list"][3] is None
        with pytest.raises(TypeError, match="tuple"):
            ckpt.save(1, {"x": jnp.ones(2)}, {"widths": (1, 2)})
        with pytest.raises(TypeError, match="not a str"):
            ckpt.save(1, {"x": jnp.ones(2)}, {1: "a"})
        assert ckpt.all_steps() == [0]


def test_different_shapes_per_step(tmp_path: Path) -> None:
    with Checkpointer(tmp_path, max_to_keep=5) as ckpt:
        _save_steps(ckpt, [(10, 4), (20, 8)])
        for step, width in [(10, 4), (20, 8)]:
            state, meta, got_step = ckpt.restore(_abstract_fn, step=step)
            assert got_step == step
            assert meta == {"width": width, "seed": step}
            assert state.params["Conv_0"]["kernel"].shape == (3, 3, 3, width)
            chex.assert_trees_all_equal(state, _make_state(width, seed=step))
        state, meta, got_step = ckpt.restore(_abstract_fn)
        assert got_step == 20
        assert state.params["Dense_0"]["kernel"].shape == (8, 10)


def test_max_to_keep_and_latest_step(tmp_path: Path) -> None:
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.all_steps() == []
        for step in range(1, 6):
            ckpt.save(step, {"w": jnp.full((step,), step)}, {"n": step})
            assert ckpt.latest_step() == step
        assert ckpt.all_steps() == [4, 5]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["4", "5"]
        # Saving an older step than the newest is allowed and is always kept.
        ckpt.save(2, {"w": jnp.full((2,), 2)}, {"n": 2})
        assert ckpt.all_steps() == [2, 5]
        # Re-saving an existing step replaces it.
        ckpt.save(5, {"w": jnp.full((1,), 50)}, {"n": 50})
        state, meta, step = ckpt.restore(
            lambda m: {"w": jax.ShapeDtypeStruct((1,), jnp.int32)}, step=5
        )
        assert meta == {"n": 50}
        np.testing.assert_array_equal(state["w"], [50])
    # A fresh Checkpointer sees the same steps.
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        assert ckpt.all_steps() == [2, 5]
        assert ckpt.latest_step() == 5


# When one TensorStore read of a corrupt checkpoint fails, orbax closes its event loop while
# other reads are in flight; their completion callbacks then raise "Event loop is closed" in
# TensorStore threads, which Python reports as unraisable (nothing the caller can catch or
# prevent). Only that report is ignored; the checkpointer's fallback is what these tests check.
ORBAX_CLOSED_LOOP = pytest.mark.filterwarnings(
    r"ignore:(?s)Exception ignored in.*Event loop is closed:pytest.PytestUnraisableExceptionWarning"
)


def _delete_meta(step_dir: Path) -> None:
    (step_dir / "meta" / "metadata").unlink()


def _truncate_meta(step_dir: Path) -> None:
    (step_dir / "meta" / "metadata").write_text('{"width": ')


def _delete_array_data(step_dir: Path) -> None:
    for root in [step_dir / "state" / "ocdbt.process_0" / "d", step_dir / "state" / "d"]:
        for f in root.iterdir():
            f.unlink()


def _truncate_array_data(step_dir: Path) -> None:
    # Small arrays are stored inline in OCDBT b-tree nodes, which orbax also copies
    # into the root database (state/d): truncate both.
    for root in [step_dir / "state" / "ocdbt.process_0" / "d", step_dir / "state" / "d"]:
        for f in root.iterdir():
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)


def _delete_state_metadata(step_dir: Path) -> None:
    (step_dir / "state" / "_METADATA").unlink()


@ORBAX_CLOSED_LOOP
@pytest.mark.parametrize(
    "corrupt",
    [
        _delete_meta,
        _truncate_meta,
        _delete_array_data,
        _truncate_array_data,
        _delete_state_metadata,
    ],
)
def test_corrupt_newest_falls_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, corrupt
) -> None:
    with Checkpointer(tmp_path, max_to_keep=3) as ckpt:
        _save_steps(ckpt, [(1, 4), (2, 6)])
    corrupt(tmp_path / "2")

    caplog.set_level(logging.WARNING, logger="nr_jax.checkpoint")
    with Checkpointer(tmp_path, max_to_keep=3) as ckpt:
        state, meta, step = ckpt.restore(_abstract_fn)
        assert step == 1
        assert meta == {"width": 4, "seed": 1}
        chex.assert_trees_all_equal(state, _make_state(4, seed=1))
        assert _has_warning(caplog, "falling back")
        # An explicitly requested corrupt step does not fall back.
        with pytest.raises(CheckpointError, match="step 2"):
            ckpt.restore(_abstract_fn, step=2)
        if corrupt in (_delete_meta, _truncate_meta, _delete_state_metadata):
            # Cheap metadata validation already rejects it.
            assert ckpt.latest_step() == 1
            assert ckpt.read_meta() == {"width": 4, "seed": 1}
        # The next save of step 2 replaces the corrupt one.
        ckpt.save(2, _make_state(6, seed=2), {"width": 6, "seed": 2})
        _, _, step = ckpt.restore(_abstract_fn)
        assert step == 2


@ORBAX_CLOSED_LOOP
def test_all_corrupt_raises(tmp_path: Path) -> None:
    with Checkpointer(tmp_path) as ckpt:
        _save_steps(ckpt, [(1, 4), (2, 4)])
    _delete_meta(tmp_path / "1")
    _delete_array_data(tmp_path / "2")
    with Checkpointer(tmp_path) as ckpt, pytest.raises(CheckpointError) as info:
        ckpt.restore(_abstract_fn)
    msg = str(info.value)
    assert str(tmp_path) in msg
    assert "step 2" in msg and "step 1" in msg
    assert not isinstance(info.value, CheckpointNotFoundError)


def test_partial_save_is_ignored_then_cleaned_up(tmp_path: Path) -> None:
    with Checkpointer(tmp_path) as ckpt:
        _save_steps(ckpt, [(1, 4), (2, 6)])
        # Leftovers of a save that crashed: complete-looking content, never renamed, plus one
        # with only half of the files. An open checkpointer never lists them.
        shutil.copytree(tmp_path / "2", tmp_path / f"3{TMP_SUFFIX}")
        (tmp_path / f"4{TMP_SUFFIX}" / "state").mkdir(parents=True)
        assert ckpt.all_steps() == [1, 2]
        assert ckpt.latest_step() == 2
        _, meta, step = ckpt.restore(_abstract_fn)
        assert (step, meta) == (2, {"width": 6, "seed": 2})
    # Opening the directory to read leaves them; the first save removes them (orbax's clean-up).
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [1, 2]
        assert ckpt.read_meta() == {"width": 6, "seed": 2}
        assert (tmp_path / f"3{TMP_SUFFIX}").is_dir() and (tmp_path / f"4{TMP_SUFFIX}").is_dir()
        ckpt.save(3, _make_state(4, seed=3), {"width": 4, "seed": 3})
        assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2", "3"]
        assert ckpt.latest_step() == 3


def test_crash_before_commit_leaves_no_valid_checkpoint(tmp_path: Path) -> None:
    """A process killed right before orbax's final rename leaves only a tmp dir."""
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"w": jnp.ones((3,))}, {"n": 1})
    script = textwrap.dedent(
        f"""
        import os
        import jax.numpy as jnp
        from orbax.checkpoint._src.path import atomicity
        from nr_jax.checkpoint import Checkpointer

        async def crash(self):
            os._exit(17)

        atomicity.AtomicRenameTemporaryPath.finalize = crash
        Checkpointer({str(tmp_path)!r}).save(2, {{"w": jnp.zeros((5,))}}, {{"n": 2}})
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert proc.returncode == 17, proc.stderr.decode()[-2000:]
    assert (tmp_path / f"2{TMP_SUFFIX}").is_dir()
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [1]
        assert ckpt.latest_step() == 1
        state, meta, step = ckpt.restore(lambda m: {"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
        assert (step, meta) == (1, {"n": 1})
        np.testing.assert_array_equal(state["w"], np.ones(3))


def test_failed_save_leaves_nothing(tmp_path: Path) -> None:
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"w": jnp.ones((3,))}, {"n": 1})
        with pytest.raises(TypeError, match="unsupported state leaf"):
            ckpt.save(2, {"w": jnp.ones((3,)), "bad": "a string"}, {"n": 2})
        assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]
        assert ckpt.latest_step() == 1


def test_empty_or_missing_dir_raises(tmp_path: Path) -> None:
    for directory in [tmp_path, tmp_path / "does" / "not" / "exist"]:
        with Checkpointer(directory) as ckpt:
            assert ckpt.latest_step() is None
            with pytest.raises(CheckpointError, match="no valid checkpoint") as info:
                ckpt.restore(_abstract_fn)
            assert isinstance(info.value, FileNotFoundError)
            assert str(directory) in str(info.value)
            with pytest.raises(CheckpointNotFoundError):
                ckpt.read_meta()
    assert not (tmp_path / "does").exists()  # nothing is created until the first save
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"w": jnp.ones(2)}, {})
        with pytest.raises(CheckpointNotFoundError, match="step 7"):
            ckpt.restore(_abstract_fn, step=7)


def test_shape_mismatch_is_caller_error(tmp_path: Path) -> None:
    with Checkpointer(tmp_path) as ckpt:
        _save_steps(ckpt, [(1, 4), (2, 6)])

        def wrong_widths(meta: dict) -> TrainState:
            return _abstract_fn({**meta, "width": 4})  # ignores the stored width 6

        with pytest.raises(CheckpointError) as info:
            ckpt.restore(wrong_widths)  # must NOT silently fall back to step 1 (width 4)
        msg = str(info.value)
        assert "shape mismatch" in msg and "step 2" in msg
        # First mismatching leaf in flattening order, with both shapes.
        assert ".params['Conv_0']['bias']" in msg
        assert "(4,)" in msg and "(6,)" in msg

        def missing_leaf(meta: dict) -> dict:
            return {"other": jax.ShapeDtypeStruct((4,), jnp.float32)}

        with pytest.raises(CheckpointError, match=r"\['other'\] is not in the checkpoint"):
            ckpt.restore(missing_leaf)

        def key_as_plain(meta: dict) -> TrainState:
            s = _abstract_fn(meta)
            return s.replace(rng=jax.ShapeDtypeStruct((2,), jnp.uint32))

        with pytest.raises(CheckpointError, match=r"\.rng is stored as a PRNG key"):
            ckpt.restore(key_as_plain)

        key_dtype = jax.random.key(0).dtype

        def plain_as_key(meta: dict) -> TrainState:
            return _abstract_fn(meta).replace(step=jax.ShapeDtypeStruct((), key_dtype))

        with pytest.raises(CheckpointError, match=r"\.step is stored as a plain array"):
            ckpt.restore(plain_as_key)

        def more_keys(meta: dict) -> TrainState:
            return _abstract_fn(meta).replace(rng=jax.ShapeDtypeStruct((2,), key_dtype))

        with pytest.raises(CheckpointError, match=r"shape mismatch for leaf \.rng"):
            ckpt.restore(more_keys)

        def fewer_leaves(meta: dict) -> TrainState:
            return _abstract_fn(meta).replace(extra={})

        with pytest.raises(CheckpointError, match="leaves not in the abstract tree"):
            ckpt.restore(fewer_leaves)


def test_dtype_cast_sharding_and_array_targets(tmp_path: Path) -> None:
    state = {"a": jnp.linspace(0, 1, 6, dtype=jnp.float32).reshape(2, 3), "n": np.arange(3)}
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(0, state, {})
        restored, _, _ = ckpt.restore(
            lambda m: {
                "a": jax.ShapeDtypeStruct((2, 3), jnp.bfloat16, sharding=sharding),
                "n": np.zeros(3, np.int32),  # concrete arrays work as targets too
            }
        )
    assert restored["a"].dtype == jnp.bfloat16
    assert restored["a"].sharding == sharding
    np.testing.assert_allclose(
        np.asarray(restored["a"], np.float32), np.asarray(state["a"]), atol=1e-2
    )
    assert restored["n"].dtype == jnp.int32
    np.testing.assert_array_equal(restored["n"], [0, 1, 2])


def test_zero_size_and_empty_state(tmp_path: Path) -> None:
    state = {
        "empty_w": jnp.zeros((0, 3)),
        "no_keys": jax.random.split(jax.random.key(0), 0),
        "w": jnp.ones(2),
    }
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, {"a": 1})
        restored, _, _ = ckpt.restore(lambda m: jax.eval_shape(lambda: state))
        chex.assert_trees_all_equal_shapes_and_dtypes(restored, state)
        chex.assert_trees_all_equal(restored, state)
        ckpt.save(2, {"nothing": (), "none": None}, {"b": 2})
        restored, meta, step = ckpt.restore(lambda m: {"nothing": (), "none": None})
        assert restored == {"nothing": (), "none": None}
        assert (meta, step) == ({"b": 2}, 2)


def test_closed_checkpointer_rejects_calls(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    ckpt.close()
    ckpt.close()  # idempotent
    with pytest.raises(CheckpointError, match="closed"):
        ckpt.save(0, {"w": jnp.ones(1)}, {})
    with pytest.raises(CheckpointError, match="closed"):
        ckpt.restore(_abstract_fn)


def test_on_save_brackets_each_commit(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    events = []

    def on_save(event: str, step: int, where: str) -> None:
        assert where == str(directory)
        events.append((event, step, sorted(os.listdir(where))))

    with Checkpointer(directory, max_to_keep=1, on_save=on_save) as ckpt:
        ckpt.save(1, {"w": jnp.ones(2)}, {})
        ckpt.save(2, {"w": jnp.ones(2)}, {})
        with pytest.raises(TypeError, match="unsupported state leaf"):
            ckpt.save(3, {"bad": "a string"}, {})  # rejected before orbax starts: no event
    # "start": nothing of the step written yet; "end": committed (renamed) and older steps pruned.
    assert events == [("start", 1, []), ("end", 1, ["1"]), ("start", 2, ["1"]), ("end", 2, ["2"])]


def test_open_checkpointer_defuses_orbax_task_reports(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """gh-106905: while a Checkpointer is open, asyncio's reports of orbax/TensorStore exceptions
    lose their traceback and drop to DEBUG; other reports, and reports after close, are kept."""
    caplog.set_level(logging.WARNING)

    def report(message: str) -> None:
        try:
            raise RuntimeError(message)
        except RuntimeError:
            logging.getLogger("asyncio").error("Task exception was never retrieved", exc_info=True)

    with Checkpointer(tmp_path):
        report("TENSORSTORE read failed")
        report("unrelated")
    report("TENSORSTORE read failed after close")
    got = [(r.levelno, str(r.exc_info[1])) for r in caplog.records if r.name == "asyncio"]
    assert got == [
        (logging.ERROR, "unrelated"),
        (logging.ERROR, "TENSORSTORE read failed after close"),
    ]


_FILTER_LIFETIME = """
import json, logging, sys
import orbax.checkpoint

def filters():
    loggers = [logging.getLogger()] + [
        v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger)]
    return sorted([lg.name, type(f).__name__] for lg in loggers for f in lg.filters)

seen = {"before": filters()}
from nr_jax.checkpoint import Checkpointer
seen["imported"] = filters()
first, second = Checkpointer(sys.argv[1]), Checkpointer(sys.argv[1])
seen["two_open"] = filters()
first.close()
seen["one_open"] = filters()
second.close()
second.close()
seen["closed"] = filters()
print(json.dumps(seen))
"""


def test_log_filters_live_with_the_checkpointer(tmp_path: Path) -> None:
    """Importing installs no logging filter; open Checkpointers hold them (counted) until closed."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", _FILTER_LIFETIME, str(tmp_path)],
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    seen = json.loads(proc.stdout.decode().splitlines()[-1])
    ours = [["absl", "_QuietOrbaxFilter"], ["asyncio", "_OrbaxAbandonedTaskFilter"]]
    assert seen["imported"] == seen["before"]
    assert seen["two_open"] == sorted(seen["before"] + ours)
    assert seen["one_open"] == seen["two_open"]
    assert seen["closed"] == seen["before"]


@pytest.mark.skipif(jax.device_count() < 2, reason="needs several (CPU) devices")
def test_restore_with_named_sharding(tmp_path: Path) -> None:
    n = jax.device_count()
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    spec = jax.sharding.PartitionSpec("data")
    sharded = jax.device_put(
        jnp.arange(2 * n * 3, dtype=jnp.float32).reshape(2 * n, 3),
        jax.sharding.NamedSharding(mesh, spec),
    )
    keys = jax.random.split(jax.random.key(0), n)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(0, {"w": sharded, "keys": keys}, {})
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        restored, _, _ = ckpt.restore(
            lambda m: {
                "w": jax.ShapeDtypeStruct(sharded.shape, sharded.dtype, sharding=replicated),
                "keys": jax.ShapeDtypeStruct(
                    keys.shape, keys.dtype, sharding=jax.sharding.NamedSharding(mesh, spec)
                ),
            }
        )
    assert restored["w"].sharding == replicated
    np.testing.assert_array_equal(restored["w"], sharded)
    assert restored["keys"].sharding.spec == spec
    np.testing.assert_array_equal(jax.random.key_data(restored["keys"]), jax.random.key_data(keys))


# --------------------------------------------------------------------------- #
# The array files' table (issue 17): size and CRC-32 of every file of a step's `state` item,
# checked before orbax reads the step. These tests carry no filter for orbax's abandoned-read
# reports: a damaged step never reaches orbax, so there is nothing to ignore.
def _array_files(step_dir: Path) -> list[Path]:
    return sorted(p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p))


def test_file_table_records_every_state_file(tmp_path: Path) -> None:
    with Checkpointer(tmp_path) as ckpt:
        _save_steps(ckpt, [(1, 4)])
    table = json.loads((tmp_path / "1" / "nr_jax_files.json").read_text())
    on_disk = sorted(
        str(p.relative_to(tmp_path / "1")) for p in (tmp_path / "1" / "state").rglob("*")
    )
    assert sorted(table) == [p for p in on_disk if (tmp_path / "1" / p).is_file()]
    assert _array_files(tmp_path / "1")
    for name, (size, _) in table.items():
        assert (tmp_path / "1" / name).stat().st_size == size


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip"])
def test_damaged_array_file_is_refused_before_orbax_reads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    with Checkpointer(tmp_path) as ckpt:
        _save_steps(ckpt, [(1, 4), (2, 6)])
    victim = max(_array_files(tmp_path / "2"), key=lambda p: p.stat().st_size)
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "delete":
        victim.unlink()
    else:  # same size, other bytes (orbax checks CRCs of b-tree nodes only, as it reads them)
        victim.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    caplog.set_level(logging.WARNING, logger="nr_jax.checkpoint")
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 1
        state, meta, step = ckpt.restore(_abstract_fn)
        assert (step, meta) == (1, {"width": 4, "seed": 1})
        chex.assert_trees_all_equal(state, _make_state(4, seed=1))
        with pytest.raises(CheckpointError, match="damaged array files") as info:
            ckpt.restore(_abstract_fn, step=2)
    assert str(victim) in str(info.value)
    expected = {"truncate": "bytes;", "delete": "is missing", "flip": "CRC-32"}[damage]
    assert expected in str(info.value)
    assert _has_warning(caplog, "damaged array files")


def test_step_without_file_table_still_restores(tmp_path: Path) -> None:
    """Steps saved before the table existed (or killed between commit and table) read as before."""
    with Checkpointer(tmp_path) as ckpt:
        _save_steps(ckpt, [(1, 4)])
    (tmp_path / "1" / "nr_jax_files.json").unlink()
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 1
        state, _, step = ckpt.restore(_abstract_fn)
    assert step == 1
    chex.assert_trees_all_equal(state, _make_state(4, seed=1))
