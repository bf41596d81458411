"""Moved: ``detq_hooks.data`` is now ``detq_hooks.tools.data`` (0.2); this alias warns and goes away in 0.3."""

import warnings

from .tools.data import *  # noqa: F401,F403
from .tools.data import __all__  # noqa: F401

warnings.warn("detq_hooks.data moved to detq_hooks.tools.data; import it from there", DeprecationWarning, stacklevel=2)
