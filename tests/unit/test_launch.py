"""dpo_core.launch names the rank that failed first, also when the launcher only saw its peer die."""
from __future__ import annotations

from types import SimpleNamespace

from dpo_core.launch import _failure_summary


def _failed(**failures):
    return SimpleNamespace(failures={int(r[1:]): SimpleNamespace(**f) for r, f in failures.items()})


def test_a_rank_killed_by_a_signal_is_named():
    err = _failed(r1=dict(timestamp=10, message="", exitcode=-9))
    assert _failure_summary(err, 2) == "rank 1 failed: killed by signal 9"


def test_the_earliest_failure_is_the_one_named():
    err = _failed(r0=dict(timestamp=12, message="ValueError: late", exitcode=1),
                  r1=dict(timestamp=11, message="Traceback ...\nValueError: bad batch", exitcode=1))
    assert _failure_summary(err, 2) == "rank 1 failed: ValueError: bad batch"


def test_a_rank_that_lost_its_peer_names_the_peer():
    # Rank 1 was killed; by the time the launcher looked, rank 0 had died of the broken connection
    # (gloo raises, then the process aborts) and is the only failure it reports.
    gloo = ("RuntimeError: [../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:26281: "
            "Connection reset by peer. This is typically caused by a remote worker hanging")
    err = _failed(r0=dict(timestamp=10, message=gloo, exitcode=-6))
    assert _failure_summary(err, 2) == "rank 1 failed first: rank 0 lost contact with it (Connection reset by peer)"
    assert _failure_summary(err, 4) == "another rank failed first: rank 0 lost contact with it (Connection reset by peer)"


def test_without_failures_the_error_itself_is_summarised():
    assert _failure_summary(RuntimeError("rendezvous timed out\ndetails"), 2) == "rendezvous timed out"
