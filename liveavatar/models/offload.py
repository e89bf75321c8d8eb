"""Low-memory mode: the transformer's blocks and the ring caches live in pinned host memory and are copied to
the GPU just ahead of their use, on a copy stream, so the copies overlap the compute of the block before.

GPU memory then holds, of the 16.3 B-parameter transformer, only its small non-block parts and two block
buffers (2 x 0.82 GB in bf16, 2 x 0.41 GB in FP8), and of the four rings (41.5 GB in bf16 at 704x384) two
layer buffers. Every step reads its streamed blocks and its ring once over PCIe, so the speed is bounded by
the host-to-device bandwidth: docs/benchmarks.md has the numbers. Where the GPU has memory to spare once a
stream runs, blocks stay there (`fit_resident_blocks`), spread over the depth, and only the others move.

Both streamers rely on the order in which the model uses its pieces, which the streaming forward fixes:
blocks 0..L-1 in every forward (`S2VTransformer.layers`), and the rings layer by layer, step after step.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from liveavatar.models.kv_cache import RingCache

log = logging.getLogger(__name__)

_ALIGN = 256  # bytes; keeps every tensor view aligned for vectorised kernels


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def indexed(device: torch.device | str) -> torch.device:
    """`cuda` as `cuda:<current device>`: some torch.cuda calls (get_per_process_memory_fraction) refuse a device
    without an index, and `--device cuda` is what users give."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _pinned(nbytes: int, device: torch.device) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")


def _tensors(module: nn.Module) -> list[tuple[nn.Module, str, bool]]:
    """(owner, name, is_parameter) of every parameter and buffer of a module, in a fixed order."""
    out = []
    for owner in module.modules():
        out += [(owner, n, True) for n, t in owner._parameters.items() if t is not None]
        out += [(owner, n, False) for n, t in owner._buffers.items() if t is not None]
    return out


class _Slots:
    """`count` device buffers refilled in a fixed cyclic order from host buffers: the copy into a buffer waits
    until the compute stream has finished with its previous content, and the compute stream waits for the
    copy before using it."""

    def __init__(self, nbytes: int, count: int, device: torch.device):
        self.device = device
        self.buffers = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(count)]
        cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if cuda else None
        self.loaded = [torch.cuda.Event() if cuda else None for _ in range(count)]
        self.freed = [torch.cuda.Event() if cuda else None for _ in range(count)]

    def fill(self, slot: int, host: torch.Tensor) -> None:
        """Copies host into buffer `slot` once the compute stream is done with what it holds now."""
        target = self.buffers[slot][: host.numel()]
        if self.copy_stream is None:
            target.copy_(host)
            return
        self.freed[slot].record(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.freed[slot])
            target.copy_(host, non_blocking=True)
            self.loaded[slot].record(self.copy_stream)

    def wait(self, slot: int) -> None:
        """Makes the compute stream wait until buffer `slot` holds what was last filled into it."""
        if self.copy_stream is not None:
            torch.cuda.current_stream(self.device).wait_event(self.loaded[slot])


# Left free when blocks are made resident: allocator fragmentation, and work memory the first clip did not show.
MEMORY_MARGIN = 1 << 30


class BlockStreamer:
    """Keeps the transformer blocks in pinned host memory and runs them from device buffers: a streamed block
    from buffer j % slots (j: its place among the streamed blocks), a resident one (`keep_resident`) from a
    device copy of its own.

    Each block's parameters are views into its buffer, so the module code runs unchanged on whatever was
    copied there last. `before(i)` (called by `S2VTransformer.layers`) waits for streamed block i and starts
    the copy of the streamed block `slots` places after the previous streamed one into the buffer that one
    has just finished with.
    """

    def __init__(self, blocks: nn.ModuleList, device: torch.device, slots: int = 2):
        device = indexed(device)
        if len(blocks) % slots:
            raise ValueError(f"{len(blocks)} blocks do not cycle evenly through {slots} buffers")
        self.device, self.num_blocks, self.slots = device, len(blocks), slots
        self.host: list[torch.Tensor] = []
        self._layouts = []
        for block in blocks:  # one block at a time, so host memory never holds a second copy of the model
            entries, offset = [], 0
            for owner, name, is_param in _tensors(block):
                t = getattr(owner, name)
                nbytes = t.numel() * t.element_size()
                entries.append((owner, name, is_param, t.shape, t.dtype, offset, nbytes))
                offset += _aligned(nbytes)
            host = _pinned(offset, device)
            for owner, name, is_param, shape, dtype, start, nbytes in entries:
                host[start : start + nbytes].view(dtype).view(shape).copy_(getattr(owner, name).detach())
                setattr(owner, name, None) if not is_param else owner._parameters.__setitem__(name, None)
            self.host.append(host)
            self._layouts.append(entries)
        self.buffers = _Slots(self.block_bytes, slots, device)
        self._resident: list[torch.Tensor | None] = [None] * self.num_blocks  # device copies of resident blocks
        self.memory_margin = MEMORY_MARGIN  # what fit_resident_blocks leaves free (doubled after running out)
        self._bind(list(range(self.num_blocks)))

    @property
    def block_bytes(self) -> int:
        """Device memory one block takes (the largest, with alignment)."""
        return max(h.numel() for h in self.host)

    @property
    def resident_count(self) -> int:
        return self.num_blocks - len(self.streamed)

    def _bind(self, streamed: list[int]) -> None:
        """Points every block's tensors at its storage (its buffer, or its resident copy) and loads the first
        buffers."""
        self.streamed = streamed
        self._place = {block: j for j, block in enumerate(streamed)}
        for i, entries in enumerate(self._layouts):
            j = self._place.get(i)
            storage = self._resident[i] if j is None else self.buffers.buffers[j % self.slots]
            for owner, name, is_param, shape, dtype, start, nbytes in entries:
                view = storage[start : start + nbytes].view(dtype).view(shape)
                if is_param:
                    owner._parameters[name] = nn.Parameter(view, requires_grad=False)
                else:
                    owner._buffers[name] = view
        for j in range(min(self.slots, len(streamed))):
            self.buffers.fill(j, self.host[streamed[j]])

    def keep_resident(self, count: int) -> int:
        """Keeps about `count` blocks on the device for good and streams the others, spread evenly over the depth
        so that each copy overlaps the compute of the blocks between two streamed ones. The count is lowered
        where needed for the streamed blocks to cycle evenly through the buffers; if the device runs out of
        memory meanwhile, the blocks stay as they were. Waits for the device (call it between forwards).
        Returns the number of resident blocks."""
        n, slots = self.num_blocks, self.slots
        streaming = min(n, -(-(n - max(0, min(n, count))) // slots) * slots)
        streamed = [j * n // streaming for j in range(streaming)]
        if streamed == self.streamed:
            return self.resident_count
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # nothing may still read the storage that is rebound
        try:
            copies = {i: self.host[i].to(self.device) if self._resident[i] is None else self._resident[i]
                      for i in range(n) if i not in streamed}
        except torch.OutOfMemoryError:
            log.warning("no GPU memory for %d resident transformer blocks; %d stay", n - streaming, self.resident_count)
            return self.resident_count
        self._resident = [copies.get(i) for i in range(n)]
        self._bind(streamed)
        return self.resident_count

    def before(self, i: int) -> None:
        j = self._place.get(i)
        if j is None:  # resident
            return
        m = len(self.streamed)
        self.buffers.wait(j % self.slots)
        if m > self.slots:
            done = (j - 1) % m  # the streamed block that ran last; its buffer takes the one `slots` places later
            self.buffers.fill(done % self.slots, self.host[self.streamed[(done + self.slots) % m]])

    @property
    def host_bytes(self) -> int:
        return sum(h.numel() for h in self.host)


def resident_blocks_that_fit(resident: int, block_bytes: int, allocated: int, peak: int, available: int,
                             margin: int = MEMORY_MARGIN) -> int:
    """How many blocks may be resident: those that are now, plus as many more as fit in `available` (what the
    process may still allocate beyond `allocated`) once the work memory above the steady allocation that the
    stream needed so far (peak - allocated) and a margin are set aside; fewer if even that does not fit."""
    room = available - max(0, peak - allocated) - margin
    return max(0, resident + room // block_bytes)


def fit_resident_blocks(streamer: BlockStreamer) -> int:
    """On a GPU, once a stream has run a whole clip since the peak was reset (every stage at its full size): keeps
    as many blocks resident as the memory left allows, within the process's memory fraction. Returns the count."""
    device = indexed(streamer.device)
    if device.type != "cuda":
        return streamer.resident_count
    torch.cuda.synchronize(device)
    allocated = torch.cuda.memory_allocated(device)
    free, total = torch.cuda.mem_get_info(device)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _: 1.0)(device.index)  # torch >= 2.6
    cap = int(fraction * total)
    # The device's free memory plus what the allocator holds unused, within the fraction the process may use.
    available = min(cap - allocated, free + torch.cuda.memory_reserved(device) - allocated)
    count = resident_blocks_that_fit(streamer.resident_count, streamer.block_bytes, allocated,
                                     torch.cuda.max_memory_allocated(device), available, streamer.memory_margin)
    kept = streamer.keep_resident(count)
    log.info("%d of %d transformer blocks stay on the GPU (%.1f GiB), %d are streamed", kept, streamer.num_blocks,
             kept * streamer.block_bytes / 2**30, streamer.num_blocks - kept)
    return kept


def stream_blocks(dit: nn.Module, device: torch.device, slots: int = 2) -> BlockStreamer:
    """Moves a transformer (on the CPU) to `device` except its blocks, which are streamed from host memory."""
    device = torch.device(device)
    for name, child in dit.named_children():
        if name != "blocks":
            child.to(device)
    for name, p in list(dit._parameters.items()):
        if p is not None:
            dit._parameters[name] = nn.Parameter(p.to(device), requires_grad=False)
    dit.block_streamer = BlockStreamer(dit.blocks, device, slots)
    return dit.block_streamer


class HostRingCache(RingCache):
    """A RingCache whose storage is in pinned host memory; `write` and `valid` work on a device copy of the
    layer in use, fetched ahead by the `HostRings` that owns it. Only the new block's keys/values go back."""

    def __init__(self, owner: "HostRings", step: int, storage: RingCache):
        super().__init__(storage.keys, storage.values, storage.scales, storage.compute_dtype)
        self.owner, self.step = owner, step

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.owner.write(self, layer, start, k, v)

    def valid(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.owner.valid(self, layer, end)

    def state_dict(self) -> dict:
        self.owner.synchronize()  # the newest rows may still be on their way home
        return super().state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.owner.synchronize()
        super().load_state_dict(state)
        self.owner.refetch()


class HostRings:
    """The rings of all denoising steps in pinned host memory, used in the order step 0 layers 0..L-1, step 1
    layers 0..L-1, ... (cyclic), which is the order of the stream's forwards. One layer of one step at a time
    is in use on the device, in one of two buffers; the next one is copied into the other meanwhile."""

    def __init__(self, steps: int, num_layers: int, batch: int, tokens: int, heads: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype, compute_dtype: torch.dtype):
        device = torch.device(device)
        self.device, self.num_layers, self.steps = device, num_layers, steps
        self.rings = []
        for step in range(steps):
            storage = RingCache.allocate(num_layers, batch, tokens, heads, head_dim, "cpu", dtype, compute_dtype,
                                         pin_memory=device.type == "cuda")
            self.rings.append(HostRingCache(self, step, storage))
        self.layer_bytes = sum(_aligned(t.numel() * t.element_size()) for t in _layer_parts(self.rings[0], 0))
        self.buffers = _Slots(self.layer_bytes, 2, device)
        self._views = [_layer_views(b, self.rings[0]) for b in self.buffers.buffers]
        self.position = 0  # the (step, layer) in use, counted in use order
        self.refetch()

    def _locate(self, position: int) -> tuple[HostRingCache, int]:
        step, layer = divmod(position % (self.steps * self.num_layers), self.num_layers)
        return self.rings[step], layer

    def _fetch(self, position: int) -> None:
        ring, layer = self._locate(position)
        slot = position % 2
        if self.buffers.copy_stream is None:
            for view, host in zip(self._views[slot], _layer_parts(ring, layer)):
                view.copy_(host)
            return
        self.buffers.freed[slot].record(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.buffers.copy_stream):
            self.buffers.copy_stream.wait_event(self.buffers.freed[slot])
            for view, host in zip(self._views[slot], _layer_parts(ring, layer)):
                view.copy_(host, non_blocking=True)
            self.buffers.loaded[slot].record(self.buffers.copy_stream)

    def refetch(self) -> None:
        """Loads the layer in use and the next one (after the host copies changed under the buffers)."""
        self._fetch(self.position)
        self._fetch(self.position + 1)

    def rewind(self, position: int) -> None:
        """Goes back to an earlier place in the use order (a block's steps run again after a failure)."""
        self.synchronize()  # the rows the failed attempt sent home are there (the retry writes the same ones)
        self.position = position
        self.refetch()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def write(self, ring: HostRingCache, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """The first use of a (step, layer): the previous one's attention is enqueued by now, so its buffer
        can take the next layer; then the block's rows go into the device copy and back to the host."""
        ring_in_use, layer_in_use = self._locate(self.position)
        if ring_in_use is not ring or layer_in_use != layer:
            raise RuntimeError(f"ring of step {ring.step} layer {layer} used out of order")
        if self.position > 0:
            self._fetch(self.position + 1)
        self.buffers.wait(self.position % 2)
        views = self._views[self.position % 2]
        RingCache.write(_view_ring(views, ring), 0, start, k, v)
        slot, n = start % ring.capacity, k.shape[1]
        for view, host in zip(views, _layer_parts(ring, layer)):
            host[:, slot : slot + n].copy_(view[:, slot : slot + n], non_blocking=True)

    def valid(self, ring: HostRingCache, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = RingCache.valid(_view_ring(self._views[self.position % 2], ring), 0, end)
        self.position += 1
        return out


def _layer_parts(ring: RingCache, layer: int) -> list[torch.Tensor]:
    """One layer of a ring: keys, values and, for FP8 storage, their scales."""
    return [t[layer] for t in (ring.keys, ring.values, *(ring.scales or ()))]


def _layer_views(buffer: torch.Tensor, ring: RingCache) -> list[torch.Tensor]:
    """Views of a flat byte buffer shaped like one layer's parts, back to back."""
    views, offset = [], 0
    for t in _layer_parts(ring, 0):
        n = t.numel() * t.element_size()
        views.append(buffer[offset : offset + n].view(t.dtype).view(t.shape))
        offset += _aligned(n)
    return views


def _view_ring(views: list[torch.Tensor], like: RingCache) -> RingCache:
    """A one-layer RingCache over device views (no allocation)."""
    scales = (views[2][None], views[3][None]) if like.scales is not None else None
    ring = RingCache(views[0][None], views[1][None], scales, like.compute_dtype)
    ring.written = like.written
    return ring
