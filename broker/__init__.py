"""colt-broker: one valid Colt API token per credential profile, served locally."""

__version__ = "0.1.0"
