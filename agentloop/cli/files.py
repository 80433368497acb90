"""``agentloop export`` and ``agentloop import``: a replay store to and from files other agent-tuning tools read.

Thin commands over :mod:`agentloop.replay.export`. A store is named by ``--store``: a SQLAlchemy URL, a run
directory (its ``replay.db``) or a SQLite file. The format is ``--format``, or else follows the file's suffix:
``.json`` is ETO's conversation JSON (``eto``), ``.jsonl`` chat JSON lines (``chat``), ``.parquet`` a dataset
(``dataset``).
"""

from __future__ import annotations

import typing
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from agentloop.types import Source

SUFFIXES = {".json": "eto", ".jsonl": "chat", ".parquet": "dataset"}
"""The format a file's suffix implies when ``--format`` is not given."""
FORMAT_HELP = "eto (ETO's conversation JSON), chat (chat JSON lines) or dataset (Parquet)"
"""The formats of :data:`agentloop.replay.FORMATS`, spelled out here so that ``--help`` imports no store code."""


def store_url(value: str, *, existing: bool) -> str:
    """The SQLAlchemy URL of ``--store``: a URL as given, a run directory's store, or a SQLite file.

    Raises:
        click.BadParameter: When ``existing`` and no SQLite store is there (opening one would create it).
    """
    from agentloop.loop import RunDir

    if "://" in value:
        return value
    path = Path(value).expanduser()
    url = RunDir(path).store_url if path.is_dir() else f"sqlite:///{path.resolve()}"
    if existing and not Path(url.removeprefix("sqlite:///")).is_file():
        raise click.BadParameter(
            f"no replay store at {value} (a run directory, a SQLite file or a URL)", param_hint="--store"
        )
    return url


def file_format(given: str | None, path: Path) -> str:
    """``--format``, checked, or the format ``path``'s suffix implies."""
    from agentloop.replay import FORMATS

    if given is None:
        if path.suffix not in SUFFIXES:
            raise click.BadParameter(
                f"cannot tell the format of {path.name} from its suffix ({', '.join(SUFFIXES)}); choose one of "
                f"{', '.join(FORMATS)}",
                param_hint="--format",
            )
        return SUFFIXES[path.suffix]
    if given not in FORMATS:
        raise click.BadParameter(f"{given!r} is not one of {', '.join(FORMATS)}", param_hint="--format")
    return given


def _store_option(existing: bool) -> Any:
    what = "to read" if existing else "to write (created when it does not exist)"
    return click.option(
        "--store",
        "store",
        required=True,
        metavar="STORE",
        help=f"The replay store {what}: a run directory, a "
        "SQLite file or a SQLAlchemy URL (postgresql+psycopg2://user@host/db).",
    )


FORMAT_OPTION = click.option(
    "--format",
    "fmt",
    metavar="FORMAT",
    help=f"{FORMAT_HELP}; default: from the file's suffix (.json, .jsonl, .parquet).",
)


@click.command(short_help="Write a store's trajectories or pairs to a file.")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@_store_option(existing=True)
@FORMAT_OPTION
@click.option(
    "--pairs", is_flag=True, help="Export preference pairs (TRL's prompt/chosen/rejected) instead of trajectories."
)
@click.option("--stage", help="Only this stage's trajectories (eval/sft, explore/1, ...).")
@click.option("--env", help="Only this env's.")
@click.option("--split", help="Only tasks of this split.")
@click.option("--kind", help="Only tasks of this kind.")
@click.option("--task-id", help="Only this task's.")
@click.option("--source", type=click.Choice(typing.get_args(Source)), help="Only trajectories of this source.")
@click.option("--iteration", type=int, help="Only this iteration's (pairs: the round that built them).")
@click.option("--policy-version", type=int, help="Only trajectories this policy version played.")
@click.option("--trial", type=int, help="Only this trial of each task (STE's chains; 0 = the first).")
@click.option("--success/--failure", default=None, help="Only successful (or failed) trajectories.")
def export(out: Path, store: str, fmt: str | None, pairs: bool, **filters: Any) -> None:
    """Write a store's trajectories (or pairs) to OUT, filtered by the options given.

    \b
        agentloop export --store runs/eto-20261122-010203 sft.json --stage experts
        agentloop export --store runs/eto-20261122-010203 dpo-1.jsonl --pairs --iteration 1
        agentloop export --store sqlite:///replay.db eval.parquet --source eval --success
    """
    from agentloop.replay import PairFilter, ReplayStore, export_pairs, export_trajectories

    fmt = file_format(fmt, out)
    given = {k: v for k, v in filters.items() if v is not None}
    if pairs:
        refused = sorted(set(given) - set(PairFilter.__annotations__))
        if refused:
            option = "--" + refused[0].replace("_", "-")
            raise click.BadParameter(
                f"filters trajectories, not pairs (pairs take {_options(PairFilter.__annotations__)})",
                param_hint=option,
            )
    with _reported(), ReplayStore(store_url(store, existing=True)) as opened:
        count = (export_pairs if pairs else export_trajectories)(opened, out, fmt, **given)
    click.echo(f"exported {count} {'pairs' if pairs else 'trajectories'} to {out} ({fmt})")


@click.command("import", short_help="Store a file's trajectories or pairs as a stage.")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path, exists=True))
@_store_option(existing=False)
@FORMAT_OPTION
@click.option("--stage", required=True, help="The completed stage the records are stored as (a new name).")
@click.option("--pairs", is_flag=True, help="Import pairs agentloop exported, instead of trajectories.")
@click.option("--env", help="The env of records without agentloop's fields (ETO's, AgentInstruct's).")
@click.option("--kind", help="The task kind of such records [default: imported].")
def import_(
    file: Path, store: str, fmt: str | None, stage: str, pairs: bool, env: str | None, kind: str | None
) -> None:
    """Store the trajectories (or pairs) of FILE as one completed stage of a store, all or nothing.

    A file agentloop exported imports exactly as it was exported; a record of another tool's
    (ETO's or AgentInstruct's released trajectories) imports as an expert demonstration of --env.

    \b
        agentloop import eto_webshop_sft.json --store runs/mine --stage imported/eto --env webshop
        agentloop import dpo-1.jsonl --store runs/other --stage imported/pairs --pairs
    """
    from agentloop import envs
    from agentloop.replay import ReplayStore, import_pairs, import_trajectories
    from agentloop.replay.export import IMPORTED_KIND

    fmt = file_format(fmt, file)
    if pairs and (env or kind):
        raise click.BadParameter(
            "names the task of foreign trajectories; pairs carry their own", param_hint="--env" if env else "--kind"
        )
    if env is not None and env not in envs.names():
        raise click.BadParameter(f"unknown env {env!r}; known: {', '.join(envs.names())}", param_hint="--env")
    with _reported(), ReplayStore(store_url(store, existing=False)) as opened:
        if pairs:
            count = len(import_pairs(opened, file, fmt, stage=stage))
        else:
            count = len(import_trajectories(opened, file, fmt, stage=stage, env=env, kind=kind or IMPORTED_KIND))
    click.echo(f"imported {count} {'pairs' if pairs else 'trajectories'} from {file} as stage {stage} of {store}")


@contextmanager
def _reported() -> Iterator[None]:
    """A store or file the library refuses becomes an error message (exit status 1), not a traceback."""
    from sqlalchemy.exc import SQLAlchemyError

    from agentloop.replay import SchemaVersionError

    try:
        yield
    except (ValueError, FileNotFoundError, SchemaVersionError) as e:  # FormatError is a ValueError
        raise click.ClickException(str(e)) from None
    except SQLAlchemyError as e:
        raise click.ClickException(f"--store: {e}") from None


def _options(names: Iterable[str]) -> str:
    return ", ".join("--" + n.replace("_", "-") for n in names)
