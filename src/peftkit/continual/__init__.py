"""Continual learning over a sequence of classification tasks with disjoint label spaces.

One file each: the task sequence (:mod:`.tasks`), replay memory and ConPET's dynamic replay batches (:mod:`.replay`),
the EMA procedure and the max-probability ensemble (:mod:`.ema`), the method protocol and the sequential baseline
(:mod:`.base`), ConPET static/dynamic (:mod:`.conpet`), LAE (:mod:`.lae`), joint training (the upper bound,
:mod:`.joint`), and the evaluation protocol with the learner that runs a sequence (:mod:`.protocol`). Each method is
a :class:`~peftkit.core.procedure.Procedure` the trainer calls plus the task hooks :class:`ContinualLearner` calls;
the PET module itself is any registered adapter.
"""

from .base import NEG, ContinualMethod, Sequential, forward_logits
from .conpet import DynamicConPET, StaticConPET
from .ema import EMA, max_prob_ensemble
from .joint import Joint
from .lae import LAE
from .protocol import ContinualLearner, ContinualResult, results_markdown
from .replay import ReplayMemory, replay_batches
from .tasks import Collate, Example, Task, check_tasks, default_collate

__all__ = ["EMA", "LAE", "NEG", "Collate", "ContinualLearner", "ContinualMethod", "ContinualResult",
           "DynamicConPET", "Example", "Joint", "ReplayMemory", "Sequential", "StaticConPET", "Task", "check_tasks",
           "default_collate", "forward_logits", "max_prob_ensemble", "replay_batches", "results_markdown"]
