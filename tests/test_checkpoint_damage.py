"""A damaged latest checkpoint: resume from the previous one, move the damaged one aside.

Real Orbax files on disk, damaged the way a full disk or a cut-short copy damages them."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3ae.trainer.checkpoint import Checkpoints


def make_state(step: int, width: int = 256) -> dict:
    # Random values so that the kernel is a separate, compressed data file (not inlined).
    kernel = jax.random.normal(jax.random.key(step), (64, width))
    return {
        "params": {"enc": {"kernel": kernel, "bias": jnp.full((width,), float(step))}},
        "step": jnp.asarray(step, jnp.int32),
    }


def abstract(width: int = 256) -> dict:
    return jax.eval_shape(lambda: make_state(0, width))


def write_run(workdir: Path, steps=(1, 2)) -> Path:
    ckpt = Checkpoints(workdir, 1, keep=5, sync=True)
    for step in steps:
        ckpt.save(step, make_state(step), {"position": step}, {"name": "tiny"}, force=True)
    ckpt.close()
    return workdir


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def tensor_file(step_dir: Path) -> Path:
    """The largest OCDBT data file: the one holding the kernel's values."""
    return max((step_dir / "state").rglob("d/*"), key=lambda p: p.stat().st_size)


def damage_tensor(step_dir: Path, workdir: Path) -> tuple[Path, str]:
    truncate(tensor_file(step_dir))
    return step_dir / "state", "params.enc.kernel"  # OCDBT names the array, not the data file


def damage_metadata(step_dir: Path, workdir: Path) -> tuple[Path, str]:
    path = truncate(step_dir / "state" / "_METADATA")
    return path, "JSONDecodeError"


def garbage_metadata(step_dir: Path, workdir: Path) -> tuple[Path, str]:
    path = step_dir / "state" / "_METADATA"
    path.write_bytes(b"\x00\x17 not json")
    return path, "JSONDecodeError"


def damage_manifest(step_dir: Path, workdir: Path) -> tuple[Path, str]:
    path = truncate(step_dir / "state" / "manifest.ocdbt")
    return path, "manifest"


def damage_data_state(step_dir: Path, workdir: Path) -> tuple[Path, str]:
    path = workdir / "data_state" / step_dir.name / "process_0.json"
    path.write_text("")
    return path, "Expecting value"


def remove_data_state(step_dir: Path, workdir: Path) -> tuple[Path, str]:
    path = workdir / "data_state" / step_dir.name / "process_0.json"
    path.unlink()
    return path, "missing"


DAMAGES = [
    damage_tensor,
    damage_metadata,
    garbage_metadata,
    damage_manifest,
    damage_data_state,
    remove_data_state,
]


def assert_state(state, step: int):
    expected = make_state(step)
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__)
def test_damaged_latest_falls_back_and_moves_it_aside(damage, tmp_path, capsys):
    workdir = write_run(tmp_path / "run")
    damaged_dir = workdir / "checkpoints" / "2"
    named, error = damage(damaged_dir, workdir)

    ckpt = Checkpoints(workdir, 1, keep=5, sync=True)
    assert ckpt.latest_step() == 2
    step, state, data_state = ckpt.restore(abstract())
    assert step == 1 and data_state == {"position": 1}
    assert_state(state, 1)

    lines = [line for line in capsys.readouterr().out.splitlines() if "checkpoint:" in line]
    assert len(lines) == 1, lines
    assert lines[0].startswith("m3ae: checkpoint: step 2 ")
    assert str(named) in lines[0] and error in lines[0] and "resuming from step 1" in lines[0]

    # Moved, not deleted: the damaged files are kept as they were, with the reason.
    aside = workdir / "checkpoints_damaged" / "2.1"
    assert not damaged_dir.exists() and (aside / "checkpoint" / "state").is_dir()
    assert (aside / "data_state").is_dir() and not (workdir / "data_state" / "2").exists()
    assert "step 2" in (aside / "reason.txt").read_text()
    assert ckpt.manager.all_steps() == [1] and ckpt.latest_step() == 1

    # The run goes on and saves step 2 again; a fresh manager sees it and restores it.
    ckpt.save(2, make_state(2), {"position": 2}, {"name": "tiny"}, force=True)
    ckpt.close()
    again = Checkpoints(workdir, 1, keep=5, sync=True)
    assert again.manager.all_steps() == [1, 2]
    step, state, data_state = again.restore(abstract())
    assert step == 2 and data_state == {"position": 2}
    assert_state(state, 2)
    again.close()


def test_repeated_damage_and_several_damaged_steps(tmp_path, capsys):
    workdir = write_run(tmp_path / "run", steps=(1, 2, 3))
    damage_metadata(workdir / "checkpoints" / "3", workdir)
    damage_tensor(workdir / "checkpoints" / "2", workdir)
    (workdir / "checkpoints_damaged" / "3.1").mkdir(parents=True)  # an earlier step 3, damaged
    ckpt = Checkpoints(workdir, 1, keep=5, sync=True)
    step, state, _ = ckpt.restore(abstract())
    assert step == 1
    assert_state(state, 1)
    out = capsys.readouterr().out
    assert "step 3 " in out and "step 2 " in out
    aside = sorted(p.name for p in (workdir / "checkpoints_damaged").iterdir())
    assert aside == ["2.1", "3.1", "3.2"]
    ckpt.close()


def test_every_checkpoint_damaged_is_one_line_and_moves_nothing(tmp_path):
    workdir = write_run(tmp_path / "run")
    damage_metadata(workdir / "checkpoints" / "2", workdir)
    damage_tensor(workdir / "checkpoints" / "1", workdir)
    ckpt = Checkpoints(workdir, 1, keep=5, sync=True)
    with pytest.raises(FileNotFoundError) as info:
        ckpt.restore(abstract())
    message = str(info.value)
    assert "\n" not in message
    assert f"no usable checkpoint in {workdir / 'checkpoints'}" in message
    assert "step 2: " in message and "_METADATA" in message
    assert "step 1: " in message and "params.enc.kernel" in message
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2"]
    assert not (workdir / "checkpoints_damaged").exists()
    ckpt.close()


def test_changed_model_is_one_line_and_moves_nothing(tmp_path, capsys):
    workdir = write_run(tmp_path / "run")
    ckpt = Checkpoints(workdir, 1, keep=5, sync=True)
    with pytest.raises(ValueError) as info:
        ckpt.restore(abstract(width=128))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint step 2 in {workdir / 'checkpoints'} was written by")
    assert "params/enc/bias has shape (256,) there but (128,) in this config" in message
    assert "(first of 2 differences)" in message and "--workdir" in message

    grown = {**abstract(), "extra": jax.ShapeDtypeStruct((3,), jnp.float32)}
    with pytest.raises(ValueError, match="extra is in this config but not in the checkpoint"):
        ckpt.restore(grown)
    # nn.scan's stacked layout against an unrolled checkpoint: the message names model.scan.
    stacked = {**abstract(), "params": {"blocks": abstract()["params"]}}
    with pytest.raises(ValueError, match=r"\(it was trained with model\.scan=False\)$"):
        ckpt.restore(stacked)

    assert "checkpoint:" not in capsys.readouterr().out
    assert ckpt.manager.all_steps() == [1, 2] and not (workdir / "checkpoints_damaged").exists()
    ckpt.close()


def test_explicit_damaged_step_is_an_error(tmp_path):
    workdir = write_run(tmp_path / "run")
    path, _ = damage_data_state(workdir / "checkpoints" / "2", workdir)
    ckpt = Checkpoints(workdir, 1, keep=5, sync=True)
    with pytest.raises(ValueError, match=f"checkpoint step 2 .* is damaged: {path}"):
        ckpt.restore(abstract(), step=2)
    assert ckpt.restore(abstract(), step=1)[0] == 1
    assert ckpt.manager.all_steps() == [1, 2]  # an explicit step never moves anything
    with pytest.raises(FileNotFoundError, match="no checkpoint step 7 in"):
        ckpt.restore(abstract(), step=7)
    ckpt.close()
