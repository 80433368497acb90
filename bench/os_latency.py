"""Measures the Operating System environment's per-command overhead over plain ``bash -c``, and its reset time.

    python bench/os_latency.py [repeats]      # as root, with bubblewrap installed

For each command below, times ``subprocess.run(["bash", "-c", command])`` on the host and
``OSEnv.step`` with the same command in an episode's sandbox (the step includes parsing the
action, the round trip to the sandbox and formatting the observation), and prints both
medians, their difference (the overhead; issue 3's target is at most 20 ms) and the ratio.
Then times ``reset`` (a new sandbox with its cgroups, the task's init and start, the expected
answer of a ``None`` check), an episode's end (stopping the agent's processes, scoring, killing
the sandbox and removing its cgroups), and the supervisor's plant scan that runs after every
command (``scan`` of ``agentloop/envs/os/supervisor.py``, timed inside a sandbox with the
sandbox's python: with nothing new, and with 50 new files to look at).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from agentloop.envs.os import OSEnv, OSEnvConfig, load_os_tasks
from agentloop.envs.os.sandbox import SANDBOX_PATH, supervisor_settings, supervisor_source

TARGET_MS = 20.0
PLAIN_ENV = {"PATH": SANDBOX_PATH, "HOME": "/tmp", "LANG": "C.UTF-8"}
"""The host commands see the sandbox's PATH, so both sides run the same binaries."""
COMMANDS = ["true", "echo hello", "ls /usr/bin | wc -l", "cd /tmp && pwd", "python3 -c 'print(1)'"]


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def time_plain(command: str, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(["bash", "-c", command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=PLAIN_ENV)
        samples.append(time.perf_counter() - started)
    return median_ms(samples)


def time_env(env: OSEnv, command: str, repeats: int) -> float:
    samples = []
    env.reset(options={"task_id": "train-0000"})
    for _ in range(repeats):  # max_turns is far above ``repeats``: one episode serves them all
        started = time.perf_counter()
        env.step(f"Act: bash\n```bash\n{command}\n```")
        samples.append(time.perf_counter() - started)
    return median_ms(samples)


SCAN_TIMER = """
import json, time
SETTINGS.update(json.loads(SETTINGS_JSON))
ENV["PATH"] = SETTINGS["path"]
folders, system = watch_folders()
watched.extend(folders)
SYSTEM.update(system)
def timed(fresh):
    samples = []
    for _ in range(REPEATS):
        if fresh:
            seen.clear()
        started = time.perf_counter()
        scan()
        samples.append(time.perf_counter() - started)
    return sorted(samples)[len(samples) // 2] * 1000
scan()
quiet = timed(False)
for i in range(50):
    open(f"/usr/local/bin/tool{i}", "w").close()
print(f"{quiet:.3f} {timed(True):.3f} {len(watched)}")
"""


def time_scan(env: OSEnv, repeats: int) -> tuple[float, float, int]:
    """Median ms of the supervisor's plant scan, inside a sandbox: nothing new, 50 new files; folders watched."""
    module = supervisor_source().replace('if __name__ == "__main__":\n    main()', "")
    settings = json.dumps(supervisor_settings(env.config))
    program = f"SETTINGS_JSON = {settings!r}\nREPEATS = {repeats * 10}\n{module}\n{SCAN_TIMER}"
    env.reset(options={"task_id": "train-0000"})
    command = f"cat > /tmp/scan.py <<'EOF'\n{program}\nEOF\n/usr/bin/python3 -I -S /tmp/scan.py"
    assert env._sandbox is not None  # the program is longer than an action may be: run it directly
    quiet, busy, folders = env._sandbox.run(command, 60, 10000).output.split()[-3:]
    return float(quiet), float(busy), int(folders)


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    data_dir = Path(os.environ.get("AGENTLOOP_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    tasks = load_os_tasks(data_dir, "train")[:1]
    env = OSEnv(tasks, OSEnvConfig(max_turns=1000))
    overheads = []
    print(f"{'command':<26} {'bash -c':>9} {'env step':>9} {'overhead':>9} {'ratio':>6}")
    for command in COMMANDS:
        plain, stepped = time_plain(command, repeats), time_env(env, command, repeats)
        overheads.append(stepped - plain)
        print(f"{command:<26} {plain:8.2f}ms {stepped:8.2f}ms {stepped - plain:+8.2f}ms {stepped / plain:6.2f}")
    overhead = statistics.median(overheads)
    print(f"median overhead per command {overhead:+.2f} ms = {overhead / TARGET_MS:.2f} x target ({TARGET_MS:g} ms)")
    resets, ends = [], []
    for _ in range(max(repeats // 2, 5)):
        started = time.perf_counter()
        env.reset(options={"task_id": "train-0000"})
        resets.append(time.perf_counter() - started)
        started = time.perf_counter()
        env.step("Act: finish")
        ends.append(time.perf_counter() - started)
    quiet, busy, folders = time_scan(env, repeats)
    env.close()
    print(f"reset (sandbox start + init) median {median_ms(resets):.1f} ms")
    print(f"episode end (score + kill) median {median_ms(ends):.1f} ms")
    print(f"plant scan after each command ({folders} folders): {quiet:.3f} ms, {busy:.3f} ms with 50 new files")


if __name__ == "__main__":
    main()
