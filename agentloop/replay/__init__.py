"""The replay store: trajectories, preference pairs and completed loop stages, in SQL."""

from agentloop.replay.export import (
    FORMATS,
    Format,
    FormatError,
    PairFilter,
    export_pairs,
    export_trajectories,
    import_pairs,
    import_trajectories,
    read_pairs,
    read_trajectories,
    write_pairs,
    write_trajectories,
)
from agentloop.replay.store import (
    GROUP_COLUMNS,
    STORE_FILE,
    GroupMetrics,
    ReplayStore,
    SchemaVersionError,
    TrajectoryFilter,
)

__all__ = [
    "FORMATS",
    "Format",
    "FormatError",
    "GROUP_COLUMNS",
    "GroupMetrics",
    "PairFilter",
    "ReplayStore",
    "STORE_FILE",
    "SchemaVersionError",
    "TrajectoryFilter",
    "export_pairs",
    "export_trajectories",
    "import_pairs",
    "import_trajectories",
    "read_pairs",
    "read_trajectories",
    "write_pairs",
    "write_trajectories",
]
