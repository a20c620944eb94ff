"""Sub-Network Routing (Ma et al., "SNR: Sub-Network Routing for Flexible Parameter Sharing
in Multi-Task Learning", AAAI 2019): ``snr_trans`` and ``snr_aver``.

The shared bottom is cut into levels of sub-networks. The input ``u_j`` of an
upper sub-network (or of task tower ``j``, the top consumers) is built from the
outputs ``v_i`` of the sub-networks below through coding variables ``z_ji``:

- SNR-Trans: ``u_j = sum_i z_ji W_ji v_i`` (a transformation matrix per connection);
- SNR-Aver:  ``u_j = sum_i z_ji v_i`` (a weighted sum with the codes as weights).

Each ``z_ji`` follows the hard concrete distribution (Louizos et al., ICLR 2018):
``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)`` with ``u ~ U(0, 1)``,
stretched to ``(gamma, zeta)`` and clipped to ``[0, 1]``, so a connection can be
exactly closed or exactly open yet stays differentiable in ``log_alpha``. The
expected number of open connections, ``sum sigmoid(log_alpha - beta log(-gamma / zeta))``,
times ``l0_weight`` is the L0 penalty returned in ``ModelOutput.aux_loss``. At
evaluation the codes are deterministic: ``clip(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1)``.

One code sample is drawn per connection and per forward pass (per mini-batch), so a
routing stays one batched product: with the codes folded into the stacked matrices,
SNR-Trans is a single ``[B, I*H] x [I*H, J*D]`` contraction and SNR-Aver one ``einsum``.
Sub-networks of a level are one ``BatchedMLP``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn

from mtrec.data.tables import FeatureLayout, TensorTable
from mtrec.models.base import MODELS, ModelConfig, ModelOutput, MultiTaskModel
from mtrec.models.reach import Sharing
from mtrec.nn.batched import BatchedMLP, Towers
from mtrec.nn.embedding import FeatureEmbedding
from mtrec.nn.typed import TypedModuleList


class HardConcreteGates(nn.Module):
    """A ``[J, I]`` matrix of hard concrete coding variables with learned ``log_alpha``."""

    def __init__(
        self, consumers: int, producers: int, init_log_alpha: float, beta: float, gamma: float, zeta: float
    ) -> None:
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full((consumers, producers), float(init_log_alpha)))
        self.beta, self.gamma, self.zeta = beta, gamma, zeta

    def forward(self) -> Tensor:
        """``z`` ``[J, I]``: a fresh sample in training mode, the deterministic gate in eval mode."""
        if self.training:
            u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def expected_open(self) -> Tensor:
        """``sum P(z != 0)``: the differentiable L0 norm of the codes."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta)).sum()


class Routing(nn.Module):
    """Builds ``u`` ``[J, B, D]`` from lower outputs ``v`` ``[I, B, H]`` through coded connections."""

    def __init__(self, producers: int, consumers: int, dim: int, transform: bool, gate_options: dict) -> None:
        super().__init__()
        self.gates = HardConcreteGates(consumers, producers, **gate_options)
        self.transform = None
        if transform:
            bound = 1.0 / math.sqrt(producers * dim)  # fan-in of u_j with every connection open
            self.transform = nn.Parameter(torch.empty(consumers, producers, dim, dim).uniform_(-bound, bound))

    def forward(self, v: Tensor) -> tuple[Tensor, Tensor]:
        z = self.gates()  # [J, I]
        if self.transform is None:
            return torch.einsum("ji,ibh->jbh", z, v), z  # SNR-Aver, [J, B, H]
        w = self.transform * z[:, :, None, None]  # [J, I, H, D], codes folded into the matrices
        return torch.einsum("ibh,jihd->jbd", v, w), z  # SNR-Trans, [J, B, D]


class SNRConfig(ModelConfig):
    num_levels: int = Field(2, ge=1)  # levels of sub-networks; routings sit above each level
    num_subnets: int = Field(4, ge=1)  # per level
    subnet_hidden: list[int] = Field(default_factory=lambda: [128])  # each sub-network's MLP
    # Weight of the L0 penalty (expected number of open connections). Mild: it closes a connection
    # only where the tasks gain little from it; raise it for sparser, cheaper serving.
    l0_weight: float = Field(1e-3, ge=0.0)
    # Initial log_alpha: 2.0 starts every connection mostly open (deterministic z ~ 0.96) while about
    # 37% of training samples of z stay inside (0, 1), where log_alpha gets a gradient from the first step.
    init_log_alpha: float = 2.0
    # Hard concrete temperature and stretch interval: the values recommended by Louizos et al. (2018).
    beta: float = Field(2.0 / 3.0, gt=0.0)
    gamma: float = Field(-0.1, lt=0.0)
    zeta: float = Field(1.1, gt=1.0)


class _SNR(MultiTaskModel):
    Config: ClassVar[type[ModelConfig]] = SNRConfig
    config: SNRConfig
    transform = True

    def __init__(self, layout: FeatureLayout, config: SNRConfig) -> None:
        super().__init__(layout, config)
        gate_options = dict(
            init_log_alpha=config.init_log_alpha, beta=config.beta, gamma=config.gamma, zeta=config.zeta
        )
        k = config.num_subnets
        self.embedding = FeatureEmbedding(layout)
        first = BatchedMLP(k, self.embedding.output_dim, config.subnet_hidden, config.dropout)
        h = first.out_dim
        self.subnets = TypedModuleList[BatchedMLP](
            [first] + [BatchedMLP(k, h, config.subnet_hidden, config.dropout) for _ in range(config.num_levels - 1)]
        )
        self.routes = TypedModuleList[Routing](
            Routing(k, k, h, self.transform, gate_options) for _ in range(config.num_levels - 1)
        )
        self.task_route = Routing(k, self.num_tasks, h, self.transform, gate_options)
        self.towers = Towers(self.num_tasks, h, config.tower_hidden, config.dropout)

    def declare_sharing(self, s: Sharing) -> None:
        """Sub-networks and the routings between them are shared; the task routing's row ``t`` (its codes
        and matrices) feeds tower ``t`` only. By structure: a code sampled at exactly 0 closes a connection
        for one batch without changing whose parameter it is."""
        t = self.num_tasks
        s.reach(self.embedding).reach(self.subnets).reach(self.routes).per_task(self.towers)
        route = self.task_route
        s.elements(route.gates.log_alpha, torch.arange(t).view(t, 1), [[i] for i in range(t)])
        if route.transform is not None:
            s.elements(route.transform, torch.arange(t).view(t, 1, 1, 1), [[i] for i in range(t)])
        s.last_layer(self.subnets[-1].last_layer)

    def l0_penalty(self) -> Tensor:
        """``l0_weight * sum P(z != 0)`` over every coding variable."""
        routings = [*self.routes, self.task_route]
        return self.config.l0_weight * sum(r.gates.expected_open() for r in routings)

    def forward(self, batch: TensorTable, return_gates: bool = False) -> ModelOutput:
        x = self.embedding(batch).squeeze(1)  # [B, D]
        b = x.shape[0]
        v = self.subnets[0](x)  # [K, B, H]
        gates: dict[str, Tensor] = {}
        for level, (route, subnets) in enumerate(zip(self.routes, self.subnets[1:])):
            u, z = route(v)  # [K, B, H], [K, K]
            v = subnets(u)  # [K, B, H]
            if return_gates:
                gates.update({f"route{level}/sub{j}": z[j].expand(b, -1) for j in range(z.shape[0])})
        u, z = self.task_route(v)  # [T, B, H], [T, K]
        if return_gates:
            gates.update({name: z[t].expand(b, -1) for t, name in enumerate(self.task_names)})
        aux = self.l0_penalty() if self.config.l0_weight > 0 else None
        return ModelOutput(logits=self.towers(u), gates=gates, shared=v, aux_loss=aux)


@MODELS.register(
    "snr_trans",
    "sub-network routing: coded transformation matrices between sub-network levels, L0 penalty (Ma et al. 2019)",
)
class SNRTrans(_SNR):
    """SNR-Trans: ``u_j = sum_i z_ji W_ji v_i``."""


@MODELS.register(
    "snr_aver", "sub-network routing: coded weighted sums between sub-network levels, L0 penalty (Ma et al. 2019)"
)
class SNRAver(_SNR):
    """SNR-Aver: ``u_j = sum_i z_ji v_i``."""

    transform = False
