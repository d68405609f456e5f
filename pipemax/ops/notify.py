"""systemd notifications (sd_notify) without extra packages: datagrams to ``$NOTIFY_SOCKET``.

``READY=1`` once the model is loaded, ``STATUS=...`` with the progress, ``STOPPING=1`` when the
run drains or stops, ``WATCHDOG=1`` from the engine loop at most every half ``$WATCHDOG_USEC``
(only when ``WatchdogSec=`` is set and ``$WATCHDOG_PID``, if given, is this process). An address
starting with ``@`` is a Linux abstract socket name. Outside systemd every call does nothing;
a failed send never stops the run.
"""
from __future__ import annotations

import os
import socket
import time


def _address(raw: str) -> str | bytes:
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    return raw


class Notifier:
    def __init__(self, address: str | None = None, watchdog_usec: int | None = None):
        self.address = address or None
        self.watchdog_interval = (watchdog_usec / 1e6 / 2) if watchdog_usec else None
        self.last_watchdog = 0.0
        self.last_status = ""
        self.sent: list[str] = []       # last messages (tests, debugging)
        self.errors = 0

    @classmethod
    def from_env(cls, env=None) -> "Notifier":
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET") or None
        usec = None
        try:
            pid = int(env.get("WATCHDOG_PID", "0") or 0)
            if not pid or pid == os.getpid():
                usec = int(env.get("WATCHDOG_USEC", "0") or 0) or None
        except ValueError:
            usec = None
        return cls(addr, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """One datagram of ``KEY=VALUE`` lines; True if it was sent."""
        if not self.enabled:
            return False
        msg = "\n".join(f.replace("\n", " ") for f in fields)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.settimeout(1.0)
                s.connect(_address(self.address))
                s.sendall(msg.encode("utf-8", "replace"))
        except OSError:
            self.errors += 1
            return False
        self.sent = (self.sent + [msg])[-20:]
        return True

    def ready(self, status: str = "") -> bool:
        fields = ["READY=1", f"MAINPID={os.getpid()}"]
        if status:
            fields.append(f"STATUS={status}")
        return self.send(*fields)

    def status(self, text: str) -> bool:
        if text == self.last_status:
            return False
        self.last_status = text
        return self.send(f"STATUS={text}")

    def stopping(self, status: str = "") -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self, now: float | None = None) -> bool:
        if self.watchdog_interval is None:
            return False
        now = time.monotonic() if now is None else now
        if now - self.last_watchdog < self.watchdog_interval:
            return False
        self.last_watchdog = now
        return self.send("WATCHDOG=1")
