"""Device side of sync: outbox drain, schedule/roster pull, heartbeat (HTTP or MQTT).

``appliance.runtime`` starts a :class:`SyncAgent` when ``sync.aggregator_url`` or
``sync.mqtt_url`` is set and gives the pipeline its ``roster_provider``.
"""

from appliance.sync.agent import DrainStats, SyncAgent, SyncStatus
from appliance.sync.roster import ScheduleRosterProvider, pick_session

__all__ = ["DrainStats", "ScheduleRosterProvider", "SyncAgent", "SyncStatus", "pick_session"]
