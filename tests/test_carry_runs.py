"""Carrying unfinished runs across machines (`experiments.carry_runs`): what is packed, restored
and dropped."""

import json

from experiments import carry_runs


def make_run(runs, name, files):
    d = runs / "t" / name
    for rel, text in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(text)
    return d


def finish(results, name):
    (results / "t").mkdir(parents=True, exist_ok=True)
    (results / "t" / f"{name}.json").write_text(json.dumps({"run": name}))


def test_save_restore_and_drop(tmp_path):
    runs, results, fresh = tmp_path / "runs", tmp_path / "results", tmp_path / "fresh"
    make_run(runs, "vgg_nr_s1", {"fingerprint.json": "{}", "checkpoints/200/a": "ckpt"})
    make_run(runs, "vgg_nr_s0", {"search_checkpoint/4490/a": "search"})  # finished, slimming not
    make_run(runs, "vgg_baseline_Ek_s0", {"metrics.jsonl": "x"})  # finished: not needed
    finish(results, "vgg_nr_s0")
    finish(results, "vgg_baseline_Ek_s0")
    saved = carry_runs.save("t", runs, results)
    assert [p.name for p in saved] == ["vgg_nr_s0.tar.gz", "vgg_nr_s1.tar.gz"]
    restored = carry_runs.restore("t", fresh, results)  # another machine: nothing on disk
    assert [p.name for p in restored] == ["vgg_nr_s0", "vgg_nr_s1"]
    assert (fresh / "t" / "vgg_nr_s1" / "checkpoints" / "200" / "a").read_text() == "ckpt"
    assert (fresh / "t" / "vgg_nr_s0" / "search_checkpoint" / "4490" / "a").read_text() == "search"
    assert carry_runs.restore("t", fresh, results) == []  # present already: left alone
    finish(results, "vgg_slimming_s0")  # the control finished: its NR run's archive is dropped
    finish(results, "vgg_nr_s1")  # finished, but its control has not: still carried
    assert [p.name for p in carry_runs.restore("t", tmp_path / "third", results)] == ["vgg_nr_s1"]
    finish(results, "vgg_slimming_s1")
    assert carry_runs.restore("t", tmp_path / "fourth", results) == []
    assert not list((results / "t" / "carry").glob("*.tar.gz"))
