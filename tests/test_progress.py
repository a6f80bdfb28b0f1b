"""Progress bars (helpers.core.progress): a few plain lines in a log, tqdm's redrawn bar on a terminal,
and a fit's line per epoch without any bar (progress="epochs")."""

from __future__ import annotations

import io
import re
from dataclasses import replace

import pandas as pd
import pytest
import tqdm.std

from helpers.core import config, progress
from helpers.training import train


class Clock:
    """tqdm's clock, moved by the test: a loop of minutes runs in milliseconds."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(tqdm.std, "time", fake)  # read by each bar as it is made
    return fake


def test_a_log_gets_a_line_every_interval_and_the_final_state(clock):
    log = io.StringIO()
    for _ in progress.progress_bar(range(1000), desc="embedding", file=log, mininterval=2.0):
        clock.now += 0.1  # 100 s in all: lines at about 30, 60 and 90 s, then the final one
    text = log.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and "\x1b" not in text  # no redraw, no cursor move
    assert len(lines) == 4, lines
    assert [line.startswith("embedding:") for line in lines] == [True] * 4
    assert "1000/1000" in lines[-1] and "1000/1000" not in lines[-2]
    assert "10.00it/s" in lines[-1]


def test_a_fast_loop_writes_one_line_even_when_not_left(clock):
    log = io.StringIO()
    for _ in progress.progress_bar(range(1000), desc="batches", file=log, leave=False):
        clock.now += 0.001
    assert log.getvalue().count("\n") == 1
    assert "batches: 100%" in log.getvalue() and "1000/1000" in log.getvalue()


def test_a_manual_bar_reports_its_total(clock):
    log = io.StringIO()
    with progress.progress_bar(total=2_000_000, unit="B", unit_scale=True, desc="copying", file=log) as bar:
        for _ in range(200):
            bar.update(10_000)
            clock.now += 1.0  # 200 s: six interval lines, then the final state
    lines = log.getvalue().splitlines()
    assert len(lines) == 7, lines
    assert "2.00M/2.00M" in lines[-1]


def test_a_stalled_loop_repeats_no_line(clock):
    log = io.StringIO()
    bar = progress.progress_bar(total=10, file=log)
    bar.update(3)
    clock.now += 100.0
    bar.refresh()  # what tqdm does when nothing moved: no new information, no line
    bar.refresh()
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 and "3/10" in lines[0]


def test_a_disabled_bar_writes_nothing():
    log = io.StringIO()
    assert list(progress.progress_bar(range(5), file=log, disable=True)) == [0, 1, 2, 3, 4]
    assert log.getvalue() == ""


def test_a_terminal_gets_tqdms_redrawn_bar(clock):
    screen = Terminal()
    bar = progress.progress_bar(range(1000), file=screen, ncols=80)
    assert not isinstance(bar, progress.LogBar)
    for _ in bar:
        clock.now += 0.1
    assert screen.getvalue().count("\r") > 10  # redrawn in place every 0.1 s of the 100 s


def test_a_message_written_between_log_lines_leaves_no_carriage_return(clock):
    log = io.StringIO()
    bar = progress.progress_bar(total=4, desc="items", file=log)
    bar.update(2)
    progress.LogBar.write("a note", file=log)  # tqdm clears and redraws its bars around a message
    bar.update(2)
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == 3 and lines[0] == "a note" and "2/4" in lines[1] and "4/4" in lines[2]


def test_show_bars_reads_a_progress_argument():
    assert progress.show_bars(True) and not progress.show_bars(False)
    assert not progress.show_bars(progress.EPOCHS)  # a line per epoch, no bar
    with pytest.raises(ValueError, match="progress='bars': expected True, False or 'epochs'"):
        progress.show_bars("bars")


def test_a_fit_with_epoch_lines_only_prints_one_line_per_epoch_and_computes_the_same(small_tree, tmp_path, capsys):
    """progress="epochs" (04_demo's retrain): the per-epoch line on stdout, no bar anywhere, and
    the very run that progress=True trains."""
    root, table = small_tree
    cfg = replace(config.get_config("fixture"), epochs=2, patience=5)
    train.fit(cfg, table, root, tmp_path / "quiet", progress=progress.EPOCHS)
    quiet = capsys.readouterr()
    train.fit(cfg, table, root, tmp_path / "bars", progress=True)
    loud = capsys.readouterr()
    line = r"epoch {}/2: loss \d+\.\d{{4}}  val R@1 \d\.\d{{3}}  R@5 \d\.\d{{3}}  \(\d+ s training\)"
    assert len(quiet.out.splitlines()) == 2
    for epoch, text in enumerate(quiet.out.splitlines(), start=1):
        assert re.fullmatch(line.format(epoch), text), text
    assert "it/s" not in quiet.err and "%|" not in quiet.err  # no bar
    assert "epoch 1/2: 100%|" in loud.err and "epoch 2/2: 100%|" in loud.err  # True still draws them
    history = {
        name: pd.read_csv(tmp_path / name / "history.csv").drop(columns="train_images_per_s")
        for name in ("quiet", "bars")
    }
    pd.testing.assert_frame_equal(history["quiet"], history["bars"])
    assert [text.split("  (")[0] for text in quiet.out.splitlines()] == [
        text.split("  (")[0] for text in loud.out.splitlines()
    ]
