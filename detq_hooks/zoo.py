"""Moved: ``detq_hooks.zoo`` is now ``detq_hooks.tools.zoo`` (0.2); this alias warns and goes away in 0.3."""

import warnings

from .tools.zoo import *  # noqa: F401,F403
from .tools.zoo import __all__  # noqa: F401

warnings.warn("detq_hooks.zoo moved to detq_hooks.tools.zoo; import it from there", DeprecationWarning, stacklevel=2)
