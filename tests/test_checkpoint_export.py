"""Exporting checkpoints (safetensors, Hugging Face Llama) and importing them back; loading
never runs code planted in a checkpoint; damaged files give errors that name them."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from dream_trainer.configs import DeviceParameters, TrainingParameters
from dream_trainer.trainer.checkpointing import UnsafeCheckpointError, complete_checkpoints
from dream_trainer.trainer.checkpointing.export import (
    checkpoint_tensors,
    export_safetensors,
    load_safetensors,
)
from dream_trainer.trainer.checkpointing.safe_io import SafeLoadPlanner, SafeReader
from examples.llama3.hf import export_hf, from_hf, to_hf
from examples.llama3.model import Transformer
from examples.llama3.train import Llama3Config, Llama3Trainer
from tests.multirank import MultiRankError, run_on_ranks
from tests.parity_model import ParityConfig
from tests.test_llama3_train import TINY
from tests.test_trainer_parity import RecordingTrainer, full_weights

pytestmark = pytest.mark.multirank

# Llama 3.1 RoPE scaling changes the low frequencies even at this length: config.json must
# carry it for transformers to compute the same rotations.
LLAMA = {**TINY, "rope_scaling": {"scale_factor": 8.0, "original_max_position_embeddings": 16}}
TOKENS = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A small JSONL corpus (as in test_llama3_train) and a tokenizer cache for the module."""
    root = tmp_path_factory.mktemp("llama3_export")
    docs = [
        {"text": f"def f_{i}(x):\n    return x * {i} + {i % 7}\n" * (1 + i % 3)} for i in range(300)
    ]
    (root / "corpus.jsonl").write_text("\n".join(json.dumps(d) for d in docs), encoding="utf-8")
    return {"data": str(root / "corpus.jsonl"), "cache": str(root / "cache")}


def _full(tensor: torch.Tensor) -> torch.Tensor:
    value = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
    return value.detach().cpu().clone()


class CapturingLlama3Trainer(Llama3Trainer):
    """Trains (or, with ``train=False``, only sets up), then records full weights and logits."""

    train = True

    def validate(self, max_batches: int | None = None, log: bool = True) -> dict[str, float]:
        return {}

    def _fit_loop(self) -> None:
        if self.train:
            super()._fit_loop()
        self.model.eval()
        with torch.no_grad():
            logits = self.model(TOKENS.to(self.device))
        self.captured = {
            "weights": {n: _full(p) for n, p in self.model.named_parameters()},
            "logits": _full(logits),
        }


def llama(
    params: DeviceParameters,
    dp_size: int,
    corpus: dict[str, str],
    run_dir: str,
    overrides: dict[str, Any],
    train: bool = True,
    init_from: str | None = None,
) -> dict[str, Any]:
    os.environ["DREAM_TRAINER_CACHE"] = corpus["cache"]
    config = Llama3Config(
        seed=3,
        model="debug",
        model_overrides=overrides,
        seq_len=32,
        batch_size=4 // dp_size,
        lr=1e-2,
        warmup_steps=0,
        data=corpus["data"],
        run_dir=run_dir,
        device_parameters=params,
        training_parameters=TrainingParameters(max_steps=3, num_sanity_val_steps=0),
        logging_parameters={"log_every_n_steps": 1, "backends": []},
        checkpoint_parameters={"enable": train, "init_from": init_from},
    )
    trainer = CapturingLlama3Trainer(config)
    trainer.train = train
    trainer.fit()
    checkpoints = complete_checkpoints(trainer.checkpoint_dir) if train else []
    return {
        **trainer.captured,
        "checkpoint": str(checkpoints[-1].path) if checkpoints else None,
        "config": config,
        "bos_eos": (trainer.tokenizer.bos_id, trainer.tokenizer.eos_id),
    }


@pytest.fixture(scope="module")
def llama_run(corpus: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny Llama 3 trained 3 steps under FSDP on 2 ranks, with its final checkpoint."""
    run_dir = str(tmp_path_factory.mktemp("llama_runs"))
    result = run_on_ranks(llama, 2, DeviceParameters.FSDP(), 2, corpus, run_dir, LLAMA, timeout=300)
    assert result[0]["checkpoint"] is not None
    return {**result[0], "corpus": corpus}


def hf_logits(out_dir: Path) -> tuple[torch.Tensor, Any]:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    dtype_arg: dict[str, Any] = {"dtype" if major >= 5 else "torch_dtype": torch.float32}
    model = transformers.LlamaForCausalLM.from_pretrained(out_dir, **dtype_arg).eval()
    with torch.no_grad():
        return model(TOKENS).logits, model


def our_logits(checkpoint: str, config: Llama3Config) -> torch.Tensor:
    """Our model in this process, with the checkpoint's consolidated weights."""
    model = Transformer(config.model_args())
    model.load_state_dict(checkpoint_tensors(checkpoint))
    with torch.no_grad():
        return model.eval()(TOKENS)


def test_hf_names_and_rope_layout_round_trip() -> None:
    config = Llama3Config(model="debug", model_overrides=TINY, seq_len=32)
    args = config.model_args()
    state = {k: torch.randn(v.shape) for k, v in Transformer(args).state_dict().items()}
    hf = to_hf(state, args)
    assert "model.layers.1.self_attn.q_proj.weight" in hf and "lm_head.weight" in hf
    # q/k rows move from adjacent pairs to halves; v does not.
    assert not torch.equal(hf["model.layers.0.self_attn.k_proj.weight"], state["layers.0.attention.wk.weight"])  # fmt: skip
    assert torch.equal(hf["model.layers.0.self_attn.v_proj.weight"], state["layers.0.attention.wv.weight"])  # fmt: skip
    back = from_hf(hf, args)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_a_hugging_face_export_gives_the_same_logits_in_transformers(
    llama_run: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from examples.llama3.export_hf import main

    monkeypatch.setenv("DREAM_TRAINER_CACHE", llama_run["corpus"]["cache"])
    out = main([llama_run["checkpoint"], str(tmp_path / "hf")])
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and config["rope_scaling"]["rope_type"] == "llama3"
    assert (config["bos_token_id"], config["eos_token_id"]) == llama_run["bos_eos"]
    theirs, hf_model = hf_logits(out)
    ours = our_logits(llama_run["checkpoint"], llama_run["config"])
    diff = (theirs - ours).abs().max().item()
    print(f"\nmax |logits(transformers) - logits(ours)| = {diff:.3g}")
    assert diff < 1e-4
    # Our one-process model is the trained one: the trainer's own (FSDP) logits agree too.
    torch.testing.assert_close(ours, llama_run["logits"], rtol=0, atol=1e-5)
    assert hf_model.config.num_key_value_heads == 2 and hf_model.config.vocab_size == 2048

    half = main([llama_run["checkpoint"], str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    assert json.loads((half / "config.json").read_text())["torch_dtype"] == "bfloat16"
    full, halved = (load_safetensors(d / "model.safetensors") for d in (out, half))
    assert full.keys() == halved.keys()
    for name, value in full.items():
        assert halved[name].dtype == torch.bfloat16 and torch.equal(halved[name], value.bfloat16())


IMPORT_LAYOUTS = {
    "fsdp2": (DeviceParameters.FSDP(), 2),  # the layout that trained: bitwise the same logits
    "tp2": (DeviceParameters.FSDP(dp_shard=1, tensor_parallel=2), 1),
}


@pytest.mark.parametrize("layout", list(IMPORT_LAYOUTS))
def test_init_from_a_hugging_face_export_gives_identical_weights_and_logits(
    layout: str, llama_run: dict[str, Any], tmp_path: Path
) -> None:
    params, dp_size = IMPORT_LAYOUTS[layout]
    out = export_hf(llama_run["checkpoint"], tmp_path / "hf", llama_run["config"])
    imported = run_on_ranks(
        llama, 2, params, dp_size, llama_run["corpus"], str(tmp_path / "runs"), LLAMA,
        train=False, init_from=str(out), timeout=300,
    )  # fmt: skip
    for rank in imported:
        assert rank["weights"].keys() == llama_run["weights"].keys()
        for name, value in llama_run["weights"].items():
            assert torch.equal(rank["weights"][name], value), name
        if layout == "fsdp2":
            assert torch.equal(rank["logits"], llama_run["logits"])
        else:
            torch.testing.assert_close(rank["logits"], llama_run["logits"], rtol=0, atol=1e-5)


def test_tied_embeddings_export_and_import(corpus: dict[str, str], tmp_path: Path) -> None:
    tied = {**TINY, "n_layers": 1, "tie_embeddings": True}
    single = DeviceParameters.SINGLE_DEVICE()
    (trained,) = run_on_ranks(llama, 1, single, 1, corpus, str(tmp_path / "a"), tied, timeout=300)
    out = export_hf(trained["checkpoint"], tmp_path / "hf", trained["config"])
    assert "lm_head.weight" not in load_safetensors(out / "model.safetensors")
    theirs, _ = hf_logits(out)
    diff = (theirs - trained["logits"]).abs().max().item()
    print(f"\ntied: max |logits(transformers) - logits(ours)| = {diff:.3g}")
    assert diff < 1e-4
    (imported,) = run_on_ranks(
        llama, 1, single, 1, corpus, str(tmp_path / "b"), tied, train=False, init_from=str(out),
        timeout=300,
    )  # fmt: skip
    assert torch.equal(imported["logits"], trained["logits"])
    for name, value in trained["weights"].items():
        assert torch.equal(imported["weights"][name], value), name


# ---------------------------------------------------------------------- any model, safety


class CapturingParityTrainer(RecordingTrainer):
    """Trains (or, with ``max_steps=0``, only sets up), then records the full weights."""

    train = True

    def _fit_loop(self) -> None:
        if self.train:
            super()._fit_loop()
        self.captured = full_weights(self)


def parity(
    params: DeviceParameters, run_dir: str, max_steps: int = 4, **checkpoint: Any
) -> dict[str, Any]:
    config = ParityConfig(
        seed=7,
        run_dir=run_dir,
        device_parameters=params,
        training_parameters=TrainingParameters(max_steps=max(1, max_steps)),
        logging_parameters={"log_every_n_steps": 1, "backends": []},
        checkpoint_parameters={"enable": max_steps > 0, **checkpoint},
    )
    trainer = CapturingParityTrainer(config)
    trainer.train, trainer.logged_losses = max_steps > 0, []
    trainer.fit()
    checkpoints = complete_checkpoints(trainer.checkpoint_dir) if max_steps else []
    return {
        "weights": trainer.captured,
        "checkpoint": str(checkpoints[-1].path) if checkpoints else None,
    }


@pytest.fixture(scope="module")
def parity_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The parity transformer trained 4 steps under FSDP on 2 ranks, with its checkpoint."""
    run_dir = str(tmp_path_factory.mktemp("parity_runs"))
    return dict(run_on_ranks(parity, 2, DeviceParameters.FSDP(), run_dir, timeout=300)[0])


def test_export_safetensors_equals_the_full_weights(
    parity_run: dict[str, Any], tmp_path: Path
) -> None:
    weights = parity_run["weights"]
    file = export_safetensors(parity_run["checkpoint"], tmp_path / "w.safetensors")
    exported = load_safetensors(file)
    assert exported.keys() == weights.keys()
    assert all(torch.equal(exported[k], v) for k, v in weights.items())
    half = load_safetensors(
        export_safetensors(parity_run["checkpoint"], tmp_path / "h.st", dtype=torch.bfloat16)
    )
    assert all(half[k].dtype == torch.bfloat16 and torch.equal(half[k], v.bfloat16()) for k, v in weights.items())  # fmt: skip
    # A rename may give one tensor two names (tied weights); safetensors gets separate copies.
    twice = load_safetensors(
        export_safetensors(
            parity_run["checkpoint"], tmp_path / "t.st", rename=lambda n, t: {n: t, f"{n}.2": t}
        )
    )
    assert all(torch.equal(twice[f"{k}.2"], v) for k, v in weights.items())
    with pytest.raises(KeyError, match="its models are 'model'"):
        export_safetensors(parity_run["checkpoint"], tmp_path / "x.st", model="encoder")
    with pytest.raises(FileNotFoundError, match="newest complete one under it"):
        checkpoint_tensors(Path(parity_run["checkpoint"]).parent)


def init_from(path: str, run_dir: str, strict: bool) -> dict[str, torch.Tensor]:
    return parity(DeviceParameters.SINGLE_DEVICE(), run_dir, 0, init_from=path, init_strict=strict)[
        "weights"
    ]


def test_init_from_safetensors_reports_missing_and_unexpected_names(
    parity_run: dict[str, Any], tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    state = dict(parity_run["weights"])
    del state["norm.weight"]
    state["extra.weight"] = torch.zeros(3)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(MultiRankError, match=r"1 missing key\(s\): norm.weight; 1 unexpected key"):
        run_on_ranks(init_from, 1, str(tmp_path), str(tmp_path / "a"), True)
    (loaded,) = run_on_ranks(init_from, 1, str(tmp_path), str(tmp_path / "b"), False)
    assert torch.equal(loaded["norm.weight"], torch.ones(32))  # as initialized
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k in loaded)


def test_a_planted_metadata_pickle_is_not_run(parity_run: dict[str, Any], tmp_path: Path) -> None:
    checkpoint = Path(shutil.copytree(parity_run["checkpoint"], tmp_path / "ckpt"))
    marker = tmp_path / "marker"
    payload = pickle.dumps(Planted(marker))
    pickle.loads(payload)  # the payload is live: plain unpickling runs it
    assert marker.exists()
    marker.unlink()
    (checkpoint / ".metadata").write_bytes(payload)
    with pytest.raises(UnsafeCheckpointError, match=r"(posix|os)\.system"):
        checkpoint_tensors(checkpoint)
    with pytest.raises(UnsafeCheckpointError):
        export_safetensors(checkpoint, tmp_path / "out.safetensors")
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


class Planted:
    """Unpickling it runs ``touch marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_planted_value_pickle_is_rejected(tmp_path: Path) -> None:
    marker, checkpoint = tmp_path / "marker", tmp_path / "ckpt"
    state = {"models": {"model": {"weight": torch.ones(3), "extra": Planted(marker)}}}
    dcp.save(state, checkpoint_id=str(checkpoint), no_dist=True)
    (checkpoint / "COMPLETE.json").write_text('{"step": 1, "time": 0, "metrics": {}}')
    # Exporting reads tensors only: the value is never unpickled.
    assert list(checkpoint_tensors(checkpoint)) == ["weight"]
    assert not marker.exists()
    with pytest.raises(CheckpointException) as caught:  # DCP wraps what the planner raised
        dcp.load(
            {"models": {"model": {"extra": None}}},
            storage_reader=SafeReader(str(checkpoint)),
            planner=SafeLoadPlanner(),
            no_dist=True,
        )
    assert [type(e) for e, _ in caught.value.failures.values()] == [UnsafeCheckpointError]
    assert "models.model.extra" in str(caught.value)
    assert not marker.exists()


def resume(checkpoint: str, run_dir: str) -> None:
    parity(DeviceParameters.SINGLE_DEVICE(), run_dir, 5, resume=checkpoint)


def test_damaged_checkpoint_files_give_errors_naming_them(
    parity_run: dict[str, Any], llama_run: dict[str, Any], tmp_path: Path
) -> None:
    checkpoint = Path(shutil.copytree(parity_run["checkpoint"], tmp_path / "ckpt"))
    metadata = checkpoint / ".metadata"
    whole = metadata.read_bytes()
    for size in (0, 1, len(whole) // 2, len(whole) - 1):
        metadata.write_bytes(whole[:size])
        with pytest.raises(RuntimeError, match="truncated or corrupted") as caught:
            checkpoint_tensors(checkpoint)
        assert str(metadata) in str(caught.value), size
    metadata.write_bytes(whole)

    (checkpoint / "trainer.json").write_text('{"format": 1, "global_st')
    with pytest.raises(MultiRankError, match="truncated or corrupted") as resumed:
        run_on_ranks(resume, 1, str(checkpoint), str(tmp_path / "runs"))
    assert str(checkpoint / "trainer.json") in str(resumed.value)

    exported = export_safetensors(checkpoint, tmp_path / "model.safetensors")
    exported.write_bytes(exported.read_bytes()[:-4])
    with pytest.raises(RuntimeError, match="truncated or corrupted") as caught:
        load_safetensors(exported)
    assert str(exported) in str(caught.value)

    from examples.llama3.export_hf import checkpoint_config

    llama = Path(shutil.copytree(llama_run["checkpoint"], tmp_path / "llama"))
    (llama / "trainer.json").write_bytes(b"\x00\xff garbage")
    with pytest.raises(RuntimeError, match="truncated or corrupted") as caught:
        checkpoint_config(llama)
    assert str(llama / "trainer.json") in str(caught.value)
