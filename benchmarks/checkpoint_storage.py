"""Checkpoint save and restore time: local disk vs a local S3-protocol server, tiny and small.

    .venv/bin/python benchmarks/checkpoint_storage.py  # -> results/checkpoint_storage.json
    # --sizes tiny,small   --rounds 3

What is saved is what the trainer saves: an M3AE train state of the preset (parameters plus
AdamW's two moments, float32, plus a step counter), the config as JSON and a data-iterator state,
through `m3ae.trainer.checkpoint.Checkpoints` with synchronous saves (`sync=True`, so `save`
returns when the step is committed). Restore is a fresh `Checkpoints` of the same workdir
restoring the latest step into the abstract state: the checks of a resume (metadata, the model
comparison, the data state) and the arrays. Each round writes a new step to the same workdir.

The S3 server is moto (`moto_server`, from `moto[server]`) in its own process on 127.0.0.1, a
pure-Python server keeping objects in memory: the figures show what the S3 code path costs here
(requests, TensorStore's s3 driver, fsspec), not what a real bucket would give. Both targets
share the machine's 2 cores with everything else running, so the load average is recorded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import jax
import numpy as np

VENV_BIN = Path(sys.executable).parent


def train_state(size: str) -> dict:
    """The preset's parameters and AdamW state, as the trainer's state holds them."""
    import optax

    from m3ae.model import M3AE, model_config

    model = M3AE(**model_config(size))
    image = np.zeros((1, 224, 224, 3), np.float32)
    text = np.zeros((1, 16), np.int32)
    rngs = {"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(1)}
    params = jax.jit(lambda: model.init(rngs, image, text, np.zeros((1, 16), np.float32)))()
    params = params["params"]
    opt = optax.adamw(1e-4).init(params)
    return {"params": params, "opt_state": opt, "step": jax.numpy.asarray(0, jax.numpy.int32)}


def start_s3() -> tuple[subprocess.Popen, str]:
    """moto_server on a free loopback port, with a bucket; the AWS variables point at it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError(f"moto_server did not start on {endpoint}") from None
            time.sleep(0.2)
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_ENDPOINT_URL=endpoint,
        AWS_REGION="us-east-1",
    )
    from pipelines import storage

    storage.filesystem("s3://bench").mkdir("bench")
    return server, "s3://bench"


def stored_bytes(workdir: str, step: int) -> int:
    from pipelines import storage

    root = f"{workdir}/checkpoints/{step}"
    if storage.is_url(root):
        fs = storage.filesystem(root)
        return sum(fs.du(root, total=False).values())
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def measure(workdir: str, state: dict, rounds: int) -> dict:
    """Save `rounds` steps, restoring each right after; seconds per round and the size."""
    from m3ae.trainer.checkpoint import Checkpoints

    abstract = jax.eval_shape(lambda: state)
    data_state = {"position": 0, "stats": {"seen": 0}}
    saves, restores = [], []
    for step in range(1, rounds + 1):
        ckpt = Checkpoints(workdir, 1, keep=2, sync=True)
        t0 = time.perf_counter()
        ckpt.save(step, state, data_state, {"benchmark": True}, force=True)
        ckpt.wait()
        saves.append(time.perf_counter() - t0)
        ckpt.close()
        t0 = time.perf_counter()
        fresh = Checkpoints(workdir, 1, keep=2, sync=True)
        got, restored, _ = fresh.restore(abstract)
        jax.block_until_ready(restored)
        restores.append(time.perf_counter() - t0)
        fresh.close()
        assert got == step
    size = stored_bytes(workdir, rounds)
    return {
        "bytes": size,
        "save_s": saves,
        "restore_s": restores,
        "save_s_median": statistics.median(saves),
        "restore_s_median": statistics.median(restores),
        "save_mb_per_s": size / 1e6 / statistics.median(saves),
        "restore_mb_per_s": size / 1e6 / statistics.median(restores),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/checkpoint_storage.json")
    args = parser.parse_args()

    from importlib.metadata import version

    begin, load_before = time.perf_counter(), os.getloadavg()
    server, bucket = start_s3()
    results: dict[str, dict] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="m3ae-ckpt-bench-") as tmp:
            for size in args.sizes.split(","):
                state = train_state(size)
                n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
                row: dict = {"parameters": int(n_params)}
                for target, workdir in (("local", f"{tmp}/{size}"), ("s3", f"{bucket}/{size}")):
                    row[target] = measure(workdir, state, args.rounds)
                    row[target]["load_avg_after"] = os.getloadavg()
                    print(
                        f"{size} {target}: {row[target]['bytes'] / 1e6:.1f} MB, save "
                        f"{row[target]['save_s_median']:.2f} s, restore "
                        f"{row[target]['restore_s_median']:.2f} s",
                        flush=True,
                    )
                row["s3_over_local"] = {
                    k: row["s3"][f"{k}_s_median"] / row["local"][f"{k}_s_median"]
                    for k in ("save", "restore")
                }
                results[size] = row
    finally:
        server.terminate()
        server.wait(timeout=30)
    report = {
        "benchmark": "checkpoint_storage",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "device": jax.devices()[0].platform,
        "cpu_count": os.cpu_count(),
        "load_avg": {"before": load_before, "after": os.getloadavg()},
        "jax_version": jax.__version__,
        "orbax_checkpoint_version": version("orbax-checkpoint"),
        "tensorstore_version": version("tensorstore"),
        "s3fs_version": version("s3fs"),
        "python": platform.python_version(),
        "s3_server": "moto_server (moto[server]) on 127.0.0.1, in-memory, its own process",
        "rounds": args.rounds,
        "sync_save": True,
        "wall_s": time.perf_counter() - begin,
        "sizes": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
