"""progress.py: plain lines when stderr is not a terminal, the same lines in the --log file,
nothing for short work, nothing after a failure."""

from __future__ import annotations

import pytest

from icl_engine.core import progress
from icl_engine.core.progress import Progress


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(progress.time, "monotonic", c)
    monkeypatch.setattr(progress, "HEARTBEAT_S", 3600.0)  # the fake clock alone decides
    monkeypatch.delenv(progress.LOG_ENV, raising=False)
    progress.set_log_file(None)
    yield c
    progress.set_log_file(None)


def run(bar, clock, steps):
    """(seconds, units) steps: the clock moves, then the work."""
    for dt, n in steps:
        clock.t += dt
        bar.update(n)


def test_short_work_prints_nothing(clock, capsys):
    with Progress(100, "eval knn-4", unit="queries") as bar:
        run(bar, clock, [(0.45, 10)] * 10)  # 4.5 s in all, under QUIET_S
    assert capsys.readouterr().err == ""


def test_long_work_prints_plain_lines_every_10s_or_10_percent(clock, capsys):
    with Progress(1000, "embedding (x)", unit="texts") as bar:
        run(bar, clock, [(4.0, 20)] * 3)  # 12 s, 6 %: the first line comes from the clock
        run(bar, clock, [(1.0, 100)] * 2)  # 16 %, 26 %: a tenth more each time
        run(bar, clock, [(20.0, 10)])  # 27 %: 20 s since
        run(bar, clock, [(1.0, 730)])  # 100 %
    lines = capsys.readouterr().err.splitlines()
    assert "\r" not in "".join(lines)
    assert [ln.split("] ", 1)[1] for ln in lines] == [
        "embedding (x): 60/1000 texts (6%), 12 s, ~3.1 min left",
        "embedding (x): 160/1000 texts (16%), 13 s, ~68 s left",
        "embedding (x): 260/1000 texts (26%), 14 s, ~40 s left",
        "embedding (x): 270/1000 texts (27%), 34 s, ~92 s left",
        "embedding (x): 1000/1000 texts (100%), 35 s",
        "embedding (x): 1000/1000 texts (100%), 35 s, done",
    ]


def test_log_file_gets_the_same_lines_and_a_failure_gets_no_done_line(clock, capsys, tmp_path, monkeypatch):
    log = tmp_path / "run.log"
    progress.set_log_file(log)
    with pytest.raises(RuntimeError):
        with Progress(10, "eval knn-8", unit="queries") as bar:
            run(bar, clock, [(11.0, 1)])
            raise RuntimeError("boom")
    err = capsys.readouterr().err
    assert log.read_text() == err and err.count("\n") == 1 and "done" not in err
    progress.set_log_file(None)
    monkeypatch.setenv(progress.LOG_ENV, str(tmp_path / "env.log"))  # ICL_LOG, as the CLI's --log envvar
    with Progress(10, "x") as bar:
        run(bar, clock, [(11.0, 10)])
    assert (tmp_path / "env.log").read_text().count("\n") == 2


def test_a_terminal_gets_the_bar_and_the_log_file_the_lines(clock, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: True, raising=False)
    progress.set_log_file(tmp_path / "t.log")
    with Progress(10, "x", unit="q") as bar:
        assert bar.bar is not None
        run(bar, clock, [(11.0, 5), (1.0, 5)])
    assert "x: 5/10 q (50%), 11 s" in (tmp_path / "t.log").read_text()
    assert "] x:" not in capsys.readouterr().err  # the bar, not the lines, on the terminal


def test_disabled_shows_nothing_and_a_bad_log_path_fails_early(clock, capsys, tmp_path):
    progress.set_log_file(tmp_path / "quiet.log")
    with Progress(10, "x", enabled=False) as bar:
        run(bar, clock, [(11.0, 10)])
    assert capsys.readouterr().err == "" and (tmp_path / "quiet.log").read_text() == ""
    with pytest.raises(OSError):
        progress.set_log_file(tmp_path / "no-such-folder" / "x.log")


def test_a_heartbeat_speaks_while_no_unit_of_work_finishes(monkeypatch, capsys):
    """Long work whose first unit takes a while (a model load, a first LM batch) is not silent:
    the heartbeat prints the elapsed time once QUIET_S has passed, and every EVERY_S after."""
    import time

    monkeypatch.setattr(progress, "QUIET_S", 0.2)
    monkeypatch.setattr(progress, "EVERY_S", 0.3)
    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.02)
    monkeypatch.delenv(progress.LOG_ENV, raising=False)
    with Progress(None, "loading the LM"):
        time.sleep(0.75)
    lines = [ln.split("] ", 1)[1] for ln in capsys.readouterr().err.splitlines()]
    assert len(lines) >= 3 and all(ln.startswith("loading the LM: ") for ln in lines) and lines[-1].endswith("done")
