"""Tasks: the Task interface and registry (base.py), GLUE classification (glue.py), instruction tuning
(instruct.py, gsm8k.py, sharegpt.py, chat.py; batches and loss in causal_lm.py) and a user's own data file
(files.py; reading in tables.py, labels in labels.py)."""

from fwlora.tasks.base import (CAUSAL_LM, DATA_DIR_ENV, SEQUENCE_CLASSIFICATION, Task, get_task, holdout_split,
                               read_lines, register_task, resolve_data_dir, subset, task_names)

# the built-in tasks register themselves on import
from fwlora.tasks import glue as _glue  # noqa: E402,F401
from fwlora.tasks import instruct as _instruct  # noqa: E402,F401
from fwlora.tasks import sharegpt as _sharegpt  # noqa: E402,F401


def task_for(settings) -> Task:
    """The task a run's settings describe: its own data (--dataset and its columns), else a task by name."""
    if getattr(settings, "dataset", None):
        from fwlora.tasks.files import dataset_task

        return dataset_task(settings)
    return get_task(settings.task)

__all__ = ["CAUSAL_LM", "DATA_DIR_ENV", "SEQUENCE_CLASSIFICATION", "Task", "get_task", "holdout_split", "read_lines",
           "register_task", "resolve_data_dir", "subset", "task_for", "task_names"]
