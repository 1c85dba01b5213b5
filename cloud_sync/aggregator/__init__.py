"""The central aggregator: rosters and schedules down, attendance and heartbeats up."""
