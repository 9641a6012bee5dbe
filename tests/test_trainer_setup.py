"""The trainer's setup side: hook order per layout, meshes, registration, initial weights.

Hooks run in the documented order, each only when its layout asks for it, and each receives
the mesh of its dimension. Models are declared on the meta device and, with
``weight_init="full"``, start from the same full weights under every layout.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, DistributedSampler

from dream_trainer.configs import DeviceParameters, TrainingParameters
from dream_trainer.trainer import Callback, ModelSetupMixin
from tests.multirank import run_on_ranks
from tests.parity_model import ParityConfig, ParityTrainer
from tests.trainer_fixtures import (
    MLP,
    MLPTrainer,
    RegressionData,
    caught,
    full_state,
    mlp_config,
)

pytestmark = pytest.mark.multirank


def mesh_facts(mesh: DeviceMesh) -> dict[str, Any]:
    """Names, shape and this rank's group (global ranks) of a mesh."""
    return {
        "names": tuple(mesh.mesh_dim_names or ()),
        "shape": tuple(mesh.shape),
        "ranks": mesh.mesh.tolist(),
    }


class HookRecorder(MLPTrainer):
    """Records every setup hook (with what it received) in ``self.calls``; compiles nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, Any]] = []

    def configure_models(self) -> None:
        default_device = torch.empty(()).device.type
        super().configure_models()
        params = {p.device.type for p in self.model.parameters()}
        self.calls.append(("configure_models", (default_device, params)))

    def apply_tensor_parallel(self, tp_mesh: DeviceMesh) -> None:
        self.calls.append(("apply_tensor_parallel", mesh_facts(tp_mesh)))
        super().apply_tensor_parallel(tp_mesh)

    def apply_context_parallel(self, cp_mesh: DeviceMesh) -> None:
        self.calls.append(("apply_context_parallel", mesh_facts(cp_mesh)))

    def apply_pipeline_parallel(self, pp_mesh: DeviceMesh) -> None:
        self.calls.append(("apply_pipeline_parallel", mesh_facts(pp_mesh)))

    def apply_activation_checkpointing(self) -> None:
        self.calls.append(("apply_activation_checkpointing", None))
        super().apply_activation_checkpointing()

    def apply_compile(self) -> None:
        self.calls.append(("apply_compile", None))  # compiling on CPU is slow: record only

    def apply_fully_shard(self, config: dict[str, Any]) -> None:
        self.calls.append(("apply_fully_shard", mesh_facts(config["mesh"])))
        super().apply_fully_shard(config)

    def apply_replicate(self, dp_replicate_mesh: DeviceMesh) -> None:
        self.calls.append(("apply_replicate", mesh_facts(dp_replicate_mesh)))
        super().apply_replicate(dp_replicate_mesh)

    def init_weights(self) -> None:
        params = list(self.model.parameters())
        kinds = {"DTensor" if isinstance(p, DTensor) else "Tensor" for p in params}
        weight = self.model.layers[0].weight
        local = weight.to_local() if isinstance(weight, DTensor) else weight
        self.calls.append(("init_weights", (kinds, {p.device.type for p in params}, local.shape)))
        super().init_weights()

    def configure_optimizers(self) -> None:
        self.calls.append(("configure_optimizers", None))
        super().configure_optimizers()

    def configure_schedulers(self) -> None:
        self.calls.append(("configure_schedulers", None))
        super().configure_schedulers()

    def configure_dataloaders(self) -> tuple[Any, Any]:
        self.calls.append(("configure_dataloaders", None))
        return super().configure_dataloaders()

    def configure_metrics(self) -> None:
        self.calls.append(("configure_metrics", None))
        super().configure_metrics()


def record_setup(params: DeviceParameters, **fields: Any) -> list[tuple[str, Any]]:
    trainer = HookRecorder(mlp_config(params, **fields))
    trainer.fit()
    assert trainer.global_step == 2
    return trainer.calls


ON_META = ("configure_models", ("meta", {"meta"}))
FULL_INIT = ("init_weights", ({"Tensor"}, {"cpu"}, (8, 4)))
AFTER_INIT = [
    ("configure_optimizers", None),
    ("configure_schedulers", None),
    ("configure_dataloaders", None),
    ("configure_metrics", None),
]


def test_single_device_runs_no_parallel_hook_and_builds_models_on_meta():
    assert record_setup(DeviceParameters.SINGLE_DEVICE()) == [ON_META, FULL_INIT, *AFTER_INIT]


def test_fsdp_x_tp_with_checkpointing_and_compile_runs_tp_ac_compile_fully_shard_in_order():
    params = DeviceParameters.FSDP(
        dp_shard=2, tensor_parallel=2, checkpoint_activations=True, compile_model=True
    )
    results = run_on_ranks(record_setup, 4, params, plan=True)
    for rank, calls in enumerate(results):
        tp_group = [rank // 2 * 2, rank // 2 * 2 + 1]
        assert calls == [
            ON_META,
            ("apply_tensor_parallel", {"names": ("tp",), "shape": (2,), "ranks": tp_group}),
            ("apply_activation_checkpointing", None),
            ("apply_compile", None),
            (
                "apply_fully_shard",
                {"names": ("dp_shard_cp",), "shape": (2,), "ranks": [rank % 2, rank % 2 + 2]},
            ),
            FULL_INIT,
            *AFTER_INIT,
        ], f"rank {rank}"


def test_ddp_runs_apply_replicate_on_the_dp_replicate_mesh_and_not_fully_shard():
    results = run_on_ranks(record_setup, 2, DeviceParameters.DDP())
    replicate = ("apply_replicate", {"names": ("dp_replicate",), "shape": (2,), "ranks": [0, 1]})
    assert results == [[ON_META, replicate, FULL_INIT, *AFTER_INIT]] * 2


def test_hsdp_runs_apply_fully_shard_with_a_2d_replicate_x_shard_mesh():
    results = run_on_ranks(record_setup, 4, DeviceParameters.HSDP(dp_shard=2))
    hsdp = {"names": ("dp_replicate", "dp_shard_cp"), "shape": (2, 2), "ranks": [[0, 1], [2, 3]]}
    assert results == [[ON_META, ("apply_fully_shard", hsdp), FULL_INIT, *AFTER_INIT]] * 4


def test_sharded_weight_init_runs_init_weights_on_the_sharded_model():
    results = run_on_ranks(record_setup, 2, DeviceParameters.FSDP(), weight_init="sharded")
    for rank, calls in enumerate(results):
        fully_shard = {"names": ("dp_shard_cp",), "shape": (2,), "ranks": [0, 1]}
        # The FSDP2 shards themselves: DTensors holding half of the (8, 4) weight each.
        sharded_init = ("init_weights", ({"DTensor"}, {"cpu"}, (4, 4)))
        assert calls == [
            ON_META,
            ("apply_fully_shard", fully_shard),
            sharded_init,
            *AFTER_INIT,
        ], f"rank {rank}"


# ------------------------------------------------------------------- registration


class RegistrationTrainer(MLPTrainer):
    """Two models, a loss module, an alias; one scheduler per optimizer."""

    def configure_models(self) -> None:
        self.policy = MLP()
        self.loss_fn = nn.CrossEntropyLoss()
        self.encoder = self.policy.layers
        self.critic = MLP()

    def configure_optimizers(self) -> None:
        self.policy_optimizer = torch.optim.SGD(self.policy.parameters(), lr=0.1)
        self.critic_optimizer = torch.optim.SGD(self.critic.parameters(), lr=0.1)

    def configure_schedulers(self) -> None:
        StepLR = torch.optim.lr_scheduler.StepLR
        self.policy_scheduler = StepLR(self.policy_optimizer, step_size=1, gamma=0.5)
        self.critic_scheduler = StepLR(self.critic_optimizer, step_size=1, gamma=0.25)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        lrs = (
            self.policy_optimizer.param_groups[0]["lr"],
            self.critic_optimizer.param_groups[0]["lr"],
        )
        self.lrs.append(lrs)
        step_critic = self.global_step % 2 == 0  # the critic steps on even steps only
        loss = self.loss_fn(self.policy(batch["x"]), batch["label"])
        if step_critic:
            loss = loss + F.mse_loss(self.critic(batch["x"]), batch["y"])
        self.backward(loss)
        self.step(self.policy_optimizer)
        if step_critic:
            self.step(self.critic_optimizer)
        return {"loss": loss.detach()}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        return {}


def test_models_optimizers_and_schedulers_are_registered_by_assignment():
    config = mlp_config(training={"n_epochs": 1, "train_steps_per_epoch": 4})
    trainer = RegistrationTrainer(config)
    trainer.lrs = []
    trainer.fit()
    models = trainer.named_models()
    # The loss module holds no parameters and the alias lives inside policy: neither is a model.
    assert list(models) == ["policy", "critic"]
    assert models["policy"] is trainer.policy and models["critic"] is trainer.critic
    assert list(trainer.named_optimizers()) == ["policy_optimizer", "critic_optimizer"]
    assert list(trainer.named_schedulers()) == ["policy_scheduler", "critic_scheduler"]
    assert trainer.named_schedulers()["critic_scheduler"] is trainer.critic_scheduler
    # Each scheduler steps exactly once per step of its own optimizer.
    assert trainer.lrs == [(0.1, 0.1), (0.05, 0.025), (0.025, 0.025), (0.0125, 0.00625)]
    assert trainer.policy_optimizer.param_groups[0]["lr"] == 0.1 * 0.5**4


# ------------------------------------------------------------ initial weights


class CaptureInitialWeights(Callback[ModelSetupMixin]):
    def post_setup(self) -> None:
        self.weights = full_state(self.trainer.model)


def initial_weights(params: DeviceParameters) -> dict[str, torch.Tensor]:
    capture = CaptureInitialWeights()
    config = ParityConfig(
        seed=11,
        device_parameters=params,
        training_parameters=TrainingParameters(max_steps=1),
        logging_parameters={"backends": []},
    )
    ParityTrainer(config, callbacks=[capture]).fit()
    return capture.weights


@pytest.fixture(scope="module")
def single_process_weights() -> dict[str, torch.Tensor]:
    return initial_weights(DeviceParameters.SINGLE_DEVICE())


@pytest.mark.parametrize(
    ("world_size", "params"),
    [
        (2, DeviceParameters.FSDP()),
        (2, DeviceParameters.FSDP(dp_shard=1, tensor_parallel=2)),
        (2, DeviceParameters.DDP()),
        (4, DeviceParameters.FSDP(dp_shard=2, tensor_parallel=2)),
    ],
    ids=["fsdp2", "tp2", "ddp2", "fsdp2_tp2"],
)
def test_full_weight_init_gives_the_single_process_weights_under_every_layout(
    single_process_weights, world_size, params
):
    for rank, weights in enumerate(run_on_ranks(initial_weights, world_size, params)):
        assert weights.keys() == single_process_weights.keys()
        for name, value in weights.items():
            assert torch.equal(value, single_process_weights[name]), f"rank {rank}: {name}"


# ----------------------------------------------------------- errors that say what to change


def assert_error(result: dict[str, Any], kind: str, *fragments: str) -> None:
    assert result.get("error") == kind, result
    for fragment in fragments:
        assert fragment in result["message"], f"{fragment!r} not in {result['message']!r}"


def fit_caught(trainer_class: type[MLPTrainer], params: DeviceParameters, **fields: Any) -> Any:
    return caught(lambda: trainer_class(mlp_config(params, **fields)).fit())


def test_tensor_parallel_without_a_plan_names_the_model_and_apply_tensor_parallel():
    params = DeviceParameters.FSDP(dp_shard=1, tensor_parallel=2)
    for result in run_on_ranks(fit_caught, 2, MLPTrainer, params, plan=False):
        assert_error(result, "RuntimeError", "model (MLP)", "MLPTrainer.apply_tensor_parallel")


def test_context_parallel_on_a_model_without_context_parallel_attention_says_what_to_call():
    # The MLP has no attention: the sharded inputs fail its first layer, and the error says why.
    params = DeviceParameters(dp_shard=1, context_parallel=2)
    for result in run_on_ranks(fit_caught, 2, MLPTrainer, params):
        assert_error(
            result, "RuntimeError", "context_parallel=2", "context_parallel_attention(q, k, v"
        )


def test_a_training_step_calling_a_pipelined_model_directly_is_told_what_to_call():
    params = DeviceParameters(dp_shard=1, pipeline_parallel=2)
    for result in run_on_ranks(fit_caught, 2, MLPTrainer, params):
        assert_error(result, "RuntimeError", "split into pipeline stages", "self.forward_backward")


class ComposableReplicateTrainer(MLPTrainer):
    """Replicates with torch's composable (DDP-based) replicate instead of the default."""

    def apply_replicate(self, dp_replicate_mesh: DeviceMesh) -> None:
        from torch.distributed._composable import replicate

        replicate(self.model, device_mesh=dp_replicate_mesh)


def test_composable_replicate_with_tensor_parallel_is_refused_because_it_skips_dtensors():
    # torch's composable replicate skips DTensor parameters: TP weights would train unsynchronized.
    params = DeviceParameters.DDP(tensor_parallel=2)
    for result in run_on_ranks(fit_caught, 4, ComposableReplicateTrainer, params, plan=True):
        assert_error(
            result,
            "RuntimeError",
            "model.layers.0.weight is a DTensor on mesh ('tp',)",
            "skips DTensor parameters",
            "never be averaged across dp_replicate ranks",
            "ComposableReplicateTrainer.apply_replicate",
        )


def final_weights_caught(params: DeviceParameters) -> Any:
    def run() -> dict[str, torch.Tensor]:
        trainer = ComposableReplicateTrainer(mlp_config(params))
        trainer.fit()
        return full_state(trainer.model)

    return caught(run)


def test_composable_replicate_without_tensor_parallel_is_accepted_and_stays_in_sync():
    results = run_on_ranks(final_weights_caught, 2, DeviceParameters.DDP())
    assert "value" in results[0], results[0]
    for name, value in results[0]["value"].items():
        assert torch.equal(value, results[1]["value"][name]), name


class NoShardTrainer(MLPTrainer):
    def apply_fully_shard(self, config: dict[str, Any]) -> None:
        pass


def test_apply_fully_shard_that_shards_nothing_is_refused_as_unsynchronized():
    for result in run_on_ranks(fit_caught, 2, NoShardTrainer, DeviceParameters.FSDP()):
        assert_error(
            result,
            "RuntimeError",
            "model.layers.0.weight is a plain tensor",
            "['dp_shard']",
            "NoShardTrainer.apply_fully_shard",
        )


class WorldSizeSamplerTrainer(MLPTrainer):
    def configure_dataloaders(self) -> tuple[Any, Any]:
        data = RegressionData(16)
        sampler = DistributedSampler(data, num_replicas=self.world.world_size, rank=self.world.rank)
        return DataLoader(data, batch_size=2, sampler=sampler), None


def test_distributed_sampler_over_all_ranks_under_tensor_parallel_names_dp_size():
    params = DeviceParameters.FSDP(dp_shard=1, tensor_parallel=2)
    results = run_on_ranks(fit_caught, 2, WorldSizeSamplerTrainer, params, plan=True)
    for rank, result in enumerate(results):
        assert_error(
            result,
            "ValueError",
            f"num_replicas=2, rank={rank}",
            "data-parallel rank 0 of 1",
            "num_replicas=self.world.dp_size",
        )
