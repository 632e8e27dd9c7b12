"""The adaptive switch: measure both modes per batch-size bucket, side by side, keep the
faster, and measure both again now and then; single slow steps, a slow stretch of time and
lopsided acceptance do not fool it."""

import pytest

from vllm_layerskip.adaptive import DraftSwitch, VerifySwitch, bucket_of


class Engine:
    """A simulated engine driving a switch as the runner does: each step's mode is decided
    as it begins, and its wall time and tokens are reported when the next one begins. A
    drafting step verifies the drafts of the step before it and drafts for the step after
    it, so its tokens depend on whether the previous step drafted: `accepted` per request
    if it did, 1 if not. A steady drafting step costs `seconds_per_token[True]` per token,
    `draft_share` of it in the draft loop; a steady plain step `seconds_per_token[False]`.
    `slowdown(step)` scales the whole step (a busy machine)."""

    def __init__(self, switch, accepted=2.0, draft_share=0.3):
        self.switch, self.accepted, self.draft_share = switch, accepted, draft_share
        self.clock, self.drafted, self.steps = 0.0, False, 0

    def run(self, batch, seconds_per_token, steps, slowdown=lambda step: 1):
        decisions = []
        for _ in range(steps):
            drafting = self.switch.step(batch, decode_only=True, now=self.clock)
            decisions.append(drafting)
            drafting_step = seconds_per_token[True] * self.accepted * batch
            seconds = ((1 - self.draft_share) * drafting_step if self.drafted
                       else seconds_per_token[False] * batch)  # verify K+1 tokens, or a plain forward
            seconds += self.draft_share * drafting_step if drafting else 0  # the draft loop
            self.switch.tokens_generated(round(batch * self.accepted) if self.drafted else batch)
            self.clock += seconds * slowdown(self.steps)
            self.drafted, self.steps = drafting, self.steps + 1
        return decisions


def run(switch, batch, seconds_per_token, steps, slowdown=lambda step: 1):
    """Drive `switch` with its own simulated engine (one per switch, kept across calls)."""
    engine = ENGINES.setdefault(id(switch), Engine(switch))
    return engine.run(batch, seconds_per_token, steps, slowdown)


ENGINES: dict[int, Engine] = {}


def modes(decisions) -> str:
    """'D' for a drafting step, '.' for a plain one."""
    return "".join("D" if d else "." for d in decisions)


def test_buckets():
    assert [bucket_of(b) for b in (1, 2, 3, 4, 5, 8, 9, 32, 33)] == [1, 2, 4, 4, 8, 8, 16, 32, 64]


def test_probes_both_modes_then_keeps_the_faster():
    switch = DraftSwitch(probe_steps=3, reprobe_every=1000)
    decisions = run(switch, 1, {True: 0.01, False: 0.02}, 20)
    # A block of each mode; the first step of each is a switch-over step, not counted.
    assert modes(decisions[:8]) == "DDDD...."
    assert all(decisions[8:])  # drafting is faster at batch 1
    assert switch.summary()[1] == {"drafting": pytest.approx(0.01), "plain": pytest.approx(0.02)}
    decisions = run(switch, 32, {True: 0.03, False: 0.02}, 20)
    assert modes(decisions[:7]) == "DDD...."  # the engine was drafting: no switch-over first
    assert not any(decisions[7:])  # and slower at batch 32: switched off there only
    assert switch.choose(1)


def test_drafting_that_pays_is_found_although_its_tokens_arrive_a_step_late():
    # Drafting at 0.6x plain's seconds per token. The step that switches to drafting yields
    # one token for a plain forward plus the draft loop, and the plain step after it takes
    # the drafts' tokens. Counted, those two steps price drafting at 1.26x plain and plain
    # at 0.21x, and a switch probing one step of each in turn never drafts.
    switch = DraftSwitch(probe_steps=6, reprobe_every=1000)
    decisions = run(switch, 1, {True: 0.012, False: 0.02}, 200)
    assert all(decisions[16:])
    assert switch.summary()[1]["drafting"] == pytest.approx(0.012)
    assert switch.summary()[1]["plain"] == pytest.approx(0.02)


def test_re_measures_the_loser_and_follows_a_change():
    switch = DraftSwitch(probe_steps=3, reprobe_every=50, window=3, probe_budget=1)
    assert not any(run(switch, 8, {True: 0.03, False: 0.02}, 40)[7:])
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
    assert sum(decisions[16:]) == 0


def test_lopsided_acceptance_is_priced_by_its_mean():
    # A drafting step takes 30 ms whatever it yields; 3 of 5 steps accept everything (3
    # tokens), 2 accept nothing (1 token): 2.2 tokens per step, 13.6 ms per token, slower
    # than plain's 12 ms. The median of per-step ratios (10 ms) would keep drafting.
    switch = DraftSwitch(probe_steps=5, reprobe_every=1000, window=5)
    decisions, yields = [], iter([3, 1, 3, 1, 3] * 40)
    for _ in range(40):
        drafting = switch.choose(1)
        decisions.append(drafting)
        if drafting:
            switch.record(1, True, 0.030, next(yields))
        else:
            switch.record(1, False, 0.012, 1)
    assert not any(decisions[10:])
    assert switch.summary()[1]["drafting"] == pytest.approx(0.030 / 2.2)


def test_a_slow_stretch_during_the_probe_hits_both_modes():
    # The machine runs at half speed for steps 8-13 (another process took a core). Probing
    # one mode after the other (7 drafting steps, then 7 plain) would put that whole
    # stretch on plain's probe and choose drafting, 10% slower; probed in blocks of 3 in
    # turn, both modes take part of it and the medians keep plain.
    switch = DraftSwitch(probe_steps=6, reprobe_every=1000)
    decisions = run(switch, 1, {True: 0.011, False: 0.010}, 60,
                    slowdown=lambda step: 2 if 8 <= step < 14 else 1)
    assert modes(decisions[:16]) == "DDDD....DDDD...."
    assert not any(decisions[16:])


def test_a_reprobe_measures_both_modes_again_and_backs_off_while_the_answer_holds():
    # probe_budget=1: probes may cost anything, the doubling alone sets the gaps.
    switch = DraftSwitch(probe_steps=2, reprobe_every=10, window=4, max_reprobe_every=40,
                         probe_budget=1)
    cost = {True: 0.03, False: 0.02}
    # Steps 1-3 probe drafting (step 1 is not counted: no step before it), 4-6 plain (4 is
    # a switch-over step); step 7 finds plain faster and schedules the next probe 10 steps
    # on (17). It starts with plain, the mode the engine is in: 17-18, then drafting 19-21.
    assert modes(run(switch, 1, cost, 18)) == "DDD" + "." * 15
    decisions = run(switch, 1, cost, 200)  # steps 19-218
    probes = [i + 19 for i, drafting in enumerate(decisions) if drafting]
    # Same answer each time: from the end of one probe to the next, 20 steps (22 -> 42),
    # then 40 (the cap: 47 -> 87, 92 -> 132, ...).
    assert probes == [19, 20, 21, 44, 45, 46, 89, 90, 91, 134, 135, 136, 179, 180, 181]
    # Drafting became faster: the probe due at 222 finds it, and a new answer is checked
    # again 10 steps on (237: drafting first, then plain 239-241), which confirms it; the
    # gap doubles from there (262, then 40).
    decisions = run(switch, 1, {True: 0.01, False: 0.02}, 60)  # steps 219-278
    plain = [i + 219 for i, drafting in enumerate(decisions) if not drafting]
    assert plain == [219, 220, 221, 222, 223, 239, 240, 241, 264, 265, 266]
    assert decisions[-1] is True and switch.buckets[1].interval == 40


def test_a_probe_that_found_the_loser_far_slower_waits_until_its_cost_is_repaid():
    # Drafting at 1.75x plain's seconds per token: a probe's 8 drafting steps (6 timed, 2
    # switch-over) cost 6 steps, so at a 1% budget the next probe comes 600 steps after
    # this one ends (step 17, so at step 617), not 200.
    switch = DraftSwitch()
    decisions = run(switch, 1, {True: 0.035, False: 0.02}, 13 + 620)
    assert modes(decisions[:16]) == "DDDD....DDDD...." and not any(decisions[16:619])
    assert modes(decisions[616:623]) == "...DDDD"  # the probe: plain first, the engine's mode
    # A near tie (5% slower) costs little: the plain re-probe schedule applies (200).
    switch = DraftSwitch()
    decisions = run(switch, 1, {True: 0.021, False: 0.02}, 13 + 220)
    assert not any(decisions[16:219]) and modes(decisions[216:223]) == "...DDDD"
    with pytest.raises(ValueError, match="probe_budget"):
        DraftSwitch(probe_budget=0)


def test_a_new_bucket_takes_what_smaller_and_bigger_buckets_imply():
    switch = DraftSwitch(probe_steps=2, reprobe_every=20)
    assert modes(run(switch, 2, {True: 0.03, False: 0.02}, 10)) == "DDD......."  # plain wins
    # Nothing follows for batch 1 from batch 2's plain: it probes at once, plain first.
    assert modes(run(switch, 1, {True: 0.01, False: 0.02}, 8)) == "..DDDDDD"
    # Drafting lost at batch 2, so it loses at 8: no probe until the one scheduled 20 steps
    # after the bucket's first (step 21).
    decisions = run(switch, 8, {True: 0.01, False: 0.02}, 30)
    assert modes(decisions[:25]) == "." * 22 + "DDD"
    assert decisions[-1] is True  # measured: at this (made-up) cost drafting wins after all
    # Batch 4 sits between batch 2's plain and batch 8's drafting: it is probed too.
    assert modes(run(switch, 4, {True: 0.01, False: 0.02}, 8)) == "DD...DDD"

    switch = DraftSwitch(probe_steps=2, reprobe_every=20)
    assert all(run(switch, 32, {True: 0.01, False: 0.02}, 10)[6:])  # batch 32: drafting wins
    assert all(run(switch, 4, {True: 0.01, False: 0.02}, 20))  # so it wins at 4: no probe


def test_window_must_hold_the_probe():
    import pytest

    with pytest.raises(ValueError, match="probe_steps"):
        DraftSwitch(probe_steps=8, window=4)
    with pytest.raises(ValueError, match="max_reprobe_every"):
        DraftSwitch(reprobe_every=200, max_reprobe_every=100)


def test_step_clock_counts_steady_decode_steps_only():
    """`step()` closes the previous step with its wall time and the tokens its verification
    produced. A step counts only if it prefilled nothing and ran the same mode as the step
    before it."""
    switch = DraftSwitch(probe_steps=1, reprobe_every=1000, window=4)
    assert switch.step(2, decode_only=True, now=0.0) is True  # nothing measured: probe drafting
    switch.tokens_generated(2)  # no drafts to verify yet
    assert switch.step(2, decode_only=True, now=0.03) is True  # that step did not count
    assert switch.summary()[2] == {"drafting": None, "plain": None}
    switch.tokens_generated(8)  # 2 requests x (3 accepted + 1)
    assert switch.step(2, decode_only=True, now=0.07) is False  # drafting measured: probe plain
    assert switch.summary()[2]["drafting"] == pytest.approx(0.04 / 8)
    switch.tokens_generated(8)  # this plain step verifies the last drafts: a switch-over
    assert switch.step(2, decode_only=False, now=0.10) is False
    switch.tokens_generated(2)  # a prefill in this step: it takes 9.9 s and does not count
    switch.step(2, decode_only=True, now=10.0)
    assert switch.summary()[2]["plain"] is None
    switch.tokens_generated(2)
    assert switch.step(2, decode_only=True, now=10.03) is True  # plain: 0.015 s/token > 0.005
    assert switch.summary()[2]["plain"] == pytest.approx(0.03 / 2)
    switch.restart()  # drafting switched by hand: the open step is not timed
    switch.tokens_generated(100)
    switch.step(2, decode_only=True, now=10.04)
    assert switch.summary()[2]["drafting"] == pytest.approx(0.04 / 8)


@pytest.mark.parametrize("method,mode", [("layerskip_set_drafting", "sometimes"),
                                         ("layerskip_set_verification", "fast")])
def test_run_time_switches_name_what_is_allowed(method, mode):
    from types import SimpleNamespace

    from vllm_layerskip.runner import LayerSkipRunnerMixin, LayerSkipWorker

    runner = SimpleNamespace(drafting="always", drafter=SimpleNamespace(reuse_exit_states=True))
    worker = SimpleNamespace(model_runner=runner)
    runner.set_drafting = lambda m: LayerSkipRunnerMixin.set_drafting(runner, m)
    runner.set_verification = lambda m: LayerSkipRunnerMixin.set_verification(runner, m)
    with pytest.raises(ValueError, match="mode must be one of") as err:
        getattr(LayerSkipWorker, method)(worker, mode)
    assert repr(mode) in str(err.value)
    assert runner.drafting == "always" and runner.drafter.reuse_exit_states  # unchanged


def run_verification(switch, batch, verify_seconds, steps, draft_seconds=0.004, accepted=2):
    """Drafting on every step: each step verifies the previous step's drafts in the mode
    chosen while they were drafted (`verify_seconds[split]` per request), then drafts."""
    choices, verified_split, clock = [], None, getattr(switch, "_test_clock", 0.0)
    for _ in range(steps):
        split = switch.step(batch, decode_only=True, now=clock)
        choices.append(split)
        switch.tokens_generated(batch * accepted)
        clock += batch * (verify_seconds[verified_split] if verified_split is not None
                          else verify_seconds[False]) + draft_seconds
        verified_split = split
    switch._test_clock = clock
    return choices


def test_verify_switch_keeps_the_faster_verification_per_batch_size():
    switch = VerifySwitch(probe_steps=3, reprobe_every=1000)
    # Batch 1: the stock forward is faster (the split's second pass costs more than the
    # layers it skips); the probe alternates the two step by step.
    choices = run_verification(switch, 1, {True: 0.012, False: 0.010}, 20)
    assert choices[:6] == [True, False] * 3 and not any(choices[8:])
    assert switch.summary()[1] == {"split": pytest.approx((0.004 + 0.012) / 2),
                                   "stock": pytest.approx((0.004 + 0.010) / 2)}
    # Batch 32: compute-bound, the layers < E skipped for K of K+1 tokens pay.
    assert all(run_verification(switch, 32, {True: 0.008, False: 0.010}, 20)[8:])


def test_verify_switch_times_a_step_under_the_mode_its_drafts_were_saved_for():
    # The choice made while drafting takes effect in the next step's verification. Timed
    # under the step's own choice, an alternating probe would swap the two figures and keep
    # the slower mode.
    switch = VerifySwitch(probe_steps=4, reprobe_every=1000)
    choices = run_verification(switch, 8, {True: 0.006, False: 0.010}, 30)
    assert all(choices[10:])
    summary = switch.summary()[8]
    assert summary["split"] < summary["stock"]


def test_verify_switch_skips_the_step_after_a_plain_one():
    switch = VerifySwitch(probe_steps=1, reprobe_every=1000)
    assert switch.step(1, decode_only=True, now=0.0) is True  # probe split first
    switch.tokens_generated(1)
    switch.restart()  # the next step does not draft: it verifies, untimed
    switch.step(1, decode_only=True, now=5.0)  # drafts again, but verifies nothing
    switch.tokens_generated(1)
    switch.step(1, decode_only=True, now=5.01)
    assert switch.summary()[1] == {"split": None, "stock": None}


def test_verify_switch_carries_a_split_win_to_bigger_batches():
    switch = VerifySwitch(probe_steps=2, reprobe_every=50)
    assert run_verification(switch, 8, {True: 0.006, False: 0.010}, 10)[-1] is True
    assert all(run_verification(switch, 32, {True: 0.006, False: 0.010}, 10))  # implied: no probe
    switch = VerifySwitch(probe_steps=2, reprobe_every=50)
    assert run_verification(switch, 8, {True: 0.012, False: 0.010}, 10)[-1] is False
    assert not any(run_verification(switch, 2, {True: 0.012, False: 0.010}, 10))  # stock carries down
    assert run_verification(switch, 32, {True: 0.012, False: 0.010}, 2) == [True, False]  # probed
