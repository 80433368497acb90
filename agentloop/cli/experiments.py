"""``agentloop run``: an experiment script of the repository's ``experiments/`` directory, run as if directly.

The experiments are scripts beside the package, not part of it: an editable install (``scripts/setup.sh``,
``pip install -e .``) finds them at ``<repository>/experiments``, next to ``agentloop/``. The script runs in
this process as ``python experiments/<name>.py ARGS`` would run it: as ``__main__``, with its directory first
on ``sys.path`` and ``sys.argv`` its own (Ray gives its workers the script's directory from there), parsing
ARGS itself. Only a :class:`~agentloop.config.ConfigError` (a bad override, file or value, raised before any
work) is caught, and reported as a usage error.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path
from types import ModuleType

import click

RUN_SETTINGS = {"ignore_unknown_options": True, "allow_interspersed_args": False, "help_option_names": ["-h", "--help"]}
"""Everything after the experiment's name is the experiment's, ``--help`` and ``--resume`` included."""


def experiments_dir() -> Path:
    """The repository's ``experiments/`` directory, beside the ``agentloop`` package.

    Raises:
        click.ClickException: When it is not there (agentloop installed from a wheel, not the repository).
    """
    import agentloop

    found = Path(agentloop.__file__).resolve().parent.parent / "experiments"
    if not (found / "eto.py").is_file():
        raise click.ClickException(
            f"no experiments directory at {found}: the experiments are scripts of the agentloop repository, "
            "beside the package; install agentloop from a clone with `pip install -e .` (scripts/setup.sh does)"
        )
    return found


def experiment_names() -> dict[str, str]:
    """Each experiment script's name and the first paragraph of its docstring (read, not imported)."""
    found = {}
    for script in sorted(experiments_dir().glob("*.py")):
        if not script.name.startswith("_"):
            doc = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8"))) or ""
            found[script.stem] = " ".join(doc.split("\n\n", 1)[0].split())  # its first paragraph
    return found


def import_experiment(name: str) -> ModuleType:
    """The experiment module ``name`` (``eto``), imported as the experiments import each other."""
    path = str(experiments_dir())
    if path not in sys.path:
        sys.path.insert(0, path)
    return importlib.import_module(name)


class _RunCommand(click.Command):
    """``run``, whose help lists the experiments found."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        try:
            rows = list(experiment_names().items())
        except click.ClickException as e:
            rows = [("(none)", e.message)]
        with formatter.section("Experiments"):
            formatter.write_dl(rows)


@click.command(cls=_RunCommand, context_settings=RUN_SETTINGS, short_help="Run an experiment (eto, ste, ...).")
@click.argument("experiment")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def run(experiment: str, args: tuple[str, ...]) -> None:
    """Run EXPERIMENT with ARGS, exactly as `python experiments/EXPERIMENT.py ARGS`.

    ARGS are the experiment's own: key.sub=value overrides, --config FILE, --resume DIR
    (`agentloop run eto --help` shows them). Examples:

    \b
        agentloop run eto                                  # the embedded default
        agentloop run eto --config my.yaml iterations=3 sft.epochs=1
        agentloop run eto --resume runs/eto-20261122-010203 iterations=4
        agentloop run ste memory.long_term_tokens=0
    """
    import runpy

    from agentloop.config import ConfigError

    names = experiment_names()
    if experiment not in names:
        raise click.BadParameter(
            f"no experiment {experiment!r}; choose from {', '.join(names)}", param_hint="EXPERIMENT"
        )
    script = (experiments_dir() / f"{experiment}.py").resolve()
    sys.argv = [str(script), *args]
    sys.path.insert(0, str(script.parent))
    try:
        runpy.run_path(str(script), run_name="__main__")
    except ConfigError as e:
        raise click.UsageError(f"{experiment}: {e}") from None


@click.command(short_help="Copy a run to go on from one of its stages.")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--at", "stage", metavar="STAGE", help="The last stage kept (eval/sft, sft/1, ...); default: all.")
def fork(run_dir: Path, target: Path, stage: str | None) -> None:
    """Copy the run RUN_DIR into TARGET, a new run that goes on from RUN_DIR's stage STAGE.

    The copy holds the stages completed up to STAGE (their trajectories, pairs, memory, adapters and
    metrics); RUN_DIR is not touched, and may be running. Resume the copy with other settings of the
    stages still to run: the SFT policy of a finished ETO run, say, trained on with other DPO settings.

    \b
        agentloop fork runs/eto-1 runs/eto-beta05 --at eval/sft
        agentloop run eto --resume runs/eto-beta05 dpo.beta=0.5
    """
    from agentloop.config import ConfigError
    from agentloop.loop import RunDir

    source = RunDir(run_dir)
    if not source.config_file.is_file():
        raise click.BadParameter(f"{run_dir} holds no config.yaml: is it a run directory?", param_hint="RUN_DIR")
    try:
        copy = source.fork(target, at=stage)
    except KeyError as e:
        raise click.BadParameter(str(e.args[0]), param_hint="--at") from None
    except (FileExistsError, FileNotFoundError, ConfigError) as e:
        raise click.UsageError(str(e)) from None
    from agentloop.replay import ReplayStore

    with ReplayStore(copy.store_url) as store:
        kept = store.completed_stages()
    click.echo(f"{copy.path}: {len(kept)} stages ({', '.join(kept) or 'none'}); go on with --resume {copy.path}")
