"""Where the M3AE train step's time goes: a breakdown from XLA's own profile, against rooflines.

    .venv/bin/python benchmarks/step_profile.py --size base --batch 8 \
        --out benchmarks/results/step_profile.json
    # --image-size 256 --text-length 64 --steps 3 --dtype float32

The step is the trainer's own (`m3ae.trainer.step.make_train_step`: forward, backward, AdamW
and the non-finite guard, state donated), on real openclipart drawings written to shards here.
A few steps run under `jax.profiler.trace`; XLA:CPU records one event per executed HLO
instruction (a thunk: a fusion, a library matmul, a copy). Each one is named back to the
compiled HLO: what it computes (a dot inside means a matmul, else exp/reduce, tanh, ...) and
the model path in its metadata (`encoder/block_3/attn/qkv`, `transpose(jvp(...))` for the
backward pass, no `jvp` at all for the optimizer). Per category: milliseconds per step, FLOPs
(dots: 2 x output size x contracted size) or bytes (operands + result), and the fraction of the
roofline measured in the same run (a large float32 matmul; a large elementwise pass for memory
bandwidth). "host/idle" is the step's wall time that no thunk covered: dispatch, argument
handling and the gaps between thunks.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from m3ae.config import load_config
from m3ae.trainer.cpu_memory import keep_step_memory
from m3ae.trainer.optim import make_optimizer
from m3ae.trainer.sharding import global_batch, make_mesh
from m3ae.trainer.step import init_state, make_train_step
from m3ae.trainer.task import make_task

DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1}
DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
ARRAY = re.compile(r"\b(f32|bf16|f16|s32|u32|s8|u8|pred|s64|u64|f64)\[([\d,]*)\]")


# ------------------------------------------------------------------------------ HLO text
def split_type(rest: str) -> tuple[str, str]:
    """`f32[8,81]{1,0} dot(...)` -> (type, remainder); tuple types `( ... )` kept whole."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].lstrip()
    head, _, tail = rest.partition(" ")
    return head, tail


def type_bytes(text: str) -> int:
    return sum(
        DTYPE_BYTES.get(dt, 8) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
        for dt, dims in ARRAY.findall(text)
    )


def dims_of(text: str) -> list[int]:
    m = ARRAY.search(text)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def parse_hlo(text: str) -> dict[str, dict[str, Any]]:
    """Every instruction of the module: opcode, type, operands, called computations, op_name,
    and for dots their FLOPs; plus `computations` (name -> instruction names)."""
    insts: dict[str, dict[str, Any]] = {}
    comps: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            current = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            comps[current] = []
            continue
        m = DEF.match(line) if current else None
        if not m:
            continue
        name, rest = m.groups()
        typ, rest = split_type(rest)
        op = re.match(r"([\w\-]+)\((.*?)\)(.*)$", rest)
        if not op:
            continue
        opcode, args, attrs = op.groups()
        called = re.findall(
            r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)", attrs
        )
        called += re.findall(r"branch_computations=\{([^}]*)\}", attrs)
        insts[name] = {
            "opcode": opcode,
            "type": typ,
            "operands": re.findall(r"%([\w.\-]+)", args),
            "calls": [c.strip().lstrip("%") for x in called for c in x.split(",")],
            "op_name": (re.search(r'op_name="([^"]*)"', attrs) or [None, ""])[1],
            "attrs": attrs,
        }
        comps[current].append(name)
    for inst in insts.values():
        if inst["opcode"] in ("dot", "convolution"):
            lhs = dims_of(insts.get(inst["operands"][0], {}).get("type", ""))
            contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst["attrs"])
            k = np.prod([lhs[int(i)] for i in contract.group(1).split(",") if i]) if contract else 1
            inst["flops"] = 2.0 * float(np.prod(dims_of(inst["type"]) or [1])) * float(k)
    return {"insts": insts, "comps": comps}


def inside(hlo: dict, name: str) -> list[dict[str, Any]]:
    """The instruction itself, or everything a fusion computes (nested fusions included)."""
    inst = hlo["insts"][name]
    if inst["opcode"] != "fusion":
        return [inst]
    out = []
    for comp in inst["calls"]:
        for inner in hlo["comps"].get(comp, []):
            out += (
                inside(hlo, inner)
                if hlo["insts"][inner]["opcode"] == "fusion"
                else [hlo["insts"][inner]]
            )
    return out


# ------------------------------------------------------------------------------ categories
MATMUL_LAYERS = (
    ("attn/qkv", "qkv projection"), ("attn/out", "attention output projection"),
    ("mlp/fc1", "MLP fc1"), ("mlp/fc2", "MLP fc2"), ("image_embed", "patch embedding"),
    ("dec_proj", "decoder input projection"), ("image_head", "image head"),
    ("text_head", "text head"), ("text_embed", "text embedding"),
)  # fmt: skip


LOSS_PATHS = ("log_softmax", "take_along_axis", "logsumexp", "text_head", "image_head", "loss")


def categorise(hlo: dict, name: str) -> tuple[str, str, float, float]:
    """(category, pass, FLOPs, bytes) of one executed instruction."""
    inst = hlo["insts"][name]
    body = inside(hlo, name)
    opcodes = {i["opcode"] for i in body}
    dots = [i for i in body if i["opcode"] in ("dot", "convolution")]
    path = next((i["op_name"] for i in dots if i["op_name"]), inst["op_name"]) or ""
    if "transpose(jvp" in path:
        phase = "backward"
    elif "jvp(" in path:
        phase = "forward"
    else:
        phase = "optimizer/step"
    where = "encoder " if "/encoder/" in path else "decoder " if "/decoder/" in path else ""
    flops = sum(i.get("flops", 0.0) for i in dots)
    out = type_bytes(inst["type"])
    sizes = [type_bytes(hlo["insts"].get(o, {}).get("type", "")) for o in inst["operands"]]
    if {"gather", "dynamic-slice", "scatter", "dynamic-update-slice"} & opcodes:
        sizes = [min(size, out) for size in sizes]  # a slice of the operand is read, not all
    moved = float(sum(sizes) + out)
    if phase == "optimizer/step":
        return "optimizer update (AdamW, grad norm, guard)", phase, flops, moved
    if dots:
        for key, label in MATMUL_LAYERS:
            if key in path:
                return f"matmul: {where}{label}", phase, flops, moved
        if "/attn/" in path or "dot_product_attention" in path:
            return f"matmul: {where}attention scores and values", phase, flops, moved
        return "matmul: other", phase, flops, moved
    if any(k in path for k in LOSS_PATHS):
        return "loss heads (log-softmax, label pick, MSE)", phase, flops, moved
    if "text_embed" in path:
        return "text embedding lookup and its gradient", phase, flops, moved
    if "/attn/" in path:
        return "attention softmax and mask", phase, flops, moved
    if "LayerNorm" in path or "/ln_" in path or "/norm" in path:
        return "LayerNorm", phase, flops, moved
    if "/mlp/" in path or "tanh" in opcodes:
        return "GELU", phase, flops, moved
    if {"iota", "reduce"} <= opcodes:
        return "argmax (text accuracy metric)", phase, flops, moved
    if "embed_image" in path or "patchify" in path:
        return "patchify and image normalisation", phase, flops, moved
    if {"gather", "scatter", "dynamic-slice", "dynamic-update-slice", "sort"} & opcodes:
        return "masking (shuffle, gather, scatter)", phase, flops, moved
    if inst["opcode"] in ("copy", "transpose", "copy-start", "copy-done"):
        return "copies and transposes", phase, flops, moved
    return "other elementwise and reductions", phase, flops, moved


# ------------------------------------------------------------------------------ the profile
def thunk_events(trace_dir: str, module: str) -> list[tuple[str, int, int]]:
    """(instruction, start ns, duration ns) of every executed thunk of `module`. A thunk that
    hands its work to the thread pool records the wait as a separate `...Await` event on the
    same thread; that wait is the thunk's too, so its end extends the thunk's duration."""
    from jax.profiler import ProfileData

    events = []
    for path in glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True):
        for plane in ProfileData.from_file(path).planes:
            for line in plane.lines:
                last = None  # index in `events` of this thread's latest thunk of `module`
                for ev in sorted(line.events, key=lambda e: e.start_ns):
                    stats = dict(ev.stats)
                    if stats.get("hlo_module") == module and "hlo_op" in stats:
                        events.append([stats["hlo_op"], ev.start_ns, ev.duration_ns])
                        last = len(events) - 1
                    elif "hlo_op" in stats:
                        last = None
                    elif last is not None and "Await" in ev.name:
                        _, start, _ = events[last]
                        events[last][2] = max(events[last][2], ev.start_ns + ev.duration_ns - start)
    return [tuple(e) for e in events]


def covered_ns(events: list[tuple[str, int, int]]) -> float:
    """Wall time during which at least one thunk ran (the union of their intervals)."""
    total, end = 0.0, -1
    for _, start, dur in sorted(events, key=lambda e: e[1]):
        stop = start + dur
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def memory_bandwidth(n_bytes: int = 512 * 2**20, repeats: int = 7) -> float:
    """DRAM bytes/s of a float32 `x * a + b` far larger than the caches (x read once, the result
    written once), in place as the step's donated state is (a fresh output buffer would time the
    kernel's page faults instead: ~4 vs ~27 GB/s here), the best of `repeats`."""
    f = jax.jit(lambda x: x * 1.0001 + 0.5, donate_argnums=0)
    x = f(jnp.ones((n_bytes // 4,), jnp.float32))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x = f(x)
        x.block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n_bytes / best


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    f(a, a).block_until_ready()
    return 2 * n**3 / min(_timed(f, a, a) for _ in range(repeats))


def cpu_description() -> dict[str, Any]:
    """The CPU's model name and the vector extensions that decide its matmul rates."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    model = re.search(r"model name\s*:\s*(.*)", info)
    flags = set((re.search(r"flags\s*:\s*(.*)", info) or [None, ""])[1].split())
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {"model": model.group(1) if model else "", "flags": [f for f in wanted if f in flags]}


def _timed(f, *args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------ the step
def first_batch(urls: str, size: int, batch: int, text_length: int) -> dict[str, np.ndarray]:
    """The first training batch of `urls` as the trainer's loader reads it (labels dropped)."""
    from pipelines.loader import Loader

    loader = Loader(
        urls, kind="paired", batch_size=batch, image_size=size, text_length=text_length,
        train=True, seed=0, workers=1, process_index=0, process_count=1,
    )  # fmt: skip
    arrays = next(iter(loader)).arrays
    return {k: v for k, v in arrays.items() if k != "cls"}


def real_batch(size: int, batch: int, text_length: int) -> tuple[str, dict[str, np.ndarray]]:
    """Shards of openclipart drawings at `size` px, and a batch of them as the trainer reads it."""
    from pipelines.shard_records import openclipart_records
    from pipelines.shard_writer import write_shards

    out = Path(tempfile.mkdtemp(prefix="step-profile-"))
    records = openclipart_records(size=size, limit=max(2 * batch, 24), shuffle_seed=0, workers=2)
    write_shards(records, out, samples_per_shard=max(2 * batch, 24), progress=False)
    urls = "::".join(sorted(str(p) for p in out.glob("*.tar")))
    return urls, first_batch(urls, size, batch, text_length)


def build_step(
    urls: str, arrays: dict, size: str, image_size: int, text_length: int, overrides: list[str]
) -> tuple[Any, Any, Any, dict]:
    """`(task, state, jitted step, batches)`: the trainer's own step of the `size` recipe (state
    donated) on `arrays`, with `urls` as its data and `overrides` on top."""
    batch = len(arrays["image"])
    config = load_config(
        f"m3ae_pretrain:{size}",
        [
            f"data.paired.urls={urls}", f"data.val_urls={urls.split('::')[0]}",
            f"data.image_size={image_size}", f"data.text_length={text_length}",
            f"optim.batch_size={batch}", *overrides,
        ],
    )  # fmt: skip
    task = make_task(config)
    tx, _ = make_optimizer(config.optim, 1000, 1)
    init, rng = init_state(task, tx, config.seed)
    step = jax.jit(make_train_step(task, tx, config), donate_argnums=0)
    batches = {"paired": global_batch(arrays, make_mesh(-1, 1, 1))}
    return task, jax.jit(init)(rng), step, batches


def build(args) -> tuple[Any, Any, Any, dict]:
    urls, arrays = real_batch(args.image_size, args.batch, args.text_length)
    overrides = [f"model.dtype={args.dtype}", *args.set]
    return build_step(urls, arrays, args.size, args.image_size, args.text_length, overrides)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="base")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--text-length", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    p.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 untimed)")
    p.add_argument("--out", default="benchmarks/results/step_profile.json")
    args = p.parse_args()
    memory = keep_step_memory()  # as the trainer's set-up does
    load_before = os.getloadavg()
    task, state, step, batches = build(args)
    t0 = time.perf_counter()
    compiled = step.lower(state, batches).compile()
    compile_s = time.perf_counter() - t0
    hlo = parse_hlo(compiled.as_text())
    module = re.match(r"HloModule (\S+?),", compiled.as_text()).group(1)
    for _ in range(2):  # warm-up: buffers, caches
        state, metrics = compiled(state, batches)
    jax.block_until_ready(metrics)
    walls = []
    for _ in range(args.steps):  # unprofiled steps: the profiler's own cost is not in these
        t0 = time.perf_counter()
        state, metrics = compiled(state, batches)
        jax.block_until_ready(metrics)
        walls.append(time.perf_counter() - t0)
    trace = tempfile.mkdtemp(prefix="step-profile-trace-")
    profiled = []
    with jax.profiler.trace(trace):
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, metrics = compiled(state, batches)
            jax.block_until_ready(metrics)
            profiled.append(time.perf_counter() - t0)
    events = thunk_events(trace, module)
    if not events:
        raise SystemExit(f"no thunk events of {module} in the profile ({trace})")
    peak, bandwidth = matmul_peak(), memory_bandwidth()

    rows: dict[tuple[str, str], dict[str, float]] = defaultdict(
        lambda: {"ms": 0.0, "flops": 0.0, "bytes": 0.0, "thunks": 0}
    )
    unknown = 0
    for name, _, dur in events:
        if name not in hlo["insts"]:
            unknown += 1
            continue
        category, phase, flops, moved = categorise(hlo, name)
        row = rows[(category, phase)]
        row["ms"] += dur / 1e6 / args.steps
        row["flops"] += flops / args.steps
        row["bytes"] += moved / args.steps
        row["thunks"] += 1 / args.steps
    wall_ms = 1e3 * statistics.median(profiled)
    busy_ms = covered_ns(events) / 1e6 / args.steps
    table = []
    for (category, phase), row in sorted(rows.items(), key=lambda kv: -kv[1]["ms"]):
        seconds = row["ms"] / 1e3
        if category.startswith("matmul"):
            roofline = "matmul peak"
            fraction = row["flops"] / seconds / peak if seconds else 0.0
        else:
            roofline = "memory bandwidth"
            fraction = row["bytes"] / seconds / bandwidth if seconds else 0.0
        share = row["ms"] / wall_ms
        table.append(
            {"category": category, "pass": phase, **row, "share_of_wall": share,
             "roofline": roofline, "fraction_of_roofline": fraction}
        )  # fmt: skip
    by_kind: dict[str, float] = defaultdict(float)
    for r in table:
        kind = "matmul" if r["category"].startswith("matmul") else r["category"]
        by_kind[kind] += r["ms"]
    result = {
        "benchmark": "step_profile",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "cpus": os.cpu_count(),
        "cpu": cpu_description(),
        "load_avg": {"before": load_before, "after": os.getloadavg()},
        "setup": vars(args) | {"task": task.name, "memory": memory},
        "compile_s": compile_s,
        "step_wall_ms_unprofiled": [1e3 * w for w in walls],
        "step_wall_ms_profiled": [1e3 * w for w in profiled],
        "thunk_busy_ms_per_step": busy_ms,
        "host_or_idle_ms_per_step": wall_ms - busy_ms,
        "thunk_sum_ms_per_step": sum(r["ms"] for r in table),
        "matmul_peak_flops_per_s": peak,
        "memory_bandwidth_bytes_per_s": bandwidth,
        "events_not_in_hlo": unknown,
        "by_kind_ms": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "table": table,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    plain = 1e3 * statistics.median(walls)
    print(
        f"{task.name}: step {wall_ms:.0f} ms profiled ({plain:.0f} ms unprofiled), thunks busy "
        f"{busy_ms:.0f} ms, peak {peak / 1e9:.0f} GFLOP/s, {bandwidth / 1e9:.1f} GB/s"
    )
    print(f"{'category':<52} {'pass':<15} {'ms':>8} {'share':>6} {'roofline':>9}")
    for r in table:
        print(f"{r['category']:<52} {r['pass']:<15} {r['ms']:8.1f} {r['share_of_wall']:6.1%} "
              f"{r['fraction_of_roofline']:9.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
