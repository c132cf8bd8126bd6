"""`x-llama train | uptrain | ablate | export | generate | evaluate | demo` (flags: --preset NAME --config FILE --section.field VALUE)."""

from axon_shared.cli import Command, build_cli

main = build_cli(
    "x-llama",
    {
        "train": Command(
            "x_llama.train:train",
            "x_llama.config:TrainConfig",
            "pretrain Llama 2 on en-text (resumes from the latest checkpoint in --train.out_dir)",
            default_preset="cpu",
        ),
        "uptrain": Command(
            "x_llama.gqa:uptrain",
            "x_llama.config:UptrainConfig",
            "GQA uptraining: convert a run to --n_kv_heads kv heads and pretrain on for --fraction of its steps",
        ),
        "ablate": Command(
            "x_llama.ablate:ablate",
            "x_llama.config:AblateConfig",
            "the architecture lab: train --variants on one budget and data order, --seeds times; table and plot",
        ),
        "export": Command(
            "x_llama.export:export_command",
            "x_llama.config:ExportConfig",
            "write a run as GGUF for llama.cpp (--dtype f32|f16|q8_0), a Hugging Face directory, or Meta's layout",
        ),
        "generate": Command(
            "x_llama.generation:generate_command",
            "x_llama.config:GenerateConfig",
            "stream a continuation of --prompt (or stdin) from a checkpoint",
        ),
        "evaluate": Command("x_llama.train:evaluate_command", "x_llama.config:EvaluateConfig", "perplexity of a checkpoint on en-text"),
        "serve": Command(
            "x_llama.serve:serve_command",
            "x_llama.serve:ServeConfig",
            "OpenAI-compatible HTTP API (/v1/completions, streaming, /input) with continuous batching",
        ),
        "demo": Command(
            "x_llama.demo:run_demo", "x_llama.config:DemoConfig", "<= 4 minute pretraining run writing runs/demo/x_llama/REPORT.md"
        ),
    },
    description="x_llama: Llama 2 from scratch (RoPE, GQA, KV cache)",
)

if __name__ == "__main__":
    main()
