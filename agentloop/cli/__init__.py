"""The ``agentloop`` command: run an experiment, evaluate a policy, export and import a replay store, check the data,
watch a run.

    agentloop run eto [--config FILE] [--resume DIR] [key=value ...]   experiments/eto.py, as if run directly
    agentloop fork RUN NEW --at eval/sft                               a copy of RUN to go on from one of its stages
    agentloop eval RUN/adapters/sft --against base --env db            k/n, 95% Wilson interval, paired McNemar test
    agentloop export --store RUN out.jsonl [--pairs] [--stage eval/sft] trajectories or pairs to ETO / chat / Parquet
    agentloop import demos.json --store RUN --stage imported --env db  a file into a store, as one completed stage
    agentloop data                                                     which env splits the data directory holds
    agentloop dashboard --store RUN [--host 127.0.0.1] [--port 8765]  a live, read-only web view of a run

Built on click (typer is click plus type-hint declarations and rich's help; ``run`` hands its arguments
unparsed to the experiment, which click does directly, and click alone imports in a fraction of the time).
Only click and the standard library load with a command's module: every command imports what its work
needs when it runs, so ``--help`` answers without torch, ray, transformers, datasets or vllm.
"""

from __future__ import annotations

import click

from agentloop import __version__
from agentloop.cli.dashboard import dashboard
from agentloop.cli.data import data
from agentloop.cli.evaluation import evaluate
from agentloop.cli.experiments import fork, run
from agentloop.cli.files import export, import_

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="agentloop")
def cli() -> None:
    """Exploration-based training of LLM agents (ETO, STE): run experiments, evaluate policies, move data.

    Run `agentloop COMMAND --help` for a command's options.
    """


for command in (run, fork, evaluate, export, import_, data, dashboard):
    cli.add_command(command)


def main() -> None:
    """The console script ``agentloop`` (and ``python -m agentloop``)."""
    cli(prog_name="agentloop")
