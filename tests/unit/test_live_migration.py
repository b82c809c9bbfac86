"""The live move's state machine (`cluster.live_migration.advance`): every
path Llumnix's coordinator has, and nothing else."""

from __future__ import annotations

import pytest

from cluster.live_migration import OUTCOMES, InvalidMove, LiveMoveEvent, LiveMoveState, advance
from cluster.migration import MigrationOutcome

S, E = LiveMoveState, LiveMoveEvent


def _walk(*events: LiveMoveEvent) -> LiveMoveState:
    state = S.STAGING
    for event in events:
        state = advance(state, event)
    return state


@pytest.mark.parametrize(
    ("events", "final", "outcome"),
    [
        ((E.STAGED, E.STAGED, E.STOP, E.STOPPED, E.COMMITTED, E.HANDED_OVER), S.MOVED, "committed"),
        ((E.REFUSED,), S.REFUSED, "refused"),
        # the turn ended (or its source failed) while its blocks were copied
        ((E.STAGED, E.SOURCE_FAILED), S.ABORTED_SOURCE, "aborted_source"),
        ((E.STAGED, E.STOP, E.SOURCE_FAILED), S.ABORTED_SOURCE, "aborted_source"),
        # its client left while it was stopped: nothing to hand it over to
        ((E.STOP, E.STOPPED, E.COMMITTED, E.SOURCE_FAILED), S.ABORTED_SOURCE, "aborted_source"),
        # the destination failed before the stop: the turn never stopped
        ((E.STAGED, E.DESTINATION_FAILED), S.ABORTED_DESTINATION, "aborted_destination"),
        # ... or after it: the source takes the turn back
        ((E.STOP, E.STOPPED, E.DESTINATION_FAILED), S.TAKEN_BACK, "aborted_destination"),
    ],
)
def test_each_path_ends_in_its_state_and_outcome(events, final, outcome) -> None:
    state = _walk(*events)
    assert state is final and OUTCOMES[state] is MigrationOutcome(outcome)


@pytest.mark.parametrize(
    ("events", "event"),
    [
        ((), E.STOPPED),  # nothing stops before the stop
        ((E.STOP,), E.REFUSED),  # a refusal comes before the stop
        ((E.STOP,), E.DESTINATION_FAILED),  # the stop's own failure is the source's
        ((E.STOP, E.STOPPED, E.COMMITTED, E.HANDED_OVER), E.STAGED),  # moved is final
        ((E.STAGED, E.DESTINATION_FAILED), E.STOP),
    ],
)
def test_an_event_that_cannot_follow_is_a_bug(events, event) -> None:
    with pytest.raises(InvalidMove, match=f"cannot take {event.value}"):
        advance(_walk(*events), event)


def test_every_final_state_has_an_outcome() -> None:
    moving = {S.STAGING, S.STOPPING, S.COMMITTING, S.HANDING_OVER}
    assert set(OUTCOMES) == set(S) - moving
