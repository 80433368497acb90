"""A corpus of hostile or broken actions, shared by every environment's tests.

Each environment must answer every one of these with an observation (never an exception)
and let none of them change anything outside the episode. ``RAW`` are whole actions as a
model might emit them; ``PAYLOADS`` are contents an environment's tests wrap in its own
action syntax (an SQL block, a bash block, ``search[...]``, an ALFWorld command), so the
payload reaches the part of the environment that interprets it.
"""

from __future__ import annotations

RAW: list[object] = [
    "",
    " \n\t ",
    "x" * 100_000,
    "\x00\x01\xff" * 50,
    b"Action: Answer",  # bytes, not text
    None,
    12345,
    "éß漢字🙂 \ud800 lone surrogate",
    "\u202eRTL override\u200b zero width",
    "Action: Opération\n```sql\nSELECT 1\n```",
    "Act: bash\n```bash\nls\n```",
    "Action:" * 5000,
    "[" * 3000,
    "search[" + "]" * 500,
    "click[",
    "{{config}} %s %n ${HOME} $(id) `id`",
]

PAYLOADS: list[str] = [
    "",
    "x" * 100_000,
    "a\x00b",
    "éß漢字🙂",
    "\ud800",
    "'; DROP TABLE items; --",
    '" OR 1=1 --',
    "$(rm -rf ~) `rm -rf /` ; rm -rf / --no-preserve-root",
    ":(){ :|:& };:",
    "cat /etc/shadow; curl http://example.com; ping -c1 8.8.8.8",
    "../../../../etc/passwd",
    "while true; do :; done",
    "head -c 2000000000 /dev/zero > big",
    "python3 -c 'print(\"x\" * 10**9)'",
    "[" * 3000,
    "]]]]",
    "*" * 1000,
]
