"""Balancer and model options are validated by pydantic configs: an unknown, non-finite or
out-of-range option, or ``--task-weights`` given to a balancer that has no use for them, is one
error naming the part and the option and listing the options it takes (issue 11)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mtrec.balancing import BALANCERS, StepContext, build_balancer, validate_balancer_options
from mtrec.balancing.imtl import imtl_weights
from mtrec.cli import app
from mtrec.errors import MtrecError
from mtrec.models import MODELS
from tests.helpers import write_toy

TASKS = ["a", "b"]
# the balancers that refuse --task-weights, each saying why in its docstring
REFUSE_TASK_WEIGHTS = {"dtp", "famo", "imtl", "rlw"}


@pytest.fixture
def no_data_schema(tmp_path: Path) -> Path:
    """A valid toy schema whose data file is gone: an option error must come before any data is read
    (otherwise the error would be 'data file not found')."""
    schema = write_toy(tmp_path / "toy")
    (tmp_path / "toy" / "toy.csv").unlink()
    return schema


def _train_error(schema: Path, out: Path, *args: str) -> str:
    """Run ``mtrec train`` in-process and return the user error it ends with."""
    result = CliRunner().invoke(
        app, ["train", "--schema", str(schema), "--model", "mmoe", "--out", str(out), "--threads", "1", *args]
    )
    assert result.exit_code != 0, result.output
    if isinstance(result.exception, MtrecError):
        return str(result.exception)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output  # handled inside the app
    return result.output


# ---- through the CLI ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fixed", "dwa", "pcgrad", "staged", "famo"])
def test_cli_balancer_args_typo_names_it_and_lists_the_options(name: str, no_data_schema: Path, tmp_path: Path) -> None:
    message = _train_error(no_data_schema, tmp_path / "run", "--balancer", name, "--balancer-args", "typo=3")
    assert f"balancer '{name}'" in message and "no option typo" in message
    listed = message.split("its options:")[1]
    for option in BALANCERS.get(name).Config.model_fields:
        assert option in listed, (option, message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "weights, problem",
    [
        ("nan,1", "task_weights[0]=nan is not finite"),
        ("1,inf", "task_weights[1]=inf is not finite"),
        ("-1,2", "task_weights[0]=-1.0: input should be greater than or equal to 0"),
        ("0,0", "task_weights are all 0"),
        ("1,2,3", "task_weights gives 3 value(s) for 2 tasks (click, watch)"),
    ],
)
def test_cli_fixed_rejects_bad_task_weights(weights: str, problem: str, no_data_schema: Path, tmp_path: Path) -> None:
    message = _train_error(no_data_schema, tmp_path / "run", "--task-weights", weights)
    assert message.startswith("balancer 'fixed': ") and problem in message, message


@pytest.mark.parametrize("name", sorted(REFUSE_TASK_WEIGHTS))
def test_cli_task_weights_refused_where_unused(name: str, no_data_schema: Path, tmp_path: Path) -> None:
    message = _train_error(no_data_schema, tmp_path / "run", "--balancer", name, "--task-weights", "1,2")
    assert f"balancer '{name}' does not use --task-weights: " in message, message


def test_cli_model_args_typo_and_bad_value_list_the_model_options(no_data_schema: Path, tmp_path: Path) -> None:
    options = list(MODELS.get("mmoe").Config.model_fields)
    assert {"num_experts", "expert_hidden", "tower_hidden", "dropout"} <= set(options)
    for args, problem in [
        ("typo=3", "no option typo"),
        ("dropout=2", "dropout=2: input should be less than 1"),
        ("num_experts=many", "num_experts='many' is not a whole number"),
    ]:
        message = _train_error(no_data_schema, tmp_path / "run", "--model-args", args)
        assert message.startswith("model 'mmoe': ") and problem in message, message
        listed = message.split("its options:")[1]
        assert all(option in listed for option in options), message
        assert "num_experts=8" in listed  # with the defaults


def test_cli_dwa_trains_with_task_weights(tmp_path: Path) -> None:
    """DWA uses --task-weights: with no loss history yet (epoch 1) its weights are exactly them."""
    schema = write_toy(tmp_path / "toy", rows=300)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--schema",
            str(schema),
            "--model",
            "shared_bottom",
            "--out",
            str(out),
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--threads",
            "1",
            "--no-tensorboard",
            "--balancer",
            "dwa",
            "--balancer-args",
            "temperature=3",
            "--task-weights",
            "2,0.5",
        ],
    )
    assert result.exit_code == 0, (result.output, result.exception)
    (record,) = json.loads((out / "history.json").read_text())
    assert record["weights"] == {"click": 2.0, "watch": 0.5}


# ---- every registered balancer ------------------------------------------------------------------------


@pytest.mark.parametrize("name", BALANCERS.names())
def test_every_balancer_config_builds_its_defaults_and_rejects_unknown_and_non_finite_options(name: str) -> None:
    cls = BALANCERS.get(name)
    balancer = build_balancer(name, TASKS)
    assert type(balancer) is cls and isinstance(balancer.config, cls.Config)
    assert set(balancer.weights()) in (set(), set(TASKS))
    fields = list(cls.Config.model_fields)
    with pytest.raises(MtrecError) as err:
        validate_balancer_options(name, TASKS, {"typo": 3})
    message = str(err.value)
    assert f"balancer '{name}': no option typo; its options: " in message
    assert all(field in message.split("its options:")[1] for field in fields), message
    # every number an option holds (scalar or per task) must be finite
    for field, value in balancer.config:
        numbers = value if isinstance(value, list) else [value]
        if numbers and all(isinstance(v, float) for v in numbers):
            with pytest.raises(MtrecError, match=rf"balancer '{name}': {field}(\[0\])?=nan is not finite"):
                validate_balancer_options(name, TASKS, {field: float("nan")})
    # --task-weights: used, or refused with the reason
    if name in REFUSE_TASK_WEIGHTS:
        assert "task_weights" not in fields
        with pytest.raises(MtrecError, match=rf"balancer '{name}' does not use --task-weights: \w+"):
            validate_balancer_options(name, TASKS, {}, task_weights=[1.0, 2.0])
    else:
        assert "task_weights" in fields
        assert validate_balancer_options(name, TASKS, {}, task_weights=[1.0, 2.0]).task_weights == [1.0, 2.0]


def test_direct_construction_validates_the_same_way() -> None:
    with pytest.raises(MtrecError, match=r"balancer 'fixed': task_weights\[0\]=nan is not finite"):
        BALANCERS.get("fixed")(TASKS, task_weights=[float("nan"), 1.0])
    with pytest.raises(MtrecError, match="balancer 'rlw' does not use --task-weights"):
        BALANCERS.get("rlw")(TASKS, task_weights=[1.0, 1.0])
    with pytest.raises(MtrecError, match="task weights given twice"):
        build_balancer("fixed", TASKS, {"task_weights": [1, 2]}, [1.0, 2.0])


def test_per_task_options_take_a_scalar_a_list_or_a_mapping_by_task_name() -> None:
    tasks = ["a", "b", "c"]
    by_name = build_balancer("dtp", tasks, {"gamma": {"c": 3, "a": 1, "b": 2}})
    torch.testing.assert_close(by_name.gamma, torch.tensor([1.0, 2.0, 3.0]))
    assert build_balancer("dtp", tasks, {"gamma": 0.5}).gamma.tolist() == [0.5] * 3
    with pytest.raises(MtrecError, match="gamma names z, not a task; tasks: a, b, c"):
        build_balancer("dtp", tasks, {"gamma": {"a": 1, "b": 1, "z": 1}})
    with pytest.raises(MtrecError, match="gamma gives no value for task\\(s\\) c"):
        build_balancer("dtp", tasks, {"gamma": {"a": 1, "b": 1}})
    with pytest.raises(MtrecError, match=r"gamma\[1\]=-1.0: input should be greater than or equal to 0"):
        build_balancer("dtp", tasks, {"gamma": [1, -1.0, 1]})


def test_options_that_would_be_dropped_are_refused() -> None:
    with pytest.raises(MtrecError, match="initial and --task-weights both set the initial weights"):
        build_balancer("ple_schedule", TASKS, {"initial": [1, 1]}, [2.0, 1.0])
    torch.testing.assert_close(
        build_balancer("ple_schedule", TASKS, {}, [2.0, 1.0]).initial, torch.tensor([2.0, 1.0], dtype=torch.float64)
    )
    for normalize in ("l2", "loss+"):  # unit-norm gradients cancel any loss scale
        with pytest.raises(
            MtrecError,
            match=re.escape(
                f"normalize={normalize} scales every task gradient to unit norm, which cancels --task-weights"
            ),
        ):
            build_balancer("mgda", TASKS, {"normalize": normalize}, [2.0, 1.0])
    assert build_balancer("mgda", TASKS, {"normalize": "loss"}, [2.0, 1.0]).base.tolist() == [2.0, 1.0]
    with pytest.raises(MtrecError, match="stage_epochs\\[0\\]=1.5 is not a whole number"):
        build_balancer("staged", TASKS, {"stage_epochs": 1.5})


# ---- the reasons behind the task-weight decisions -------------------------------------------------------


def test_dwa_weights_are_dwa_times_the_task_weights() -> None:
    base = [2.0, 1.0, 0.5]
    dwa = build_balancer("dwa", ["a", "b", "c"], {"temperature": 2.0}, base)
    ctx = StepContext(0, 1, torch.nn.Linear(1, 1))
    losses = torch.tensor([1.0, 1.0, 1.0])
    assert float(dwa.combine(losses, ctx)) == pytest.approx(3.5)  # no history: the task weights alone
    first, second = [1.0, 2.0, 3.0], [0.5, 1.8, 3.3]
    dwa.on_epoch_end(1, torch.tensor(first))
    dwa.on_epoch_end(2, torch.tensor(second))
    e = [math.exp(s / f / 2.0) for f, s in zip(first, second)]
    expected = [3 * x / sum(e) * b for x, b in zip(e, base)]
    assert list(dwa.weights().values()) == pytest.approx(expected, rel=1e-6)
    assert float(dwa.combine(torch.tensor([1.0, 2.0, 4.0]), ctx)) == pytest.approx(
        expected[0] + 2 * expected[1] + 4 * expected[2], rel=1e-6
    )


def test_famo_update_is_blind_to_constant_loss_factors() -> None:
    """Why FAMO refuses --task-weights: a constant factor on a task's loss leaves the direction of the
    update unchanged (only its length moves, through the normaliser ``c``)."""
    x = torch.tensor([0.3, -0.7, 1.1], requires_grad=True)

    def grad(scale: torch.Tensor) -> torch.Tensor:
        famo = build_balancer("famo", TASKS)
        losses = torch.stack([(x**2).sum() + 0.5, (x - 1).abs().sum()])
        x.grad = None
        famo.combine(losses * scale, StepContext(0, 1, torch.nn.Linear(1, 1))).backward()
        return x.grad.clone()

    plain, weighted = grad(torch.tensor([1.0, 1.0])), grad(torch.tensor([5.0, 0.2]))
    torch.testing.assert_close(weighted / weighted.norm(), plain / plain.norm(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(weighted, plain)  # the factors did reach the losses


def test_imtl_update_direction_is_blind_to_task_gradient_sizes() -> None:
    """Why IMTL refuses --task-weights: scaling task gradients only changes the update's length."""
    G = np.random.default_rng(3).normal(size=(3, 8))
    scaled = G * np.array([[5.0], [1.0], [0.2]])
    g, g_scaled = imtl_weights(G @ G.T) @ G, imtl_weights(scaled @ scaled.T) @ scaled
    np.testing.assert_allclose(g / np.linalg.norm(g), g_scaled / np.linalg.norm(g_scaled), atol=1e-10)
    assert not np.isclose(np.linalg.norm(g), np.linalg.norm(g_scaled))
