"""systemd's service notifications (sd_notify(3)), without libsystemd.

Under a `Type=notify` unit systemd sets NOTIFY_SOCKET; the agent says READY=1 once it
watches, RELOADING=1 / READY=1 around a reload, STOPPING=1 when it stops, and, when the unit
sets WatchdogSec (WATCHDOG_USEC), WATCHDOG=1 while its pipeline is alive: a hung agent is
restarted. Outside systemd every call is a no-op.
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    """One datagram per message to $NOTIFY_SOCKET (a path, or an abstract name with '@')."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if address.startswith("@"):
            self._address = b"\0" + address[1:].encode()
        elif address.startswith("/"):
            self._address = address
        self.watchdog_s: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1_000_000
        self._last_watchdog = 0.0

    @property
    def active(self) -> bool:
        return self._address is not None

    def notify(self, *lines: str) -> bool:
        """Send `lines` (KEY=VALUE); False when not under systemd or the send failed."""
        if self._address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(self._address)
                s.sendall("\n".join(lines).encode("utf-8", "replace"))
        except OSError:
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        # MONOTONIC_USEC: systemd 253+ asks for it with RELOADING=1 (ignored before).
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def watchdog_due(self) -> float | None:
        """Seconds until the next WATCHDOG=1 is due (half the interval), None without one."""
        if self.watchdog_s is None:
            return None
        return max(0.0, self._last_watchdog + self.watchdog_s / 2 - time.monotonic())

    def watchdog(self, alive: bool) -> bool:
        """At the watchdog's time: WATCHDOG=1 if `alive`, else nothing (systemd then restarts
        the service when its WatchdogSec passes). The next one is due half an interval on."""
        self._last_watchdog = time.monotonic()
        return self.notify("WATCHDOG=1") if alive else False
