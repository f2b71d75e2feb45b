"""Reading an evaluation suite's task data from a filter (balance's class names, norm_sim's overlap check).

eval's data reader imports torch, so it is imported only here and only when a filter needs a suite's data.
"""

from __future__ import annotations

from typing import Any

from clipsift import ClipsiftError
from clipsift.filters.base import RecipeError


def data_folder(suite: Any, data_dir: str | None) -> str:
    """The suite's data folder: `data_dir` when given, else where `clipsift eval` looks."""
    from clipsift.eval.run import default_data_dir

    return data_dir or default_data_dir(suite.name)


def open_task_data(suite: Any, task: Any, data_dir: str | None, where: str, needed_for: str) -> Any:
    """The task's data (eval's TaskData); a RecipeError saying what it was `needed_for` and how to get it."""
    from clipsift.eval.data import MissingData
    from clipsift.eval.layouts import open_task

    folder = data_folder(suite, data_dir)
    try:
        return open_task(suite, task, folder)
    except (MissingData, ClipsiftError) as err:
        raise RecipeError(
            f"{where}: suite {suite.name}: the data of task {task.key} cannot be read ({err}), and {needed_for}; "
            f"get it with `{suite.download_command(folder)}`, or give parameter 'suite_data' (the suite's data folder)"
        ) from None
