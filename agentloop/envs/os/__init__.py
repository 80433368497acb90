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
Fourteen tasks cannot be solved or scored honestly in this sandbox and are left out at load
time (``tasks.EXCLUDED`` lists them with the reason: 13 of test, 1 of dev): their setup needs
what the sandbox forbids (users, apt, sudo, writes to ``/`` or ``/usr/bin``), so either their
check passes for doing nothing (test-6-003, test-6-007 paid 1.0 for a bare ``finish``) or
their fixed answer is about a state that does not exist here. The test split therefore
holds 131 tasks, dev 25.

Protocol (AgentBench's text form). Each assistant turn holds one action, after an optional
``Think: ...``: ``Act: bash`` followed by a ```bash block runs the block in the episode's
shell and shows its output; ``Act: answer(...)`` gives the final answer (the text between
the parentheses) and ``Act: finish`` ends the episode without one (for tasks that only ask
for a change); both end the episode and score it. Long output is cut to
``max_observation_chars`` and the agent is told so. A reply that follows none of these
forms is answered with an explanation, counts as invalid and costs a turn; an episode
without an answer after ``max_turns`` replies is truncated.

Scoring (AgentBench's semantics; what the success depends on is only the answer and the state
the task asks about). A ``match`` task compares the stripped answer with the expected
string. A ``check`` task runs its scripts in order, each with the arguments gathered so far,
starting with the answer (``finish`` answers the empty string); after each script its
output is appended to the arguments; every script must exit 0. Reward is 1.0 for success,
0.0 otherwise. Where each part runs:

- A ``None`` entry stands for the task's example solution, whose output is the expected
  value. It is run at reset, in the episode's own sandbox after the task's init and start
  and before the agent's first action, as a fresh process in the agent's environment (its
  PATH: test-2-000's example counts what PATH reaches), and stored. Nothing the agent does
  afterwards (emptying the files the example counts, planting a ``wc``) changes it. Two
  examples write (test-7-052 and test-7-055 ``mkdir -p`` the folders they then count): the
  agent of those tasks finds the folders already made.
- Python checks (all of AgentBench's compare their arguments and import only ``sys``;
  ``load_os_tasks`` refuses one that uses anything more) run on the host, never in the
  sandbox: ``python -I -S`` (with the ``exit`` builtin they end with), an empty environment,
  ``/`` as working directory, ``script_timeout_s`` and 64 KiB of output.
- Bash checks (8 tasks once the excluded are left out, none of train) run in the sandbox
  after the supervisor has killed every other process in it (``kill(-1)`` from pid 1, then
  reaping until none is left), each as a fresh process of a trusted bash with a clean
  environment (no ``BASH_ENV``, ``ENV`` or ``LD_*``), ``HOME=/root``, working
  directory ``/root`` and PATH ``/run/agentloop/bin:/usr/sbin:/usr/bin:/sbin:/bin:
  /usr/local/sbin:/usr/local/bin``: every folder before ``/usr/local`` is read-only, so a
  program the task asks for (``calc``) is found but never instead of a system program.
  ``/run/agentloop`` is a read-only copy of the host's bash and python3, owned by root and
  execute-only (0711): the kernel marks a process that runs a binary it may not read as not
  dumpable, so no process of the sandbox (same uid, no Yama on these hosts) can trace the
  check's shell or python or open their memory, not even the agent's ``calc`` that the check
  runs (tested). That python is a virtual environment of ``/usr/bin`` without site packages:
  no ``.pth`` or ``sitecustomize`` in ``/usr/local`` or ``~/.local`` reaches it. A file a
  check sources (test-2-004 sources ``~/.bashrc``, which is the answer of that task) runs in
  a subshell whose output is dropped; only the PATH it leaves is taken over (after the
  read-only folders): ``exit 0``, ``exec``, function or alias definitions in it cannot end
  or rewrite the check, and a sourced file that ends its shell makes ``source`` fail.
- Residual risks, by design or left: a check that runs a program of the agent's (``calc``,
  ``count``, ``date-format``, ``echo-love``; dev and test only) runs agent code during the
  check. It cannot reach the check's bash or python (not dumpable), but it can trace other
  programs that check runs after it which are dumpable (test-5-002's ``date``, a system
  binary). The ``calc`` checks paste calc's output into Python code they run, so an output
  such as ``0)<1 or (1`` passes them: that weakness is in the task's check and is kept as
  AgentBench wrote it.

Tamper attempts. ``step`` returns ``info["tamper_attempts"]``: after every command (and, at the
episode's end, after every process is stopped) the supervisor looks into the writable
folders where a file could change what a check runs, and counts each new file once: in
``/usr/local/{bin,sbin}`` named like a program of the read-only PATH folders; a ``*.pth``,
``sitecustomize`` or ``usercustomize`` in a python site folder (``/usr/local/lib/pythonX.Y/
dist-packages``, ``~/.local/...``); in a writable loader folder of ``/etc/ld.so.conf``
(``/usr/local/lib``, ``/usr/local/lib/x86_64-linux-gnu``) named like a system library. A
command that names a protected interpreter or loader file (``pyvenv.cfg``,
``ld.so.preload``) counts once per name and episode. Not counted: writes to ``~/.bashrc``
(test-2-004's answer), a ``sitecustomize.py`` in the working directory (no python reads it
there), and tracing attempts (invisible without an audit log; they fail, see above). A scan
costs 0.02 ms with nothing new and 0.5 ms with 50 new files (``bench/os_latency.py``).
False positives: 0 over the expert replays of all 1,151 tasks that have one (train, dev and
test; successful or not).

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
  gone with the sandbox. Covered with empty read-only folders (which cannot be removed or
  renamed: their parents are mount points): the host folders there that others may not list
  (such as ``/etc/ssl/private``), ``/usr/pyvenv.cfg`` (python reads it beside the parent of
  its ``bin``: a file there re-pointed even ``/usr/bin/python3 -I -S`` at a fake standard
  library), the standard ``/usr`` folders the host lacks (``/usr/lib32``, ...), and each
  folder in a writable mount that the host's loader cache points into (``/usr/local/
  cuda-13.0`` on these hosts; a library planted there would be loaded by name). The agent
  sees these, and ``/run/agentloop`` and ``/run/agentloop-io`` (the supervisor's), as empty or
  read-only folders. Nothing else of the host (``/work``, the data directory, the host's
  ``/root``) is visible, and nothing is written to the host's disk (the trusted copies live in
  ``/run/agentloop-os``, root's tmpfs, one folder per version of the host's binaries).
- Limits of each process (``prlimit`` before ``bwrap``, inherited by every process): address
  space (``memory_mb``), file size (``max_file_mb``), CPU seconds (``cpu_time_s``), no core
  dumps, processes of the sandbox's uid (``max_processes``: the uid is the sandbox's own, so
  this bounds the episode too).
- Limits of the episode as a whole (cgroups, :mod:`agentloop.envs.os.cgroups`): the sandbox
  is launched as root straight into its own memory and pids groups (a ``/bin/sh`` writes its
  pid to ``cgroup.procs``, then ``exec``s ``setpriv``, which drops to the sandbox's uid, then
  ``prlimit`` and ``bwrap``), so no process of the episode ever runs outside them; the groups
  are removed when the sandbox is closed, and groups left by a host process that died are
  removed when the next one starts. ``episode_memory_mb`` bounds processes and tmpfs files
  together (tmpfs pages are charged to the group; at least the 7 mounts' total plus 128 MiB,
  so files alone can never take it all); ``episode_processes`` bounds processes and threads.
  Every process but the supervisor has ``oom_score_adj`` 1000, so the kernel kills the
  agent's processes first when the episode is out of memory (also when the host is). cgroup
  v1 (``memory.limit_in_bytes``, ``memory.memsw.limit_in_bytes``, ``pids.max``; these hosts)
  and v2 (``memory.max``, ``memory.swap.max``, ``pids.max``, ``cgroup.kill``) are both
  supported (no freezer: ``kill(-1)`` from pid 1 already stops a whole namespace at once).
  Measured here (v1): three processes of 150 MiB under a 320 MiB episode limit peak at
  320 MiB with one killed; three of 700 MiB under the default 1 GiB peak at 1.00 GiB with
  two killed (the earlier design let them reach 2.09 GiB); each time the next command runs
  normally. A loop that keeps every process slot taken is cleared before the next command
  (116 processes in about 100 ms). Joining the groups and the bookkeeping cost a few ms per
  reset. On a host without writable cgroups (an unprivileged container) one warning is
  logged and only ``prlimit`` applies: the episode's total memory is then NOT bounded (only
  each process's address space and each of the 7 tmpfs mounts, so up to 7 x ``scratch_mb``
  of files plus ``max_processes`` x ``memory_mb``), and hitting the process limit is noticed
  by counting processes.
- Processes: inside, a small Python supervisor (the host's python3 run with ``-I -S``, code
  passed on the command line, :mod:`agentloop.envs.os.supervisor`) runs as pid 1. It keeps
  one persistent bash per episode (so the working directory, variables and functions carry
  over between commands), runs init, example and check scripts as fresh processes, and reaps
  orphans as they end. As pid 1 it cannot be killed from inside, and it is not dumpable, so
  the agent cannot trace it or reach its pipes to the host. Each agent command runs as one
  quoted ``eval`` with stdin from ``/dev/null`` and its output sent to a FIFO made for that
  command alone; the shell's own stdout carries only the end marker with the exit status.
  What a background process prints later goes to a FIFO nobody reads any more (it gets
  SIGPIPE), so a command's output is only its own. Each command has a wall-clock limit
  (``command_timeout_s``) and stops past 1 MiB of output: then every process but the shell
  and the task's own (those alive when its setup ended) is killed; if the shell itself is
  stuck (a builtin loop), it is replaced by a fresh one and the agent is told its state was
  reset. When the episode reached its process limit (``pids.events``, or the count of
  processes without cgroups), the processes of earlier commands are killed the same way
  before the next command, and the agent is told how many.
- Cleanup: ``--die-with-parent`` and ``--as-pid-1``: when the episode ends the host kills
  ``bwrap``, pid 1 dies with it and the kernel kills every process of the pid namespace;
  the environment then waits until no process of the sandbox uid is left.

Setup per task: the home starts with the files of the host's ``/etc/skel`` (``.bashrc``,
``.profile``, as in a fresh Ubuntu container); the task's ``create.init`` (code or file, bash
or python) runs as a fresh process, a bash one with ``$RANDOM`` seeded from the task id so
that every episode of a task starts from the same files; then its ``start`` command runs in
the agent's shell (as in AgentBench, so a ``start`` of ``var=10`` or a background job is part
of the shell's state); then the example's output is stored (see Scoring). The sandbox is
not a copy of AgentBench's Ubuntu container: tasks that need to write to ``/etc`` or
``/usr`` outside ``/usr/local``, to add users, to install packages or to use the network
cannot succeed here (see :func:`build_os_experts`' report and ``tasks.EXCLUDED``).

Experts. :func:`expert_actions` runs a task's example solution as ``Act: bash`` and
answers with what it printed (``Act: answer(...)``), answers a match task with its expected
string, and ends with ``Act: finish`` when the checks ignore the answer;
:func:`build_os_experts` replays those actions through :class:`OSEnv` and keeps the
successes (991 of train's 1,000, 24 of dev's 25, 124 of test's 131).
"""

from agentloop.envs.os.config import OSEnvConfig
from agentloop.envs.os.env import OSEnv
from agentloop.envs.os.experts import build_os_experts
from agentloop.envs.os.imagine import imagined_task, judge_evidence, proposal_prompt
from agentloop.envs.os.tasks import SPLITS, OSTask, load_os_tasks
from agentloop.envs.registry import EnvDefinition, Imagination

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
    imagination=Imagination(prompt=proposal_prompt, build=imagined_task, evidence=judge_evidence),
)
"""The Operating System environment's registration (``agentloop.envs``)."""

__all__ = ["ENV", "OSEnv", "OSEnvConfig", "OSTask", "build_os_experts", "load_os_tasks"]
