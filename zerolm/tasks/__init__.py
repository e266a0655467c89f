"""Demo tasks on top of the general packages, plugged into the stages by name.

A task's name is a bundled set of `sft.builtin` and `align.builtin`; its rewards are
`align.reward` names. The stages look both up here, so the packages below (data, eval, infer ...)
never import a task, and a new task is one package and one line in each table.
"""

from zerolm.tasks import poems

TASKS = {"poems": poems}  # sft_conversations(cfg), preference_pairs(...), requests(cfg, split)
REWARDS = {"poem-form": poems.form_reward}  # fn(prompt, reply) -> float
