"""How `stillhouse up` paces restarts: doubling backoff up to a cap, reset by a long enough run."""

from __future__ import annotations

from stillhouse.cli.restart_policy import RestartPolicy


def test_backoff_doubles_up_to_its_cap() -> None:
    policy = RestartPolicy(initial_backoff_seconds=1, max_backoff_seconds=30)
    assert [policy.backoff_seconds(crashes) for crashes in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def test_a_run_long_enough_starts_the_count_again() -> None:
    policy = RestartPolicy(reset_after_seconds=60)
    assert policy.crashes_in_a_row(previous=5, uptime_seconds=59.9) == 6
    assert policy.crashes_in_a_row(previous=5, uptime_seconds=60) == 1


def test_settings_come_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("STILLHOUSE_UP_PROBE_FAILURE_THRESHOLD", "7")
    monkeypatch.setenv("STILLHOUSE_UP_MAX_BACKOFF_SECONDS", "5")
    policy = RestartPolicy()
    assert policy.probe_failure_threshold == 7
    assert policy.backoff_seconds(10) == 5
