"""Does the text make the image features transfer better? M3AE vs MAE vs random init, on CPU.

    .venv/bin/python experiments/transfer.py      # ~70 min on 2 quiet cores (estimate below)
    .venv/bin/python experiments/transfer.py --seeds 0 --steps 40 --out /tmp/t  # a quick pulse
    .venv/bin/python experiments/transfer.py --collect   # the JSON of the runs finished so far
    .venv/bin/python experiments/transfer.py --recipe cpu --seeds 0 --arms m3ae mae random

The M3AE paper's claim (59.4 vs 45.2 ImageNet linear probe, ViT-B) at the scale of this
machine. Arms, each pretrained with the `local` recipe (configs/m3ae_pretrain.py) on the demo's
2,000 openclipart drawings with their captions, for every seed:

- `m3ae`: text mask ratio 0.75 (the paper's);
- `m3ae_text15`: text mask ratio 0.15 (BERT's; the paper finds 0.75 better);
- `mae`: image-only, the same encoder with no text part (`local,mae`);
- `random`: the same encoder, untrained (`m3ae probe --random-init`).

Within a seed every trained arm sees identical images, crops and order (the loader's seed is
the run's seed; the image-only stream takes the paired stream's place). Each model is probed
on openclipart drawings it never saw (the probe's first 4,000 less the 2,000 trained on:
`m3ae probe` leaves out the model's `trained_on` shards) and on Fashion-MNIST, with the ridge
and the logistic probe, and scored by the cross-modal evaluation (evaluate/crossmodal.py) on the
held-out shard. Writes `OUT/transfer.json` (every number, with means and standard deviations
over seeds) and `OUT/transfer.png`, rewritten after every run (`complete` says whether all
arms and seeds are in). Finished runs and probes are reused when rerun.

Cost on this 2-core machine with nothing else running: a trained arm is ~5 min of pretraining
(the demo's 372 steps) plus ~2 min of probes (4,000 openclipart drawings rendered once and
cached; 2,000 + 2,000 Fashion-MNIST images), a random-init arm ~2 min: about 70 min for the
default 3 seeds x 4 arms.

`--recipe cpu` runs the arms with the `cpu` recipe instead (every drawing, 5,434 trained on,
972 steps: ~15 min a trained arm with its probes) and probes on all openclipart drawings less
those trained on; it writes to `experiments/results/cpu/`. Every seed's arms also get paired
differences (`paired` in the JSON): an arm's probes minus MAE's and random init's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
M3AE = [sys.executable, "-m", "m3ae.cli"]
ARMS = {  # arm -> (recipe variant, --set overrides)
    "m3ae": ("", []),
    "m3ae_text15": ("", ["model.text_mask_ratio=0.15"]),
    "mae": (",mae", []),
}
RECIPES = {  # recipe -> (its shards, where its probe's openclipart drawings come from)
    "local": ("data/openclipart-64", ["--limit", "4000"]),  # 4,000 less the 2,000 trained on
    "cpu": ("data/openclipart-64-all", []),  # all 7,434 less the 5,434 trained on
}
PROBES = {  # name -> m3ae probe arguments (openclipart's: + the recipe's)
    "openclipart_unseen": ["--data", "openclipart"],
    "fashion_mnist": ["--data", "fashion-mnist", "--limit", "2000"],
}
EVALUATORS = ("ridge", "logistic")


def run(cmd: list[str], log: Path) -> None:
    """Run a step of the experiment, its output to `log`; a failure names the log."""
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        res = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=3600)
    if res.returncode != 0:
        raise RuntimeError(f"{cmd[3] if len(cmd) > 3 else cmd} failed; see {log}")


def finished(work: Path, arm: str, seed: int) -> bool:
    """Whether a run and all its probes are done (`--collect` gathers only those)."""
    probes = work / "probes" / f"{arm}-s{seed}"
    done = all((probes / n / f"probe.{e}.json").is_file() for n in PROBES for e in EVALUATORS)
    model = work / "runs" / f"{'m3ae' if arm == 'random' else arm}-s{seed}" / "model"
    return done and model.is_dir()


def pretrain(arm: str, seed: int, out: Path, steps: int, recipe: str) -> dict[str, Any]:
    workdir = out / "runs" / f"{arm}-s{seed}"
    summary = workdir / "summary.json"
    if not (summary.is_file() and (workdir / "model").is_dir()):
        variant, extra = ARMS[arm]
        recipe += variant
        sets = [f"seed={seed}", "logging.pictures_every=0", "eval.batches=6", *extra]
        if steps:
            sets.append(f"optim.steps={steps}")
        cmd = [*M3AE, "train", "--config", f"configs/m3ae_pretrain.py:{recipe}"]
        cmd += ["--workdir", str(workdir)] + [f"--set={s}" for s in sets]
        run(cmd, out / "logs" / f"{arm}-s{seed}.log")
    return json.loads(summary.read_text())


def probe(
    model: Path, name: str, evaluator: str, out: Path, seed: int, random: bool, recipe: str
) -> dict:
    target = out / f"probe.{evaluator}.json"
    if not target.is_file():
        cmd = [*M3AE, "probe", "--model", str(model), *probe_args(name, recipe)]
        cmd += ["--evaluator", evaluator]
        cmd += ["--out", str(out), "--seed", str(seed), "--no-progress"]
        if random:
            cmd.append("--random-init")
        out.mkdir(parents=True, exist_ok=True)
        run(cmd, out.parent / "probe.log")
        record = json.loads((out / "probe.json").read_text())
        target.write_text(json.dumps(record, indent=2) + "\n")
    record = json.loads(target.read_text())
    keep = ("lp_acc1", "lp_mean_per_class_recall", "train_acc1", "converged", "excluded")
    return {k: record.get(k) for k in keep} | {"test_size": record.get("test_size")}


def probe_args(name: str, recipe: str) -> list[str]:
    return PROBES[name] + (RECIPES[recipe][1] if name == "openclipart_unseen" else [])


def spread(values: list[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    return {"mean": mean, "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over seeds of each arm's probe accuracies and gains."""
    out: dict[str, Any] = {}
    for arm in [*ARMS, "random"]:
        mine = [r for r in rows if r["arm"] == arm]
        if not mine:
            continue
        entry: dict[str, Any] = {}
        for key in mine[0]["probes"]:
            entry[key] = spread([100 * r["probes"][key]["lp_acc1"] for r in mine])
        if "probe_mean" in mine[0]:
            entry["probe_mean"] = spread([r["probe_mean"] for r in mine])
        for key in ("crossmodal_gain", "image_loss_ratio"):
            if mine[0].get("crossmodal", {}).get(key) is not None:
                entry[key] = spread([r["crossmodal"][key] for r in mine])
        out[arm] = entry
    return out


def score(row: dict[str, Any], key: str) -> float:
    """A run's top-1 (%) on probe `key`, or `probe_mean`, the mean of its probes."""
    return row["probe_mean"] if key == "probe_mean" else 100 * row["probes"][key]["lp_acc1"]


def paired(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-seed differences in points, arm minus baseline (MAE, random init), of each probe and
    of their mean, over the seeds both have. Within a seed the arms share images, crops, order
    and probe sets, so these carry less noise than the difference of the arms' spreads."""
    by = {(r["arm"], r["seed"]): r for r in rows}
    out: dict[str, Any] = {}
    for arm in ARMS:
        for base in ("mae", "random"):
            seeds = sorted(s for a, s in by if a == arm and (base, s) in by)
            if arm == base or not seeds:
                continue
            entry = {}
            for key in ["probe_mean", *by[arm, seeds[0]]["probes"]]:
                diffs = [score(by[arm, s], key) - score(by[base, s], key) for s in seeds]
                entry[key] = spread(diffs) | {"per_seed": diffs}
            out[f"{arm}-{base}"] = entry
    return out


def plot(summary: dict[str, Any], path: Path, recipe: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(summary)
    keys = [k for k in summary[arms[0]] if "/" in k]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        means = [summary[arm][k]["mean"] for k in keys]
        stds = [summary[arm][k]["std"] for k in keys]
        xs = [j + i * width for j in range(len(keys))]
        axes[0].bar(xs, means, width, yerr=stds, capsize=3, label=arm)
    axes[0].set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys, fontsize=8)
    axes[0].set_ylabel("top-1 (%), mean ± std over seeds")
    low = min(summary[a][k]["mean"] for a in arms for k in keys)
    axes[0].set_ylim(max(0.0, low - 10), None)
    axes[0].legend()
    gains = [a for a in arms if "crossmodal_gain" in summary[a]]
    axes[1].bar(
        gains,
        [summary[a]["crossmodal_gain"]["mean"] for a in gains],
        yerr=[summary[a]["crossmodal_gain"]["std"] for a in gains],
        capsize=3,
        color="tab:gray",
    )
    axes[1].set_ylabel("cross-modal gain (nats)")
    fig.suptitle(
        f"openclipart pretraining on 2 CPU cores, `{recipe}` recipe: probes on unseen data"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_result(
    args: argparse.Namespace, rows: list[dict[str, Any]], seconds: float, done: bool
) -> dict[str, Any]:
    """`OUT/transfer.json` and `OUT/transfer.png` from the rows so far (`complete` says which)."""
    summary = summarize(rows)
    result = {
        "command": " ".join(sys.argv),
        "complete": done,
        "seeds": sorted({r["seed"] for r in rows}),
        "steps": args.steps or "recipe",
        "probes": {n: probe_args(n, args.recipe) for n in PROBES},
        "evaluators": EVALUATORS,
        "seconds": seconds,  # of this invocation (small for --collect)
        "pretraining_seconds": sum(r.get("train_seconds") or 0.0 for r in rows),
        "load_average": os.getloadavg(),
        "recipe": args.recipe,
        "summary": summary,
        "paired": paired(rows),
        "runs": rows,
    }
    (args.out / "transfer.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(summary, args.out / "transfer.png", args.recipe)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=["m3ae", "mae", "random", "m3ae_text15"])
    ap.add_argument("--steps", type=int, default=0, help="> 0: fewer steps (a quick pulse)")
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="local")
    ap.add_argument("--out", type=Path, help="default: experiments/results (cpu: .../cpu)")
    ap.add_argument(
        "--collect", action="store_true", help="only gather finished runs: train nothing new"
    )
    args = ap.parse_args()
    if unknown := set(args.arms) - {*ARMS, "random"}:
        ap.error(f"unknown arm(s) {sorted(unknown)}")
    shards = RECIPES[args.recipe][0]
    if not (ROOT / shards / "stats.json").is_file():
        ap.error(f"no {args.recipe} shards: run `make {shards}/stats.json` first")
    if args.out is None:
        args.out = (
            ROOT / "experiments" / "results" / ("" if args.recipe == "local" else args.recipe)
        )
    work = args.out / "work"
    (work / "logs").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    start, rows = time.perf_counter(), []
    for seed in args.seeds:
        for arm in args.arms:
            t0 = time.perf_counter()
            if args.collect and not finished(work, arm, seed):
                continue
            row: dict[str, Any] = {"arm": arm, "seed": seed, "probes": {}}
            base = work / "runs" / f"m3ae-s{seed}" / "model"
            if arm != "random":
                summary = pretrain(arm, seed, work, args.steps, args.recipe)
                base = work / "runs" / f"{arm}-s{seed}" / "model"
                row["crossmodal"] = {
                    k.split("/", 1)[1]: v
                    for k, v in summary["eval"].items()
                    if k.startswith("crossmodal/")
                }
                row["val_loss"] = {k: v for k, v in summary["eval"].items() if "val_loss" in k}
                row["train_seconds"] = summary.get("seconds")  # kept when runs are reused
            elif not base.is_dir():
                pretrain("m3ae", seed, work, args.steps, args.recipe)  # the untrained model's shape
            for name in PROBES:
                for ev in EVALUATORS:
                    where = work / "probes" / f"{arm}-s{seed}" / name
                    random = arm == "random"
                    got = probe(base, name, ev, where, seed, random, args.recipe)
                    row["probes"][f"{name}/{ev}"] = got
            row["probe_mean"] = statistics.fmean(100 * p["lp_acc1"] for p in row["probes"].values())
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            write_result(args, rows, time.perf_counter() - start, done=False)  # partial
            gain = row.get("crossmodal", {}).get("crossmodal_gain")
            print(
                f"{arm} seed {seed}: probes {row['probe_mean']:.2f}% mean, cross-modal gain "
                + ("-" if gain is None else f"{gain:+.3f}")
                + f" ({row['seconds']:.0f} s)",
                flush=True,
            )
    every = len(rows) == len(args.seeds) * len(args.arms)  # --collect may find fewer
    result = write_result(args, rows, time.perf_counter() - start, done=every)
    for arm, entry in result["summary"].items():
        cells = ", ".join(
            f"{k} {v['mean']:.2f}±{v['std']:.2f}" for k, v in entry.items() if "/" not in k
        )
        print(f"{arm}: {cells}")
    for pair, entry in result["paired"].items():
        cells = ", ".join(f"{k} {v['mean']:+.2f}±{v['std']:.2f}" for k, v in entry.items())
        print(f"{pair} (per seed, points): {cells}")
    print(f"wrote {args.out / 'transfer.json'} and transfer.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
