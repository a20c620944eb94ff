"""MetaHeac: Meta Hybrid Experts and Critics (Zhu et al., "Learning to Expand Audience via
Meta Hybrid Experts and Critics for Recommendation and Advertising", KDD 2021).

The model (Heac) shares two pools between tasks, each selected by a task-conditioned gate:

- **hybrid experts**: ``K`` expert networks over the shared embedding; task ``t``'s
  representation is ``r_t = sum_k g_k(t, x) E_k(x)`` with the expert gate
  ``g(t, x) = softmax(W_e [e_t ; x])`` reading a learned task embedding ``e_t``;
- **critics**: ``C`` prediction towers shared by all tasks; task ``t``'s prediction is
  ``ŷ_t = sum_j c_j(t, x) sigmoid(Critic_j(r_t))`` with the critic gate
  ``c(t, x) = softmax(W_c [e_t ; x])``.

**Meta training** (the "Meta" of MetaHeac) learns an initialisation that adapts in
one gradient step, as in MAML: every training batch is one episode, split into a
support half and a query half; the per-task losses on the support half give one
inner SGD step ``theta' = theta - inner_lr * grad`` on the dense parameters (experts,
critics, gates, task embeddings), and the losses returned to the trainer are the
query half's losses under ``theta'``. The outer step (the trainer's Adam) then
differentiates through the inner step (second order; ``first_order: true`` drops
the second-order term).

Simplifications, to fit the library's one-loop trainer and its fixed task set:

- the paper's meta tasks are audience-expansion campaigns sampled per episode; here
  the tasks are the schema's tasks, all present in every episode, and an episode
  is a training batch;
- the embedding tables are not adapted in the inner step (a dense fast copy of
  every table per step costs memory in proportion to the vocabularies); they learn
  in the outer step only;
- the gates read the flat embedded vector ``x`` rather than a mean of field
  embeddings (fields may have different sizes here);
- prediction and evaluation use the meta-learned parameters as they are: the
  paper's second stage (fine-tuning on a new campaign's seed users) has no
  counterpart for a fixed task set;
- ``inner_lr`` is our default, not a value from the paper.

Regression tasks mix the critics' raw outputs with the same gate.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.func import functional_call

from mtrec.data.tables import FeatureLayout, TensorTable
from mtrec.models.base import MODELS, ModelConfig, ModelOutput, MultiTaskModel
from mtrec.models.reach import Sharing
from mtrec.nn.batched import BatchedLinear, BatchedMLP
from mtrec.nn.embedding import FeatureEmbedding


class MetaHeacConfig(ModelConfig):
    num_experts: int = Field(8, ge=1)
    expert_hidden: list[int] = Field(default_factory=lambda: [128, 64])
    num_critics: int = Field(4, ge=1)
    task_embed_dim: int = Field(16, ge=1)
    meta: bool = True  # False trains Heac without the inner step
    inner_lr: float = Field(0.01, gt=0.0)
    first_order: bool = False


@MODELS.register("metaheac", "hybrid experts and critics with task-conditioned gates, meta-trained (MAML episodes)")
class MetaHeac(MultiTaskModel):
    """Shared experts and critics, per-task gates over both, one MAML step per training batch."""

    Config: ClassVar[type[ModelConfig]] = MetaHeacConfig
    config: MetaHeacConfig

    def __init__(self, layout: FeatureLayout, config: MetaHeacConfig) -> None:
        super().__init__(layout, config)
        self.embedding = FeatureEmbedding(layout)
        d = self.embedding.output_dim
        self.task_embedding = nn.Parameter(torch.randn(self.num_tasks, config.task_embed_dim) * 0.1)  # [T, e]
        self.experts = BatchedMLP(config.num_experts, d, config.expert_hidden, config.dropout)
        h = self.experts.out_dim
        # gate logits = W_x x + W_e e_t (+ b): the linear map of [e_t ; x], split so x is multiplied once
        self.gate_x = nn.Linear(d, config.num_experts + config.num_critics)
        self.gate_task = nn.Linear(config.task_embed_dim, config.num_experts + config.num_critics, bias=False)
        self.critics = BatchedMLP(config.num_critics, h, config.tower_hidden, config.dropout)
        self.critic_out = BatchedLinear(config.num_critics, self.critics.out_dim, 1)
        self._dense = [n for n, _ in self.named_parameters() if not n.startswith("embedding.")]

    def declare_sharing(self, s: Sharing) -> None:
        """Experts, critics and both gate maps serve every task. The task embedding's row ``t`` is task
        ``t``'s, except under the second-order meta step: every task's query loss then differentiates
        through the inner step taken on all tasks' support loss, which reaches every dense parameter."""
        cfg: MetaHeacConfig = self.config
        t = self.num_tasks
        s.reach(self.embedding).reach(self.experts).reach(self.gate_x).reach(self.gate_task)
        s.reach(self.critics).reach(self.critic_out).last_layer(self.experts.last_layer)
        if cfg.meta and not cfg.first_order:
            s.reach(self.task_embedding)
        else:
            s.elements(self.task_embedding, torch.arange(t).view(t, 1), [[i] for i in range(t)])

    def forward(self, batch: TensorTable, return_gates: bool = False) -> ModelOutput:
        cfg: MetaHeacConfig = self.config
        x = self.embedding(batch).squeeze(1)  # [B, D]
        b = x.shape[0]
        gate_logits = self.gate_x(x).unsqueeze(0) + self.gate_task(self.task_embedding).unsqueeze(1)  # [T, B, K + C]
        expert_gate = torch.softmax(gate_logits[..., : cfg.num_experts], dim=-1)  # [T, B, K]
        critic_gate = torch.softmax(gate_logits[..., cfg.num_experts :], dim=-1)  # [T, B, C]
        experts = self.experts(x)  # [K, B, H]
        rep = torch.einsum("tbk,kbh->tbh", expert_gate, experts)  # [T, B, H]
        scores = self.critic_out(self.critics(rep.reshape(-1, rep.shape[-1])))  # [C, T*B, 1]
        scores = scores.view(cfg.num_critics, self.num_tasks, b).permute(1, 2, 0)  # [T, B, C]
        # binary: logit of sum_j c_j sigmoid(s_j), from log-probabilities; regression: sum_j c_j s_j
        log_c = torch.log(critic_gate.clamp_min(1e-12))
        log_pos = torch.logsumexp(log_c + F.logsigmoid(scores), dim=-1)  # [T, B]
        log_neg = torch.logsumexp(log_c + F.logsigmoid(-scores), dim=-1)
        binary_logit = log_pos - log_neg
        value = (critic_gate * scores).sum(-1)
        logits = torch.where(self.is_binary.unsqueeze(1), binary_logit, value).transpose(0, 1)  # [B, T]
        gates = {}
        if return_gates:
            for t, name in enumerate(self.task_names):
                gates[f"{name}/experts"] = expert_gate[t]
                gates[f"{name}/critics"] = critic_gate[t]
        return ModelOutput(logits=logits, gates=gates, shared=rep)

    def losses(self, output: ModelOutput, batch: TensorTable) -> Tensor:
        """Training: the query half's losses after one inner step on the support half; else the plain losses."""
        cfg: MetaHeacConfig = self.config
        n = len(batch)
        if not (cfg.meta and self.training and torch.is_grad_enabled() and n >= 2):
            return super().losses(output, batch)
        half = n // 2
        support, query = batch.slice(0, half), batch.slice(half, n)
        support_out = ModelOutput(logits=output.logits[:half])  # the forward pass already ran on the whole batch
        support_loss = super().losses(support_out, support).mean()  # tasks averaged, as one episode loss
        params = dict(self.named_parameters())
        dense = [params[k] for k in self._dense]
        grads = torch.autograd.grad(support_loss, dense, create_graph=not cfg.first_order, allow_unused=True)
        fast: dict[str, Tensor] = dict(params)
        for name, p, g in zip(self._dense, dense, grads):
            if g is not None:
                fast[name] = p - cfg.inner_lr * g
        query_out = functional_call(self, fast, (query,))
        return super().losses(query_out, query)
