"""`instructgpt-rlhf sft | reward | ppo | dpo | evaluate | pipeline | demo [--preset NAME] [--section.field VALUE]`."""

from __future__ import annotations

from axon_shared.cli import Command, build_cli

from .config import DemoConfig, DPOConfig, EvaluateConfig, PipelineConfig, PPOConfig, RewardConfig, SFTConfig


def _sft(cfg):
    from .sft import run_sft

    run_sft(cfg)


def _reward(cfg):
    from .reward import run_reward

    run_reward(cfg)


def _ppo(cfg):
    from .ppo import run_ppo

    run_ppo(cfg)


def _dpo(cfg):
    from .dpo import run_dpo

    run_dpo(cfg)


def _evaluate(cfg):
    from .evaluate import run_evaluate

    run_evaluate(cfg)


def _pipeline(cfg):
    from .pipeline import run_pipeline

    run_pipeline(cfg)


def _demo(cfg):
    from .demo import run_demo

    run_demo(cfg)


main = build_cli(
    "instructgpt-rlhf",
    {
        "sft": Command(_sft, SFTConfig, "Supervised fine-tuning of a pretrained x_llama on movie-review snippets", default_preset="cpu"),
        "reward": Command(_reward, RewardConfig, "Sample K completions per prompt, label by VADER, train the reward model", default_preset="cpu"),
        "ppo": Command(_ppo, PPOConfig, "PPO (+ptx) against the reward model with a KL penalty to the SFT policy", default_preset="cpu"),
        "dpo": Command(_dpo, DPOConfig, "DPO / IPO / conservative DPO on the labelled preference pairs", default_preset="cpu"),
        "evaluate": Command(_evaluate, EvaluateConfig, "Ground-truth reward, KL, win rate, RM-vs-truth, frontier plot", default_preset="cpu"),
        "pipeline": Command(_pipeline, PipelineConfig, "pretrain -> SFT -> RM -> PPO/DPO sweeps -> evaluate", default_preset="cpu"),
        "demo": Command(_demo, DemoConfig, "The pipeline at demo scale (<= 4 min), writes <out_dir>/REPORT.md", default_preset="demo"),
    },
    description="instructgpt-rlhf: SFT -> reward model -> PPO(-ptx) and DPO on x_llama (the DPO paper's sentiment task)",
)

if __name__ == "__main__":
    main()
