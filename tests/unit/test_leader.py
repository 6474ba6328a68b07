"""The pure part of leader election (operator/kubetune_operator/leader.py): when a
standby may take a Lease over, the timing bounds that keep two leaders from
acting at once, and the errors a bad setting gets. The calls against a real
API server are in tests/envtest/test_operator_leader.py."""

from __future__ import annotations

import re

import pytest

from kubetune_operator.leader import (
    ENV_DEADLINE,
    ENV_DURATION,
    ENV_RETRY,
    EXIT_GRACE_SECONDS,
    MIN_GAP_SECONDS,
    WATCHDOG_TICK_SECONDS,
    LeaseClock,
    LeaseTiming,
    may_acquire,
    micro_time,
)


def test_a_standby_waits_the_full_duration_from_when_it_first_saw_the_record():
    clock = LeaseClock()
    clock.observe("100", now=50.0)  # the first look: the wait starts here, whatever renewTime says
    assert not may_acquire("a_1", "b_2", clock, duration=15, now=64.9)
    assert may_acquire("a_1", "b_2", clock, duration=15, now=65.0)


def test_a_renewal_seen_restarts_the_wait():
    clock = LeaseClock()
    clock.observe("100", now=0.0)
    clock.observe("100", now=10.0)  # unchanged: the wait keeps its start
    assert clock.seen_at == 0.0
    clock.observe("101", now=12.0)  # the leader renewed
    assert not may_acquire("a_1", "b_2", clock, duration=15, now=20.0)
    assert may_acquire("a_1", "b_2", clock, duration=15, now=27.0)


def test_a_released_or_own_lease_is_taken_at_once():
    clock = LeaseClock()
    clock.observe("7", now=100.0)
    assert may_acquire("", "b_2", clock, duration=15, now=100.0)
    assert may_acquire(None, "b_2", clock, duration=15, now=100.0)
    assert may_acquire("b_2", "b_2", clock, duration=15, now=100.0)


def test_defaults_and_the_failover_bound():
    timing = LeaseTiming()
    timing.check()
    assert (timing.duration, timing.deadline, timing.retry) == (15, 10, 2)
    assert timing.renew_every == 5
    assert timing.failover_bound == 19
    # A leader stops (deadline, the watchdog's tick, the hard exit) before any
    # standby may take over, with the smallest gap the check lets through.
    assert WATCHDOG_TICK_SECONDS + EXIT_GRACE_SECONDS < MIN_GAP_SECONDS
    LeaseTiming(duration=11, deadline=10, retry=2).check()


def test_from_env_reads_the_three_settings():
    timing = LeaseTiming.from_env({ENV_DURATION: "8", ENV_DEADLINE: "5", ENV_RETRY: "1"})
    assert (timing.duration, timing.deadline, timing.retry) == (8, 5, 1)
    assert LeaseTiming.from_env({}) == LeaseTiming()


@pytest.mark.parametrize(
    "env, names",
    [
        ({ENV_DURATION: "10", ENV_DEADLINE: "10"}, [ENV_DEADLINE, ENV_DURATION]),
        ({ENV_DURATION: "10", ENV_DEADLINE: "9.5"}, [ENV_DEADLINE, ENV_DURATION]),
        ({ENV_RETRY: "10"}, [ENV_RETRY, ENV_DEADLINE]),
        ({ENV_RETRY: "0"}, [ENV_RETRY]),
        ({ENV_DURATION: "fifteen"}, [ENV_DURATION]),
    ],
)
def test_bad_settings_name_the_variable(env, names):
    with pytest.raises(ValueError) as err:
        LeaseTiming.from_env(env)
    for name in names:
        assert name in str(err.value)


def test_micro_time_is_what_the_api_server_parses():
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", micro_time())
