"""Checkpoints: bit-for-bit resume, atomic writes, clear errors on damaged files, averaging."""

import struct

import pytest
import torch
from torch.testing import assert_close

import axon_shared.checkpoint as checkpoint_module
from axon_shared import EMA, CheckpointError, average_checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint, seed_everything
from axon_shared.checkpoint import checkpoint_path, prune_checkpoints


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))


def train(total_steps: int, run_dir, stop_after: int | None = None):
    """A loop whose data and dropout draw from the global RNG, so resuming needs the RNG state too."""
    seed_everything(0)
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ema = EMA(model, decay=0.9)
    start = 0
    if (latest := latest_checkpoint(run_dir)) is not None:
        start = load_checkpoint(latest).restore(model, optimizer, ema)
    for step in range(start, total_steps):
        x = torch.randn(8, 6)
        loss = (model(x).squeeze(-1) - x.sum(-1)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model)
        if stop_after is not None and step + 1 == stop_after:
            save_checkpoint(
                checkpoint_path(run_dir, step + 1), model=model, step=step + 1, optimizer=optimizer, ema=ema, config={"lr": 1e-2}
            )
            return None
    return model, optimizer, ema


def test_resume_is_bit_exact(tmp_path):
    model_a, optim_a, ema_a = train(12, tmp_path / "uninterrupted")
    assert train(12, tmp_path / "resumed", stop_after=5) is None
    model_b, optim_b, ema_b = train(12, tmp_path / "resumed")
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(a, b), name
    state_a, state_b = optim_a.state_dict()["state"], optim_b.state_dict()["state"]
    for key in state_a:
        for name in state_a[key]:
            assert torch.equal(torch.as_tensor(state_a[key][name]), torch.as_tensor(state_b[key][name])), (key, name)
    assert all(torch.equal(ema_a.shadow[k], ema_b.shadow[k]) for k in ema_a.shadow)


def test_checkpoint_round_trip_contents(tmp_path):
    model = make_model()
    path = save_checkpoint(tmp_path / "c.safetensors", model=model, step=7, config={"dim": 6}, metrics={"loss": 0.5}, extra={"note": "x"})
    ckpt = load_checkpoint(path)
    assert (ckpt.step, ckpt.config, ckpt.metrics, ckpt.extra) == (7, {"dim": 6}, {"loss": 0.5}, {"note": "x"})
    fresh = make_model()
    ckpt.restore(fresh)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


def test_tied_weights_survive(tmp_path):
    embed = torch.nn.Embedding(10, 4)
    model = torch.nn.ModuleDict({"embed": embed, "head": torch.nn.Linear(4, 10, bias=False)})
    model["head"].weight = embed.weight
    save_checkpoint(tmp_path / "tied.safetensors", model=model)
    fresh = torch.nn.ModuleDict({"embed": torch.nn.Embedding(10, 4), "head": torch.nn.Linear(4, 10, bias=False)})
    fresh["head"].weight = fresh["embed"].weight
    load_checkpoint(tmp_path / "tied.safetensors").restore(fresh)
    assert torch.equal(fresh["head"].weight, embed.weight) and fresh["head"].weight is fresh["embed"].weight


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, model=make_model(), step=1)
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model=make_model(), step=2)
    assert path.read_bytes() == before
    assert load_checkpoint(path).step == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temp file left behind


def test_damaged_checkpoints_raise_clear_errors(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", model=make_model(), step=3)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        load_checkpoint(garbage)
    foreign = tmp_path / "foreign.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not an Axon checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_header_is_plain_json_and_nothing_is_pickled(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", model=make_model(), step=3, optimizer=torch.optim.Adam(make_model().parameters()))
    raw = path.read_bytes()
    header_length = struct.unpack("<Q", raw[:8])[0]
    header = raw[8 : 8 + header_length]
    assert b"axon-checkpoint-v1" in header and b"\x80\x04" not in raw[: 8 + header_length]  # no pickle protocol marker


def test_wrong_model_shape_is_reported(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", model=torch.nn.Linear(3, 2))
    with pytest.raises(CheckpointError, match="shapes do not fit"):
        load_checkpoint(path).restore(torch.nn.Linear(4, 2))


def test_average_latest_and_prune(tmp_path):
    models = [torch.nn.Linear(2, 2) for _ in range(3)]
    paths = [save_checkpoint(checkpoint_path(tmp_path, step), model=m, step=step) for step, m in zip((10, 20, 30), models)]
    averaged = average_checkpoints(paths)
    assert_close(averaged["weight"], torch.stack([m.weight.detach() for m in models]).mean(0))
    assert latest_checkpoint(tmp_path) == paths[-1]
    prune_checkpoints(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [paths[-1].name]


def test_model_config_of_an_older_or_a_foreign_checkpoint(tmp_path):
    """A field this version dropped (transformer's share_embeddings) is ignored; another model's section is refused."""
    import dataclasses

    from axon_shared.config import AxonConfig

    @dataclasses.dataclass
    class Model(AxonConfig):
        dim: int = 8
        heads: int = 2

    older = save_checkpoint(
        tmp_path / "older.safetensors", model=make_model(), config={"model": {"dim": 16, "heads": 4, "share_embeddings": True}}
    )
    assert load_checkpoint(older).model_config(Model) == Model(dim=16, heads=4)
    foreign = save_checkpoint(
        tmp_path / "foreign.safetensors", model=make_model(), config={"model": {"ch": 32, "ch_mult": [1, 2], "dim": 8}}
    )
    with pytest.raises(CheckpointError, match="not a checkpoint of a Model model"):
        load_checkpoint(foreign).model_config(Model)
