"""benchmarks/schedule_sim.py against timelines worked out by hand (2 ranks, simple numbers).

Every case: forward F = 1 (a microbatch's), backward B = 2, one-way latency 0.5, infinite bandwidth, no
optimizer or overheads unless said. A message arrives at max(sent + latency, posted) (+ bytes / bandwidth: 0
here): the bytes move once the receive is posted (`rendezvous`, as gloo does)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from schedule_sim import Engine, Link, StageTimes, simulate  # noqa: E402

L = Link(latency_s=0.5)


def mb_stages(opt: float = 0.0) -> list[StageTimes]:
    return [StageTimes(fwd=4.0, bwd=8.0, fwd_mb=1.0, bwd_mb=2.0, opt=opt) for _ in range(2)]


def events(result, rank):
    return [(w, mb, s, e) for r, w, _, mb, s, e in result.timeline(rank=rank, step=0)]


def test_gpipe_two_ranks_four_microbatches():
    # rank 0: F0..F3 back to back from 0, sending a_i at 1, 2, 3, 4; then it waits for the sends to complete and
    # for each gradient. rank 1 posts the receive of microbatch i only when it waits for it (after F(i-1)):
    #   a0 -> max(1 + 0.5, 0) = 1.5; F0 [1.5, 2.5]; a1 -> max(2.5, 2.5); F1 [2.5, 3.5]; F2 [3.5, 4.5]; F3 [4.5, 5.5];
    #   then B0..B3 back to back [5.5, 13.5], sending g_i at 7.5, 9.5, 11.5, 13.5.
    # rank 0 waits for a3 to arrive (4.5), posts g0 then: g0 -> 8; B0 [8, 10]; g1 (posted 10) -> max(10, 10);
    #   B1 [10, 12]; B2 [12, 14]; B3 [14, 16]. rank 1's step ends when its last gradient has arrived (14).
    r = simulate("gpipe", mb_stages(), [4.0], L, batch=1, steps=1, microbatches=4)
    assert events(r, 0) == [
        ("F", 0, 0, 1), ("F", 1, 1, 2), ("F", 2, 2, 3), ("F", 3, 3, 4),
        ("B", 0, 8, 10), ("B", 1, 10, 12), ("B", 2, 12, 14), ("B", 3, 14, 16),
    ]  # fmt: skip
    assert events(r, 1) == [
        ("F", 0, 1.5, 2.5), ("F", 1, 2.5, 3.5), ("F", 2, 3.5, 4.5), ("F", 3, 4.5, 5.5),
        ("B", 0, 5.5, 7.5), ("B", 1, 7.5, 9.5), ("B", 2, 9.5, 11.5), ("B", 3, 11.5, 13.5),
    ]  # fmt: skip
    assert r.step_end == [[16], [14]]


def test_gpipe_steady_state():
    # Step 1 starts on rank 0 at 16 and repeats step 0's pattern shifted by 16 (rank 1 is idle from 14).
    r = simulate("gpipe", mb_stages(), [4.0], L, batch=1, steps=8, microbatches=4)
    assert r.step_end[1] == pytest.approx([14 + 16 * k for k in range(8)])
    assert r.throughput == pytest.approx(1 / 16)


def test_a_late_receive_holds_the_bytes():
    # 1 byte/s, latency 0.5: sent at 0, posted at 3: the bytes move from 3 (rendezvous), arriving at 5; without
    # rendezvous they move from 0.5 and arrive at 2.5.
    def sender():
        yield ("send", 1, "a", 2.0)

    def receiver():
        yield ("compute", "F", 3.0, 0, -1)
        yield ("wait", "a")
        yield ("mark", 0)

    for rendezvous, arrival in ((True, 5.0), (False, 2.5)):
        marks, msgs = Engine(Link(0.5, 1.0), rendezvous=rendezvous).run([sender(), receiver()])
        assert msgs["a"][2] == arrival and marks[1] == [max(3.0, arrival)]


def test_1f1b_two_ranks_four_microbatches():
    # Schedule1F1B: rank 0 warms up with min(M, S - r) = 2 forwards, rank 1 with 1; a held send is fired with the
    # next receive and both are awaited.
    # rank 0: F0 [0, 1], a0 sent at 1; F1 [1, 2]; a0 done (1.5); a1 held; fires a1 at 2 and posts g0, and waits.
    # rank 1: a0 -> 1.5; F0 [1.5, 2.5]; B0 [2.5, 4.5]; sends g0 at 4.5 and posts a1 (4.5): a1 -> 5, g0 -> 5.
    # rank 0: B0 [5, 7]; F2 [7, 8]; at 8 fires a2, posts g1.   rank 1: F1 [5, 6]; B1 [6, 8]; at 8 sends g1, posts a2.
    #   a2, g1 -> 8.5.  rank 0: B1 [8.5, 10.5]; F3 [10.5, 11.5].   rank 1: F2 [8.5, 9.5]; B2 [9.5, 11.5].
    #   at 11.5 both: a3, g2 -> 12.  rank 0: B2 [12, 14], then posts g3 (14).  rank 1: F3 [12, 13]; B3 [13, 15];
    #   g3 sent 15 -> 15.5. rank 0: B3 [15.5, 17.5]. Steps end at 17.5 (rank 0) and 15.5 (g3 arrived).
    r = simulate("1f1b", mb_stages(), [4.0], L, batch=1, steps=1, microbatches=4)
    assert events(r, 0) == [
        ("F", 0, 0, 1), ("F", 1, 1, 2), ("B", 0, 5, 7), ("F", 2, 7, 8),
        ("B", 1, 8.5, 10.5), ("F", 3, 10.5, 11.5), ("B", 2, 12, 14), ("B", 3, 15.5, 17.5),
    ]  # fmt: skip
    assert events(r, 1) == [
        ("F", 0, 1.5, 2.5), ("B", 0, 2.5, 4.5), ("F", 1, 5, 6), ("B", 1, 6, 8),
        ("F", 2, 8.5, 9.5), ("B", 2, 9.5, 11.5), ("F", 3, 12, 13), ("B", 3, 13, 15),
    ]  # fmt: skip
    assert r.step_end == [[17.5], [15.5]]


def test_exact_cuts_take_turns():
    # dnicompile, exact cut, whole batches: fwd 1, bwd 2 on both ranks, optimizer 0.25.
    # rank 0: F [0, 1], sends h0 (rank 1 posted at 0) -> 1.5, waits for g0.
    # rank 1: F [1.5, 2.5], B [2.5, 4.5], sends g0 at 4.5 (before its update) -> 5, opt [4.5, 4.75].
    # rank 0: B [5, 7], opt [7, 7.25]; step 1: F [7.25, 8.25], h1 (posted at 1.5 by the prefetch) -> 8.75 ...
    # A step takes 1 + 0.5 + 1 + 2 + 0.5 + 2 + 0.25 = 7.25.
    st = [StageTimes(fwd=1.0, bwd=2.0, opt=0.25) for _ in range(2)]
    r = simulate("exact", st, [4.0], L, batch=1, steps=8)
    assert r.timeline(step=0) == [
        (0, "F", 0, -1, 0, 1), (1, "F", 0, -1, 1.5, 2.5), (1, "B", 0, -1, 2.5, 4.5), (1, "opt", 0, -1, 4.5, 4.75),
        (0, "B", 0, -1, 5, 7), (0, "opt", 0, -1, 7, 7.25),
    ]  # fmt: skip
    assert [e[4] for e in r.timeline(rank=1, step=1)] == [8.75, 9.75, 11.75]
    assert r.step_end[1] == pytest.approx([4.75 + 7.25 * k for k in range(8)])
    assert r.throughput == pytest.approx(1 / 7.25)


def synthetic_stages(bwd1: float) -> list[StageTimes]:
    return [
        StageTimes(fwd=1.0, bwd=2.0, opt=0.25, synth=0.5, learn=0.25),
        StageTimes(fwd=1.0, bwd=bwd1, opt=0.25),
    ]


def test_synthetic_never_waits_then_learns_when_the_gradient_has_come():
    # queue_depth 1. rank 0, step 0: F [0, 1], h0 -> 1.5; synthesizer [1, 1.5]; B [1.5, 3.5]; posts g0; opt
    #   [3.5, 3.75]; g0 has not come: no learning; the step ends at 3.75.
    # rank 1: F [1.5, 2.5], B [2.5, 5.5], sends g0 -> 6; opt [5.5, 5.75]; step 1: h1 (sent 4.75) -> 5.25:
    #   F [5.75, 6.75], B [6.75, 9.75], g1 -> 10.25.
    # rank 0, step 1: F [3.75, 4.75], synthesizer [4.75, 5.25], B [5.25, 7.25], opt [7.25, 7.5]; two batches owed
    #   (> queue_depth): takes g0 (there since 6): learn [7.5, 7.75]. Step 2: F [7.75, 8.75] ... opt [11.25, 11.5],
    #   learn g1 [11.5, 11.75].
    r = simulate("synthetic", synthetic_stages(3.0), [4.0], L, batch=1, steps=6, queue_depth=1)
    assert [(w, s, e) for _, w, _, _, s, e in r.timeline(rank=0, step=0)] == [
        ("F", 0, 1), ("synth", 1, 1.5), ("B", 1.5, 3.5), ("opt", 3.5, 3.75), ("learn", 7.5, 7.75),
    ]  # fmt: skip
    assert [(w, s, e) for _, w, _, _, s, e in r.timeline(rank=0, step=1)] == [
        ("F", 3.75, 4.75), ("synth", 4.75, 5.25), ("B", 5.25, 7.25), ("opt", 7.25, 7.5), ("learn", 11.5, 11.75),
    ]  # fmt: skip
    assert [(w, s, e) for _, w, _, _, s, e in r.timeline(rank=1, step=1)] == [
        ("F", 5.75, 6.75), ("B", 6.75, 9.75), ("opt", 9.75, 10.0),
    ]  # fmt: skip
    assert r.step_end[0][:3] == [3.75, 7.75, 11.75]


def test_synthetic_waits_when_the_queue_is_full():
    # rank 1 slow (B = 6): g0 is sent at 1.5 + 1 + 6 = 8.5 -> 9. rank 0 ends step 1's optimizer at 7.5 with two
    # batches owed (> 1) and waits: learn [9, 9.25]. With a queue of 4 it does not wait: step 1 ends at 7.5.
    r = simulate("synthetic", synthetic_stages(6.0), [4.0], L, batch=1, steps=3, queue_depth=1)
    assert [(w, s, e) for _, w, st, _, s, e in r.timeline(rank=0) if w == "learn"][0] == ("learn", 9, 9.25)
    assert r.step_end[0][1] == 9.25
    r4 = simulate("synthetic", synthetic_stages(6.0), [4.0], L, batch=1, steps=3, queue_depth=4)
    assert r4.step_end[0][:2] == [3.75, 7.5]
    # steady state: the slower rank sets the pace (1 + 6 + 0.25 per step on rank 1)
    r = simulate("synthetic", synthetic_stages(6.0), [4.0], L, batch=1, steps=40, queue_depth=4)
    assert r.throughput == pytest.approx(1 / 7.25)


def test_delayed_waits_only_for_a_late_gradient():
    # delay 1: rank 0 at step t runs F(t), sends h_t, then B(t - 1) with g_{t-1}. Step 0 has no gradient due:
    # no backward, no update; it ends at 1. Step 1: F [1, 2], h1 -> posted by rank 1's prefetch at 1.5 -> 2.5;
    # g0: rank 1 runs F [1.5, 2.5], B [2.5, 4.5], sends g0 -> 5: rank 0 waits, B(0) [5, 7], opt [7, 7.25].
    st = [StageTimes(fwd=1.0, bwd=2.0, opt=0.25) for _ in range(2)]
    r = simulate("delayed", st, [4.0], L, batch=1, steps=3, delay=1)
    assert [(w, b, s, e) for _, w, b, _, s, e in r.timeline(rank=0)][:4] == [
        ("F", 0, 0, 1), ("F", 1, 1, 2), ("B", 0, 5, 7), ("opt", 1, 7, 7.25),
    ]  # fmt: skip
    assert r.step_end[0][:2] == [1, 7.25]


def test_link_carries_one_message_at_a_time():
    # two 2-byte messages at 1 byte/s sent at 0 on one link: the second starts when the first is through.
    def sender():
        yield ("send", 1, "a", 2.0)
        yield ("send", 1, "b", 2.0)

    def receiver():
        yield ("post", "a")
        yield ("post", "b")
        yield ("wait", "b")
        yield ("mark", 0)

    engine = Engine(Link(latency_s=0.5, bandwidth_Bps=1.0))
    marks, msgs = engine.run([sender(), receiver()])
    assert msgs["a"][2] == 2.5 and msgs["b"][2] == 4.5 and marks[1] == [4.5]


def test_local_rank_never_waits_and_sends_nothing_back():
    st = [StageTimes(fwd=1.0, bwd=2.0, synth=0.5), StageTimes(fwd=1.0, bwd=2.0, bwd_no_input=1.0)]
    r = simulate("local", st, [4.0], L, batch=1, steps=4)
    assert r.step_end[0] == [3.5, 7.0, 10.5, 14.0]  # F + head + B, back to back
    assert not any(k[0] == "grad" for k in r.messages)
    assert [e[4:] for e in r.timeline(rank=1, step=0)] == [(1.5, 2.5), (2.5, 3.5)]  # no input gradient


def test_dnicompile_microbatched_1f1b():
    # RankWorker.train_microbatches with 1F1B: rank 0 warms up with min(M, S - r - 1) = 1 forward, rank 1 with 0;
    # every receive is posted when the step starts and sends never wait, so a message arrives 0.5 after its send.
    # rank 0: F0 [0, 1], F1 [1, 2], waits for g0.  rank 1: F0 [1.5, 2.5], B0 [2.5, 4.5] (g0 -> 5), F1 [4.5, 5.5],
    # B1 [5.5, 7.5] (g1 -> 8).  rank 0: B0 [5, 7], F2 [7, 8] (-> 8.5), B1 [8, 10], F3 [10, 11] (-> 11.5).
    # rank 1: F2 [8.5, 9.5], B2 [9.5, 11.5] (-> 12), F3 [11.5, 12.5], B3 [12.5, 14.5] (-> 15).
    # rank 0: B2 [12, 14], B3 [15, 17]. (torch's Schedule1F1B ends at 17.5: its sends wait for the receiver.)
    r = simulate("mb_1f1b", mb_stages(), [4.0], L, batch=1, steps=1, microbatches=4)
    assert events(r, 0) == [
        ("F", 0, 0, 1), ("F", 1, 1, 2), ("B", 0, 5, 7), ("F", 2, 7, 8),
        ("B", 1, 8, 10), ("F", 3, 10, 11), ("B", 2, 12, 14), ("B", 3, 15, 17),
    ]  # fmt: skip
    assert events(r, 1) == [
        ("F", 0, 1.5, 2.5), ("B", 0, 2.5, 4.5), ("F", 1, 4.5, 5.5), ("B", 1, 5.5, 7.5),
        ("F", 2, 8.5, 9.5), ("B", 2, 9.5, 11.5), ("F", 3, 11.5, 12.5), ("B", 3, 12.5, 14.5),
    ]  # fmt: skip
    assert r.step_end == [[17], [14.5]]


def test_shared_cores():
    # 2 cores, 1 other busy process: two computing ranks get 2/3 of a core each, a lone one a whole core.
    # A (work 1) ends at 1.5; B has done 1 of its 3 by then and runs the other 2 alone: ends at 3.5.
    def job(work):
        yield ("compute", "F", work, 0, -1)
        yield ("mark", 0)

    engine = Engine(Link(), cores=2, background=1.0)
    marks, _ = engine.run([job(1.0), job(3.0)])
    assert marks == [[1.5], [3.5]]
    assert [(e.start, e.end) for e in engine.events] == [(0, 1.5), (0, 3.5)]
