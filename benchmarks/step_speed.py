"""The trainer's step against an earlier commit's, interleaved in one run: the speed ratio and
whether the numbers it computes are the same.

    .venv/bin/python benchmarks/step_speed.py --base a0ea293 \
        --out benchmarks/results/step_speed.json
    # --sizes base,small --rounds 3 --steps 4 --variants head,base,head@model.precision=mixed

Every variant runs in a fresh subprocess (so its peak RSS and page faults are its own) with the
project tree first on `sys.path`: `head` is this checkout, `base` a `git worktree` of `--base`
kept in benchmarks/.data/ (`--head REV` makes head a worktree too, so the checkout can change
while it runs). A `+name` suffix adds one of `ENVS` to that child's environment, an `@k=v;k=v`
suffix config overrides (e.g. `head@model.precision=mixed`).
Variants alternate round by round (head, base, head, base, ...), so load drifts hit both.

Each child builds the trainer's own step (`make_train_step`, AdamW, the non-finite guard, the
state donated) at the given size, batch 8, on one batch of real openclipart drawings (written
once here and shared by every child), runs two untimed steps, then `--steps` timed ones, and
reports wall seconds, the process's user/system CPU seconds and minor page faults per step, the
losses of every step and a float64 checksum of the final parameters. The ratio is base's median
step over head's, per round and overall; the numerics line compares head's losses and checksum
with base's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Extra environments a variant can name as `tree+env`.
ENVS: dict[str, dict[str, str]] = {
    "thp": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},  # transparent huge pages for malloc
    "xnn": {"XLA_FLAGS": "--xla_cpu_use_xnnpack=true"},
    "onednn": {"XLA_FLAGS": "--xla_cpu_use_onednn=true"},
    # glibc keeps freed memory: no mmap per large block, no trimming of the heap's top
    "heap": {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"},
    "heap1": {
        "GLIBC_TUNABLES": "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
        ":glibc.malloc.arena_max=1"
    },
}


# ------------------------------------------------------------------------------ child
def child(args: argparse.Namespace) -> dict[str, Any]:
    """Runs in the subprocess, importing the project from `args.tree`."""
    sys.path.insert(0, args.tree)
    import jax
    import numpy as np

    try:  # as the trainer's set-up does, in trees that have it
        from m3ae.trainer.cpu_memory import keep_step_memory

        print(f"child: {keep_step_memory()}", file=sys.stderr)
    except ImportError:
        pass
    from step_profile import build_step, first_batch  # this directory's; the tree's m3ae

    arrays = first_batch(args.urls, args.image_size, args.batch, args.text_length)
    _, state, step, batches = build_step(
        args.urls, arrays, args.size, args.image_size, args.text_length, args.set
    )
    t0 = time.perf_counter()
    compiled = step.lower(state, batches).compile()
    compile_s = time.perf_counter() - t0
    losses = []
    for _ in range(2):  # untimed: first touches of every buffer
        state, metrics = compiled(state, batches)
        losses.append(float(metrics["loss"]))
    walls, user, system, faults = [], [], [], []
    for _ in range(args.steps):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        state, metrics = compiled(state, batches)
        jax.block_until_ready(metrics)
        walls.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        user.append(r1.ru_utime - r0.ru_utime)
        system.append(r1.ru_stime - r0.ru_stime)
        faults.append(r1.ru_minflt - r0.ru_minflt)
        losses.append(float(metrics["loss"]))
    leaves = jax.tree.leaves(state["params"])
    checksum = sum(float(np.abs(np.asarray(x, np.float64)).sum()) for x in leaves)
    memory = compiled.memory_analysis()
    return {
        "compile_s": compile_s,
        "step_s": walls,
        "user_s": user,
        "system_s": system,
        "minor_faults": faults,
        "losses": losses,
        "param_abs_sum": checksum,
        "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# ------------------------------------------------------------------------------ parent
def worktree(rev: str) -> Path:
    """A checkout of `rev` under benchmarks/.data/, made once."""
    sha = subprocess.check_output(["git", "rev-parse", "--short", rev], cwd=ROOT, text=True)
    path = HERE / ".data" / f"tree-{sha.strip()}"
    if not path.exists():
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(path), rev], cwd=ROOT, check=True,
            capture_output=True,
        )  # fmt: skip
    return path


def shards(image_size: int, batch: int) -> str:
    """Openclipart drawings at `image_size` px in one shard, written once and reused."""
    out = HERE / ".data" / f"step-speed-{image_size}px"
    if not (out / "stats.json").exists():
        from pipelines.shard_records import openclipart_records
        from pipelines.shard_writer import write_shards

        records = openclipart_records(size=image_size, limit=4 * batch, shuffle_seed=0, workers=2)
        write_shards(records, out, samples_per_shard=4 * batch, progress=False, overwrite=True)
    return "::".join(sorted(str(p) for p in out.glob("*.tar")))


def run_child(args: argparse.Namespace, variant: str, trees: dict, size: str, urls: str):
    variant, _, overrides = variant.partition("@")
    tree, _, env_name = variant.partition("+")
    env = {**os.environ, **ENVS.get(env_name, {})}
    sets = [a for o in overrides.split(";") if o for a in ("--set", o)]
    command = [
        sys.executable, __file__, "--child", "--tree", str(trees[tree]), "--size", size, *sets,
        "--urls", urls, "--batch", str(args.batch), "--image-size", str(args.image_size),
        "--text-length", str(args.text_length), "--steps", str(args.steps),
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"child {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(head: list[dict], base: list[dict]) -> dict[str, Any]:
    """Largest relative difference of head's losses and parameter checksum from base's."""
    loss_diff = max(
        abs(a - b) / max(abs(b), 1e-12)
        for h, r in zip(head, base, strict=True)
        for a, b in zip(h["losses"], r["losses"], strict=True)
    )
    sum_diff = max(
        abs(h["param_abs_sum"] - r["param_abs_sum"]) / r["param_abs_sum"]
        for h, r in zip(head, base, strict=True)
    )
    return {"max_rel_loss_diff": loss_diff, "max_rel_param_sum_diff": sum_diff}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", help="the earlier commit (a git revision)")
    p.add_argument("--head", help="a revision for `head` (default: this checkout as it is)")
    p.add_argument("--variants", default="head,base", help="`head` or `base`, each +ENV optional")
    p.add_argument("--sizes", default="base,small")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--text-length", type=int, default=64)
    p.add_argument("--out", default="benchmarks/results/step_speed.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tree", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--urls", help=argparse.SUPPRESS)
    p.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    sys.path.insert(0, str(ROOT))
    variants = args.variants.split(",")
    trees = {"head": worktree(args.head) if args.head else ROOT}
    if any(v.split("+")[0].split("@")[0] == "base" for v in variants):
        if not args.base:
            raise SystemExit("--base REV is needed for a `base` variant")
        trees["base"] = worktree(args.base)
    head_rev = subprocess.check_output(
        ["git", "rev-parse", "--short", args.head or "HEAD"], cwd=ROOT, text=True
    )
    urls = shards(args.image_size, args.batch)
    load_before = os.getloadavg()
    runs: dict[str, dict[str, list[dict]]] = {
        s: {v: [] for v in variants} for s in args.sizes.split(",")
    }
    for r in range(args.rounds):
        for size in runs:
            for v in variants:
                out = run_child(args, v, trees, size, urls)
                runs[size][v].append(out)
                print(
                    f"round {r} {size:<5} {v:<14} step {statistics.median(out['step_s']):6.2f} s"
                    f"  user {statistics.median(out['user_s']):5.1f}  sys "
                    f"{statistics.median(out['system_s']):4.1f}  faults "
                    f"{statistics.median(out['minor_faults']):>8.0f}  "
                    f"load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    summary: dict[str, Any] = {}
    for size, by_variant in runs.items():
        med = {
            v: statistics.median(s for o in outs for s in o["step_s"])
            for v, outs in by_variant.items()
        }
        summary[size] = {"median_step_s": med}
        if "base" in by_variant:
            summary[size]["speedup_vs_base"] = {v: med["base"] / m for v, m in med.items()}
            summary[size]["speedup_vs_base_per_round"] = {
                v: [
                    statistics.median(b["step_s"]) / statistics.median(o["step_s"])
                    for o, b in zip(outs, by_variant["base"], strict=True)
                ]
                for v, outs in by_variant.items()
            }
            summary[size]["numerics_vs_base"] = {
                v: compare(outs, by_variant["base"])
                for v, outs in by_variant.items()
                if v != "base"
            }
    result = {
        "benchmark": "step_speed",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "head": head_rev.strip(),
        "base": args.base,
        "cpus": os.cpu_count(),
        "load_avg": {"before": load_before, "after": os.getloadavg()},
        "setup": {
            k: v for k, v in vars(args).items() if k not in ("child", "tree", "size", "urls", "set")
        },
        "summary": summary,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
