"""Install faultkit cluster-wide: ``dask scheduler --preload dask_plugins.preload``.

::

    dask scheduler --preload dask_plugins.preload \\
        --faultkit-store s3://bucket/ck --faultkit-alert 'slack://...'

or in Dask's configuration::

    distributed:
      scheduler:
        preload: [dask_plugins.preload]
        preload-argv: [--faultkit-store, "file:///shared/ck"]

The options may also come from ``FAULTKIT_STORE`` and ``FAULTKIT_ALERT`` (several URLs
separated by spaces or commas, faultkit's one alert-list syntax), which keeps alert
credentials out of the command line. On a scheduler this adds
:class:`~dask_plugins.WorkerLossPlugin` and registers :class:`~dask_plugins.CheckpointPlugin`
for every current and future worker; on a worker
(``dask worker --preload dask_plugins.preload``) it adds the worker plugin to that worker.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import click

from faultkit._alerts import alert_urls

from ._scheduler import WorkerLossPlugin
from ._worker import CheckpointPlugin

__all__ = ["dask_setup", "install"]

log = logging.getLogger("faultkit.dask")


async def install(
    server: Any,
    store: str | None = None,
    alerts: tuple[str, ...] | list[str] = (),
    *,
    dedupe_window: float = 600.0,
) -> None:
    """Add faultkit's plugins to a scheduler (or worker), from a preload or once it runs.

    A preload runs before the scheduler starts its plugins, so the plugin is only added
    there (``Scheduler.start`` starts it, once); on a running scheduler it is started here.
    The plugins check their URLs in a thread: a store may block, the event loop must not.
    """
    from distributed import Scheduler, Worker
    from distributed.core import Status
    from distributed.protocol.pickle import dumps

    if isinstance(server, Scheduler):
        plugin = await asyncio.to_thread(
            WorkerLossPlugin, alert_urls(list(alerts)), store, dedupe_window=dedupe_window
        )
        if plugin.name not in server.plugins:
            server.add_plugin(plugin, idempotent=True)
            if server.status == Status.running:
                await plugin.start(server)
        if store:
            wp = await asyncio.to_thread(CheckpointPlugin, store)
            await server.register_worker_plugin(None, dumps(wp), name=wp.name, idempotent=True)
        log.info("faultkit: scheduler plugins installed (%r, store %s)", plugin, store and wp)
    elif isinstance(server, Worker):
        if store:
            wp = await asyncio.to_thread(CheckpointPlugin, store)
            await server.plugin_add(wp, name=wp.name)
    else:
        raise TypeError(
            f"dask_plugins.preload runs on a Dask scheduler or worker, not {type(server).__name__}"
        )


@click.command()
@click.option(
    "--faultkit-store",
    envvar="FAULTKIT_STORE",
    default=None,
    help="Checkpoint store URL for every worker (file:///..., s3://bucket/prefix).",
)
@click.option(
    "--faultkit-alert",
    envvar="FAULTKIT_ALERT",
    multiple=True,
    help="Apprise URL to alert on lost workers; repeat for several channels.",
)
@click.option(
    "--faultkit-dedupe-window",
    type=float,
    default=600.0,
    show_default=True,
    help="Seconds during which the same alert is not sent again.",
)
async def dask_setup(
    server: Any,
    faultkit_store: str | None,
    faultkit_alert: tuple[str, ...],
    faultkit_dedupe_window: float,
) -> None:
    """Dask preload entry point (called by Dask with the server and the click options)."""
    await install(server, faultkit_store, faultkit_alert, dedupe_window=faultkit_dedupe_window)
