"""Whether the Operating System env's bubblewrap sandbox can run here (tests skip it otherwise)."""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import cache


@cache
def why_no_sandbox() -> str | None:
    """``None`` when the sandbox can run, else the reason it cannot."""
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed"
    if os.geteuid() != 0:
        return "the sandbox is launched by root under its own uid"
    probe = ["bwrap", "--unshare-all", "--ro-bind", "/", "/", "--", "/bin/true"]
    if subprocess.run(probe, capture_output=True, timeout=30).returncode != 0:
        return "bwrap cannot create namespaces on this machine (some containers forbid them)"
    return None
