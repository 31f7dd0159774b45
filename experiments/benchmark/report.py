"""The report writer: `benchmark.json` and the markdown summary `benchmark.md`."""

from __future__ import annotations

import json
import os

from experiments.benchmark.common import FLAGS
from experiments.benchmark.granularity import BOOTSTRAP
from experiments.benchmark.images import IMAGENET_BATCH


def _markdown_granularity(gr: dict) -> list[str]:
    lo, hi = gr["targets"]
    wins = ", ".join(f"g={g} {100 * v:.0f}%" for g, v in gr["bootstrap_wins"].items())
    lines = [
        "",
        f"Width granularity: {gr['setup']}; target widths {lo}-{hi}, "
        f"{gr['compilations']} compilations in {gr['compile_seconds']:.0f} s.",
        "",
        "| granularity g | targets that are multiples of g | time/FLOP of those vs all | "
        "same, vs the width trend | extra FLOPs, rounding up | expected step time, rounding up "
        "(vs g=1) |",
        "|---|---|---|---|---|---|",
    ]
    for g, v in gr["granularity"].items():
        lines.append(
            f"| {g} | {v['widths']} | {v['time_per_flop_vs_all']:.2f} | "
            f"{v['time_per_flop_vs_trend']:.2f} | {100 * v['extra_flops_rounding_up']:+.1f}% | "
            f"{v['expected_time_vs_g1']:.2f} |"
        )
    lines += [
        "",
        f"Recommended granularity (least expected step time for a uniformly random target width "
        f"in {lo}-{hi}, rounded up): **{gr['recommended']}**; at an equal FLOP budget (time per "
        f"FLOP against the width trend alone): {gr['recommended_at_equal_flops']}. Improved "
        f"preset today: {gr['preset']}. Share of {BOOTSTRAP} bootstrap resamples of the "
        f"repetitions in which each g has the least expected time: {wins}.",
        "",
        "Time per FLOP by width, relative to the mean over the targets and to the width trend:",
        "",
    ]
    widths = list(gr["widths"].items())
    for k in range(0, len(widths), 16):
        row = widths[k : k + 16]
        lines += [
            "| width | " + " | ".join(w for w, _ in row) + " |",
            "|---" * (len(row) + 1) + "|",
            "| vs mean | " + " | ".join(f"{v['time_per_flop_vs_mean']:.2f}" for _, v in row) + " |",
            "| vs trend | "
            + " | ".join(f"{v['time_per_flop_vs_trend']:.2f}" for _, v in row)
            + " |",
            "",
        ]
    return lines[:-1]


def _markdown_images(pi: dict) -> list[str]:
    c, im = pi["cifar10"], pi["imagenet"]
    step_c = c["step_images_per_s"]
    lines = [
        "",
        f"Image pipelines on fabricated files ({pi['host_cores']} host cores). CIFAR-10: "
        f"{c['examples']:,} training images from a python-pickle archive, first load (tfds "
        f"array_record + .npz cache) {c['first_load_s']:.1f} s, cached load "
        f"{c['cached_load_s']:.2f} s; batches of {FLAGS.batch} with crop + flip + normalise. "
        f"ImageNet: tfds `imagenet2012` in array_record, {im['examples']['train']} training / "
        f"{im['examples']['validation']} validation JPEGs of ImageNet-like sizes (mean "
        f"{im['mean_jpeg_kb']:.0f} KB), batches of {IMAGENET_BATCH}.",
        "",
        "| image pipeline | images/s | x train step consumption |",
        "|---|---|---|",
    ]
    for k, v in c["images_per_s"].items():
        lines.append(f"| cifar10 train, {k} | {v:,.0f} | {c['vs_step'][k]:,.0f}x |")
    for k, v in im["images_per_s"].items():
        what = "RandomResizedCrop 224 + flip" if k.startswith("train") else "Resize 256 + crop 224"
        ratio = f"{im['vs_step'][k]:.1f}x" if "vs_step" in im else "-"
        lines.append(f"| imagenet {k.replace('_', ' ')} ({what}) | {v:,.0f} | {ratio} |")
    lines += [
        "",
        f"Train step consumption: {c['step_model']}: {step_c['step_alone']:.0f} images/s alone, "
        f"{step_c['fed_no_prefetch']:.0f} fed by the CIFAR pipeline without prefetch, "
        f"{step_c['fed_prefetch']:.0f} with prefetch.",
    ]
    if "step_images_per_s" in im:
        lines.append(
            f"{im['step_model']}: {im['step_images_per_s']:.1f} images/s (setup and compile "
            f"{im['step_setup_s']:.0f} s)."
        )
    lines.append(
        f"ImageNet training decode per host core: {im['train_images_per_s_per_core']:.0f} "
        f"images/s; ResNet-50 on one H100 consumes about {im['h100_resnet50_images_per_s']:,} "
        f"images/s, i.e. about {im['cores_for_h100_resnet50']:.0f} such cores per GPU."
    )
    return lines


def markdown(r: dict) -> str:
    lines = [f"Hardware: {r['hardware']}; batch {r['batch']}; jax {r['jax']}."]
    if "watching" in r:
        lines += [
            "",
            "| watching overhead | NR step ms | no-NR step ms | plain Flax ms | NR vs no-NR "
            "(median of paired ratios) | quartiles |",
            "|---|---|---|---|---|---|",
        ]
        for m, v in r["watching"].items():
            ms = v["ms_per_step"]
            plain = f"{ms['plain_flax']:.1f}" if "plain_flax" in ms else "-"
            lines.append(
                f"| {m} | {ms['nr']:.1f} | {ms['no_nr']:.1f} | {plain} | "
                f"{100 * v['overhead_vs_no_nr']:+.1f}% | "
                + " / ".join(f"{100 * q:+.1f}%" for q in v["overhead_vs_no_nr_quartiles"])
                + " |"
            )
    if "compilations" in r:
        lines += [
            "",
            f"Compilations in a run with one rejuvenation (2 width configurations): "
            f"{r['compilations']['traces']}",
        ]
    if "latency" in r:
        lines += [
            "",
            "| rejuvenation latency | median s | min s | first call s | U | params after |",
            "|---|---|---|---|---|---|",
        ]
        for m, v in r["latency"].items():
            lines.append(
                f"| {m} | {v['seconds_median']:.2f} | {v.get('seconds_min', float('nan')):.2f} | "
                f"{v.get('seconds_first_call', float('nan')):.2f} | {v['utilization']:.3f} | "
                f"{v['params_after']:,} |"
            )
    if "post" in r:
        lines += [
            "",
            "| post-rejuvenation step | batch | U | removed ms | attention ms (2 convs) | "
            "attention ms (4 convs) | dense ms | removed/dense | attention/dense | "
            "effective MACs/dense |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for m, v in r["post"].items():
            ms = v["ms_per_step"]
            f = lambda key, d=ms: f"{d[key]:.1f}" if key in d else "-"  # noqa: E731
            att = f"{v['attention_vs_dense']:.2f}" if "attention_vs_dense" in v else "-"
            lines.append(
                f"| {m} | {v.get('batch', r['batch'])} | {v['utilization']:.3f} | "
                f"{f('removed')} | {f('attention')} | {f('attention4')} | {f('dense')} | "
                f"{v['removed_vs_dense']:.2f} | {att} | {v['effective_macs_ratio']:.2f} |"
            )
    if "efficiency" in r:
        e = r["efficiency"]
        lines += [
            "",
            f"Matmul peak: {e['matmul_peak_gflops']:.0f} GFLOP/s (best repetition; medians by n: "
            + ", ".join(
                f"{n}: {g:.0f}"
                for n, g in e.get("matmul_peak", {}).get("gflops_median_by_n", {}).items()
            )
            + ")",
            "",
            "| efficiency | batch | images/s | achieved GFLOP/s | fraction of peak | "
            "step ms | with XLA's kernel gradient ms | speed-up | PyTorch images/s | vs PyTorch |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for m in (k for k in e if not k.startswith("matmul_peak") and k != "pytorch"):
            v = e[m]
            xla = v.get("ms_per_step_xla_kernel_grad")
            xla_ms, speedup = "-", "-"
            if xla is not None:
                xla_ms, speedup = f"{xla:.1f}", f"{v['speedup_vs_xla_kernel_grad']:.2f}x"
            lines.append(
                f"| {m} | {v.get('batch', r['batch'])} | {v['images_per_s']:.0f} | "
                f"{v['achieved_gflops']:.1f} | {100 * v['fraction_of_peak']:.0f}% | "
                f"{v['ms_per_step']:.1f} | {xla_ms} | {speedup} | "
                f"{v.get('pytorch_images_per_s', float('nan')):.0f} | "
                f"{v.get('vs_pytorch', float('nan')):.2f}x |"
            )
        ref = e.get("pytorch", {})
        lines += [
            "",
            f"PyTorch: {ref['skipped']}"
            if "skipped" in ref
            else f"PyTorch {ref.get('torch')} CPU, {ref.get('threads')} threads, eager, the faster "
            "of NCHW and channels-last, same nets and optimiser, timed after the JAX steps.",
        ]
    if "pipeline" in r:
        lines += ["", "| input pipeline | images/s | x step consumption |", "|---|---|---|"]
        for k, v in r["pipeline"].items():
            ratio = f"{v['vs_step']:.0f}x" if v["vs_step"] is not None else "-"
            lines.append(f"| {k} | {v['images_per_s']:,.0f} | {ratio} |")
    if "granularity" in r:
        lines += _markdown_granularity(r["granularity"])
    if "pipeline_images" in r:
        lines += _markdown_images(r["pipeline_images"])
    return "\n".join(lines)


def write(r: dict, out: str) -> str:
    """Writes `r` to `out`/benchmark.json and its summary to `out`/benchmark.md; returns the
    summary (with the wall time and the load average at the end)."""
    with open(os.path.join(out, "benchmark.json"), "w") as f:
        json.dump(r, f, indent=1)
    load = ", ".join(f"{a:.1f}" for a in r["load_average_end"])
    seconds = ", ".join(f"{k} {v:.0f} s" for k, v in r["section_seconds"].items())
    md = markdown(r) + (
        f"\n\nBenchmark wall time: {r['wall_s']:.0f} s ({seconds}); load average at the end "
        f"(1, 5, 15 min): {load}\n"
    )
    with open(os.path.join(out, "benchmark.md"), "w") as f:
        f.write(md)
    return md
