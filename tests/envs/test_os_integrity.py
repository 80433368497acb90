"""Reward integrity of the OS environment: what the agent plants or runs never changes the score.

Each exploit below gave a wrong answer reward 1.0 in the earlier design (checks and the
``None`` example ran in the sandbox through PATH, with python's site hooks, while the
agent's processes were alive). Each test plays it on a real task and asserts the reward is
what it would be without the tampering (0 for a wrong answer, 1 for a right one) and that
the attempt is recorded where it can be detected.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from os_helpers import CONFIG, FINISH, SANDBOX_MARKS, answer, bash, episode, load

from agentloop.envs.experts import replay_actions
from agentloop.envs.os import OSEnv, OSTask
from agentloop.envs.os.experts import expert_actions
from agentloop.envs.os.scoring import score

pytestmark = SANDBOX_MARKS

COUNT = "train-0064"
"""Lines with "Linux" in ~/documents/*.txt: expected 3 (the example's output), python check."""
PY = "v=$(/usr/bin/python3 -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])')"
TRACER = r"""
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.restype = ctypes.c_long
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
SEIZE, INTERRUPT, SYSCALL, PEEKUSER, POKEUSER = 0x4206, 0x4207, 24, 3, 6
ORIG_RAX, RDI = 120, 112
pattern, me, seen = sys.argv[1].encode(), os.getpid(), set()
log = open("/tmp/tracer.log", "a", buffering=1)
end = time.time() + 60
while time.time() < end:
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in seen or int(name) == me:
            continue
        pid = int(name)
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if pattern not in cmd:
            continue
        seen.add(pid)
        if libc.ptrace(SEIZE, pid, None, None) != 0:
            log.write(f"seize {pid} failed errno {ctypes.get_errno()}\n")
            continue
        log.write(f"attached {pid}\n")
        libc.ptrace(INTERRUPT, pid, None, None)
        os.waitpid(pid, 0x40000000)
        libc.ptrace(SYSCALL, pid, None, None)
        while True:
            try:
                _, status = os.waitpid(pid, 0x40000000)
            except ChildProcessError:
                break
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                break
            if libc.ptrace(PEEKUSER, pid, ctypes.c_void_p(ORIG_RAX), None) in (60, 231):
                libc.ptrace(POKEUSER, pid, ctypes.c_void_p(RDI), ctypes.c_void_p(0))
            libc.ptrace(SYSCALL, pid, None, None)
    time.sleep(0.001)
"""
"""A background process that waits for a process whose command line holds ``argv[1]``,
traces it and turns its exit status into 0 (no Yama on these hosts: same uid is enough)."""
CALC = r"""#!/usr/bin/python3
import ctypes, os, subprocess, time
if not os.environ.get("CONTROL"):  # inside the check: a tracer for the check's shell, started from within
    subprocess.Popen(["python3", "/tmp/t.py", "local expected_result"], start_new_session=True)
    time.sleep(0.5)
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
parent = os.getppid()
seized = libc.ptrace(0x4206, parent, None, None)
errno = ctypes.get_errno()
try:
    open(f"/proc/{parent}/mem", "r+b").close()
    memory = "opened"
except OSError as e:
    memory = e.strerror
with open("/tmp/calc.log", "a") as log:
    log.write(f"seize={seized} errno={errno} mem={memory}\n")
print(12345)
"""
"""A wrong ``calc`` that tries to trace the check's shell that runs it, and to open its memory."""


def plant(path: str, text: str) -> str:
    """Commands that write ``text`` to ``path`` and make it executable."""
    return f"mkdir -p $(dirname {path}) && cat > {path} <<'EOF'\n{text}\nEOF\nchmod +x {path}"


def background(script: str, pattern: str) -> str:
    """Commands that start ``script`` (python) in the background, detached, with ``pattern``."""
    start = f"setsid python3 /tmp/t.py '{pattern}' >/dev/null 2>&1 </dev/null &"
    return f"cat > /tmp/t.py <<'EOF'\n{script}\nEOF\n{start}\nsleep 0.3"


PLANTS = {
    "python3 in /usr/local/bin": plant("/usr/local/bin/python3", "#!/bin/sh\nexit 0"),
    "python3 in /usr/local/sbin": plant("/usr/local/sbin/python3", "#!/bin/sh\nexit 0"),
    "wc printing the answer": plant("/usr/local/bin/wc", "#!/bin/sh\necho 999"),
    "grep printing 999 lines": plant("/usr/local/bin/grep", "#!/bin/sh\nfor i in $(seq 999); do echo Linux; done"),
    "bash printing the answer": plant("/usr/local/bin/bash", "#!/bin/sh\necho 999"),
    ".pth in /usr/local's dist-packages": f"{PY}; d=/usr/local/lib/python$v/dist-packages; mkdir -p $d && "
    "echo 'import os; os._exit(0)' > $d/z.pth",
    ".pth in the user site": f"{PY}; d=~/.local/lib/python$v/site-packages; mkdir -p $d && "
    "echo 'import os; os._exit(0)' > $d/z.pth",
    "sitecustomize in dist-packages": f"{PY}; d=/usr/local/lib/python$v/dist-packages; mkdir -p $d && "
    "echo 'import os; os._exit(0)' > $d/sitecustomize.py",
    "a library named like grep's": "printf garbage > /usr/local/lib/libpcre2-8.so.0; "
    "mkdir -p /usr/local/lib/x86_64-linux-gnu; printf garbage > /usr/local/lib/x86_64-linux-gnu/libc.so.6",
    "/usr/pyvenv.cfg and a fake standard library": f"{PY}; echo 'home = /root/h' > /usr/pyvenv.cfg; "
    "mkdir -p /root/h /root/lib/python$v; cp -r /usr/lib/python$v/encodings /root/lib/python$v/; "
    "printf 'import os\\nos._exit(0)\\n' >> /root/lib/python$v/encodings/__init__.py",
}
"""Plants that made the earlier design's checks (or its ``None`` example) lie."""


@pytest.fixture(scope="module")
def tasks(data_dir: Path) -> dict[str, OSTask]:
    return load(data_dir, [COUNT, "test-2-004", "test-4-016", "test-5-002", "test-6-004", "dev-0003"])


@pytest.fixture(scope="module")
def env(tasks: dict[str, OSTask]) -> Iterator[OSEnv]:
    os_env = OSEnv(list(tasks.values()), CONFIG)
    yield os_env
    os_env.close()


def test_the_untouched_task_scores_as_expected(env: OSEnv) -> None:
    assert episode(env, COUNT, [answer("999")])[:2] == (0.0, 0)
    assert episode(env, COUNT, [answer("3")])[:2] == (1.0, 0)


@pytest.mark.parametrize("name", list(PLANTS))
def test_plants_in_path_site_and_loader_folders_change_nothing(env: OSEnv, name: str) -> None:
    wrong, tampers, observations = episode(env, COUNT, [bash(PLANTS[name]), answer("999")])
    assert wrong == 0.0, observations
    assert tampers > 0, observations
    right, *_ = episode(env, COUNT, [bash(PLANTS[name]), answer("3")])
    assert right == 1.0


def test_pyvenv_cfg_cannot_be_written(env: OSEnv) -> None:
    _, _, observations = episode(env, COUNT, [bash("echo 'home = /tmp' > /usr/pyvenv.cfg; rmdir /usr/pyvenv.cfg")])
    assert "Is a directory" in observations[0] and "Device or resource busy" in observations[0]


@pytest.mark.parametrize(
    "change",
    ["for f in ~/documents/*.txt; do : > $f; done", "rm -rf ~/documents", "sed -i 's/Linux/Unix/I' ~/documents/*"],
)
def test_changing_what_the_example_counts_does_not_change_the_expected_answer(env: OSEnv, change: str) -> None:
    """The expected answer was measured at reset, before the agent could act."""
    assert episode(env, COUNT, [bash(change), answer("0")])[0] == 0.0
    assert episode(env, COUNT, [bash(change), answer("3")])[0] == 1.0


def test_a_background_tracer_cannot_flip_a_python_check(env: OSEnv) -> None:
    reward, _, _ = episode(env, COUNT, [bash(background(TRACER, "from sys import argv")), answer("999")])
    assert reward == 0.0


def test_a_background_tracer_is_gone_before_a_bash_check_runs(env: OSEnv) -> None:
    """test-6-004's check is bash, in the sandbox: every process of the agent's is killed first
    (the tracer never even tries: the check's shell could not be traced anyway)."""
    env.reset(options={"task_id": "test-6-004"})
    env.step(bash(background(TRACER, "videos") + "\necho alive > /tmp/tracer.log"))
    assert env._sandbox is not None and env._task is not None
    env._sandbox.stop()
    assert not score(env._task, env._sandbox, "", env._expected, env.config)
    log = env._sandbox.run("cat /tmp/tracer.log", 5, 10000).output
    env.close()
    assert log == "alive\n"


def test_a_program_the_check_runs_cannot_trace_the_check(env: OSEnv) -> None:
    """dev-0003's check runs the agent's ``calc``: the check's bash and python are execute-only copies,
    which the kernel marks not dumpable, so calc can neither trace its parent nor open its memory."""
    attack = plant("/usr/local/bin/calc", CALC) + f"\ncat > /tmp/t.py <<'EOF'\n{TRACER}\nEOF"
    env.reset(options={"task_id": "dev-0003"})
    env.step(bash(attack + "\nCONTROL=1 bash -c 'calc 1 + 1'"))  # control: under a plain bash, calc succeeds
    assert env._sandbox is not None and env._task is not None
    assert not score(env._task, env._sandbox, "", env._expected, env.config)
    calc = env._sandbox.run("cat /tmp/calc.log", 5, 10000).output.splitlines()
    tracer = env._sandbox.run("cat /tmp/tracer.log", 5, 10000).output.splitlines()
    env.close()
    assert calc == ["seize=0 errno=0 mem=opened", "seize=-1 errno=1 mem=Permission denied"]
    assert tracer and all(line.startswith("seize") and line.endswith("failed errno 1") for line in tracer), tracer


HIJACK = "import os; b'abs(' in open('/proc/self/cmdline', 'rb').read() and (print(True, flush=True), os._exit(0))"
"""A python start-up hook that answers ``True`` for the python the calc checks run."""


@pytest.mark.parametrize(
    "place",
    [
        "$(/usr/bin/python3 -c 'import site; print(site.getsitepackages()[0])')/z.pth",
        "$(/usr/bin/python3 -c 'import site; print(site.getusersitepackages())')/usercustomize.py",
        "$(/usr/bin/python3 -c 'import site; print(site.getusersitepackages())')/z.pth",
    ],
)
def test_python_hooks_do_not_reach_the_python_a_bash_check_runs(env: OSEnv, place: str) -> None:
    """dev-0003's check compares with ``python3 -c "print(abs(...) < 1e-5)"``: its python is the trusted one."""
    hook = HIJACK if place.endswith(".pth") else HIJACK.replace("; b'abs(", "\n_ = b'abs(")
    commands = plant("/usr/local/bin/calc", "#!/bin/sh\necho 12345") + f"\nf={place}; mkdir -p $(dirname $f)\n"
    commands += f"cat > $f <<'EOF'\n{hook}\nEOF\npython3 -c 'print(abs(1))'"
    reward, tampers, observations = episode(env, "dev-0003", [bash(commands), FINISH])
    assert observations[0] == "The output of the OS:\nTrue\n"  # the hook works for the agent's own python
    assert reward == 0.0 and tampers == 1


@pytest.mark.parametrize(
    "bashrc",
    [
        "exit 0",
        "exec true",
        "kill -9 $$",
        "echo-love() { echo 'I love myself.'; }; [() { return 0; }",
        "shopt -s expand_aliases; alias echo-love=\"echo 'I love myself.'\"",
        "return 0",
    ],
)
def test_the_bashrc_a_check_sources_cannot_end_or_rewrite_the_check(env: OSEnv, bashrc: str) -> None:
    """test-2-004 asks for PATH to reach echo-love from ~/.bashrc, which its check sources: the file
    runs in a subshell of the check and only the PATH it leaves is taken over."""
    reward, _, observations = episode(env, "test-2-004", [bash(f"cat > ~/.bashrc <<'EOF'\n{bashrc}\nEOF"), FINISH])
    assert reward == 0.0, observations


def test_the_bashrc_that_solves_test_2_004_still_scores_one(env: OSEnv) -> None:
    actions = expert_actions(env.tasks["test-2-004"], env)
    assert actions is not None
    assert replay_actions(env, "test-2-004", actions).reward == 1.0
    fix = 'echo "export PATH=\\$PATH:$(dirname $(find ~ -name echo-love -perm -u+x))" > ~/.bashrc'
    assert episode(env, "test-2-004", [bash(fix), bash("echo 'exit 0' >> ~/.bashrc"), FINISH])[0] == 0.0
    assert episode(env, "test-2-004", [bash(fix), bash("echo 'return 0' >> ~/.bashrc"), FINISH])[0] == 1.0


@pytest.mark.parametrize(
    ("task_id", "commands", "actions"),
    [
        (
            "test-4-016",  # the file must move: a find that denies it exists must not help
            plant("/usr/local/bin/find", "#!/bin/sh\ncase $1 in /home/user1*) exit 1;; esac\nexit 0"),
            [answer("/home/user1/os/linux/commands/MyPersonalComputer.config")],
        ),
        (
            "test-5-002",  # a wrong date-format, and a date that agrees with it
            plant("/usr/local/bin/date-format", "#!/bin/sh\necho X")
            + "\ncp /usr/local/bin/date-format /usr/local/bin/date",
            [FINISH],
        ),
        ("dev-0003", plant("/usr/local/bin/bash", "#!/bin/sh\nexit 0"), [FINISH]),  # no calc, a bash that passes
        (
            "dev-0003",  # a wrong calc, and a python3 that says it is right
            plant("/usr/local/bin/calc", "#!/bin/sh\necho 12345")
            + "\n"
            + plant("/usr/local/bin/python3", "#!/bin/sh\necho True"),
            [FINISH],
        ),
        ("test-6-004", plant("/usr/local/bin/find", "#!/bin/sh\ntrue"), [FINISH]),  # a find that finds nothing wrong
    ],
)
def test_task_specific_fake_tools_change_nothing(env: OSEnv, task_id: str, commands: str, actions: list[str]) -> None:
    reward, tampers, observations = episode(env, task_id, [bash(commands), *actions])
    assert reward == 0.0, observations
    assert tampers > 0


@pytest.mark.parametrize("task_id", ["test-6-004", "dev-0003", "test-5-002"])
def test_right_solutions_score_one_despite_fake_tools(env: OSEnv, task_id: str) -> None:
    actions = expert_actions(env.tasks[task_id], env)
    assert actions is not None
    fakes = "\n".join(plant(f"/usr/local/bin/{name}", "#!/bin/sh\nexit 1") for name in ("find", "python3", "date"))
    demo = replay_actions(env, task_id, [*actions[:-1], bash(fakes), actions[-1]])
    assert demo.reward == 1.0 and demo.tamper_attempts == 3
