"""Old import path of :mod:`peftkit.continual` (continual learning moved to its own package); re-exports its public
names so ``from peftkit.train.continual import LAE`` keeps working."""

from ..continual import *  # noqa: F403
from ..continual import __all__  # noqa: F401
