"""Progress: a bar on a terminal, log lines otherwise; rates over a window, ETA."""
from __future__ import annotations

import io

import pytest

from pipemax.ops.progress import Progress, Rates, fmt_duration


class Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_fmt_duration():
    assert fmt_duration(0) == "0:00:00"
    assert fmt_duration(3725.4) == "1:02:05"
    assert fmt_duration(None) == "?" and fmt_duration(float("inf")) == "?"


def test_rates_follow_the_recent_window():
    r = Rates(window=10.0)
    r.t0 = 0.0
    for t in range(0, 21):                    # 1 request/s, 10 tok/s for 20 s ...
        r.add(t, 10 * t, now=float(t))
    assert r.per_second() == pytest.approx((1.0, 10.0), rel=0.01)
    for t in range(21, 41):                   # ... then 3 requests/s, 30 tok/s
        r.add(20 + 3 * (t - 20), 200 + 30 * (t - 20), now=float(t))
    req_s, tok_s = r.per_second()
    assert req_s == pytest.approx(3.0, rel=0.05) and tok_s == pytest.approx(30.0, rel=0.05)


def test_auto_mode_picks_a_bar_on_a_tty_and_log_lines_otherwise():
    assert Progress("auto", stream=Stream(True)).mode == "bar"
    assert Progress("auto", stream=Stream(False)).mode == "log"


def test_log_lines_every_interval_with_figures():
    s = Stream(False)
    p = Progress("log", interval=5.0, stream=s)
    p.start(total=100)
    t0 = p.rates.t0
    p.update(done=30, resumed=20, tokens=0, running=3, waiting=7, now=t0 + 1)
    assert s.getvalue() == ""                 # not yet: interval 5 s
    p.update(done=40, resumed=20, tokens=400, running=3, waiting=7, now=t0 + 10)
    lines = s.getvalue().splitlines()
    assert len(lines) == 1
    line = lines[0]
    assert line.startswith("pipemax: 40/100 requests (40.0%)"), line
    assert "40.0 output tok/s" in line and "running 3, waiting 7" in line
    # 20 done by this run in 10 s -> 2 requests/s -> 60 left take 30 s
    assert "ETA 0:00:30" in line
    assert p.eta_s() == pytest.approx(30.0)


def test_bar_redraws_in_place_and_ends_with_a_newline():
    s = Stream(True)
    p = Progress("bar", stream=s)
    p.start(total=4)
    t0 = p.rates.t0
    for i in range(1, 5):
        p.update(done=i, resumed=0, tokens=10 * i, now=t0 + i)
    p.finish()
    out = s.getvalue()
    assert out.count("\r\x1b[K") >= 4 and out.endswith("\n") and out.count("\n") == 1
    assert "[" + "#" * 24 + "]" in out and "4/4 requests (100.0%)" in out
    assert "ETA 0:00:00" in out


def test_off_mode_writes_nothing():
    s = Stream(True)
    p = Progress("off", stream=s)
    p.start(total=3)
    p.update(done=3, resumed=0, tokens=3, now=p.rates.t0 + 100)
    p.finish()
    assert s.getvalue() == ""
