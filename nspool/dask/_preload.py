"""``dask worker SCHEDULER --preload nspool.dask``: the preload's ``dask_setup`` command."""

from __future__ import annotations

from typing import Any

import click

from ._plugin import NSPoolPlugin

__all__ = ["dask_setup"]


@click.command()
@click.option(
    "--nspool-name",
    default="nspool",
    show_default=True,
    help="The executor's name, for dask.annotate(executor=NAME).",
)
@click.option(
    "--nspool-max-workers", type=int, help="nspool workers per Dask worker (default: its threads)."
)
@click.option("--nspool-task-timeout", type=float, help="A deadline in seconds for every task.")
@click.option("--nspool-preload", multiple=True, help="A module the launcher imports (repeatable).")
@click.option(
    "--nspool-kill-leftovers/--nspool-keep-leftovers",
    default=True,
    help="Kill what a task leaves running as soon as it ends (default), or keep it until "
    "its worker exits.",
)
@click.option(
    "--nspool-private-proc/--nspool-shared-proc",
    default=False,
    help="Give each nspool worker a /proc of its own.",
)
def dask_setup(
    worker: Any,
    nspool_name: str,
    nspool_max_workers: int | None,
    nspool_task_timeout: float | None,
    nspool_preload: tuple[str, ...],
    nspool_kill_leftovers: bool,
    nspool_private_proc: bool,
) -> Any:
    """``dask worker SCHEDULER --preload nspool.dask [--nspool-task-timeout 600 ...]``:
    install :class:`NSPoolPlugin` on a worker started from a shell. The options follow the
    preload on the command line (distributed hands them to this click command)."""
    from distributed import Worker

    if not isinstance(worker, Worker):
        raise TypeError("nspool.dask is a worker preload: use --preload, not --preload-nanny")
    options: dict[str, Any] = {
        "preload": nspool_preload,
        "kill_leftovers": nspool_kill_leftovers,
        "private_proc": nspool_private_proc,
    }
    if nspool_max_workers is not None:
        options["max_workers"] = nspool_max_workers
    if nspool_task_timeout is not None:
        options["task_timeout"] = nspool_task_timeout
    return worker.plugin_add(NSPoolPlugin(nspool_name, **options), catch_errors=False)
