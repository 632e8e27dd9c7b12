"""The adaptive switch: measure both modes per batch-size bucket, side by side, keep the
faster, and measure both again now and then; single slow steps, a slow stretch of time and
lopsided acceptance do not fool it."""

import pytest

from vllm_layerskip.adaptive import DraftSwitch, bucket_of


def run(switch, batch, seconds_per_token, steps, slowdown=lambda step: 1):
    """Drive the switch with a fixed cost per generated token for each mode, times the
    machine's `slowdown` at each step."""
    decisions = []
    for step in range(steps):
        drafting = switch.should_draft(batch)
        decisions.append(drafting)
        switch.record(batch, drafting, seconds_per_token[drafting] * slowdown(step) * 10, 10)
    return decisions


def test_buckets():
    assert [bucket_of(b) for b in (1, 2, 3, 4, 5, 8, 9, 32, 33)] == [1, 2, 4, 4, 8, 8, 16, 32, 64]


def test_probes_both_modes_then_keeps_the_faster():
    switch = DraftSwitch(probe_steps=3, reprobe_every=1000)
    decisions = run(switch, 1, {True: 0.01, False: 0.02}, 20)
    assert decisions[:6] == [True, False] * 3  # probed in alternation
    assert all(decisions[6:])  # drafting is faster at batch 1
    decisions = run(switch, 32, {True: 0.03, False: 0.02}, 20)
    assert not any(decisions[6:])  # and slower at batch 32: switched off there only
    assert switch.should_draft(1)


def test_re_measures_the_loser_and_follows_a_change():
    switch = DraftSwitch(probe_steps=3, reprobe_every=50, window=3, probe_budget=1)
    assert not any(run(switch, 8, {True: 0.03, False: 0.02}, 40)[6:])
    # Acceptance went up: drafting is now the faster mode; the periodic probe finds out.
    decisions = run(switch, 8, {True: 0.01, False: 0.02}, 40)  # steps 41-80, probe at 50
    assert decisions[-1] is True
    assert switch.summary()[8]["drafting"] < switch.summary()[8]["plain"]


def test_ignores_empty_steps():
    switch = DraftSwitch(probe_steps=1)
    switch.record(4, True, 1.0, 0)
    assert switch.summary() == {}


def test_a_slow_step_now_and_then_does_not_flip_the_choice():
    # Every 8th step also prefills a new request and takes 20x as long, whichever mode ran
    # it. A running mean hands the lead to the mode that did not take the last spike; the
    # median keeps the faster mode (plain, by 10%).
    switch = DraftSwitch(probe_steps=6, reprobe_every=1000)
    decisions = run(switch, 32, {True: 0.011, False: 0.010}, 200,
                    slowdown=lambda step: 20 if step % 8 == 7 else 1)
    assert sum(decisions[12:]) == 0


def test_lopsided_acceptance_is_priced_by_its_mean():
    # A drafting step takes 30 ms whatever it yields; 3 of 5 steps accept everything (3
    # tokens), 2 accept nothing (1 token): 2.2 tokens per step, 13.6 ms per token, slower
    # than plain's 12 ms. The median of per-step ratios (10 ms) would keep drafting.
    switch = DraftSwitch(probe_steps=5, reprobe_every=1000, window=5)
    decisions, yields = [], iter([3, 1, 3, 1, 3] * 40)
    for _ in range(40):
        drafting = switch.should_draft(1)
        decisions.append(drafting)
        if drafting:
            switch.record(1, True, 0.030, next(yields))
        else:
            switch.record(1, False, 0.012, 1)
    assert not any(decisions[10:])
    assert switch.summary()[1]["drafting"] == pytest.approx(0.030 / 2.2)


def test_a_slow_stretch_during_the_probe_hits_both_modes():
    # The machine runs at half speed for steps 6-11 (another process took a core). Probing
    # one mode after the other would put that whole stretch on plain's probe and choose
    # drafting, 10% slower; probed in alternation, both modes take half of it.
    switch = DraftSwitch(probe_steps=6, reprobe_every=1000)
    decisions = run(switch, 1, {True: 0.011, False: 0.010}, 60,
                    slowdown=lambda step: 2 if 6 <= step < 12 else 1)
    assert not any(decisions[12:])


def test_a_reprobe_measures_both_modes_again_and_backs_off_while_the_answer_holds():
    # probe_budget=1: probes may cost anything, the doubling alone sets the gaps.
    switch = DraftSwitch(probe_steps=2, reprobe_every=10, window=4, max_reprobe_every=40,
                         probe_budget=1)
    cost = {True: 0.03, False: 0.02}
    # Steps 1-4 probe; step 5 finds plain faster and schedules the next probe 10 steps on.
    assert run(switch, 1, cost, 14) == [True, False, True, False] + [False] * 10
    assert run(switch, 1, cost, 4) == [True, False, True, False]  # steps 15-18
    decisions = run(switch, 1, cost, 200)  # steps 19-218
    probes = [i + 19 for i, drafting in enumerate(decisions) if drafting]
    # Same answer each time: from the end of one probe to the next, 20 steps, then 40 (the cap).
    assert probes == [39, 41, 83, 85, 127, 129, 171, 173, 215, 217]
    # Drafting became faster: the next probe (step 259) finds it, and a new answer is
    # checked again 10 steps on (273), which confirms it: the gap doubles to 20 from there.
    decisions = run(switch, 1, {True: 0.01, False: 0.02}, 60)  # steps 219-278
    plain = [i + 219 for i, drafting in enumerate(decisions) if not drafting]
    assert plain[-4:] == [260, 262, 274, 276]
    assert decisions[-1] is True and switch.buckets[1].interval == 20


def test_a_probe_that_found_the_loser_far_slower_waits_until_its_cost_is_repaid():
    # Drafting at 1.75x plain's seconds per token: a probe's 6 drafting steps cost 4.5
    # steps, so at a 1% budget the next probe comes 450 steps after this one ends (step 13),
    # not 200.
    switch = DraftSwitch()
    decisions = run(switch, 1, {True: 0.035, False: 0.02}, 13 + 460)
    assert decisions[:12] == [True, False] * 6 and not any(decisions[12:462])
    assert decisions[462:464] == [True, False]
    # A near tie (5% slower) costs little: the plain re-probe schedule applies (200).
    switch = DraftSwitch()
    decisions = run(switch, 1, {True: 0.021, False: 0.02}, 13 + 210)
    assert not any(decisions[12:212]) and decisions[212:214] == [True, False]
    with pytest.raises(ValueError, match="probe_budget"):
        DraftSwitch(probe_budget=0)


def test_a_new_bucket_takes_what_smaller_and_bigger_buckets_imply():
    switch = DraftSwitch(probe_steps=2, reprobe_every=20)
    assert not any(run(switch, 2, {True: 0.03, False: 0.02}, 10)[4:])  # batch 2: plain wins
    # Nothing follows for batch 1 from batch 2's plain: it probes at once.
    assert run(switch, 1, {True: 0.01, False: 0.02}, 2) == [True, False]
    # Drafting lost at batch 2, so it loses at 8: no probe until the one scheduled 20 steps
    # after the bucket's first (step 21).
    decisions = run(switch, 8, {True: 0.01, False: 0.02}, 25)
    assert decisions[:20] == [False] * 20 and decisions[20:24] == [True, False, True, False]
    assert decisions[-1] is True  # measured: at this (made-up) cost drafting wins after all
    # Batch 4 sits between batch 2's plain and batch 8's drafting: it is probed too.
    assert run(switch, 4, {True: 0.01, False: 0.02}, 2) == [True, False]

    switch = DraftSwitch(probe_steps=2, reprobe_every=20)
    assert all(run(switch, 32, {True: 0.01, False: 0.02}, 10)[4:])  # batch 32: drafting wins
    assert all(run(switch, 4, {True: 0.01, False: 0.02}, 20))  # so it wins at 4: no probe


def test_window_must_hold_the_probe():
    import pytest

    with pytest.raises(ValueError, match="probe_steps"):
        DraftSwitch(probe_steps=8, window=4)
    with pytest.raises(ValueError, match="max_reprobe_every"):
        DraftSwitch(reprobe_every=200, max_reprobe_every=100)


def test_step_clock_times_each_step_and_skips_prefill_steps():
    """`step()` closes the previous step with its wall time and the tokens its verification
    produced; a step that also prefills is not recorded."""
    switch = DraftSwitch(probe_steps=1, reprobe_every=1000, window=4)
    assert switch.step(2, decode_only=True, now=0.0) is True  # nothing measured yet: probe drafting
    switch.tokens_generated(8)  # 2 requests x (3 accepted + 1)
    assert switch.step(2, decode_only=True, now=0.04) is False  # probe plain next
    assert switch.summary()[2]["drafting"] == pytest.approx(0.04 / 8)
    switch.tokens_generated(2)
    switch.step(2, decode_only=False, now=10.0)  # a prefill landed in this step: ignored
    assert switch.summary()[2]["plain"] is None
    switch.tokens_generated(2)
    assert switch.step(2, decode_only=True, now=10.03) is True  # plain: 0.015 s/token > 0.005
    assert switch.summary()[2]["plain"] == pytest.approx(0.03 / 2)


@pytest.mark.parametrize("method,mode", [("layerskip_set_drafting", "sometimes"),
                                         ("layerskip_set_verification", "fast")])
def test_run_time_switches_name_what_is_allowed(method, mode):
    from types import SimpleNamespace

    from vllm_layerskip.runner import LayerSkipRunnerMixin, LayerSkipWorker

    runner = SimpleNamespace(drafting="always", drafter=SimpleNamespace(reuse_exit_states=True))
    worker = SimpleNamespace(model_runner=runner)
    runner.set_drafting = lambda m: LayerSkipRunnerMixin.set_drafting(runner, m)
    with pytest.raises(ValueError, match="mode must be one of") as err:
        getattr(LayerSkipWorker, method)(worker, mode)
    assert repr(mode) in str(err.value)
    assert runner.drafting == "always" and runner.drafter.reuse_exit_states  # unchanged
