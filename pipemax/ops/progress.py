"""Progress of a job: requests done / total, output tokens/s, ETA.

On a terminal (stderr is a tty) a one-line bar redrawn a few times a second; otherwise a plain
log line every ``interval`` seconds (for journald, CI logs, ``nohup``). Rates are measured over
the last ``WINDOW`` seconds, so the ETA follows the current speed; requests answered by an
earlier run (resumed) count as done but not towards the rate.
"""
from __future__ import annotations

import sys
import time
from collections import deque

WINDOW = 30.0
BAR_PERIOD = 0.2
BAR_WIDTH = 24


def fmt_duration(s: float | None) -> str:
    if s is None or s != s or s == float("inf"):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}"


class Rates:
    """Requests and output tokens per second over a sliding window."""

    def __init__(self, window: float = WINDOW):
        self.window = window
        self.samples: deque[tuple[float, int, int]] = deque()   # (time, requests, tokens)
        self.t0 = time.monotonic()

    def reset(self) -> None:
        self.samples.clear()
        self.t0 = time.monotonic()

    def add(self, requests: int, tokens: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        s = self.samples
        if not s:
            s.append((self.t0, 0, 0))
        if len(s) >= 2 and now - s[-2][0] < 0.25:
            s[-1] = (now, requests, tokens)        # keep samples >= 0.25 s apart
        else:
            s.append((now, requests, tokens))
        while len(s) > 2 and now - s[1][0] >= self.window:
            s.popleft()

    def per_second(self) -> tuple[float, float]:
        """(requests/s, output tokens/s)."""
        if len(self.samples) < 2:
            return 0.0, 0.0
        (t0, r0, k0), (t1, r1, k1) = self.samples[0], self.samples[-1]
        dt = t1 - t0
        if dt <= 0:
            return 0.0, 0.0
        return (r1 - r0) / dt, (k1 - k0) / dt


class Progress:
    """mode: "bar" | "log" | "off" | "auto" (bar on a tty, else log)."""

    def __init__(self, mode: str = "auto", interval: float = 10.0, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            isatty = getattr(self.stream, "isatty", lambda: False)
            mode = "bar" if isatty() else "log"
        self.mode = mode
        self.interval = interval
        self.rates = Rates()
        self.total = 0
        self.done = 0
        self.resumed = 0
        self.tokens = 0
        self.running = 0
        self.waiting = 0
        self.last_draw = 0.0
        self.drawn = False
        self.label = ""

    def start(self, total: int, label: str = "") -> None:
        self.total, self.label = total, label
        self.done = self.resumed = self.tokens = 0
        self.rates.reset()
        self.last_draw = time.monotonic()

    def update(self, *, done: int, resumed: int, tokens: int, running: int = 0,
               waiting: int = 0, now: float | None = None) -> None:
        """``done`` includes ``resumed`` (answered by earlier runs); ``tokens``: output tokens
        of this run."""
        now = time.monotonic() if now is None else now
        self.done, self.resumed, self.tokens = done, resumed, tokens
        self.running, self.waiting = running, waiting
        self.rates.add(done - resumed, tokens, now)
        if self.mode == "bar" and now - self.last_draw >= BAR_PERIOD:
            self.draw_bar(now)
        elif self.mode == "log" and now - self.last_draw >= self.interval:
            self.log_line(now)

    # ---- figures --------------------------------------------------------------------------
    def tok_s(self) -> float:
        return self.rates.per_second()[1]

    def eta_s(self) -> float | None:
        req_s = self.rates.per_second()[0]
        left = max(0, self.total - self.done)
        if left == 0:
            return 0.0
        return left / req_s if req_s > 0 else None

    def text(self) -> str:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (f"{self.done}/{self.total} requests ({pct:.1f}%), {self.tok_s():.1f} output "
                f"tok/s, ETA {fmt_duration(self.eta_s())}")

    # ---- output ---------------------------------------------------------------------------
    def draw_bar(self, now: float) -> None:
        self.last_draw = now
        frac = self.done / self.total if self.total else 1.0
        full = int(BAR_WIDTH * min(1.0, frac))
        bar = "#" * full + "." * (BAR_WIDTH - full)
        self.stream.write(f"\r\x1b[Kpipemax: [{bar}] {self.text()}")
        self.stream.flush()
        self.drawn = True

    def log_line(self, now: float) -> None:
        self.last_draw = now
        self.stream.write(f"pipemax: {self.label}{self.text()}; running {self.running}, "
                          f"waiting {self.waiting}\n")
        self.stream.flush()

    def finish(self) -> None:
        """Last figures (bar: completed and ended with a newline)."""
        if self.mode == "bar":
            self.draw_bar(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False

    def clear(self) -> None:
        """Before another message is printed on the bar's line."""
        if self.mode == "bar" and self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.drawn = False
