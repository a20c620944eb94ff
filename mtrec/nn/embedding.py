"""The shared input layer: every sparse and sequence feature, plus the dense values.

Features with the same embedding size live in one table, each at its own row
offset, so a batch needs one lookup per embedding size rather than one per
feature. ``copies > 1`` gives each of several independent networks its own
slice of every row (used by ``single_task``): the gradients of one copy never
touch another, so nothing is shared, while the lookup stays a single call.

:meth:`FeatureEmbedding.linear` computes a linear map of the embedded batch,
``x @ W + b``, by folding ``W`` into the tables: a sparse field's slice of
``x @ W`` is its one-hot row selection times ``E_f @ W_f``, so the product can
be taken over the field's ``vocab`` rows (``E_f @ W_f``, ``[vocab, K]``) and then
looked up and summed per sample, instead of over every sample. With the small
vocabularies of ranking data (Census: at most 93 values per field, batches of
1024) this turns the three ``[B, D] x [D, K]`` products of a first layer's
forward and backward into a lookup-sum, a scatter-add and products over
``vocab`` rows: on Census, MMoE's first layer (experts and gates, 279 -> 1040)
costs about a third of its plain cost, and a whole training step about 40%
less. Mathematically the same map; only the order of floating-point sums changes.

:meth:`FeatureEmbedding.stacked_linear` does the same for stacks of maps
(``BatchedLinear`` weights ``[n, D, out]``): each member of a wide stack gets its
own block of the projected table, so the lookup-sum reads one cache-sized block
at a time and returns ``[n, B, out]`` contiguous, the layout the next batched
product reads; the bias is one more table row every sample adds, and the dense
values' product is added into the lookup's output in place (no extra pass).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtrec.data.tables import FeatureLayout, TensorTable
from mtrec.nn.typed import TypedModuleDict

EMBED_INIT_STD = 0.05  # small enough that 40 summed-in fields start near zero, large enough to break symmetry
# fold a field into a linear map when its vocabulary has at most this many rows per sample of the batch:
# its projection, over the vocabulary padded to a power of two, then costs at most the per-sample
# product it replaces (usually far less: Census fields have 4 to 93 values, batches 1024 samples)
FOLD_MAX_ROWS_PER_SAMPLE = 0.5
# a stack of folded maps at least this wide gets one table block per member (see _SumRows); narrower
# ones (gates: a few logits each) share one block, whose rows would otherwise be too short to read well
FOLD_BLOCK_MIN_WIDTH = 64
# projected tables kept for inference (FeatureEmbedding._projected): a model's maps under one or two plans
PROJECTED_CACHE_SIZE = 8


def _lookup(weight: Tensor, ids: Tensor) -> Tensor:
    """Rows ``ids`` (any shape, flattened) of ``weight``: ``[ids.numel(), width]``.

    On CPU an ``index_select``, whose backward is one ``index_add_`` (about 3x cheaper there than the
    sort-based backward of ``nn.Embedding``, and as deterministic); elsewhere ``F.embedding``, whose
    backward stays deterministic on GPUs where an ``index_add_`` would not be.
    """
    flat = ids.reshape(-1)
    return weight.index_select(0, flat) if weight.device.type == "cpu" else F.embedding(flat, weight)


@dataclass(frozen=True)
class _FoldGroup:
    """Folded fields of one table whose vocabularies pad to the same size: one ``bmm`` computes them all."""

    count: int  # fields in the group
    rows: int  # padded vocabulary size of each


@dataclass(frozen=True)
class _FoldTable:
    """The folded fields of one embedding table (one embedding size), grouped by padded vocabulary size."""

    dim: int
    pad_rows: Tensor  # [sum count * rows] table row of every padded slot (a pad repeats the field's last row)
    w_rows: int  # rows of the permuted ``W`` (see ``_FoldPlan.w_perm``) holding this table's folded fields
    groups: tuple[_FoldGroup, ...]


class _PermuteRows(torch.autograd.Function):
    """``w[perm]`` for a permutation ``perm``; its backward is the inverse gather rather than a scatter-add."""

    @staticmethod
    def forward(ctx, w: Tensor, perm: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return w.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def _block_ids(ids: Tensor, blocks: int, rows: int) -> Tensor:
    """``ids`` ``[B, F]`` (rows of one block of a ``[blocks * rows, width]`` table) for every block:
    ``[blocks * B, F]``, block ``e``'s copy shifted by ``e * rows``."""
    if blocks == 1:
        return ids
    return (ids.unsqueeze(0) + _block_shift(blocks, rows, ids.device, ids.dtype)).view(-1, ids.shape[1])


@functools.lru_cache(maxsize=64)
def _block_shift(blocks: int, rows: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``[blocks, 1, 1]``: ``e * rows`` for block ``e`` (kept: it is needed at every step)."""
    return torch.arange(0, blocks * rows, rows, device=device, dtype=dtype).view(blocks, 1, 1)


class _RowOrder:
    """The samples of a ``[B, F]`` id tensor grouped by row, computed once for the backward passes of all
    the lookup-sums (:class:`_SumRows`) of one batch's ids."""

    def __init__(self) -> None:
        self._order: tuple[Tensor, Tensor] | None = None

    def get(self, ids: Tensor, rows: int) -> tuple[Tensor, Tensor]:
        """``(samples [B * F], offsets [rows])``: the sample of every id, grouped by row (in the order of the
        sort ``embedding_bag``'s backward does; the tests check it bit for bit), and where each row starts."""
        if self._order is None:
            # position = b * F + f (32-bit ids, as FeatureEmbedding passes them, sort in half the time)
            sorted_ids, position = torch.sort(ids.reshape(-1))
            counts = torch.bincount(sorted_ids, minlength=rows)  # [rows]
            samples = torch.div(position, ids.shape[1], rounding_mode="floor").to(ids.dtype)  # [B * F], by row
            self._order = samples, (counts.cumsum(0) - counts).to(ids.dtype)
        return self._order


def _sum_rows(table: Tensor, ids: Tensor, blocks: int, x: Tensor | None, w: Tensor | None) -> Tensor:
    """``[blocks, B, width]``: ``sum_f table[e * rows + ids[b, f]] (+ x[b] @ w[e])`` for every block ``e``
    (the forward pass of :class:`_SumRows`, and the folded map's inference)."""
    rows = table.shape[0] // blocks
    out = F.embedding_bag(_block_ids(ids, blocks, rows), table, mode="sum")  # [blocks * B, width]
    out = out.view(blocks, ids.shape[0], -1)
    if w is not None and x is not None:
        out.baddbmm_(x.expand(blocks, *x.shape), w)
    return out


class _SumRows(torch.autograd.Function):
    """``out[e, b] = sum_f table[e * rows + ids[b, f]] (+ x[b] @ w[e])``: the lookup-sum of a folded map.

    ``table`` ``[blocks * rows, width]`` holds ``blocks`` tables of ``rows`` rows side by side (one per
    member of a stack of maps, see :meth:`FeatureEmbedding.stacked_linear`), ``ids`` ``[B, F]`` are rows
    of one block; the result is ``[blocks, B, width]``. Block by block, a ``rows x width`` table stays in
    the core's cache while every sample reads it, where one wide ``[rows, blocks * width]`` table would
    not: the lookups of Census MMoE's experts (8 blocks of 128) take about 40% less time. One
    ``embedding_bag`` call does all blocks (``ids`` shifted per block). The optional ``x`` ``[B, R]`` and
    ``w`` ``[blocks, R, width]`` (the columns that are not folded, e.g. dense values) are added in place,
    which saves a pass over the output.

    The gradient of row ``v`` of a block is the sum of ``grad[e, b]`` over the samples ``b`` whose ids
    hold ``v``. ``embedding_bag``'s CPU backward sorts the flattened ids and then adds the gradient rows
    one by one; here one sort of the ``B * F`` ids (the same order in every block) gives, per row, its
    samples, and a second ``embedding_bag`` sums those rows of ``grad``: for one block, the same sums in
    the same order as ``embedding_bag``'s own backward (bit-identical), in less time. The backward is
    made of differentiable operations, so higher-order gradients still work.
    """

    @staticmethod
    def forward(
        ctx,
        table: Tensor,
        ids: Tensor,
        blocks: int = 1,
        x: Tensor | None = None,
        w: Tensor | None = None,
        order: _RowOrder | None = None,
    ) -> Tensor:
        rows = table.shape[0] // blocks
        ctx.blocks, ctx.rows = blocks, rows
        ctx.order = _RowOrder() if order is None else order
        ctx.save_for_backward(ids, x, w)
        return _sum_rows(table, ids, blocks, x, w)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ids, x, w = ctx.saved_tensors
        blocks, rows = ctx.blocks, ctx.rows
        b, f = ids.shape
        grad = grad.contiguous()  # [blocks, B, width]
        samples, offsets = ctx.order.get(ids, rows)  # [B * F] grouped by row, [rows] where each row starts
        if blocks > 1:  # block e: its own copy of the samples (shifted by e * B) and of the offsets
            samples = _block_ids(samples.view(1, -1), blocks, b).reshape(-1)
            offsets = _block_ids(offsets.view(1, -1), blocks, b * f).reshape(-1)
        grad_table = F.embedding_bag(samples, grad.view(blocks * b, -1), offsets, mode="sum")  # [blocks*rows, width]
        grad_x = grad_w = None
        if w is not None and x is not None:
            if ctx.needs_input_grad[3]:
                grad_x = torch.bmm(grad, w.transpose(1, 2)).sum(0)  # [B, R]
            if ctx.needs_input_grad[4]:
                grad_w = torch.bmm(x.t().expand(blocks, *x.t().shape), grad)  # [blocks, R, width]
        return grad_table, None, None, grad_x, grad_w, None


@dataclass(frozen=True)
class _FoldPlan:
    tables: tuple[_FoldTable, ...]
    sparse_cols: Tensor  # [F_folded] columns of ``batch.sparse`` that are folded
    prow_offsets: Tensor  # [F_folded] row of the projected table holding each folded field's id 0
    rest_cols: Tensor  # [R] columns of ``x`` that are not folded (other fields, sequences, dense)
    w_perm: Tensor  # [D] rows of ``W``: every table's folded fields in group order, then ``rest_cols``
    w_inverse: Tensor  # [D] the inverse permutation
    rest_is_dense: bool  # the unfolded columns are exactly the dense values (no gradient to route back)
    rows: int  # rows of the projected table: every folded field's, padded


@dataclass
class Embedded:
    """Says that a tensor ``x`` ``[B, D]`` is ``embedding(batch)`` for one copy, so that a layer reading
    ``x`` may compute ``x @ W + b`` with :meth:`FeatureEmbedding.linear` (folded into the tables)."""

    embedding: FeatureEmbedding
    batch: TensorTable

    def linear(self, x: Tensor | None, weight: Tensor, bias: Tensor) -> Tensor:
        """``x @ weight + bias``: ``x`` ``[B, D]``, ``weight`` ``[D, K]``, ``bias`` ``[K]``; returns ``[B, K]``.
        ``x`` None: not computed yet; the embedding then looks up only the columns the map still reads."""
        return self.embedding.linear(self.batch, x, weight, bias)

    def stacked_linear(self, x: Tensor | None, stacks: Sequence[tuple[Tensor, Tensor]]) -> list[Tensor]:
        """Stacks of maps of ``x`` (``weight`` ``[n, D, out]``, ``bias`` ``[n, out]`` each), ``[n, B, out]``
        each: :meth:`FeatureEmbedding.stacked_linear`."""
        return self.embedding.stacked_linear(self.batch, x, stacks)

    def input(self) -> Tensor:
        """``x`` itself, ``[B, D]``, for a layer that cannot fold."""
        return self.embedding(self.batch)[:, 0]


# ``(batch, x, weight, bias) -> x @ weight + bias``: the signature of :meth:`FeatureEmbedding.linear`
FirstLayer = Callable[[TensorTable, Tensor | None, Tensor, Tensor], Tensor]


# an inference cache entry: the tensors a projected table was computed from, their (version, storage)
# stamps, the table and the unfolded rows of W
_Projected = tuple[tuple[Tensor, ...], tuple[tuple[int, int], ...], Tensor, Tensor]


class FeatureEmbedding(nn.Module):
    """Embeds a batch into ``[B, copies, output_dim]``.

    ``first_layer_override``: None (the default, and always in training), or a callable with the
    signature of :meth:`linear` that :meth:`linear` and :meth:`stacked_linear` hand every first-layer
    map to instead of computing it (no folding then). The export wrapper sets it while it traces a
    graph with context inputs (``mtrec.serve.export``: the context's share of the product taken once
    per request) and clears it afterwards. Give a plain callable, e.g. a module's bound ``__call__``:
    a module assigned here would be registered as a submodule of the embedding.
    """

    first_layer_override: FirstLayer | None = None  # see the class docstring

    def __init__(self, layout: FeatureLayout, copies: int = 1) -> None:
        super().__init__()
        self.copies = copies
        self.num_dense = len(layout.dense)
        # embed_dim -> list of (owner feature, vocab size) that get rows in that table
        owners: dict[int, list[tuple[str, int]]] = defaultdict(list)
        for f in layout.sparse:
            owners[f.embed_dim].append((f.name, f.vocab_size))
        for s in layout.sequences:
            if s.shares is None:
                owners[s.embed_dim].append((s.name, s.vocab_size))
        self.dims = sorted(owners)
        self.tables = TypedModuleDict[nn.Embedding]()
        offset_of: dict[str, tuple[int, int]] = {}  # owner -> (dim, row offset)
        for d in self.dims:
            rows = 0
            for name, size in owners[d]:
                offset_of[name] = (d, rows)
                rows += size
            table = nn.Embedding(rows, d * copies)
            nn.init.normal_(table.weight, std=EMBED_INIT_STD)
            self.tables[str(d)] = table
        # per table: which columns of batch.sparse it reads, and their row offsets
        self._sparse_cols: dict[int, list[int]] = defaultdict(list)
        for col, f in enumerate(layout.sparse):
            self._sparse_cols[f.embed_dim].append(col)
        for d in self.dims:
            cols = self._sparse_cols.get(d, [])
            offs = [offset_of[layout.sparse[c].name][1] for c in cols]
            self.register_buffer(f"cols_{d}", torch.tensor(cols, dtype=torch.long), persistent=False)
            self.register_buffer(f"offsets_{d}", torch.tensor(offs, dtype=torch.long), persistent=False)
        # a table that reads every sparse column in order (one embedding size) skips the column gather
        self._reads_all = {d: self._sparse_cols.get(d, []) == list(range(len(layout.sparse))) for d in self.dims}
        # per sparse field, for folding: (column of batch.sparse, dim, row offset, vocab, column in x)
        self._field_slots: list[tuple[int, int, int, int, int]] = []
        pos = 0
        for d in self.dims:  # the output order of forward(): sizes ascending, layout order within a size
            for col in self._sparse_cols.get(d, []):
                f = layout.sparse[col]
                self._field_slots.append((col, d, offset_of[f.name][1], f.vocab_size, pos))
                pos += d
        self._plans: dict[tuple[int, str], _FoldPlan | None] = {}
        self._plans_by_fields: dict[tuple[tuple[int, ...], str], _FoldPlan] = {}  # one plan per set of fields
        # inference only: projected tables by (plan, map), with the tensors they were computed from (see
        # _projected); emptied by train() / eval()
        self._projected_cache: dict[tuple[int, int], _Projected] = {}
        self.sequences = [(s.name, s.embed_dim, offset_of[s.shares or s.name][1]) for s in layout.sequences]
        self.output_dim = (
            sum(f.embed_dim for f in layout.sparse) + sum(s.embed_dim for s in layout.sequences) + self.num_dense
        )

    def member_index(self, name: str) -> Tensor:
        """Member ids (copies) of a table ``tables.<d>.weight`` ``[rows, copies * d]``: a column block per copy."""
        d = int(name.split(".")[1])
        return torch.arange(self.copies).repeat_interleave(d).view(1, -1)

    def forward(self, batch: TensorTable) -> Tensor:
        b = batch.sparse.shape[0] if batch.sparse.numel() else len(batch)
        parts: list[Tensor] = []
        for d in self.dims:
            cols: Tensor = getattr(self, f"cols_{d}")
            if cols.numel() == 0:
                continue
            ids = batch.sparse if self._reads_all[d] else batch.sparse.index_select(1, cols)  # [B, F_d]
            ids = ids + getattr(self, f"offsets_{d}")  # [B, F_d], rows of this table
            emb = _lookup(self.tables[str(d)].weight, ids)  # [B * F_d, copies * d]
            emb = emb.view(b, -1, self.copies, d).transpose(1, 2)  # [B, copies, F_d, d]
            parts.append(emb.reshape(b, self.copies, -1))
        for name, d, offset in self.sequences:
            ids = batch.sequences[name]  # [B, L], 0 = padding
            mask = (ids > 0).unsqueeze(-1).to(self.tables[str(d)].weight.dtype)  # [B, L, 1]
            rows = _lookup(self.tables[str(d)].weight, ids + offset)  # [B * L, copies * d]
            emb = rows.view(b, ids.shape[1], -1) * mask  # [B, L, copies * d]
            pooled = emb.sum(1) / mask.sum(1).clamp_min(1.0)  # masked mean, [B, copies * d]
            parts.append(pooled.view(b, self.copies, d))
        if self.num_dense:
            parts.append(batch.dense.unsqueeze(1).expand(b, self.copies, self.num_dense))
        return torch.cat(parts, dim=-1)  # [B, copies, output_dim]

    # ---- x @ W + b folded into the tables -------------------------------------------------
    def _plan(self, batch_size: int, device: torch.device) -> _FoldPlan | None:
        """Which fields to fold for a batch of this size (None: none), cached per size.

        Folded fields are grouped per table by vocabulary size rounded up to a power of two, so the
        projections ``E_f @ W_f`` are a handful of ``bmm`` calls (padding at most doubles their rows)
        rather than one small product per field: fewer, larger kernels, which matters most when
        other processes compete for the cores.
        """
        key = (batch_size, str(device))
        if key in self._plans:
            return self._plans[key]
        slots = [s for s in self._field_slots if s[3] <= FOLD_MAX_ROWS_PER_SAMPLE * batch_size]
        if not slots:
            self._plans[key] = None
            return None
        fields = (tuple(s[0] for s in slots), str(device))  # batch sizes folding the same fields share a plan
        if fields in self._plans_by_fields:
            self._plans[key] = self._plans_by_fields[fields]
            return self._plans[key]
        tables: list[_FoldTable] = []
        sparse_cols: list[int] = []
        prow_offsets: list[int] = []
        w_perm: list[int] = []
        prow = 0
        for d in sorted({s[1] for s in slots}):
            by_size: dict[int, list[tuple[int, int, int, int, int]]] = defaultdict(list)
            for slot in slots:
                if slot[1] == d:
                    by_size[1 << max(slot[3] - 1, 0).bit_length()].append(slot)  # next power of two >= vocab
            pad_rows, groups, first_w = [], [], len(w_perm)
            for rows in sorted(by_size):
                for col, _, row, size, xcol in by_size[rows]:
                    pad_rows += [row + min(j, size - 1) for j in range(rows)]
                    w_perm += list(range(xcol, xcol + d))
                    sparse_cols.append(col)
                    prow_offsets.append(prow)
                    prow += rows
                groups.append(_FoldGroup(len(by_size[rows]), rows))
            tables.append(
                _FoldTable(
                    dim=d,
                    pad_rows=torch.tensor(pad_rows, dtype=torch.long, device=device),
                    w_rows=len(w_perm) - first_w,
                    groups=tuple(groups),
                )
            )
        folded_cols = {c for s in slots for c in range(s[4], s[4] + s[1])}
        rest = [c for c in range(self.output_dim) if c not in folded_cols]
        w_perm += rest
        plan = _FoldPlan(
            tables=tuple(tables),
            sparse_cols=torch.tensor(sparse_cols, dtype=torch.long, device=device),
            prow_offsets=torch.tensor(prow_offsets, dtype=torch.long, device=device),
            rest_cols=torch.tensor(rest, dtype=torch.long, device=device),
            w_perm=torch.tensor(w_perm, dtype=torch.long, device=device),
            w_inverse=torch.argsort(torch.tensor(w_perm, dtype=torch.long)).to(device),
            rest_is_dense=rest == list(range(self.output_dim - self.num_dense, self.output_dim)),
            rows=prow,
        )
        self._plans[key] = self._plans_by_fields[fields] = plan
        return plan

    def train(self, mode: bool = True) -> FeatureEmbedding:
        """As :meth:`torch.nn.Module.train`; also drops the inference cache of projected tables."""
        self._projected_cache.clear()
        return super().train(mode)

    def _foldable(self, batch: TensorTable, weight: Tensor) -> _FoldPlan | None:
        """The fold plan for this batch, or None where the plain product runs: nothing folds, the weights
        are not on the CPU, several copies, or tracing for export (a graph without the batch-size-dependent
        plan, and without ``embedding_bag``, which ONNX has no direct operator for)."""
        if self.copies != 1 or weight.device.type != "cpu" or batch.sparse.numel() == 0 or torch.jit.is_tracing():
            return None
        return self._plan(batch.sparse.shape[0], weight.device)

    def linear(self, batch: TensorTable, x: Tensor | None, weight: Tensor, bias: Tensor) -> Tensor:
        """``x @ weight + bias`` for ``x = self(batch)`` of one copy (``[B, D]``); returns ``[B, K]``.
        ``x`` None: not computed by the caller; only what the product still reads is looked up (nothing
        when every sparse field folds and the rest are dense values, as on Census).

        Fields whose vocabulary is small against the batch are folded into the tables (module
        docstring); the other columns of ``x`` (large vocabularies, sequences, dense values) go
        through an ordinary product. Built from differentiable operations only, so gradients (of
        any order) are those of ``x @ weight + bias``. Folding runs on CPU, where all of its
        backward passes are deterministic; elsewhere, and while tracing for export, this is the plain
        product.
        """
        if self.first_layer_override is not None:
            return self.first_layer_override(batch, x, weight, bias)
        if x is None and self.copies != 1:
            raise ValueError("linear() without x needs an embedding of one copy")
        plan = self._foldable(batch, weight)
        if plan is None:
            return torch.addmm(bias, self(batch)[:, 0] if x is None else x, weight)  # [B, K]
        return self._folded(plan, batch, x, [(weight.unsqueeze(0), bias.unsqueeze(0))], sources=[(weight, bias)])[0][0]

    def stacked_linear(
        self, batch: TensorTable, x: Tensor | None, stacks: Sequence[tuple[Tensor, Tensor]]
    ) -> list[Tensor]:
        """Several stacks of maps of ``x = self(batch)`` (one copy, ``[B, D]``): for each ``(weight, bias)``
        (``[n, D, out]``, ``[n, out]``, as :class:`~mtrec.nn.batched.BatchedLinear` holds them),
        ``x @ weight[i] + bias[i]`` for every member ``i``, as ``[n, B, out]``. ``x`` None: as in
        :meth:`linear`.

        The same maps as :meth:`linear` of the side-by-side weights, folded the same way, but each member
        of a stack of wide maps (``out >= FOLD_BLOCK_MIN_WIDTH``, e.g. the experts' first layer) gets its
        own block of the folded table and comes back contiguous, ``[n, B, out]``, the layout a batched
        product of the next layer reads (see :class:`_SumRows`); narrow maps (gates) share one block.
        Where nothing folds (or while tracing for export, or with ``first_layer_override`` set) this is
        :meth:`linear` of the side-by-side weights, split into members.
        """
        plan = self._foldable(batch, stacks[0][0]) if self.first_layer_override is None else None
        if plan is None:  # the plain product, or the override (which linear() calls)
            weight = torch.cat([w.transpose(0, 1).reshape(w.shape[1], -1) for w, _ in stacks], dim=1)
            y = self.linear(batch, x, weight, torch.cat([b.reshape(-1) for _, b in stacks]))  # [B, sum n*out]
            sizes = [w.shape[0] * w.shape[2] for w, _ in stacks]
            return [
                part.view(part.shape[0], w.shape[0], w.shape[2]).transpose(0, 1)
                for part, (w, _) in zip(y.split(sizes, dim=1), stacks)
            ]
        blocked = []
        for w, b in stacks:  # narrow maps: all members side by side in one block
            if w.shape[2] < FOLD_BLOCK_MIN_WIDTH and w.shape[0] > 1:
                w, b = w.transpose(0, 1).reshape(1, w.shape[1], -1), b.reshape(1, -1)
            blocked.append((w, b))
        outs = self._folded(plan, batch, x, blocked, sources=[(w, b) for w, b in stacks])
        return [
            y if y.shape[0] == w.shape[0] else y[0].view(y.shape[1], w.shape[0], w.shape[2]).transpose(0, 1)
            for y, (w, _) in zip(outs, stacks)
        ]

    def _folded(
        self,
        plan: _FoldPlan,
        batch: TensorTable,
        x: Tensor | None,
        maps: Sequence[tuple[Tensor, Tensor]],
        sources: Sequence[tuple[Tensor, Tensor]],
    ) -> list[Tensor]:
        """For each ``(weight [m, D, width], bias [m, width])``: ``x @ weight[e] + bias[e]`` for every block
        ``e``, as ``[m, B, width]``, with ``x``'s folded columns looked up from projected tables.
        ``sources``: per map, the tensors its weight and bias were formed from (the cache's key, see
        :meth:`_projected`)."""
        # [B, F_folded + 1]: every folded field's row, and the bias row every sample adds once
        # (32-bit: less to read per lookup, and a faster sort in the backward pass)
        pid = F.pad(batch.sparse.index_select(1, plan.sparse_cols) + plan.prow_offsets, (0, 1), value=plan.rows)
        pid = pid.to(torch.int32)
        # [B, R]; the dense values straight from the batch when they are all that is left, so that no
        # (all-zero) gradient flows back through the embedding's own lookup
        if not len(plan.rest_cols):
            x_rest = None
        elif plan.rest_is_dense:
            x_rest = batch.dense
        else:
            x_rest = (self(batch)[:, 0] if x is None else x).index_select(1, plan.rest_cols)
        grad = torch.is_grad_enabled()
        order = _RowOrder()  # one sort of the ids for the backward passes of every map
        e_pads: dict[int, Tensor] = {}  # the embedding rows of every folded field, padded per group (shared)
        outs = []
        for j, ((weight, bias), source) in enumerate(zip(maps, sources)):
            m = weight.shape[0]
            if grad:
                table_p, w_all = self._project(plan, weight, bias, e_pads, grad)
            else:
                table_p, w_all = self._projected(plan, j, weight, bias, source, e_pads)
            w_rest = w_all if x_rest is not None else None  # [m, R, width]
            if grad and any(t is not None and t.requires_grad for t in (table_p, x_rest, w_rest)):
                outs.append(_SumRows.apply(table_p, pid, m, x_rest, w_rest, order))  # [m, B, width]
            else:  # inference: the same sums
                outs.append(_sum_rows(table_p, pid, m, x_rest, w_rest))
        return outs

    def _project(
        self, plan: _FoldPlan, weight: Tensor, bias: Tensor, e_pads: dict[int, Tensor], grad: bool
    ) -> tuple[Tensor, Tensor]:
        """One map's projected table ``[m * rows, width]`` (per block: ``E_f @ W_f`` of every folded field,
        then the bias row) and its unfolded rows of ``W`` ``[m, R, width]``."""
        m, _, width = weight.shape
        k = m * width
        for t in plan.tables:
            if t.dim not in e_pads:
                e_pads[t.dim] = self.tables[str(t.dim)].weight.index_select(0, t.pad_rows)
        w_wide = weight.transpose(0, 1).reshape(-1, k)  # [D, m * width]: the blocks side by side
        # rows of W regrouped: each table's folded fields (group order), then the unfolded columns
        if grad and w_wide.requires_grad:
            w_perm = _PermuteRows.apply(w_wide, plan.w_perm, plan.w_inverse)  # [D, m * width]
        else:  # inference (and export): a plain gather
            w_perm = w_wide.index_select(0, plan.w_perm)
        w_tables = w_perm.split([t.w_rows for t in plan.tables] + [len(plan.rest_cols)])
        projected: list[Tensor] = []
        for table, w_fold in zip(plan.tables, w_tables):  # w_fold: [sum count * d, m * width]
            d = table.dim
            e_parts = e_pads[d].split([g.count * g.rows for g in table.groups])
            w_parts = w_fold.split([g.count * d for g in table.groups])
            for g, e, w in zip(table.groups, e_parts, w_parts):
                # [count, rows, m * width] = E_f @ W_f for every field f of the group
                p = torch.bmm(e.view(g.count, g.rows, d), w.view(g.count, d, k))
                projected.append(p.view(g.count * g.rows, m, width).transpose(0, 1))  # [m, count * rows, width]
        projected.append(bias.view(m, 1, width))
        table_p = torch.cat(projected, dim=1).view(m * (plan.rows + 1), width)  # [m * rows, width]
        return table_p, w_tables[-1].view(-1, m, width).transpose(0, 1)  # [m, R, width]

    def _projected(
        self,
        plan: _FoldPlan,
        j: int,
        weight: Tensor,
        bias: Tensor,
        source: tuple[Tensor, Tensor],
        e_pads: dict[int, Tensor],
    ) -> tuple[Tensor, Tensor]:
        """:meth:`_project` without autograd, kept between calls while its inputs are unchanged: scoring
        batch after batch (validation, ``predict``, the service) projects the tables once instead of per
        batch (on a 500-candidate request about half of the model's time). The entry is valid while
        ``source`` (the map's weight and bias as the caller holds them) and the embedding tables are
        the same tensors, at the same version (every in-place change, an optimiser step or a loaded
        state, bumps it) and storage; the entry holds them, so neither identity can be reused meanwhile.
        """
        tensors = (*source, *(self.tables[str(t.dim)].weight for t in plan.tables))
        stamp = tuple((t._version, t.data_ptr()) for t in tensors)
        key = (id(plan), j)
        entry = self._projected_cache.get(key)
        if entry is not None and len(entry[0]) == len(tensors):
            if all(a is b for a, b in zip(entry[0], tensors)) and entry[1] == stamp:
                return entry[2], entry[3]
        table_p, w_rest = self._project(plan, weight, bias, e_pads, grad=False)
        if len(self._projected_cache) >= PROJECTED_CACHE_SIZE:
            self._projected_cache.pop(next(iter(self._projected_cache)))
        self._projected_cache[key] = (tensors, stamp, table_p, w_rest)
        return table_p, w_rest
