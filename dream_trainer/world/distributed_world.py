"""The distributed world: process group, device and the one DeviceMesh every parallelism uses."""

from __future__ import annotations

import datetime
import logging
import os
import warnings
from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
)

from dream_trainer.configs import DeviceParameters
from dream_trainer.world.auto_layout import (
    LayoutChoice,
    ModelSize,
    check_ranks_agree,
    choose_layout,
    device_memory_bytes,
    format_bytes,
    model_size_from,
)
from dream_trainer.world.devices import backend_for, pick_device
from dream_trainer.world.environment import LaunchEnvironment
from dream_trainer.world.group_timeouts import set_group_timeout
from dream_trainer.world.launch_checks import check_options, warn_if_devices_sit_idle
from dream_trainer.world.layout import FLATTENED_DIMS, MESH_DIMS, MeshLayout
from dream_trainer.world.parent_watch import ParentWatch
from dream_trainer.world.process_groups import (
    let_gloo_workers_settle,
    registered_groups,
    restart_attempt_store,
    untag_compile_caches,
)
from dream_trainer.world.stale_caches import clear_dtensor_caches, forget_compiled_graphs

logger = logging.getLogger("dream_trainer.world")


class DistributedWorld:
    """Starts (or adopts) the process group and builds the ``pp, dp_replicate, dp_shard, cp, tp`` mesh.

    Construction has no side effects; :meth:`launch` does the work and :meth:`destroy` undoes it.
    Use it as a context manager to do both. For an automatic layout (``DeviceParameters.auto``)
    ``model_size`` measures the models, unless the config gives their parameter count.
    """

    def __init__(
        self,
        device_parameters: DeviceParameters,
        *,
        device: str | torch.device | None = None,
        environment: LaunchEnvironment | None = None,
        model_size: Callable[[], ModelSize] | None = None,
    ) -> None:
        self.device_parameters = device_parameters
        self._given_parameters = device_parameters
        self._model_size = model_size
        self.layout_choice: LayoutChoice | None = None
        """What the automatic layout chose at launch, and why (``None``: no automatic layout)."""
        self._auto_memory = 0
        self._requested_device = device
        self._environment = environment
        self._owns_process_group = False
        self._launched = False
        self._meshes: dict[str, DeviceMesh] = {}
        self.cpu_group: Any = None
        self._created_groups: list[Any] = []
        self._parent_watch: ParentWatch | None = None
        self._groups_before_launch: set[Any] = set()
        self._collective_timeout = datetime.timedelta(
            seconds=device_parameters.comm.init_timeout_seconds
        )

    # Lifecycle

    def launch(self) -> DistributedWorld:
        """Start the process group if needed, resolve degrees and build every mesh."""
        if self._launched:
            return self
        env = self._environment or LaunchEnvironment.detect()
        self.environment = env
        self.device = pick_device(env.local_rank, self._requested_device)
        self.layout = self._resolve_layout(env)
        check_options(self.device_parameters, self.layout, self.device, env.rank)
        warn_if_devices_sit_idle(env, self._requested_device, self.device)
        if self.device.type != "cpu":
            torch.get_device_module(self.device.type).set_device(self.device)

        groups_before = self._groups_before_launch = set(registered_groups())
        if not dist.is_initialized():
            # Before the rendezvous: a launcher that dies then would leave us waiting on its store.
            self._start_parent_watch(env)
            self._init_process_group(env)
        elif dist.get_world_size() != env.world_size:
            raise RuntimeError(
                f"an existing process group has {dist.get_world_size()} ranks but the launch "
                f"environment says {env.world_size}"
            )
        backend = dist.get_backend()
        # CPU objects (e.g. gathered Python objects) need a CPU-capable group beside NCCL.
        self.cpu_group = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
        if self.layout_choice is not None and env.world_size > 1:
            check_ranks_agree(self.layout_choice, self._auto_memory, self.cpu_group)
        clear_dtensor_caches()
        self._build_meshes()
        self._created_groups = [g for g in registered_groups() if g not in groups_before]
        self._launched = True
        if self.is_global_zero:
            logger.info(
                "world size %d on %s (%s, %s)\n%s",
                self.world_size,
                self.device_type,
                backend,
                env.source,
                self.layout.describe(),
            )
        return self

    def destroy(self, *, abort: bool = False) -> None:
        """Tear down what :meth:`launch` started. ``abort`` skips waiting on peers (after an error).

        A process group this world started is destroyed with every group the world created
        (mesh groups, the CPU group), newest first, after a barrier so that no rank closes a
        group a peer still uses. A process group made by someone else is left as it was.
        """
        if self._parent_watch is not None:
            self._parent_watch.stop()
            self._parent_watch = None
        self._meshes.clear()
        self._launched = False
        created, self._created_groups = self._created_groups, []
        self._groups_before_launch = set()
        self._collective_timeout = datetime.timedelta(
            seconds=self.device_parameters.comm.init_timeout_seconds
        )
        cpu_group, self.cpu_group = self.cpu_group, None
        clear_dtensor_caches()
        forget_compiled_graphs()
        untag_compile_caches()
        if not (self._owns_process_group and dist.is_initialized()):
            return
        self._owns_process_group = False
        abort_fn = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if abort and abort_fn is not None and dist.get_backend() == "nccl":
            abort_fn()
            return
        if not abort:
            self._barrier_before_destroy(cpu_group)
        registered = set(registered_groups())
        for group in reversed(created):
            if group in registered and group is not dist.group.WORLD:
                dist.destroy_process_group(group)
        dist.destroy_process_group()
        if self.world_size > 1:  # one rank: the trainer runs no collective to wait for
            let_gloo_workers_settle()

    def __enter__(self) -> DistributedWorld:
        return self.launch()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy(abort=exc is not None)

    @property
    def collective_timeout(self) -> datetime.timedelta:
        """The timeout for a process group made now: the init timeout until
        :meth:`set_train_timeout`, the train timeout after (torch's default is 30 min)."""
        return self._collective_timeout

    def set_train_timeout(self) -> None:
        """Switch collectives from the (long) init timeout to the training timeout.

        Every process group made since :meth:`launch` began gets it: the default group when
        this world started it, the mesh groups, the CPU group and groups made during setup
        (the checkpointer's); groups that existed before are someone else's. A group whose
        timeout cannot be changed raises RuntimeError rather than keep the long one.
        """
        timeout = datetime.timedelta(seconds=self.device_parameters.comm.train_timeout_seconds)
        self._collective_timeout = timeout
        for group in registered_groups():
            if group not in self._groups_before_launch:
                set_group_timeout(group, timeout)

    def _resolve_layout(self, env: LaunchEnvironment) -> MeshLayout:
        given = self._given_parameters
        if given.auto_layout is None:
            return MeshLayout.resolve(given, env.world_size, ranks_per_node=env.local_world_size)
        # Measuring runs configure_models, which may read sizes (world.tp_size, pp_enabled):
        # a provisional all-data-parallel layout answers them. No mesh exists yet.
        self.layout = MeshLayout(dp_shard=env.world_size)
        options = given.auto_layout
        memory = options.device_memory or device_memory_bytes(self.device, env.local_world_size)
        model = model_size_from(options, self._model_size)
        choice = choose_layout(given, env.world_size, env.local_world_size, int(memory), model)
        self.layout_choice, self._auto_memory = choice, int(memory)
        self.device_parameters = choice.device_parameters
        if env.rank == 0:
            logger.info("%s", choice.describe())
            if not choice.fits:
                logger.warning(
                    "the model may not fit this one device (estimate %s, budget %s): launch "
                    "more ranks to shard it, or see the fixes in docs/parallelism.md "
                    "(Automatic layout)",
                    format_bytes(choice.per_device_bytes),
                    format_bytes(choice.budget_bytes),
                )
        return MeshLayout.resolve(self.device_parameters, env.world_size)

    def _init_process_group(self, env: LaunchEnvironment) -> None:
        backend = backend_for(self.device)
        comm = self.device_parameters.comm
        if comm.flight_recorder_buffer_size:
            size = str(comm.flight_recorder_buffer_size)
            os.environ.setdefault("TORCH_FR_BUFFER_SIZE", size)  # any backend (gloo in 2.13)
            if backend == "nccl":
                os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", size)
        timeout = datetime.timedelta(seconds=comm.init_timeout_seconds)
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout}
        if backend == "nccl":
            kwargs["device_id"] = self.device
        if env.source == "single":
            kwargs["store"] = dist.HashStore()
            kwargs.update(rank=0, world_size=1)
        elif env.source == "slurm":
            kwargs["init_method"] = f"tcp://{env.master_addr}:{env.master_port}"
            kwargs.update(rank=env.rank, world_size=env.world_size)
        elif restart_store := restart_attempt_store(env, timeout):
            kwargs["store"] = restart_store
            kwargs.update(rank=env.rank, world_size=env.world_size)
        else:
            kwargs["init_method"] = "env://"
        dist.init_process_group(**kwargs)
        self._owns_process_group = True

    def _start_parent_watch(self, env: LaunchEnvironment) -> None:
        # Only under a launcher that supervises us (torchrun's agent): a plain python run has
        # nobody to outlive, and a process group made by someone else is their business.
        if env.supervised:
            self._parent_watch = ParentWatch(env.rank).start()

    def _barrier_before_destroy(self, cpu_group: Any) -> None:
        if self.device.type != "cpu":
            synchronize = getattr(torch.get_device_module(self.device.type), "synchronize", None)
            if synchronize is not None:
                synchronize()
        try:
            dist.barrier(group=cpu_group)
        except Exception as error:  # a peer that already failed: destroy our side regardless
            logger.warning(
                "rank %d: the barrier before destroying the process groups failed (%s); "
                "destroying them anyway",
                self.rank,
                error,
            )

    def _build_meshes(self) -> None:
        root = init_device_mesh(self.device_type, self.layout.shape, mesh_dim_names=MESH_DIMS)
        self._meshes = {"world": root, **{name: root[name] for name in MESH_DIMS}}
        for name, dims in FLATTENED_DIMS.items():
            self._meshes[name] = root[dims]._flatten(name)
        if self.layout.dp_replicate > 1 and self.layout.size("dp_shard_cp") > 1:
            self._meshes["hsdp"] = _hsdp_mesh(
                root,
                self._meshes["dp_cp"],
                self.layout.dp_replicate,
                self.layout.size("dp_shard_cp"),
            )

    # Meshes

    @property
    def mesh(self) -> DeviceMesh:
        """The full 5-D mesh."""
        return self.get_mesh("world")

    def get_mesh(self, name: str) -> DeviceMesh:
        """A mesh by name: a dimension, a flattened one (``dp``, ``dp_shard_cp``, ``dp_cp``) or ``world``."""
        self._require_launched()
        try:
            return self._meshes[name]
        except KeyError:
            names = ", ".join(k for k in self._meshes if k != "hsdp")
            raise KeyError(f"no mesh named {name!r}; available meshes: {names}") from None

    @property
    def fsdp_config(self) -> dict[str, Any]:
        """Keyword arguments for ``fully_shard``: ``mesh``, ``mp_policy`` and ``offload_policy``.

        ``reshard_after_forward`` is left out so a call may pass its own; the trainer applies
        ``DeviceParameters.reshard_after_forward`` (and ``False`` under pipeline parallelism)
        to every FSDP module after ``apply_fully_shard`` has run.
        """
        params = self.device_parameters
        mesh = self._meshes["hsdp"] if "hsdp" in self._meshes else self.get_mesh("dp_shard_cp")
        offload: OffloadPolicy = OffloadPolicy()
        if params.cpu_offload:
            # Pinning needs an accelerator; torch refuses to pin on a CPU-only machine.
            offload = CPUOffloadPolicy(pin_memory=self.device.type != "cpu")
        return {
            "mesh": mesh,
            "mp_policy": MixedPrecisionPolicy(
                param_dtype=params.param_dtype, reduce_dtype=params.reduce_dtype
            ),
            "offload_policy": offload,
        }

    # Facts about this rank

    def _require_launched(self) -> None:
        if not self._launched:
            raise RuntimeError("the world is not launched yet; call world.launch() first")

    @property
    def rank(self) -> int:
        if not hasattr(self, "environment"):
            raise RuntimeError("the world is not launched yet; call world.launch() first")
        return self.environment.rank

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def local_rank(self) -> int:
        return self.environment.local_rank

    @property
    def device_type(self) -> str:
        return self.device.type

    @property
    def is_global_zero(self) -> bool:
        return self.rank == 0

    def size(self, name: str) -> int:
        return self.layout.size(name)

    def local_rank_in(self, name: str) -> int:
        """This rank's index inside its group of mesh ``name``."""
        return self.get_mesh(name).get_local_rank()

    dp_size = property(lambda self: self.size("dp"))
    dp_rank = property(lambda self: self.local_rank_in("dp"))
    dp_shard_size = property(lambda self: self.size("dp_shard"))
    dp_shard_rank = property(lambda self: self.local_rank_in("dp_shard"))
    dp_replicate_size = property(lambda self: self.size("dp_replicate"))
    dp_replicate_rank = property(lambda self: self.local_rank_in("dp_replicate"))
    tp_size = property(lambda self: self.size("tp"))
    tp_rank = property(lambda self: self.local_rank_in("tp"))
    cp_size = property(lambda self: self.size("cp"))
    cp_rank = property(lambda self: self.local_rank_in("cp"))
    pp_size = property(lambda self: self.size("pp"))
    pp_rank = property(lambda self: self.local_rank_in("pp"))

    pp_enabled = property(lambda self: self.layout.pp > 1)
    tp_enabled = property(lambda self: self.layout.tp > 1)
    cp_enabled = property(lambda self: self.layout.cp > 1)
    dp_shard_enabled = property(lambda self: self.layout.dp_shard > 1)
    dp_replicate_enabled = property(lambda self: self.layout.dp_replicate > 1)

    @property
    def loss_parallel_enabled(self) -> bool:
        return self.tp_enabled and self.device_parameters.loss_parallel

    @property
    def fsdp_enabled(self) -> bool:
        """FSDP applies when parameters are sharded over ``dp_shard x cp`` ranks."""
        return self.layout.size("dp_shard_cp") > 1


def _hsdp_mesh(root: DeviceMesh, dp_cp: DeviceMesh, replicate: int, shard: int) -> DeviceMesh:
    # The 2-D (dp_replicate, dp_shard_cp) mesh for HSDP. torch asks callers to stop slicing
    # flattened dims out of the root, so unflatten dp_cp where that API exists.
    if hasattr(dp_cp, "_unflatten"):
        return dp_cp._unflatten(0, (replicate, shard), ("dp_replicate", "dp_shard_cp"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return root["dp_replicate", "dp_shard_cp"]
