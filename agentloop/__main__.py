"""``python -m agentloop``: the ``agentloop`` command."""

from agentloop.cli import main

if __name__ == "__main__":
    main()
