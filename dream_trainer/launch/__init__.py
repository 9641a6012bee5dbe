"""Launching jobs: the ``dream-trainer`` command, the torchrun agent behind ``dream-trainer run``
and the layout planner behind ``dream-trainer plan``."""

from dream_trainer.launch.activations import TransformerShape
from dream_trainer.launch.agent import DEFAULT_RDZV_ID, RunPlan, choose_nproc, run_agent
from dream_trainer.launch.cli import build_parser, main
from dream_trainer.launch.plan_report import Plan, RankGroup, RankMemory
from dream_trainer.launch.planner import plan_layout
from dream_trainer.launch.script import trainer_from_script
from dream_trainer.launch.suggest import Suggestion, suggest_layouts

__all__ = [
    "DEFAULT_RDZV_ID",
    "Plan",
    "RankGroup",
    "RankMemory",
    "RunPlan",
    "Suggestion",
    "TransformerShape",
    "build_parser",
    "choose_nproc",
    "main",
    "plan_layout",
    "run_agent",
    "suggest_layouts",
    "trainer_from_script",
]
