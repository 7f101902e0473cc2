"""Where modules moved when `m3ae/` got its rooms (trainer, evaluate): the old import paths keep
working, e.g. `from m3ae.train import train` imports `m3ae.trainer.train` and binds it under
both names. New code imports the new paths; this table is the one place the old ones live.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

MOVED = {
    "m3ae.train": "m3ae.trainer.train",
    "m3ae.step": "m3ae.trainer.step",
    "m3ae.checkpoint": "m3ae.trainer.checkpoint",
    "m3ae.optim": "m3ae.trainer.optim",
    "m3ae.sharding": "m3ae.trainer.sharding",
    "m3ae.metrics": "m3ae.trainer.metrics",
    "m3ae.preflight": "m3ae.trainer.preflight",
    "m3ae.tasks": "m3ae.task",
    "m3ae.embed": "m3ae.evaluate.embed",
    "m3ae.embedder": "m3ae.evaluate.embed_worker",
    "m3ae.probe": "m3ae.evaluate.probe",
    "m3ae.probe_eval": "m3ae.evaluate.probe_fit",
    "m3ae.probe_knn": "m3ae.evaluate.probe_knn",
    "m3ae.probe_lars": "m3ae.evaluate.probe_lars",
    "m3ae.probe_data": "m3ae.evaluate.probe_data",
    "m3ae.probe_exclude": "m3ae.evaluate.probe_exclude",
    "m3ae.probe_cli": "m3ae.evaluate.probe_cli",
    "m3ae.probe_hook": "m3ae.evaluate.probe_hook",
    "m3ae.crossmodal": "m3ae.evaluate.crossmodal",
    "m3ae.zeroshot": "m3ae.evaluate.zeroshot",
    "m3ae.api": "m3ae.pretrained_m3ae",
    "m3ae.safe_pickle": "pipelines.safe_pickle",
    # After `import m3ae` (which installs this table) only:
    "pipelines.sources": "pipelines.datasets",
    "pipelines.shard_sources": "pipelines.shard_records",
    "pipelines.text_sources": "pipelines.text_documents",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module name and loads it as the module at its new path."""

    def find_spec(self, name, path=None, target=None):
        if name not in MOVED:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec) -> ModuleType:
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        pass  # already executed under its new name


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
