"""Which class is on in this room now, its roster and its matcher.

Asks the :class:`~appliance.recognition.RosterProvider` at most once a second (the schedule
decides the class by the device's own clock), refuses a roster made by another embedder (the
pipeline then treats it as empty and says why), and on a class switch reads back the students
already recorded today for the new class (after a restart). Used by
:class:`appliance.pipeline.Pipeline`, one job split out of it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from appliance.recognition import (
    Matcher,
    Roster,
    RosterEmbedderError,
    RosterProvider,
    check_embedder,
)
from appliance.status import PresentEntry

if TYPE_CHECKING:
    from appliance.config import RecognitionConfig
    from appliance.store import Store
    from appliance.vision.embedding import EmbedderSpec

_LOGGER = logging.getLogger(__name__)

PROVIDER_PERIOD_S = 1.0


@dataclass(frozen=True)
class ClassChange:
    """What a refresh changed: a new roster, and when the class switched, who is present."""

    switched: bool
    previous_course: str | None
    present: dict[str, PresentEntry]


class ClassRoster:
    """The current class, its roster (``roster``: empty when refused), names and matcher."""

    def __init__(self, provider: RosterProvider, store: Store, rcfg: RecognitionConfig,
                 embedder_spec: EmbedderSpec) -> None:
        self.provider = provider
        self.store = store
        self.rcfg = rcfg
        self.embedder_spec = embedder_spec
        self.course: tuple[str | None, str | None] = (None, None)
        self.roster: Roster | None = None
        self.offered: Roster | None = None  # the provider's (roster: empty if refused)
        self.matcher: Matcher | None = None
        self.names: dict[str, str] = {}
        self.error: str | None = None  # why the roster was refused
        self._checked = -1e9

    @property
    def size(self) -> int:
        return 0 if self.roster is None else len(self.roster.student_ids)

    def refresh(self, now: datetime) -> ClassChange | None:
        """Ask the provider (at most every PROVIDER_PERIOD_S); None when nothing changed."""
        mono = time.monotonic()
        if self.matcher is not None and mono - self._checked < PROVIDER_PERIOD_S:
            return None
        self._checked = mono
        try:
            course_id, course_name, roster = self.provider.current(now)
        except Exception:  # a provider bug must not stop recognition; keep the last roster
            _LOGGER.exception("roster provider failed")
            if self.matcher is not None:
                return None
            course_id, course_name, roster = None, None, Roster.empty()
        if roster is self.offered and (course_id, course_name) == self.course:
            return None
        offered = roster
        try:
            if len(roster.student_ids):
                check_embedder(roster.embedder, self.embedder_spec.id,
                               f"the roster of {course_id or 'the roster file'}")
            self.error = None
        except RosterEmbedderError as err:
            if self.error != str(err):
                _LOGGER.error("%s", err)
            self.error = str(err)
            roster = Roster.empty()
        names = dict(zip(roster.student_ids, roster.names, strict=False))
        matcher = Matcher(roster, self.rcfg.match_threshold(), self.rcfg.match_margin(),
                          metric=self.embedder_spec.metric)
        previous = self.course[0]
        switched = course_id != previous
        present = self._present_today(course_id, now, names) if switched else {}
        if switched and self.matcher is not None:
            _LOGGER.info("class switched: %s -> %s", previous, course_id)
        self.course = (course_id, course_name)
        self.roster, self.names, self.matcher, self.offered = roster, names, matcher, offered
        return ClassChange(switched, previous, present)

    def _present_today(self, course_id: str | None, now: datetime,
                       names: dict[str, str]) -> dict[str, PresentEntry]:
        """Students already recorded today for this class (after a restart)."""
        if course_id is None:
            return {}
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        present: dict[str, PresentEntry] = {}
        for rec in self.store.records_since(day):
            if rec.course_id == course_id and rec.student_id not in present:
                present[rec.student_id] = PresentEntry(
                    rec.student_id, names.get(rec.student_id, rec.student_id),
                    rec.seen_at, rec.confidence)
        return present
