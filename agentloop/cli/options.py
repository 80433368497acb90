"""Options more than one command takes."""

from __future__ import annotations

from pathlib import Path

import click

data_dir_option = click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    envvar="AGENTLOOP_DATA_DIR",
    default="data",
    show_default=True,
    help="The task data directory [env: AGENTLOOP_DATA_DIR].",
)
"""``--data-dir``: the task data directory, as the experiments' ``data_dir`` reads it (``AGENTLOOP_DATA_DIR``,
else ``data``)."""
