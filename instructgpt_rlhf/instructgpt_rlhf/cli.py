"""`instructgpt-rlhf sft | reward | ppo | dpo | evaluate | pipeline | demo [--preset NAME] [--section.field VALUE]`."""

from axon_shared.cli import Command, build_cli

main = build_cli(
    "instructgpt-rlhf",
    {
        "sft": Command(
            "instructgpt_rlhf.sft:run_sft",
            "instructgpt_rlhf.config:SFTConfig",
            "Supervised fine-tuning of a pretrained x_llama on movie-review snippets",
            default_preset="cpu",
        ),
        "reward": Command(
            "instructgpt_rlhf.reward:run_reward",
            "instructgpt_rlhf.config:RewardConfig",
            "Sample K completions per prompt, label by VADER, train the reward model",
            default_preset="cpu",
        ),
        "ppo": Command(
            "instructgpt_rlhf.ppo:run_ppo",
            "instructgpt_rlhf.config:PPOConfig",
            "PPO (+ptx) against the reward model with a KL penalty to the SFT policy",
            default_preset="cpu",
        ),
        "dpo": Command(
            "instructgpt_rlhf.dpo:run_dpo",
            "instructgpt_rlhf.config:DPOConfig",
            "DPO / IPO / conservative DPO on the labelled preference pairs",
            default_preset="cpu",
        ),
        "evaluate": Command(
            "instructgpt_rlhf.evaluate:run_evaluate",
            "instructgpt_rlhf.config:EvaluateConfig",
            "Ground-truth reward, KL, win rate, RM-vs-truth, frontier plot",
            default_preset="cpu",
        ),
        "pipeline": Command(
            "instructgpt_rlhf.pipeline:run_pipeline",
            "instructgpt_rlhf.config:PipelineConfig",
            "pretrain -> SFT -> RM -> PPO/DPO sweeps -> evaluate",
            default_preset="cpu",
        ),
        "demo": Command(
            "instructgpt_rlhf.demo:run_demo",
            "instructgpt_rlhf.config:DemoConfig",
            "The pipeline at demo scale (<= 4 min), writes <out_dir>/REPORT.md",
            default_preset="demo",
        ),
    },
    description="instructgpt-rlhf: SFT -> reward model -> PPO(-ptx) and DPO on x_llama (the DPO paper's sentiment task)",
)

if __name__ == "__main__":
    main()
