"""The supervisor: pid 1 of every OS sandbox, run by the sandbox's own python3 (``python3 -I -S``).

It is not imported by agentloop: :mod:`agentloop.envs.os.sandbox` passes this file's text on
the supervisor's command line, with its settings as one JSON argument (see
:func:`agentloop.envs.os.sandbox.supervisor_settings`). It uses only the standard library of
whatever python3 the host has, and speaks one JSON object a line over stdin/stdout:

- ``{"op": "run", "cmd", "timeout", "limit", "clean"}`` runs a command in the agent's
  persistent bash. Its output reaches the host through a FIFO made for that command alone,
  so nothing a background process of an earlier command prints can show up in it; the
  shell's own stdout carries only the end marker. When the episode reached its process limit
  (``clean``: the host saw it in ``pids.events``; or the supervisor counts that many
  processes), every process but the shell and the task's own is killed before the command;
  after a command that timed out, printed too much or reached the limit, the same.
- ``{"op": "exec", "language", "code", "args", "trusted", "timeout", "limit"}`` runs a script
  as a fresh process: the task's init and the example whose output is the expected answer,
  in the agent's environment (``trusted`` false), or a check (``trusted``): the execute-only
  interpreters of ``/run/agentloop/bin``, a clean environment with the checks' PATH, and
  ``source`` redefined (``SOURCE_IN_SUBSHELL``).
- ``{"op": "check", ...}`` kills every other process in the sandbox (``kill(-1)`` from pid 1),
  runs a check script as a trusted ``exec``, then kills everything it left.
- ``{"op": "begin"}`` marks the end of the task's setup: the processes alive now are the
  task's (spared by the cleanups above) and the files now present are not plants.
- ``{"op": "stop"}`` kills every other process in the sandbox.

Every reply to ``run`` and ``stop`` lists the new *plants*: files that appeared where they
could change what a check runs (see :func:`scan`), each reported once per episode.
"""

import ctypes
import glob
import json
import os
import re
import select
import signal
import site
import subprocess
import sys
import time

ENV = {"HOME": "/root", "USER": "root", "LOGNAME": "root", "SHELL": "/bin/bash", "TERM": "dumb", "LANG": "C.UTF-8"}
SETTINGS = {}
SOURCE_IN_SUBSHELL = r"""__agentloop_source() {
    local report status
    report=$(exec 3>&1 >/dev/null 2>&1 </dev/null; builtin source "$@"; printf '\n%s:%s' "$?" "$PATH" >&3)
    report=${report##*$'\n'}
    status=${report%%:*}
    [[ $status =~ ^[0-9]+$ ]] || return 1
    PATH="__CHECK_PATH__:${report#*:}"
    return "$status"
}
source() { __agentloop_source "$@"; }
.() { __agentloop_source "$@"; }
"""
"""What a check's bash runs first: ``source FILE`` (or ``. FILE``) runs FILE in a subshell, with
its output discarded, and takes over only the PATH it leaves (after the system folders). A
file sourced by a check (test-2-004 sources ``~/.bashrc``) is part of the answer, so what it
does to PATH counts, but it cannot end the check (an ``exit 0``, an ``exec``) or redefine the
check's commands: a sourced file that ends the shell makes ``source`` fail."""
KILL_BYTES = 1 << 20
shell = None
tracked = set()  # our own children, waited for by their Popen: reap() must leave them alone
spare = {1}  # the task's own processes, alive when the setup ended: cleanups leave them alone
seen = set()  # files in watched folders already looked at
watched = []  # (folder, kind) pairs scan() looks into
SYSTEM = {}  # kind -> the read-only folders whose names a plant of that kind imitates


def live_pids():
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and name != "1":
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    if f.read().rsplit(b")", 1)[1].split()[0] != b"Z":
                        found.append(int(name))
            except (OSError, IndexError):
                pass
    return found


def members(pgid):
    found = []
    for pid in live_pids():
        try:
            if os.getpgid(pid) == pgid:
                found.append(pid)
        except OSError:
            pass
    return found


def kill_all(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def kill_group(pgid):
    for _ in range(200):
        victims = members(pgid)
        if not victims:
            return
        kill_all(victims)
        reap()
        time.sleep(0.002)


def stop_leftovers():
    # Kills every process but the shell and the task's own ones, until none is left
    # (a fork bomb keeps making new ones until its parents are gone); returns how many.
    reap()
    keep = set(spare)
    if shell is not None:
        keep.add(shell.pid)
    killed = set()
    for _ in range(500):
        victims = [pid for pid in live_pids() if pid not in keep]
        if not victims:
            break
        kill_all(victims)
        killed.update(victims)
        reap()
        time.sleep(0.001)
    return len(killed)


def stop_all():
    # kill(-1) from pid 1 signals every other process of the namespace at once (a process
    # with a fatal signal pending cannot fork), then every one is reaped: nothing is left.
    global shell
    for _ in range(100):
        try:
            os.kill(-1, signal.SIGKILL)
        except OSError:
            pass
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break
            except InterruptedError:
                continue
        if not live_pids():
            break
    if shell is not None:
        for stream in (shell.stdin, shell.stdout):
            try:
                stream.close()
            except OSError:
                pass
        shell = None
    tracked.clear()


# reap() runs from the SIGCHLD handler too. Under a fork bomb's storm of signals a handler
# entering a running scan only asks for another pass (nesting scans recursed until
# RecursionError killed the supervisor); passes per call are bounded so that a bomb that
# never stops cannot keep the handler from returning: the next signal or op reaps the rest.
reaping = False
pending = False


def reap():
    global reaping, pending
    pending = True
    if reaping:
        return
    reaping = True
    try:
        for _ in range(3):
            if not pending:
                break
            pending = False
            for name in os.listdir("/proc"):
                if name.isdigit() and int(name) not in tracked:
                    try:
                        with open(f"/proc/{name}/stat") as f:
                            stat = f.read().rsplit(")", 1)[1].split()
                        if stat[0] == "Z" and stat[1] == "1":
                            os.waitpid(int(name), os.WNOHANG)
                    except (OSError, IndexError, ChildProcessError):
                        pass
    finally:
        reaping = False


def over_limit():
    # Within a few processes of the limit (pid 1 and bwrap outside are not listed; threads count too).
    return len(live_pids()) + 4 >= SETTINGS["process_limit"]


def child_setup():
    # Every process but pid 1 is the first the kernel kills when the episode is out of memory.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass


def spawn(argv, **options):
    # Our children have parent pid 1 like orphans: SIGCHLD is held until the child is tracked,
    # so the orphan reaper can never take the exit status its Popen waits for.
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
    try:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd="/root",
            start_new_session=True,
            preexec_fn=child_setup,
            **options,
        )
        tracked.add(proc.pid)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])
    return proc


def start_shell():
    global shell
    shell = spawn(["/bin/bash", "--noprofile", "--norc"], stdin=subprocess.PIPE, env=ENV)


def stop_shell():
    global shell
    if shell is not None:
        kill_all([shell.pid])
        shell.wait()
        tracked.discard(shell.pid)
        for stream in (shell.stdin, shell.stdout):
            stream.close()
        shell = None


def quote(text):
    out = []
    for byte in text.encode("utf-8", "replace"):
        ch = chr(byte)
        if ch == "\\" or ch == "'":
            out.append("\\" + ch)
        elif 32 <= byte < 127:
            out.append(ch)
        else:
            out.append(f"\\x{byte:02x}")
    return "$'" + "".join(out) + "'"


class Output:
    def __init__(self, limit):
        self.head, self.total, self.limit = bytearray(), 0, limit

    def add(self, chunk):
        if len(self.head) < self.limit:
            self.head += chunk[: self.limit - len(self.head)]
        self.total += len(chunk)

    def drain(self, fd, most):
        while most > 0:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                return
            self.add(chunk)
            most -= len(chunk)

    def text(self):
        return bytes(self.head).decode("utf-8", "replace")


def run(request):
    stopped_before = stop_leftovers() if request["clean"] or over_limit() else 0
    if shell is None or shell.poll() is not None:
        stop_shell()
        start_shell()
    token = os.urandom(12).hex()
    fifo = f"{SETTINGS['io']}/{token}"
    os.chmod(SETTINGS["io"], 0o700)  # the agent (same uid) may have changed it
    os.mkfifo(fifo, 0o600)
    out_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    keep_fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # no EOF until we close it
    try:
        script = f"{{ eval {quote(request['cmd'])}\n}} </dev/null >{fifo} 2>&1\nprintf '\\n%s:%d\\n' {token} \"$?\"\n"
        try:
            shell.stdin.write(script.encode())
            shell.stdin.flush()
        except OSError:
            pass
        reply = collect(out_fd, token, request)
    finally:
        os.close(out_fd)
        os.close(keep_fd)
        try:
            os.unlink(fifo)
        except OSError:
            pass
    reply["stopped_before"] = stopped_before
    if reply["code"] is None:
        if shell.poll() is None:
            reply["restarted"] = True
        else:
            reply["exited"] = shell.returncode
        stop_shell()
        start_shell()
    elif over_limit():
        reply["stopped_after"] += stop_leftovers()
    reply["plants"] = scan()
    return reply


def collect(out_fd, token, request):
    # Reads the command's output until the shell prints the marker; stops the command at
    # its time limit or past KILL_BYTES, then gives the shell one more second to recover.
    marker = re.compile(b"\n" + token.encode() + b":(-?\\d+)\n")
    shell_fd = shell.stdout.fileno()
    output, said = Output(request["limit"]), b""
    reply = {"code": None, "timeout": False, "overflow": False, "restarted": False, "exited": None}
    reply["stopped_after"] = 0
    deadline, stopped = time.monotonic() + request["timeout"], False
    while True:
        left = deadline - time.monotonic()
        if not stopped and (left <= 0 or output.total > KILL_BYTES):
            reply["timeout"], reply["overflow"] = left <= 0, output.total > KILL_BYTES
            reply["stopped_after"] = stop_leftovers()
            deadline, stopped = time.monotonic() + 1.0, True
            continue
        if stopped and left <= 0:
            break
        ready = select.select([out_fd, shell_fd], [], [], min(max(left, 0), 0.2))[0]
        if not ready:
            reap()
        if out_fd in ready:
            output.drain(out_fd, 1 << 20)
        if shell_fd in ready:
            chunk = os.read(shell_fd, 65536)
            if not chunk:
                break
            said = (said + chunk)[-4096:]
            found = marker.search(said)
            if found:
                output.drain(out_fd, 1 << 20)  # what the command wrote before it ended
                reply["code"] = int(found.group(1))
                break
    reply["out"], reply["total"] = output.text(), output.total
    return reply


def execute(request):
    trusted = request["trusted"]
    tools = SETTINGS["tools"]
    if request["language"] == "python":
        argv = [tools + "/python3" if trusted else "/usr/bin/python3", "-c", request["code"], *request["args"]]
    else:
        code = SOURCE_IN_SUBSHELL + request["code"] if trusted else request["code"]
        argv = [tools + "/bash" if trusted else "/bin/bash", "-c", code, "script", *request["args"]]
    env = dict(ENV, PATH=SETTINGS["check_path"], PYTHONSAFEPATH="1", PYTHONNOUSERSITE="1") if trusted else ENV
    proc = spawn(argv, stdin=subprocess.DEVNULL, env=env)
    output, fd = Output(request["limit"]), proc.stdout.fileno()
    deadline, expired, overflow = time.monotonic() + request["timeout"], False, False
    while True:
        if proc.poll() is not None and not select.select([fd], [], [], 0)[0]:
            break
        left = deadline - time.monotonic()
        if left <= 0 or output.total > KILL_BYTES:
            expired, overflow = left <= 0, output.total > KILL_BYTES
            kill_group(proc.pid)
            break
        if select.select([fd], [], [], min(left, 0.01))[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            output.add(chunk)
    code = proc.wait()
    tracked.discard(proc.pid)
    proc.stdout.close()  # background children it left keep running, as after docker exec
    return {
        "out": output.text(),
        "total": output.total,
        "code": None if expired else code,
        "timeout": expired,
        "overflow": overflow,
    }


def check(request):
    stop_all()
    reply = execute(dict(request, trusted=True))
    stop_all()
    return reply


def begin(request):
    spare.update(live_pids())
    scan()
    return {}


def stop(request):
    stop_all()
    return {"plants": scan()}


def writable(path):
    while not os.path.isdir(path):
        path = os.path.dirname(path)
    return not os.statvfs(path).f_flag & os.ST_RDONLY


def loader_dirs():
    dirs, todo = [], ["/etc/ld.so.conf"]
    while todo:
        try:
            with open(todo.pop()) as f:
                lines = [line.split("#")[0].strip() for line in f]
        except OSError:
            continue
        for line in lines:
            if line.startswith("include "):
                todo += sorted(glob.glob(line.split(None, 1)[1]))
            elif line.startswith("/"):
                dirs.append(line)
    return dirs + ["/lib", "/usr/lib", "/lib64", "/usr/lib64"]


def watch_folders():
    # Where a file written in the episode could change what a check runs: folders of PATH
    # before the system ones, python's site folders, the dynamic loader's folders. Each
    # writable one is watched; a file there counts as a plant when it is named like a
    # program of the read-only PATH folders, like a library of the read-only loader folders,
    # or is one of python's start-up hooks (*.pth, sitecustomize, usercustomize).
    path, libraries = ENV["PATH"].split(":"), loader_dirs()
    user_site = "/root/.local/lib/python{}.{}/site-packages".format(*sys.version_info[:2])
    folders = [(d, "program") for d in path if writable(d)]
    folders += [(d, "python") for d in [*site.getsitepackages(), user_site] if writable(d)]
    folders += [(d, "library") for d in libraries if writable(d)]
    system = {"program": [d for d in path if not writable(d)], "library": [d for d in libraries if not writable(d)]}
    return folders, system


def scan():
    new = []
    for folder, kind in watched:
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            path = f"{folder}/{name}"
            if path in seen:
                continue
            seen.add(path)
            if kind == "python":
                if name.endswith(".pth") or name.split(".")[0] in ("sitecustomize", "usercustomize"):
                    new.append(f"{path}: a python start-up hook")
            elif not os.path.isdir(path) and any(os.path.lexists(f"{d}/{name}") for d in SYSTEM[kind]):
                new.append(f"{path}: named like a system {kind}")
    return new


def main():
    global KILL_BYTES, SOURCE_IN_SUBSHELL
    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: the agent cannot trace us or open our pipes
    SETTINGS.update(json.loads(sys.argv[1]))
    ENV["PATH"] = SETTINGS["path"]
    KILL_BYTES = SETTINGS["kill_bytes"]
    SOURCE_IN_SUBSHELL = SOURCE_IN_SUBSHELL.replace("__CHECK_PATH__", SETTINGS["system_path"])
    folders, system = watch_folders()
    watched.extend(folders)
    SYSTEM.update(system)
    for name in os.listdir("/etc/skel"):  # a home like a fresh Ubuntu root's: .bashrc, .profile
        try:
            with open("/etc/skel/" + name, "rb") as src, open("/root/" + name, "wb") as dst:
                dst.write(src.read())
        except OSError:
            pass
    signal.signal(signal.SIGCHLD, lambda *_: reap())  # as init: orphans are reaped at once, their pids freed
    start_shell()
    sys.stdout.write('{"ready": true}\n')
    sys.stdout.flush()
    ops = {"run": run, "exec": execute, "check": check, "begin": begin, "stop": stop}
    for line in sys.stdin:
        request = json.loads(line)
        reply = ops[request["op"]](request)
        reap()
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
