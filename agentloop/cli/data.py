"""``agentloop data``: which splits of which environments the task data directory holds, and how to fill it.

Every split of every registered environment (or of those asked for) is loaded as a run loads it
(:func:`agentloop.envs.load_tasks`); a split that fails to load or holds no task is reported with the
loader's own message and where the env's data comes from (``docs/data.md`` has the commands). The
command fails when a split the default run (``experiments/eto.py`` without arguments) reads is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from agentloop.cli.options import data_dir_option

SOURCES = {
    "db": "AgentBench (github.com/THUDM/AgentBench, Apache-2.0): data/dbbench/{standard,dev}.jsonl -> dbbench/",
    "os": "AgentBench (github.com/THUDM/AgentBench, Apache-2.0): data/os_interaction/ -> os_interaction/",
    "webshop": (
        "WebShop (github.com/princeton-nlp/WebShop, MIT): `setup.sh -d small`, then "
        "search_engine/convert_product_file_format.py -> webshop/products_1k.jsonl and webshop/items_ins_v2_1000.json"
    ),
    "alfworld": "ALFWorld (github.com/alfworld/alfworld, MIT): `alfworld-download`, json_2.1.1/ -> alfworld/",
}
"""Where each built-in environment's data comes from; an env registered by another package documents its own."""


@dataclass(frozen=True)
class SplitCheck:
    """What loading one split of one environment found."""

    env: str
    """The environment."""
    split: str
    """The split."""
    tasks: int
    """How many tasks it loaded (0 when it failed)."""
    problem: str
    """Why it is unusable (the loader's error, or that it is empty); empty when it loaded tasks."""


def check_split(env: str, data_dir: Path, split: str) -> SplitCheck:
    """Loads one split as a run would, and says what it found."""
    from agentloop import envs

    try:
        tasks = envs.load_tasks(env, data_dir, split)
    except Exception as e:  # any loader failure is a finding to report (missing file, malformed record, ...)
        return SplitCheck(env, split, 0, f"{type(e).__name__}: {e}")
    return SplitCheck(env, split, len(tasks), "" if tasks else "no tasks")


def default_run_splits() -> list[tuple[str, str]]:
    """The (env, split) pairs the default run reads: its envs' training and held-out splits."""
    from agentloop.cli.experiments import import_experiment

    config = import_experiment("eto").ETOConfig()
    return [(spec.name, split) for spec in config.envs for split in spec.splits()]


def docs_page() -> str:
    """Where docs/data.md is: in the repository beside the package, else on the project's pages."""
    import agentloop

    page = Path(agentloop.__file__).resolve().parent.parent / "docs" / "data.md"
    return str(page) if page.is_file() else "docs/data.md of the agentloop repository"


def _source(ctx: click.Context) -> str:
    found = ctx.get_parameter_source("data_dir")
    names = {
        click.core.ParameterSource.COMMANDLINE: "--data-dir",
        click.core.ParameterSource.ENVIRONMENT: "AGENTLOOP_DATA_DIR",
    }
    return names.get(found, "the default; set AGENTLOOP_DATA_DIR or --data-dir")


@click.command(short_help="Check the task data directory.")
@data_dir_option
@click.option("--env", "names", multiple=True, metavar="ENV", help="Check only this env (repeatable; default: all).")
@click.pass_context
def data(ctx: click.Context, data_dir: Path, names: tuple[str, ...]) -> None:
    """Check the task data directory: for every env and split, whether its tasks load and how many.

    Says what is missing and where it comes from (docs/data.md has the commands), and exits
    with status 1 when a split the default run (experiments/eto.py, no arguments) reads is missing.
    """
    from agentloop import envs

    known = envs.names()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise click.BadParameter(f"unknown env(s) {', '.join(unknown)}; known: {', '.join(known)}", param_hint="--env")
    data_dir = data_dir.expanduser().resolve()
    click.echo(f"data directory: {data_dir} (from {_source(ctx)})")
    needed = default_run_splits()
    checks = [
        check_split(name, data_dir, split) if data_dir.is_dir() else SplitCheck(name, split, 0, "no data directory")
        for name in names or known
        for split in envs.definition(name).splits
    ]
    click.echo(f"\n{'env':<10} {'split':<14} {'tasks':>7}")
    for c in checks:
        tag = "  (default run)" if (c.env, c.split) in needed else ""
        click.echo(f"{c.env:<10} {c.split:<14} {c.tasks if not c.problem else 'MISSING':>7}{tag}")
    _report(checks, data_dir)
    lacking = [f"{c.env} {c.split}" for c in checks if c.problem and (c.env, c.split) in needed]
    unchecked = [f"{env} {split}" for env, split in needed if env not in {c.env for c in checks}]
    if lacking:
        click.echo(f"\nthe default run (experiments/eto.py) cannot start: it reads {', '.join(lacking)}", err=True)
        ctx.exit(1)
    if not unchecked:
        click.echo("\nthe default run (experiments/eto.py) finds its data")


def _report(checks: list[SplitCheck], data_dir: Path) -> None:
    """What failed, by env, and where each env's data comes from."""
    failed = [c for c in checks if c.problem]
    if not failed:
        click.echo(f"\nevery split of {len({c.env for c in checks})} env(s) loads")
        return
    click.echo(f"\nmissing or unreadable ({len(failed)} of {len(checks)} splits):")
    for env in dict.fromkeys(c.env for c in failed):
        click.echo(f"  {env}:")
        problems = dict.fromkeys(c.problem for c in failed if c.env == env)
        for problem in problems:
            splits = ", ".join(c.split for c in failed if c.env == env and c.problem == problem)
            click.echo(f"    {splits}: {problem}")
        click.echo(f"    fill it from {SOURCES.get(env, 'the documentation of the package that registers it')}")
    click.echo(f"\nhow to fill {data_dir} from the public sources: {docs_page()}")
