"""The ``omnigrpo`` command (the top of the package: it may import every layer, and none imports it).

``parser`` holds what a user types, ``commands`` what each sub-command does. Thread waits are set quiet here,
before anything imports torch: for this process and the workers it starts.
"""

from omnigrpo.config.runtime import quiet_thread_waits

quiet_thread_waits()
from omnigrpo.cli.commands import COMMANDS, CONFIG_COMMANDS, main  # noqa: E402

__all__ = ["COMMANDS", "CONFIG_COMMANDS", "main"]
