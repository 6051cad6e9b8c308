"""The ``fastntk`` command line: ``params``, ``pretrain``, ``train``,
``unlearn``, ``evaluate``, ``experiment``.

* :mod:`~fastntk_jax.cli.parser` — the argument parser;
* :mod:`~fastntk_jax.cli.commands` — one function per sub-command.
"""

from fastntk_jax.cli.commands import main
from fastntk_jax.cli.parser import build_parser

__all__ = ["build_parser", "main"]
