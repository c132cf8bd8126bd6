"""Every stage end to end at toy scale on real data (movie snippets, VADER), exact resumption, and clear errors."""

import json
import socket
import threading
import time
from pathlib import Path

import openai
import pytest
import torch
import uvicorn

from axon_shared.checkpoint import CheckpointError, load_checkpoint
from axon_shared.metrics import read_metrics
from instructgpt_rlhf.cli import main
from instructgpt_rlhf.config import DPOConfig, EvaluateConfig, PPOConfig, RewardConfig, SFTConfig
from instructgpt_rlhf.dpo import run_dpo
from instructgpt_rlhf.evaluate import run_evaluate
from instructgpt_rlhf.model import load_policy, tokenizer_of
from instructgpt_rlhf.ppo import run_ppo
from instructgpt_rlhf.reward import read_jsonl, run_reward
from instructgpt_rlhf.sft import run_sft
from x_llama.generation import generate
from x_llama.serve import ServeConfig, create_app
from x_llama.train import load_pretrained


def model_tensors(path):
    return load_checkpoint(path).tensors["model"]


def test_sft_resume_is_bit_exact(tiny_base, tmp_path):
    cfg = SFTConfig.from_preset("tiny", pretrained=str(tiny_base), train={"keep_last": 2})  # keep the mid-run checkpoint
    run_sft(cfg.replace(train={"out_dir": str(tmp_path / "a")}))
    b = tmp_path / "b"
    run_sft(cfg.replace(train={"out_dir": str(b)}))
    # simulate a crash after step 3: drop everything written later, then run the same command again
    (b / "checkpoints" / "step_00000006.safetensors").unlink()
    (b / "policy.safetensors").unlink()
    run_sft(cfg.replace(train={"out_dir": str(b)}))
    ta, tb = model_tensors(tmp_path / "a" / "policy.safetensors"), model_tensors(b / "policy.safetensors")
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    la = [(r["step"], r["train/loss"]) for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if "train/loss" in r]
    lb = [(r["step"], r["train/loss"]) for r in read_metrics(b / "metrics.jsonl") if "train/loss" in r]
    assert la == lb


def test_pipeline_stages_on_real_data(tiny_base, tmp_path):
    sft = str(tmp_path / "sft")
    run_sft(SFTConfig.from_preset("tiny", pretrained=str(tiny_base), train={"out_dir": sft}))
    rm = str(tmp_path / "reward")
    reward_cfg = RewardConfig.from_preset("tiny", sft=sft, train={"out_dir": rm})
    run_reward(reward_cfg)
    records = read_jsonl(tmp_path / "reward" / "preferences_train.jsonl")
    assert len(records) == reward_cfg.num_prompts and all(len(r["completions"]) == reward_cfg.k for r in records)
    for r in records:  # pairs agree with the ground truth (no Bradley-Terry noise by default)
        assert all(r["scores"][w] > r["scores"][l] for w, l in r["pairs"])
    assert min(min(r["scores"]) for r in records) >= -1 and max(max(r["scores"]) for r in records) <= 1
    ppo = str(tmp_path / "ppo")
    run_ppo(PPOConfig.from_preset("tiny", sft=sft, reward_model=rm, train={"out_dir": ppo}))
    rows = read_metrics(tmp_path / "ppo" / "metrics.jsonl")
    for key in ("kl", "score", "reward", "entropy", "clipfrac", "approx_kl", "value_error", "kl_coef"):
        assert any(f"train/{key}" in r for r in rows), key
    dpo = str(tmp_path / "dpo")
    run_dpo(DPOConfig.from_preset("tiny", sft=sft, preferences=rm, train={"out_dir": dpo}))
    result = run_evaluate(EvaluateConfig.from_preset("tiny", sft=sft, reward_model=rm, policies=(ppo, dpo), out_dir=str(tmp_path / "eval")))
    names = [r["name"] for r in result["rows"]]
    assert names == ["SFT", "PPO (kl=0.05)", "DPO (beta=0.1)"]
    sft_row = result["rows"][0]
    assert sft_row["kl"] == 0.0 and sft_row["win_rate_vs_sft"] == 0.5
    assert (tmp_path / "eval" / "frontier.png").stat().st_size > 1000
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["num_prompts"] == 16
    for stage in (sft, ppo, dpo):
        assert_serves_the_final_policy(stage)
    with pytest.raises(CheckpointError, match="reward model .* pass a policy"):
        load_pretrained(rm)


def assert_serves_the_final_policy(stage: str) -> None:
    """`x-llama serve` on a stage directory (as the README's command gives it) serves the stage's final policy,
    not its last training checkpoint: a real uvicorn server, the official openai client, greedy text equal to
    `generate` on `load_policy`, the model named after the stage directory."""
    policy, tokenizer = load_policy(stage).eval(), tokenizer_of(stage)
    served, served_tokenizer, _ = load_pretrained(stage)
    assert served_tokenizer.encode("a fine film", bos=True) == tokenizer.encode("a fine film", bos=True)
    for name, tensor in policy.state_dict().items():
        assert torch.equal(served.state_dict()[name], tensor), name
    app = create_app(served, served_tokenizer, Path(stage).name, ServeConfig(checkpoint=stage))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 20
        while not server.started:
            assert time.time() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="none", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list().data] == [Path(stage).name]
        for prompt in ("The movie", "I thought this film"):
            ids = tokenizer.encode(prompt, bos=True)
            expected = tokenizer.decode(ids + generate(policy, [ids], 10, eos_id=tokenizer.eos_id)[0])[len(tokenizer.decode(ids)) :]
            text = client.completions.create(model=Path(stage).name, prompt=prompt, max_tokens=10, temperature=0).choices[0].text
            assert text == expected, (stage, prompt)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_cli_reports_bad_values_and_missing_inputs(tmp_path):
    with pytest.raises(SystemExit, match="DPOConfig.loss_type"):
        main(["dpo", "--loss_type", "hinge"])
    with pytest.raises(SystemExit, match="PPOConfig.minibatch_size"):
        main(["ppo", "--minibatch_size", "5"])
    with pytest.raises(SystemExit, match="instructgpt-rlhf reward: error: .*nowhere does not exist"):
        main(["reward", "--sft", str(tmp_path / "nowhere"), "--train.out_dir", str(tmp_path / "rm")])


def test_the_pipeline_report_reads_the_reward_stage_metrics(tmp_path):
    """The report's reward-model line comes from the metric names the training loop writes (valid/accuracy, ...)."""
    from instructgpt_rlhf.pipeline import write_report

    (tmp_path / "reward").mkdir()
    (tmp_path / "reward" / "reward_metrics.json").write_text(
        json.dumps({"valid/accuracy": 0.75, "valid/pairs": 12.0, "valid/rm_vs_truth_pearson": 0.5})
    )
    sft = {"name": "SFT", "reward": 0.1, "reward_sem": 0.01, "kl": 0.0, "win_rate_vs_sft": 0.5, "length": 9.0, "eos_rate": 1.0}
    report = write_report(tmp_path, {"rows": [sft], "samples": {}, "num_prompts": 4}, {"sft": 1.0}, image_prefix="").read_text()
    assert "held-out pair accuracy **0.750** on 12 pairs; corr(RM, VADER) 0.50" in report
