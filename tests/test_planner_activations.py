"""The planner's activation estimate against the peak measured on CPU for the Llama 3 example."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.tensor import DTensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dream_trainer.configs import DeviceParameters, TrainingParameters
from dream_trainer.launch import plan_layout
from dream_trainer.launch.activations import (
    ActivationSettings,
    estimate_activations,
)
from examples.llama3.configs import get_model_args
from examples.llama3.model import Transformer
from examples.llama3.train import Llama3Config, Llama3Trainer
from tests.multirank import run_on_ranks
from tests.test_planner import corpus_file

SEQ, BATCH = 128, 8
TOLERANCE = 0.10


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created meanwhile that are still alive, and their peak.

    Storages in ``ignore`` (data pointers of parameters) are not activations. Allocations are
    numbered, since a freed address is soon reused (by a gradient, say).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int, int]] = {}  # pointer -> (ref, bytes, id)
        self.events: list[tuple[int, int]] = []  # (allocation id, +bytes or -bytes)
        self.ignore: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for key, (ref, size, number) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.events.append((number, -size))
        for tensor in tree_leaves(out):
            if isinstance(tensor, DTensor):
                tensor = tensor._local_tensor
            if isinstance(tensor, AsyncCollectiveTensor):  # a wrapper without a storage
                tensor = tensor.elem
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live and key not in self.ignore:
                    number = len(self.events)
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes(), number)
                    self.events.append((number, storage.nbytes()))
        return out

    def peak_without(self, pointers: set[int]) -> int:
        """The peak of live bytes, leaving out the storages now at ``pointers`` (gradients)."""
        left_out = {self.live[p][2] for p in pointers if p in self.live}
        current = peak = 0
        for number, size in self.events:
            if number not in left_out:
                current += size
                peak = max(peak, current)
        return peak


def _storages(tensors: Any) -> set[int]:
    keys = set()
    for tensor in tensors:
        if tensor is None:
            continue
        local = tensor._local_tensor if isinstance(tensor, DTensor) else tensor
        keys.add(local.untyped_storage().data_ptr())
    return keys


class PeakTrainer(Llama3Trainer):
    """Measures the activation peak of its second forward-backward (the first builds caches)."""

    peaks: list[int]

    def forward_backward(
        self, model: Any, inputs: Any, target: Any, loss_fn: Any, **kw: Any
    ) -> Any:
        tracker = LiveBytes()
        params = list(model.parameters())
        tracker.ignore = _storages(params)
        with tracker:
            loss = super().forward_backward(model, inputs, target, loss_fn, **kw)
        self.peaks.append(tracker.peak_without(_storages(p.grad for p in params)))
        return loss

    def validate(self, max_batches: int | None = None, log: bool = True) -> dict[str, float]:
        return {}


def activation_config(params: DeviceParameters, data: str, run_dir: str) -> Llama3Config:
    return Llama3Config(
        model="debug",
        seq_len=SEQ,
        batch_size=BATCH,
        data=data,
        run_dir=run_dir,
        device_parameters=params,
        training_parameters=TrainingParameters(max_steps=2, num_sanity_val_steps=0),
        logging_parameters={"backends": [], "performance_metrics": False},
    )


LAYOUTS = {
    "single": (1, DeviceParameters.SINGLE_DEVICE()),
    "checkpointed": (1, DeviceParameters.SINGLE_DEVICE(checkpoint_activations=True)),
    "selective_every_2": (
        1,
        DeviceParameters.SINGLE_DEVICE(
            checkpoint_activations=True,
            activation_checkpoint_config={"mode": "selective", "every_n_blocks": 2},
        ),
    ),
    "tp2": (2, DeviceParameters(dp_shard=1, tensor_parallel=2)),
    "pp2_1f1b": (
        2,
        DeviceParameters(
            pipeline_parallel=2,
            dp_shard=1,
            pipeline_parallel_config={"schedule": "1F1B", "num_microbatches": 4},
        ),
    ),
}


def _measure_peak(layout: str, root: str) -> int:
    _, params = LAYOUTS[layout]
    trainer = PeakTrainer(activation_config(params, corpus_file(Path(root)), root))
    trainer.peaks = []
    trainer.fit()
    return trainer.peaks[-1]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("activations"))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_estimate_within_ten_percent_of_the_measured_peak(layout: str, root: str) -> None:
    world, params = LAYOUTS[layout]
    measured = run_on_ranks(_measure_peak, world, layout, root, timeout=240)
    config = activation_config(params, corpus_file(Path(root)), root)
    plan = plan_layout(
        lambda: PeakTrainer(config), world_size=world, devices_per_node=world, device_memory="1GiB"
    )
    for rank, peak in enumerate(measured):
        ratio = plan.rank(rank).activations / peak
        print(f"{layout} rank {rank}: estimate / measured = {ratio:.3f} ({peak} B measured)")
        assert abs(ratio - 1) <= TOLERANCE, f"{layout} rank {rank}: ratio {ratio:.3f}"


# Module.to(bfloat16) casts the complex rope table to real before the model rebuilds it.
@pytest.mark.filterwarnings("ignore:Casting complex values to real")
@pytest.mark.parametrize("checkpoint", [False, True])
def test_bfloat16_estimate_matches_a_bfloat16_model(checkpoint: bool) -> None:
    args = get_model_args("debug", max_seq_len=SEQ)
    torch.manual_seed(0)
    model = Transformer(args).to(torch.bfloat16)
    if checkpoint:
        from torch.distributed._composable import checkpoint as checkpoint_block

        for block in model.layers.values():
            checkpoint_block(block)
    tokens = torch.randint(0, args.vocab_size, (BATCH, SEQ))
    params = list(model.parameters())
    tracker = LiveBytes()
    tracker.ignore = _storages(params)
    with tracker:
        logits = model(tokens)
        F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten(0, 1)).backward()
    measured = tracker.peak_without(_storages(p.grad for p in params))
    shape = args.transformer_shape(SEQ, BATCH)
    settings = ActivationSettings(
        compute_bytes=2, checkpoint=checkpoint, blocks_per_stage=args.n_layers
    )
    ratio = estimate_activations(shape, settings).total / measured
    print(f"bfloat16 checkpoint={checkpoint}: estimate / measured = {ratio:.3f}")
    assert abs(ratio - 1) <= TOLERANCE, f"bfloat16, checkpoint={checkpoint}: ratio {ratio:.3f}"
