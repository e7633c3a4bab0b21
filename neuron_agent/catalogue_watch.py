"""Catalogue changes without a restart: the neuron re-reads models.toml on SIGHUP and when the
file changes (its modification time and size, looked at every `interval_s`).

The file is validated as at start; a bad edit is refused with its file:line: key: problem, kept
in /status (`catalogue_reload`) and the node's events, and the old catalogue stays. A good one
is applied as `plan_catalogue_change` says: new entries appear at once, entries of models not
loaded are updated or removed, and a loaded model keeps its entry until it is unloaded. A
loaded model the file removed is unloaded once it has no request in flight (never cutting a
stream). Gateways see the new catalogue on their next poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cortex.config import ConfigError, ModelProfile, load_models_file
from cortex.neuron_api import CatalogueReload, ModelState
from neuron_agent.catalogue import plan_catalogue_change
from neuron_agent.errors import NodeError

if TYPE_CHECKING:
    from neuron_agent.node import Node

log = logging.getLogger("cortex.neuron")


class CatalogueWatch:
    def __init__(self, node: Node, interval_s: float = 2.0) -> None:
        self.node = node
        self.interval_s = interval_s
        self.path: Path = node.config.resolve(node.config.neuron.models)
        # What the file last asked for (None: nothing since start beyond the start catalogue).
        self.wanted: dict[str, ModelProfile] | None = None
        self.last: CatalogueReload | None = None
        self._task: asyncio.Task[None] | None = None
        self._stamp = self._file_stamp()
        self._lock = asyncio.Lock()

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            found = self.path.stat()
        except OSError:
            return None
        return found.st_mtime_ns, found.st_size

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                stamp = self._file_stamp()
                if stamp is not None and stamp != self._stamp:
                    self._stamp = stamp
                    await self.reload("the file changed")
                elif self.wanted is not None:
                    await self._retire_removed()
            except Exception:  # the watch must outlive any one bad pass
                log.exception("catalogue watch failed")

    async def reload(self, why: str) -> CatalogueReload:
        """Re-read models.toml now (SIGHUP, the file changing)."""
        async with self._lock:
            self._stamp = self._file_stamp()
            try:
                models = await asyncio.to_thread(load_models_file, self.path)
            except ConfigError as error:
                self.last = CatalogueReload(at=time.time(), ok=False, error=str(error))
                self.node._event(f"models.toml not reloaded ({why}), catalogue unchanged: {error}")
                return self.last
            self.wanted = self.node.catalogue.profiles_for(models)
            self.last = self._settle()
            change = self.last
            self.node._event(
                f"models.toml reloaded ({why}): added {change.added or '-'}, updated "
                f"{change.updated or '-'}, removed {change.removed or '-'}, waiting for unload "
                f"{change.deferred or '-'}"
            )
        # Read new checkpoints' shapes off the event loop, before a /status needs them.
        await asyncio.to_thread(self.node.catalogue.entries)
        await self._retire_removed()
        return self.last

    def settle(self) -> None:
        """Apply what waited for a model to be unloaded (the node calls it after an unload)."""
        if self.wanted is not None:
            applied = self._settle()
            if self.last is not None and self.last.ok:
                self.last = self.last.model_copy(update={"deferred": applied.deferred})

    def _settle(self) -> CatalogueReload:
        assert self.wanted is not None
        busy = {*self.node.loaded, *self.node._loads}
        profiles, change = plan_catalogue_change(self.node.catalogue.profiles, self.wanted, busy)
        self.node.catalogue.replace(profiles)
        return CatalogueReload(
            at=time.time(),
            ok=True,
            added=list(change.added),
            updated=list(change.updated),
            removed=list(change.removed),
            deferred=list(change.deferred),
        )

    async def _retire_removed(self) -> None:
        """Unload loaded models the file no longer lists, once nothing is in flight on them."""
        if self.wanted is None:
            return
        for name, entry in list(self.node.loaded.items()):
            if name in self.wanted or entry.state is not ModelState.READY:
                continue
            if await self.node.in_flight(name):
                continue
            log.info("%s left models.toml and is idle: unloading it", name)
            with contextlib.suppress(NodeError):
                await self.node.unload(name)
