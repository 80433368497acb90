"""The Database environment: AgentBench's dbbench tasks on SQLite, plus their expert demonstrations.

Data and split. Tasks are read from ``<data_dir>/dbbench/``: ``standard.jsonl`` (300 tasks) is
the ``train`` split and ``dev.jsonl`` (60 tasks) is held out as ``dev``. A task's id is its
split and its line index, e.g. ``train-0042``. Both files are a third SELECT questions, a third
INSERT and a third UPDATE requests. Sixteen dev tasks use a table whose name also occurs in
the training file, but no dev question appears in training, so dev measures generalisation to
new questions, not to unseen table names.

Episodes. Every task's table is built once into an in-memory SQLite template; every episode
runs on its own fresh copy (SQLite's backup API), so nothing an agent does reaches the
template, the next episode, another task or the disk: ATTACH, VACUUM, virtual tables,
extensions and writing PRAGMAs are refused by an authorizer, a progress handler stops a
statement after ``query_timeout_s``, and the copy's size, strings and fetched rows are capped.

Protocol (AgentBench's text form). Each assistant turn holds one action: ``Action: Operation``
with one SQL statement in a ```sql block (the next observation is the raw result, e.g.
``[('Women +60kg Bronze',)]``, ``Query OK, 1 row affected`` or ``Error: <message>``), or
``Action: Answer`` with ``Final Answer: [...]`` (a JSON or Python list), which ends the episode.
Text before ``Action:`` is allowed. A reply that follows neither form is answered with an
explanation of the format, counts as invalid, and costs a turn; a valid statement that fails
is not invalid, it is reported in ``info["sql_error"]``.

Scoring. SELECT-type tasks (AgentBench's ``other``, ``counting``, ``comparison``, ``ranking``
and ``aggregation-*``) compare the answer list with the label as AgentBench does: values are
stripped, numbers compare as numbers (``"1"`` matches ``"1.0"``), ``None`` and ``"none"`` are
one value, and the order does not matter. INSERT and UPDATE tasks ignore the answer text and
compare the episode's table, as a multiset of rows, with the table the gold SQL leaves on a
separate fresh copy. The gold SQL is read as the MySQL it is (its canonical SQLite form, see
below); run that way it reproduces AgentBench's own MD5 label of the resulting table for 198
of the 200 training write tasks. Reward is 1.0 for success and 0.0 otherwise.

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
from agentloop.envs.db.tasks import SPLIT_FILES, DBTask, load_db_tasks
from agentloop.envs.registry import EnvDefinition

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
)
"""The Database environment's registration (``agentloop.envs``)."""

__all__ = ["ENV", "DBExpertConfig", "DBTask", "SQLEnv", "SQLEnvConfig", "build_db_experts", "load_db_tasks"]
