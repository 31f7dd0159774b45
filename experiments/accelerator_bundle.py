"""Prepares what travels to the GPU machine for the accelerator check, and prints the `run` call.

    python -m experiments.accelerator_bundle --dest .accel
    python -m experiments.accelerator_bundle --dest .accel --nowheels   # the data subset only

The GPU machine (`nvidia-h200`: Python 3.12, its own jax, flax, optax, orbax-checkpoint, chex,
absl-py, tqdm, pytest, no network) lacks the packages nr_jax's data side imports. Into DEST, a
folder of this repository, this writes:

* `fmnist_subset.npz`: the first `--train_images` training and `--test_images` test images of
  Fashion-MNIST as the project loads them (`nr_jax.data.load_arrays`: the local cache, else the
  IDX files), for the check's short evaluation (`experiments.accelerator.fmnist_subset`);
* `whl/`: wheels for that Python (`pip download --no-deps --only-binary=:all: --python-version
  3.12 --platform manylinux...x86_64`) of the packages it lacks, at the versions of
  `requirements.txt` where it pins them (`WHEELS`); `promise`, published as a source archive
  only, is built here into a pure-Python wheel. Their requirements are then checked against the
  bundle and what the machine has (`GPU_HAS`); a requirement neither covers is printed.

A carried path must be ignored by git (and none of this belongs in a commit): DEST is added to
`.git/info/exclude` unless git ignores it already. Last, it prints the `run` call: the command
line (under 2,000 characters), `carry` and `timeout_s`.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from experiments import cli
from experiments.accelerator import bundle

flags.DEFINE_string("dest", None, "Folder inside the repository to write (e.g. .accel).")
flags.DEFINE_integer("train_images", 10_000, "Training images of the subset (the first N).")
flags.DEFINE_integer("test_images", 2_000, "Test images of the subset (the first M).")
flags.DEFINE_boolean("wheels", True, "Download the wheels (--nowheels: the data subset only).")
flags.DEFINE_string("python_version", bundle.PYTHON_VERSION, "The GPU machine's Python (KINDS.md).")
flags.DEFINE_list("extra", [], "More NAME==VERSION wheels to carry (e.g. protobuf==7.36.2).")
flags.DEFINE_float("max_mb", 48.0, "Refuse a bundle larger than this (the tree travels in 64 MiB).")
flags.mark_flag_as_required("dest")
flags.adopt_module_key_flags(cli)  # --debug
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.train_images < 1 or FLAGS.test_images < 1:
        raise app.UsageError("--train_images and --test_images must be at least 1")
    try:
        dest = bundle.destination(FLAGS.dest)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    rel = dest.relative_to(bundle.ROOT).as_posix()
    dest.mkdir(parents=True, exist_ok=True)
    print(bundle.ensure_ignored(dest))
    size = bundle.write_fmnist(dest, FLAGS.train_images, FLAGS.test_images)
    print(f"wrote {rel}/{bundle.SUBSET} ({size / 2**20:.1f} MiB)")
    wheels = sorted((dest / bundle.WHEEL_DIR).glob("*.whl"))
    if FLAGS.wheels:
        wheels = bundle.download_wheels(dest / bundle.WHEEL_DIR, FLAGS.python_version, FLAGS.extra)
        print(f"{len(wheels)} wheels in {rel}/{bundle.WHEEL_DIR}")
        for req in bundle.unmet_requirements(wheels, FLAGS.python_version):
            print(f"warning: neither the bundle nor the GPU machine provides {req}")
    mb = bundle.folder_mb(dest)
    if mb > FLAGS.max_mb:
        raise app.UsageError(f"{rel} holds {mb:.0f} MiB, over --max_mb {FLAGS.max_mb:.0f}")
    print(f"{rel}: {mb:.1f} MiB; run the check on the GPU machine with the device tool's run:")
    print(json.dumps(bundle.run_call(rel, bool(wheels)), indent=1))


if __name__ == "__main__":
    os.chdir(bundle.ROOT)  # git and the printed paths are relative to the repository root
    cli.run(main)
