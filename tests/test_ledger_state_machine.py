"""The ledger under random interleavings (Hypothesis), against a real Redis and a model.

A state machine drives admits (with and without an end user), settles at, below and above
the reservation, reclaims of expired leases, late settles of reclaimed leases, settles and
admits replayed, budget PUTs that raise or lower a line, and clock moves across lease expiry,
midnight and the turn of a month. A plain Python model keeps what the books must be: spend per
scope and window as the sum of settled usage (and reclaimed reservations, later corrected), in
flight as the sum of open leases, and which admits must be refused. After every step the books
read from Redis must equal the model's, the in-flight counters must equal what the lease
records add up to, the usage counters must equal spend day by day, and no threshold fires twice
in a window; after every accepted admit, spend + in flight is within every line it was judged
against. Derandomized and bounded, so CI runs the same examples every time.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)
from ledger_harness import (
    ALREADY_ADMITTED,
    Admitted,
    Books,
    BudgetRefused,
    ClampTerms,
    Ledger,
    Usage,
    end_user_tag,
    open_client,
    open_ledger,
    spend_windows,
)
from ledger_model import (
    BUDGETS,
    LEASE,
    MAX_OPEN,
    START,
    THRESHOLDS,
    USERS,
    BudgetDef,
    Clamp,
    Lease,
    Model,
)


@st.composite
def clamps(draw: st.DrawFn) -> Clamp:
    """A request that may be clamped: one or two choices, an output cap of up to 600 per
    choice that may go as low as 16 or less, and prices that do not divide evenly."""
    cap = draw(st.integers(2, 600))
    prompt = draw(st.integers(0, 300))
    terms = ClampTerms(
        choices=draw(st.integers(1, 2)),
        cap=cap,
        lowest=draw(st.integers(1, min(cap - 1, 16))),
        input_cost=prompt * draw(st.integers(0, 10**9)),
        output_rate=draw(st.integers(0, 2 * 10**9)),
    )
    return Clamp(prompt, terms)


CLAMPS = clamps()


class LedgerMachine(RuleBasedStateMachine):
    redis_url: ClassVar[str]
    loop: ClassVar[asyncio.AbstractEventLoop]
    client: ClassVar[Any]
    spool: ClassVar[Path]

    def __init__(self) -> None:
        super().__init__()
        self.model = Model()
        self.admitted: tuple[str, str | None] | None = None
        """The last step's accepted admit (key, end user), for the invariants to judge."""
        self.ledger: Ledger = self.run(self._reset())

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    async def _reset(self) -> Ledger:
        await self.client.flushall()
        ledger = await open_ledger(
            self.redis_url,
            START,
            lease_seconds=LEASE,
            spool_dir=self.spool,
            redis=self.client,
            batch_settles=True,
        )
        await ledger.add_key("k1")
        await ledger.add_key("k2")
        for budget in BUDGETS:
            await ledger.put_budget(
                budget.scope,
                budget.scope_id,
                budget.first_line,
                period=budget.period,
                unit=budget.unit,
                thresholds=THRESHOLDS,
            )
        return ledger

    def advance(self, seconds: int) -> None:
        self.model.now += seconds
        self.ledger.clock.advance(seconds)

    # --- the one rule -------------------------------------------------------------------------
    # One rule that picks an action: Hypothesis runs many examples of a machine with only a few
    # of its rules enabled ("swarm testing"), which here wasted most examples on nothing but
    # budget PUTs or clock moves. The weights make admits and settles the common steps.

    @rule(data=st.data())
    def step(self, data: Any) -> None:
        model = self.model
        actions = [
            *(["admit"] * 4 if len(model.open) < MAX_OPEN else []),
            *(["settle"] * 3 if model.open else []),
            *(["settle together"] * 2 if model.open else []),
            *(["late settle"] * 2 if model.reclaimed else []),
            "replay",
            "budget",
            "reclaim",
            "tick",
            "midnight",
            "month",
        ]
        action = data.draw(st.sampled_from(actions), label="action")
        if action == "admit":
            kid = data.draw(st.sampled_from(["k1", "k2"]), label="kid")
            user = data.draw(st.sampled_from(USERS), label="user")
            if data.draw(st.booleans(), label="may be clamped"):
                self.admit(kid, user, clamp=data.draw(CLAMPS, label="clamp"))
            else:
                tokens = data.draw(st.integers(0, 1500), label="tokens")
                cost = data.draw(st.integers(0, 150_000), label="cost")
                prompt = data.draw(st.integers(0, tokens), label="prompt")
                self.admit(kid, user, tokens, cost, prompt)
        elif action in ("settle", "late settle"):
            pool = model.open if action == "settle" else model.reclaimed
            rid = data.draw(st.sampled_from(sorted(pool)), label="rid")
            lease = model.open[rid] if action == "settle" else model.reclaimed[rid].lease
            tokens = data.draw(st.integers(0, 2 * lease.tokens + 10), label="tokens")
            cost = data.draw(st.integers(0, 2 * lease.cost + 10), label="cost")
            (self.settle if action == "settle" else self.late_settle)(rid, tokens, cost)
        elif action == "settle together":
            self.settle_together(data)
        elif action == "replay":
            self.replay(data)
        elif action == "budget":
            budget = data.draw(st.sampled_from(BUDGETS), label="budget")
            self.put_budget(budget, data.draw(st.integers(1, 40), label="factor"))
        else:
            self.time_passes(action, data.draw(st.integers(0, 600), label="seconds"))

    # --- the actions --------------------------------------------------------------------------

    def admit(
        self,
        kid: str,
        user: str | None,
        tokens: int = 0,
        cost: int = 0,
        prompt: int = 0,
        clamp: Clamp | None = None,
    ) -> None:
        """``clamp``: a request that accepts a lower output cap; its reservation at the full
        cap is what it asks for."""
        if clamp is not None:
            prompt = clamp.prompt
            tokens, cost = clamp.reservation(clamp.terms.cap)
        self.model.serial += 1
        rid = f"r{self.model.serial}"
        terms = clamp.terms if clamp is not None else None
        decision = self.run(
            self.ledger.admit(
                kid, rid, tokens, cost, user=user, prompt=prompt, clamp=terms, clamp_asked=True
            )
        )
        reclaimed = self.model.reclaim_expired()
        expected = self.model.decide(kid, user, tokens, cost, clamp)
        if isinstance(expected, BudgetRefused):
            event(f"admit refused: {expected.why} by {expected.field}")
            assert decision == expected
            return
        lowered = " (clamped)" if expected.clamped_cap is not None else ""
        event("admit accepted" + (" after a reclaim" if reclaimed else "") + lowered)
        assert isinstance(decision, Admitted) and decision is not ALREADY_ADMITTED, decision
        got = (decision.reserved_tokens, decision.reserved_cost_nano, decision.clamped_cap)
        assert got == (expected.tokens, expected.cost, expected.clamped_cap)
        tags = ("k:" + kid, "o", *([end_user_tag(user)] if user else []))
        expiry = self.model.now * 1000 + LEASE * 1000
        self.model.open[rid] = Lease(tags, expected.tokens, expected.cost, prompt, expiry)
        self.admitted = (kid, user)

    def settle(self, rid: str, tokens: int, cost: int) -> None:
        lease = self.model.open.pop(rid)
        inp = min(lease.prompt, tokens)
        events = self.run(self.ledger.settle(lease.tags[0][2:], rid, tokens, cost, inp=inp))
        assert events >= 0
        self.model.charge(lease.tags, self.model.windows(), cost, tokens)
        self.model.count(1, inp, tokens - inp, cost)
        self.model.done.add(rid)

    def settle_together(self, data: Any) -> None:
        """Requests finishing at once, settled in one batched call (``settle_batch.lua``),
        maybe with an already settled request among them (a replay: a no-op item), maybe sent
        twice (a reply lost to a failover): the books are those of the same settles one by
        one."""
        pool = sorted(self.model.open)
        rids = data.draw(
            st.lists(st.sampled_from(pool), min_size=1, max_size=4, unique=True), label="rids"
        )
        items: list[tuple[str, str, int, int, int]] = []
        for rid in rids:
            lease = self.model.open[rid]
            tokens = data.draw(st.integers(0, 2 * lease.tokens + 10), label="tokens")
            cost = data.draw(st.integers(0, 2 * lease.cost + 10), label="cost")
            items.append((lease.tags[0][2:], rid, tokens, cost, min(lease.prompt, tokens)))
        if self.model.done and data.draw(st.booleans(), label="with a replay"):
            replayed = data.draw(st.sampled_from(sorted(self.model.done)), label="replayed")
            items.insert(
                data.draw(st.integers(0, len(items)), label="at"), ("k1", replayed, 77, 7777, 7)
            )
        resend = data.draw(st.booleans(), label="resent")
        events = self.run(self.ledger.settle_together(items, resend=resend))
        assert all(e >= 0 for e in events)
        for _kid, rid, tokens, cost, inp in items:
            if rid not in self.model.open:
                continue  # the replay: nothing changes
            lease = self.model.open.pop(rid)
            self.model.charge(lease.tags, self.model.windows(), cost, tokens)
            self.model.count(1, inp, tokens - inp, cost)
            self.model.done.add(rid)
        event(f"settled {min(len(items), 3)}+ together" + (", resent" if resend else ""))

    def late_settle(self, rid: str, tokens: int, cost: int) -> None:
        """The proxy that was thought dead settles after all: the charge becomes actual use."""
        charge = self.model.reclaimed.pop(rid)
        lease = charge.lease
        inp = min(lease.prompt, tokens)
        self.run(self.ledger.settle(lease.tags[0][2:], rid, tokens, cost, inp=inp))
        self.model.charge(lease.tags, charge.windows, cost - lease.cost, tokens - lease.tokens)
        out_delta = (tokens - inp) - (lease.tokens - lease.prompt)
        self.model.count(0, inp - lease.prompt, out_delta, cost - lease.cost)
        windows_moved = charge.windows != self.model.windows()
        event("late settle" + (" in a later window" if windows_moved else ""))
        self.model.done.add(rid)

    def replay(self, data: Any) -> None:
        """A replayed settle, or one of a request never admitted, changes no books (the
        latter leaves a tombstone); an admit retried by request id, or one reaching Redis
        after its release, reserves nothing and decides nothing else either (no reclaim)."""
        what = data.draw(st.sampled_from(["settle", "settle unknown", "admit"]), label="replay")
        if what == "admit":
            retried = sorted({*self.model.open, *self.model.tombstones})
            if retried:
                rid = data.draw(st.sampled_from(retried), label="rid")
                assert self.run(self.ledger.admit("k1", rid, 100, 1000)) == ALREADY_ADMITTED
            return
        if what == "settle unknown" or not self.model.done:
            self.model.serial += 1
            rid = f"ghost{self.model.serial}"
            self.model.tombstones.add(rid)
        else:
            rid = data.draw(st.sampled_from(sorted(self.model.done)), label="rid")
        assert self.run(self.ledger.settle("k1", rid, 77, 7777, inp=7)) == 0
        self.model.done.add(rid)

    def put_budget(self, budget: BudgetDef, factor: int) -> None:
        """Raise or lower a line (to as little as a twentieth of where it started)."""
        line = budget.first_line * factor // 20
        self.run(
            self.ledger.put_budget(
                budget.scope,
                budget.scope_id,
                line,
                period=budget.period,
                unit=budget.unit,
                thresholds=THRESHOLDS,
            )
        )
        self.model.lines[budget.name] = line

    def time_passes(self, kind: str, seconds: int) -> None:
        """``reclaim``: past a lease's life, then the sweeper's pass; ``tick``: a few seconds
        (leases of different ages); ``midnight``, ``month``: to just past the next midnight or
        first of a month (leases expire too, and the next admit reclaims them)."""
        if kind == "reclaim":
            self.advance(LEASE + seconds % 6)
            reclaimed = self.run(self.ledger.reclaim())
            assert reclaimed == (self.model.reclaim_expired(), 0, 0)
            event(f"reclaimed {min(reclaimed[0], 2)}+")
        elif kind == "tick":
            self.advance(1 + seconds % 20)
        else:
            now = datetime.fromtimestamp(self.model.now, UTC)
            if kind == "month":
                first = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)
                boundary = int(first.timestamp())
            else:
                boundary = (self.model.now // 86400 + 1) * 86400
            self.advance(boundary - self.model.now + seconds)

    # --- invariants ---------------------------------------------------------------------------

    @invariant()
    def books_match(self) -> None:
        books: Books = self.run(self.ledger.books(widths="d"))
        model = self.model
        if self.admitted is not None:
            self.within_every_line(books, *self.admitted)
            self.admitted = None
        assert books.spend == {k: v for k, v in model.spend.items() if v != (0, 0)}
        expected_inflight = {
            tag: model.held(tag) for tag in {t for lease in model.open.values() for t in lease.tags}
        }
        assert books.inflight == expected_inflight
        assert books.lease_sums == expected_inflight, "in-flight counters differ from leases"
        assert books.leases == {rid: lease.expiry_ms for rid, lease in model.open.items()}
        assert books.usage.get("d", Usage()) == model.usage
        for start, usage in books.usage_by_day.items():
            day = datetime.fromtimestamp(start, UTC).date().isoformat()
            assert (usage.cost, usage.input + usage.output) == books.spend.get(("o", day), (0, 0))
        for tag, events in books.events.items():
            seen = [
                (e["budget_id"], e["type"], e["pct"], e["period_key"], e.get("target_id"))
                for e in events
            ]
            assert len(seen) == len(set(seen)), f"a threshold fired twice in {tag}: {seen}"
        assert books.stuck == 0

    def within_every_line(self, books: Books, kid: str, user: str | None) -> None:
        """After an accepted admit: spend + in flight within each line it was judged by."""
        for budget in BUDGETS:
            tag = budget.tag(kid, user)
            if tag is None:
                continue
            w = spend_windows(self.model.now)[budget.period]
            at = 0 if budget.unit == "c" else 1
            spent = books.spend.get((tag, w), (0, 0))[at]
            held = books.inflight.get(tag, (0, 0, 0))[1 + at]
            assert spent + held <= self.model.lines[budget.name], (budget.name, spent, held)

    def teardown(self) -> None:
        """Minute and hour counters (too many to read after every step) add up to the same."""
        books: Books = self.run(self.ledger.books(widths="mh"))
        for width in ("m", "h"):
            assert books.usage.get(width, Usage()) == self.model.usage, width


SETTINGS = settings(
    max_examples=40,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def test_ledger_state_machine(redis_url: str, tmp_path: Path) -> None:
    """Synchronous on purpose: Hypothesis drives the machine, each step runs the ledger's
    coroutines on one event loop of its own (and one Redis client, flushed per example)."""
    loop = asyncio.new_event_loop()
    LedgerMachine.redis_url = redis_url
    LedgerMachine.loop = loop
    LedgerMachine.spool = tmp_path
    LedgerMachine.client = open_client(redis_url)
    try:
        run_state_machine_as_test(LedgerMachine, settings=SETTINGS)
    finally:
        loop.run_until_complete(LedgerMachine.client.aclose())
        loop.close()
