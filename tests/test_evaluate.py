"""The evaluation driver (`experiments/evaluate.py`), its table config and the width multiplier."""

import json
import math
from pathlib import Path

import pytest

from experiments import evaluate
from experiments.configs import eval_table
from experiments.evaluation import provenance
from experiments.evaluation.provenance import ISA_FLAGS
from nr_jax import models, train
from nr_jax.config import ConfigError, validate
from nr_jax.graph import channel_graph
from nr_jax.live import count

# ---------------------------------------------------------------------------------------------
# The code fingerprint
# ---------------------------------------------------------------------------------------------


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_fingerprint_covers_the_code_and_nothing_else(tmp_path):
    write(tmp_path / "nr_jax" / "a.py", "A = 1\n")
    write(tmp_path / "nr_jax" / "data" / "b.py", "B = 1\n")
    write(tmp_path / "experiments" / "evaluate.py", "# driver\n")
    write(tmp_path / "experiments" / "configs" / "t.py", "E = 15\n")
    fp = evaluate.code_fingerprint(tmp_path)
    # results, docs, other files: no change
    write(tmp_path / "experiments" / "results" / "eval" / "vgg_nr_s0.json", "{}\n")
    write(tmp_path / "experiments" / "results" / "eval_budget.md", "# budget\n")
    write(tmp_path / "README.md", "readme\n")
    write(tmp_path / "tests" / "test_x.py", "def test(): pass\n")
    write(tmp_path / "nr_jax" / "notes.txt", "not code\n")
    assert evaluate.code_fingerprint(tmp_path) == fp
    # any change to the code that decides results: a new fingerprint
    for path, text in [
        ("nr_jax/data/b.py", "B = 2\n"),
        ("experiments/configs/t.py", "E = 14\n"),
        ("nr_jax/new.py", "\n"),
    ]:
        write(tmp_path / path, text)
        new = evaluate.code_fingerprint(tmp_path)
        assert new != fp, path
        fp = new


def test_fingerprint_files_of_the_repository():
    files = {p.relative_to(evaluate.ROOT).as_posix() for p in evaluate.fingerprint_files()}
    for name in (
        "nr_jax/train.py",
        "nr_jax/data/run.py",
        "experiments/evaluate.py",
        "experiments/evaluation/driver.py",
    ):
        assert name in files
    assert "experiments/configs/eval_table.py" in files
    assert not any(f.startswith(("experiments/results/", "tests/")) for f in files)


# ---------------------------------------------------------------------------------------------
# Skip, resume, refuse: the driver's logic on a fake tiny run
# ---------------------------------------------------------------------------------------------


def fake_train(calls: list, crash_first: bool = False):
    """A stand-in for `train_and_evaluate`: writes `metrics.jsonl`, returns a summary.

    With `crash_first`, its first call dies after leaving a checkpoint directory behind."""

    def train_fn(config, workdir, callbacks=None):
        calls.append(workdir)
        (Path(workdir) / "checkpoints").mkdir(exist_ok=True)
        if crash_first and len(calls) == 1:
            raise RuntimeError("killed")
        k = 2 if config.nr.enabled else 0
        n = config.epochs + k
        records = [
            {"step": 10 * (e + 1), "epoch/epoch": e + 1, "epoch/val_accuracy_sum": 0.5 + e / 100}
            for e in range(n)
        ]
        records[-1]["epoch/test_accuracy_sum"] = 0.8
        lines = [json.dumps({"step": 5, "train/loss": 1.0})] + [json.dumps(r) for r in records]
        (Path(workdir) / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        summary = {
            "epochs_run": n,
            "search_epochs": k,
            "counts": {"macs": 1000, "effective_macs": 1000},
            "widths": {"conv0": 8},
            "best_validation": {"epoch": n, "val_accuracy_sum": 0.5, "test_accuracy_sum": 0.8},
        }
        if k:
            summary["rejuvenation_epoch"] = k
            summary["rejuvenation"] = {
                "r": 2.0,
                "widths_after": {"conv0": 12},
                "counts_before": {"macs": 1000},
                "counts_after": {"effective_macs": 600},
            }
        return summary

    return train_fn


@pytest.fixture
def fingerprint(monkeypatch):
    """The driver's code fingerprint, settable by the test (`fingerprint[0]`): `run_table` reads
    it from `experiments.evaluation.provenance`."""
    fp = ["code-a"]
    monkeypatch.setattr(provenance, "code_fingerprint", lambda root=evaluate.ROOT: fp[0])
    return fp


def test_driver_resumes_skips_and_refuses(tmp_path, fingerprint):
    calls = []
    table = evaluate.Table(
        "t", tmp_path / "results", tmp_path / "runs", train_fn=fake_train(calls, True)
    )
    runs = evaluate.plan("t", ["vgg"], ["baseline_Ek", "nr"], [0])
    assert [r.arm for r in runs] == ["nr", "baseline_Ek"]  # NR first
    nr_dir, base_dir = (r.workdir(table.runs_root) for r in runs)
    with pytest.raises(RuntimeError, match="killed"):  # interrupted
        list(evaluate.run_table(table, runs))
    assert (nr_dir / evaluate.MARKER).exists()
    assert not runs[0].result_path(table.results_root).exists()
    out = list(evaluate.run_table(table, runs))  # restarted: resumes, then the dependent arm
    assert [status for _, status, _ in out] == ["finished", "finished"]
    assert calls == [str(nr_dir), str(nr_dir), str(base_dir)]
    nr, base = out[0][2], out[1][2]
    assert nr == json.loads(runs[0].result_path(table.results_root).read_text())
    assert nr["fingerprint"] == "code-a" and nr["seed"] == 0 and nr["arm"] == "nr"
    # the machine is recorded; started and finished on this one, so no `machine_at_start`
    assert nr["machine"]["cpu_count"] >= 1 and nr["machine"]["backend"] == "cpu"
    assert "machine_at_start" not in nr and set(nr["machine"]["isa"]) <= set(ISA_FLAGS)
    assert len(nr["epochs"]) == nr["epochs_run"] == eval_table.E + 2
    assert nr["final"] == {"epoch": eval_table.E + 2, "test_accuracy_sum": 0.8}
    assert nr["steps_per_epoch"] == 10 and nr["cost"]["steps"] == 170
    assert nr["cost"]["train_macs"] == 3 * 64 * (20 * 1000 + 150 * 600)
    assert base["config"]["epochs"] == eval_table.E + 2  # epoch-matched: k from the NR run
    assert base["config"]["lr_milestones"] == [m + 2 for m in eval_table.MILESTONES]
    out = list(evaluate.run_table(table, runs))  # finished runs are skipped
    assert [status for _, status, _ in out] == ["skipped", "skipped"] and len(calls) == 3
    fingerprint[0] = "code-b"  # other code never adds to the table
    with pytest.raises(evaluate.MixedCodeError, match="never mixes"):
        list(evaluate.run_table(table, runs))


def test_driver_refuses_to_resume_other_code_or_config(tmp_path, fingerprint):
    calls = []
    table = evaluate.Table("u", tmp_path / "r", tmp_path / "w", train_fn=fake_train(calls, True))
    runs = evaluate.plan("u", ["resnet"], ["baseline_E"], [1])
    with pytest.raises(RuntimeError, match="killed"):
        list(evaluate.run_table(table, runs))
    fingerprint[0] = "code-b"
    with pytest.raises(evaluate.MixedCodeError, match="refusing to resume"):
        list(evaluate.run_table(table, runs))
    workdir = runs[0].workdir(table.runs_root)
    with pytest.raises(evaluate.MixedCodeError, match="another config"):
        evaluate.prepare_workdir(workdir, "code-a", {"epochs": 1})
    stray = tmp_path / "w" / "u" / "stray"
    write(stray / "metrics.jsonl", "")
    with pytest.raises(evaluate.MixedCodeError, match="without fingerprint.json"):
        evaluate.prepare_workdir(stray, "code-a", {})
    assert len(calls) == 1


def test_one_driver_per_table(tmp_path):
    with (
        evaluate.TableLock(tmp_path),
        pytest.raises(RuntimeError, match="one driver per table"),
        evaluate.TableLock(tmp_path),
    ):
        pass
    with evaluate.TableLock(tmp_path):  # released
        pass


def test_sweep_results_carry_no_test_figures(tmp_path, fingerprint):
    table = evaluate.Table("s", tmp_path / "r", tmp_path / "w", train_fn=fake_train([]))
    runs = evaluate.plan("s", ["vgg"], ["sweep:lam5e-4"], [0])
    ((_, _, result),) = evaluate.run_table(table, runs)
    assert result["config"]["nr"]["lam"] == 5e-4 and result["run"] == "vgg_sweep-lam5e-4_s0"
    text = json.dumps(result)
    assert "test_accuracy" not in text and "test_loss" not in text
    assert result["best_validation"]["val_accuracy_sum"] and result["config"]["test_limit"] == 0


# ---------------------------------------------------------------------------------------------
# The table's arms
# ---------------------------------------------------------------------------------------------

NR_RESULT = {
    "search_epochs": 4,
    "steps_per_epoch": 100,
    "cost": {"train_macs": 20_500, "macs_per_step_before": 10},
}


def test_every_arm_validates_and_extends_as_specified():
    epochs = {}
    arms = [a for a in eval_table.ARMS if a not in eval_table.NOT_DONE]
    for arm in arms + [f"sweep:{s}" for s in eval_table.SWEEP]:
        for arch in eval_table.ARCHS:
            c = eval_table.get_config(arm, arch, 2, NR_RESULT)
            c.data_parallel = False
            validate(c)
            assert c.seed == 2 and c.val_size == 5_000 and c.train_limit == 25_000
            epochs[arm] = (c.epochs, tuple(c.lr_milestones), c.nr.enabled)
            k = c.epochs - eval_table.E
            q = eval_table.quick(c)
            validate(q)
            assert q.epochs == 2 + k and q.lr_milestones == (1 + k,)
    e, (m1, m2) = eval_table.E, eval_table.MILESTONES
    assert epochs["nr"] == (e, (m1, m2), True)
    assert epochs["baseline_E"] == (e, (m1, m2), False)
    assert epochs["baseline_Ek"] == (e + 4, (m1 + 4, m2 + 4), False)
    assert epochs["baseline_compute"] == (21, (m1 + 6, m2 + 6), False)  # ceil(20.5) epochs
    assert eval_table.get_config("nr_official").preset == "official"
    assert eval_table.get_config("slimming", nr_result=NR_RESULT).nr.regrow is False
    assert epochs["slimming"] == (e, (m1, m2), True)
    with pytest.raises(ValueError, match="needs the finished nr result"):
        eval_table.get_config("baseline_Ek")


def test_table_arms_take_the_chosen_setting_and_widths():
    for arch in eval_table.ARCHS:
        table = eval_table.get_config("nr", arch)
        assert table.nr.target == eval_table.CHOSEN["nr.target"] != eval_table.base(arch).nr.target
        assert table.model_kwargs.width_multiplier == eval_table.TABLE_WIDTH[arch]
        baseline = eval_table.get_config("baseline_Ek", arch, nr_result=NR_RESULT)
        assert baseline.model_kwargs.width_multiplier == eval_table.TABLE_WIDTH[arch]
    # the sweep keeps its own base (the record the choice was made on)
    assert eval_table.get_config("sweep:base", "vgg").nr.target == eval_table.base("vgg").nr.target
    names = [r.arm for r in evaluate.plan("eval", ["vgg"], ["baseline_Ek", "slimming", "nr"], [0])]
    assert names == ["nr", "slimming", "baseline_Ek"]  # slimming while the search checkpoint exists


def test_compute_matched_k_on_paper():
    per_epoch = {"steps_per_epoch": 100, "cost": {"macs_per_step_before": 10}}
    for macs, k in [(14_000, 0), (15_000, 0), (15_001, 1), (20_500, 6)]:
        nr_result = {**per_epoch, "cost": {**per_epoch["cost"], "train_macs": macs}}
        assert eval_table.compute_matched_k(nr_result) == k


# ---------------------------------------------------------------------------------------------
# The width multiplier of the model families
# ---------------------------------------------------------------------------------------------

TINY = ["vgg_tiny", "vgg_imagenet_tiny", "resnet_tiny_cifar", "resnet_tiny_basic", "densenet_tiny"]


def graph_of(name: str, m: float):
    model = models.get(name, num_classes=10, width_multiplier=m)
    return channel_graph(model, (1, 28, 28, 1))


@pytest.mark.parametrize("name", TINY)
def test_width_multiplier_scales_every_unit(name):
    default = graph_of(name, 1.0).widths
    for m in (0.5, 1.5):
        g = graph_of(name, m)
        assert g.classifier.out_channels == 10
        for u in g.units:
            if name.startswith("densenet") and u.name.startswith("t"):
                expected = math.floor(0.5 * u.in_channels)  # transition: compression of its input
            else:
                expected = max(1, math.floor(default[u.name] * m + 0.5))
            assert u.out_channels == expected, (name, m, u.name)
        assert g.widths != default


def test_width_multiplier_counts_on_paper():
    # vgg_fmnist x1.5: convs 24, 24, (pool) 48, 48, (pool) 96, 96; 3x3 kernels, 1 input channel
    g = graph_of("vgg_fmnist", 1.5)
    assert list(g.widths.values()) == [24, 24, 48, 48, 96, 96]
    c = count(g)
    assert c.conv == 9 * (1 * 24 + 24 * 24 + 24 * 48 + 48 * 48 + 48 * 96 + 96 * 96) == 160_920
    assert c.bn == 2 * 336 and c.classifier == 96 * 10 + 10 and c.total == 162_562
    assert count(graph_of("vgg_fmnist", 1.0)).total == 71_568 + 448 + 650
    r = graph_of("resnet_fmnist", 1.5).widths  # planes 8/16/32 -> 12/24/48, streams x4
    assert (r["stem"], r["s1b0_conv1"], r["s1b0_conv3"], r["s1b0_down"]) == (12, 12, 48, 48)
    assert (r["s2b0_conv2"], r["s3b1_conv3"]) == (24, 192)


def test_width_multiplier_through_the_config():
    c = eval_table.get_config("nr", "vgg")
    c.data_parallel = False
    assert list(train.Trainer(c, workdir="").graph.widths.values()) == [24, 24, 48, 48, 96, 96]
    for bad in (0, -1.0, "2x", True):
        with pytest.raises(ConfigError, match=r"config\.model_kwargs\.width_multiplier"):
            models.get("vgg_tiny", width_multiplier=bad)


def test_the_cycles_arm_is_beside_the_table():
    c = eval_table.get_config("nr_cycles", "vgg", 0)
    c.data_parallel = False
    validate(c)
    assert (c.nr.cycles, c.nr.cycle_epochs) == (2, eval_table.CYCLE_EPOCHS)
    assert "nr_cycles" not in eval_table.ARMS
    runs = evaluate.plan("cycles", ["vgg"], ["nr_cycles"], [0])
    assert [r.name for r in runs] == ["vgg_nr_cycles_s0"]
