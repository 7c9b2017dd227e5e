"""The ``nmbridge`` command.

Each subcommand is one :class:`Command` in ``COMMANDS``: a name, a one-line help, a function
that adds its arguments and a handler returning the exit status.  A new subcommand is one
more entry (``filter test`` and the like add their own sub-parsers in ``add_arguments`` and
``set_defaults(handler=...)`` per leaf).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from nmbridge import __version__, config, logs
from nmbridge.backends import resolve_default
from nmbridge.control import ControlError
from nmbridge.errors import ConfigError, NmbridgeError

EX_OK, EX_ERROR, EX_USAGE, EX_CONFIG, EX_INTERRUPTED = 0, 1, 2, 78, 130
EX_PIPE = 141  # 128 + SIGPIPE: what a shell reports for `yes | head`; stdout's reader went away
MAX_WATCH = 86_400.0  # seconds

EPILOG = """\
examples:
  nmbridge check -c /etc/nmbridge/bridge.toml     validate a config, print its pairs and backends
  nmbridge run -c /etc/nmbridge/bridge.toml       bridge until SIGINT or SIGTERM
  nmbridge --log-format console run -c etc/mem.toml
                                                  try it without a NIC (an endless mem: source)
  nmbridge run -c bridge.toml | jq 'select(.event == "stats")'
  nmbridge stats --watch                          live counters and rates of the running bridge
  nmbridge reload                                 re-read its config (as SIGHUP does); errors shown
  nmbridge capture -p lan --what dropped -w - | tcpdump -nr -
                                                  what pair lan drops, live, each with its rule

exit status: 0 ok, 1 error, 2 bad usage, 78 configuration error, 130 interrupted,
             141 the reader of the output went away (`nmbridge stats --watch | head`)
"""


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]
    epilog: str | None = None


# --- run ---------------------------------------------------------------------------------


def add_config_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", required=True, metavar="FILE", help="the bridge's TOML configuration")


def configure_logs(args: argparse.Namespace, cfg: config.Config | None = None) -> None:
    """--log-format/--log-level win over the file's [log], which wins over the defaults."""
    logs.configure(args.log_format or (cfg.log.format if cfg else "auto"),
                   args.log_level or (cfg.log.level if cfg else "info"))


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    add_config_argument(p)
    p.add_argument("--no-link-setup", action="store_true",
                   help="leave the interfaces as they are (only look them up and check them): for "
                        "operators who manage links themselves")
    p.add_argument("--control", metavar="PATH", default=None,
                   help='the control socket (default: [control] socket, else '
                        f'{config.DEFAULT_CONTROL_SOCKET}; "" for none)')
    p.add_argument("--state-dir", metavar="DIR", default=None,
                   help="where the per-interface locks and restore records live (default: "
                        "$NMBRIDGE_STATE_DIR, else /run/nmbridge); bridges that share an interface "
                        "must share it")


def run_command(args: argparse.Namespace) -> int:
    from nmbridge.app import Bridge, check_capabilities  # the forwarding machinery, only where used

    cfg = config.load(args.config)
    control = args.control
    if control:
        control = os.path.abspath(control)
    check_control_socket(cfg, control)  # before touching anything
    check_capabilities(cfg, link_setup=not args.no_link_setup)  # before touching anything
    configure_logs(args, cfg)
    for w in cfg.warnings:  # what `check` warns about: rules that never match or never decide
        logs.get_logger(bridge=cfg.bridge.name).warning("filter_warning", **w.as_dict())
    Bridge(cfg, link_setup=not args.no_link_setup, control_path=control,
           log_level_fixed=bool(getattr(args, "log_level", None)),
           state_directory=getattr(args, "state_dir", None)).run()
    return EX_OK


def check_control_socket(cfg: config.Config, control: str | None) -> None:
    """Refuse a control socket that `run` would refuse, before any link is set up: a path no
    socket can have, a world-writable directory, another nmbridge listening there.  Only a
    socket asked for (--control or [control] socket): without one, the default path is best
    effort (serve_ops warns and runs on)."""
    from nmbridge.control import check_path

    path = control if control is not None else cfg.control.path
    if path and (control is not None or cfg.control.socket is not None):
        try:
            check_path(path)
        except ControlError as e:
            raise NmbridgeError(f"control socket: {e}") from None


# --- stats, ports, reload: clients of the control socket ---------------------------------


def add_control_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--control", metavar="PATH",
                   default=os.environ.get("NMBRIDGE_CONTROL", config.DEFAULT_CONTROL_SOCKET),
                   help="the running bridge's control socket (default: $NMBRIDGE_CONTROL, else "
                        f"{config.DEFAULT_CONTROL_SOCKET})")


def add_stats_arguments(p: argparse.ArgumentParser) -> None:
    add_control_argument(p)
    p.add_argument("--json", action="store_true", help="one JSON object (per refresh with --watch)")
    p.add_argument("--watch", nargs="?", type=float, const=2.0, default=None, metavar="SECONDS",
                   help="refresh every SECONDS (default 2) until Ctrl-C")


def _si(value: float, unit: str = "") -> str:
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}".rstrip()
    return f"{value:.0f} {unit}".rstrip() if value == int(value) or value >= 100 else f"{value:.1f} {unit}"


def table(rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if i in right else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
                     for r in rows)


def stats_table(result: dict[str, Any]) -> str:
    """The `nmbridge stats` table: one row per pair and direction."""
    from nmbridge.stats import drops

    rows = [["PAIR", "DIRECTION", "RECEIVED", "FORWARDED", "DROPS", "QUEUED", "FRAMES/S", "BITS/S",
             "TX STALLS", "DROPPED BY"]]
    for p in result["snapshot"]["pairs"]:
        for d, s in p["directions"].items():
            r = result["rates"].get(p["pair"], {}).get(d, {})
            why = drops(s)
            rows.append([p["pair"], d, str(s.get("received", 0)),
                         str(s.get("forwarded", 0)),
                         str(sum(why.values())), str(s.get("queued", 0)),
                         _si(r.get("frames_per_s", 0.0)), _si(r.get("bits_per_s", 0.0), "b/s"),
                         str(s.get("tx_stalls", 0)),
                         ", ".join(f"{k} {n}" for k, n in why.items() if n) or "-"])
    down = down_lines(result["snapshot"].get("down", []))
    if len(rows) == 1:
        return "\n".join(["no pairs are forwarding", *down])
    text = "\n".join([table(rows, {2, 3, 4, 5, 6, 7, 8}), *down])
    for c in result["snapshot"].get("captures", []):  # running `nmbridge capture`s
        n = {k: sum(d[k] for d in c["directions"].values())
             for k in ("seen", "captured", "capture_dropped", "rate_limited")}
        text += (f"\ncapture {c['capture']} on {c['pair']} ({c['what']}"
                 f"{', ' + repr(c['filter']) if c.get('filter') else ''}): {c['written']} written, "
                 f"{n['seen']} seen, {n['capture_dropped']} capture_dropped, "
                 f"{n['rate_limited']} rate_limited")
    return text


def down_lines(down: list[dict[str, Any]]) -> list[str]:
    """One line per pair that is down (nmbridge.healing): why, since when, the next retry."""
    return [f"pair {d['pair']} is DOWN for {d['down_seconds']:.0f} s ({d['attempts']} attempt"
            f"{'s' if d['attempts'] != 1 else ''}, next in {d['retry_in']:.1f} s): {d['reason']}"
            for d in down]


def stats_command(args: argparse.Namespace) -> int:
    from nmbridge.control import request
    from nmbridge.stats import rates

    out: TextIO = sys.stdout
    if args.watch is not None and not (0 < args.watch <= MAX_WATCH and math.isfinite(args.watch)):
        fail(f"--watch SECONDS must be more than 0 and at most {MAX_WATCH:g}")
        return EX_USAGE
    prev: Any = None
    tty = out.isatty()
    try:
        while True:
            result = request(args.control, "stats")
            if prev is not None:  # rates over exactly the refresh interval
                result["rates"] = rates(prev, result["snapshot"])
                result["rate_seconds"] = round(result["snapshot"]["time"] - prev["time"], 3)
            prev = result["snapshot"]
            if args.json:
                text = json.dumps(result, separators=(",", ":") if args.watch else None,
                                  indent=None if args.watch else 2)
            else:
                text = stats_table(result)
                if args.watch is not None:
                    head = f"bridge {result['bridge']} at {time.strftime('%H:%M:%S')}, every {args.watch:g} s"
                    text = f"{head}\n\n{text}\n"
            if args.watch is not None and tty and not args.json:
                out.write("\x1b[H\x1b[2J")  # home and clear, only on a terminal
            out.write(text + "\n")
            out.flush()
            if args.watch is None:
                return EX_OK
            time.sleep(args.watch)
    except KeyboardInterrupt:  # how a watch ends
        return EX_OK


def ports_command(args: argparse.Namespace) -> int:
    from nmbridge.control import request

    result = request(args.control, "ports")
    if args.json:
        print(json.dumps(result, indent=2))
        return EX_OK
    rows = [["PAIR", "PORT", "BACKEND", "WORKER", "CPU", "RING PAIRS", "RINGS", "SLOTS", "BUF_SIZE",
             "ZERO-COPY", "LINK"]]
    for p in result["ports"]:
        link = p.get("link")
        backend = p["backend"] + (f" ({p['mode']})" if p.get("mode") else "")  # afxdp: zc/native/skb
        cpu = p.get("cpu")
        owned = ",".join(map(str, p.get("ring_pairs", []))) or "-"  # the port's ring pairs this share owns
        rows.append([p["pair"], p["port"], backend, str(p.get("worker", 0)), "-" if cpu is None else str(cpu),
                     owned, f"{p['rx_rings']}/{p['tx_rings']}",
                     f"{p['rx_slots']}/{p['tx_slots']}", str(p["buf_size"]),
                     "yes" if p["zerocopy"] else "no",
                     "-" if link is None else f"{'up' if link['up'] else 'down'} ({link['operstate']})"])
    print(table(rows, {3, 4, 6, 7, 8}) if len(rows) > 1 else "no ports are open")
    for line in down_lines(result.get("down", [])):
        print(line)
    return EX_OK


def add_capture_arguments(p: argparse.ArgumentParser) -> None:
    add_control_argument(p)
    p.add_argument("-p", "--pair", required=True, help="the pair to capture on")
    p.add_argument("-d", "--direction", choices=("a-to-b", "b-to-a", "both"), default="both")
    p.add_argument("--what", choices=("forwarded", "dropped", "all"), default="all",
                   help="frames forwarded, dropped (by a filter, oversize, broken chain) or all")
    p.add_argument("-f", "--filter", metavar="EXPR", help="a tcpdump expression frames must match")
    p.add_argument("-c", "--count", type=int, default=0, metavar="N", help="stop after N frames")
    p.add_argument("--duration", type=float, default=0.0, metavar="S", help="stop after S seconds")
    p.add_argument("-s", "--snaplen", type=int, default=262144, metavar="N",
                   help="bytes kept of each frame (default 262144)")
    p.add_argument("--rate", type=int, default=10000, metavar="FPS",
                   help="frames per second the tap takes at most (0: no limit; default 10000)")
    p.add_argument("-w", "--write", required=True, metavar="FILE",
                   help="the pcapng file to write, or - for stdout (| tcpdump -r -)")


def capture_command(args: argparse.Namespace) -> int:
    from nmbridge.capture import run_client

    req = {"pair": args.pair, "direction": args.direction, "what": args.what, "filter": args.filter,
           "count": args.count, "duration": args.duration, "snaplen": args.snaplen, "rate": args.rate}

    def started(h: dict[str, Any]) -> None:  # as tcpdump says "listening on ..."
        expr = f", {h['filter']!r}" if h.get("filter") else ""
        print(f"nmbridge capture: capture {h.get('capture')} on {', '.join(h.get('interfaces', []))} "
              f"({h.get('what')}{expr}), snaplen {h.get('snaplen')}, "
              f"at most {h.get('rate') or 'any number of'} frames/s", file=sys.stderr, flush=True)

    if args.write == "-":
        got = run_client(args.control, req, sys.stdout.buffer, on_start=started)
    else:
        with open(args.write, "wb") as out:
            got = run_client(args.control, req, out, on_start=started)
    print(f"nmbridge capture: {got.frames} frames written to "
          f"{'stdout' if args.write == '-' else args.write}", file=sys.stderr)
    for line in got.summaries:
        print(f"  {line}", file=sys.stderr)
    return EX_OK


def add_ports_arguments(p: argparse.ArgumentParser) -> None:
    add_control_argument(p)
    p.add_argument("--json", action="store_true", help="one JSON document")


def reload_command(args: argparse.Namespace) -> int:
    from nmbridge.control import request

    r = request(args.control, "reload", timeout=150.0)
    changes = [f"{what} {', '.join(r[what])}" for what in ("added", "removed", "restarted") if r[what]]
    changes += [f"filters of {', '.join(r['filters'])}"] if r["filters"] else []
    changes += [f"{k} = {v}" for k, v in r["settings"].items()]
    print(f"reloaded: {'; '.join(changes) if changes else 'nothing changed'}")
    if r["needs_restart"]:
        print(f"needs a restart to change: {', '.join(r['needs_restart'])} (running values kept)")
    for pair in r.get("down", []):
        print(f"pair {pair} is down: the bridge keeps retrying it (nmbridge stats says why)")
    for pair, error in r["failed"].items():
        fail(f"pair {pair} did not start: {error}")
    return EX_ERROR if r["failed"] else EX_OK


# --- check -------------------------------------------------------------------------------


def summary(cfg: config.Config) -> str:
    """What `check` prints: one line for the bridge, one per pair, one per filter."""
    b = cfg.bridge
    backend = b.backend if b.backend != "auto" else f"auto ({resolve_default('auto')} on this machine)"
    stats = f"stats every {b.stats_interval:g} s" if b.stats_interval else "no stats events"
    lines = [
        f"{cfg.path}: ok",
        f"bridge {b.name}: default backend {backend}, burst {b.burst}, poll timeout {b.poll_timeout_ms} ms, "
        f"{stats}, user-memory rings of {b.ring_slots} slots x {b.buf_size} bytes",
    ]
    arrows = {"both": "<->", "a_to_b": "->", "b_to_a": "<-"}
    for p in cfg.pairs:
        filters = ", ".join(f"{d}: {name}" for d, name in p.filters.items()) or "none"
        lines.append(f"pair {p.name}: {p.a} {arrows[p.direction]} {p.b}; filters: {filters}; "
                     f"link set-up {'on' if p.link_setup else 'off'}")
    for f in cfg.filters.values():
        n = len(f.rules)
        w = sum(1 for x in cfg.warnings if x.filter == f.name)
        warned = f", {w} warning{'s' if w != 1 else ''} (below)" if w else ""
        lines.append(f"filter {f.name}: {n} rule{'s' if n != 1 else ''}, default {f.default}{warned}")
    return "\n".join(lines)


def check_command(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    print(summary(cfg))
    for w in cfg.warnings:  # after the summary, on stderr; a config with warnings is still ok
        fail(str(w))
    return EX_OK


# --- doctor ------------------------------------------------------------------------------


def doctor_command(args: argparse.Namespace) -> int:
    from nmbridge.doctor import run_doctor

    return run_doctor(config.load(args.config), sys.stdout, link_setup=not args.no_link_setup)


def add_doctor_arguments(p: argparse.ArgumentParser) -> None:
    add_config_argument(p)
    p.add_argument("--no-link-setup", action="store_true",
                   help="check as `run --no-link-setup` would run: down, promiscuous off and offloads "
                        "on are problems, not notes")


# --- filter test -------------------------------------------------------------------------


FILTER_TEST_EPILOG = """\
where the filters come from (one of):
  -c FILE --filter NAME          one filter of a config (a pair need not use it)
  -c FILE [--pair P] [--direction D]
                                 the filters of a config's pairs (default: every pair, then
                                 every filter no pair uses)
  --rules FILE                   a rule file: `default = ...` and [[rule]] tables, the body of
                                 a [filter.NAME] table alone in a file
  -e EXPR [-e EXPR ...]          tcpdump expressions: a frame one matches passes, else drops

Rules, pairs and frames are numbered from 1: rule 3 is rule[3] in error messages (the third
[[rule]]), frame 1 the capture's first (as Wireshark numbers it). Directions are written
a_to_b / b_to_a; a-to-b / b-to-a are read the same. Warnings about rules that can never match
or never decide go to stderr (and into the JSON document); they do not change the exit status.
Errors are one line on stderr, never on stdout (also with --json): exit status 1 for a missing
capture, pair or filter, 78 for a config, rule file or expression that does not compile.
examples:
  nmbridge filter test --pcap capture.pcap -e 'tcp port 22'
  nmbridge filter test --pcap capture.pcap --rules web.toml --json | jq .results[0].totals
  nmbridge filter test --pcap capture.pcap -c bridge.toml --pair lan --direction a_to_b
"""


def add_filter_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(title="filter commands", metavar="SUBCOMMAND", dest="filter_command",
                           required=True)
    t = sub.add_parser("test", help="run a capture file through filters offline",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=FILTER_TEST_EPILOG,
                       description="Run each frame of a pcap file through filters (the fast path's own "
                                   "code) and print its verdict and the rule that decided, then "
                                   "per-rule totals.")
    t.add_argument("--pcap", required=True, metavar="CAPTURE",
                   help="a pcap file (Ethernet), or - for standard input")
    source = t.add_mutually_exclusive_group(required=True)
    source.add_argument("-c", "--config", metavar="FILE", help="the filters of this config")
    source.add_argument("--rules", metavar="FILE", help="a rule file ([[rule]] tables)")
    source.add_argument("-e", "--expression", metavar="EXPR", action="append",
                        help="a tcpdump expression (repeat for more rules, tried in order)")
    t.add_argument("--filter", metavar="NAME", help="with -c: only this filter")
    t.add_argument("--pair", metavar="P", help="with -c: only this pair's filters")
    t.add_argument("--direction", metavar="D", help="with -c: only this direction (a_to_b, b_to_a)")
    t.add_argument("--totals", action="store_true", help="only the totals, no line per frame")
    t.add_argument("--json", action="store_true", help="one JSON document instead of text")


def filter_command(args: argparse.Namespace) -> int:
    from nmbridge.filters import FilterError, FilterWarning, check_filter
    from nmbridge.filters.compiler import CompiledFilter
    from nmbridge.filters.offline import Target, config_targets, expression_filter, report, run_capture

    if args.config is None:
        misplaced = [o for o, v in (("--filter", args.filter), ("--pair", args.pair),
                                    ("--direction", args.direction)) if v is not None]
        if misplaced:
            fail(f"filter test: {misplaced[0]} chooses among the filters of a config: add -c FILE")
            return EX_USAGE
    elif args.filter is not None and (args.pair is not None or args.direction is not None):
        fail("filter test: --filter names one filter; --pair/--direction choose by pair: use one or "
             "the other")
        return EX_USAGE
    warnings: list[FilterWarning]
    if args.config is not None:
        cfg = config.load(args.config, require_pairs=False)
        targets = config_targets(cfg, args.pair, args.direction, args.filter)
        names = {t.flt.config.name for t in targets}
        warnings = [w for w in cfg.warnings if w.filter in names]
    elif args.rules is not None:
        f, found = config.load_rules(args.rules)
        targets = [Target(CompiledFilter(f), source=f"rules {args.rules}")]
        warnings = list(found)
    else:
        f = expression_filter(args.expression)
        for n, r in enumerate(f.rules, 1):
            if not (r.pcap or "").strip():
                raise ConfigError(f"-e[{n}] {json.dumps(r.pcap)}: an empty expression (leave -e out "
                                  "to match nothing)")
        try:
            warnings = check_filter(f)
        except FilterError as e:
            n = int(e.keypath.split("[")[1].split("]")[0])
            raise ConfigError(f"-e[{n}] {json.dumps(f.rules[n - 1].pcap)}: "
                              f"{e.reason.removeprefix(f'rule {f.rules[n - 1].name!r}: ')}") from None
        targets = [Target(CompiledFilter(f), source="-e")]
    for w in warnings:
        fail(str(w))
    nframes = run_capture(targets, args.pcap)
    report(targets, args.pcap, nframes, warnings, args.json, sys.stdout, per_frame=not args.totals)
    return EX_OK


# --- demo --------------------------------------------------------------------------------


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frames", type=int, default=10000, metavar="N",
                   help="frames in the left-to-right burst (default: 10000)")
    p.add_argument("--keep", action="store_true",
                   help="leave the lab up afterwards (the bridge stopped) and print how to use and remove it")
    p.add_argument("--json", action="store_true",
                   help="a JSON summary on stdout (the step-by-step progress goes to stderr)")
    p.add_argument("--backend", choices=("afpacket", "afxdp"), default="afpacket",
                   help="the bridge's ports: afpacket: (default) or afxdp: (AF_XDP)")


def demo_command(args: argparse.Namespace) -> int:
    from nmbridge.demo import run_demo

    return run_demo(args.frames, keep=args.keep, as_json=args.json, backend=args.backend)


# --- version -----------------------------------------------------------------------------


def version_command(args: argparse.Namespace) -> int:
    print(f"nmbridge {__version__}")
    return EX_OK


COMMANDS: list[Command] = [
    Command("run", "bridge the pairs of a config until SIGINT/SIGTERM", add_run_arguments, run_command,
            epilog="Opens every port (all or nothing), forwards each pair in its own thread and logs\n"
                   "JSON lines to stdout (key=value on a terminal). SIGINT or SIGTERM stops every pair\n"
                   "at a batch boundary, closes the ports, logs the final counters and exits 0."),
    Command("check", "validate a config and print its pairs, backends and filters (opens nothing)",
            add_config_argument, check_command),
    Command("doctor", "check each interface of each port and print what to fix (changes nothing)",
            add_doctor_arguments, doctor_command,
            epilog="Exit status 0 when nothing needs fixing, 1 otherwise. What `run` sets itself\n"
                   "(up, promiscuous, offloads; unless link_setup = false) is printed as a note."),
    Command("filter", "try filters: `filter test --pcap CAPTURE -e EXPR` (or -c FILE, --rules FILE) "
                      "runs a capture through them",
            add_filter_arguments, filter_command),
    Command("demo", "build a throw-away network-namespace lab, bridge it and send real traffic (root)",
            add_demo_arguments, demo_command,
            epilog="left ns (10.77.0.1) --veth-- bridge ns: `nmbridge run`, two afpacket: ports --veth--\n"
                   "right ns (10.77.0.2). Pings both ways, sends a burst left to right, stops the bridge,\n"
                   "prints its counters and removes everything (also on Ctrl-C). Exit status 0 when every\n"
                   "ping was answered and every frame arrived, 1 otherwise."),
    Command("stats", "show the running bridge's counters and rates (through its control socket)",
            add_stats_arguments, stats_command,
            epilog="A table per pair and direction: frames, frames/s, bits/s, drops by reason.\n"
                   "--watch refreshes it (on a terminal in place) until Ctrl-C; --json prints the\n"
                   "snapshot of the C counters, filter rule hits and link states as JSON."),
    Command("ports", "show the running bridge's ports: rings, slots, buffers, zero-copy, link state",
            add_ports_arguments, ports_command),
    Command("capture", "capture what a pair forwards and drops, and why, as pcapng (live)",
            add_capture_arguments, capture_command,
            epilog="Through the control socket, without stopping anything. Dropped frames carry a\n"
                   "comment naming the reason and the filter rule. Ends at --count, --duration,\n"
                   "Ctrl-C or when the pair stops. Example:\n"
                   "  nmbridge capture -p lan --what dropped -w - | tcpdump -nr -"),
    Command("reload", "make the running bridge re-read its config (as SIGHUP does) and say what changed",
            add_control_argument, reload_command,
            epilog="Filters are swapped between batches (no frame lost); pairs added, removed or\n"
                   "changed are started or stopped alone. All or nothing: a config that does not\n"
                   "load (exit 78) or a pair that cannot start (a missing interface, another\n"
                   "bridge's lock; exit 1) changes nothing, the running pairs go on, and the\n"
                   "reason is printed."),
    Command("version", "print the version", lambda p: None, version_command),
]


# --- the parser and main -----------------------------------------------------------------


def add_log_options(p: argparse.ArgumentParser, default: object) -> None:
    g = p.add_argument_group("logging")
    g.add_argument("--log-format", choices=logs.FORMATS, default=default,
                   help="json lines, console key=value, or auto: console on a terminal "
                        "(default: [log].format)")
    g.add_argument("--log-level", choices=logs.LEVELS, default=default,
                   help="the lowest level logged (default: [log].level, else info)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nmbridge", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="A software L2 bridge over netmap rings: forwards frames between pairs of\n"
                    "ports (netmap:, afpacket:, mem:), filtered, zero-copy where ports share memory.")
    add_log_options(parser, None)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for c in COMMANDS:
        p = sub.add_parser(c.name, help=c.help, description=c.help[:1].upper() + c.help[1:] + ".",
                           epilog=c.epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
        c.add_arguments(p)
        add_log_options(p, argparse.SUPPRESS)  # after the command too; the main parser's value stays
        p.set_defaults(handler=c.handler)
    return parser


def fail(message: str) -> None:
    """An error for a person: one line on stderr."""
    try:
        print(f"nmbridge: {' '.join(message.split())}", file=sys.stderr)
    except (OSError, AttributeError):  # stderr closed: the exit status still says it
        pass


def standard_streams() -> None:
    """Started with stdin, stdout or stderr closed (`>&-`): put /dev/null on the file
    descriptor, so that no socket or port nmbridge opens later gets fd 0-2 (and receives
    stray output), and give Python a stream to write to."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)


def main(argv: Sequence[str] | None = None) -> int:
    standard_streams()
    try:
        return _main(argv)
    except BrokenPipeError:  # the reader of stdout went away (`| head`): end quietly
        logs.discard_output(sys.stdout)
        return EX_PIPE


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        configure_logs(args)
        status: int = args.handler(args)
        return status
    except ConfigError as e:
        fail(str(e))
        return EX_CONFIG
    except ControlError as e:
        fail(str(e))
        return EX_CONFIG if e.config_error else EX_ERROR
    except NmbridgeError as e:
        fail(str(e))
        return EX_ERROR
    except KeyboardInterrupt:
        fail("interrupted")
        return EX_INTERRUPTED
