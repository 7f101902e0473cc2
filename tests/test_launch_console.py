"""The launcher's console: the bar drawn once per update, and forwarded lines above it."""

from __future__ import annotations

import io
import sys
import threading
from types import SimpleNamespace

from tqdm import tqdm

from m3ae.launch.attempt import Attempt
from m3ae.launch.console import above_the_bar


def bar_on(out: io.StringIO) -> tqdm:
    return tqdm(desc="train", total=10, file=out, ncols=80, mininterval=0, miniters=1)


def test_one_draw_per_update():
    out = io.StringIO()
    bar = bar_on(out)
    before = out.getvalue().count("train:")
    Attempt.draw(SimpleNamespace(bar=bar), {"step": 3, "loss": 1.25, "samples_per_s": 99.0})
    text = out.getvalue()
    assert text.count("train:") - before == 1, text
    assert "3/10" in text and "loss=1.250" in text and "sps=99.0" in text
    bar.close()


def test_forwarded_lines_land_above_the_bar_whole():
    real = io.StringIO()  # the terminal: the bar and the forwarded lines share it
    bar = bar_on(real)
    saved = sys.stdout
    sys.stdout = real  # stands for the terminal: the wrapper writes to what sys.stdout was
    try:
        with above_the_bar(bar):

            def host() -> None:  # Ray's log thread prints in pieces
                for i in range(20):
                    sys.stdout.write(f"(HostActor pid=1) line {i} ")
                    sys.stdout.write("end\n")

            threads = [threading.Thread(target=host) for _ in range(3)]
            for t in threads:
                t.start()
            for i in range(20):
                bar.update(0)
                bar.n = i % 10
                bar.refresh()
            for t in threads:
                t.join()
            sys.stdout.write("no newline yet")
        assert sys.stdout is real
    finally:
        sys.stdout = saved
    bar.close()
    text = real.getvalue()
    starts = [i for i in range(len(text)) if text.startswith("(HostActor", i)]
    assert len(starts) == 60
    # Each line begins where the bar was cleared (\r) or after another line, never after bar text.
    assert all(text[i - 1] in "\r\n" for i in starts), [text[i - 40 : i] for i in starts]
    lines = [line for line in text.replace("\r", "\n").split("\n") if "HostActor" in line]
    assert all(line.endswith(" end") and line.count("HostActor") == 1 for line in lines)
    assert "no newline yet\n" in text  # a partial line is flushed on the way out


def test_a_disabled_bar_changes_nothing():
    bar = tqdm(disable=True)
    before = sys.stdout
    with above_the_bar(bar):
        assert sys.stdout is before
