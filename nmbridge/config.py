"""The configuration file: TOML in, frozen typed objects out.

Every error is one :class:`~nmbridge.errors.ConfigError` whose message names the file, the
line where the file has one, the key path, the value and the reason::

    bridge.toml:4: bridge.brust = 256: unknown key; did you mean "burst"?
    bridge.toml:12: pair[2].ports[1] = "eth1": afpacket:eth1 is already in pair "lan" (pair[1].ports[1])
    bridge.toml:7:9: Invalid value                       (a TOML syntax error: line and column)

One numbering everywhere a person reads it: counted from 1, as lines are.  ``pair[1]`` is
the first ``[[pair]]`` and is named ``pair1`` unless it has a name; ``filter.f.rule[3]`` is
the third ``[[filter.f.rule]]``, named ``rule 3`` in logs, counters and ``filter test``.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import os
import re
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar, cast

import tomli

from nmbridge.backends import (
    OpenOptions,
    PortSpec,
    backend,
    backend_names,
    parse_spec,
    resolve_default,
    ring_pairs,
    whole_number,
)
from nmbridge.errors import ConfigError
from nmbridge.filters import FilterWarning, check_filter
from nmbridge.filters.model import Action, FilterConfig, FilterError, RuleConfig, action_hint
from nmbridge.logs import FORMATS as LOG_FORMATS
from nmbridge.logs import LEVELS as LOG_LEVELS

Direction = Literal["both", "a_to_b", "b_to_a"]
DIRECTIONS: tuple[Direction, ...] = ("both", "a_to_b", "b_to_a")
ACTIONS: tuple[Action, ...] = ("pass", "drop")
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # pair and filter names: they appear in key paths
NAME_RULE = "1-64 letters, digits, '_' or '-'"
MAX_CONFIG_BYTES = 1 << 20  # a bridge config is a few KiB; a bigger file is the wrong file
SCHED_CHOICES = ("auto", "fifo", "other")  # [bridge] sched: see nmbridge.sched
MAX_SPIN_US = 1_000_000  # [bridge] spin_us: at most a second
MAX_PCAP = 2048  # characters of one pcap expression (libpcap's optimizer is superlinear)


# ---------------------------------------------------------------------------------------
# the objects


@dataclass(frozen=True)
class BridgeConfig:
    name: str = "br0"
    backend: str = "auto"  # default backend of a port string without "BACKEND:"
    burst: int = 1024  # slots per direction per batch (bridge.c's default); a ring holds num_slots - 1
    poll_timeout_ms: int = 1000
    stats_interval: float = 10.0  # seconds between stats events; 0 = none
    ring_slots: int = 1024  # slots per ring of user-memory ports
    buf_size: int = 2048  # bytes per buffer of user-memory ports
    link_setup: bool = True  # bring links up, promiscuous, offloads off
    sched: str = "other"  # forwarding threads: "other" (a short EEVDF slice), "fifo" (SCHED_FIFO), "auto"
    rt_priority: int = 1  # their SCHED_FIFO priority
    sched_slice_us: int = 100  # EEVDF slice of a normal forwarding thread (Linux 6.12+); 0: the kernel's
    cpu_dma_latency_us: int = -1  # hold /dev/cpu_dma_latency at this (PM QoS) while running; -1: no
    # µs a forwarding loop keeps polling its idle rings before it sleeps (README "Latency"):
    # "auto" = AUTO_SPIN_US for a normal thread, 0 for a SCHED_FIFO one
    spin_us: int | Literal["auto"] = "auto"
    # defaults of every pair's `workers` and `cpus` (README "Workers")
    workers: int | Literal["auto"] = 1
    cpus: tuple[int, ...] = ()


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "auto"


DEFAULT_CONTROL_SOCKET = "/run/nmbridge/control.sock"
SOCKET_PATH_MAX = 107  # bytes of sun_path, without the terminating NUL


@dataclass(frozen=True)
class MetricsConfig:
    listen: str | None = None  # "HOST:PORT" of the Prometheus endpoint; None = off


@dataclass(frozen=True)
class ControlConfig:
    socket: str | None = None  # None: the default path (best effort); "": no control socket

    @property
    def path(self) -> str:
        """Where the control socket goes ("" = nowhere)."""
        return DEFAULT_CONTROL_SOCKET if self.socket is None else self.socket


@dataclass(frozen=True)
class PairConfig:
    name: str
    a: PortSpec
    b: PortSpec
    direction: Direction = "both"
    filter_a_to_b: str | None = None  # a filter name, a key of Config.filters
    filter_b_to_a: str | None = None
    link_setup: bool = True
    keypath: str = ""  # pair[1]: counted from 1
    # forwarding threads, each over its own ring pairs of both ports (README "Workers"): a
    # number, or "auto" (one per ring pair, up to the CPUs in `cpus` or those this process may
    # use); worker w runs on cpus[w % len(cpus)] (none given: not pinned)
    workers: int | Literal["auto"] = 1
    cpus: tuple[int, ...] = ()

    @property
    def ports(self) -> tuple[PortSpec, PortSpec]:
        return (self.a, self.b)

    @property
    def filters(self) -> dict[str, str]:
        """Filter name per forwarding direction ("a_to_b", "b_to_a"), only where one is set."""
        both = {"a_to_b": self.filter_a_to_b, "b_to_a": self.filter_b_to_a}
        return {d: f for d, f in both.items() if f is not None}


@dataclass(frozen=True)
class Config:
    path: str
    bridge: BridgeConfig
    log: LogConfig
    pairs: tuple[PairConfig, ...]
    filters: Mapping[str, FilterConfig] = field(default_factory=dict)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    # rules that can never match or never decide (a config with warnings still loads)
    warnings: tuple[FilterWarning, ...] = field(default=(), compare=False)

    def as_dict(self) -> dict[str, object]:
        """The configuration as TOML-shaped data: ``from_dict(c.as_dict())`` equals `c`."""
        return {
            "bridge": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(self.bridge).items()},
            "log": vars(self.log).copy(),
            "metrics": {k: v for k, v in vars(self.metrics).items() if v is not None},
            "control": {k: v for k, v in vars(self.control).items() if v is not None},
            "filter": {name: _filter_dict(f) for name, f in self.filters.items()},
            "pair": [_pair_dict(p) for p in self.pairs],
        }


def _filter_dict(f: FilterConfig) -> dict[str, object]:
    rules: list[dict[str, object]] = []
    for r in f.rules:
        rule: dict[str, object] = {"name": r.name, "action": r.action, **r.fields}
        if r.pcap is not None:
            rule["pcap"] = r.pcap
        rules.append(rule)
    return {"default": f.default, "rule": rules}


def _pair_dict(p: PairConfig) -> dict[str, object]:
    out: dict[str, object] = {"name": p.name, "ports": [str(p.a), str(p.b)], "direction": p.direction,
                              "link_setup": p.link_setup, "workers": p.workers, "cpus": list(p.cpus)}
    for key in ("filter_a_to_b", "filter_b_to_a"):
        if getattr(p, key) is not None:
            out[key] = getattr(p, key)
    return out


# ---------------------------------------------------------------------------------------
# loading


def load(path: str | Path, bridge_overrides: Mapping[str, object] | None = None, *,
         require_pairs: bool = True) -> Config:
    """Read and validate a configuration file; raise ConfigError.

    `bridge_overrides` replaces ``[bridge]`` keys after the file is checked (a reload keeps
    the values that cannot change while running, and ports are then parsed with them).
    ``require_pairs=False`` accepts a file of filters only (``nmbridge filter test``)."""
    return loads(_read_utf8(path), str(path), bridge_overrides, require_pairs=require_pairs)


def _read_utf8(path: str | Path) -> str:
    """A config or rule file's text (see :func:`read_text`); ConfigError unless UTF-8."""
    try:
        return read_text(path).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _not_regular(mode: int) -> str | None:
    """What a file of `mode` is, when it is not a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def read_text(path: str | Path, limit: int = MAX_CONFIG_BYTES) -> bytes:
    """The bytes of a config file; ConfigError (one line) unless it is a readable regular
    file of at most `limit` bytes.  Never blocks (a FIFO is refused before it is opened, and
    opened non-blocking in case it became one) and never reads more than `limit` + 1 bytes
    (``-c /dev/zero`` is refused, not read until memory runs out)."""
    name = str(path)
    if not name:
        raise ConfigError("the config file path is empty")

    def refuse(what: str) -> ConfigError:
        return ConfigError(f"{name}: is {what}, not a config file: give the path of a regular TOML file "
                           "(write generated text to a file first)")

    try:
        kind = _not_regular(os.stat(path).st_mode)
        if kind:
            raise refuse(kind)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"{name}: cannot read: {e.strerror or e}") from None
    try:
        kind = _not_regular(os.fstat(fd).st_mode)  # replaced between stat() and open()
        if kind:
            raise refuse(kind)
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise ConfigError(f"{name}: cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if size > limit:
        raise ConfigError(f"{name}: larger than {_size(limit)}: not a bridge config (they are a few KiB; "
                          "is it the right file?)")
    return b"".join(chunks)


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n % (1 << 20) == 0 else f"{n} bytes"


def _parse_toml(text: str, path: str) -> dict[str, object]:
    """TOML text as a dict; ConfigError (one line, with the position where tomli gives one)."""
    try:
        return tomli.loads(text)
    except tomli.TOMLDecodeError as e:
        line, col = getattr(e, "lineno", None), getattr(e, "colno", None)
        if line is None:  # tomli < 2.1: the position is only in the message
            raise ConfigError(f"{path}: {e}") from None
        raise ConfigError(f"{path}:{line}:{col}: {e.msg}") from None
    except RecursionError:
        raise ConfigError(f"{path}: arrays or inline tables nested too deeply (a bridge config needs "
                          "a few levels)") from None
    except ValueError as e:  # not TOMLDecodeError: an integer longer than int() reads (4300 digits)
        reason = str(e).split(";")[0]
        raise ConfigError(f"{path}: a value TOML cannot hold: {reason}") from None


def loads(text: str, path: str = "<string>", bridge_overrides: Mapping[str, object] | None = None, *,
          require_pairs: bool = True) -> Config:
    """Parse and validate TOML text; `path` names it in errors."""
    data = _parse_toml(text, path)
    cfg = from_dict(data, path, text, require_pairs=require_pairs)
    if bridge_overrides:
        bridge = data.get("bridge", {})
        data["bridge"] = {**(bridge if isinstance(bridge, Mapping) else {}), **bridge_overrides}
        cfg = from_dict(data, path, text, require_pairs=require_pairs)
    return cfg


def load_rules(path: str | Path) -> tuple[FilterConfig, tuple[FilterWarning, ...]]:
    """A rule file: what goes under ``[filter.NAME]`` in a config, alone in a file (``default``
    and ``[[rule]]`` tables), for ``nmbridge filter test --rules``: the filter (named after
    the file; key paths ``rule[1]``, ``rule[2]``...) and its warnings.  Raises ConfigError,
    worded as :func:`load`'s."""
    return loads_rules(_read_utf8(path), str(path))


def loads_rules(text: str, path: str = "<string>") -> tuple[FilterConfig, tuple[FilterWarning, ...]]:
    """:func:`load_rules` on TOML text; `path` names it in errors."""
    data = _parse_toml(text, path)
    loader = _Loader(path, text)
    f = loader.filter("", path, data)
    return f, tuple(loader.check_filter(f))


def parse_direction(text: str) -> Direction | None:
    """One spelling of directions, two accepted: ``a_to_b`` (what nmbridge writes: JSON, logs,
    metrics, tables) and ``a-to-b``; also ``both``.  None when `text` is neither."""
    d = text.strip().lower().replace("-", "_")
    return d if d in DIRECTIONS else None


def parse_listen(text: str) -> tuple[str, int]:
    """``"127.0.0.1:9108"`` / ``"[::1]:9108"`` / ``"localhost:9108"`` -> (host, port);
    ValueError with the reason."""
    host, sep, port = text.rpartition(":")
    if not sep or whole_number(port, 0, 65535) is None:
        raise ValueError("must be HOST:PORT with a port from 0 (any free one) to 65535, "
                         "e.g. \"127.0.0.1:9108\"")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    if not host:
        raise ValueError("names no address: write 127.0.0.1:PORT (or 0.0.0.0:PORT for every address)")
    if host != "localhost":
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IP address (or localhost)") from None
        if addr.version == 6 and not bracketed:
            raise ValueError("write an IPv6 address in brackets: [::1]:9108")
    return host, int(port)


def is_loopback(host: str) -> bool:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


def from_dict(data: Mapping[str, object], path: str = "<dict>", text: str | None = None, *,
              require_pairs: bool = True) -> Config:
    """Validate TOML-shaped data (`text`, the file it came from, gives errors their line)."""
    return _Loader(path, text, require_pairs).config(data)


# ---------------------------------------------------------------------------------------
# validation

T = TypeVar("T")


def _show(value: object, depth: int = 0) -> str:
    """A value as TOML would spell it, cut short when long (or deeply nested)."""
    if depth > 8 and isinstance(value, list | Mapping):
        s = "..."
    elif isinstance(value, bool):
        s = "true" if value else "false"
    elif isinstance(value, str):
        s = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, list):
        more = ["..."] if len(value) > 20 else []
        s = "[" + ", ".join([*(_show(v, depth + 1) for v in value[:20]), *more]) + "]"
    elif isinstance(value, Mapping):
        more = ["..."] if len(value) > 20 else []
        s = "{" + ", ".join([*(f"{_bare(k)} = {_show(v, depth + 1)}" for k, v in list(value.items())[:20]),
                             *more]) + "}"
    else:
        s = str(value)
    return s if len(s) <= 80 else s[:77] + "..."


def _bare(key: object) -> str:
    """A key as TOML spells it: bare when it can be, else quoted (and escaped)."""
    text = str(key)
    return text if re.fullmatch(r"[A-Za-z0-9_-]+", text) else json.dumps(text, ensure_ascii=False)


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, Mapping):
        return "a table"
    return {str: "a string", int: "an integer", float: "a number", list: "an array"}.get(
        type(value), type(value).__name__)


class _Lines:
    """Key path -> line number, found by reading the TOML text line by line.

    Handles what operators write: ``[table]``, ``[[array]]`` (counted per path), ``key =`` and
    dotted/quoted keys.  A value inside an inline table or array is given its key's line.
    """

    _SEGMENT = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
    _DOTTED = rf"{_SEGMENT}(?:\s*\.\s*{_SEGMENT})*"
    _HEADER = re.compile(rf"^\s*(\[\[?)\s*({_DOTTED})\s*\]\]?\s*(#.*)?$")
    _KEY = re.compile(rf"^\s*({_DOTTED})\s*=")

    def __init__(self, text: str | None) -> None:
        self.lines: dict[str, int] = {}
        if text is None:
            return
        table = ""
        arrays: dict[str, int] = {}
        in_string: str | None = None
        for n, line in enumerate(text.splitlines(), 1):
            if in_string:
                if line.count(in_string) % 2:
                    in_string = None
                continue
            if m := self._HEADER.match(line):
                table = ".".join(self._split(m.group(2)))
                if m.group(1) == "[[":
                    arrays[table] = arrays.get(table, 0) + 1
                table = self._indexed(table, arrays)
                self.lines.setdefault(table, n)
            elif m := self._KEY.match(line):
                key = ".".join(self._split(m.group(1)))
                self.lines.setdefault(f"{table}.{key}" if table else key, n)
                rest = line[m.end():]
                for quote in ('"""', "'''"):
                    if rest.count(quote) % 2:
                        in_string = quote

    @classmethod
    def _split(cls, dotted: str) -> list[str]:
        return [s.strip()[1:-1] if s.strip()[:1] in "\"'" else s.strip()
                for s in re.findall(cls._SEGMENT, dotted)]

    @staticmethod
    def _indexed(table: str, arrays: dict[str, int]) -> str:
        """``filter.x.rule`` -> ``filter.x.rule[2]``: every array-of-tables prefix gets its
        number, counted from 1 like every number in messages."""
        parts = table.split(".")
        out: list[str] = []
        for i in range(len(parts)):
            prefix = ".".join(parts[: i + 1])
            out.append(f"{parts[i]}[{arrays[prefix]}]" if prefix in arrays else parts[i])
        return ".".join(out)

    def find(self, keypath: str) -> int | None:
        """The line of `keypath`, or of the nearest enclosing key or table that has one."""
        while keypath:
            if keypath in self.lines:
                return self.lines[keypath]
            shorter = re.sub(r"(\[\d+\]|\.[^.\[\]]+|^[^.\[\]]+)$", "", keypath)
            if len(shorter) >= len(keypath):  # a key the pattern cannot peel ("", "a[", "x]"): it
                shorter = keypath.rpartition(".")[0]  # looped for ever (`bridge = { "" = 1 }`)
            keypath = shorter
        return None


class _Loader:
    def __init__(self, path: str, text: str | None, require_pairs: bool = True) -> None:
        self.path = path
        self.lines = _Lines(text)
        self.require_pairs = require_pairs

    def error(self, keypath: str, reason: str, value: object = ...) -> ConfigError:
        """``FILE:LINE: KEYPATH = VALUE: REASON`` (no ``= VALUE`` when the key is missing)."""
        line = self.lines.find(keypath)
        where = f"{self.path}:{line}" if line else self.path
        shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in keypath)  # a key "\n"
        what = shown if value is ... else f"{shown} = {_show(value)}"
        return ConfigError(f"{where}: {what}: {reason}")

    # --- one table at a time ------------------------------------------------------------

    def table(self, keypath: str, value: object, known: Sequence[str], *, open_keys: bool = False
              ) -> _Table:
        if not isinstance(value, Mapping):
            raise self.error(keypath, f"must be a table, not {_kind(value)}", value)
        if not open_keys:
            for key in value:
                if key not in known:
                    raise self.unknown(f"{keypath}.{key}" if keypath else key, key, value[key], known)
        return _Table(self, keypath, value)

    def unknown(self, keypath: str, key: str, value: object, known: Sequence[str]) -> ConfigError:
        close = difflib.get_close_matches(key, known, n=1)
        hint = f'did you mean "{close[0]}"?' if close else f"known keys: {', '.join(known)}"
        return self.error(keypath, f"unknown key; {hint}", value)

    # --- the whole file -----------------------------------------------------------------

    def config(self, data: Mapping[str, object]) -> Config:
        top = self.table("", data, ("bridge", "log", "metrics", "control", "filter", "pair"))
        bridge = self.bridge(top.sub("bridge", _BRIDGE_KEYS))
        log = self.log(top.sub("log", ("level", "format")))
        metrics = self.metrics(top.sub("metrics", ("listen",)))
        control = self.control(top.sub("control", ("socket",)))
        filters = self.filters(top.raw.get("filter", {}))
        if self.require_pairs or "pair" in top.raw:
            pairs = self.pairs(top.raw.get("pair"), bridge, filters)
        else:
            pairs = ()
        warnings = [w for f in filters.values() for w in self.check_filter(f)]
        return Config(self.path, bridge, log, pairs, filters, metrics, control, tuple(warnings))

    def metrics(self, t: _Table) -> MetricsConfig:
        listen = t.get_optional_str("listen")
        if listen is not None:
            try:
                parse_listen(listen)
            except ValueError as e:
                raise self.error("metrics.listen", str(e), listen) from None
        return MetricsConfig(listen=listen)

    def control(self, t: _Table) -> ControlConfig:
        sock = t.get_optional_str("socket")
        if sock:
            if not os.path.isabs(sock):
                raise self.error("control.socket", "must be an absolute path (or \"\" for no control "
                                 "socket)", sock)
            if "\0" in sock:
                raise self.error("control.socket", "contains a NUL byte", sock)
            if len(os.fsencode(sock)) > SOCKET_PATH_MAX:
                raise self.error("control.socket", f"longer than {SOCKET_PATH_MAX} bytes: a unix socket "
                                 "path cannot be", sock)
            if sock.endswith("/"):
                raise self.error("control.socket", "names a directory: add the socket's file name", sock)
        return ControlConfig(socket=sock)

    def bridge(self, t: _Table) -> BridgeConfig:
        d = BridgeConfig()
        name = t.get_str("name", d.name)
        if not name:
            raise self.error("bridge.name", "must not be empty", name)
        ring_slots = t.get_int("ring_slots", d.ring_slots, 64, 16384)
        if ring_slots & (ring_slots - 1):
            raise self.error("bridge.ring_slots", "must be a power of two (64, 128, ... 16384)", ring_slots)
        buf_size = t.get_int("buf_size", d.buf_size, 256, 65536)
        if buf_size % 64:
            raise self.error("bridge.buf_size", "must be a multiple of 64", buf_size)
        sched_slice_us = t.get_int("sched_slice_us", d.sched_slice_us, 0, 100_000)
        if 0 < sched_slice_us < 100:
            raise self.error("bridge.sched_slice_us", "must be 0 (the kernel's) or 100 .. 100000 µs",
                             sched_slice_us)
        return BridgeConfig(
            name=name,
            backend=t.get_choice("backend", ("auto", *backend_names()), d.backend),
            burst=t.get_int("burst", d.burst, 1, 8192),
            poll_timeout_ms=t.get_int("poll_timeout_ms", d.poll_timeout_ms, 1, 60_000),
            stats_interval=t.get_number("stats_interval", d.stats_interval, 0.0, 86_400.0),
            ring_slots=ring_slots,
            buf_size=buf_size,
            link_setup=t.get_bool("link_setup", d.link_setup),
            sched=t.get_choice("sched", SCHED_CHOICES, d.sched),
            rt_priority=t.get_int("rt_priority", d.rt_priority, 1, 99),
            sched_slice_us=sched_slice_us,
            cpu_dma_latency_us=t.get_int("cpu_dma_latency_us", d.cpu_dma_latency_us, -1, 2_000_000_000),
            spin_us=self.spin_us(t, d.spin_us),
            workers=self.workers(t, d.workers),
            cpus=self.cpus(t, d.cpus),
        )

    def spin_us(self, t: _Table, default: int | Literal["auto"]) -> int | Literal["auto"]:
        """``spin_us``: "auto", or µs from 0 (sleep at once) to MAX_SPIN_US."""
        value = t.raw.get("spin_us", default)
        if value == "auto":
            return "auto"
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.error(t.path("spin_us"), f'must be a number of microseconds or "auto", not '
                             f"{_kind(value)}", value)
        if not 0 <= value <= MAX_SPIN_US:
            raise self.error(t.path("spin_us"), f'must be from 0 to {MAX_SPIN_US} µs (or "auto")', value)
        return value

    def workers(self, t: _Table, default: int | Literal["auto"]) -> int | Literal["auto"]:
        """``workers``: a whole number from 1 to MAX_WORKERS, or "auto"."""
        value = t.raw.get("workers", default)
        if value == "auto":
            return "auto"
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.error(t.path("workers"), f'must be a number of worker threads or "auto", not '
                             f"{_kind(value)}", value)
        if not 1 <= value <= MAX_WORKERS:
            raise self.error(t.path("workers"), f'must be from 1 to {MAX_WORKERS} (or "auto")', value)
        return value

    def cpus(self, t: _Table, default: tuple[int, ...]) -> tuple[int, ...]:
        """``cpus``: distinct CPU numbers this process may run on (worker w on cpus[w % len])."""
        if "cpus" not in t.raw:
            return default
        value = t.raw["cpus"]
        key = t.path("cpus")
        if not isinstance(value, list) or not all(isinstance(c, int) and not isinstance(c, bool)
                                                  for c in value):
            raise self.error(key, "must be an array of CPU numbers, e.g. [2, 3]", value)
        if len(set(value)) != len(value):
            raise self.error(key, "names a CPU twice: give each CPU once", value)
        allowed = allowed_cpus()
        bad = [c for c in value if c not in allowed]
        if bad:
            raise self.error(key, f"CPU {bad[0]} is not one this process may run on (allowed: "
                             f"{_cpu_list(allowed)})", value)
        return tuple(value)

    def pair_workers(self, t: _Table, keypath: str, bridge: BridgeConfig, a: PortSpec, b: PortSpec
                     ) -> tuple[int | Literal["auto"], tuple[int, ...]]:
        """A pair's workers and cpus (the [bridge] ones by default), checked against what the
        ports' backends can say now: each must split into that many ring pairs."""
        workers = self.workers(t, bridge.workers)
        cpus = self.cpus(t, bridge.cpus)
        if workers == "auto" or workers == 1:
            return workers, cpus
        where = t.path("workers") if "workers" in t.raw else "bridge.workers"
        for spec in (a, b):
            try:
                be = backend(spec.backend)
            except ImportError:
                continue
            if getattr(be, "open_shares", None) is None:
                raise self.error(where, f"{spec}: the {spec.backend} backend has one ring pair per port; "
                                 f"workers = {workers} needs {workers}", workers)
            try:  # what the backend can count before opening (an interface may not exist yet)
                n = ring_pairs(be, spec.name, OpenOptions())
            except Exception:
                continue
            if n < workers:
                raise self.error(where, f"{spec} has {n} ring pair{'s' if n != 1 else ''}: at most "
                                 f"{n} worker{'s' if n != 1 else ''} can forward it (one ring pair has one "
                                 "owner)", workers)
        return workers, cpus

    def log(self, t: _Table) -> LogConfig:
        d = LogConfig()
        return LogConfig(level=t.get_choice("level", LOG_LEVELS, d.level),
                         format=t.get_choice("format", LOG_FORMATS, d.format))

    def filters(self, value: object) -> dict[str, FilterConfig]:
        top = self.table("filter", value, (), open_keys=True)
        out: dict[str, FilterConfig] = {}
        for name, body in top.raw.items():
            keypath = f"filter.{name}"
            if not NAME_RE.match(name):
                raise self.error(keypath, f"a filter name must be {NAME_RULE}")
            out[name] = self.filter(keypath, name, body)
        return out

    def filter(self, keypath: str, name: str, body: object) -> FilterConfig:
        """One filter: `body` is a ``[filter.NAME]`` table (keypath "filter.NAME") or a whole
        rule file (keypath "")."""
        t = self.table(keypath, body, ("default", "rule"))
        default = self.action(t, "default")
        rules = tuple(self.rule(t.path(f"rule[{i + 1}]"), i, r) for i, r in enumerate(t.get_array("rule")))
        seen: dict[str, int] = {}
        for i, r in enumerate(rules):
            if r.name in seen:
                raise self.error(t.path(f"rule[{i + 1}].name"),
                                 f"rule[{seen[r.name] + 1}] has this name already", r.name)
            seen[r.name] = i
        return FilterConfig(name=name, default=default, rules=rules, keypath=keypath)

    def rule(self, keypath: str, i: int, value: object) -> RuleConfig:
        t = self.table(keypath, value, (), open_keys=True)
        name = t.get_str("name", f"rule {i + 1}")
        if not name:
            raise self.error(f"{keypath}.name", "must not be empty", name)
        if "action" not in t.raw:
            typo = difflib.get_close_matches("action", list(t.raw), n=1)
            hint = f' (is "{typo[0]}" a misspelling?)' if typo else ""
            raise self.error(f"{keypath}.action", f'required: "pass" or "drop"{hint}')
        action = self.action(t, "action")
        pcap = t.get_optional_str("pcap")
        fields = {k: v for k, v in t.raw.items() if k not in ("name", "action", "pcap")}
        if pcap is not None:
            if not pcap.strip():
                raise self.error(f"{keypath}.pcap", "must not be empty (leave pcap out to match every frame)",
                                 pcap)
            if len(pcap) > MAX_PCAP:
                raise self.error(f"{keypath}.pcap", f"{len(pcap)} characters, more than {MAX_PCAP}: "
                                 "libpcap's optimizer needs time and memory growing much faster than the "
                                 "expression (400 `port N` alternatives: 15 s; 20,000: gigabytes); split it "
                                 "into several rules with the same action (the first match wins)", pcap)
            if fields:
                first = next(iter(fields))
                raise self.error(f"{keypath}.{first}", "a rule has structured fields or pcap, not both; "
                                 "write two rules", fields[first])
        return RuleConfig(name=name, action=action, fields=fields, pcap=pcap, keypath=keypath)

    def action(self, t: _Table, key: str) -> Action:
        """A rule's action or a filter's default: "pass" or "drop", one spelling; the words
        other tools use ("accept", "deny", ...) are refused with the one to write."""
        value = t.get_str(key, "pass")
        if value in ACTIONS:
            return value
        hint = action_hint(value)
        if not hint:
            close = difflib.get_close_matches(value.strip().lower(), ACTIONS, n=1)
            hint = f'; did you mean "{close[0]}"?' if close else ""
        raise self.error(t.path(key), f'must be "pass" or "drop"{hint}', value)

    def check_filter(self, f: FilterConfig) -> list[FilterWarning]:
        """Compile `f` (errors become ConfigErrors at their key path); its warnings, each with
        the file and line of its rule."""
        try:
            found = check_filter(f) or []
        except FilterError as e:
            raise self.error(e.keypath, e.reason, e.value) from None
        out = []
        for w in found:
            line = self.lines.find(w.keypath)
            out.append(dataclasses.replace(w, where=f"{self.path}:{line}" if line else self.path))
        return out

    def pairs(self, value: object, bridge: BridgeConfig, filters: Mapping[str, FilterConfig]
              ) -> tuple[PairConfig, ...]:
        if value is None:
            raise self.error("pair", "no [[pair]]: a bridge needs at least one pair of ports")
        if isinstance(value, Mapping):
            raise self.error("pair", "write [[pair]] (an array of tables, one per pair), not [pair]")
        if not isinstance(value, list) or not value:
            raise self.error("pair", "must be an array of tables: [[pair]], one per pair of ports", value)
        pairs: list[PairConfig] = []
        names: dict[str, str] = {}  # pair name -> its key path
        owners: dict[tuple[str, str], tuple[str, str]] = {}  # (backend, interface) -> (pair, key path)
        kernel: dict[str, tuple[PortSpec, str, str]] = {}  # kernel interface -> (spec, pair, key path)
        for i, body in enumerate(value):
            p = self.pair(f"pair[{i + 1}]", i, body, bridge, filters)
            if p.name in names:
                raise self.error(f"{p.keypath}.name", f"{names[p.name]} has this name already", p.name)
            names[p.name] = p.keypath
            written = cast(Mapping[str, list[str]], body)["ports"]
            for j, spec in enumerate(p.ports):
                where = f"{p.keypath}.ports[{j + 1}]"
                interface = (spec.backend, spec.name.partition("?")[0])  # mem: options are not the port
                if interface in owners:
                    pair, other = owners[interface]
                    shown = f"{spec.backend}:{interface[1]}"
                    raise self.error(where, f"{shown} is this pair's other port too; a pair needs two "
                                     "different ports" if pair == p.name else
                                     f'{shown} is already in pair "{pair}" ({other}); an interface '
                                     "belongs to one pair only", written[j])
                owners[interface] = (p.name, where)
                self.one_backend_per_interface(kernel, spec, p.name, where, written[j])
            pairs.append(p)
        return tuple(pairs)

    def one_backend_per_interface(self, kernel: dict[str, tuple[PortSpec, str, str]], spec: PortSpec,
                                  pair: str, where: str, written: str) -> None:
        """Refuse a kernel interface reached through two backends (``afpacket:eth1`` here,
        ``netmap:eth1`` there): each would take every frame of the other's and transmit it
        again.  Within one backend the backend decides (netmap: NIC rings and host rings of one
        interface are two ports)."""
        try:
            interface = backend(spec.backend).interface(spec.name)
        except ImportError:  # a backend not in this build: opening its port says so
            return
        if interface is None:
            return
        if interface in kernel and kernel[interface][0].backend != spec.backend:
            other, other_pair, other_where = kernel[interface]
            raise self.error(where, f'interface {interface} is already used through {other} in pair '
                             f'"{other_pair}" ({other_where}); an interface is reached through one '
                             "backend only", written)
        kernel.setdefault(interface, (spec, pair, where))

    def pair(self, keypath: str, i: int, value: object, bridge: BridgeConfig,
             filters: Mapping[str, FilterConfig]) -> PairConfig:
        t = self.table(keypath, value, _PAIR_KEYS)
        name = t.get_str("name", f"pair{i + 1}")
        if not NAME_RE.match(name):
            raise self.error(f"{keypath}.name", f"a pair name must be {NAME_RULE}", name)
        if "ports" not in t.raw:
            raise self.error(f"{keypath}.ports", 'required: two ports, e.g. ["afpacket:eth1", "eth2"]')
        ports = t.raw["ports"]
        if not isinstance(ports, list) or len(ports) != 2:
            raise self.error(f"{keypath}.ports", "must be an array of two ports", ports)
        a, b = (self.port(f"{keypath}.ports[{j + 1}]", p, bridge.backend) for j, p in enumerate(ports))
        direction = self.direction(t)
        chosen = {d: self.pair_filter(t, d, direction, filters) for d in ("a_to_b", "b_to_a")}
        workers, cpus = self.pair_workers(t, keypath, bridge, a, b)
        return PairConfig(name=name, a=a, b=b, direction=direction,
                          filter_a_to_b=chosen["a_to_b"], filter_b_to_a=chosen["b_to_a"],
                          link_setup=t.get_bool("link_setup", bridge.link_setup), keypath=keypath,
                          workers=workers, cpus=cpus)

    def pair_filter(self, t: _Table, d: str, direction: Direction, filters: Mapping[str, FilterConfig]
                    ) -> str | None:
        """The filter of direction `d` ("a_to_b"): from ``filter_<d>``, else from ``filter``."""
        both, own = t.get_optional_str("filter"), t.get_optional_str(f"filter_{d}")
        key = f"filter_{d}" if own is not None else "filter"
        name = own if own is not None else both
        if name is None:
            return None
        if own is not None and both is not None:
            raise self.error(t.path(key), "set filter (both directions) or filter_a_to_b/filter_b_to_a, "
                             "not both", own)
        if name not in filters:
            close = difflib.get_close_matches(name, list(filters), n=1)
            defined = f" (defined: {', '.join(filters)})" if filters else " (no [filter.NAME] in the file)"
            hint = f'; did you mean "{close[0]}"?' if close else defined
            raise self.error(t.path(key), f"no such filter{hint}", name)
        if direction not in ("both", d):
            if own is not None:
                raise self.error(t.path(key), f'direction is "{direction}": nothing is forwarded '
                                 f"{d.replace('_', ' ')}", own)
            return None  # `filter` applies to the directions that forward
        return name

    def direction(self, t: _Table) -> Direction:
        """``pair[].direction``: both, a_to_b or b_to_a; a-to-b and b-to-a are read the same."""
        value = t.get_str("direction", "both")
        d = parse_direction(value)
        if d is None:
            close = difflib.get_close_matches(value.replace("-", "_"), DIRECTIONS, n=1)
            hint = f'; did you mean "{close[0]}"?' if close else ""
            raise self.error(t.path("direction"), f"must be one of {', '.join(DIRECTIONS)} "
                             f"(a-to-b and b-to-a are read the same){hint}", value)
        return d

    def port(self, keypath: str, value: object, default_backend: str) -> PortSpec:
        if not isinstance(value, str):
            raise self.error(keypath, f'must be a string like "afpacket:eth1", not {_kind(value)}', value)
        try:
            return parse_spec(value, default_backend)
        except ValueError as e:
            raise self.error(keypath, str(e), value) from None
        except ModuleNotFoundError as e:
            # A backend whose issue is still open (afpacket, netmap) has no module yet: its
            # port names stay unchecked until it lands, and opening such a port says so.
            if not (e.name or "").startswith("nmbridge.backends."):
                raise
            prefix, sep, rest = value.partition(":")
            if sep and prefix in backend_names():
                return PortSpec(prefix, rest)
            return PortSpec(resolve_default(default_backend), value)


_BRIDGE_KEYS = tuple(f.name for f in BridgeConfig.__dataclass_fields__.values())
_PAIR_KEYS = ("name", "ports", "direction", "filter", "filter_a_to_b", "filter_b_to_a", "link_setup",
              "workers", "cpus")
MAX_WORKERS = 64


def allowed_cpus() -> set[int]:
    """The CPUs this process may run on."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def workers_for(pc: PairConfig, rings_a: int, rings_b: int) -> int:
    """How many workers pair `pc` runs: its `workers`, or for "auto" one per ring pair of its
    smaller port, up to the CPUs given (or those this process may use)."""
    if pc.workers != "auto":
        return pc.workers
    return max(1, min(rings_a, rings_b, len(pc.cpus) or len(allowed_cpus())))


def _cpu_list(cpus: set[int]) -> str:
    """{0, 1, 2, 5} -> "0-2, 5"."""
    out: list[str] = []
    for c in sorted(cpus):
        if out and out[-1].split("-")[-1] == str(c - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{c}"
        else:
            out.append(str(c))
    return ", ".join(out)


class _Table:
    """Typed getters over one TOML table, each naming its key path in errors."""

    def __init__(self, loader: _Loader, keypath: str, raw: Mapping[str, object]) -> None:
        self.loader = loader
        self.keypath = keypath
        self.raw = raw

    def path(self, key: str) -> str:
        return f"{self.keypath}.{key}" if self.keypath else key

    def sub(self, key: str, known: Sequence[str]) -> _Table:
        return self.loader.table(self.path(key), self.raw.get(key, {}), known)

    def _get(self, key: str, default: T, ok: Callable[[object], bool], what: str) -> T:
        if key not in self.raw:
            return default
        value = self.raw[key]
        if not ok(value):
            raise self.loader.error(self.path(key), f"must be {what}, not {_kind(value)}", value)
        return cast(T, value)

    def get_str(self, key: str, default: str) -> str:
        return self._get(key, default, lambda v: isinstance(v, str), "a string")

    def get_optional_str(self, key: str) -> str | None:
        return self._get(key, None, lambda v: isinstance(v, str), "a string")

    def get_bool(self, key: str, default: bool) -> bool:
        return self._get(key, default, lambda v: isinstance(v, bool), "true or false")

    def get_int(self, key: str, default: int, lo: int, hi: int) -> int:
        value = self._get(key, default, lambda v: isinstance(v, int) and not isinstance(v, bool),
                          "an integer")
        if not lo <= value <= hi:
            raise self.loader.error(self.path(key), f"must be from {lo} to {hi}", value)
        return value

    def get_number(self, key: str, default: float, lo: float, hi: float) -> float:
        value = self._get(key, default, lambda v: isinstance(v, int | float) and not isinstance(v, bool),
                          "a number")
        if not lo <= value <= hi:
            raise self.loader.error(self.path(key), f"must be from {lo:g} to {hi:g}", value)
        return float(value)

    def get_choice(self, key: str, choices: Sequence[str], default: str) -> str:
        value = self.get_str(key, default)
        if value not in choices:
            close = difflib.get_close_matches(value, choices, n=1)
            hint = f'; did you mean "{close[0]}"?' if close else ""
            raise self.loader.error(self.path(key), f"must be one of {', '.join(choices)}{hint}", value)
        return value

    def get_array(self, key: str) -> list[object]:
        value: list[object] = self._get(key, [], lambda v: isinstance(v, list), "an array of tables")
        return value
