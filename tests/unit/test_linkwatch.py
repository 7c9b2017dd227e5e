"""The link watcher's decisions, fed link messages by hand (no netlink socket, no root)."""

from __future__ import annotations

import io
import json

from nmbridge.linkwatch import RTM_DELLINK, RTM_NEWLINK, LinkEvent, LinkWatcher

UP = 0x1 | 0x10000  # IFF_UP | IFF_LOWER_UP


def watcher() -> tuple[LinkWatcher, list[LinkEvent]]:
    got: list[LinkEvent] = []
    w = LinkWatcher({"eth1": "afpacket:eth1"}, got.append, indexes={"eth1": 7})
    w._observe("eth1", RTM_NEWLINK, UP, "UP", 7, initial=True)
    return w, got


def test_a_deleted_then_recreated_interface_is_never_up_until_reopened(log_lines: io.StringIO) -> None:
    w, got = watcher()
    assert w.state["eth1"] == LinkEvent("afpacket:eth1", "eth1", True, "UP", 7) and got == []
    w._observe("eth1", RTM_NEWLINK, 0x1, "DOWN", 7)  # going away: down first
    w._observe("eth1", RTM_DELLINK, 0, "DOWN", 7)
    assert w.state["eth1"] == LinkEvent("afpacket:eth1", "eth1", False, "NOTPRESENT", 0, stale=True)
    # the new interface of that name, even up, leaves the port stale: it asks to be re-opened
    w._observe("eth1", RTM_NEWLINK, 0, "DOWN", 12)
    w._observe("eth1", RTM_NEWLINK, UP, "UP", 12)
    assert w.state["eth1"] == LinkEvent("afpacket:eth1", "eth1", False, "REPLACED", 12, stale=True)
    assert [(e.operstate, e.stale) for e in got] == [
        ("DOWN", False), ("NOTPRESENT", True), ("REPLACED", True), ("REPLACED", True)]
    logged = [json.loads(x) for x in log_lines.getvalue().splitlines()]
    assert [(e["event"], e["level"], e["operstate"]) for e in logged] == [
        ("link_down", "warning", "DOWN"), ("link_down", "warning", "NOTPRESENT"),
        ("link_down", "warning", "REPLACED")]  # the second REPLACED is the same state: logged once


def test_link_up_is_info_and_an_unchanged_state_is_no_event(log_lines: io.StringIO) -> None:
    w, got = watcher()
    w._observe("eth1", RTM_NEWLINK, 0x1, "LOWERLAYERDOWN", 7)
    w._observe("eth1", RTM_NEWLINK, 0x1, "DOWN", 7)  # still down: no event
    w._observe("eth1", RTM_NEWLINK, UP, "UP", 7)
    assert [e.up for e in got] == [False, True]
    logged = [json.loads(x) for x in log_lines.getvalue().splitlines()]
    assert [(e["event"], e["level"]) for e in logged] == [("link_down", "warning"), ("link_up", "info")]


def test_a_renamed_interface_deleted_under_its_new_name_counts_for_the_port() -> None:
    w, _ = watcher()
    assert w._name_of("other0", 7, RTM_DELLINK) == "eth1"
    assert w._name_of("other0", 9, RTM_DELLINK) == "other0"



def test_an_interface_missing_at_start_is_told_when_it_appears_even_down() -> None:
    """What a lost pair's watcher (nmbridge.healing) needs: an interface not there at start
    that appears — down, before link set-up — is told (a reason to retry at once)."""
    got: list[LinkEvent] = []
    w = LinkWatcher({"eth1": "afpacket:eth1"}, got.append)
    w.state["eth1"] = LinkEvent("afpacket:eth1", "eth1", False, "NOTPRESENT")  # as _seed does
    w._observe("eth1", RTM_DELLINK, 0, "NOTPRESENT", 0, initial=True)
    got.clear()
    w._observe("eth1", RTM_NEWLINK, 0, "DOWN", 12)  # appears, down
    w._observe("eth1", RTM_NEWLINK, UP, "UP", 12)  # comes up
    assert [(e.operstate, e.ifindex) for e in got] == [("DOWN", 12), ("UP", 12)]
