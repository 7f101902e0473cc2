"""Does the pretraining still show after fine-tuning? M3AE vs MAE vs random init, fine-tuned end to
end on data the encoders never saw, next to the linear probes of the same encoders, on CPU.

    .venv/bin/python experiments/finetune.py                 # ~85 min on 2 quiet cores
    .venv/bin/python experiments/finetune.py --seeds 0 --datasets fashion_mnist --steps 40 \
        --out /tmp/ft   # a quick pulse
    .venv/bin/python experiments/finetune.py --collect       # the JSON of what has finished

Arms, for every seed (0, 1, 2):
- `m3ae`, `mae`: the encoders that experiments/transfer.py pretrains with the `local` recipe on
  the demo's 2,000 openclipart drawings (with and without their captions; the same images, crops
  and order within a seed). Its finished runs are reused (`experiments/results/work/runs`), and
  missing ones are trained the same way.
- `random`: the same encoder (`mini`, patch 8), untrained.

Each is fine-tuned with `configs/m3ae_finetune.py:cpu` (64 px, batch 64, 30 epochs, AdamW at
base LR 1e-2 with layer decay 0.75, drop path 0.1, label smoothing 0.1, crops of 0.5-1 of the
area, no Mixup / CutMix: the recipe's docstring says how it was chosen, on MNIST; the run's seed
is the arm's) on:
- `fashion_mnist`: the first 2,000 images of each official split (the probes' sets);
- `openclipart_unseen`: the probes' first 4,000 drawings less the 2,000 pretrained on (left out
  by key for every arm, the random one included), split 80/20 by the probes' key hash: 22
  categories, ~1,600 to train on and ~400 to score.
It is scored on the test part (top-1, top-5, mean per-class recall), and the same encoder is
probed (ridge and logistic, as transfer.py does) on the same sets.

Writes `OUT/finetune.json`: every run, the mean and standard deviation over seeds per arm and
dataset, and per-seed paired differences (M3AE - MAE, M3AE - random, MAE - random), rewritten
after every run (`complete` says whether all are in). Finished fine-tuning runs are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transfer import M3AE, ROOT, pretrain, probe, run, spread  # noqa: E402

ARMS = ("m3ae", "mae", "random")
DATASETS = {  # name -> fine-tuning overrides (the probe of the same name is transfer.py's)
    "fashion_mnist": ["data.dataset=fashion-mnist", "data.limit=2000"],
    "openclipart_unseen": [
        "data.dataset=openclipart",
        "data.limit=4000",
        "data.exclude_shards=data/openclipart-64/{00001..00005}.tar",  # what `local` trains on
    ],
}
EVALUATORS = ("ridge", "logistic")
PAIRS = (("m3ae", "mae"), ("m3ae", "random"), ("mae", "random"))


def finetune(arm: str, seed: int, dataset: str, work: Path, steps: int) -> dict[str, Any]:
    """Fine-tune one arm's encoder on one dataset (reused when finished); its figures."""
    workdir = work / "finetune" / f"{arm}-s{seed}" / dataset
    summary = workdir / "summary.json"
    if not summary.is_file():
        sets = [f"seed={seed}", "logging.tensorboard=False", *DATASETS[dataset]]
        if steps:
            sets += [f"optim.steps={steps}"]
        cmd = [*M3AE, "finetune", "--config", "configs/m3ae_finetune.py:cpu"]
        if arm == "random":
            cmd += ["--random-init"]
        else:
            cmd += ["--model", str(work / "runs" / f"{arm}-s{seed}" / "model")]
        cmd += ["--workdir", str(workdir)] + [f"--set={s}" for s in sets]
        workdir.mkdir(parents=True, exist_ok=True)
        run(cmd, work / "logs" / f"finetune-{arm}-s{seed}-{dataset}.log")
    result = json.loads(summary.read_text())
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["samples_per_s"] for r in rows if "samples_per_s" in r][1:]  # past the compile
    ev = result["eval"]
    return {
        "acc1": ev["finetune_eval/acc1"],
        "acc5": ev["finetune_eval/acc5"],
        "mean_per_class_recall": ev["finetune_eval/mean_per_class_recall"],
        "test_size": int(ev["finetune_eval/samples"]),
        "steps": result["steps"],
        "seconds": result["seconds"],
        "samples_per_s_median": sorted(speeds)[len(speeds) // 2] if speeds else None,
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """arm -> dataset -> mean / std over seeds of fine-tuned and probe top-1 (%)."""
    out: dict[str, Any] = {}
    for arm in ARMS:
        mine = [r for r in rows if r["arm"] == arm]
        if not mine:
            continue
        out[arm] = {}
        for dataset in mine[0]["finetune"]:
            entry = {"finetune": spread([100 * r["finetune"][dataset]["acc1"] for r in mine])}
            for ev in EVALUATORS:
                values = [100 * r["probes"][f"{dataset}/{ev}"]["lp_acc1"] for r in mine]
                entry[f"probe_{ev}"] = spread(values)
            out[arm][dataset] = entry
    return out


def paired(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-seed differences in fine-tuned top-1 points, arm minus baseline, per dataset."""
    by = {(r["arm"], r["seed"]): r for r in rows}
    out: dict[str, Any] = {}
    for arm, base in PAIRS:
        seeds = sorted(s for a, s in by if a == arm and (base, s) in by)
        if not seeds:
            continue
        entry = {}
        for dataset in by[arm, seeds[0]]["finetune"]:
            top1 = {
                (a, s): by[a, s]["finetune"][dataset]["acc1"] for a in (arm, base) for s in seeds
            }
            diffs = [100 * (top1[arm, s] - top1[base, s]) for s in seeds]
            entry[dataset] = spread(diffs) | {"per_seed": diffs}
        out[f"{arm}-{base}"] = entry
    return out


def finished(work: Path, arm: str, seed: int, datasets: list[str]) -> bool:
    return all(
        (work / "finetune" / f"{arm}-s{seed}" / d / "summary.json").is_file() for d in datasets
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--steps", type=int, default=0, help="> 0: fewer fine-tuning steps")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results")
    ap.add_argument("--collect", action="store_true", help="only gather finished runs")
    args = ap.parse_args()
    if not (ROOT / "data" / "openclipart-64" / "stats.json").is_file():
        ap.error("no demo shards: run `make data/openclipart-64/stats.json` first")
    work = args.out / "work"  # shared with transfer.py: its pretraining runs and probes
    (work / "logs").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    start, rows = time.perf_counter(), []
    for seed in args.seeds:
        for arm in args.arms:
            if args.collect and not finished(work, arm, seed, args.datasets):
                continue
            t0 = time.perf_counter()
            row: dict[str, Any] = {"arm": arm, "seed": seed, "finetune": {}, "probes": {}}
            base = work / "runs" / f"{'m3ae' if arm == 'random' else arm}-s{seed}" / "model"
            if not base.is_dir():
                pretrain("m3ae" if arm == "random" else arm, seed, work, 0, "local")
            for dataset in args.datasets:
                row["finetune"][dataset] = finetune(arm, seed, dataset, work, args.steps)
                for ev in EVALUATORS:
                    where = work / "probes" / f"{arm}-s{seed}" / dataset
                    got = probe(base, dataset, ev, where, seed, arm == "random", "local")
                    row["probes"][f"{dataset}/{ev}"] = got
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            cells = ", ".join(
                f"{d} {100 * f['acc1']:.1f}% (ridge probe "
                f"{100 * row['probes'][d + '/ridge']['lp_acc1']:.1f}%)"
                for d, f in row["finetune"].items()
            )
            print(f"{arm} seed {seed}: fine-tuned {cells} ({row['seconds']:.0f} s)", flush=True)
            write(args, rows, time.perf_counter() - start, done=False)
    done = len(rows) == len(args.seeds) * len(args.arms)
    result = write(args, rows, time.perf_counter() - start, done)
    for arm, per in result["summary"].items():
        for dataset, entry in per.items():
            cells = ", ".join(f"{k} {v['mean']:.2f}±{v['std']:.2f}" for k, v in entry.items())
            print(f"{arm} {dataset}: {cells}")
    for pair, per in result["paired"].items():
        cells = ", ".join(f"{d} {v['mean']:+.2f}±{v['std']:.2f}" for d, v in per.items())
        print(f"{pair} fine-tuned, per seed (points): {cells}")
    print(f"wrote {args.out / 'finetune.json'}")
    return 0


def write(args: argparse.Namespace, rows: list, seconds: float, done: bool) -> dict[str, Any]:
    result = {
        "command": " ".join(sys.argv),
        "complete": done,
        "seeds": sorted({r["seed"] for r in rows}),
        "recipe": "configs/m3ae_finetune.py:cpu"
        + (f" with optim.steps={args.steps}" if args.steps else ""),
        "pretraining": "configs/m3ae_pretrain.py:local (experiments/transfer.py's runs)",
        "datasets": {d: DATASETS[d] for d in args.datasets},
        "evaluators": EVALUATORS,
        "seconds": seconds,
        "load_average": os.getloadavg(),
        "summary": summarize(rows),
        "paired": paired(rows),
        "runs": rows,
    }
    (args.out / "finetune.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(main())
