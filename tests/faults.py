"""Test helpers for fault injection: a TCP proxy on loopback that can delay, cut and reset connections,
and a companion server run as a real uvicorn process that can be SIGKILLed and restarted."""
from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

from edge_runtime.sync import wait_until_healthy


class FaultyProxy:
    """Forwards 127.0.0.1:<port> to a target; ``mode`` is pass | delay | cut | reset (changeable at any time)."""

    def __init__(self, target_port: int, delay_s: float = 0.2):
        self.target_port, self.delay_s, self.mode = target_port, delay_s, "pass"
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.faults = {"delay": 0, "cut": 0, "reset": 0}
        self.live: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self.running:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        mode = self.mode
        if mode == "cut":
            self.faults["cut"] += 1
            client.close()
            return
        if mode == "reset":  # RST instead of FIN: SO_LINGER with a zero timeout
            self.faults["reset"] += 1
            client.recv(1024)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            return
        if mode == "delay":
            self.faults["delay"] += 1
            time.sleep(self.delay_s)
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
        except OSError:
            client.close()
            return
        with self.lock:
            self.live.add(client)
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def inject(self, mode: str, seconds: float = 0.3) -> None:
        """Break the connections in flight (RST for reset) and treat new ones per ``mode`` for a while."""
        with self.lock:
            live, self.live = list(self.live), set()
        if mode in ("cut", "reset"):
            for conn in live:
                try:
                    if mode == "reset":
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    conn.close()
                except OSError:
                    pass
            self.faults[mode] += len(live)
        self.mode = mode
        time.sleep(seconds)
        self.mode = "pass"

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.running = False
        self.listener.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """The companion API under uvicorn in its own process (so it can be killed mid-request)."""

    def __init__(self, database_url: str, port: int | None = None, cwd: str | None = None):
        self.database_url, self.port, self.cwd = database_url, port or free_port(), cwd
        self.proc: subprocess.Popen | None = None
        self.kills = 0

    def start(self) -> None:
        env = {**os.environ, "RETINAEDGE_DATABASE_URL": self.database_url, "RETINAEDGE_RATE_LIMIT": "100000/minute"}
        self.proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "companion_api.asgi:app", "--host", "127.0.0.1",
                                      "--port", str(self.port), "--log-level", "error"], env=env, cwd=self.cwd,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until_healthy(f"http://127.0.0.1:{self.port}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.kills += 1

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
