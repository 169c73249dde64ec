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
from dataclasses import dataclass, field

from . import cpu_policy
from .dns import ResolvConfError, Resolver
from .binding import BindingAssigner
from .listener import Listener
from .logs import Logs
from .scheduler import Scheduler
from . import ipc
from .spool import Spool, SpoolError, SpoolSet

log = logging.getLogger("impetus")


def make_resolver(config) -> Resolver:
    """``Resolv_Conf`` (or /etc/resolv.conf), clamped by Min/Max_DNS_TTL."""
    return Resolver.from_config(config)


def make_logs(config) -> Logs:
    return Logs.from_config(config)


@dataclass
class ReloadResult:
    ok: bool
    lines: list[str] = field(default_factory=list)


def apply_cpu_policy(config, logs, who: str = "") -> None:
    """Scheduling_Policy for this process (start and reload); a refusal is
    logged, never fatal."""
    why = cpu_policy.apply(config.lookup("Scheduling_Policy"))
    if why:
        logs.paniclog.panic(who + why)


def _listen_addresses(listeners) -> list[str]:
    return sorted(lc.address for lc in listeners)


def reload_warnings(old, new) -> list[str]:
    """What a reload cannot apply (D20): non-dynamic options and sockets."""
    out = []
    for b in sorted(set(old.bindings) | set(new.bindings)):
        try:
            a, z = old.lookup("Bind_Address", binding=b), new.lookup("Bind_Address", binding=b)
        except KeyError:
            continue
        if a != z:
            out.append(f"warning: Bind_Address of binding {b!r} changed ({a or 'unset'} -> "
                       f"{z or 'unset'}): new connections use it, open ones keep the old "
                       f"source; restart impetus to apply it everywhere (non-dynamic option)")
    for name in ("Spoolbase", "Cluster_Throttle_Store"):
        if old.lookup(name) != new.lookup(name):
            out.append(f"warning: {name} changed: needs a restart (the running value is kept)")
    if old.loggers != new.loggers:
        out.append("warning: log settings changed: need a restart (reopen logs reopens the "
                   "current files)")
    for what, attr in (("ESMTP_Listener", "listeners"), ("Control_Listener", "control_listeners"),
                       ("HTTP_Listener", "http_listeners")):
        if _listen_addresses(getattr(old, attr)) != _listen_addresses(getattr(new, attr)):
            out.append(f"warning: {what} Listen addresses changed: need a restart "
                       f"(the running sockets are kept)")
    return out


class Server:
    """The main process: scheduler (single owner of queue state), delivery,
    and either the listeners too (``reception_processes == 0``) or N
    reception child processes, each owning spool shard 1..N."""

    def __init__(self, config, config_path: str, reception_processes: int = 0):
        self.config = config
        self.config_path = config_path
        self.reception_processes = reception_processes
        self.hostname = config.lookup("Hostname") or socket.gethostname()
        self.logs = make_logs(config)
        apply_cpu_policy(config, self.logs)
        spoolbase = config.lookup("Spoolbase")
        self.spool = SpoolSet(spoolbase, own=0, shards=range(1, reception_processes + 1),
                              warn=self.logs.paniclog.panic)
        self.notify_path = os.path.join(spoolbase, "notify.sock")
        self.resolver = make_resolver(config)
        self.scheduler: Scheduler | None = None
        self.listeners: list[Listener] = []
        self.children: dict[int, asyncio.subprocess.Process] = {}
        self.child_tasks: list[asyncio.Task] = []
        self.notify_server = None
        self.assigner = BindingAssigner(config, self.logs.paniclog, config.lookup("Policy_Module"))
        self.stopped = asyncio.Event()
        self.control = None   # control.ControlServer (impetus console)
        self.http = None      # http_api.HttpServer (/metrics, inject API)
        self.metrics = None   # metrics.Metrics
        self._reloading = asyncio.Lock()

    async def start(self) -> None:
        self.spool.open()
        self.scheduler = Scheduler(self.config, self.spool, self.resolver, self.logs,
                                   hostname=self.hostname)
        recovered = await self.scheduler.start()
        self.logs.paniclog.panic(f"impetus starting (pid {os.getpid()}), recovered {recovered} "
                                 f"queued messages from {self.spool.spoolbase}")
        # Control and HTTP first: once SMTP answers, every socket is up.
        from .metrics import Metrics
        self.metrics = Metrics(self)
        self.scheduler.metrics = self.metrics
        if self.config.control_listeners:
            from .control import ControlServer
            self.control = ControlServer(self)
            await self.control.start(self.config.control_listeners)
        if self.config.http_listeners:
            from .http_api import HttpServer
            self.http = HttpServer(self)
            await self.http.start(self.config.http_listeners)
        if self.reception_processes:
            self.notify_server = await ipc.serve_notifications(
                self.notify_path, self.scheduler.submit, lambda: None,
                channels=self.spool.channels, on_unfinished=self.spool.unfinished)
            for shard in range(1, self.reception_processes + 1):
                await self._spawn(shard)
                self.child_tasks.append(asyncio.create_task(self._supervise(shard)))
        else:
            for lc in self.config.listeners:
                listener = Listener(lc, self.config, self.spool, self.logs, self.scheduler.submit,
                                    hostname=self.hostname, assigner=self.assigner)
                await listener.start()
                self.listeners.append(listener)
                print(f"impetus: listening on {lc.address}", flush=True)
        print(f"impetus: started, {recovered} messages recovered from the spool", flush=True)

    async def _spawn(self, shard: int) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "impetus.cli", "serve", "-c", self.config_path,
            "--role", "reception", "--shard", str(shard), "--notify", self.notify_path,
            stdin=asyncio.subprocess.DEVNULL)
        self.children[shard] = proc
        # Wait until it listens (it prints nothing we parse; poll its notify connection).
        await asyncio.sleep(0)

    async def _supervise(self, shard: int) -> None:
        """Restart a reception process that died; adopt what it had committed."""
        while not self.stopped.is_set():
            proc = self.children[shard]
            rc = await proc.wait()
            if self.stopped.is_set():
                return
            self.logs.paniclog.panic(f"reception process for shard {shard} (pid {proc.pid}) "
                                     f"exited with {rc}; restarting it")
            # Finishes it had not confirmed go into its shard first, or
            # delivered mail would be adopted and delivered again.
            await self.spool.settle(shard)
            adopted = self.scheduler.adopt(self.spool.recover_shard(shard))
            if adopted:
                self.logs.paniclog.panic(f"adopted {adopted} message(s) from shard {shard}")
            await asyncio.sleep(1.0)
            await self._spawn(shard)

    async def stop(self) -> None:
        self.stopped.set()
        if self.control is not None:
            await self.control.stop()
        if self.http is not None:
            await self.http.stop()
        for listener in self.listeners:
            await listener.stop_accepting()
        for proc in self.children.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for listener in self.listeners:
            await listener.drain(grace=10.0)
        for shard, proc in self.children.items():
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        for task in self.child_tasks:
            task.cancel()
        if self.notify_server is not None:
            self.notify_server.close()
        if self.reception_processes:
            # Anything committed but not yet notified is still in the shards
            # (after the finishes the children did not confirm are applied).
            await self.spool.settle()
            self.scheduler.adopt(self.spool.recover())
        if self.scheduler is not None:
            await self.scheduler.stop(grace=10.0)
        self.spool.close()
        self.logs.paniclog.panic("impetus stopped")
        self.logs.close()

    # -- control surface: reload, logs ------------------------------------------
    def inbound_sessions(self) -> int | None:
        """Open inbound SMTP sessions (None when reception runs in children)."""
        if self.reception_processes:
            return None
        return sum(len(lst.connections) for lst in self.listeners)

    def reopen_logs(self) -> None:
        self.logs.reopen_all()
        for proc in self.children.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGUSR1)

    async def reload(self, path: str | None = None) -> ReloadResult:
        """``config reload`` / SIGHUP (D20): load the file again; a broken
        file is refused and the running config kept. New values apply to
        new decisions; cached routes live out their TTL (``refresh domain``
        drops them); sockets and non-dynamic options need a restart."""
        async with self._reloading:
            return await self._reload(path or self.config_path)

    async def _reload(self, path: str) -> ReloadResult:
        from .config import ConfigError, load_config
        try:
            new = await asyncio.to_thread(load_config, path)
            assigner = BindingAssigner(new, self.logs.paniclog, new.lookup("Policy_Module"))
        except ConfigError as exc:
            lines = [str(i) for i in exc.issues]
            n = len(lines)
            lines.append(f"{path}: {n} configuration error{'s' if n != 1 else ''}")
            self.logs.paniclog.panic("config reload refused, running configuration kept: "
                                     + "; ".join(lines))
            return ReloadResult(False, lines)
        except (OSError, ValueError) as exc:
            self.logs.paniclog.panic(f"config reload refused: {path}: {exc}")
            return ReloadResult(False, [f"{path}: {exc}"])
        old = self.config
        warnings = reload_warnings(old, new)
        resolver_opts = ("Resolv_Conf", "Min_DNS_TTL", "Max_DNS_TTL", "DNS_Fallback_To_TCP")
        if any(old.lookup(o) != new.lookup(o) for o in resolver_opts):
            try:
                resolver = make_resolver(new)
            except (OSError, ResolvConfError, ValueError) as exc:
                return ReloadResult(False, [f"Resolv_Conf: {exc}"])
            self.resolver = resolver
            if self.metrics is not None:
                self.metrics.instrument_resolver(resolver)
            if self.scheduler is not None:
                self.scheduler.resolver = resolver
        self.config = new
        self.config_path = path
        self.assigner = assigner
        apply_cpu_policy(new, self.logs)
        if self.scheduler is not None:
            self.scheduler.apply_config(new)
        by_address = {lc.address: lc for lc in new.listeners}
        for listener in self.listeners:
            lc = by_address.get(listener.lc.address)
            if lc is not None:
                listener.reload(lc, new, assigner)
        children = 0
        for proc in self.children.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGHUP)
                children += 1
        lines = [f"reloaded {path}"]
        if children:
            lines.append(f"told {children} reception process(es) to reload (SIGHUP)")
        lines.append("routes cached before the reload are used until their TTL; "
                     "`refresh domain DOMAIN|all` drops them now")
        lines += warnings
        self.logs.paniclog.panic(f"configuration reloaded from {path}"
                                 + "".join(f"; {w}" for w in warnings))
        return ReloadResult(True, lines)

    def _sighup(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload())
        task.add_done_callback(lambda t: t.cancelled() or t.exception() is None or
                               log.error("reload failed: %r", t.exception()))

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopped.set)
        loop.add_signal_handler(signal.SIGHUP, self._sighup)
        await self.start()
        await self.stopped.wait()
        print("impetus: shutting down", flush=True)
        await self.stop()
        return 0


class ReceptionProcess:
    """A reception child: listeners (SO_REUSEPORT) + its own spool shard;
    tells the main process about every committed transaction."""

    def __init__(self, config, shard: int, notify_path: str, config_path: str | None = None):
        self.config = config
        self.shard = shard
        self.config_path = config_path
        self.hostname = config.lookup("Hostname") or socket.gethostname()
        self.logs = make_logs(config)
        apply_cpu_policy(config, self.logs, f"reception process {shard}: ")
        # Before any thread starts (the spool writer inherits the mask). The
        # mask we were started with (the main process's, never narrowed by
        # us) is what CPU_Affinity = "off" gives back on a reload.
        self.allowed_cpus = cpu_policy.allowed_cpus()
        self._apply_affinity(config)
        self.spool = Spool(config.lookup("Spoolbase"), shard, warn=self.logs.paniclog.panic)
        self.notifier = ipc.Notifier(notify_path, shard, on_finish=self.spool.finish_items)
        self.assigner = BindingAssigner(config, self.logs.paniclog, config.lookup("Policy_Module"))
        self.listeners: list[Listener] = []
        self.stopped = asyncio.Event()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopped.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        loop.add_signal_handler(signal.SIGUSR1, self.logs.reopen_all)
        self.spool.open()
        await self.notifier.connect()
        for lc in self.config.listeners:
            listener = Listener(lc, self.config, self.spool, self.logs, self.notifier.notify,
                                hostname=self.hostname, assigner=self.assigner, reuse_port=True)
            await listener.start()
            self.listeners.append(listener)
        lost = asyncio.create_task(self.notifier.lost.wait())
        stop = asyncio.create_task(self.stopped.wait())
        await asyncio.wait([lost, stop], return_when=asyncio.FIRST_COMPLETED)
        for listener in self.listeners:
            await listener.stop_accepting()
        for listener in self.listeners:
            await listener.drain(grace=10.0)
        await self.notifier.close()
        self.spool.close()
        self.logs.close()
        return 0

    def _apply_affinity(self, config) -> None:
        """CPU_Affinity for this process (start and reload); a refusal is
        logged, never fatal."""
        cpus = cpu_policy.reception_cpus(config.lookup("CPU_Affinity"), self.shard,
                                         self.allowed_cpus)
        why = cpu_policy.pin(cpus)
        if why:
            self.logs.paniclog.panic(f"reception process {self.shard}: {why}")

    def _reload(self) -> None:
        """SIGHUP from the main process after its ``config reload``: the
        listeners' relay policy and settings follow the new file."""
        from .config import ConfigError, load_config
        if not self.config_path:
            return
        try:
            new = load_config(self.config_path)
            assigner = BindingAssigner(new, self.logs.paniclog, new.lookup("Policy_Module"))
        except (ConfigError, OSError, ValueError) as exc:
            self.logs.paniclog.panic(f"reception process: config reload refused: {exc}")
            return
        self.config = new
        self.assigner = assigner
        apply_cpu_policy(new, self.logs, f"reception process {self.shard}: ")
        self._apply_affinity(new)
        by_address = {lc.address: lc for lc in new.listeners}
        for listener in self.listeners:
            lc = by_address.get(listener.lc.address)
            if lc is not None:
                listener.reload(lc, new, assigner)


def install_loop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a pinned dependency
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def serve(config, config_path: str, *, reception_processes: int = 0, role: str = "all",
          shard: int = 0, notify: str | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="impetus: %(levelname)s %(name)s: %(message)s")
    install_loop()
    try:
        if role == "reception":
            return asyncio.run(ReceptionProcess(config, shard, notify, config_path).run())
        return asyncio.run(Server(config, config_path, reception_processes).run())
    except (OSError, ResolvConfError, SpoolError, ValueError) as exc:
        print(f"impetus: cannot start: {exc}", file=sys.stderr)
        return 1
