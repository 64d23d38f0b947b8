"""The test-only fault switch (server/fault_switch.py) cannot be turned on by accident: a real
server refuses it outside petald's tests and off loopback, at once, with a sentence."""

from __future__ import annotations

import pytest

from petald.p2pnode.server.fault_switch import FAULT_VARIABLE, TESTING_VARIABLE, FaultSwitch
from petald.p2pnode.server.server_node import ServeOptions, serve

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


def test_no_variable_no_switch():
    assert FaultSwitch.from_environment(LOOPBACK, [], [], {}) is None


def test_refused_without_the_testing_variable():
    with pytest.raises(ValueError, match=f"for petald's tests only .*{TESTING_VARIABLE}=1"):
        FaultSwitch.from_environment(LOOPBACK, [], [], {FAULT_VARIABLE: "nan@1"})


@pytest.mark.parametrize("listen, peers, announce", [
    (["/ip4/0.0.0.0/tcp/0"], [], []),
    (["/ip4/127.0.0.1/tcp/0", "/ip4/10.0.0.1/tcp/0"], [], []),
    (LOOPBACK, ["/ip4/10.0.0.2/tcp/4001/p2p/QmTest"], []),
    (LOOPBACK, [], ["/ip4/203.0.113.7/tcp/4001"]),
])
def test_refused_on_a_server_another_machine_can_reach(listen, peers, announce):
    with pytest.raises(ValueError, match="loopback addresses only"):
        FaultSwitch.from_environment(listen, peers, announce, {FAULT_VARIABLE: "nan@1", TESTING_VARIABLE: "1"})


@pytest.mark.parametrize("text", ["lie@1", "nan", "nan@0", "nan@x", "nan@1,,"])
def test_a_malformed_plan_is_refused(text):
    with pytest.raises(ValueError, match="KIND@STEP"):
        FaultSwitch.from_environment(LOOPBACK, [], [], {FAULT_VARIABLE: text, TESTING_VARIABLE: "1"})


def test_sessions_take_the_plan_in_turn():
    switch = FaultSwitch.from_environment(LOOPBACK, [], [], {FAULT_VARIABLE: "nan@2, garbage@1",
                                                             TESTING_VARIABLE: "1"})
    assert [(f.kind, f.from_step) for f in (switch.for_session() for _ in range(3))] == [
        ("nan", 2), ("garbage", 1), ("nan", 2)]


def test_serve_refuses_it_before_opening_any_model(monkeypatch):
    monkeypatch.setenv(FAULT_VARIABLE, "nan@1")
    monkeypatch.delenv(TESTING_VARIABLE, raising=False)
    with pytest.raises(ValueError, match="for petald's tests only"):
        serve(ServeOptions(model="/nonexistent/model", new_swarm=True), announce=lambda text: None)
