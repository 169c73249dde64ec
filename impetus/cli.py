"""The ``impetus`` console script."""
from __future__ import annotations

import argparse
import asyncio
import os
import sys

DEFAULT_CONFIG = "/etc/impetus/ecelerity.conf"


def _load(path: str):
    from .config import ConfigError, load_config
    try:
        return load_config(path)
    except ConfigError as exc:
        for issue in exc.issues:
            print(str(issue), file=sys.stderr)
        n = len(exc.issues)
        print(f"{path}: {n} configuration error{'s' if n != 1 else ''}", file=sys.stderr)
        return None


def cmd_check_config(args) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    print(f"{args.config}: configuration OK")
    return 0


def cmd_options(args) -> int:
    from .config.options import render_options_table
    print(render_options_table())
    return 0


def cmd_serve(args) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    from .server import serve
    return serve(config, args.config, reception_processes=args.reception_processes,
                 role=args.role, shard=args.shard, notify=args.notify)


def cmd_route(args) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    from .server import make_resolver
    from . import router

    async def run():
        resolver = make_resolver(config)
        domain = args.domain.lower().rstrip(".")
        plan = router.plan(args.binding, domain, config)
        answers = await router.gather(plan, resolver)
        return router.decide(plan, answers)

    decision = asyncio.run(run())
    print(router.format_decision(decision))
    return 0 if decision.failure is None else 2


def cmd_console(args) -> int:
    from .console import run_console
    return run_console(args)


def cmd_top(args) -> int:
    from .top import cmd_top as run
    return run(args)


def cmd_sink(args) -> int:
    from .sink import run_sink
    return run_sink(args)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    p = argparse.ArgumentParser(prog="impetus", description="Impetus outbound MTA")
    p.add_argument("--version", action="version", version=f"impetus {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the MTA in the foreground")
    s.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    s.add_argument("--reception-processes", type=int, default=0, metavar="N",
                   help="receive in N separate processes sharing the listening port, each "
                        "owning a spool shard (0: receive in the main process)")
    s.add_argument("--role", choices=("all", "reception"), default="all", help=argparse.SUPPRESS)
    s.add_argument("--shard", type=int, default=0, help=argparse.SUPPRESS)
    s.add_argument("--notify", help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("check-config", help="validate a configuration file")
    s.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    s.set_defaults(func=cmd_check_config)

    s = sub.add_parser("options", help="print the option table")
    s.set_defaults(func=cmd_options)

    s = sub.add_parser("route", help="show the routing decision for a domain now")
    s.add_argument("domain")
    s.add_argument("--binding", default="default")
    s.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    s.set_defaults(func=cmd_route)

    from .console import add_arguments as add_console_arguments
    s = sub.add_parser("console", help="the control console (batch with a COMMAND, else interactive)",
                       description="Talk to a running impetus over its Control_Listener. "
                                   "With COMMAND: run it and exit (0 ok, 1 failed, 2 cannot "
                                   "connect); without: interactive, with history and completion.")
    add_console_arguments(s)
    s.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND ...")
    s.set_defaults(func=cmd_console)

    s = sub.add_parser("top", help="live view of queues, rates and connections")
    add_console_arguments(s)
    s.add_argument("-i", "--interval", type=float, default=2.0, help="seconds between refreshes")
    s.add_argument("--once", action="store_true", help="print one frame and exit")
    s.set_defaults(func=cmd_top)

    from .sink import add_sink_parser
    add_sink_parser(sub)
    sub.choices["sink"].set_defaults(func=cmd_sink)
    from .auth import add_passwd_parser, run_passwd
    add_passwd_parser(sub)
    sub.choices["passwd"].set_defaults(func=run_passwd)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("options", "check-config", "route"):
        # `impetus options | head` must not traceback; never for the servers,
        # where a peer's reset must be an EPIPE error, not death by SIGPIPE.
        import signal
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    prof_dir = os.environ.get("IMPETUS_CPROFILE_DIR")
    if prof_dir and args.command == "serve":
        # Developer aid (bench/README.md): CPU profile of each serve process's
        # event-loop thread, written to DIR/<role>-<pid>.prof on exit.
        import cProfile
        import time
        prof = cProfile.Profile(time.thread_time)
        prof.enable()
        try:
            return args.func(args)
        finally:
            prof.disable()
            prof.dump_stats(os.path.join(prof_dir, f"{args.role}-{os.getpid()}.prof"))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
