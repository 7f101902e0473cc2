"""The optional TensorFlow extra, `pip install 'm3ae[tf]'` (tensorflow-cpu, tensorflow-datasets).

Only the TF-only inputs and outputs need it: `--data tfds:NAME` (probe, fine-tune) and
`m3ae export --format savedmodel`. TFRecord files are read and written without it
(`pipelines.tfrecord`). Import TensorFlow through here, where it is needed and not before, so
that every other verb starts without it and a missing extra is one line naming what to install:

    tf = import_tensorflow("m3ae export --format savedmodel")
    tfds = import_tfds("--data tfds:fashion_mnist")
"""

from __future__ import annotations

import os
from types import ModuleType

INSTALL = "pip install 'm3ae[tf]'"


class MissingExtra(ValueError):
    """A TF-only input or output was asked for without the `tf` extra installed."""


def _quiet() -> None:
    """TensorFlow's start-up chatter off unless the user set these: its C++ log, and the oneDNN
    notice TF 2.21 prints whatever the log level (what we run, TFDS reading and XLA programs of
    a SavedModel, does not use oneDNN's fused kernels)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def import_tensorflow(what: str) -> ModuleType:
    """`tensorflow`, or `MissingExtra` saying that `what` needs the extra."""
    _quiet()
    try:
        import tensorflow as tf
    except ImportError as e:
        message = f"{what} needs TensorFlow ({e.msg}); install the extra: {INSTALL}"
        raise MissingExtra(message) from None
    return tf


def import_tfds(what: str) -> ModuleType:
    """`tensorflow_datasets`, or `MissingExtra` saying that `what` needs the extra."""
    import_tensorflow(what)
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise MissingExtra(
            f"{what} needs TensorFlow Datasets ({e.msg}); install the extra: {INSTALL}"
        ) from None
    return tfds
