"""``python -m streammerge``: the same CLI as the ``streammerge`` command."""

from .cli import entry

entry()
