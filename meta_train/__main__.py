"""``python -m meta_train``: see :mod:`meta_train.cli`."""

from .cli import main

main()
