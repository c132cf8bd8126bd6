"""`transformer train | translate | evaluate | average | export | demo` (one CLI shape for all Axon packages)."""

from axon_shared.cli import Command, build_cli

main = build_cli(
    "transformer",
    {
        "train": Command(
            "transformer.train:train",
            "transformer.config:TrainConfig",
            "train on de-en-libreoffice (en->de; corpora and direction selectable)",
            default_preset="cpu",
        ),
        "translate": Command(
            "transformer.inference:translate_command",
            "transformer.config:TranslateConfig",
            "translate text arguments or stdin lines (beam search)",
            positional="text",
        ),
        "evaluate": Command(
            "transformer.inference:evaluate_command",
            "transformer.config:EvaluateConfig",
            "sacreBLEU on the held-out test split, greedy and beam",
        ),
        "average": Command(
            "transformer.inference:average_command", "transformer.config:AverageConfig", "average the last N checkpoints of a run"
        ),
        "export": Command(
            "transformer.export:export_command",
            "transformer.config:ExportConfig",
            "write a run as a Hugging Face MarianMTModel + MarianTokenizer directory (--format marian --out DIR)",
        ),
        "demo": Command(
            "transformer.demo:run_demo", "transformer.config:DemoConfig", "a few minutes of training on real data; writes REPORT.md"
        ),
    },
    "transformer: Attention Is All You Need (Vaswani et al. 2017), en->de",
)

if __name__ == "__main__":
    main()
