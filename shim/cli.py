"""The `tether` command: wrap a coding agent so the Tetherlab master sees its plan.

Subcommands:
    tether run [--cluster FILE | --masters HOST:PORT,...] [--key FILE] [--tool NAME]
               [--fail-closed-s SECONDS] [--json] -- COMMAND ARGS...
    tether hook AGENT                  (AGENT: claude-code | opencode; run by the agent itself)
    tether install AGENT [--dir REPO | --global]
    tether uninstall AGENT [--dir REPO | --global]
    tether --version

Exit codes:
    0   success; for `hook`, an answer was printed (it may be a deny, in the agent's format)
    1   an unexpected error in `install`/`uninstall` (e.g. the settings file cannot be written)
    2   usage error; `install`/`uninstall` refused (existing settings file is not valid JSON or
        has an unexpected shape, or a plugin file that is not ours is in the way); `hook` blocked
        because its input was unusable or it failed (never 1: Claude Code treats 1 as allow)
    other  `run` returns the agent's exit status or its own codes (see tetherlab.shim.run)

`tether hook` runs on every tool call of the agent, so it is dispatched before argparse is
imported and loads only json, os, socket, sys and time (issue 9: p50 <= 30 ms).
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse

HOOK_AGENTS = ("claude-code", "opencode")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "hook" and args[1] in HOOK_AGENTS:
        return _hook(args[1])
    return _main_slow(args)


def _hook(agent: str) -> int:
    try:
        from tetherlab.shim.hooks import hook_main
    except BaseException as e:  # A broken install must still block, not exit 1.
        sys.stderr.write(f"Tetherlab: cannot load the tether hook ({type(e).__name__}: {e}); blocking.\n")
        return 2
    return hook_main([agent])


def build_parser() -> argparse.ArgumentParser:
    import argparse

    from tetherlab.cluster import __version__

    parser = argparse.ArgumentParser(
        prog="tether",
        description="Wrap a coding agent so the Tetherlab master sees its plan.",
        epilog="Exit codes: 0 ok, 1 unexpected error, 2 usage error or refused; `run` returns the agent's status.",
    )
    parser.add_argument("--version", action="version", version=f"tether {__version__}")
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run an agent under Tetherlab coordination",
        description="Open a session with the master, then run COMMAND in a pseudo-terminal.",
        usage="tether run [options] -- COMMAND [ARGS...]",
    )
    run.add_argument("--cluster", metavar="FILE", help="cluster file naming the masters")
    run.add_argument("--masters", metavar="HOST:PORT,...", help="comma-separated master addresses")
    run.add_argument("--key", metavar="FILE", help="the developer's SSH private key")
    run.add_argument("--tool", metavar="NAME", help="agent tool name reported to the master (default: from COMMAND)")
    run.add_argument(
        "--fail-closed-s",
        metavar="SECONDS",
        type=float,
        help="stop the agent when no quorum-confirmed heartbeat arrives for this long",
    )
    run.add_argument("--developer", metavar="NAME", help="developer name the key is registered to (default $USER)")
    run.add_argument("--instructions", metavar="FILE",
                     help="instructions file for the plan sentinel (default CLAUDE.md or AGENTS.md)")
    run.add_argument("--json", action="store_true", help="print machine-readable events and outcome")
    run.add_argument("command", nargs=argparse.REMAINDER, help="the agent command, after --")

    hook = sub.add_parser(
        "hook",
        help="answer one agent hook call (run by the agent, not by you)",
        description="Read the agent's hook JSON on stdin, ask the local `tether run`, print the answer.",
    )
    hook.add_argument("agent", metavar="AGENT", choices=HOOK_AGENTS, help="claude-code | opencode")

    for name, verb in (("install", "add"), ("uninstall", "remove")):
        p = sub.add_parser(name, help=f"{verb} Tetherlab's hooks or plugin for an agent")
        p.add_argument("agent", metavar="AGENT", choices=HOOK_AGENTS, help="claude-code | opencode")
        where = p.add_mutually_exclusive_group()
        where.add_argument("--dir", metavar="REPO", help="repository to change (default: the enclosing git repository)")
        where.add_argument(
            "--global",
            dest="global_",
            action="store_true",
            help="change the user's settings (~/.claude or ~/.config/opencode) instead",
        )
    return parser


def _main_slow(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.subcommand == "run":
        # argparse keeps the `--` separator in a REMAINDER; the agent must not see it.
        if args.command[:1] == ["--"]:
            args.command = args.command[1:]
        if not args.command:
            parser.exit(2, "tether run: missing the agent COMMAND (tether run [options] -- COMMAND [ARGS...])\n")
        try:
            from tetherlab.shim.run import main as run_main
        except ModuleNotFoundError as e:
            if e.name != "tetherlab.shim.run":
                raise
            sys.stderr.write("tether run: not available in this build (tetherlab.shim.run is missing)\n")
            return 2
        return run_main(args)
    if args.subcommand == "hook":
        return _hook(args.agent)
    if args.subcommand in ("install", "uninstall"):
        from tetherlab.shim import install

        fn = install.install if args.subcommand == "install" else install.uninstall
        return fn(args.agent, repo=args.dir, global_=args.global_)
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
