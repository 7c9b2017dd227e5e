"""A reload, all or nothing: the running config and the file's → a :class:`Plan` → a transaction.

**Plan** (pure; :func:`diff`): pairs added, removed, restarted (ports, direction, link_setup,
workers or cpus changed), re-filtered (only a filter changed); settings that apply at once;
``[bridge]`` keys that only a restart changes (``needs_restart``: they keep their running
values).

**Transaction** (:func:`swap_pairs`, also what re-opens the ports of a re-created interface):

1. check what can be checked without touching anything: every filter compiles (else
   ConfigError: ``nmbridge reload`` exits 78), every new port's backend is in this build;
2. hold the links of the pairs to start: every interface looked up, MTUs checked, each one
   not held yet locked and set up (one already held for a running pair is not touched again:
   no bounce).  A missing interface, another bridge's lock or a refused change fails here,
   with nothing changed;
3. pause the pairs that stop (removed, or the old selves of restarted ones) and share an
   interface (or a port) with a pair that starts: their forwarders stop, their ports stay
   open, frames wait in the kernel's rings (opening a second port on an interface while the
   first still forwards would send frames that arrive in between twice);
4. open every new port, all or nothing.  If that fails on an interface a paused pair holds
   (a backend that cannot open the same rings twice), the paused pairs' ports are closed and
   the open is retried; if it still fails, the old pairs' ports are opened again.  On failure
   the old pairs forward again, the links newly held are restored and unlocked, and the
   reload fails naming what failed (and whether old ports had to be re-opened);
5. commit: filters onto the new pairs, which start; removed pairs and the old selves of
   restarted ones stop and close; links no pair uses any more are restored and unlocked.

A pair that restarts starts with counters at 0 (its old counters are logged in
``pair_stopped``); so does a paused pair that forwards again after a failed step 4.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nmbridge import config as config_module
from nmbridge.backends import PortSpec, backend
from nmbridge.config import Config, PairConfig
from nmbridge.errors import ConfigError, NmbridgeError, PortError
from nmbridge.links import lookup_links
from nmbridge.logs import get_logger

if TYPE_CHECKING:
    from nmbridge.app import Bridge, _Pair

DIRECTIONS = ("a_to_b", "b_to_a")
# [bridge] keys that shape ports and forwarders already open: a reload keeps the old value
RESTART_KEYS = ("backend", "burst", "poll_timeout_ms", "ring_slots", "buf_size", "sched", "rt_priority",
                "sched_slice_us", "cpu_dma_latency_us", "spin_us")


@dataclass
class Plan:
    """What a reload changes (see the module doc)."""

    new: Config
    needs_restart: list[str] = field(default_factory=list)
    added: list[PairConfig] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    restarted: list[PairConfig] = field(default_factory=list)
    refilter: list[PairConfig] = field(default_factory=list)

    @property
    def to_start(self) -> list[PairConfig]:
        return [*self.restarted, *self.added]


def load_new(old: Config) -> tuple[Config, list[str]]:
    """The file's config, with the keys only a restart changes kept at their running values,
    and the names of those that differ.  Raises ConfigError."""
    written = config_module.load(old.path)
    frozen = {k: getattr(old.bridge, k) for k in RESTART_KEYS}
    needs_restart = [f"bridge.{k}" for k in RESTART_KEYS if getattr(written.bridge, k) != frozen[k]]
    new = config_module.load(old.path, frozen) if needs_restart else written
    for key, changed in (("log.format", new.log.format != old.log.format),
                         ("metrics.listen", new.metrics != old.metrics),
                         ("control.socket", new.control != old.control)):
        if changed:
            needs_restart.append(key)
    new = dataclasses.replace(new, log=dataclasses.replace(new.log, format=old.log.format),
                              metrics=old.metrics, control=old.control)
    return new, needs_restart


def diff(old: Config, new: Config, needs_restart: list[str] | None = None) -> Plan:
    """The plan from `old` (the running config) to `new`."""
    running = {p.name: p for p in old.pairs}
    plan = Plan(new, list(needs_restart or []))
    plan.removed = [name for name in running if name not in {pc.name for pc in new.pairs}]
    for pc in new.pairs:
        p = running.get(pc.name)
        if p is None:
            plan.added.append(pc)
        elif _shape(p) != _shape(pc):
            plan.restarted.append(pc)
        elif _filters_key(old, p) != _filters_key(new, pc):
            plan.refilter.append(pc)
    return plan


def reload(bridge: Bridge, source: str) -> dict[str, Any]:
    """Re-read the config file and apply what changed, all or nothing.  A file that does not
    load or a filter that does not compile: ConfigError; a pair that cannot start:
    NmbridgeError naming it.  Either way the running pairs go on, logged as
    ``reload_failed``."""
    bridge.notifier.reloading()
    bridge.log.info("reloading", source=source, config=bridge.config.path)
    try:
        result = _reload(bridge)
    except NmbridgeError as e:
        bridge.log.error("reload_failed", source=source, error=str(e), note="the running config stays")
        raise
    finally:
        bridge.heal.sync()
        bridge.notifier.ready(bridge.status())
    bridge.log.info("reloaded", source=source, **result)
    return result


def _reload(bridge: Bridge) -> dict[str, Any]:
    old = bridge.config
    new, needs_restart = load_new(old)
    plan = diff(old, new, needs_restart)
    if needs_restart:
        bridge.log.warning("reload_needs_restart", keys=needs_restart,
                           note="these keep their running values until nmbridge restarts")
    # pairs that are down with their ports closed are not started here (one that cannot start
    # would fail the whole reload): the healer keeps retrying them, with their new config
    lost = bridge.heal.lost_names() & {pc.name for pc in old.pairs}
    gone = [n for n in plan.removed if n in lost]
    plan.removed = [n for n in plan.removed if n not in lost]
    plan.restarted = [pc for pc in plan.restarted if pc.name not in lost]
    plan.refilter = [pc for pc in plan.refilter if pc.name not in lost]
    # 1. everything that can be checked without touching anything
    compiled: dict[str, dict[str, Any]] = {}
    running = {p.config.name: p for p in bridge.pairs}
    try:
        for pc in plan.to_start:
            compiled[pc.name] = bridge.compile(pc, new)
        for pc in plan.refilter:  # one program per running worker
            compiled[pc.name] = bridge.compile(pc, new, len(running[pc.name].fwd))
        for pc in new.pairs:  # the healer compiles them at each attempt: they must compile now
            if pc.name in lost:
                bridge.compile(pc, new)
    except (ValueError, NmbridgeError) as e:
        raise ConfigError(f"{new.path}: {e}") from None

    replaced = {pc.name: running[pc.name] for pc in plan.restarted}
    removed = [running[name] for name in plan.removed]
    final = list(new.pairs)
    swap_pairs(bridge, plan.to_start, compiled, replaced, removed, final)

    filters_changed: dict[str, dict[str, str | None]] = {}
    for pc in plan.refilter:
        p = running[pc.name]
        bridge.set_filters(p, compiled[pc.name])
        filters_changed[pc.name] = {d: pc.filters.get(d) for d in DIRECTIONS if d in p.fwd.stats()}
    for name in gone:
        bridge.heal.forget(name)
    by_name = {p.config.name: p for p in bridge.pairs}
    for pc in new.pairs:  # unchanged pairs take the new config too (key paths may move)
        if pc.name in lost:
            bridge.heal.update(pc)
        else:
            by_name[pc.name].config = pc
    bridge.pairs = [by_name[pc.name] for pc in new.pairs if pc.name in by_name]

    changes = _apply_settings(bridge, old, new)
    bridge.config = new  # with the pairs that are down: they are still wanted
    down = [pc.name for pc in new.pairs if pc.name in lost]
    return {"added": [pc.name for pc in plan.added], "removed": [*plan.removed, *gone],
            "restarted": [pc.name for pc in plan.restarted],
            "filters": filters_changed, "settings": changes, "needs_restart": needs_restart,
            "failed": {}, "pairs": [p.config.name for p in bridge.pairs],
            **({"down": down} if down else {})}


def swap_pairs(bridge: Bridge, start: list[PairConfig], compiled: dict[str, dict[str, Any]],
               replaced: dict[str, _Pair], removed: list[_Pair], final: list[PairConfig]) -> None:
    """Steps 2 to 5 of the transaction (see the module doc): start the pairs `start` (the ones
    named in `replaced` replace running pairs), stop `removed`; `final`: every pair's config
    afterwards (links no pair of it uses are released).  Raises with the old pairs
    forwarding."""
    # 1b. backends in this build (filters were compiled by the caller)
    from nmbridge.app import check_backends

    check_backends(start)
    # 2. links (a pair whose link_setup was turned on sets up the interfaces it keeps)
    setup_on = [pc for pc in start if pc.name in replaced and pc.link_setup
                and not replaced[pc.name].config.link_setup]
    newly = bridge.hold_links(start, retake={i for pc in setup_on for i in _interfaces(pc)})
    # 3. pause each pair that stops and shares an interface with a pair that starts
    starting = {i for pc in start for i in _interfaces(pc)}
    paused = [old for old in [*replaced.values(), *removed] if _interfaces(old.config) & starting]
    bridge.pause_pairs(paused)
    # 4. open
    try:
        opened = _open(bridge, start, paused)
    except NmbridgeError:
        bridge.release_links(newly)
        raise
    # 5. commit
    for p in opened:
        bridge.set_filters(p, compiled.get(p.config.name, {}))
    stopping = [*removed, *replaced.values()]
    bridge.close_pairs(stopping)
    for p in opened:
        bridge.start_pair(p)
    gone = {id(p) for p in stopping}
    kept = [p for p in bridge.pairs if id(p) not in gone]
    by_name = {p.config.name: p for p in [*kept, *opened]}
    bridge.pairs = [by_name[pc.name] for pc in final if pc.name in by_name]
    bridge.release_links(bridge.unused_links(final))
    # a pair whose link_setup was turned off gives its interfaces their original state back
    setup_off = [pc for pc in start if pc.name in replaced and not pc.link_setup
                 and replaced[pc.name].config.link_setup]
    if setup_off:
        bridge.links.restore({i for pc in setup_off for i in _interfaces(pc)})


def _open(bridge: Bridge, start: list[PairConfig], paused: list[_Pair]) -> list[_Pair]:
    """Step 4: open the new pairs' ports; on failure leave the old pairs forwarding."""
    try:
        return bridge.open_pairs(start)
    except (NmbridgeError, OSError) as e:
        failed = bridge.portset.failed if isinstance(e, PortError) else None
        first = str(e)
    blocking = [p for p in paused if failed is not None and _interface(failed) in _interfaces(p.config)]
    if not blocking:
        for p in paused:
            bridge.resume_pair(p)
        raise PortError(first)
    # a backend that cannot open the same rings twice: free them and try again
    bridge.close_pairs(blocking)
    try:
        opened = bridge.open_pairs(start)
    except (NmbridgeError, OSError) as e:
        second = str(e)
    else:
        return opened
    lost: list[str] = []
    for p in blocking:
        try:
            (again,) = bridge.open_pairs([p.config])
        except (NmbridgeError, OSError) as e:
            lost.append(f"pair {p.config.name} is down: {e}")
            bridge.pairs = [x for x in bridge.pairs if x is not p]
            bridge.heal.lost(p, str(e))  # its config stays: the healer opens it again
            bridge.log.error("pair_lost", pair=p.config.name, error=str(e),
                             note="down: retried with a backoff, and at once when its links change")
            continue
        bridge.set_filters(again, dict(p.filters))
        bridge.pairs = [again if x is p else x for x in bridge.pairs]
        bridge.start_pair(again)
        bridge.log.warning("pair_reopened", pair=p.config.name, note="the old ports, opened again")
    for p in paused:
        if p not in blocking:
            bridge.resume_pair(p)
    names = ", ".join(p.config.name for p in blocking)
    tail = f"; {'; '.join(lost)}" if lost else ""
    raise PortError(f"{second} (the old ports of {names} were closed to retry and opened again{tail})")


def relink(bridge: Bridge, name: str) -> str | None:
    """Re-open the ports of pair `name` whose interface was deleted and created again (its
    ports are bound to the deleted one and carry nothing).  The deleted interface's restore
    record goes with it (the interface it described is gone); the new interface is locked
    and set up afresh, and its own original state is what a stop restores.  Returns None
    when the pair forwards on live interfaces (re-opened, or nothing was stale), else why it
    is still down: the caller (:class:`nmbridge.healing.Healer`) keeps it down and retries
    (``nmbridge ports`` shows the stale port down meanwhile)."""
    p = next((x for x in bridge.pairs if x.config.name == name), None)
    if p is None or p.watcher is None:
        return None
    stale = [ev.ifname for ev in dict(p.watcher.state).values() if ev.stale]
    if not stale:
        return None
    try:
        present = lookup_links(stale)
    except NmbridgeError as e:
        bridge.log.error("relink_failed", pair=name, error=str(e))
        return str(e)
    missing = [n for n, st in present.items() if st is None]
    if missing:  # not back yet: its next event (or the healer's next attempt) tries again
        return f"interface {', '.join(missing)} is gone (deleted; waiting for it to come back)"
    log = get_logger(bridge=bridge.config.bridge.name)
    # re-created with fewer ring pairs than the pair has workers: the re-open cannot work, and
    # trying it would close the pair's other (healthy) ports and lose the pair; keep it as it is
    rings = [bridge.ring_pairs(s) for s in p.config.ports]
    n = config_module.workers_for(p.config, *rings)  # "auto" follows the new ring pairs
    short = [(s, r) for s, r in zip(p.config.ports, rings, strict=True) if r < n and _interface(s) in stale]
    if n > 1 and short:
        spec, r = short[0]
        err = (f"port {spec}: re-created with {r} ring pair{'s' if r != 1 else ''}, and the pair runs "
               f"{n} workers (one ring pair has one owner)")
        log.error("relink_failed", pair=name, error=err,
                  note="the pair stays down; retried, and at once on the next event of the interface")
        return err
    log.warning("relinking", pair=name, interfaces=stale,
                note="re-created under the same name: re-opening the pair's ports")
    bridge.links.forget(stale)
    bridge.locks.release(stale)
    try:
        compiled = {name: bridge.compile(p.config, bridge.config)}  # by pair, as swap_pairs takes it
        swap_pairs(bridge, [p.config], compiled, {name: p}, [], list(bridge.config.pairs))
    except (NmbridgeError, OSError) as e:
        log.error("relink_failed", pair=name, error=str(e),
                  note="the pair stays down; retried, and at once on the next event of the interface")
        return str(e)
    log.info("relinked", pair=name, interfaces=stale)
    return None


def _apply_settings(bridge: Bridge, old: Config, new: Config) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    if new.bridge.name != old.bridge.name:
        bridge.log = get_logger(bridge=new.bridge.name)
        changes["bridge.name"] = new.bridge.name
    if new.bridge.stats_interval != old.bridge.stats_interval:
        changes["bridge.stats_interval"] = new.bridge.stats_interval
    if new.log.level != old.log.level:
        if bridge.log_level_fixed:
            changes["log.level"] = f"{new.log.level} (the command line's --log-level stays)"
        else:
            logging.getLogger().setLevel(new.log.level.upper())
            changes["log.level"] = new.log.level
    return changes


def _shape(p: PairConfig) -> tuple[object, ...]:
    """What a pair cannot change without restarting it (workers: its ports are opened again,
    split into that many shares)."""
    return (p.a, p.b, p.direction, p.link_setup, p.workers, p.cpus)


def _filters_key(cfg: Config, p: PairConfig) -> dict[str, str | None]:
    """Each direction's filter, by content (a key path that moved is no change)."""
    out: dict[str, str | None] = {}
    for d, name in p.filters.items():
        f = cfg.filters[name]
        rules = [(r.name, r.action, r.fields, r.pcap) for r in f.rules]
        out[d] = json.dumps([name, f.default, rules], sort_keys=True, default=str)
    return out


def _interface(spec: PortSpec) -> str:
    """What two ports that cannot both be open share: the interface, else the port itself."""
    try:
        return backend(spec.backend).interface(spec.name) or str(spec)
    except Exception:
        return str(spec)


def _interfaces(p: PairConfig) -> set[str]:
    return {_interface(s) for s in p.ports}


