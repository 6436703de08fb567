"""The life of a resumable stream transfer as one state machine (sans-IO).

The driver (``Link``'s resumable send and receive) performs the I/O -- sending, the
re-punch, the control messages -- and tells the machine what happened; the machine
keeps the state, the link generation (epoch), the attempts and the interruption being
handled, and refuses an event its state does not allow with :class:`IllegalTransition`.
An exception the driver lets out ends the transfer wherever the machine stands.

::

    TRANSFERRING --halt--> HALTED            (the first reason the link stops wins)
    TRANSFERRING / HALTED --finish--> DONE   (the destination's verdict / END verified)
    TRANSFERRING / HALTED --lose--> LOST     (the link is gone: an interruption)
    LOST --attempt--> REPUNCHING             (while attempts remain)
    LOST --give_up--> FAILED                 (attempts used up, or the peer gave up)
    REPUNCHING --no_path--> LOST             (that re-punch found no path)
    REPUNCHING --resumed--> TRANSFERRING     (a new link, the stream goes on)
    any but DONE / FAILED --fail--> FAILED   (an error resume does not cover)
"""

from __future__ import annotations

import enum
from typing import Literal

from holepunch_mig.errors import IllegalTransition, ProtocolError
from holepunch_mig.report import Interruption

DetectedBy = Literal["local", "peer"]


class ResumeState(enum.Enum):
    TRANSFERRING = "transferring"
    """The current link carries the stream."""
    HALTED = "halted"
    """The current link is being stopped (the reason is kept); the epoch ends next."""
    LOST = "lost"
    """The link is gone; the next re-punch has not started."""
    REPUNCHING = "repunching"
    """A re-punch for the next link generation is under way."""
    DONE = "done"
    FAILED = "failed"


class ResumeEvent(enum.Enum):
    HALT = "halt"
    FINISH = "finish"
    LOSE = "lose"
    ATTEMPT = "attempt"
    GIVE_UP = "give_up"
    NO_PATH = "no_path"
    RESUMED = "resumed"
    FAIL = "fail"


S, E = ResumeState, ResumeEvent

#: (state, event) -> next state; every pair not listed is an illegal transition
TRANSITIONS: dict[tuple[ResumeState, ResumeEvent], ResumeState] = {
    (S.TRANSFERRING, E.HALT): S.HALTED,
    (S.HALTED, E.HALT): S.HALTED,  # later reasons are ignored
    (S.TRANSFERRING, E.FINISH): S.DONE,
    (S.HALTED, E.FINISH): S.DONE,
    (S.TRANSFERRING, E.LOSE): S.LOST,
    (S.HALTED, E.LOSE): S.LOST,
    (S.LOST, E.ATTEMPT): S.REPUNCHING,
    (S.LOST, E.GIVE_UP): S.FAILED,
    (S.REPUNCHING, E.NO_PATH): S.LOST,
    (S.REPUNCHING, E.RESUMED): S.TRANSFERRING,
    (S.TRANSFERRING, E.FAIL): S.FAILED,
    (S.HALTED, E.FAIL): S.FAILED,
    (S.LOST, E.FAIL): S.FAILED,
    (S.REPUNCHING, E.FAIL): S.FAILED,
}  # fmt: skip


class ResumeMachine:
    """One resumable transfer, from the first link to DONE or FAILED."""

    def __init__(
        self, resume_attempts: int, interruptions: list[Interruption], epoch: int = 0
    ) -> None:
        self.resume_attempts = resume_attempts
        self.interruptions = interruptions
        """The report's list; every loss is appended to it."""
        self.state = ResumeState.TRANSFERRING
        self.epoch = epoch
        """Generation of the current link: 0 for the first, +1 per resume negotiation."""
        self.attempts = 0
        """Re-negotiations so far, over all interruptions."""
        self.seen = ""
        """Why the current link stopped, in words (empty while it runs)."""
        self.detected_by: DetectedBy = "local"
        self.last = ""
        """The latest reason resume has not recovered from (the loss, or a failed re-punch)."""
        self.cut: Interruption | None = None
        """The interruption being handled (None before the first loss)."""

    def _move(self, event: ResumeEvent) -> ResumeState:
        try:
            after = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise IllegalTransition(self.state, event) from None
        before, self.state = self.state, after
        return before

    @property
    def halted(self) -> bool:
        return self.state is ResumeState.HALTED

    def halt(self, seen: str, by: DetectedBy) -> bool:
        """The current link must stop; True for the first reason (kept), False after."""
        first = self._move(ResumeEvent.HALT) is ResumeState.TRANSFERRING
        if first:
            self.seen, self.detected_by = seen, by
        return first

    def finish(self) -> None:
        """The transfer's outcome arrived over the current link."""
        self._move(ResumeEvent.FINISH)

    def lose(self, *, at: float, acked: int, sent: int) -> Interruption:
        """The current link is gone: the interruption to report (``halt`` gave its
        reason; a link that stopped without one reports an empty ``seen``)."""
        self._move(ResumeEvent.LOSE)
        self.cut = Interruption(
            at=at,
            epoch=self.epoch,
            detected_by=self.detected_by,
            seen=self.seen[:500],
            acked=acked,
            sent=sent,
        )
        self.interruptions.append(self.cut)
        self.last = self.seen
        return self.cut

    @property
    def exhausted(self) -> bool:
        return self.attempts >= self.resume_attempts

    def attempt(self, epoch: int | None = None) -> int:
        """Start the next re-punch: the source numbers it (``epoch`` None: the next one),
        the destination takes the epoch of the resume-offer it got, which must be newer.
        Returns the new link's epoch; the attempt counts even when the epoch is refused."""
        self._move(ResumeEvent.ATTEMPT)
        self.attempts += 1
        assert self.cut is not None  # LOST is only reached through lose()
        self.cut.attempts += 1
        if epoch is not None and epoch <= self.epoch:
            raise ProtocolError(f"resume-offer for link {epoch}, this side is at {self.epoch}")
        self.epoch = self.epoch + 1 if epoch is None else epoch
        return self.epoch

    def no_path(self, why: str) -> None:
        """That re-punch found no path; the next attempt (or give_up) follows."""
        self._move(ResumeEvent.NO_PATH)
        self.last = why

    def resumed(self, *, kept: int, seconds: float, link: str) -> None:
        """The new link is up and the stream goes on from byte ``kept``."""
        self._move(ResumeEvent.RESUMED)
        assert self.cut is not None
        self.cut.resumed_from = kept
        self.cut.resume_seconds = seconds
        self.cut.link = link
        self.cut.outcome = "resumed"
        self.seen, self.detected_by = "", "local"

    def give_up(self) -> str:
        """No attempts left: FAILED; returns the reason for ResumeFailed and the report."""
        self._move(ResumeEvent.GIVE_UP)
        self._mark_failed()
        n = len(self.interruptions)
        return (
            f"link lost {n} time{'s' if n != 1 else ''}; resume attempts exhausted "
            f"({self.attempts} of resume_attempts={self.resume_attempts} used); "
            f"last: {self.last}"
        )

    def fail(self) -> None:
        """An error resume does not cover ends the transfer."""
        self._move(ResumeEvent.FAIL)
        self._mark_failed()

    def _mark_failed(self) -> None:
        if self.cut is not None:
            self.cut.outcome = "failed"
