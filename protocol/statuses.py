"""Which service status a reader believes: pure logic, no I/O ([T-STATUS-2]).

A status names the coordinator session that published it and a sequence number that counts
up with every status that coordinator publishes. A reader takes a status only from the
coordinator's current session (its retained `coordinator/state`), and within a session only
one with a higher seq than the one it holds: a status a stranger wrote under another
session, or a stale one a bridge replays after a reconnect, is not believed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mqinfer.protocol import messages as m

KEPT_SESSIONS = 4  # sessions whose newest status is kept until one of them is current


@dataclass
class Statuses:
    """What a reader holds for one service."""

    by_session: dict[int, m.ServiceStatus] = field(default_factory=dict)
    current: int | None = None  # the coordinator's session, as its state says

    @property
    def status(self) -> m.ServiceStatus | None:
        """The status to believe: the newest of the coordinator's current session."""
        return self.by_session.get(self.current) if self.current is not None else None

    def take(self, status: m.ServiceStatus | None) -> bool:
        """Keep a status (None: the retained status was cleared); False when it is older
        than the one already kept for its session."""
        if status is None:
            self.by_session.clear()
            return True
        session = status.session or 0
        kept = self.by_session.get(session)
        if kept is not None and (status.seq or 0) < (kept.seq or 0):
            return False
        self.by_session[session] = status
        while len(self.by_session) > KEPT_SESSIONS:
            del self.by_session[min(self.by_session)]
        return True
