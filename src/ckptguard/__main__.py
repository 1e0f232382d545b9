"""``python -m ckptguard``: the same as the ``ckptguard`` command."""

from ckptguard._tools.cli import main

main()
