"""Every run writes into its own directory, with its resolved config and a ``latest`` link."""

from __future__ import annotations

import json
import re

from dream_trainer.configs import LoggingParameters
from dream_trainer.trainer.run_directory import new_run_id
from tests.multirank import run_on_ranks
from tests.trainer_fixtures import MLPConfig, MLPTrainer, mlp_config


def test_run_id_is_torchruns_unless_it_is_the_default_none():
    assert new_run_id({"TORCHELASTIC_RUN_ID": "job-42"}) == "job-42"
    # A second run of the same job in one process gets its own directory too.
    assert new_run_id({"TORCHELASTIC_RUN_ID": "job-42"}) == "job-42-2"
    for env in ({"TORCHELASTIC_RUN_ID": "none"}, {}):
        run_id = new_run_id(env)
        assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", run_id), run_id
    assert new_run_id({}) != new_run_id({})  # same second, different suffix


def fit_twice(run_dir: str) -> list[str]:
    logging = LoggingParameters(backends=["jsonl"], log_every_n_steps=1)
    config = mlp_config(logging=logging, run_dir=run_dir)
    ids = []
    for _ in range(2):
        trainer = MLPTrainer(config)
        trainer.fit()
        ids.append(trainer.run_id)
    return ids


def test_two_runs_of_one_experiment_never_share_a_directory(tmp_path):
    ((first, second),) = run_on_ranks(fit_twice, 1, str(tmp_path))
    assert first != second
    experiment = tmp_path / "dream-trainer" / "run"
    for run_id in (first, second):
        lines = (experiment / run_id / "metrics.jsonl").read_text().splitlines()
        steps = [json.loads(line)["step"] for line in lines if "train/loss" in line]
        assert steps == sorted(set(steps)), f"{run_id} holds lines of another run: {steps}"
        saved = MLPConfig.model_validate_json((experiment / run_id / "config.json").read_text())
        assert saved.run_dir == str(tmp_path)
    assert (experiment / "latest").resolve() == (experiment / second).resolve()


def fit_with_run_id(run_dir: str) -> str:
    trainer = MLPTrainer(mlp_config(run_dir=run_dir, run_id="my-run"))
    trainer.fit()
    return str(trainer.run_dir)


def test_a_configured_run_id_names_the_directory(tmp_path):
    (path,) = run_on_ranks(fit_with_run_id, 1, str(tmp_path))
    assert path == str(tmp_path / "dream-trainer" / "run" / "my-run")
    assert (tmp_path / "dream-trainer" / "run" / "my-run" / "config.json").is_file()
