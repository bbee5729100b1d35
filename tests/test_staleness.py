"""The capacity formula and the staleness manager's counters."""

import pytest

from agentflow import StalenessManager, staleness_capacity

# (version, accepted, running, eta, max_concurrent, B) -> capacity
CASES = [
    (0, 0, 0, 0, 100, 4, 4),  # synchronous: one batch at version 0
    (0, 4, 0, 0, 100, 4, 0),  # batch collected, nothing more until the trainer steps
    (1, 4, 0, 0, 100, 4, 4),  # trained once: next batch
    (0, 0, 0, 2, 100, 4, 12),  # eta=2: three batches ahead
    (0, 0, 3, 2, 100, 4, 9),  # running episodes count against the budget
    (0, 0, 0, 2, 5, 4, 5),  # concurrency cap binds first
    (0, 0, 5, 2, 5, 4, 0),  # all slots busy
    (3, 10, 2, 1, 64, 8, 28),  # (1+3+1)*8 - (10+2)
    (0, 20, 0, 1, 64, 8, 0),  # over budget (e.g. after a requeue storm): never negative
    (5, 0, 0, 0, 64, 8, 48),  # min(64, (0+5+1)*8)
]


@pytest.mark.parametrize(("version", "accepted", "running", "eta", "mc", "b", "expected"), CASES)
def test_capacity_table(version, accepted, running, eta, mc, b, expected):
    got = staleness_capacity(
        version=version, accepted=accepted, running=running, max_staleness=eta, max_concurrent=mc, batch_size=b
    )
    assert got == expected


def test_rejection_gives_the_slot_back():
    m = StalenessManager(max_staleness=0, max_concurrent=10, batch_size=2)
    m.on_start()
    m.on_start()
    assert m.capacity() == 0
    m.on_reject("timeout")
    assert m.capacity() == 1
    assert m.stats.rejected == {"timeout": 1}


def test_acceptance_keeps_the_slot_until_the_version_moves():
    m = StalenessManager(max_staleness=0, max_concurrent=10, batch_size=2)
    for _ in range(2):
        m.on_start()
        m.on_accept()
    assert m.capacity() == 0
    m.set_version(1)
    assert m.capacity() == 2


def test_give_back_frees_an_accepted_slot():
    m = StalenessManager(max_staleness=0, max_concurrent=10, batch_size=1)
    m.on_start()
    m.on_accept()
    assert m.capacity() == 0
    m.on_give_back()
    assert m.capacity() == 1


def test_recover_counts_version_times_batch_as_accepted():
    m = StalenessManager(max_staleness=1, max_concurrent=100, batch_size=4)
    m.recover(5)
    assert m.accepted == 20
    assert m.capacity() == (1 + 5 + 1) * 4 - 20
    m.on_start()
    m.on_accept()
    assert m.accepted == 21


# (version, accepted, eta, B) -> capacity with the ramp: eta grows as min(eta, version)
RAMP_CASES = [
    (0, 0, 2, 8, 8),  # version 0 admits one batch, not (2 + 1) * 8 = 24
    (1, 8, 2, 8, 16),  # (1 + 1 + 1) * 8 - 8
    (2, 24, 2, 8, 16),  # (2 + 2 + 1) * 8 - 24
    (3, 40, 2, 8, 8),  # from version eta on: AReaL's formula, (2 + 3 + 1) * 8 - 40
    (0, 0, 0, 8, 8),  # synchronous: unchanged
]


@pytest.mark.parametrize(("version", "accepted", "eta", "b", "expected"), RAMP_CASES)
def test_ramp_grows_the_bound_with_the_versions_done(version, accepted, eta, b, expected):
    got = staleness_capacity(
        version=version, accepted=accepted, running=0, max_staleness=eta, max_concurrent=1000, batch_size=b, ramp=True
    )
    assert got == expected


@pytest.mark.parametrize(("ramp", "expected"), [(True, [0, 0, 1, 1, 2, 2]), (False, [0, 1, 2, 2, 2, 2])])
def test_ramp_admits_one_batch_at_version_zero_so_the_first_steps_train_on_fresh_data(ramp, expected):
    m = StalenessManager(max_staleness=2, max_concurrent=100, batch_size=4, ramp=ramp)
    lags = []
    accepted_at: list[int] = []  # version at which each item started
    for step in range(6):  # admit what the bound allows, train on the next batch, bump the version
        while m.capacity():
            m.on_start()
            m.on_accept()
            accepted_at.append(m.version)
        lags.append(step - min(accepted_at[step * 4 : (step + 1) * 4]))
        m.set_version(step + 1)
    assert lags == expected  # a fast generator: every batch is as stale as the bound allows
    assert max(lags) <= m.max_staleness
