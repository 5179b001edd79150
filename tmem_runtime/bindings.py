"""Bindings: which session's B each row (or token) of a forward's batch reads, per thread.

A `Binding` names, for the adapted MLPs, the B stacks and A views to read and how the batch splits into
segments of one session each (or of none: the bare model). `Bindings` keeps the binding forwards read on
each thread (`bind`, `current`), the default one (FastWeights' one session), the bindings of recently
bound row lists (a decode loop binds its rows per step: their segments are built and uploaded once), and
expands a thread's binding as generate() expands its prompts (beams, return sequences).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from tmem_kernels.segments import row_segments
from tmem_runtime.recent_items import RecentItems
from tmem_runtime.uploads import upload


@dataclass(frozen=True)
class Binding:
    """Which B each part of a forward's batch reads.

    b_stacks: per adapter slot, every session's B [S, out, r] (a strided view; any float dtype, cast to
    the model's). a_views: per slot, A [r, in]. Segment g covers rows (tokens when `per_token`)
    indptr[g]:indptr[g + 1] and reads b_stacks[.][slots[g]], or nothing when slots[g] == -1 (int64
    tensors, as `tmem_kernels.segments` takes them; `host_slots` the same slots on the host); indptr
    None: one segment, slots[0], covers any batch. `device_indptr` / `device_slots`: copies on the
    compute device for one token per row (decode), made by one upload that does not wait for the device
    (on the CPU: plain copies), for the kernels that read segments there (Triton). writing: a write step
    (base weights are constants; B may be updated inside the backward by `sgd_lr`). resident: b_stacks
    are the engine's rows, whose `initial` flags say whether a slot is still B0. `identity`: the engine's
    memo of whether every row read is still B0, [(its `initial` epoch, the answer)] (see `_is_identity`).
    """

    b_stacks: tuple[torch.Tensor, ...]
    a_views: tuple[torch.Tensor, ...]
    indptr: torch.Tensor | None
    slots: torch.Tensor
    host_slots: tuple[int, ...]
    per_token: bool = False
    writing: bool = False
    sgd_lr: float | None = None
    device_indptr: torch.Tensor | None = None
    device_slots: torch.Tensor | None = None
    resident: bool = True  # b_stacks are the engine's rows (not a write's workspace)
    unexpanded: Binding | None = None  # the binding whose rows generate() expanded into this one (see below)
    host_rows: int | None = None  # indptr[-1] (the rows the segments cover), known on the host; None: read it
    identity: list = field(default_factory=list, init=False, compare=False, repr=False)


class Bindings:
    """The bindings of one engine's resident B rows: b_stacks, a_views as in `Binding`; `capacity` rows on
    `device`. Safe to use from several threads: each thread binds its own."""

    ROW_BINDINGS = 16  # bindings of recent row lists kept for reuse (a decode loop binds its rows per step)

    def __init__(
        self, b_stacks: tuple[torch.Tensor, ...], a_views: tuple[torch.Tensor, ...], capacity: int, device: torch.device
    ) -> None:
        self.b_stacks, self.a_views, self.capacity, self.device = b_stacks, a_views, capacity, device
        self.default: Binding | None = None  # what forwards read where no thread bound anything
        self._recent: RecentItems[tuple[int, ...], Binding] = RecentItems(self.ROW_BINDINGS)
        self._local = threading.local()

    def __getstate__(self) -> dict:
        """Copies (copy.deepcopy of the model, pickling) carry the buffers' views but no thread state."""
        state = dict(self.__dict__)
        state.pop("_local")
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def for_rows(self, slots_per_row: Sequence[int | None]) -> Binding:
        """Rows read the resident B rows `slots_per_row` (None: no adapter, the bare model). The binding
        of a row list bound lately is reused: its segments are built and uploaded once, not per step."""
        rows = tuple(-1 if s is None else int(s) for s in slots_per_row)
        binding = self._recent.get(rows)  # (threads bind rows concurrently: serve's batcher, writes, readers)
        if binding is not None:
            return binding
        for s in rows:
            if not -1 <= s < self.capacity:
                raise ValueError(f"slot {s} is outside this engine's {self.capacity} B rows")
        indptr, slots = row_segments(rows)
        device_indptr, device_slots = upload([indptr, slots], self.device)  # (no wait for the device)
        binding = Binding(self.b_stacks, self.a_views, indptr, slots, tuple(slots.tolist()),
                          device_indptr=device_indptr, device_slots=device_slots, host_rows=len(rows))  # fmt: skip
        self._recent.put(rows, binding)  # (two threads may have made one: either serves)
        return binding

    def all_rows(self, slot: int) -> Binding:
        """Every row of any batch reads B row `slot` (FastWeights' one session)."""
        return Binding(self.b_stacks, self.a_views, None, torch.tensor([slot]), (slot,))

    def forget_rows(self) -> None:
        """Drop the kept row-list bindings (the next bind of a row list builds and uploads its segments)."""
        self._recent.clear()

    @contextmanager
    def bind(self, binding: Binding | None) -> Iterator[None]:
        """Forwards on this thread read `binding` (None: the default binding) inside the block."""
        previous = getattr(self._local, "binding", None)
        self._local.binding = binding
        try:
            yield
        finally:
            self._local.binding = previous

    def current(self) -> Binding | None:
        """The binding forwards on this thread read: the one bound here, else the default (None: neither)."""
        return getattr(self._local, "binding", None) or self.default

    def expand_for_generation(self, prompts: int, expand_size: int) -> None:
        """generate() repeats each of its `prompts` rows `expand_size` times (beams, num_return_sequences)
        before its first forward: this thread's rows binding is repeated the same way, so every copy reads
        its prompt's session, until the enclosing bind() block ends. Rows that do not match the prompts'
        batch are refused (ValueError) here, where a list that happens to match the expanded batch would
        otherwise give a prompt's beams different sessions."""
        binding = getattr(self._local, "binding", None)
        if binding is None or binding.indptr is None or binding.writing:
            return
        binding = binding.unexpanded or binding
        rows = int(binding.indptr[-1])
        if rows != prompts:
            raise ValueError(
                f"the fast-weight rows name {rows} rows but generate() was given {prompts} prompts "
                "(pass one session, or None, per prompt: beams and return sequences are expanded here)"
            )
        if expand_size > 1:
            on_device = binding.device_indptr
            binding = replace(binding, indptr=binding.indptr * expand_size, unexpanded=binding,
                              device_indptr=None if on_device is None else on_device * expand_size,
                              host_rows=rows * expand_size)  # fmt: skip
        self._local.binding = binding


def token_segments(
    binding: Binding, shape: torch.Size, n_tokens: int, on_device: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The binding's segments in tokens of the flattened input [n_tokens, H] of a batch of `shape` (rows x
    tokens per row x H, or tokens x H): (indptr [G+1], slots [G]); on_device: for an op that reads them on
    the device (its copies there, where the binding has them), else on the host. ValueError when the
    binding names another number of rows than the batch has."""
    if binding.indptr is None:
        return torch.tensor([0, n_tokens]), binding.slots
    if binding.writing and binding.per_token:  # the piecewise trainer's token segments cover its batch by
        return binding.indptr, binding.slots  # construction; they live on the device, where a captured (CUDA-graph)
        # step must not read them back (the generic path's name rows of the padded batch, on the host: below)
    per_row = 1 if binding.per_token or len(shape) < 3 else shape[-2]
    rows = int(binding.indptr[-1]) if binding.host_rows is None else binding.host_rows  # (no tensor read per call)
    if rows * per_row != n_tokens and binding.unexpanded is not None:  # a forward after generate() expanded
        return token_segments(binding.unexpanded, shape, n_tokens, on_device)  # the rows, on the batch they were
        # named for
    if rows * per_row != n_tokens:
        raise ValueError(
            f"the fast-weight rows name {rows} rows but the batch has {n_tokens // max(per_row, 1)} "
            "(pass one session, or None, per row of the batch)"
        )
    if on_device and per_row == 1 and binding.device_indptr is not None:
        return binding.device_indptr, binding.device_slots
    return (binding.indptr if per_row == 1 else binding.indptr * per_row), binding.slots
