"""The adaptive batch's experiment: the norm test from a small batch against fixed batches.

On the embedded sample set (or any --train-dir the extra flags name), same sample budget
(--epochs) for every run: the norm test growing from B0 = 16 (micro-batch 8 x k 2), the same
with --batch-lr-policy sqrt, a fixed batch of 16, and a fixed batch at the size the test ends at
(256 = 32 x 8). Each run is a real CLI run of the trainer; its TensorBoard events give the
batch-size curve and the validation top-1 per epoch. Writes a table (markdown) and a figure::

    python benchmarks/adaptive_experiment.py --seeds 1 2 3 --out docs/experiments/adaptive_batch

The docs (docs/adaptive-batch.md, "Experiment") hold the figures this printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--model", "tinycnn", "--workers", "1", "--threads", "1", "--resume", "none"]
GROW = ["--test-type", "norm", "--eta", "1.0", "--max-batch-size", "256"]
GROW += ["--max-micro-batch-size", "32", "--max-batches-per-allreduce", "8"]
RUNS = {
    "norm test, 16 -> 256": ["--batch-size", "8", "--batches-per-allreduce", "2", *GROW],
    "norm test + sqrt LR": [
        *["--batch-size", "8", "--batches-per-allreduce", "2", *GROW],
        *["--batch-lr-policy", "sqrt"],
    ],
    "fixed 16": ["--batch-size", "8", "--batches-per-allreduce", "2"],
    "fixed 256": ["--batch-size", "32", "--batches-per-allreduce", "8"],
}


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags}


def run_one(name: str, seed: int, out: Path, extra: list[str]) -> dict:
    log_dir = out / "runs" / f"{name.split(',')[0].replace(' ', '_')}-{seed}"
    args = [*COMMON, *RUNS[name], *extra, "--seed", str(seed), "--log-dir", str(log_dir)]
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(ROOT / "pytorch_imagenet_resnet.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{name} seed {seed} failed:\n{done.stdout}\n{done.stderr}")
    found = scalars(log_dir)
    config = json.loads((log_dir / "config.json").read_text())
    start = config["plan"]["global_batch_size"]
    sizes = found.get("by_samples/batch/size", [])
    steps = int(done.stdout.rsplit("done: ", 1)[1].split()[0])
    from lars.checkpoint import list_checkpoints, load_checkpoint

    saved = load_checkpoint(list_checkpoints(log_dir)[0]).get("adaptive_batch")
    samples = saved["state"]["samples_seen"] if saved else steps * start
    return {
        "name": name,
        "seed": seed,
        "steps": steps,
        "val_top1": [v for _, v in found["val/top1"]],
        "curve": [(0, start)] + [(s, int(v)) for s, v in sizes],
        "final_batch": int(sizes[-1][1]) if sizes else start,
        "samples": samples,
        "budget": config["plan"]["train_images"] * config["plan"]["epochs"],
        "wall_s": wall,
        "command": "python pytorch_imagenet_resnet.py " + " ".join(args[:-2]),
    }


def table(results: list[dict]) -> str:
    lines = [
        "| run | optimizer steps | samples | final batch | final val top-1 (mean ± sd) | per seed "
        "| wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in RUNS:
        rows = [r for r in results if r["name"] == name]
        if not rows:
            continue
        top = [r["val_top1"][-1] for r in rows]
        sd = statistics.stdev(top) if len(top) > 1 else 0.0
        steps = sorted({r["steps"] for r in rows})
        batches = sorted({r["final_batch"] for r in rows})
        shown, samples = (
            "/".join(map(str, steps)),
            "/".join(sorted({str(r["samples"]) for r in rows})),
        )
        lines.append(
            f"| {name} | {shown} | {samples} | {'/'.join(map(str, batches))} | "
            f"{statistics.mean(top):.2f}% ± {sd:.2f} | {', '.join(f'{t:.2f}' for t in top)} | "
            f"{statistics.mean(r['wall_s'] for r in rows):.0f} |"
        )
    return "\n".join(lines)


def figure(results: list[dict], path: Path, budget: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    colours = dict(zip(RUNS, ("tab:blue", "tab:purple", "tab:orange", "tab:green")))
    for r in results:
        xs, ys = zip(*r["curve"], (budget, r["curve"][-1][1]))
        label = r["name"] if r["seed"] == results[0]["seed"] else None
        left.step(xs, ys, where="post", color=colours[r["name"]], alpha=0.7, label=label)
        epochs = range(1, len(r["val_top1"]) + 1)
        right.plot(epochs, r["val_top1"], color=colours[r["name"]], alpha=0.6, label=label)
    left.set(xlabel="samples seen", ylabel="global batch", title="batch size")
    left.set_yscale("log", base=2)
    left.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    right.set(xlabel="epoch (same samples for every run)", ylabel="val top-1 (%)",
              title="validation top-1")  # fmt: skip
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("/tmp/adaptive_experiment"))
    parser.add_argument("--only", nargs="*", default=list(RUNS), help="run names")
    parser.add_argument("--replot", action="store_true", help="figure and table of --out's results")
    options, extra = parser.parse_known_args()
    options.out.mkdir(parents=True, exist_ok=True)
    if options.replot:
        return report(json.loads((options.out / "results.json").read_text()), options.out)
    extra = ["--epochs", str(options.epochs), *extra]
    results = []
    for seed in options.seeds:
        for name in options.only:
            results.append(run_one(name, seed, options.out, extra))
            r = results[-1]
            print(f"{name} seed {seed}: {r['steps']} steps, val {r['val_top1'][-1]:.2f}%, "
                  f"final batch {r['final_batch']}, {r['wall_s']:.0f} s", flush=True)  # fmt: skip
    (options.out / "results.json").write_text(json.dumps(results, indent=1))
    report(results, options.out)


def report(results: list[dict], out: Path) -> None:
    figure(results, out / "adaptive_batch.png", max(r["budget"] for r in results))
    text = table(results)
    (out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
