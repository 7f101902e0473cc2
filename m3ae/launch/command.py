"""`m3ae launch`: the command over `m3ae.launch.launch` (its options are the library's)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_launch_command(verbs: Any, recipes: str) -> argparse.ArgumentParser:
    """Register `launch`; `recipes` is the `--config` help that lists the shipped recipes."""
    p = verbs.add_parser(
        "launch", help="run `train` on a Ray cluster (embedded local Ray by default)"
    )
    p.add_argument("--config", required=True, help=recipes)
    p.add_argument("--workdir", required=True, help="output directory, reachable by every host")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (default: RAY_ADDRESS, else an embedded local Ray)",
    )
    p.add_argument("--hosts", type=int, default=1, help="JAX processes (host actors)")
    p.add_argument("--cpus-per-host", type=float, default=1.0)
    p.add_argument("--devices-per-host", type=int, default=1, help="CPU devices per host process")
    p.add_argument("--accelerator", choices=("cpu", "gpu", "tpu"), default="cpu")
    p.add_argument("--chips-per-host", type=int, default=0, help="GPUs or TPU chips per host")
    p.add_argument("--local-cpus", type=int, default=None, help="CPUs of the embedded Ray")
    p.add_argument("--object-store-mb", type=int, default=512, help="embedded Ray object store")
    g = p.add_argument_group("recovery (see launch.log in the workdir)")
    g.add_argument(
        "--max-failures",
        type=int,
        default=2,
        help="restarts after losses and stalls; the count resets after --failure-reset-steps",
    )
    g.add_argument(
        "--failure-reset-steps",
        type=int,
        default=1000,
        help="steps of progress in one attempt that forgive the failures before it",
    )
    g.add_argument(
        "--max-preemptions", type=int, default=None, help="restarts after preemptions (unbounded)"
    )
    g.add_argument(
        "--capacity-timeout-s",
        type=float,
        default=600.0,
        help="how long to wait for nodes to place the hosts on, before each attempt",
    )
    g.add_argument(
        "--watchdog-factor",
        type=float,
        default=20.0,
        help="a stall is no finished step for this many median step times ...",
    )
    g.add_argument("--watchdog-floor-s", type=float, default=120.0, help="... but at least this")
    g.add_argument(
        "--watchdog-ceiling-s",
        type=float,
        default=3600.0,
        help="... and at most this (also the limit for the first step: compile, restore)",
    )
    g.add_argument(
        "--preempt-grace-s",
        type=float,
        default=300.0,
        help="on SIGTERM, how long the hosts get to checkpoint and stop",
    )
    g.add_argument(
        "--compilation-cache",
        default="auto",
        help="XLA's compiled steps kept for restarts: a folder, 'none', or 'auto' "
        "(<workdir>/compilation_cache for a local workdir)",
    )
    g = p.add_argument_group("TPU slice placement (one host per VM of one slice)")
    g.add_argument("--tpu-topology", default=None, help="e.g. 4x4 or 2x2x2 (sets --hosts)")
    g.add_argument("--tpu-version", default=None, help="e.g. v4, v5p, v6e")
    p.set_defaults(func=_launch)
    return p


def _launch(args: argparse.Namespace) -> int:
    from m3ae.launch import CapacityError, GaveUp, launch
    from m3ae.trainer.preemption import EXIT_PREEMPTED

    try:
        summary = launch(**_launch_options(args))
    except (CapacityError, GaveUp) as e:  # the job, not the input: one line, exit 1
        print(f"m3ae launch: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    print(f"workdir: {args.workdir}")
    if summary.get("preempted"):
        print(
            f"m3ae launch: stopped on request at step {summary.get('steps')} with a checkpoint; "
            "rerun the same command to resume"
        )
        return EXIT_PREEMPTED
    return 0


def _launch_options(args: argparse.Namespace) -> dict:
    return dict(
        spec=args.config,
        overrides=args.overrides,
        workdir=args.workdir,
        address=args.address,
        hosts=args.hosts,
        cpus_per_host=args.cpus_per_host,
        devices_per_host=args.devices_per_host,
        accelerator=args.accelerator,
        chips_per_host=args.chips_per_host,
        max_failures=args.max_failures,
        local_cpus=args.local_cpus,
        object_store_mb=args.object_store_mb,
        max_preemptions=args.max_preemptions,
        failure_reset_steps=args.failure_reset_steps,
        capacity_timeout_s=args.capacity_timeout_s,
        watchdog_factor=args.watchdog_factor,
        watchdog_floor_s=args.watchdog_floor_s,
        watchdog_ceiling_s=args.watchdog_ceiling_s,
        preempt_grace_s=args.preempt_grace_s,
        tpu_topology=args.tpu_topology,
        tpu_version=args.tpu_version,
        compilation_cache=args.compilation_cache,
    )
