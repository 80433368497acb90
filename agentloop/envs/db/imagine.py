"""Imagined DB tasks (STE's imagination): a new question and its SQL over a training task's table.

The explorer is shown a training task's table (name, columns, a few rows) and the questions
already asked of similar tables, and proposes a new question with the one SQL statement that
answers it. :func:`imagined_task` keeps a proposal only when its SQL runs on a fresh copy of
the table and gives an answer the environment can score: a SELECT that returns between one
and :data:`MAX_VALUES` values (the label), or an INSERT or UPDATE that changes the table
(scored by the table it leaves, like dbbench's own write tasks; one that leaves the table as
it was would be solved by doing nothing). The SQL must use the table (a constant ``SELECT 1``
would be an answer the explorer knows before it asks); it runs twice, and an answer that
varies is refused. Whether the question and the SQL agree is decided afterwards, by an
independent attempt, or by a judge reading :func:`judge_evidence`.
"""

from __future__ import annotations

import re
from collections import Counter

from agentloop.envs.db.config import SQLEnvConfig
from agentloop.envs.db.engine import EpisodeDB, SQLResult, build_template, leased_worker, quote_identifier, sqlite_type
from agentloop.envs.db.gold import canonical_sql
from agentloop.envs.db.tasks import ENV_NAME, DBTask
from agentloop.envs.tasks import words
from agentloop.types import Task

MAX_VALUES = 10
"""Most values a SELECT's answer may hold (dbbench's labels are short lists)."""
SAMPLE_ROWS = 3
"""Rows of the table shown to the explorer."""

# one line, as the example shows it (or the next line, when "Question:" ends its own)
_QUESTION_RE = re.compile(r"Question:[ \t]*(?:\n[ \t]*)?(?!SQL:)(.+)", re.IGNORECASE)
_QUOTES = " \t\"'`"
_SQL_RE = re.compile(r"```(?:[ \t]*(?:sqlite|sql)\b)?(.*?)```", re.IGNORECASE | re.DOTALL)


def proposal_prompt(base: DBTask) -> str:
    """What the explorer is asked: a new question over ``base``'s table."""
    columns = ", ".join(f"{quote_identifier(name)} {sqlite_type(kind).split()[0]}" for name, kind in base.columns)
    rows = "\n".join(repr(tuple(row)) for row in base.rows[:SAMPLE_ROWS])
    lines = [
        "Invent a new task for this SQLite table: a question it can answer, or a change to make (insert or "
        "update rows), and the one SQL statement that does it.",
        f"Table: {quote_identifier(base.table_name)}",
        f"Columns: {columns}",
        f"First rows:\n{rows}",
    ]
    example = canonical_sql(base)
    if example is not None:  # a worked example in the reply's own format: small explorers copy the form
        lines.append("An example task for this table, in the form to reply in:")
        lines.append(f"Question: {base.task.instruction.splitlines()[0]}\nSQL:\n```sql\n{example}\n```")
        lines.append("Now write a different task, in the same form.")
    else:
        lines.append("Reply exactly as:\nQuestion: ...\nSQL:\n```sql\n...\n```")
    lines.append("Write table and column names in double quotes.")
    return "\n".join(lines)


def scene(task: DBTask) -> tuple:
    """The table a task is asked over, rows included: 4 of dbbench's 60 dev tasks ask about a table that
    a training task has too, and an imagined task over it could restate the held-out question."""
    return task.table_name, task.columns, task.rows


def parse_proposal(text: str) -> tuple[str, str] | str:
    """The (question, SQL) of a proposal, or a sentence saying why it cannot be read."""
    question = _QUESTION_RE.search(text or "")
    block = _SQL_RE.search(text or "")
    asked = question.group(1).strip(_QUOTES) if question else ""
    if not asked:
        return "no question"
    if block is None or not block.group(1).strip():
        return "no ```sql block"
    return " ".join(asked.split()), block.group(1).strip()


def _reads_table(sql: str, table: str) -> bool:
    """Whether ``sql`` names ``table`` (as SQLite reads it); False for SQL sqlglot cannot parse."""
    import sqlglot
    from sqlglot import exp
    from sqlglot.errors import ParseError

    try:
        tree = sqlglot.parse_one(sql, read="sqlite")
    except ParseError:
        return False
    return any(t.name.lower() == table.lower() for t in tree.find_all(exp.Table))


def _outcome(base: DBTask, sql: str, config: SQLEnvConfig) -> tuple[SQLResult, Counter | None]:
    """What ``sql`` returns on a fresh copy of ``base``'s table, and the table it leaves (a multiset of rows)."""
    with leased_worker(config) as worker:
        db = EpisodeDB(build_template(base))
        result = worker.run(db, sql, config)
        return result, worker.read_table(db, config)


def imagined_task(base: DBTask, text: str, config: SQLEnvConfig, task_id: str) -> DBTask | str:
    """The task a proposal describes over ``base``'s table, or a sentence saying why it is not kept.

    Args:
        base: The training task whose table the proposal is about.
        text: The explorer's proposal (:func:`proposal_prompt`'s format).
        config: The environment's limits, under which the SQL runs.
        task_id: The new task's id (split ``imagined``).
    """
    parsed = parse_proposal(text)
    if isinstance(parsed, str):
        return parsed
    question, sql = parsed
    if words(question) == words(base.task.instruction):  # a copy in quotes or recased is still a copy
        return "the example task itself"
    kind = sql.lstrip("( \n").split(None, 1)[0].upper() if sql.strip() else ""
    if kind not in ("SELECT", "WITH", "INSERT", "UPDATE"):
        return f"a {kind or 'blank'} statement: only SELECT, INSERT and UPDATE tasks are scored"
    result, table = _outcome(base, sql, config)
    if result.several:
        return "more than one statement"
    if result.error:
        return f"the SQL fails: {result.text[:200]}"
    if not _reads_table(sql, base.table_name):  # "SELECT 1" would let the explorer imagine its own easy wins
        return f'the SQL does not use the table "{base.table_name}"'
    if _outcome(base, sql, config) != (result, table):  # an answer that varies cannot be scored
        return "the SQL gives a different result each time it runs"
    task = Task(ENV_NAME, task_id, "imagined", "SELECT" if kind in ("SELECT", "WITH") else kind, question)
    if task.kind == "SELECT":
        values = [v for row in result.rows or () for v in row]
        if not values or len(values) > MAX_VALUES or all(v is None for v in values):
            return f"the SELECT returns {len(values)} values (1 to {MAX_VALUES} are scored)"
        label = tuple(str(v) for v in values)
    else:
        # Scored by the table it leaves: one left as it was would be solved by doing nothing.
        if table == _outcome(base, "SELECT 1", config)[1]:
            return f"the {kind} leaves the table as it was"
        label = ()
    return DBTask(
        task=task,
        query_type=task.kind,
        table_name=base.table_name,
        columns=base.columns,
        rows=base.rows,
        label=label,
        gold_sql=sql,
        gold_dialect="sqlite",
    )


def _without_comments(sql: str) -> str:
    """``sql`` as sqlglot writes it back, without its comments (a comment could address the judge)."""
    import sqlglot
    from sqlglot.errors import ParseError

    try:
        return sqlglot.parse_one(sql, read="sqlite").sql(dialect="sqlite", comments=False)
    except ParseError:  # a kept task's SQL parsed when it was built (_reads_table); never here
        return sql


def judge_evidence(task: DBTask, config: SQLEnvConfig) -> str:
    """What a judge reads of an imagined task: the table, the question, the SQL, and its answer
    (a SELECT's values; for a write, the rows it adds and removes)."""
    columns = ", ".join(quote_identifier(name) for name, _ in task.columns)
    lines = [
        f"Table {quote_identifier(task.table_name)} ({columns}), first rows:",
        *(repr(tuple(row)) for row in task.rows[:SAMPLE_ROWS]),
        f"Task: {task.task.instruction}",
        f"Solution (SQLite):\n{_without_comments(task.gold_sql)}",
    ]
    if task.is_write:
        before = _outcome(task, "SELECT 1", config)[1] or Counter()
        after = _outcome(task, task.gold_sql, config)[1] or Counter()
        added, removed = list((after - before).elements()), list((before - after).elements())
        lines.append(f"It adds {len(added)} rows and removes {len(removed)}.")
        lines += [f"Added: {row!r}" for row in added[:SAMPLE_ROWS]] + [
            f"Removed: {row!r}" for row in removed[:SAMPLE_ROWS]
        ]
    else:
        lines.append(f"Its answer: {list(task.label)}")
    return "\n".join(lines)
