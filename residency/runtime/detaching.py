"""Undoing an attach: the model's own tensors, devices and forwards back in place, every hook removed. A mixin of
Runtime (every attribute it reads is Runtime's); kept apart so each file holds one concern."""

from __future__ import annotations

import torch

from residency.runtime import block_buffers
from residency.runtime.hooks import remove_hook


class Detaching:
    """Runtime's detach, and the parts of it a failed attach or a let-go after a cut reuse."""

    def detach(self) -> None:
        """Restore the model exactly: original weight storages, devices, no hook left. Waits for a unit of work
        another thread is running (a detach mid-call crashed that call)."""
        with self._unit_lock:
            self._detach()

    def _detach(self) -> None:
        if self.pipeline is None:
            return
        if self.loop is not None:
            self.loop.close()  # a re-plan in flight reads the original weights: let it finish first
        for module in (*self._hooked, self._root):  # before anything changes: a detach that cannot finish
            if module is not None:                  # changes nothing
                self._check_removable(module)
        # blocks first, the model's own hook last: a call arriving meanwhile (another thread) goes through that
        # hook, so it waits for the unit lock and then runs plain; with the hook gone first it ran the block
        # hooks unlocked on an executor being stopped (AttributeError: 'NoneType' … 'submit')
        self._detach_blocks()
        self._remove_retry_hook()
        self._forget_stores()
        self._holders = None  # no reference kept to modules outside the model

    def _forget_stores(self) -> None:
        """The host blobs go with the attach: cached, the next attach would reuse them even after an edit of
        the weights no token sees (`p.data.mul_(0.5)` keeps storage and version), and they would hold the
        host memory for as long as the model lives."""
        if self.store is not None:
            self.store.release()

    def _remove_retry_hook(self) -> None:
        """The model's own hook goes (detach, or a let-go after a cut): the model runs plain from here, its batch
        norms' counters as attach found them (Runtime._keep_counters)."""
        if self._root is not None:
            remove_hook(self._root)
            if self._kv_config is not None:  # the KV dtype the plan set (runtime.kv_storage) back to the user's
                self._root.config, self._kv_config = self._kv_config, None
            self._root = None
        if self._structure is not None:
            self._structure.close()  # warns of what was added while attached: detach does not undo it
            self._structure = None
        for sub, key, buf, saved in self._counters.values():
            if sub._buffers.get(key) is buf:
                # a counter made under inference_mode is written there (outside it, torch refuses the write)
                with torch.inference_mode(buf.is_inference()), torch.no_grad():
                    buf.copy_(saved)
        self._counters.clear()

    def _detach_blocks(self, checked: bool = True) -> None:
        """Undo _attach. `checked` False: an attach that failed part way (each hook added is ours, and the
        compiled forwards may not be in place yet)."""
        for module in self._hooked if checked else ():
            self._check_removable(module)
        self._calls.discard()  # a call still open here failed (a completed one was closed)
        self._executor.close_frame()
        self._executor.stop()
        for module in self._hooked:
            remove_hook(module)
        self._hooked = []
        self._forwards.clear()
        if self._compiled is not None:
            self._compiled.restore()
        self._compiled = None
        block_buffers.keep_resident_writes(self._executor, self._originals, self._buffer_versions)
        for pairs in self._originals.values():
            for t, data in pairs:
                t.data = data
        for sub, key, buf in self._buffers:
            moved = sub._buffers[key]
            self.ledger.release("resident", moved.numel() * moved.element_size())
            sub._buffers[key] = buf
        self._buffers.clear()
        self._originals = {}
        for handle in self._state_hooks:
            handle.remove()
        self._memory.release()
        self.backend.stop()
        self.pipeline, self._executor, self._calls, self._memory = None, None, None, None
        # they hold views into the device memory just released: kept, a detached runtime still in scope (`with
        # attach(…) as rt:`) held all of it (64 MiB of a 64 MiB model at 200 %) until rt itself went
        self._weights, self._swapped_inputs = None, None
