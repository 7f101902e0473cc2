"""The last lines of `make demo`: what the demo model learned, on data it never saw.

    python scripts/demo_report.py runs/demo

Reads `summary.json` (the final cross-modal evaluation on the held-out shard) and the two
probes that `make demo` runs on openclipart drawings left out of pretraining
(`probe/probe.json` for the model, `probe-random/probe.json` for the same encoder at random
init), and prints them side by side, then the same recipe's spread over seeds from the committed
experiment (`experiments/results/transfer.json`), so one run can be read against it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(workdir: str) -> int:
    root = Path(workdir)
    summary = json.loads((root / "summary.json").read_text())
    cross = {
        k.split("/", 1)[1]: v for k, v in summary.get("eval", {}).items() if "crossmodal/" in k
    }
    print(f"== what {workdir} learned (step {summary.get('steps')}) ==")
    if cross:
        print(
            f"cross-modal gain on held-out drawings: {cross['crossmodal_gain']:+.3f} nats "
            f"(masked words {cross['text_loss_true_image']:.3f} with the true drawing, "
            f"{cross['text_loss_other_image']:.3f} with another; accuracy "
            f"{100 * cross['text_accuracy_true_image']:.1f}% vs "
            f"{100 * cross['text_accuracy_other_image']:.1f}%)"
        )
        print(
            f"masked-patch loss / mean-colour baseline: {cross['image_loss_ratio']:.3f} "
            f"({cross['image_loss_with_caption']:.4f} vs {cross['image_loss_baseline']:.4f})"
        )
    probes = {}
    for name in ("probe", "probe-random"):
        path = root / name / "probe.json"
        if path.is_file():
            probes[name] = json.loads(path.read_text())
    if len(probes) == 2:
        ours, rand = probes["probe"], probes["probe-random"]
        print(
            f"{ours.get('evaluator', 'ridge')} probe, openclipart categories on "
            f"{ours.get('test_size', '?')} unseen drawings ({ours.get('excluded', 0)} trained-on "
            f"drawings excluded): top-1 {100 * ours['lp_acc1']:.1f}% vs "
            f"{100 * rand['lp_acc1']:.1f}% at random init; mean per-class recall "
            f"{100 * ours['lp_mean_per_class_recall']:.1f}% vs "
            f"{100 * rand['lp_mean_per_class_recall']:.1f}%"
        )
    seeds_result = Path(__file__).resolve().parents[1] / "experiments/results/transfer.json"
    if seeds_result.is_file():
        result = json.loads(seeds_result.read_text())
        arm = result["summary"].get("m3ae", {})
        if "crossmodal_gain" in arm:
            n = len([r for r in result["runs"] if r["arm"] == "m3ae"])
            gain = arm["crossmodal_gain"]
            line = f"this recipe over {n} seeds ({seeds_result.name}): gain "
            line += f"{gain['mean']:+.3f} ± {gain['std']:.3f} nats"
            if "random" in result["summary"]:
                ours = arm["openclipart_unseen/ridge"]
                rand = result["summary"]["random"]["openclipart_unseen/ridge"]
                line += f", ridge probe {ours['mean']:.1f} ± {ours['std']:.1f}% vs "
                line += f"{rand['mean']:.1f} ± {rand['std']:.1f}% at random init"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/demo"))
