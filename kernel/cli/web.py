"""``swiftk web``: launch, watch and compare runs, and chat with a checkpoint, in a browser."""

from __future__ import annotations

import argparse
import textwrap

DESCRIPTION = textwrap.dedent("""\
    Serve a web page for the runs of a workspace (the current folder unless --workspace):

      Launch   build a config from a form (checked with swiftk run's own messages), start, stop and
               resume it
      Watch    a run's progress and curves as it trains, its memory, host restarts, reloads, tenants'
               audit records and eval results; stop or resume it
      Compare  several runs' curves and eval results side by side
      Chat     talk to a finished run or a model folder, the answer streamed

    The page binds 127.0.0.1 unless --host says otherwise. Bound to any other address, every request
    needs an access token: --token, else $SWIFTK_WEB_TOKEN, else a new one printed with the address.
    Paths typed into the page must lie inside the workspace (or the runs folder); the page never runs
    code it is sent: plugins come only from the paths a config names.

    exit codes: 0 stopped with Ctrl-C, 2 bad arguments (a busy port, a missing folder).""")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--workspace", default=".", metavar="DIR",
                        help="the folder the page works in: configs' relative paths and path fields resolve here "
                             "(default: the current folder)")
    parser.add_argument("--runs", default="runs", metavar="DIR",
                        help="the runs folder, relative to the workspace (default: runs)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860; 0: any free port)")
    parser.add_argument("--token", default=None,
                        help="the access token required when --host is not a loopback address (default: "
                             "$SWIFTK_WEB_TOKEN, else a random one, printed)")
    parser.add_argument("--refresh", type=float, default=1.0, metavar="SECONDS",
                        help="how often the Watch tab reads new events (default 1)")


def main(args: argparse.Namespace) -> int:
    import os
    import secrets
    import socket
    import sys

    from swiftk.kernel import serving
    from swiftk.kernel.served import UsageError
    from swiftk.kernel.web.workspace import Workspace

    if args.refresh < 0.2:
        raise UsageError(f"--refresh {args.refresh}: at least 0.2 seconds")
    workspace = Workspace.at(args.workspace, args.runs)
    os.chdir(workspace.root)  # a config's relative paths resolve where `swiftk run` will run it
    local = serving.loopback(args.host)
    token = args.token or os.environ.get("SWIFTK_WEB_TOKEN") or None
    if not local and token is None:
        token = secrets.token_urlsafe(24)
    if token is not None and len(token) < 16:
        raise UsageError("--token: at least 16 characters (or leave it out for a random one)")
    try:
        sock = serving.bind(args.host, args.port)
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc} (another server there? "
                         f"pass --port N, or 0 for any free port)") from None
    port = sock.getsockname()[1]

    from swiftk.kernel.web.app import build, http_app
    from swiftk.kernel.web.chat import Chat
    from swiftk.kernel.web.launcher import Launcher

    launcher = Launcher(workspace)
    chat = Chat(workspace)
    page = build(workspace, launcher, chat, refresh_s=args.refresh)
    app = http_app(page, token, hosts=sorted({"localhost", "127.0.0.1", args.host}) if local else None)
    shown = "localhost" if local else (socket.gethostname() if args.host in ("0.0.0.0", "::") else args.host)
    address = f"http://{shown}:{port}/" + (f"?token={token}" if token is not None else "")

    def ready() -> None:
        print(f"swiftk web: {workspace.root} (runs: {workspace.relative(workspace.runs)}) at {address}", flush=True)
        if token is not None:
            print("swiftk web: every request needs the token above (it is set as a cookie when the address is "
                  "opened)", flush=True)

    try:
        serving.run(app, sock, ready)
    finally:
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):  # the runs' shutdown is bounded (~50 s): let it finish
            signal.signal(sig, signal.SIG_IGN)
        launcher.shutdown()
        chat.close()
        print("swiftk web: stopped", file=sys.stderr, flush=True)
    return 0
