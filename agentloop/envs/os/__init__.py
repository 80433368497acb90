"""The Operating System environment: AgentBench's OS tasks in real bash, inside a bubblewrap sandbox.

Data and splits. Tasks are read from ``<data_dir>/os_interaction/``. ``train/training.json``
(1,000 generated tasks) is the ``train`` split; the AgentBench test set, ``tasks/1..7/*.json``
(144 tasks), is the held-out ``test`` split, and ``tasks/dev.json`` (26 tasks) the held-out
``dev`` split. A task names its init, example and check scripts with ``{"file": ...}``,
relative to ``scripts/<set>/`` (``scripts/dev/`` for dev); training tasks name only the check
scripts, which every set ships, and read them from ``scripts/1/``. Ids are ``train-0042``,
``dev-0007`` and ``test-4-012`` (set 4, the 13th task of that set, files in name order).
``Task.kind`` is how the task is scored: ``match``, the check script's name
(``integer-match``, ``string-match``, ``size-match``), or ``script`` for any other check.

Protocol (AgentBench's text form). Each assistant turn holds one action, after an optional
``Think: ...``: ``Act: bash`` followed by a ```bash block runs the block in the episode's
shell and shows its output; ``Act: answer(...)`` gives the final answer (the text between
the parentheses) and ``Act: finish`` ends the episode without one (for tasks that only ask
for a change); both end the episode and score it. Long output is cut to
``max_observation_chars`` and the agent is told so. A reply that follows none of these
forms is answered with an explanation, counts as invalid and costs a turn; an episode
without an answer after ``max_turns`` replies is truncated.

Scoring (AgentBench's semantics). A ``match`` task compares the stripped answer with the
expected string. A ``check`` task runs its scripts in order inside the episode's sandbox,
as fresh processes (not in the agent's shell), each with the arguments gathered so far,
starting with the answer (``finish`` answers the empty string); after each script its
output is appended to the arguments; a ``null`` entry runs the task's example solution, so
its output is the expected value the next script compares with. Every script must exit 0.
Reward is 1.0 for success, 0.0 otherwise.

Sandbox design. Each episode runs in its own bubblewrap (``bwrap``) sandbox, started at
``reset`` and killed whole at the next ``reset`` or ``close``:

- Namespaces: new user, pid, network, ipc, uts and cgroup namespaces. The network namespace
  has only a loopback device, so nothing outside is reachable. Inside, the agent is ``root``
  (uid 0) of its own user namespace, without any capability (``--cap-drop ALL``) and
  without the right to make nested user namespaces.
- Unprivileged outside: the sandbox is launched under an unprivileged host uid (by default
  from 61000 up), one uid per live environment, claimed with an abstract Unix socket so
  concurrent environments in other processes never share one and nothing is left on disk.
  Because of that uid the kernel enforces the resource limits even when agentloop runs as
  root (the process limit is not enforced for host uid 0), and inside root can raise no
  hard limit. Host files owned by root show up as ``nobody`` inside.
- Files: the root is an empty tmpfs remounted read-only; the host's ``/etc`` and every
  folder of its ``/usr`` (``/usr/bin``, ``/usr/lib``, ...) are bound read-only (tools such as
  python3 come from the host); ``/bin``, ``/lib``, ... mirror the host's links. ``/root``
  (the home and working directory), ``/home``, ``/tmp``, ``/var``, ``/usr/local``,
  ``/dev/shm`` and ``/usr`` itself (so a task may add a file such as ``/usr/stock.log`` next
  to the read-only folders) are private tmpfs mounts of ``scratch_mb`` each, writable and
  gone with the sandbox. The few host folders there that others may not list (such as
  ``/etc/ssl/private``) are covered by empty ones. Nothing else of the host (``/work``, the data
  directory, the host's ``/root``) is visible, and nothing is written to the host's disk.
- Limits (``prlimit`` before ``bwrap``, inherited by every process): processes
  (``max_processes``, counted per sandbox uid), address space per process (``memory_mb``),
  file size (``max_file_mb``), CPU seconds per process (``cpu_time_s``), no core dumps.
  Each command has a wall-clock limit (``command_timeout_s``): on expiry every process of
  the command is killed; if the shell itself is stuck (a builtin loop), it is replaced by a
  fresh one and the agent is told its state was reset. Output beyond 1 MiB stops a command
  the same way.
- Processes: inside, a small Python supervisor (the host's python3, code passed on the
  command line) runs as pid 1. It keeps one persistent bash per episode (so the working
  directory, variables and functions carry over between commands), runs init, example and
  check scripts as fresh processes, and reaps orphans. As pid 1 it cannot be killed from
  inside, and it is not dumpable, so the agent cannot trace it or reach its pipes to the
  host. The agent's commands run with stdin from ``/dev/null``; each is passed to the shell
  as one quoted ``eval`` and ends with a random marker line that carries the exit status.
- Cleanup: ``--die-with-parent`` and ``--as-pid-1``: when the episode ends the host kills
  ``bwrap``, pid 1 dies with it and the kernel kills every process of the pid namespace;
  the environment then waits until no process of the sandbox uid is left.

Setup per task: the home starts with the files of the host's ``/etc/skel`` (``.bashrc``,
``.profile``, as in a fresh Ubuntu container); the task's ``create.init`` (code or file, bash
or python) runs as a fresh process, a bash one with ``$RANDOM`` seeded from the task id so
that every episode of a task starts from the same files; then its ``start`` command runs in
the agent's shell (as in AgentBench, so a ``start`` of ``var=10`` or a background job is part
of the shell's state). The sandbox is
not a copy of AgentBench's Ubuntu container: tasks that need to write to ``/etc`` or
``/usr`` outside ``/usr/local``, to add users, to install packages or to use the network
cannot succeed here (see :func:`build_os_experts`' report).

A known limit, shared with AgentBench: the agent's background processes are still alive
while the check scripts run. The check code never touches the sandbox's files.

Experts. :func:`expert_actions` runs a task's example solution as ``Act: bash`` and
answers with what it printed (``Act: answer(...)``), answers a match task with its expected
string, and ends with ``Act: finish`` when the checks ignore the answer;
:func:`build_os_experts` replays those actions through :class:`OSEnv` and keeps the
successes.
"""

from agentloop.envs.os.config import OSEnvConfig
from agentloop.envs.os.env import OSEnv
from agentloop.envs.os.experts import build_os_experts
from agentloop.envs.os.tasks import SPLITS, OSTask, load_os_tasks
from agentloop.envs.registry import EnvDefinition

ENV = EnvDefinition(
    name="os",
    splits=SPLITS,
    train_split="train",
    eval_split="test",
    load_tasks=load_os_tasks,
    env=OSEnv,
    config=OSEnvConfig,
    build_experts=build_os_experts,
    context_tokens=4096,  # 8 turns of up to 128 new tokens and ~300-token outputs, after a ~280-token start
    median_episode_tokens=278,  # bench/episode_tokens.py: median of 200 train experts
)
"""The Operating System environment's registration (``agentloop.envs``)."""

__all__ = ["ENV", "OSEnv", "OSEnvConfig", "OSTask", "build_os_experts", "load_os_tasks"]
