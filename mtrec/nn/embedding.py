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
"""

from __future__ import annotations

from collections import defaultdict
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


class _SumRows(torch.autograd.Function):
    """``out[b] = sum_f table[ids[b, f]]`` (``F.embedding_bag`` in sum mode, ``ids`` ``[B, F]``), with a
    cheaper backward on CPU.

    The gradient of row ``v`` is the sum of ``grad[b]`` over the samples ``b`` whose ids hold ``v``.
    ``embedding_bag``'s CPU backward sorts the flattened ids and then adds the gradient rows one by one
    (4.6 ms of a 25 ms Census MMoE step on one thread). Here the same sort gives, per row, its samples
    in the same order, and a second ``embedding_bag`` sums those rows of ``grad``: the same sums in the
    same order (bit-identical gradients) in 3.9 ms. The backward is made of differentiable operations,
    so higher-order gradients still work.
    """

    @staticmethod
    def forward(ctx, table: Tensor, ids: Tensor) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.rows = table.shape[0]
        return F.embedding_bag(ids, table, mode="sum")  # [B, K]

    @staticmethod
    def backward(ctx, grad: Tensor):
        (ids,) = ctx.saved_tensors
        # the sort embedding_bag's backward does (the same call on the same ids: the same order of the
        # samples within a row, so the same sums in the same order)
        sorted_ids, position = torch.sort(ids.reshape(-1))  # position = b * F + f
        counts = torch.bincount(sorted_ids, minlength=ctx.rows)  # [rows]
        offsets = counts.cumsum(0) - counts  # where each row's samples start in the sorted order
        samples = torch.div(position, ids.shape[1], rounding_mode="floor")  # [B * F], grouped by row
        return F.embedding_bag(samples, grad, offsets, mode="sum"), None  # [rows, K]


@dataclass(frozen=True)
class _FoldPlan:
    tables: tuple[_FoldTable, ...]
    sparse_cols: Tensor  # [F_folded] columns of ``batch.sparse`` that are folded
    prow_offsets: Tensor  # [F_folded] row of the projected table holding each folded field's id 0
    rest_cols: Tensor  # [R] columns of ``x`` that are not folded (other fields, sequences, dense)
    w_perm: Tensor  # [D] rows of ``W``: every table's folded fields in group order, then ``rest_cols``
    w_inverse: Tensor  # [D] the inverse permutation
    rest_is_dense: bool  # the unfolded columns are exactly the dense values (no gradient to route back)


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

    def input(self) -> Tensor:
        """``x`` itself, ``[B, D]``, for a layer that cannot fold."""
        return self.embedding(self.batch)[:, 0]


class FeatureEmbedding(nn.Module):
    """Embeds a batch into ``[B, copies, output_dim]``."""

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
        )
        self._plans[key] = plan
        return plan

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
        # while tracing for export, the plain product: a graph without the batch-size-dependent fold plan
        # (and without embedding_bag, which ONNX has no direct operator for)
        if x is None and self.copies != 1:
            raise ValueError("linear() without x needs an embedding of one copy")
        foldable = (
            self.copies == 1 and weight.device.type == "cpu" and batch.sparse.numel() > 0 and not torch.jit.is_tracing()
        )
        plan = self._plan(batch.sparse.shape[0], weight.device) if foldable else None
        if plan is None:
            return torch.addmm(bias, self(batch)[:, 0] if x is None else x, weight)  # [B, K]
        k = weight.shape[1]
        # rows of W regrouped: each table's folded fields (group order), then the unfolded columns
        if torch.is_grad_enabled() and weight.requires_grad:
            w_perm = _PermuteRows.apply(weight, plan.w_perm, plan.w_inverse)  # [D, K]
        else:  # inference (and export): a plain gather
            w_perm = weight.index_select(0, plan.w_perm)  # [D, K]
        w_tables = w_perm.split([t.w_rows for t in plan.tables] + [len(plan.rest_cols)])
        projected: list[Tensor] = []
        for table, w_fold in zip(plan.tables, w_tables):  # w_fold: [sum count * d, K]
            d = table.dim
            e_pad = self.tables[str(d)].weight.index_select(0, table.pad_rows)  # [sum count * rows, d]
            e_parts = e_pad.split([g.count * g.rows for g in table.groups])
            w_parts = w_fold.split([g.count * d for g in table.groups])
            for g, e, w in zip(table.groups, e_parts, w_parts):
                p = torch.bmm(e.view(g.count, g.rows, d), w.view(g.count, d, k))  # [count, rows, K] = E_f @ W_f
                projected.append(p.view(g.count * g.rows, k))
        table_p = torch.cat(projected) if len(projected) > 1 else projected[0]  # [V_padded, K]
        pid = batch.sparse.index_select(1, plan.sparse_cols) + plan.prow_offsets  # [B, F_folded]
        # [B, R]; the dense values straight from the batch when they are all that is left, so that no
        # (all-zero) gradient flows back through the embedding's own lookup
        if plan.rest_is_dense:
            x_rest = batch.dense
        else:
            x_rest = (self(batch)[:, 0] if x is None else x).index_select(1, plan.rest_cols)
        y = torch.addmm(bias, x_rest, w_tables[-1])  # [B, K]: the unfolded part
        if torch.is_grad_enabled() and table_p.requires_grad:
            return y + _SumRows.apply(table_p, pid)  # [B, K]: plus every folded field's row
        return y + F.embedding_bag(pid, table_p, mode="sum")  # inference: the same sum
