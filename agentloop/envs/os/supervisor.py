"""The supervisor: pid 1 of every OS sandbox, run by the sandbox's own python3 (``python3 -I -S``).

It is not imported by agentloop: :mod:`agentloop.envs.os.sandbox` passes this file's text on
the supervisor's command line, with the sandbox's ``PATH`` and the output limit as arguments.
It speaks one JSON object a line over stdin/stdout with the host: ``{"op": "run", "cmd",
"timeout", "limit"}`` runs a command in the agent's persistent bash; ``{"op": "exec", "argv",
"timeout", "limit"}`` runs a script as a fresh process. It uses only the standard library of
whatever python3 the host has.
"""

import ctypes
import json
import os
import re
import select
import signal
import subprocess
import sys
import time

ENV = {"HOME": "/root", "USER": "root", "LOGNAME": "root", "SHELL": "/bin/bash", "TERM": "dumb", "LANG": "C.UTF-8"}
KILL_BYTES = 1 << 20
shell = None
tracked = set()  # our own children, waited for by their Popen: reap() must leave them alone


def members(pgid):
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != 1:
            try:
                if os.getpgid(int(name)) == pgid:
                    found.append(int(name))
            except OSError:
                pass
    return found


def kill_group(pgid, spare=()):
    for _ in range(50):
        victims = [p for p in members(pgid) if p not in spare]
        if not victims:
            return
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        reap()
        time.sleep(0.005)


def reap():
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in tracked:
            try:
                with open(f"/proc/{name}/stat") as f:
                    stat = f.read().rsplit(")", 1)[1].split()
                if stat[0] == "Z" and stat[1] == "1":
                    os.waitpid(int(name), os.WNOHANG)
            except (OSError, IndexError, ChildProcessError):
                pass


def start_shell():
    global shell
    shell = subprocess.Popen(
        ["/bin/bash", "--noprofile", "--norc"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd="/root",
        env=ENV,
        start_new_session=True,
    )
    tracked.add(shell.pid)


def stop_shell():
    global shell
    if shell is not None:
        kill_group(shell.pid)
        shell.wait()
        tracked.discard(shell.pid)
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


def collect(fd, deadline, limit, on_expire, marker=None, proc=None):
    # Reads fd until EOF, the marker, or (given proc) proc's exit and what it left in the pipe;
    # returns (head, total, found, expired, overflow).
    head, tail, total, expired, overflow = bytearray(), b"", 0, False, False
    while True:
        if proc is not None and proc.poll() is not None and not select.select([fd], [], [], 0)[0]:
            return bytes(head), total, None, expired, overflow
        left = deadline - time.monotonic()
        if left <= 0 or (total > KILL_BYTES and not overflow):
            if expired:
                return bytes(head), total, None, True, overflow
            overflow = overflow or total > KILL_BYTES
            expired = left <= 0
            on_expire()
            deadline = time.monotonic() + 1.0
            continue
        ready, _, _ = select.select([fd], [], [], min(left, 0.2 if proc is None else 0.01))
        if not ready:
            if proc is None:
                reap()
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return bytes(head), total, None, expired, overflow
        window = tail + chunk
        start = total - len(tail)
        total += len(chunk)
        if len(head) < limit:
            head += chunk[: limit - len(head)]
        if marker is not None:
            found = marker.search(window)
            if found:
                end = start + found.start()
                return bytes(head[:end]), end, int(found.group(1)), expired, overflow
        tail = window[-64:]


def run(request):
    if shell is None or shell.poll() is not None:
        stop_shell()
        start_shell()
    token = os.urandom(12).hex()
    marker = re.compile(b"\n" + token.encode() + b":(-?\\d+)\n")
    script = f"eval {quote(request['cmd'])} </dev/null\nprintf '\\n%s:%d\\n' {token} \"$?\"\n"
    try:
        shell.stdin.write(script.encode())
        shell.stdin.flush()
    except OSError:
        pass
    deadline = time.monotonic() + request["timeout"]
    pgid = shell.pid
    head, total, code, expired, overflow = collect(
        shell.stdout.fileno(), deadline, request["limit"], lambda: kill_group(pgid, spare={pgid}), marker
    )
    reply = {
        "out": head.decode("utf-8", "replace"),
        "total": total,
        "code": code,
        "timeout": expired,
        "overflow": overflow,
        "restarted": False,
        "exited": None,
    }
    if code is None:
        if shell.poll() is None:
            reply["restarted"] = True
        else:
            reply["exited"] = shell.returncode
        stop_shell()
        start_shell()
    return reply


def execute(request):
    proc = subprocess.Popen(
        request["argv"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd="/root",
        env=ENV,
        start_new_session=True,
    )
    tracked.add(proc.pid)
    deadline = time.monotonic() + request["timeout"]
    head, total, _, expired, overflow = collect(
        proc.stdout.fileno(), deadline, request["limit"], lambda: kill_group(proc.pid), proc=proc
    )
    if expired or overflow:
        kill_group(proc.pid)
    code = proc.wait()
    tracked.discard(proc.pid)
    proc.stdout.close()  # background children it left keep running, as after docker exec
    return {
        "out": head.decode("utf-8", "replace"),
        "total": total,
        "code": None if expired else code,
        "timeout": expired,
        "overflow": overflow,
    }


def main():
    global KILL_BYTES
    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: the agent cannot trace us or open our pipes
    ENV["PATH"] = sys.argv[1]
    KILL_BYTES = int(sys.argv[2])
    for name in os.listdir("/etc/skel"):  # a home like a fresh Ubuntu root's: .bashrc, .profile
        try:
            with open("/etc/skel/" + name, "rb") as src, open("/root/" + name, "wb") as dst:
                dst.write(src.read())
        except OSError:
            pass
    start_shell()
    sys.stdout.write('{"ready": true}\n')
    sys.stdout.flush()
    for line in sys.stdin:
        request = json.loads(line)
        reply = run(request) if request["op"] == "run" else execute(request)
        reap()
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
