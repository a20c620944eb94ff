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
the gates are one map ``x @ [W_experts | W_gates]``, computed folded into the
embedding tables (:meth:`mtrec.nn.embedding.FeatureEmbedding.linear`): same
values, about a third of the work on small-vocabulary data.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtrec.nn.batched import BatchedLinear, BatchedMLP, shared_input_weights
from mtrec.nn.embedding import Embedded


class MixtureLayer(nn.Module):
    """Experts + gates; ``forward`` returns (mixed ``[G, B, H]``, gate weights ``[G, B, E]``).

    Gate order: the task gates (when ``task_gates``), then the shared gate (when ``shared_gate``).
    """

    def __init__(
        self,
        in_dim: int,
        expert_hidden: Sequence[int],
        specific: Sequence[int],
        shared: int,
        task_gates: bool = True,
        shared_gate: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        num_tasks = len(specific)
        group = [t for t, k in enumerate(specific) for _ in range(k)] + [num_tasks] * shared
        if not group:
            raise ValueError("a mixture layer needs at least one expert")
        if not task_gates and not shared_gate:
            raise ValueError("a mixture layer needs at least one gate")
        gate_group = (list(range(num_tasks)) if task_gates else []) + ([num_tasks] if shared_gate else [])
        expert_group = torch.tensor(group)
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
        self.register_buffer("gate_group", torch.tensor(gate_group), persistent=False)
        self.register_buffer("allowed", allowed, persistent=False)
        self.masked = not bool(allowed.all())
        self.experts = BatchedMLP(self.num_experts, in_dim, expert_hidden, dropout)
        self.gates = BatchedLinear(self.num_gates, in_dim, self.num_experts)
        self.out_dim = self.experts.out_dim

    def forward(self, x: Tensor, embedded: Embedded | None = None) -> tuple[Tensor, Tensor]:
        """``x``: ``[B, in]`` read by every expert and gate, or ``[T+1, B, in]``, one input per group.

        ``embedded``: when ``x`` is exactly an embedding of a batch, that embedding and batch, so the
        first maps may be folded into the tables; the result is the same either way.
        """
        mixed, weights, _ = self.mix(x, embedded)
        return mixed, weights

    def mix(self, x: Tensor, embedded: Embedded | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """As :meth:`forward`, plus the expert outputs ``[E, B, H]`` the gates mixed: the representation
        every gate reads, which representation-level balancing differentiates against."""
        if x.dim() == 2 and embedded is not None and self._one_first_map(x):
            first: BatchedLinear = self.experts.layers[0]
            weight, bias = shared_input_weights([first, self.gates])  # [in, E*H1 + G*E], [E*H1 + G*E]
            y = embedded.linear(x, weight, bias)  # [B, E*H1 + G*E]
            pre, gate_logits = y.split([first.n * first.out_dim, self.gates.n * self.gates.out_dim], dim=1)
            h = self.experts.forward_from_first(first.split_members(pre))  # [E, B, H]
            logits = self.gates.split_members(gate_logits)  # [G, B, E]
        else:
            if x.dim() == 2:
                expert_in, gate_in = x, x
            else:
                expert_in = x.index_select(0, self.expert_group)  # [E, B, in]
                gate_in = x.index_select(0, self.gate_group)  # [G, B, in]
            h = self.experts(expert_in)  # [E, B, H]
            logits = self.gates(gate_in)  # [G, B, E]
        if self.masked:
            logits = logits.masked_fill(~self.allowed.unsqueeze(1), float("-inf"))
        weights = torch.softmax(logits, dim=-1)  # [G, B, E]
        mixed = torch.einsum("gbe,ebh->gbh", weights, h)  # [G, B, H]
        return mixed, weights, h

    def _one_first_map(self, x: Tensor) -> bool:
        """Whether the experts' first layer and the gates are plain stacked maps of ``x`` (not, e.g.,
        cross networks installed as experts, or gates reading another input)."""
        return (
            isinstance(self.experts, BatchedMLP)
            and isinstance(self.gates, BatchedLinear)
            and self.experts.layers[0].in_dim == self.gates.in_dim == x.shape[1]
        )
