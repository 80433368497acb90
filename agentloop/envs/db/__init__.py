"""The Database environment: AgentBench's dbbench tasks on SQLite, plus their expert demonstrations.

Data and split. Tasks are read from ``<data_dir>/dbbench/``: ``standard.jsonl`` (300 tasks) is
the ``train`` split and ``dev.jsonl`` (60 tasks) is held out as ``dev``. A task's id is its
split and its line index, e.g. ``train-0042``. Both files are a third SELECT questions, a third
INSERT and a third UPDATE requests. Sixteen dev tasks use a table whose name also occurs in
the training file, but no dev question appears in training, so dev measures generalisation to
new questions, not to unseen table names.

Episodes and limits. Every task's table is built once, in this process, from the task's rows
into a serialized SQLite template; each episode starts from those bytes. No other SQL runs in
this process: every statement (the agent's, the gold SQL, the scoring read) runs in a worker
process (:mod:`~agentloop.envs.db.worker`, standard library only) that one process's envs
share. The worker holds one database at a time on a fresh connection; this process keeps each
episode's last committed bytes, so nothing an agent does reaches the template, the next
episode or another task, and a statement that is stopped leaves its database as it was.

- Time: SQLite's progress handler stops a loop after ``query_timeout_s``; built-in calls it
  cannot interrupt (e.g. 200 ``trim`` calls with a long character set in one expression, 4 s)
  have the worker killed 0.5 s later and replaced. Either way the observation says the
  statement ran too long. The gold SQL and the scoring read run under the same limit.
- Memory and disk: ``PRAGMA temp_store = MEMORY`` (sorts and temporary results never open a
  file), SQLite's heap capped at ``max_memory_mib`` (a statement needing more fails with an
  observation saying so), the address space at twice that plus 128 MiB, no file may be
  written (``RLIMIT_FSIZE`` 0); the database is capped at ``max_db_pages`` pages, a value at
  ``max_value_bytes``, a LIKE pattern at 100 characters, the shown rows and text as below.
- What runs: an authorizer allows SELECT, INSERT, UPDATE and DELETE on the task's table,
  reading the schema, recursive CTEs, the seven schema pragmas (``table_info``, ...) and a
  list of plain functions (:data:`~agentloop.envs.db.worker.FUNCTIONS`: what the gold SQL uses
  and its relatives). Everything else is refused with an observation naming it, e.g. ``Error:
  the function printf() is not available here``: functions that expose the process
  (``sqlite_version``, ``fts3_tokenizer``, ...), full-text, R-tree and JSON functions, virtual
  tables (``sqlite_stmt``, ``dbstat``, ``json_each``), transactions, ATTACH and VACUUM.
- Processes: the worker dies with its parent (``PR_SET_PDEATHSIG``), and with the last env
  that uses it (``close``).

Protocol (AgentBench's text form). Each assistant turn holds one action: ``Action: Operation``
with one SQL statement in a ```sql block (the next observation is the raw result, e.g.
``[('Women +60kg Bronze',)]``, ``Query OK, 1 row affected`` or ``Error: <message>``), or
``Action: Answer`` with ``Final Answer: [...]`` (a JSON or Python list), which ends the episode.
Text before ``Action:`` is allowed. A reply that follows neither form is answered with an
explanation of the format, counts as invalid, and costs a turn; a valid statement that fails
is not invalid, it is reported in ``info["sql_error"]``. ``info["tamper_attempts"]`` is 1 when
the statement was refused for trying to change the schema (create, drop or alter a table,
view, trigger or index, temporary ones included, or write ``sqlite_master``), else 0.

Scoring. SELECT-type tasks (AgentBench's ``other``, ``counting``, ``comparison``, ``ranking``
and ``aggregation-*``) compare the answer list with the label as AgentBench does: values are
stripped, numbers compare as numbers (``"1"`` matches ``"1.0"``), ``None`` and ``"none"`` are
one value, and the order does not matter. INSERT and UPDATE tasks ignore the answer text and
compare the episode's table, as a multiset of rows, with the table the gold SQL leaves on a
separate fresh copy of the template (computed once per task). The success check reads only
``main``'s real table, and only while ``main``'s schema is exactly the template's (same
columns, types and collations, no view, trigger or index) and ``temp`` is empty; since schema
changes are refused, nothing an agent creates can stand in for the table. The gold SQL is
read as the MySQL it is (its canonical SQLite form, see below); run that way it reproduces
AgentBench's own MD5 label of the resulting table for 198 of the 200 training write tasks.
Reward is 1.0 for success and 0.0 otherwise. One training task's gold SQL changes nothing in
SQLite (``train-0206``: its WHERE says Montreal, the row Montréal), so answering it at once
succeeds; the expert report lists such tasks as ``unchanged_by_gold``.

SQLite is not MySQL (where the labels were made): declared column types are mapped to SQLite
affinities, text columns compare case-insensitively (``COLLATE NOCASE``, like MySQL's default
collation), but a text column still compares with a number as text.

Experts. :func:`gold_actions` rewrites a task's MySQL-flavoured gold SQL into one canonical,
fully quoted SQLite statement (sqlglot) and, for SELECT tasks, answers with the rows that
statement returns; :func:`build_db_experts` replays those actions through :class:`SQLEnv` and
keeps the demonstrations that succeed.
"""

from agentloop.envs.db.config import SQLEnvConfig
from agentloop.envs.db.env import SQLEnv
from agentloop.envs.db.experts import DBExpertConfig, build_db_experts
from agentloop.envs.db.imagine import imagined_task, judge_evidence, proposal_prompt, scene
from agentloop.envs.db.tasks import SPLIT_FILES, DBTask, load_db_tasks
from agentloop.envs.registry import EnvDefinition, Imagination

ENV = EnvDefinition(
    name="db",
    splits=tuple(SPLIT_FILES),
    train_split="train",
    eval_split="dev",
    load_tasks=load_db_tasks,
    env=SQLEnv,
    config=SQLEnvConfig,
    build_experts=build_db_experts,
    expert_config=DBExpertConfig,
    context_tokens=2048,
    median_episode_tokens=270,  # bench/episode_tokens.py: median of 200 train experts
    imagination=Imagination(prompt=proposal_prompt, build=imagined_task, evidence=judge_evidence, scene=scene),
)
"""The Database environment's registration (``agentloop.envs``)."""

__all__ = ["ENV", "DBExpertConfig", "DBTask", "SQLEnv", "SQLEnvConfig", "build_db_experts", "load_db_tasks"]
