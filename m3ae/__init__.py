"""m3ae package.

    from m3ae import M3AE, PretrainedM3AE   # the flax module; what `M3AE.from_pretrained` returns
    from m3ae import Classifier             # a fine-tuned classifier (`Classifier.from_pretrained`)

They are imported on first access (PEP 562), so `import m3ae.cli` and the data pipelines do
not pay for flax and the tokenizer. Modules that moved into `m3ae/trainer/` and
`m3ae/evaluate/` stay importable by their old names (`m3ae/moved.py`).
"""

from typing import Any

from m3ae import moved

moved.install()

_LAZY = {
    "M3AE": "m3ae.model",
    "PretrainedM3AE": "m3ae.pretrained_m3ae",
    "Classifier": "m3ae.classifier",
    "PretrainedClassifier": "m3ae.pretrained_classifier",
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'm3ae' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
