"""Job and cluster specs (moved from spec.py into a package; split into modules next)."""

from .job import *  # noqa: F403
from .job import _no_password  # noqa: F401
