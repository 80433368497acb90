"""The replay store: trajectories, preference pairs and completed loop stages, in SQL."""

from agentloop.replay.store import (
    GROUP_COLUMNS,
    GroupMetrics,
    ReplayStore,
    SchemaVersionError,
    TrajectoryFilter,
)

__all__ = [
    "GROUP_COLUMNS",
    "GroupMetrics",
    "ReplayStore",
    "SchemaVersionError",
    "TrajectoryFilter",
]
