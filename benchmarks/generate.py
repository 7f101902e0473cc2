"""`m3ae generate` with the key/value cache against the reference that recomputes the prefix.

    .venv/bin/python benchmarks/generate.py --out benchmarks/results/generate.json
    .venv/bin/python benchmarks/generate.py --size base --new 256,512 --batch 4   # a GPU

Both variants are `lm.generate.generate` itself (cache=True / cache=False) on the same randomly
initialised LM preset (`lm_config(size)`, GPT-2 vocabulary, float32), the same prompt and the
same rng, drawing top-k samples as the command does (`--top-k 40`, no EOS, so every call makes
all `new` tokens). Each (length, variant) is called once first: that call's time minus the
steady-state median is reported as compile time. Then the variants are timed in interleaved
rounds (every length and variant once per round) and the median per variant is kept, so a load
change on a shared machine hits all of them alike. The tokens of the two variants are compared
too (`tokens_match`). The load average is recorded before and after.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lm.generate import generate
from lm.model import LM, lm_config

VARIANTS = {"cached": True, "uncached": False}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="small")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new", default="64,128", help="max_new_tokens values, comma-separated")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/generate.json")
    args = p.parse_args()

    load_before = os.getloadavg()
    t_start = time.perf_counter()
    config = lm_config(args.size)
    model = LM(**config)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    prompt = np.asarray(
        jax.random.randint(jax.random.PRNGKey(1), (args.batch, args.prompt_len), 0, 50000)
    )  # (B, P)
    rng = jax.random.PRNGKey(2)
    lengths = [int(n) for n in args.new.split(",")]

    def call(new: int, cache: bool) -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        ids = generate(model, params, prompt, new, top_k=args.top_k, rng=rng, cache=cache)
        return time.perf_counter() - t0, ids

    runs: dict[str, dict[str, Any]] = {}
    for new in lengths:
        for name, cache in VARIANTS.items():
            first, ids = call(new, cache)
            runs[f"{name}/{new}"] = dict(new=new, first_call_s=first, ids=ids, times=[])
            print(f"{name}/{new}: first call {first:.2f} s", flush=True)
    for r in range(args.rounds):
        for new in lengths:
            for name, cache in VARIANTS.items():
                runs[f"{name}/{new}"]["times"].append(call(new, cache)[0])
        print(f"round {r + 1}/{args.rounds}", flush=True)

    results: dict[str, Any] = {}
    for new in lengths:
        cached, uncached = runs[f"cached/{new}"], runs[f"uncached/{new}"]
        speedup = statistics.median(uncached["times"]) / statistics.median(cached["times"])
        for name in VARIANTS:
            run = runs[f"{name}/{new}"]
            median = statistics.median(run["times"])
            results[f"{name}/{new}"] = {
                "prompt_len": args.prompt_len,
                "new_tokens": new,
                "call_s_median": median,
                "call_s_all": run["times"],
                "tokens_per_s": args.batch * new / median,
                "ms_per_token": 1e3 * median / new,
                "first_call_s": run["first_call_s"],
                "compile_s": run["first_call_s"] - median,
            }
        results[f"speedup/{new}"] = speedup
        results[f"tokens_match/{new}"] = bool(np.array_equal(cached["ids"], uncached["ids"]))
        print(
            f"new {new}: cached {results[f'cached/{new}']['tokens_per_s']:.1f} tok/s, uncached "
            f"{results[f'uncached/{new}']['tokens_per_s']:.1f} tok/s, x{speedup:.2f}, "
            f"tokens match: {results[f'tokens_match/{new}']}"
        )
    out = {
        "benchmark": "generate",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": str(jax.devices()[0].device_kind),
        "devices": jax.device_count(),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average": os.getloadavg(),
        "wall_s": time.perf_counter() - t_start,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "model_config": config,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
