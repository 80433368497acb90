"""A dbbench task's gold SQL, read as the MySQL it is and rewritten into one canonical, quoted SQLite statement."""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlglot import exp
from agentloop.envs.db.tasks import DBTask

logger = logging.getLogger(__name__)


_BARE_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


_GLUED_KEYWORD_RE = re.compile(r"(?<=[\w)\]`])(?=(?:FROM|WHERE|GROUP BY|ORDER BY|HAVING|LIMIT)\b)")
"""A clause keyword stuck to the word before it: the trace of a line break lost from the gold SQL."""
_QUOTED_RE = re.compile(r"""'(?:[^'\\]|\\.|'')*'|`[^`]*`|"(?:[^"\\]|\\.|"")*"|\[[^\]]*\]""", re.DOTALL)


def _name_key(name: str) -> str:
    """A name compared loosely: case, underscores and runs of spaces ignored."""
    return re.sub(r"[\s_]+", " ", name).strip().lower()


def _repair_gold_sql(sql: str, task: DBTask) -> str:
    """Repairs the gold SQL's names and lost line breaks, in MySQL syntax.

    Clause keywords glued to the previous word (``LeagueFROM``) get their space back.

    Double-quoted text that names a table or column becomes an identifier (elsewhere it stays
    a MySQL string), a bracketed ``[name]`` becomes a backtick-quoted one, and unquoted
    multi-word or symbol-bearing names found outside quotes are put in backticks; string
    literals are never touched.
    """
    names = [task.table_name] + [name for name, _ in task.columns]
    known = {_name_key(n) for n in names}
    needy = sorted((n for n in names if not _BARE_NAME_RE.fullmatch(n) and re.search(r"[A-Za-z]", n)), key=len)
    patterns = [r"\s+".join(map(re.escape, n.split())) for n in reversed(needy) if n.strip()]
    bare = re.compile(rf"(?<![\w`])(?:{'|'.join(patterns)})(?![\w`])", re.IGNORECASE) if patterns else None

    def fix_bare(text: str) -> str:
        text = _GLUED_KEYWORD_RE.sub(" ", text)
        return bare.sub(lambda m: f"`{m.group(0)}`", text) if bare else text

    out, last = [], 0
    for match in _QUOTED_RE.finditer(sql):
        out.append(fix_bare(sql[last : match.start()]))
        token = match.group(0)
        inner = token[1:-1]
        if token[0] == "[" or (token[0] == '"' and _name_key(inner) in known):
            token = "`" + inner.replace("`", "``") + "`"
        out.append(token)
        last = match.end()
    out.append(fix_bare(sql[last:]))
    return "".join(out)


def _point_names_at_task(tree: exp.Expression, task: DBTask) -> None:
    """Renames table references to the task's table and loose column names to real ones."""
    from sqlglot import exp

    ctes = {cte.alias_or_name.lower() for cte in tree.find_all(exp.CTE)}
    aliases = {a.name.lower() for a in tree.find_all(exp.TableAlias)}
    columns = {_name_key(name): name for name, _ in task.columns}
    for table in tree.find_all(exp.Table):
        if table.name.lower() not in ctes:
            table.set("this", exp.to_identifier(task.table_name, quoted=True))
            table.set("db", None)
    for column in tree.find_all(exp.Column):
        real = columns.get(_name_key(column.name))
        if real is not None:
            column.set("this", exp.to_identifier(real, quoted=True))
        if column.table and column.table.lower() not in aliases | ctes:
            column.set("table", exp.to_identifier(task.table_name, quoted=True))


def _canonical_tree(task: DBTask) -> exp.Expression | None:
    """The gold SQL parsed in its dialect (dbbench's MySQL with its names repaired; an imagined
    task's SQLite as written), or None if it cannot be read."""
    import sqlglot
    from sqlglot.errors import SqlglotError

    mysql = task.gold_dialect == "mysql"
    sql = _repair_gold_sql(task.gold_sql, task) if mysql else task.gold_sql
    try:
        trees = [t for t in sqlglot.parse(sql, read=task.gold_dialect) if t is not None]
        if len(trees) != 1:
            return None
        _point_names_at_task(trees[0], task)
        trees[0].sql(dialect="sqlite")
    except (SqlglotError, ValueError, RecursionError) as e:
        logger.debug("gold SQL of %s is unreadable: %s", task.task.task_id, e)
        return None
    return trees[0]


def canonical_sql(task: DBTask) -> str | None:
    """The task's gold SQL as one SQLite statement with every name double-quoted, or None."""
    tree = _canonical_tree(task)
    return None if tree is None else tree.sql(dialect="sqlite", identify=True)


def mistaken_sql(task: DBTask) -> str | None:
    """The natural mistake: the canonical statement with its names unquoted.

    None when the canonical statement needs no quoting (the mistake would not be one).
    """
    from sqlglot import exp

    tree = _canonical_tree(task)
    if tree is None:
        return None
    identifiers = list(tree.find_all(exp.Identifier))
    if all(_BARE_NAME_RE.fullmatch(i.name) for i in identifiers):
        return None
    for identifier in identifiers:
        identifier.set("quoted", False)
    return tree.sql(dialect="sqlite", identify=False)
