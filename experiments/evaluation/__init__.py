"""The evaluation driver's parts (issue 14); `python -m experiments.evaluate` is its command line.

* `provenance`: the code fingerprint, commit and versions; run markers; `MixedCodeError`.
* `runs`: a table's runs (`Run`), their order (`plan`) and configs (`config_for`).
* `results`: the result file of a finished run (`build_result`, `training_cost`).
* `driver`: running a table (`Table`, `run_table`): skip, resume, branch, lock, commit.
* `timing`: step times (`step_time`).
"""
