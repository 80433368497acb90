"""The Operating System environment on real AgentBench OS tasks, in a real bubblewrap sandbox."""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from gymnasium.error import ResetNeeded
from gymnasium.utils.env_checker import check_env
from hostile import PAYLOADS, RAW
from os_helpers import CONFIG, SANDBOX_MARKS, answer, bash

from agentloop.config import ConfigError
from agentloop.envs.experts import replay_actions
from agentloop.envs.os import OSEnv, OSEnvConfig, OSTask, load_os_tasks
from agentloop.envs.os.env import parse_action
from agentloop.envs.os.experts import expert_actions
from agentloop.envs.os.sandbox import uid_processes, unreadable_system_dirs
from agentloop.envs.os.tasks import EXCLUDED, host_check_problem

pytestmark = SANDBOX_MARKS


@pytest.fixture(scope="module")
def tasks(data_dir: Path) -> dict[str, OSTask]:
    picked = {}
    for split, ids in (
        ("train", ("train-0000", "train-0027", "train-0028")),
        ("test", ("test-4-017", "test-4-018", "test-6-004")),
        ("dev", ("dev-0000",)),
    ):
        picked.update({t.task.task_id: t for t in load_os_tasks(data_dir, split) if t.task.task_id in ids})
    return picked


@pytest.fixture(scope="module")
def env(tasks: dict[str, OSTask]) -> Iterator[OSEnv]:
    os_env = OSEnv(list(tasks.values()), CONFIG)
    yield os_env
    os_env.close()


def run(env: OSEnv, commands: str, task_id: str = "train-0000") -> str:
    """The observation of ``commands`` as the first action of a fresh episode."""
    env.reset(options={"task_id": task_id})
    observation, *_ = env.step(bash(commands))
    return observation


def test_splits_load_with_ids_and_kinds(data_dir: Path) -> None:
    train, test, dev = (load_os_tasks(data_dir, s) for s in ("train", "test", "dev"))
    assert (len(train), len(test), len(dev)) == (1000, 144 - 13, 26 - 1)  # EXCLUDED: broken in the sandbox
    assert train[42].task.task_id == "train-0042" and dev[7].task.task_id == "dev-0007"
    assert {t.task_set for t in test} == {str(i) for i in range(1, 8)}
    assert sum(t.task_set == "7" for t in test) == 88
    ids = {t.task.task_id for t in [*train, *test, *dev]}
    assert ids.isdisjoint(EXCLUDED) and {"test-6-003", "test-6-007", "test-6-002", "test-6-008"} <= set(EXCLUDED)
    first = train[0]
    assert (first.task.env, first.task.split, first.task.kind) == ("os", "train", "integer-match")
    assert first.checks[0] is None and "int(argv[1])" in first.checks[1].code
    assert {t.task.kind for t in test} == {"match", "integer-match", "string-match", "size-match", "script"}
    q49 = next(t for t in test if t.task.task_id == "test-4-017")
    assert (q49.start, q49.match) == ("var=3.14", "no")


def test_loading_errors_name_the_problem(tmp_path: Path, data_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown os_interaction split 'std'"):
        load_os_tasks(data_dir, "std")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "os_interaction")):
        load_os_tasks(tmp_path, "train")
    (tmp_path / "os_interaction").mkdir()
    with pytest.raises(FileNotFoundError, match="dev.json"):
        load_os_tasks(tmp_path, "dev")


def test_config_validation() -> None:
    OSEnvConfig().validate()
    for bad, field in ((OSEnvConfig(max_turns=0), "max_turns"), (OSEnvConfig(uid_base=0), "uid_base")):
        with pytest.raises(ConfigError, match=field):
            bad.validate()
    with pytest.raises(ConfigError, match="command_timeout_s"):
        OSEnvConfig(command_timeout_s=0).validate()
    with pytest.raises(ConfigError, match="episode_processes"):
        OSEnvConfig(episode_processes=2).validate()
    with pytest.raises(ConfigError, match=r"episode_memory_mb must be at least 576 \(the 7 tmpfs mounts"):
        OSEnvConfig(episode_memory_mb=512).validate()
    OSEnvConfig(episode_memory_mb=256, scratch_mb=16).validate()


def test_python_checks_must_read_only_their_arguments() -> None:
    """They run on the host, so a check that could read files or run code is refused at load time."""
    assert host_check_problem("from sys import argv\nif int(argv[1]) == int(argv[2]): exit(0)\nexit(1)") is None
    for code, problem in (
        ("import os\nos.system('x')", "imports a module other than sys"),
        ("from sys import modules", "imports more than sys.argv"),
        ("import sys\nsys.modules['os']", "attribute modules"),
        ("print(open('/etc/passwd').read())", "uses open"),
        ("().__class__.__base__", "attribute __base__"),
    ):
        assert problem in str(host_check_problem(code)), code


def test_passes_gymnasium_check_env(env: OSEnv) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env, skip_render_check=True)


def test_state_persists_across_commands_of_an_episode(env: OSEnv) -> None:
    observation, info = env.reset(options={"task_id": "train-0000"})
    assert info["task"].task_id == "train-0000" and "Act: bash" in observation and "Act: answer(" in observation
    env.step(bash("cd ~/experiment && count=$(ls | wc -l)\ngreet() { echo hello $1; }"))
    observation, reward, terminated, truncated, info = env.step(bash("pwd; echo $count; greet you"))
    assert observation == "The output of the OS:\n/root/experiment\n3\nhello you\n"
    assert (reward, terminated, truncated, info["invalid"], info["exit_code"]) == (0.0, False, False, False, 0)


@pytest.mark.parametrize("task_id", ["train-0000", "train-0027", "train-0028", "test-4-017", "test-6-004", "dev-0000"])
def test_expert_episode_scores_one(env: OSEnv, task_id: str) -> None:
    actions = expert_actions(env.tasks[task_id], env)
    assert actions is not None
    demo = replay_actions(env, task_id, actions)
    assert (demo.reward, demo.success, demo.terminated, demo.invalid_actions) == (1.0, True, True, 0)


def test_expert_actions_are_in_the_policy_format(env: OSEnv) -> None:
    run_example, give_answer = expert_actions(env.tasks["train-0000"], env)
    assert parse_action(run_example, 8000).body.startswith("find ~/experiment -type f -name")
    assert give_answer == "Think: The output gives the answer.\n\nAct: answer(2)"
    assert expert_actions(env.tasks["test-6-004"], env)[-1].endswith("Act: finish")


@pytest.mark.parametrize(
    ("task_id", "actions"),
    [
        ("train-0000", [answer("3")]),
        ("train-0000", ["Act: finish"]),
        ("test-4-018", [answer("no")]),
        ("test-6-004", ["Act: finish"]),  # the check looks at the system, which is unchanged
    ],
)
def test_wrong_answer_or_no_change_scores_zero(env: OSEnv, task_id: str, actions: list[str]) -> None:
    env.reset(options={"task_id": task_id})
    _, reward, terminated, truncated, info = env.step(actions[0])
    assert (reward, terminated, truncated, info["success"]) == (0.0, True, False, False)


def test_match_answer_is_stripped(env: OSEnv) -> None:
    env.reset(options={"task_id": "test-4-018"})
    assert env.step(answer("  yes \n"))[1] == 1.0


def test_network_is_unreachable(env: OSEnv) -> None:
    observation = run(
        env,
        "python3 -c 'import socket; socket.create_connection((\"1.1.1.1\", 53), timeout=1)' 2>&1 | tail -1; "
        "ip -o link 2>/dev/null | cut -d: -f2; cat /proc/net/dev | tail -n +3 | cut -d: -f1",
    )
    assert "Network is unreachable" in observation
    assert "eth" not in observation and "lo" in observation


def test_system_is_read_only_and_host_files_are_out_of_reach(env: OSEnv, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    canary.write_text("host")
    observation = run(
        env,
        f"for p in /usr/bin/x /etc/x /x /bin/x /lib/x; do touch $p 2>&1; done; rm -f /usr/bin/env 2>&1; "
        f"ls {tmp_path} /work /farm 2>&1; cat /etc/shadow 2>&1; echo w > ~/ok && cat ~/ok",
    )
    for path in ("/usr/bin/x", "/etc/x", "'/x'", "/bin/x", "/lib/x", "/usr/bin/env"):
        assert f"{path}': Read-only file system" in observation or f"{path}: Read-only" in observation, path
    assert "No such file or directory" in observation and "/etc/shadow: Permission denied" in observation
    assert observation.endswith("w\n") and canary.read_text() == "host"
    assert Path("/usr/bin/env").exists()


def test_new_files_in_usr_and_var_are_private_to_the_episode(env: OSEnv) -> None:
    observation = run(
        env, "echo 1 > /usr/agentloop-probe && echo 2 > /var/log/agentloop-probe && cat /usr/agentloop-probe"
    )
    assert observation == "The output of the OS:\n1\n"
    assert not Path("/usr/agentloop-probe").exists() and not Path("/var/log/agentloop-probe").exists()
    assert run(env, "ls /usr/agentloop-probe 2>&1").endswith("No such file or directory\n")


def test_host_folders_root_only_are_covered_so_find_stays_quiet(env: OSEnv) -> None:
    hidden = unreadable_system_dirs()
    listing = " ".join(hidden) or "/etc"
    observation = run(env, f"ls -A {listing}; echo status $?")
    assert observation.endswith("status 0\n") and "Permission denied" not in observation
    assert "Permission denied" not in run(env, "find /etc > /dev/null")


def test_root_inside_cannot_lift_the_limits(env: OSEnv) -> None:
    observation = run(env, "id -u; ulimit -Hu unlimited 2>&1; ulimit -Hv unlimited 2>&1; unshare -r true 2>&1")
    assert observation.startswith("The output of the OS:\n0\n")
    assert observation.count("Operation not permitted") >= 2 and "unshare: unshare failed" in observation
    sandbox_uid = env._lease.uid
    host = [psutil.Process(pid) for pid in uid_processes(sandbox_uid)]
    assert host and all(p.uids().real == sandbox_uid != 0 for p in host)


def test_fork_bomb_is_held_by_the_process_limit(env: OSEnv) -> None:
    env.reset(options={"task_id": "train-0000"})
    observation, *_ = env.step(bash(":(){ :|:& };:\nsleep 0.5"))
    assert isinstance(observation, str)
    live = uid_processes(env._lease.uid)
    assert len(live) <= CONFIG.max_processes
    env.reset(options={"task_id": "train-0000"})
    assert env.step(bash("echo alive"))[0] == "The output of the OS:\nalive\n"


def test_memory_hog_huge_file_cpu_hog_and_endless_loop_are_stopped(env: OSEnv) -> None:
    memory = run(env, "python3 -c 'x = bytearray(1 << 30)'")
    assert "MemoryError" in memory
    file = run(env, "head -c 100000000 /dev/zero > big; ls -l big")
    assert "File size limit exceeded" in file and f" {CONFIG.max_file_mb << 20} " in file
    started = time.monotonic()
    cpu = run(env, "python3 -c 'while True: pass'")
    assert "CPU time limit exceeded" in cpu or "ran longer than" in cpu
    loop = run(env, "x=1; while true; do :; done")
    assert "ran longer than 1 s and was stopped" in loop and "shell did not recover" in loop
    observation, _, _, _, info = env.step(bash("echo ${x:-unset}; sleep 30"))
    assert observation.startswith("The output of the OS:\nunset\n") and info["timed_out"]
    assert env.step(bash("yes"))[0].endswith("printed more than 1 MiB and was stopped, with 1 process it had started.")
    assert time.monotonic() - started < 15


def test_nothing_is_left_behind_after_many_episodes(tasks: dict[str, OSTask]) -> None:
    temp_before = set(os.listdir(tempfile.gettempdir()))
    me = psutil.Process()
    children_before = {p.pid for p in me.children(recursive=True)}
    env = OSEnv([tasks["dev-0000"]], CONFIG)  # its start command leaves a python loop running
    for i in range(20):
        env.reset(options={"task_id": "dev-0000"})
        env.step(bash("sleep 100 & setsid sleep 100 & nohup sleep 100 >/dev/null 2>&1 &"))
        if i % 2:
            env.step(answer("1"))
    uid = env._lease.uid
    env.close()
    assert uid_processes(uid) == []
    new = [p for p in me.children(recursive=True) if p.pid not in children_before]
    assert [p for p in new if p.status() != psutil.STATUS_ZOMBIE] == []
    assert set(os.listdir(tempfile.gettempdir())) <= temp_before


def test_malformed_actions_are_explained_and_cost_a_turn(tasks: dict[str, OSTask]) -> None:
    env = OSEnv([tasks["train-0000"]], OSEnvConfig(max_turns=4))
    try:
        with pytest.raises(ResetNeeded):
            env.step(bash("ls"))
        env.reset()
        for action, message in (
            ("ls -la", 'no "Act:" found'),
            ("Act: bash\nls -la", "```bash"),
            ("Act: answer 42", "parentheses"),
        ):
            observation, reward, terminated, truncated, info = env.step(action)
            assert message in observation and info["invalid"]
            assert (reward, terminated, truncated) == (0.0, False, False)
        observation, reward, terminated, truncated, info = env.step(bash("echo last"))
        assert (reward, terminated, truncated, info["success"], info["invalid"]) == (0.0, False, True, False, False)
        with pytest.raises(ResetNeeded):
            env.step(answer("2"))
    finally:
        env.close()


def test_long_output_is_truncated_with_a_note(env: OSEnv) -> None:
    observation = run(env, "seq 1 5000")
    assert "[output truncated: 23893 bytes, the first 800 characters shown]" in observation
    assert env.observation_space.contains(observation)


def test_hostile_actions_become_observations_without_effects_outside(env: OSEnv, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    canary.write_text("host")
    actions = [*RAW, *(bash(payload) for payload in PAYLOADS)]
    actions += [bash(f"rm -rf {tmp_path}; kill -9 -1; kill -9 1"), bash("exit 3"), bash("exec 1>&-")]
    actions += [bash("kill -STOP $$"), answer("\ud800 \x00 $(id) `id`"), answer(")" * 5000)]
    for action in actions:
        env.reset(options={"task_id": "train-0000"})
        observation, reward, terminated, truncated, info = env.step(action)
        assert isinstance(observation, str) and env.observation_space.contains(observation), repr(action)[:80]
        assert reward == 0.0 and not info["success"]
        if not (terminated or truncated):
            observation, *_ = env.step(bash("echo still here"))
            assert "still here" in observation or "[output truncated" in observation, repr(action)[:80]
    assert canary.read_text() == "host"
    assert Path("/usr/bin/env").exists() and Path("/etc/passwd").exists()


def test_registry_loads_makes_and_builds_experts(data_dir: Path) -> None:
    from agentloop import envs

    tasks = envs.load_tasks("os", data_dir, "dev")[:2]
    env = envs.make_env("os", tasks, OSEnvConfig())
    try:
        observation, info = env.reset(options={"task_id": tasks[0].task.task_id})
        assert info["task"] == tasks[0].task and isinstance(observation, str)
    finally:
        env.close()
    demos, _ = envs.build_experts("os", tasks, OSEnvConfig(), None, seed=0)
    assert demos and all(d.success and d.task.env == "os" for d in demos)
    with pytest.raises(TypeError):
        envs.build_experts("os", tasks, OSEnvConfig(), object(), seed=0)
