"""The adaptive switch: measure both modes per batch-size bucket, keep the faster, and
re-measure the loser now and then."""

from vllm_layerskip.adaptive import DraftSwitch, bucket_of


def run(switch, batch, seconds_per_token, steps):
    """Drive the switch with a fixed cost per generated token for each mode."""
    decisions = []
    for _ in range(steps):
        drafting = switch.should_draft(batch)
        decisions.append(drafting)
        switch.record(batch, drafting, seconds_per_token[drafting] * 10, 10)
    return decisions


def test_buckets():
    assert [bucket_of(b) for b in (1, 2, 3, 4, 5, 8, 9, 32, 33)] == [1, 2, 4, 4, 8, 8, 16, 32, 64]


def test_probes_both_modes_then_keeps_the_faster():
    switch = DraftSwitch(probe_steps=3, reprobe_every=1000)
    decisions = run(switch, 1, {True: 0.01, False: 0.02}, 20)
    assert decisions[:6] == [True] * 3 + [False] * 3
    assert all(decisions[6:])  # drafting is faster at batch 1
    decisions = run(switch, 32, {True: 0.03, False: 0.02}, 20)
    assert not any(decisions[6:])  # and slower at batch 32: switched off there only
    assert switch.should_draft(1)


def test_re_measures_the_loser_and_follows_a_change():
    switch = DraftSwitch(probe_steps=3, reprobe_every=50, smoothing=1.0)
    assert not any(run(switch, 8, {True: 0.03, False: 0.02}, 40)[6:])
    # Acceptance went up: drafting is now the faster mode; the periodic probe finds out.
    decisions = run(switch, 8, {True: 0.01, False: 0.02}, 40)  # steps 41-80, probe at 50
    assert decisions[-1] is True
    assert switch.summary()[8]["drafting"] < switch.summary()[8]["plain"]


def test_ignores_empty_steps():
    switch = DraftSwitch(probe_steps=1)
    switch.record(4, True, 1.0, 0)
    assert switch.summary() == {}
