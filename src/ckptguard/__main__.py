"""``python -m ckptguard``: the same as the ``ckptguard`` command."""

from ckptguard.cli import main

main()
