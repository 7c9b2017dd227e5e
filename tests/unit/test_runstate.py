"""Interface locks and persisted restore records (no root: plain files in a temporary directory)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from nmbridge.errors import LinkError
from nmbridge.links import (
    LinkState,
    RestoreRecord,
    merge_records,
    record_from_dict,
    record_to_dict,
)
from nmbridge.runstate import InterfaceLocks, netns_id


def state(name: str, index: int) -> LinkState:
    return LinkState(name, index, admin_up=False, promisc=False, mtu=1500)


def test_a_second_holder_is_refused_naming_the_first_ones_pid(tmp_path: Path) -> None:
    first, second = InterfaceLocks(str(tmp_path)), InterfaceLocks(str(tmp_path))
    assert first.acquire({"eth1": state("eth1", 7), "eth2": state("eth2", 8)}) == {}
    with pytest.raises(LinkError) as e:
        second.acquire({"eth3": state("eth3", 9), "eth2": state("eth2", 8)})
    assert str(e.value).startswith(f"interface eth2 is in use by another nmbridge (pid {os.getpid()}; ")
    assert "\n" not in str(e.value)
    assert second.held == {}  # all or nothing: eth3's lock was given back
    assert InterfaceLocks(str(tmp_path)).acquire({"eth3": state("eth3", 9)}) == {}
    first.release(["eth2"])
    assert not (tmp_path / "links" / f"{netns_id()}-8.lock").exists()
    assert second.acquire({"eth2": state("eth2", 8)}) == {}
    # the same name with another ifindex (re-created) is another interface
    assert InterfaceLocks(str(tmp_path)).acquire({"eth1": state("eth1", 70)}) == {}


def test_a_record_left_by_a_dead_holder_is_adopted(tmp_path: Path, log_lines: io.StringIO) -> None:
    rec = RestoreRecord("eth1", 7, admin_up=False, promisc=False, features={"rx-gro": True},
                        set_features={"rx-gro": False}, set_admin_up=True, set_promisc=True)
    dead = InterfaceLocks(str(tmp_path))
    dead.acquire({"eth1": state("eth1", 7)})
    dead.save("eth1", rec)
    os.close(dead.held.pop("eth1")[0])  # as kill -9 would: the lock goes, the record stays
    path = tmp_path / "links" / f"{netns_id()}-7.json"
    assert record_from_dict(json.loads(path.read_text())) == rec
    again = InterfaceLocks(str(tmp_path))
    assert again.acquire({"eth1": state("eth1", 7)}) == {"eth1": rec}
    recovered = [json.loads(x) for x in log_lines.getvalue().splitlines()]
    assert [e["event"] for e in recovered] == ["link_record_recovered"]
    assert recovered[0]["original"] == ["down", "promisc off", "rx-gro on"]
    again.save("eth1", None)  # restored
    assert not path.exists()
    again.release_all()
    assert list((tmp_path / "links").iterdir()) == []


def test_a_world_writable_state_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "links").mkdir()
    (tmp_path / "links").chmod(0o777)
    with pytest.raises(LinkError, match="writable by everyone"):
        InterfaceLocks(str(tmp_path)).acquire({"eth1": state("eth1", 7)})


def test_records_round_trip_and_merge_keeps_the_true_original() -> None:
    older = RestoreRecord("eth1", 7, admin_up=False, promisc=False, set_admin_up=True, set_promisc=True)
    # what the next run changed itself, from the state the dead run left: only GRO
    newer = RestoreRecord("eth1", 7, features={"rx-gro": True}, set_features={"rx-gro": False})
    merged = merge_records(older, newer)
    assert (merged.admin_up, merged.promisc, dict(merged.features)) == (False, False, {"rx-gro": True})
    assert record_from_dict(record_to_dict(merged)) == merged
    with pytest.raises(ValueError):
        record_from_dict({"ifname": "eth1", "index": "7"})
