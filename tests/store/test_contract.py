"""The ``TaskStore`` contract, run unchanged against memory, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import itertools

import pytest
from storekit import OWNER, WORKER, S, agent_msg, drive_to, new_task, stored_feedback, user_msg

from tether.core.errors import (
    ContextMismatch,
    InvalidInput,
    InvalidTransition,
    LeaseLost,
    TaskNotCancelable,
    TaskNotFound,
    TaskTerminal,
    UnsupportedOperation,
)
from tether.core.states import TERMINAL, TRANSITIONS, TaskState, can_transition
from tether.core.types import JSON, Feedback, TaskRecord, text_message
from tether.store.base import Claim, ListQuery, Start, Submitted, TaskStore
from tether.store.common import stamp

ALICE, BOB = "alice", "bob"
LEASE = 30.0


async def claimed(store: TaskStore, worker: str = WORKER) -> TaskRecord:
    task = await new_task(store)
    claim = await store.claim(task.id, worker, lease_seconds=LEASE, max_attempts=3)
    assert claim is not None and claim.task is not None
    return claim.task


# -- state machine ------------------------------------------------------------


@pytest.mark.parametrize("frm", list(TaskState), ids=lambda s: s.value)
async def test_every_transition_from(store: TaskStore, frm: TaskState) -> None:
    """All of ``frm`` x every state: the table's pairs succeed, every other one is refused."""
    for to in TaskState:
        task = await drive_to(store, frm)
        msg = agent_msg(task, f"{frm.value} -> {to.value}")
        if can_transition(frm, to):
            event = await store.transition(task.id, to, message=msg)
            after = await store.get_task(OWNER, task.id, history_length=None)
            assert after.state is to
            assert after.version == task.version + 1
            assert event.seq == after.last_seq == task.last_seq + 1
            assert event.kind == "status"
            assert event.payload["status"]["state"] == to.wire
            assert event.final == (to.terminal or to.interrupted)
            assert after.status_message == msg
            assert after.history[-1] == msg
        else:
            with pytest.raises(InvalidTransition) as info:
                await store.transition(task.id, to, message=msg)
            assert info.value.current is frm
            assert info.value.wanted is to
            after = await store.get_task(OWNER, task.id, history_length=None)
            assert (after.state, after.version, after.last_seq) == (
                frm,
                task.version,
                task.last_seq,
            )
            assert after.history == task.history


def test_transition_table_covers_every_state() -> None:
    assert set(TRANSITIONS) == set(TaskState)
    for terminal in TERMINAL:
        assert not any(terminal in sources for sources in TRANSITIONS.values())


@pytest.mark.parametrize("terminal", sorted(TERMINAL), ids=lambda s: s.value)
async def test_terminal_states_are_never_left(store: TaskStore, terminal: TaskState) -> None:
    task = await drive_to(store, terminal)
    for to in TaskState:
        with pytest.raises(InvalidTransition) as info:
            await store.transition(task.id, to)
        assert info.value.current is terminal
    with pytest.raises(TaskNotCancelable):
        await store.cancel(OWNER, task.id)
    with pytest.raises(TaskTerminal):
        await store.resume(owner=OWNER, task_id=task.id, message=user_msg())
    with pytest.raises(InvalidTransition):
        await store.update_status(task.id, agent_msg(task), lease_owner=WORKER)
    with pytest.raises(InvalidTransition):
        await store.add_artifact(task.id, {"artifactId": "a", "parts": []}, lease_owner=WORKER)
    assert await store.claim(task.id, WORKER, lease_seconds=LEASE, max_attempts=3) is None
    after = await store.get_task(OWNER, task.id)
    assert (after.state, after.last_seq) == (terminal, task.last_seq)


async def test_unknown_task(store: TaskStore) -> None:
    with pytest.raises(TaskNotFound):
        await store.transition("nope", S.WORKING)
    with pytest.raises(TaskNotFound):
        await store.get_task(None, "nope")
    with pytest.raises(TaskNotFound):
        await store.cancel(OWNER, "nope")
    with pytest.raises(TaskNotFound):
        await store.update_status("nope", user_msg(), lease_owner=WORKER)
    assert await store.events_after("nope", 0) == []
    assert await store.claim("nope", WORKER, lease_seconds=LEASE, max_attempts=3) is None


async def test_cancel(store: TaskStore) -> None:
    for state in (S.SUBMITTED, S.WORKING, S.INPUT_REQUIRED, S.AUTH_REQUIRED):
        task = await drive_to(store, state)
        event = await store.cancel(OWNER, task.id)
        assert event.final and event.payload["status"]["state"] == S.CANCELED.wire
        assert (await store.get_task(OWNER, task.id)).state is S.CANCELED
    with pytest.raises(TaskNotCancelable) as info:
        await store.cancel(OWNER, task.id)
    assert info.value.current is S.CANCELED


# -- leases ---------------------------------------------------------------------


async def test_lease_fencing(store: TaskStore) -> None:
    task = await claimed(store, "w1")
    before = await store.get_task(OWNER, task.id, history_length=None)
    with pytest.raises(LeaseLost):
        await store.transition(task.id, S.COMPLETED, message=agent_msg(task), lease_owner="w2")
    with pytest.raises(LeaseLost):
        await store.update_status(task.id, agent_msg(task), lease_owner="w2")
    with pytest.raises(LeaseLost):
        await store.add_artifact(task.id, {"artifactId": "a", "parts": []}, lease_owner="w2")
    after = await store.get_task(OWNER, task.id, history_length=None)
    assert (after.state, after.version, after.last_seq, after.artifacts, after.history) == (
        before.state,
        before.version,
        before.last_seq,
        [],
        before.history,
    )
    assert await store.events_after(task.id, before.last_seq) == []

    await store.update_status(task.id, agent_msg(task, "busy"), lease_owner="w1")
    await store.add_artifact(task.id, {"artifactId": "a", "parts": []}, lease_owner="w1")
    await store.transition(task.id, S.COMPLETED, message=agent_msg(task), lease_owner="w1")
    done = await store.get_task(OWNER, task.id)
    assert done.state is S.COMPLETED
    assert done.lease_owner is None and done.lease_expires is None


async def test_reclaimed_lease_fences_the_old_owner(store: TaskStore) -> None:
    task = await new_task(store)
    first = await store.claim(task.id, "w1", lease_seconds=-1, max_attempts=5)
    assert first is not None and first.task is not None
    second = await store.claim(task.id, "w2", lease_seconds=LEASE, max_attempts=5)
    assert second is not None and second.task is not None
    assert second.events == []  # already working: the takeover writes no event
    assert second.task.attempts == 2 and second.task.lease_owner == "w2"
    with pytest.raises(LeaseLost):
        await store.update_status(task.id, agent_msg(task), lease_owner="w1")
    with pytest.raises(LeaseLost):
        await store.transition(task.id, S.COMPLETED, lease_owner="w1")
    await store.transition(task.id, S.COMPLETED, lease_owner="w2")


# Targets none of which can follow another: a second success would be a second winner.
RACES = {
    "same": [S.INPUT_REQUIRED] * 16,
    "terminal-mix": [S.COMPLETED, S.FAILED, S.CANCELED, S.REJECTED] * 4,
}


@pytest.mark.parametrize("race", sorted(RACES))
async def test_concurrent_compare_and_set_has_one_winner(store: TaskStore, race: str) -> None:
    task = await drive_to(store, S.WORKING)
    targets = RACES[race]
    assert not any(can_transition(a, b) for a in targets for b in targets)
    results = await asyncio.gather(
        *(
            store.transition(task.id, to, message=agent_msg(task, f"try {i}"))
            for i, to in enumerate(targets)
        ),
        return_exceptions=True,
    )
    winners = [(i, r) for i, r in enumerate(results) if not isinstance(r, BaseException)]
    losers = [r for r in results if isinstance(r, BaseException)]
    assert len(winners) == 1, results
    assert len(losers) == 15
    winner_index, _ = winners[0]
    final = await store.get_task(OWNER, task.id, history_length=None)
    assert final.state is targets[winner_index]
    for loser in losers:
        assert isinstance(loser, InvalidTransition), loser
        assert loser.current is final.state
    events = await store.events_after(task.id, 0)
    assert [e.seq for e in events] == list(range(1, task.last_seq + 2))
    assert final.history[-1]["parts"][0]["text"] == f"try {winner_index}"


# -- submit ---------------------------------------------------------------------


async def test_submit(store: TaskStore) -> None:
    msg = user_msg("hi", contextId="ctx-1")
    sub = await store.submit(owner=OWNER, message=msg, context_id="ctx-1", metadata={"k": [1]})
    assert sub.created and sub.event is not None
    task = sub.task
    assert task.state is S.SUBMITTED and task.context_id == "ctx-1" and task.last_seq == 1
    assert task.history == [{**msg, "taskId": task.id, "contextId": "ctx-1"}]
    assert sub.event.seq == 1 and not sub.event.final
    assert sub.event.payload["taskId"] == task.id
    assert sub.event.payload["status"]["state"] == S.SUBMITTED.wire
    stored = await store.get_task(OWNER, task.id, history_length=None)
    assert stored.metadata == {"k": [1]}
    assert stored.history == task.history
    assert [e.payload for e in await store.events_after(task.id, 0)] == [sub.event.payload]


async def test_submit_without_context_makes_one(store: TaskStore) -> None:
    a = await new_task(store)
    b = await new_task(store)
    assert a.context_id and b.context_id and a.context_id != b.context_id


async def test_submit_is_idempotent_per_owner(store: TaskStore) -> None:
    msg = user_msg("once")
    first = await store.submit(owner=ALICE, message=msg, context_id=None)
    again = await store.submit(owner=ALICE, message=msg, context_id=None)
    assert first.created and not again.created and again.event is None
    assert again.task.id == first.task.id
    other = await store.submit(owner=BOB, message=msg, context_id=None)
    assert other.created and other.task.id != first.task.id
    page = await store.list_tasks(ListQuery(owner=ALICE))
    assert page.total_size == 1


async def test_concurrent_submits_of_one_message_make_one_task(store: TaskStore) -> None:
    msg = user_msg("race")
    subs = await asyncio.gather(
        *(store.submit(owner=OWNER, message=msg, context_id=None) for _ in range(8))
    )
    assert len({s.task.id for s in subs}) == 1
    assert sum(s.created for s in subs) == 1
    assert (await store.list_tasks(ListQuery(owner=OWNER))).total_size == 1


async def test_concurrent_first_messages_of_a_new_context(store: TaskStore) -> None:
    subs = await asyncio.gather(
        *(
            store.submit(owner=OWNER, message=user_msg(f"m{i}"), context_id="fresh-ctx")
            for i in range(8)
        )
    )
    assert all(s.created for s in subs)
    assert {s.task.context_id for s in subs} == {"fresh-ctx"}
    assert len(await store.context_history(OWNER, "fresh-ctx")) == 8


async def test_refused_writes_beside_good_ones(store: TaskStore) -> None:
    """Writes issued together (SQLite runs them in one transaction) that fail, some after
    writing rows, leave nothing of themselves and take nothing from the others."""
    seen = user_msg("seen before")
    first = await store.submit(owner=OWNER, message=seen, context_id=None)
    done = await drive_to(store, S.COMPLETED)
    working = await drive_to(store, S.WORKING)
    clash = stamp(
        text_message("ROLE_AGENT", "clash", messageId=seen["messageId"]),
        working.id,
        working.context_id,
    )
    writes = [
        store.submit(owner=OWNER, message=user_msg(f"fresh {i}"), context_id=None) for i in range(3)
    ]
    writes.insert(1, store.submit(owner=OWNER, message=seen, context_id=None))
    writes.insert(2, store.transition(done.id, S.WORKING))  # refused: terminal
    # Refused after its task row was updated: the agent's messageId is the user's.
    writes.insert(3, store.transition(working.id, S.COMPLETED, message=clash))
    writes.append(store.submit(owner=OWNER, message=user_msg("late"), context_id="ctx-late"))
    results = await asyncio.gather(*writes, return_exceptions=True)

    again = results[1]
    assert isinstance(again, Submitted) and not again.created
    assert again.task.id == first.task.id
    assert isinstance(results[2], InvalidTransition)
    assert isinstance(results[3], InvalidInput)
    fresh = [r for i, r in enumerate(results) if i not in (1, 2, 3)]
    assert all(isinstance(r, Submitted) and r.created for r in fresh)
    for sub in fresh:
        assert isinstance(sub, Submitted)
        stored = await store.get_task(OWNER, sub.task.id)
        assert stored.state is S.SUBMITTED and stored.history == sub.task.history
    after = await store.get_task(OWNER, working.id, history_length=None)
    assert (after.state, after.version, after.history) == (
        S.WORKING,
        working.version,
        working.history,
    )
    assert (await store.get_task(OWNER, done.id)).state is S.COMPLETED
    # The three tasks made before, the four fresh ones; no half-made task of the repeat.
    assert (await store.list_tasks(ListQuery(owner=OWNER))).total_size == 3 + 4


async def test_context_belongs_to_its_owner(store: TaskStore) -> None:
    await store.submit(owner=ALICE, message=user_msg(), context_id="ctx-a")
    with pytest.raises(ContextMismatch):
        await store.submit(owner=BOB, message=user_msg(), context_id="ctx-a")
    assert (await store.list_tasks(ListQuery(owner=BOB))).total_size == 0


async def test_bad_input_is_refused_alike(store: TaskStore) -> None:
    with pytest.raises(InvalidInput):
        await store.submit(owner=OWNER, message=user_msg(messageId="x" * 256), context_id=None)
    with pytest.raises(InvalidInput):
        await store.submit(owner=OWNER, message={"role": "ROLE_USER"}, context_id=None)
    with pytest.raises(InvalidInput):
        await store.submit(owner=OWNER, message=user_msg(), context_id="c" * 65)
    task = await claimed(store)
    with pytest.raises(InvalidInput):
        await store.add_artifact(task.id, {"parts": []}, lease_owner=WORKER)
    # A messageId is stored once per owner, whoever wrote it.
    reused = {**agent_msg(task), "messageId": task.history[0]["messageId"]}
    with pytest.raises(InvalidInput):
        await store.transition(task.id, S.COMPLETED, message=reused, lease_owner=WORKER)
    after = await store.get_task(OWNER, task.id)
    assert after.state is S.WORKING and after.last_seq == task.last_seq
    assert (await store.list_tasks(ListQuery(owner=OWNER))).total_size == 1


# -- reads ----------------------------------------------------------------------


async def test_owner_isolation(store: TaskStore) -> None:
    task = await new_task(store, ALICE)
    with pytest.raises(TaskNotFound):
        await store.get_task(BOB, task.id)
    with pytest.raises(TaskNotFound):
        await store.cancel(BOB, task.id)
    with pytest.raises(TaskNotFound):
        await store.resume(owner=BOB, task_id=task.id, message=user_msg())
    with pytest.raises(TaskNotFound):
        await store.add_feedback(Feedback(task.id, BOB, 5, "mine now"))
    page = await store.list_tasks(ListQuery(owner=BOB))
    assert page.tasks == [] and page.total_size == 0
    assert await store.context_history(BOB, task.context_id) == []
    assert (await store.get_task(ALICE, task.id)).state is S.SUBMITTED
    assert (await store.get_task(None, task.id)).owner == ALICE
    assert (await store.get_task(ALICE, task.id)).state is S.SUBMITTED  # bob's cancel missed


async def test_history_length(store: TaskStore) -> None:
    task = await drive_to(store, S.INPUT_REQUIRED)  # user, agent(working), agent(input-required)
    assert len(task.history) == 3
    full = await store.get_task(OWNER, task.id, history_length=None)
    assert full.history == task.history
    assert (await store.get_task(OWNER, task.id, history_length=0)).history == []
    assert (await store.get_task(OWNER, task.id, history_length=2)).history == task.history[-2:]
    assert (await store.get_task(OWNER, task.id, history_length=9)).history == task.history
    assert (await store.get_task(OWNER, task.id)).history == task.history  # default: all

    listed = await store.list_tasks(ListQuery(owner=OWNER, history_length=1))
    assert listed.tasks[0].history == task.history[-1:]
    assert (await store.list_tasks(ListQuery(owner=OWNER))).tasks[0].history == []
    everything = await store.list_tasks(ListQuery(owner=OWNER, history_length=None))
    assert everything.tasks[0].history == task.history


async def test_list_pagination(store: TaskStore) -> None:
    ids = {(await new_task(store, ALICE, text=f"t{i}")).id for i in range(25)}
    await new_task(store, BOB)
    seen: list[TaskRecord] = []
    token, pages = "", 0
    while True:
        page = await store.list_tasks(ListQuery(owner=ALICE, page_size=10, page_token=token))
        pages += 1
        assert page.total_size == 25
        seen.extend(page.tasks)
        token = page.next_page_token
        if not token:
            break
        assert pages < 5, "pagination does not end"
    assert pages == 3
    assert [len(p) for p in (seen[:10], seen[10:20], seen[20:])] == [10, 10, 5]
    assert [t.id for t in seen] == list(dict.fromkeys(t.id for t in seen))  # no duplicate
    assert {t.id for t in seen} == ids  # no gap
    keys = [(t.status_ts, t.id) for t in seen]
    assert keys == sorted(keys, reverse=True)
    assert all(t.artifacts == [] and t.history == [] for t in seen)


async def test_list_filters(store: TaskStore) -> None:
    in_a = [
        (await store.submit(owner=OWNER, message=user_msg(), context_id="a")).task for _ in range(3)
    ]
    in_b = (await store.submit(owner=OWNER, message=user_msg(), context_id="b")).task
    await store.transition(in_a[0].id, S.WORKING)
    await store.transition(in_b.id, S.WORKING)

    by_ctx = await store.list_tasks(ListQuery(owner=OWNER, context_id="a"))
    assert {t.id for t in by_ctx.tasks} == {t.id for t in in_a} and by_ctx.total_size == 3
    working = await store.list_tasks(ListQuery(owner=OWNER, state=S.WORKING))
    assert {t.id for t in working.tasks} == {in_a[0].id, in_b.id}
    both = await store.list_tasks(ListQuery(owner=OWNER, context_id="a", state=S.WORKING))
    assert [t.id for t in both.tasks] == [in_a[0].id] and both.total_size == 1
    none = await store.list_tasks(ListQuery(owner=OWNER, state=S.COMPLETED))
    assert none.tasks == [] and none.total_size == 0 and none.next_page_token == ""
    newest = max(t.status_ts for t in (await store.list_tasks(ListQuery(owner=OWNER))).tasks)
    assert (await store.list_tasks(ListQuery(owner=OWNER, status_after=newest))).tasks == []


async def test_list_refuses_bad_tokens_and_sizes(store: TaskStore) -> None:
    await new_task(store)
    bad_tokens = [
        "not a token",
        "%%%",
        base64.urlsafe_b64encode(b'"just a string"').decode(),
        base64.urlsafe_b64encode(b'["x", "y"]').decode(),
        base64.urlsafe_b64encode(b"{}").decode(),
    ]
    for token in bad_tokens:
        with pytest.raises(InvalidInput):
            await store.list_tasks(ListQuery(owner=OWNER, page_token=token))
    for size in (0, -1, 101):
        with pytest.raises(InvalidInput):
            await store.list_tasks(ListQuery(owner=OWNER, page_size=size))


async def test_list_includes_artifacts_on_request(store: TaskStore) -> None:
    task = await claimed(store)
    await store.add_artifact(
        task.id, {"artifactId": "a", "parts": [{"text": "x"}]}, lease_owner=WORKER
    )
    plain = await store.list_tasks(ListQuery(owner=OWNER))
    assert plain.tasks[0].artifacts == []
    full = await store.list_tasks(ListQuery(owner=OWNER, include_artifacts=True))
    assert full.tasks[0].artifacts == [{"artifactId": "a", "parts": [{"text": "x"}]}]


# -- claim, renew, runnable, release ------------------------------------------------


async def test_claim(store: TaskStore) -> None:
    task = await new_task(store)
    claim = await store.claim(task.id, "w1", lease_seconds=LEASE, max_attempts=3)
    assert isinstance(claim, Claim) and claim.task is not None
    assert claim.task.state is S.WORKING and claim.task.lease_owner == "w1"
    assert claim.task.attempts == 1 and claim.task.history == task.history
    assert claim.task.lease_expires is not None and claim.task.lease_expires > task.created_at
    assert [(e.seq, e.payload["status"]["state"]) for e in claim.events] == [(2, S.WORKING.wire)]
    assert await store.claim(task.id, "w1", lease_seconds=LEASE, max_attempts=3) is None
    assert await store.claim(task.id, "w2", lease_seconds=LEASE, max_attempts=3) is None
    assert (await store.get_task(OWNER, task.id)).attempts == 1


@pytest.mark.parametrize("context", [None, "ctx-started"])
async def test_submit_that_starts_the_task(store: TaskStore, context: str | None) -> None:
    msg = user_msg("go", **({"contextId": context} if context else {}))
    sub = await store.submit(owner=OWNER, message=msg, context_id=context, start=Start("w1", LEASE))
    assert sub.created and sub.event is not None and sub.started is not None
    task, started = sub.task, sub.started.task
    # As if claimed at once: working, leased, first attempt, both events in the log.
    assert started is not None and started == task
    assert task.state is S.WORKING and task.lease_owner == "w1" and task.attempts == 1
    assert task.lease_expires is not None and task.lease_expires > task.created_at
    assert task.last_seq == 2 and task.history == [
        {**msg, "taskId": task.id, "contextId": task.context_id}
    ]
    assert [(e.seq, e.payload["status"]["state"]) for e in [sub.event, *sub.started.events]] == [
        (1, S.SUBMITTED.wire),
        (2, S.WORKING.wire),
    ]
    logged = await store.events_after(task.id, 0)
    assert logged == [sub.event, *sub.started.events]
    assert await store.get_task(OWNER, task.id, history_length=None) == task
    # Leased like any claim: nobody else takes it, the queue's outbox leaves it alone...
    assert await store.claim(task.id, "w2", lease_seconds=LEASE, max_attempts=3) is None
    assert task.id not in await store.runnable()
    done = await store.transition(task.id, S.COMPLETED, message=agent_msg(task), lease_owner="w1")
    assert done.seq == 3 and done.final
    # ...and a repeat of its messageId returns it, starting nothing.
    again = await store.submit(
        owner=OWNER, message=msg, context_id=context, start=Start("w1", LEASE)
    )
    assert not again.created and again.started is None and again.task.id == task.id


async def test_a_started_task_whose_worker_died_is_claimed_again(store: TaskStore) -> None:
    sub = await store.submit(
        owner=OWNER, message=user_msg(), context_id=None, start=Start("w1", -1)
    )
    assert sub.task.id in await store.runnable()
    claim = await store.claim(sub.task.id, "w2", lease_seconds=LEASE, max_attempts=3)
    assert claim is not None and claim.task is not None and claim.events == []
    assert claim.task.attempts == 2 and claim.task.lease_owner == "w2"


async def test_concurrent_claims_have_one_winner(store: TaskStore) -> None:
    task = await new_task(store)
    claims = await asyncio.gather(
        *(store.claim(task.id, f"w{i}", lease_seconds=LEASE, max_attempts=3) for i in range(8))
    )
    won = [c for c in claims if c is not None]
    assert len(won) == 1 and won[0].task is not None
    assert (await store.get_task(OWNER, task.id)).lease_owner == won[0].task.lease_owner


async def test_claim_gives_up_after_max_attempts(store: TaskStore) -> None:
    task = await new_task(store)
    for attempt in (1, 2):
        claim = await store.claim(task.id, f"w{attempt}", lease_seconds=-1, max_attempts=2)
        assert claim is not None and claim.task is not None
        assert claim.task.attempts == attempt
    gave_up = await store.claim(task.id, "w3", lease_seconds=LEASE, max_attempts=2)
    assert gave_up is not None and gave_up.task is None
    [event] = gave_up.events
    assert event.final and event.payload["status"]["state"] == S.FAILED.wire
    reason = event.payload["status"]["message"]["parts"][0]["text"]
    assert "2 attempts" in reason
    failed = await store.get_task(OWNER, task.id)
    assert failed.state is S.FAILED and failed.lease_owner is None
    assert failed.status_message is not None
    assert failed.status_message["taskId"] == task.id
    assert failed.history[-1] == failed.status_message
    assert task.id not in await store.runnable()


async def test_claim_of_submitted_or_interrupted(store: TaskStore) -> None:
    waiting = await drive_to(store, S.INPUT_REQUIRED)
    assert await store.claim(waiting.id, WORKER, lease_seconds=LEASE, max_attempts=3) is None


async def test_renew(store: TaskStore) -> None:
    task = await claimed(store, "w1")
    other = await claimed(store, "w2")
    before = task.lease_expires
    assert before is not None
    held = await store.renew("w1", [task.id, other.id, "nope"], lease_seconds=LEASE * 10)
    assert held == {task.id}
    after = await store.get_task(OWNER, task.id)
    assert after.lease_expires is not None and after.lease_expires > before
    assert (await store.get_task(OWNER, other.id)).lease_expires == other.lease_expires
    assert await store.renew("w1", [], lease_seconds=LEASE) == set()
    await store.transition(task.id, S.COMPLETED, lease_owner="w1")
    assert await store.renew("w1", [task.id], lease_seconds=LEASE) == set()


async def test_runnable(store: TaskStore) -> None:
    queued = [await new_task(store, text=f"q{i}") for i in range(3)]
    leased = await claimed(store)
    expired = await new_task(store)
    await store.claim(expired.id, WORKER, lease_seconds=-1, max_attempts=3)
    await drive_to(store, S.INPUT_REQUIRED)
    await drive_to(store, S.COMPLETED)
    ready = await store.runnable()
    assert ready == [t.id for t in queued] + [expired.id]  # oldest first
    assert leased.id not in ready
    assert await store.runnable(limit=2) == [queued[0].id, queued[1].id]


async def test_release_leases(store: TaskStore) -> None:
    a1, a2 = await claimed(store, "w1"), await claimed(store, "w1")
    b = await claimed(store, "w2")
    assert await store.runnable() == []
    assert await store.release_leases("w1") == 2
    assert set(await store.runnable()) == {a1.id, a2.id}
    assert (await store.get_task(OWNER, a1.id)).lease_owner is None
    assert (await store.get_task(OWNER, b.id)).lease_owner == "w2"
    assert await store.release_leases() == 1
    assert set(await store.runnable()) == {a1.id, a2.id, b.id}
    assert await store.release_leases() == 0
    again = await store.claim(a1.id, "w3", lease_seconds=LEASE, max_attempts=3)
    assert again is not None and again.task is not None and again.events == []


# -- events and artifacts ---------------------------------------------------------


async def test_events_are_gap_free(store: TaskStore) -> None:
    task = await claimed(store)
    for i in range(5):
        await store.update_status(task.id, agent_msg(task, f"step {i}"), lease_owner=WORKER)
        await store.add_artifact(
            task.id, {"artifactId": f"a{i}", "parts": [{"text": str(i)}]}, lease_owner=WORKER
        )
    await store.transition(task.id, S.COMPLETED, message=agent_msg(task), lease_owner=WORKER)
    events = await store.events_after(task.id, 0)
    n = (await store.get_task(OWNER, task.id)).last_seq
    assert n == 13
    assert [e.seq for e in events] == list(range(1, n + 1))
    assert [e.kind for e in events] == ["status", "status", *["status", "artifact"] * 5, "status"]
    assert [e.final for e in events] == [False] * (n - 1) + [True]
    assert all(e.task_id == task.id and e.payload["taskId"] == task.id for e in events)
    assert [e.seq for e in await store.events_after(task.id, 7)] == list(range(8, n + 1))
    assert await store.events_after(task.id, n) == []
    status = events[2].payload["status"]
    assert status["state"] == S.WORKING.wire and status["message"]["parts"][0]["text"] == "step 0"


@pytest.mark.parametrize("outcome", [S.COMPLETED, S.INPUT_REQUIRED, S.FAILED])
async def test_a_final_transition_carries_the_task_it_left(
    store: TaskStore, outcome: TaskState
) -> None:
    task = await claimed(store)
    await store.add_artifact(
        task.id, {"artifactId": "a", "parts": [{"text": "x"}]}, lease_owner=WORKER
    )
    step = await store.update_status(task.id, agent_msg(task, "thinking"), lease_owner=WORKER)
    assert step.task is None  # not final: nothing to answer with yet
    final = await store.transition(
        task.id, outcome, message=agent_msg(task, "done"), lease_owner=WORKER
    )
    read = await store.get_task(OWNER, task.id)
    # Exactly what a read after it returns: the answer joins the history, the lease is gone.
    assert final.task == read
    assert final.task is not None and final.task.last_seq == final.seq
    assert [m["parts"][0]["text"] for m in final.task.history] == ["hello", "done"]
    assert final.task.lease_owner is None and final.task.state == outcome
    if outcome.interrupted:
        # The next turn's outcome, without a message: the task as it then stands.
        await store.resume(owner=OWNER, task_id=task.id, message=user_msg("more"))
        claim = await store.claim(task.id, WORKER, lease_seconds=LEASE, max_attempts=3)
        assert claim is not None and claim.task is not None
        bare = await store.transition(task.id, S.COMPLETED, lease_owner=WORKER)
        assert bare.task == await store.get_task(OWNER, task.id)
        assert len(bare.task.history) == 3


async def test_artifact_chunks_merge(store: TaskStore) -> None:
    task = await claimed(store)

    def chunk(artifact_id: str, text: str, **extra: object) -> dict[str, object]:
        return {"artifactId": artifact_id, "parts": [{"text": text}], **extra}

    first = await store.add_artifact(
        task.id, chunk("story", "Once", name="story"), lease_owner=WORKER
    )
    await store.add_artifact(task.id, chunk("other", "x"), lease_owner=WORKER)
    await store.add_artifact(task.id, chunk("story", " upon"), lease_owner=WORKER, append=True)
    last = await store.add_artifact(
        task.id, chunk("story", " a time"), lease_owner=WORKER, append=True, last_chunk=True
    )
    assert "append" not in first.payload and "lastChunk" not in first.payload
    assert last.payload["append"] is True and last.payload["lastChunk"] is True
    assert last.payload["artifact"] == chunk("story", " a time")
    stored = (await store.get_task(OWNER, task.id)).artifacts
    assert [a["artifactId"] for a in stored] == ["story", "other"]
    assert stored[0]["name"] == "story"
    assert [p["text"] for p in stored[0]["parts"]] == ["Once", " upon", " a time"]
    # Without append a chunk with a known id replaces the artifact, in place.
    await store.add_artifact(task.id, chunk("story", "The end"), lease_owner=WORKER)
    stored = (await store.get_task(OWNER, task.id)).artifacts
    assert [a["artifactId"] for a in stored] == ["story", "other"]
    assert stored[0] == chunk("story", "The end")


# -- feedback, context, resume ------------------------------------------------------


async def test_feedback(store: TaskStore) -> None:
    task = await drive_to(store, S.COMPLETED)
    fb = Feedback(task.id, OWNER, 4, "good", {"tags": ["fast"]})
    await store.add_feedback(fb)
    assert await stored_feedback(store) == [fb]
    with pytest.raises(TaskNotFound):
        await store.add_feedback(Feedback("nope", OWNER, 5, "?"))
    for rating in (0, 6):
        with pytest.raises(InvalidInput):
            await store.add_feedback(Feedback(task.id, OWNER, rating, "out of range"))
    assert await stored_feedback(store) == [fb]


async def test_context_history_spans_tasks_in_order(store: TaskStore) -> None:
    ctx = "conversation"
    first = (await store.submit(owner=OWNER, message=user_msg("q1"), context_id=ctx)).task
    await store.transition(first.id, S.WORKING)
    await store.transition(first.id, S.INPUT_REQUIRED, message=agent_msg(first, "which?"))
    second = (await store.submit(owner=OWNER, message=user_msg("q2"), context_id=ctx)).task
    await store.resume(owner=OWNER, task_id=first.id, message=user_msg("this one"))
    await new_task(store, text="elsewhere")
    history = await store.context_history(OWNER, ctx)
    assert [m["parts"][0]["text"] for m in history] == ["q1", "which?", "q2", "this one"]
    assert [m["taskId"] for m in history] == [first.id, first.id, second.id, first.id]
    assert all(m["contextId"] == ctx for m in history)
    assert await store.context_history(OWNER, "unknown") == []


@pytest.mark.parametrize("interrupted", [S.INPUT_REQUIRED, S.AUTH_REQUIRED], ids=str)
async def test_resume_interrupted(store: TaskStore, interrupted: TaskState) -> None:
    task = await new_task(store)
    claim = await store.claim(task.id, WORKER, lease_seconds=LEASE, max_attempts=1)
    assert claim is not None
    await store.transition(
        task.id, interrupted, message=agent_msg(task, "more?"), lease_owner=WORKER
    )
    waiting = await store.get_task(OWNER, task.id)
    assert waiting.lease_owner is None and waiting.attempts == 1

    reply = user_msg("here")
    sub = await store.resume(owner=OWNER, task_id=task.id, message=reply)
    assert sub.created and sub.event is not None
    assert sub.event.seq == waiting.last_seq + 1 and not sub.event.final
    assert sub.event.payload["status"]["state"] == S.SUBMITTED.wire
    assert sub.task.state is S.SUBMITTED and sub.task.attempts == 0
    assert sub.task.history[-1] == {**reply, "taskId": task.id, "contextId": task.context_id}
    assert task.id in await store.runnable()
    # The attempt budget is per turn: the next claim runs instead of giving up.
    claim = await store.claim(task.id, WORKER, lease_seconds=LEASE, max_attempts=1)
    assert claim is not None and claim.task is not None

    again = await store.resume(owner=OWNER, task_id=task.id, message=reply)
    assert not again.created and again.event is None and again.task.id == task.id


async def test_resume_refused_when_terminal_or_active(store: TaskStore) -> None:
    for state in (S.SUBMITTED, S.WORKING):
        task = await drive_to(store, state)
        with pytest.raises(UnsupportedOperation):
            await store.resume(owner=OWNER, task_id=task.id, message=user_msg())
        assert (await store.get_task(OWNER, task.id)).last_seq == task.last_seq
    for state in sorted(TERMINAL):
        task = await drive_to(store, state)
        with pytest.raises(TaskTerminal) as info:
            await store.resume(owner=OWNER, task_id=task.id, message=user_msg())
        assert info.value.current is state
    with pytest.raises(TaskNotFound):
        await store.resume(owner=OWNER, task_id="nope", message=user_msg())


async def test_concurrent_resumes_have_one_winner(store: TaskStore) -> None:
    task = await drive_to(store, S.INPUT_REQUIRED)
    results = await asyncio.gather(
        *(store.resume(owner=OWNER, task_id=task.id, message=user_msg(f"r{i}")) for i in range(8)),
        return_exceptions=True,
    )
    won = [r for r in results if not isinstance(r, BaseException)]
    lost = [r for r in results if isinstance(r, BaseException)]
    assert len(won) == 1 and won[0].created
    assert all(isinstance(e, UnsupportedOperation) for e in lost), lost


async def test_records_are_snapshots(store: TaskStore) -> None:
    """Nothing a caller passes in or gets back aliases stored state (as with a database)."""
    msg, meta = user_msg("original"), {"tags": ["a"]}
    task = (await store.submit(owner=OWNER, message=msg, context_id=None, metadata=meta)).task
    msg["parts"].append({"text": "mutated"})
    meta["tags"].append("mutated")
    claim = await store.claim(task.id, WORKER, lease_seconds=LEASE, max_attempts=3)
    assert claim is not None
    artifact: JSON = {"artifactId": "a", "parts": [{"text": "1"}]}
    await store.add_artifact(task.id, artifact, lease_owner=WORKER)
    artifact["parts"].append({"text": "mutated"})
    status = agent_msg(task, "busy")
    await store.update_status(task.id, status, lease_owner=WORKER)
    status["parts"].append({"text": "mutated"})

    got = await store.get_task(OWNER, task.id)
    got.artifacts[0]["parts"].append({"text": "mutated"})
    got.history[0]["parts"].append({"text": "mutated"})
    assert got.metadata is not None and got.status_message is not None
    got.metadata["tags"].append("mutated")
    got.status_message["parts"].append({"text": "mutated"})
    got.history.clear()

    again = await store.get_task(OWNER, task.id)
    assert again.artifacts == [{"artifactId": "a", "parts": [{"text": "1"}]}]
    assert [m["parts"] for m in again.history] == [[{"text": "original"}]]
    assert again.metadata == {"tags": ["a"]}
    assert again.status_message is not None
    assert again.status_message["parts"] == [{"text": "busy"}]


def test_every_pair_is_covered() -> None:
    pairs = set(itertools.product(TaskState, TaskState))
    assert len(pairs) == len(TaskState) ** 2 == 64
    allowed = {(f, t) for f, t in pairs if can_transition(f, t)}
    assert allowed == {(f, t) for t, sources in TRANSITIONS.items() for f in sources}
