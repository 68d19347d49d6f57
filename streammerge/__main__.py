"""``python -m streammerge``: the same CLI as the ``streammerge`` command."""

from .cli import main

raise SystemExit(main())
