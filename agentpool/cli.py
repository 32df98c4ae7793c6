"""The ``agentpool`` command line (also ``python -m agentpool``).

Every subcommand is one :class:`Command` in :data:`COMMANDS`: a name, a one-line help, a
function adding its options to an ``argparse`` parser, and a function running it with the
parsed options and returning the exit code. To add a subcommand, write those two functions
(import heavy modules inside ``run`` so ``agentpool --help`` stays fast) and append one entry.

Conventions: a usage error is one line on stderr and exit status 2; an error while running
(agent unreachable, address in use...) is one line on stderr and exit status 1; Ctrl-C exits
with 130 and no traceback; ``--help`` shows every option's default.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from ._command import CommandError
from ._version import __version__

__all__ = ["COMMANDS", "Command", "CommandError", "main", "main_agent"]


@dataclass(frozen=True)
class Command:
    """One subcommand: ``add_arguments(parser)`` declares its options, ``run(args)`` runs it."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str = ""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows ``(default: x)`` after every option that has a meaningful default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or not action.option_strings
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or text is argparse.SUPPRESS
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are a single line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _usage_error(args: argparse.Namespace, message: str) -> NoReturn:
    parser: _Parser = args._parser
    parser.error(message)


# -- option types -----------------------------------------------------------------------------


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port_s = text.rpartition(":")
    if not sep or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT with a port 0-65535 (0 = any free port), got {text!r}"
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "127.0.0.1", int(port_s)


def _endpoint(text: str) -> str:
    from .endpoint import parse_endpoint
    from .errors import InvalidEndpoint

    try:
        kind, _, _ = parse_endpoint(text)
    except InvalidEndpoint as exc:
        raise argparse.ArgumentTypeError(exc.reason) from None
    if kind not in ("unix", "tcp", "tls"):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected unix:/path, host:port or tls://host:port"
        )
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _need_uvloop(args: argparse.Namespace) -> None:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        _usage_error(
            args, "--loop uvloop: uvloop is not installed (pip install uvloop, or --loop asyncio)"
        )


# -- demo -------------------------------------------------------------------------------------


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    from .enums import LoadBalanceStrategy

    p.add_argument("--requests", type=_positive_int, default=3000, help="requests to send")
    p.add_argument("--concurrency", type=_positive_int, default=32, help="concurrent requests")
    p.add_argument("--connections", type=_positive_int, default=4, help="connections per agent")
    p.add_argument(
        "--strategy",
        default="round_robin",
        choices=[s.name.lower() for s in LoadBalanceStrategy],
        help="load balancing strategy",
    )
    p.add_argument(
        "--encoding", default="json", choices=("json", "msgpack"), help="payload encoding"
    )
    p.add_argument(
        "--loop",
        default="auto",
        choices=("auto", "asyncio", "uvloop"),
        help="event loop (auto: uvloop when installed)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_demo(args: argparse.Namespace) -> int:
    if args.loop == "uvloop":
        _need_uvloop(args)
    from .demo import run

    return run(args)


# -- agent ------------------------------------------------------------------------------------

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _agent_arguments(p: argparse.ArgumentParser) -> None:
    from .agent.examples import EXAMPLES

    where = p.add_argument_group(
        "where to serve (one of --socket, --tcp, --reverse; --grpc alone or with --socket/--tcp)"
    )
    where.add_argument("--socket", "--uds", metavar="PATH", help="Unix socket path to listen on")
    where.add_argument(
        "--tcp", metavar="HOST:PORT", type=_host_port, help="listen on TCP (port 0 = any)"
    )
    where.add_argument(
        "--reverse",
        metavar="TARGET",
        type=_endpoint,
        help="dial a proxy's reverse listener instead (unix:/path, host:port, tls://host:port)",
    )
    where.add_argument(
        "--grpc",
        metavar="HOST:PORT",
        type=_host_port,
        help="serve gRPC (zentinel.agent.v2.AgentServiceV2; port 0 = any; needs agentpool[grpc])",
    )
    p.add_argument("--example", default="waf", choices=sorted(EXAMPLES), help="agent to run")
    p.add_argument(
        "--encoding",
        default="json",
        choices=("json", "msgpack"),
        help="json: JSON only; msgpack: MessagePack preferred, JSON too",
    )
    p.add_argument("--protocol", default="v2", choices=("v2", "v1"), help="wire protocol")
    p.add_argument("--agent-id", default=None, help="agent id (default: the example's)")
    p.add_argument("--auth-token", default=None, help="token for --reverse registration")
    p.add_argument(
        "--delay", type=_non_negative_float, default=0.0, help="seconds to wait before each reply"
    )
    p.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default=None,
        help="event loop (default: uvloop for --example bench, else asyncio)",
    )
    p.add_argument(
        "--log-level",
        default="WARNING",
        type=str.upper,
        choices=_LOG_LEVELS,
        help="logging level",
    )
    p.add_argument(
        "--v1-reply-version", type=int, default=2, help="v1: version field of the replies"
    )
    p.add_argument("--v1-sdk-replies", action="store_true", help="v1: SDK-style replies")
    tls = p.add_argument_group("TLS (with --tcp, --grpc or --reverse)")
    tls.add_argument(
        "--tls-cert",
        metavar="PEM",
        default=None,
        help="serve --tcp/--grpc over TLS with this PEM chain (--reverse: our client certificate)",
    )
    tls.add_argument("--tls-key", metavar="PEM", default=None, help="private key for --tls-cert")
    tls.add_argument(
        "--tls-ca",
        metavar="PEM",
        default=None,
        help="require client certificates from this CA (--reverse: trust this CA)",
    )


def _run_agent(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    given = [opt for opt in ("socket", "tcp", "reverse") if getattr(args, opt)]
    if (args.tls_key or (args.tls_ca and not args.reverse)) and not args.tls_cert:
        _usage_error(args, "--tls-key and --tls-ca need --tls-cert")
    if (args.tls_cert or args.tls_ca) and args.socket and not args.grpc:
        _usage_error(args, "TLS options need --tcp, --grpc or --reverse")
    if len(given) > 1 or (not given and not args.grpc) or (args.grpc and args.reverse):
        _usage_error(
            args,
            "give exactly one of --socket, --tcp or --reverse "
            "(or --grpc, alone or with --socket/--tcp)",
        )
    if args.grpc:
        import importlib.util

        try:
            missing = not all(importlib.util.find_spec(m) for m in ("grpc", "google.protobuf"))
        except ImportError:
            missing = True
        if missing:
            raise CommandError("--grpc needs grpcio and protobuf: pip install 'agentpool[grpc]'")
        host, port = args.grpc
        args.grpc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    for option in ("tls_cert", "tls_key", "tls_ca"):
        path = getattr(args, option)
        if path and not os.path.isfile(path):
            raise CommandError(f"--{option.replace('_', '-')} {path}: no such file")
    if args.loop == "uvloop":
        _need_uvloop(args)
    if args.tcp:
        host, port = args.tcp
        args.tcp = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if args.socket:
        directory = os.path.dirname(os.path.abspath(args.socket))
        if not os.path.isdir(directory):
            raise CommandError(f"cannot listen on {args.socket}: no directory {directory}")
    logging.basicConfig(level=args.log_level, stream=sys.stderr)

    use_uvloop = args.loop == "uvloop" or (args.loop is None and args.example == "bench")
    if use_uvloop and args.loop is None:
        try:
            import uvloop
        except ImportError:
            use_uvloop = False
    args.stopped_by = None
    if use_uvloop:
        import uvloop

        uvloop.run(_serve_agent(args))
    else:
        asyncio.run(_serve_agent(args))
    return 130 if args.stopped_by == signal.SIGINT else 0


async def _serve_agent(args: argparse.Namespace) -> None:
    """Serve the example agent (or dial in with --reverse) until SIGTERM or SIGINT."""
    import asyncio

    from .agent.examples import make_agent

    agent = make_agent(args.example, delay=args.delay, agent_id=args.agent_id)
    stop = asyncio.Event()
    if args.reverse:
        conn = await _connect_reverse(agent, args)
        _stop_on_signals(stop, args)
        print(f"agentpool agent registered with {args.reverse}", flush=True)
        closed = asyncio.ensure_future(conn.wait_closed())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({closed, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            stopped.cancel()
            conn.close()
        return
    servers = _agent_servers(agent, args)
    try:
        for server in servers:
            await server.start()
        _stop_on_signals(stop, args)
        for server in servers:
            print(f"agentpool agent listening on {server.endpoint}", flush=True)
        await stop.wait()
    finally:
        for server in servers:
            await server.close()


def _stop_on_signals(stop: Any, args: argparse.Namespace) -> None:
    """SIGTERM and SIGINT set ``stop``; the command exits 130 after Ctrl-C."""
    import asyncio
    import contextlib

    def stopped_by(sig: int) -> None:
        args.stopped_by = sig
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stopped_by, sig)


def _agent_servers(agent: Any, args: argparse.Namespace) -> list[Any]:
    """``--grpc`` and/or ``--socket``/``--tcp`` (the TLS options apply to --grpc and --tcp)."""
    servers: list[Any] = []
    if args.grpc:
        from .agent.grpc import GrpcAgentServer

        host, _, port = args.grpc.rpartition(":")
        grpc_host = host.strip("[]") or "127.0.0.1"
        servers.append(GrpcAgentServer(agent, host=grpc_host, port=int(port), ssl=_grpc_tls(args)))
    if args.socket or args.tcp:
        from .agent import AgentServer

        options: dict[str, Any] = {
            "encodings": ("json",) if args.encoding == "json" else ("msgpack", "json"),
            "protocol": args.protocol,
            "v1_reply_version": args.v1_reply_version,
            "v1_sdk_replies": args.v1_sdk_replies,
        }
        if args.tcp:
            host, _, port = args.tcp.rpartition(":")
            host = host[1:-1] if host.startswith("[") else host
            options.update(host=host or "127.0.0.1", port=int(port), ssl=_tls_context(args))
        else:
            options.update(path=args.socket)
        servers.append(AgentServer(agent, **options))
    return servers


def _tls_context(args: argparse.Namespace) -> Any:
    """``--tls-cert``/``--tls-key``/``--tls-ca`` as a server SSLContext, or None."""
    if not args.tls_cert:
        return None
    from .tls import server_context

    return server_context(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca)


def _grpc_tls(args: argparse.Namespace) -> Any:
    """The --tls-* options as grpcio wants them (PEM bytes), or None."""
    if not args.tls_cert:
        return None
    from pathlib import Path

    from .grpc import GrpcTLS

    chain = Path(args.tls_cert).read_bytes()
    return GrpcTLS(
        certificate_chain=chain,
        private_key=Path(args.tls_key).read_bytes() if args.tls_key else chain,
        root_certificates=Path(args.tls_ca).read_bytes() if args.tls_ca else None,
    )


async def _connect_reverse(agent: Any, args: argparse.Namespace) -> Any:
    """``--reverse``: dial and register (``--tls-*`` give our certificate and the CA)."""
    from .agent import connect_reverse

    ssl_ctx = None
    if args.tls_cert or args.tls_ca:
        from .tls import client_context

        ssl_ctx = client_context(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)
    return await connect_reverse(
        agent, args.reverse, agent_id=args.agent_id, auth_token=args.auth_token, ssl=ssl_ctx
    )


# -- bench ------------------------------------------------------------------------------------


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="smoke run (~15 s): 2 short repetitions")
    p.add_argument(
        "--reps",
        type=_positive_int,
        default=None,
        help="interleaved repetitions (default: 5, --quick: 2)",
    )
    p.add_argument(
        "--duration",
        type=_positive_float,
        default=None,
        help="seconds measured per scenario and repetition (default: 1.0, --quick: 0.25)",
    )
    p.add_argument(
        "--warmup",
        type=_non_negative_float,
        default=None,
        help="warm-up seconds before each measurement (default: 0.25, --quick: 0.1)",
    )
    p.add_argument(
        "--in-flight", type=_positive_int, default=64, help="concurrency of the wide scenarios"
    )
    p.add_argument(
        "--only",
        default="",
        metavar="NAMES",
        help="comma list of kinds (raw,pool,grpc) or scenario names (e.g. pool-json-64x4)",
    )
    p.add_argument("--no-grpc", action="store_true", help="skip the grpcio scenarios")
    p.add_argument(
        "--agent",
        choices=("auto", "builtin", "example"),
        default="auto",
        help="benchmark agent: the built-in minimal one, or `agentpool agent --example bench` "
        "(auto: the example when available)",
    )
    p.add_argument(
        "--keep-affinity",
        action="store_true",
        help="do not clear the correlation affinity after each pool request",
    )
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument(
        "--memory",
        type=_positive_int,
        nargs="?",
        const=10_000,
        default=None,
        metavar="N",
        help="instead: measure the pool's memory for N requests in flight (N default: 10000)",
    )
    p.add_argument("--serve-agent", metavar="PATH", help=argparse.SUPPRESS)
    p.add_argument("--hold", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--serve-grpc", metavar="PATH", help=argparse.SUPPRESS)


def _run_bench(args: argparse.Namespace) -> int:
    from . import _bench as bench

    if args.only:
        every = bench.build_scenarios(
            argparse.Namespace(in_flight=args.in_flight, no_grpc=False, only="")
        )
        known = {s.kind for s in every} | {s.name for s in every}
        tokens = [t.strip() for t in args.only.split(",") if t.strip()]
        unknown = [t for t in tokens if t not in known]
        if unknown or not tokens:
            _usage_error(
                args,
                f"--only: unknown scenario {', '.join(map(repr, unknown)) or repr(args.only)} "
                f"(kinds: raw, pool, grpc; names: {', '.join(s.name for s in every)})",
            )
    return bench.run(args)


# -- proxy, loadtest (agentpool.proxy, agentpool._bench.loadtest) ----------------------------


def _proxy_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT")
    p.add_argument("--upstream", metavar="URL", help="e.g. http://127.0.0.1:8000")
    p.add_argument(
        "--agent",
        action="append",
        default=[],
        metavar="NAME=ENDPOINT",
        help="agent to ask (repeatable; endpoint unix:/path or host:port), in order",
    )
    p.add_argument("--config", metavar="FILE", help="JSON config: agents, routes, guard, pool")
    p.add_argument("--timeout", type=float, default=None, help="per-event agent timeout, s")
    p.add_argument(
        "--failure",
        default=None,
        help="on agent failure: open, closed (the default) or an HTTP status such as 503",
    )
    p.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    p.add_argument("--demo", action="store_true", help="start an upstream and example agents")
    p.add_argument("--once", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop")
    p.add_argument("--log-level", default="WARNING")


def _run_proxy(args: argparse.Namespace) -> int:
    try:
        from . import proxy
    except ImportError as exc:
        raise CommandError(str(exc)) from None
    return proxy.run(args)


def _loadtest_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", choices=("asgi", "proxy", "both"), default="both")
    p.add_argument("--connections", type=int, default=32, help="connections of the req/s runs")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per run (max 60)")
    p.add_argument("--repeat", type=int, default=3, help="interleaved repetitions (max 20)")
    p.add_argument(
        "--tool",
        choices=("auto", "wrk", "builtin"),
        default="auto",
        help="load generator (auto: wrk when installed, else a built-in aiohttp loop)",
    )


def _run_loadtest(args: argparse.Namespace) -> int:
    from ._bench import loadtest

    return loadtest.run_command(args)


# -- registry ---------------------------------------------------------------------------------

COMMANDS: list[Command] = [
    Command(
        "demo",
        "start two example agents, drive traffic through a pool, print the results",
        _demo_arguments,
        _run_demo,
        "Drive a pool of two example agents (waf, echo) with realistic traffic.",
    ),
    Command(
        "agent",
        "run an example Zentinel v2 agent",
        _agent_arguments,
        _run_agent,
        "Run an example Zentinel v2 agent until Ctrl-C or SIGTERM.",
    ),
    Command(
        "bench",
        "round-trip benchmark: pool vs raw uvloop client vs grpcio",
        _bench_arguments,
        _run_bench,
        "Round-trip benchmark: agentpool pool vs a raw uvloop client vs grpcio aio.",
    ),
    Command(
        "proxy",
        "reverse proxy (aiohttp) asking agents about every request (try --demo)",
        _proxy_arguments,
        _run_proxy,
        "Reverse proxy (aiohttp) that asks Zentinel agents about every request; "
        "--demo starts an upstream and the example agents (docs/integrations.md).",
    ),
    Command(
        "loadtest",
        "HTTP load with and without one agent check (ASGI under uvicorn, the proxy)",
        _loadtest_arguments,
        _run_loadtest,
        "What one agent check costs an HTTP server end to end (docs/performance.md).",
    ),
]


def _version() -> str:
    try:
        from ._impl import HAS_EXTENSIONS

        core = "compiled" if HAS_EXTENSIONS else "pure Python"
    except ImportError:  # pragma: no cover - a source tree without a built core
        core = "not built"
    return f"agentpool {__version__} (core: {core}; Python {platform.python_version()})"


def build_parser(prog: str = "agentpool") -> argparse.ArgumentParser:
    """The whole command line: global options and one subparser per :data:`COMMANDS` entry."""
    parser = _Parser(
        prog=prog,
        description=(
            "Connection pool for Zentinel v2 agents: demo, example agents, reverse proxy, "
            "benchmarks."
        ),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for command in COMMANDS:
        p = sub.add_parser(
            command.name,
            help=command.help,
            description=command.description or command.help,
            formatter_class=_HelpFormatter,
        )
        command.add_arguments(p)
        p.set_defaults(_run=command.run, _parser=p)
    return parser


def _report(prog: str, message: object) -> None:
    text = " ".join(str(message).split()) or type(message).__name__
    print(f"{prog}: error: {text}", file=sys.stderr)


def _os_error_text(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    if exc.filename is not None:
        text = f"{exc.filename}: {text}"
    return text


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the subcommand, return its exit status."""
    if prog is None:
        prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "agentpool"
        if prog in ("__main__.py", "-c", "") or prog.endswith(".py"):
            prog = "agentpool"
    args: Any = None
    try:
        args = build_parser(prog).parse_args(list(sys.argv[1:] if argv is None else argv))
        name = f"{prog} {args.command}"
        try:
            return int(args._run(args))
        except CommandError as exc:
            _report(name, exc)
            return exc.status
        except OSError as exc:
            if isinstance(exc, BrokenPipeError):
                _silence_stdout()
                return 1
            _report(name, _os_error_text(exc))
            return 1
        except Exception as exc:
            from .errors import AgentProtocolError

            if not isinstance(exc, AgentProtocolError):
                raise
            _report(name, exc)
            return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _silence_stdout() -> None:
    """After a broken pipe (``agentpool demo | head``), exit without a second error."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main_agent(argv: Sequence[str] | None = None) -> int:
    """``agentpool agent`` with ``argv`` as its options (default ``sys.argv[1:]``)."""
    return main(["agent", *(sys.argv[1:] if argv is None else argv)])


def console_main() -> None:
    """Entry point of the ``agentpool`` console script."""
    sys.exit(main())
