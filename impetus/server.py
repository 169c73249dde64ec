"""``impetus serve``: wires listener -> spool -> scheduler -> router -> delivery.

Shutdown (SIGTERM/SIGINT): stop accepting connections, let sessions that are
committing a message finish, let in-flight deliveries finish within a grace
period (anything cut short stays in the spool and is delivered after the next
start), flush logs, exit 0. SIGKILL loses nothing acknowledged: the 250 after
DATA is sent only after the spool commit.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys

from .dns import ResolvConfError, Resolver
from .binding import BindingAssigner
from .listener import Listener
from .logs import Logs
from .scheduler import Scheduler
from .spool import Spool, SpoolError

log = logging.getLogger("impetus")


def make_resolver(config) -> Resolver:
    """``Resolv_Conf`` (or /etc/resolv.conf), clamped by Min/Max_DNS_TTL."""
    return Resolver.from_config(config)


def make_logs(config) -> Logs:
    return Logs.from_config(config)


class Server:
    def __init__(self, config, config_path: str):
        self.config = config
        self.config_path = config_path
        self.hostname = config.lookup("Hostname") or socket.gethostname()
        self.logs = make_logs(config)
        self.spool = Spool(config.lookup("Spoolbase"))
        self.resolver = make_resolver(config)
        self.scheduler: Scheduler | None = None
        self.listeners: list[Listener] = []
        self.assigner = BindingAssigner(config, self.logs.paniclog, config.lookup("Policy_Module"))
        self.stopped = asyncio.Event()

    async def start(self) -> None:
        self.spool.open()
        self.scheduler = Scheduler(self.config, self.spool, self.resolver, self.logs,
                                   hostname=self.hostname)
        recovered = await self.scheduler.start()
        self.logs.paniclog.panic(f"impetus starting (pid {os.getpid()}), recovered {recovered} "
                        f"queued messages from {self.spool.path}")
        for lc in self.config.listeners:
            listener = Listener(lc, self.config, self.spool, self.logs, self.scheduler.submit,
                                hostname=self.hostname, assigner=self.assigner)
            await listener.start()
            self.listeners.append(listener)
            print(f"impetus: listening on {lc.address}", flush=True)
        print(f"impetus: started, {recovered} messages recovered from the spool", flush=True)

    async def stop(self) -> None:
        for listener in self.listeners:
            await listener.stop_accepting()
        for listener in self.listeners:
            await listener.drain(grace=10.0)
        if self.scheduler is not None:
            await self.scheduler.stop(grace=10.0)
        self.spool.close()
        self.logs.paniclog.panic("impetus stopped")
        self.logs.close()

    async def run(self) -> int:
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopped.set)
        await self.stopped.wait()
        print("impetus: shutting down", flush=True)
        await self.stop()
        return 0


def install_loop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a pinned dependency
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def serve(config, config_path: str) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="impetus: %(levelname)s %(name)s: %(message)s")
    install_loop()
    try:
        return asyncio.run(Server(config, config_path).run())
    except (OSError, ResolvConfError, SpoolError, ValueError) as exc:
        print(f"impetus: cannot start: {exc}", file=sys.stderr)
        return 1
