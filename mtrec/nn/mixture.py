"""Mixture-of-experts layer covering OMoE, MMoE, CGC and one PLE extraction level.

Experts belong to groups: group ``t`` holds task ``t``'s specific experts,
group ``T`` the shared ones. A gate reads one group's input and mixes the
experts it may see (task gate ``t``: its own plus the shared experts; the
shared gate of an inner PLE level: all of them). All experts run as one
``BatchedMLP``; all gates as one ``BatchedLinear`` whose disallowed logits are
masked to ``-inf`` before the softmax, so the mixing of every gate is one
``einsum``. Gate weights come back as ``[G, B, E]`` with zeros where a gate may
not look, which is what a gate-usage heatmap wants.

When every expert and gate reads the same embedded batch and the caller says
so (``embedded=``; ``mmoe`` and ``omoe`` do), the experts' first linear map and
the gates are computed folded into the embedding tables
(:meth:`mtrec.nn.embedding.FeatureEmbedding.stacked_linear`, the experts' maps as
``[E, B, H]`` blocks): same values, about a third of the work on small-vocabulary
data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from mtrec.nn.batched import BatchedLinear, BatchedMLP
from mtrec.nn.bottoms import BatchedDCNv2
from mtrec.nn.embedding import Embedded


def gate_softmax(logits: Tensor) -> Tensor:
    """Gate weights ``[G, B, E]`` from gate logits ``[G, B, E]``: the softmax over the experts.

    In PyTorch taken as the first dimension of an ``[E, G, B]`` layout (along a last dimension of a few
    experts, CPU softmax kernels take over ten times as long), made contiguous again (the batched products
    of :func:`mix_experts` are slow on the permuted layout). While tracing for export, the plain softmax over
    the last axis, which ONNX Runtime runs without the two transposes."""
    if torch.jit.is_tracing():
        return torch.softmax(logits, dim=-1)
    return torch.softmax(logits.permute(2, 0, 1), dim=0).permute(1, 2, 0).contiguous()


def mix_experts(weights: Tensor, h: Tensor) -> Tensor:
    """``[G, B, H]``: each gate's mixture of the experts' outputs ``h`` ``[E, B, H]`` with its weights
    ``[G, B, E]``. An ``einsum`` in PyTorch; while tracing for export, the same sums as one batched
    ``MatMul`` over the samples (ONNX Runtime's ``Einsum`` takes 2-3x as long on 500 candidates)."""
    if torch.jit.is_tracing():
        return torch.matmul(weights.transpose(0, 1), h.transpose(0, 1)).transpose(0, 1)
    return torch.einsum("gbe,ebh->gbh", weights, h)


class MixtureLayer(nn.Module):
    """Experts + gates; ``forward`` returns (mixed ``[G, B, H]``, gate weights ``[G, B, E]``).

    Gate order: the task gates (when ``task_gates``), then the shared gate (when ``shared_gate``).
    """

    # buffers (register_buffer), declared for the type checker
    expert_group: Tensor
    gate_group: Tensor
    allowed: Tensor

    def __init__(
        self,
        in_dim: int,
        expert_hidden: Sequence[int],
        specific: Sequence[int],
        shared: int,
        task_gates: bool = True,
        shared_gate: bool = False,
        dropout: float = 0.0,
        experts: Callable[[int, int], BatchedMLP | BatchedDCNv2] | None = None,
    ) -> None:
        """``experts``: how to build the expert stack from ``(count, in_dim)`` (a bottom's
        :func:`~mtrec.nn.bottoms.expert_stacks`); default one MLP per expert (``expert_hidden``, ``dropout``)."""
        super().__init__()
        num_tasks = len(specific)
        group = [t for t, k in enumerate(specific) for _ in range(k)] + [num_tasks] * shared
        if not group:
            raise ValueError("a mixture layer needs at least one expert")
        if not task_gates and not shared_gate:
            raise ValueError("a mixture layer needs at least one gate")
        gate_group = (list(range(num_tasks)) if task_gates else []) + ([num_tasks] if shared_gate else [])
        expert_group = torch.tensor(group, device="cpu")  # a structural mask: checked here, even on the meta device
        allowed = torch.stack(
            [
                torch.ones_like(expert_group, dtype=torch.bool)
                if g == num_tasks
                else (expert_group == g) | (expert_group == num_tasks)
                for g in gate_group
            ]
        )  # [G, E]
        if not allowed.any(1).all():
            raise ValueError("a task gate sees no expert: give the task specific or shared experts")
        self.num_tasks = num_tasks
        self.num_experts = len(group)
        self.num_gates = len(gate_group)
        self.register_buffer("expert_group", expert_group, persistent=False)
        self.register_buffer("gate_group", torch.tensor(gate_group, device="cpu"), persistent=False)
        self.register_buffer("allowed", allowed, persistent=False)
        self.masked = not bool(allowed.all())
        self.experts: BatchedMLP | BatchedDCNv2 = (
            BatchedMLP(self.num_experts, in_dim, expert_hidden, dropout)
            if experts is None
            else experts(self.num_experts, in_dim)
        )
        self.gates = BatchedLinear(self.num_gates, in_dim, self.num_experts)
        self.out_dim = self.experts.out_dim

    def forward(self, x: Tensor, embedded: Embedded | None = None) -> tuple[Tensor, Tensor]:
        """``x``: ``[B, in]`` read by every expert and gate, or ``[T+1, B, in]``, one input per group.

        ``embedded``: when ``x`` is exactly an embedding of a batch, that embedding and batch, so the
        first maps may be folded into the tables; the result is the same either way.
        """
        mixed, weights, _ = self.mix(x, embedded)
        return mixed, weights

    def mix(self, x: Tensor | None, embedded: Embedded | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """As :meth:`forward`, plus the expert outputs ``[E, B, H]`` the gates mixed: the representation
        every gate reads, which representation-level balancing differentiates against. ``x`` None (with
        ``embedded``): the embedding of the batch, not computed yet; a folded first map then looks up
        only what it reads."""
        experts = self.experts
        in_dim = embedded.embedding.output_dim if x is None and embedded is not None else None
        if (
            embedded is not None
            and (x is None or x.dim() == 2)
            and isinstance(experts, BatchedMLP)
            and self._one_first_map(in_dim if x is None else x.shape[1])
        ):
            first = experts.layers[0]
            maps = [(first.weight, first.bias), (self.gates.weight, self.gates.bias)]
            pre, logits = embedded.stacked_linear(x, maps)  # [E, B, H1], [G, B, E]
            h = experts.forward_from_first(pre)  # [E, B, H]
        else:
            if x is None:
                if embedded is None:
                    raise ValueError("mix() needs x or embedded")
                x = embedded.input()  # [B, in]
            if x.dim() == 2:
                expert_in, gate_in = x, x
            else:
                expert_in = x.index_select(0, self.expert_group)  # [E, B, in]
                gate_in = x.index_select(0, self.gate_group)  # [G, B, in]
            h = self.experts(expert_in)  # [E, B, H]
            logits = self.gates(gate_in)  # [G, B, E]
        if self.masked:
            logits = logits.masked_fill(~self.allowed.unsqueeze(1), float("-inf"))
        weights = gate_softmax(logits)  # [G, B, E]
        return mix_experts(weights, h), weights, h  # [G, B, H]

    def _one_first_map(self, in_dim: int | None) -> bool:
        """Whether the experts' first layer and the gates are plain stacked maps of one ``[B, in_dim]`` input
        (not, e.g., a bottom's cross networks as experts, or gates reading another input)."""
        return (
            isinstance(self.experts, BatchedMLP)
            and isinstance(self.gates, BatchedLinear)
            and self.experts.layers[0].in_dim == self.gates.in_dim == in_dim
        )
