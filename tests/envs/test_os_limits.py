"""The OS environment's episode-wide limits (cgroups), and commands whose output is only their own."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from os_helpers import CONFIG, SANDBOX_MARKS, answer, bash, load, need_cgroups

from agentloop.envs.os import OSEnv, OSEnvConfig, OSTask, cgroups
from agentloop.envs.os import sandbox as sandbox_module
from agentloop.envs.os.cgroups import PREFIX, EpisodeCgroup, Hierarchy, find_hierarchies, hierarchies
from agentloop.envs.os.sandbox import uid_processes

pytestmark = SANDBOX_MARKS

LIMITS = OSEnvConfig(
    command_timeout_s=2.0,
    script_timeout_s=5.0,
    cpu_time_s=5,
    max_processes=64,
    episode_processes=40,
    memory_mb=256,
    episode_memory_mb=320,
    scratch_mb=16,
    max_file_mb=16,
)
"""Limits small enough to hit: 40 processes, 320 MiB for the whole episode, 7 tmpfs mounts of 16 MiB."""
OUTPUT = "The output of the OS:\n"


@pytest.fixture(scope="module")
def tasks(data_dir: Path) -> dict[str, OSTask]:
    return load(data_dir, ["train-0000", "dev-0000"])


@pytest.fixture(scope="module")
def env(tasks: dict[str, OSTask]) -> Iterator[OSEnv]:
    os_env = OSEnv([tasks["train-0000"]], LIMITS)
    yield os_env
    os_env.close()


def start(env: OSEnv) -> EpisodeCgroup:
    need_cgroups()
    env.reset(options={"task_id": "train-0000"})
    assert env._sandbox is not None and env._sandbox.cgroup is not None
    return env._sandbox.cgroup


def test_every_process_of_the_sandbox_is_in_its_groups_and_oom_prefers_the_agents(env: OSEnv) -> None:
    group = start(env)
    env.step(bash("sleep 30 & setsid sleep 30 & sleep 0.1"))
    assert env._lease is not None
    live = {psutil.Process(pid) for pid in uid_processes(env._lease.uid)}
    assert len(live) == 5 and {p.pid for p in live} <= group.pids()
    (bwrap,) = [p for p in live if p.name() == "bwrap"]
    (supervisor,) = bwrap.children()
    scores = {p.pid: Path(f"/proc/{p.pid}/oom_score_adj").read_text().strip() for p in live}
    assert scores.pop(bwrap.pid) == scores.pop(supervisor.pid) == "0"
    assert set(scores.values()) == {"1000"}  # the shell, the sleeps: the kernel's first choice


def test_memory_is_bounded_for_the_episode_as_a_whole(env: OSEnv) -> None:
    """Three processes of 150 MiB each pass the per-process limit (256 MiB) but not the episode's (320 MiB)."""
    group = start(env)
    hog = 'python3 -c \'import time; x = b"x" * (150 << 20); time.sleep(1); print("survived")\''
    observation, *_ = env.step(bash(f"for i in 1 2 3; do {hog} & done; wait; echo done"))
    peak = group.memory_peak()
    assert peak is not None and peak <= LIMITS.episode_memory_mb << 20
    assert group.oom_kills() >= 1 and observation.count("\nsurvived") < 3 and "done" in observation
    assert env.step(bash("echo alive"))[0] == f"{OUTPUT}alive\n"


def test_tmpfs_mounts_and_processes_share_the_episodes_memory(env: OSEnv) -> None:
    """Files in the 7 tmpfs mounts count against the episode's memory: a process cannot add past it."""
    group = start(env)
    fill = "for d in /root /home /tmp /var /usr/local /dev/shm /usr; do head -c 15M /dev/zero > $d/fill; done"
    assert env.step(bash(f"{fill}; cat /*/fill /usr/*/fill /dev/shm/fill | wc -c"))[0] == f"{OUTPUT}{7 * 15 << 20}\n"
    observation, *_ = env.step(bash("head -c 2M /dev/zero > /tmp/more; echo status $?"))
    assert "No space left on device" in observation and "status 1" in observation
    hog = 'python3 -c \'x = b"x" * (230 << 20); print("survived")\''
    observation, *_ = env.step(bash(f"{hog}; echo status $?"))
    assert "\nsurvived" not in observation and "status 137" in observation
    peak = group.memory_peak()
    assert peak is not None and peak <= LIMITS.episode_memory_mb << 20 and group.oom_kills() >= 1
    assert env.step(bash("cat /tmp/fill | wc -c"))[0] == f"{OUTPUT}{15 << 20}\n"


@pytest.mark.parametrize(
    "bomb",
    [
        ":(){ :|:& };:",
        "setsid bash -c ':(){ :|:& };:' &",
        "setsid bash -c 'while :; do sleep 100 & done' &",  # keeps every process slot taken
    ],
)
def test_a_fork_bomb_is_held_and_the_next_command_sees_only_its_own_output(env: OSEnv, bomb: str) -> None:
    group = start(env)
    env.step(bash(bomb))
    time.sleep(1.0)
    assert group.pids_limit_hits() > 0
    assert int((group.groups["pids"] / "pids.current").read_text()) <= LIMITS.episode_processes
    observation, *_ = env.step(bash("echo hello; /bin/pwd; ls -d /tmp"))
    own = f"{OUTPUT}hello\n/root\n/tmp\n"
    note = "\nBefore this command, the processes of earlier commands reached the process limit: "
    assert observation == own or observation.startswith(own + note)  # a bomb that died out leaves no note
    assert observation.startswith(own + note) or "sleep 100" not in bomb  # this one never dies out
    assert env.step(bash("echo again; ps -e | wc -l"))[0] == f"{OUTPUT}again\n5\n"


def test_a_fork_bomb_in_the_foreground_is_stopped_with_the_command(env: OSEnv) -> None:
    start(env)
    observation, _, _, _, info = env.step(bash(":(){ :|:; };:"))
    assert info["timed_out"] and "and was stopped, with" in observation
    assert env.step(bash("echo hello"))[0] == f"{OUTPUT}hello\n"


def test_what_background_processes_print_later_reaches_no_other_command(env: OSEnv) -> None:
    env.reset(options={"task_id": "train-0000"})
    env.step(bash("(sleep 0.5; echo LATE) & (while :; do echo noise; sleep 0.1; done) & yes >&2 &"))
    assert env.step(bash("sleep 1; echo second"))[0] == f"{OUTPUT}second\n"
    assert env.step(bash("echo third"))[0] == f"{OUTPUT}third\n"


def test_processes_a_timed_out_command_left_are_stopped(env: OSEnv) -> None:
    env.reset(options={"task_id": "train-0000"})
    observation, _, _, _, info = env.step(bash("sleep 30 & setsid sleep 40 & nohup sleep 50 & sleep 100"))
    assert info["timed_out"] and "was stopped, with 4 processes it had started." in observation
    assert env.step(bash("ps -e -o comm= | grep -c sleep"))[0] == f"{OUTPUT}0\n"


def test_the_supervisors_folders_cannot_be_taken_away(env: OSEnv) -> None:
    env.reset(options={"task_id": "train-0000"})
    env.step(
        bash(
            "chmod 000 /run/agentloop-io /run/agentloop; rm -rf /run/agentloop-io /run/agentloop; mv /run/agentloop /x"
        )
    )
    assert env.step(bash("echo fine; ls /run/agentloop/bin"))[0] == f"{OUTPUT}fine\nbash\npython3\n"


def test_the_tasks_own_processes_survive_the_cleanups(tasks: dict[str, OSTask]) -> None:
    env = OSEnv([tasks["dev-0000"]], LIMITS)  # its start command leaves a python loop running
    try:
        env.reset(options={"task_id": "dev-0000"})
        env.step(bash("sleep 100"))  # times out
        assert env.step(bash("ps -e -o comm= | grep -c python3"))[0] == f"{OUTPUT}2\n"  # the loop and pid 1
    finally:
        env.close()


def test_no_group_is_left_after_many_episodes(tasks: dict[str, OSTask]) -> None:
    need_cgroups()

    def mine() -> set[Path]:
        return {p for h in hierarchies().values() for p in h.parent.glob(f"{PREFIX}{os.getpid()}-*")}

    before = mine()  # the module's env holds one sandbox
    env = OSEnv([tasks["train-0000"]], LIMITS)
    for i in range(8):
        env.reset(options={"task_id": "train-0000"})
        env.step(bash("sleep 100 & setsid sleep 100 & :(){ :|:& };:"))
        assert len(mine() - before) == len(hierarchies())  # this episode's own groups
        if i % 2:
            env.step(answer("1"))
    env.close()
    assert mine() == before


KILLED_HOST = """
import os, sys
from pathlib import Path
from agentloop.envs.os import OSEnv, OSEnvConfig, load_os_tasks
env = OSEnv(load_os_tasks(Path(sys.argv[1]), "train")[:1], OSEnvConfig())
env.reset(options={"task_id": "train-0000"})
env.step("Act: bash\\n```bash\\nsleep 100 & setsid sleep 100 &\\n```")
print(env._sandbox.cgroup.name, env._lease.uid, flush=True)
os.kill(os.getpid(), 9)
"""
"""A host process killed with its sandbox running: it cannot remove its groups itself."""


def test_groups_of_a_host_process_that_was_killed_are_removed_by_the_next(data_dir: Path) -> None:
    need_cgroups()
    host = subprocess.run([sys.executable, "-c", KILLED_HOST, str(data_dir)], capture_output=True, text=True)
    name, uid = host.stdout.split()
    groups = [h.parent / name for h in hierarchies().values()]
    assert host.returncode == -9 and all(group.exists() for group in groups)
    alive = f"{PREFIX}{os.getpid()}-{cgroups.owner_start_time(os.getpid())}-999"  # ours: must stay
    for hierarchy in hierarchies().values():
        (hierarchy.parent / alive).mkdir()
    try:
        assert cgroups.remove_stale_groups(hierarchies().values()) >= len(hierarchies())  # what a new host does first
        assert not any(group.exists() for group in groups)
        deadline = time.monotonic() + 5.0  # a killed process leaves its group before it has finished exiting
        while uid_processes(int(uid)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert uid_processes(int(uid)) == []
        assert all((h.parent / alive).exists() for h in hierarchies().values())
    finally:
        for hierarchy in hierarchies().values():
            (hierarchy.parent / alive).rmdir()


def test_hierarchies_are_found_for_v1_and_v2(tmp_path: Path) -> None:
    v1 = (
        "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
        "39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
    )
    found = find_hierarchies(v1, "8:pids:/\n4:memory:/jobs/a\n0::/\n")
    assert found == {
        "memory": Hierarchy("memory", 1, Path("/sys/fs/cgroup/memory/jobs/a")),
        "pids": Hierarchy("pids", 1, Path("/sys/fs/cgroup/pids")),
    }
    (tmp_path / "app.slice").mkdir()
    (tmp_path / "app.slice" / "cgroup.controllers").write_text("cpu io memory pids\n")
    v2 = f"30 23 0:26 / {tmp_path} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    found = find_hierarchies(v2, "0::/app.slice\n")
    assert found == {"memory": Hierarchy("memory", 2, tmp_path), "pids": Hierarchy("pids", 2, tmp_path)}
    group = EpisodeCgroup(300 << 20, 50, available=found)  # made beside our own group, with v2's files
    made = tmp_path / group.name
    assert (made / "memory.max").read_text() == str(300 << 20) and (made / "pids.max").read_text() == "50"
    assert group.procs_files == [str(made / "cgroup.procs")]


def test_without_cgroups_the_sandbox_falls_back_to_prlimit_and_says_what_is_lost(
    tasks: dict[str, OSTask], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(cgroups, "find_hierarchies", lambda *_: {})
    with caplog.at_level(logging.WARNING):
        assert cgroups._probe.__wrapped__() == {}  # the probe itself, uncached
    assert "total memory (processes and tmpfs together) is NOT bounded" in caplog.text
    assert "bounded only by RLIMIT_NPROC" in caplog.text
    monkeypatch.setattr(sandbox_module, "hierarchies", lambda: {})
    env = OSEnv([tasks["train-0000"]], CONFIG)
    try:
        env.reset(options={"task_id": "train-0000"})
        assert env._sandbox is not None and env._sandbox.cgroup is None
        env.step(bash(":(){ :|:& };:"))
        time.sleep(0.5)
        assert env._lease is not None and len(uid_processes(env._lease.uid)) <= CONFIG.max_processes
        observation, *_ = env.step(bash("echo hello"))
        assert observation.startswith(f"{OUTPUT}hello\n")
        assert env.step(answer("2"))[1] == 1.0
    finally:
        env.close()
