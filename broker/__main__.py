"""``python -m broker``: the same as the ``colt-broker`` command."""

from broker._cli import run

run()
