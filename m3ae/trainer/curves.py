"""`m3ae plot`: a run's training curves as one PNG, from its `metrics.jsonl` alone.

    m3ae plot runs/demo                              # -> runs/demo/curves.png
    m3ae plot runs/m3ae runs/mae --out compare.png   # runs overlaid, one colour each
    m3ae plot runs/demo --keys loss,paired/text_loss # only these series

No TensorBoard needed: the JSONL file the trainer always writes (local or on object storage) is
read row by row; a row cut off by a kill is skipped and counted. Panels, each drawn only when the
runs logged something for it: losses (training rows; the `eval` rows' losses as markers),
accuracies, throughput (`samples_per_s` or `tokens_per_s`, with the data-wait fraction), the
learning rate, and the other evaluation scalars (cross-modal gain, probe accuracy, ...). Rows of
a resumed run are plotted once: a step logged again replaces the earlier row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import defaultdict
from typing import Any

from pipelines import storage

PANELS = ("loss", "accuracy", "throughput", "learning rate", "evaluation")
THROUGHPUT = ("samples_per_s", "tokens_per_s")
SKIPPED = {"step", "total_steps", "seconds", "grad_norm", "mfu", "nonfinite_steps"}


def read_metrics(workdir: str) -> tuple[dict[str, dict[int, float]], int]:
    """`series name -> {step: value}` of a workdir's metrics.jsonl (eval scalars named
    `eval/<key>`), and the number of unreadable rows."""
    path = storage.resolve(workdir) / "metrics.jsonl"
    if not storage.is_file(path):
        raise FileNotFoundError(f"{workdir}: no metrics.jsonl (is it a training workdir?)")
    series: dict[str, dict[int, float]] = defaultdict(dict)
    bad = 0
    for line in storage.read_text(path).splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            bad += 1
            continue
        for key, value in _scalars(row).items():
            series[key][step] = value
    return dict(series), bad


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in row.items():
        if key == "eval" and isinstance(value, dict):
            out.update({f"eval/{k}": float(v) for k, v in value.items() if _number(v)})
        elif key not in SKIPPED and _number(value):
            out[key] = float(value)
    return out


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def panel_of(key: str) -> str | None:
    """Which panel a series goes to (None: not plotted unless asked for by `--keys`)."""
    name = key.rsplit("/", 1)[-1]
    if key.startswith("eval/"):  # the headline numbers only; --keys draws any other
        variant = any(t in name for t in ("baseline", "no_", "other_", "with_", "true_"))
        if name.endswith("loss") and not variant:
            return "loss"
        if any(t in name for t in ("accuracy", "acc1", "top1")) and not variant:
            return "accuracy"
        if name.endswith("_gain") or name == "mean_per_class_recall":
            return "evaluation"
        return None
    if name.endswith("loss"):
        return "loss"
    if "accuracy" in name:
        return "accuracy"
    if key in THROUGHPUT or key == "data_wait_fraction":
        return "throughput"
    if key == "lr":
        return "learning rate"
    return None


def plot(
    workdirs: list[str], out: str | None = None, keys: list[str] | None = None
) -> dict[str, Any]:
    """Draw the runs' curves into `out` (default `<first workdir>/curves.png`); returns what
    was drawn: the file, the panels, the series per run, and skipped rows."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    runs = {w: read_metrics(w) for w in workdirs}
    chosen: dict[str, dict[str, dict[int, float]]] = {}
    for w, (series, _) in runs.items():
        if keys:
            missing = [k for k in keys if k not in series]
            if missing:
                raise ValueError(f"{w}: no series {missing}; it has {sorted(series)}")
            series = {k: series[k] for k in keys}
        if "samples_per_s" in series:  # one rate per run: samples, else tokens
            series = {k: v for k, v in series.items() if k != "tokens_per_s"}
        chosen[w] = {k: v for k, v in series.items() if panel_of(k) or keys}
    panels = [p for p in PANELS if any(_panel(k, keys) == p for s in chosen.values() for k in s)]
    if not panels:
        raise ValueError(f"nothing to plot in {workdirs}: no logged rows yet?")
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.8 * len(panels)), squeeze=False)
    # A colour per series name (the same in every run), a line style per run.
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = sorted({k for s in chosen.values() for k in s})
    colors = {k: cycle[i % len(cycle)] for i, k in enumerate(names)}
    dashes = ("-", "--", ":", "-.")
    for ax, panel in zip(axes[:, 0], panels, strict=True):
        for i, (w, series) in enumerate(chosen.items()):
            run = _label(w) if len(workdirs) > 1 else ""
            for key in sorted(k for k in series if _panel(k, keys) == panel):
                steps = sorted(series[key])
                values = [series[key][s] for s in steps]
                style = dict(linestyle=dashes[i % len(dashes)])
                if key.startswith("eval/") or len(steps) == 1:
                    style["marker"] = "o"
                if len(steps) == 1:
                    style["linestyle"] = ""
                if key == "data_wait_fraction":  # a fraction beside a rate: its own axis
                    twin = ax.twinx()
                    twin.plot(steps, values, color="grey", alpha=0.6, label=key)
                    twin.set_ylabel("data wait fraction")
                    twin.set_ylim(0, 1)
                    continue
                name = f"{run}: {key}" if run else key
                ax.plot(steps, values, color=colors[key], label=name, **style)
        if panel == "loss" and all(v > 0 for s in chosen.values() for k, d in s.items()
                                   if _panel(k, keys) == "loss" for v in d.values()):  # fmt: skip
            ax.set_yscale("log")
        ax.set_ylabel(panel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(", ".join(_label(w) for w in workdirs), fontsize=10)
    fig.tight_layout()
    out = out or str(storage.resolve(workdirs[0]) / "curves.png")
    if storage.is_url(out):
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        storage.write_bytes(out, buf.getvalue())
    else:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        fig.savefig(out, dpi=110)
    plt.close(fig)
    return {
        "out": out,
        "panels": panels,
        "series": {w: sorted(s) for w, s in chosen.items()},
        "bad_rows": {w: bad for w, (_, bad) in runs.items()},
    }


def _panel(key: str, keys: list[str] | None) -> str | None:
    return panel_of(key) or ("evaluation" if keys else None)


def _label(workdir: str) -> str:
    return os.path.basename(str(workdir).rstrip("/")) or str(workdir)


def add_plot_command(verbs: Any) -> argparse.ArgumentParser:
    p = verbs.add_parser("plot", help="training curves of one or more workdirs as a PNG")
    p.add_argument("workdirs", nargs="+", help="training workdirs (holding metrics.jsonl)")
    p.add_argument("--out", default=None, help="PNG path (default: <first workdir>/curves.png)")
    p.add_argument("--keys", default=None, help="comma-separated series (default: all known)")
    p.set_defaults(func=run_plot)
    return p


def run_plot(args: argparse.Namespace) -> int:
    keys = [k for k in args.keys.split(",") if k] if args.keys else None
    result = plot(args.workdirs, args.out, keys)
    for w, bad in result["bad_rows"].items():
        if bad:
            print(f"m3ae plot: {w}: skipped {bad} unreadable row(s) of metrics.jsonl")
    count = sum(len(s) for s in result["series"].values())
    print(f"wrote {result['out']} ({count} series in {len(result['panels'])} panels)")
    return 0
