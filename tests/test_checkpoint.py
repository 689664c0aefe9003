"""Checkpoints: save/load round trips (model, config, tokenizer, optimizer, trainer state),
`latest` and `keep`, atomic writes that survive a failure, and finding a checkpoint."""
import numpy as np
import pytest

import tinygpt as tg
import tinygpt.checkpoint as checkpoint_module
from tinygpt import backend
from tinygpt.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from tinygpt.data import CharTokenizer, gpt2_tokenizer, train_bpe, tokenizer_to_dict
from tinygpt.model import GPTModel
from tinygpt.optim import AdamW
from conftest import SHARED_DATA, host

TEXT = "the quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n" * 20
GPT2_FILE = SHARED_DATA / "gpt2.tiktoken"


def make_model(vocab_size, seed=0, **overrides):
    tg.manual_seed(seed)
    return GPTModel({"vocab_size": vocab_size, "context_length": 16, "emb_dim": 16, "n_heads": 2, "n_layers": 2,
                     "drop_rate": 0.1, "qkv_bias": True, **overrides})


def trained_optimizer(model, steps=3):
    """AdamW with non-zero running averages and step counts (3 steps, one parameter frozen for 1 of them)."""
    optimizer = AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95), weight_decay=0.05)
    ids = np.arange(24).reshape(2, 12) % model.cfg["vocab_size"]
    for step in range(steps):
        optimizer.zero_grad()
        model(ids).mean().backward()
        if step == 0:
            model.final_norm.shift.grad = None  # this parameter is one step behind the others
        optimizer.step()
    return optimizer


def logits(model, ids):
    model.eval()
    return host(model(ids))


def test_round_trip_restores_model_config_tokenizer_optimizer_and_state(device, tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    model = make_model(tok.n_vocab)
    optimizer = trained_optimizer(model)
    state = {"step": 3, "tokens_seen": 72, "history": {"step": [1], "train_loss": [3.25]}, "rng": tg.get_rng_state()}
    path = save_checkpoint(tmp_path, 3, model, tok, optimizer, state)
    assert path == tmp_path / "checkpoints" / "step_000003"

    ck = load_checkpoint(tmp_path)
    assert ck.path == path
    assert ck.model.cfg == model.cfg
    assert ck.model.tok_emb.weight.device == device
    ids = tg.tensor(np.array([tok.encode("the lazy dog")]))
    assert np.array_equal(logits(ck.model, ids), logits(model, ids))
    assert type(ck.tokenizer) is CharTokenizer and tokenizer_to_dict(ck.tokenizer) == tokenizer_to_dict(tok)
    assert ck.tokenizer.encode(TEXT) == tok.encode(TEXT)

    saved = {k: v for k, v in ck.trainer_state.items() if k != "optimizer"}
    assert saved == state
    original = optimizer.state_dict()
    restored = ck.optimizer_state
    assert restored["param_groups"] == [{**g, "betas": list(g["betas"])} for g in original["param_groups"]]
    assert restored["state"].keys() == original["state"].keys()
    assert len(restored["state"]) == len(model.parameters())
    for i, s in original["state"].items():
        assert restored["state"][i]["step"] == s["step"]
        assert np.array_equal(restored["state"][i]["m"], host(s["m"]))
        assert np.array_equal(restored["state"][i]["v"], host(s["v"]))
    steps = sorted({s["step"] for s in restored["state"].values()})
    assert steps == [2, 3]

    fresh = AdamW(ck.model.parameters())
    fresh.load_state_dict(ck.optimizer_state)
    for (_, a), (_, b) in zip(sorted(fresh.state_dict()["state"].items()), sorted(original["state"].items())):
        assert a["step"] == b["step"] and np.array_equal(host(a["m"]), host(b["m"]))


def test_round_trip_of_a_trained_bpe_tokenizer(tmp_path):
    tok = train_bpe(TEXT, 300)
    model = make_model(tok.n_vocab)
    save_checkpoint(tmp_path, 1, model, tok)
    ck = load_checkpoint(tmp_path)
    assert tokenizer_to_dict(ck.tokenizer) == tokenizer_to_dict(tok)
    assert ck.tokenizer.n_vocab == tok.n_vocab == 300
    assert ck.tokenizer.encode(TEXT) == tok.encode(TEXT)
    assert ck.trainer_state == {} and ck.optimizer_state is None  # saved without optimizer or state
    ids = np.array([tok.encode("the lazy dog")])
    assert np.array_equal(logits(ck.model, ids), logits(model, ids))


def test_round_trip_of_the_gpt2_tokenizer_from_a_local_file(tmp_path):
    if not GPT2_FILE.exists():
        pytest.skip(f"{GPT2_FILE} not present")
    tok = gpt2_tokenizer(GPT2_FILE)
    model = make_model(tok.n_vocab, n_layers=1)
    save_checkpoint(tmp_path, 1, model, tok)
    assert (tmp_path / "checkpoints" / "step_000001" / "tokenizer.json").stat().st_size < 100  # named, not copied
    ck = load_checkpoint(tmp_path, bpe_file=GPT2_FILE)
    assert ck.tokenizer.encode("Hello, I am") == [15496, 11, 314, 716]
    assert ck.model.cfg["vocab_size"] == 50257
    ids = np.array([[15496, 11, 314, 716]])
    assert np.array_equal(logits(ck.model, ids), logits(model, ids))


def test_tied_weights_stay_tied_after_loading(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    model = make_model(tok.n_vocab, tie_weights=True)
    optimizer = trained_optimizer(model)
    save_checkpoint(tmp_path, 3, model, tok, optimizer)
    ck = load_checkpoint(tmp_path)
    assert ck.model.out_head.weight is ck.model.tok_emb.weight
    assert ck.model.num_parameters() == model.num_parameters()
    assert np.array_equal(host(ck.model.tok_emb.weight), host(model.tok_emb.weight))
    ids = np.array([tok.encode("the lazy dog")])
    assert np.array_equal(logits(ck.model, ids), logits(model, ids))
    assert len(ck.optimizer_state["state"]) == len(model.parameters())  # the shared weight has one m and v


def test_latest_names_the_newest_and_only_keep_checkpoints_remain(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    model = make_model(tok.n_vocab)
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, model, tok, keep=2)
        assert (tmp_path / "latest").read_text().strip() == f"checkpoints/step_{step:06d}"
        assert resolve_checkpoint(tmp_path) == tmp_path / "checkpoints" / f"step_{step:06d}"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000030", "step_000040"]
    save_checkpoint(tmp_path, 50, model, tok, keep=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000050"]


def test_keep_deletes_the_oldest_checkpoints_past_a_million_steps(tmp_path):
    """Checkpoint names are zero-padded to 6 digits; step 1,000,000 is newer than 999,999 and
    must be the one that `latest` names and `keep` keeps."""
    tok = CharTokenizer.from_text(TEXT)
    model = make_model(tok.n_vocab, n_layers=1)
    save_checkpoint(tmp_path, 999_999, model, tok, keep=1)
    save_checkpoint(tmp_path, 1_000_000, model, tok, keep=1)
    assert resolve_checkpoint(tmp_path).name == "step_1000000"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_1000000"]
    assert load_checkpoint(tmp_path).path.name == "step_1000000"


def test_failed_write_leaves_the_previous_checkpoint_and_latest_intact(tmp_path, monkeypatch):
    tok = CharTokenizer.from_text(TEXT)
    model = make_model(tok.n_vocab)
    optimizer = trained_optimizer(model)
    ids = np.array([tok.encode("the lazy dog")])
    before = logits(model, ids)
    save_checkpoint(tmp_path, 1, model, tok, optimizer, {"step": 1})

    real_save_file, calls = checkpoint_module.save_file, []

    def save_file_then_fail(*args, **kwargs):
        calls.append(args[1])
        if len(calls) > 1:
            raise OSError("disk full")
        return real_save_file(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", save_file_then_fail)
    model.tok_emb.weight.data *= 2  # the new checkpoint would differ
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, model, tok, optimizer, {"step": 2})
    assert len(calls) == 2 and calls[0].endswith("model.safetensors")  # it failed half-way through

    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001"]  # no .tmp-*, no step 2
    assert (tmp_path / "latest").read_text().strip() == "checkpoints/step_000001"
    ck = load_checkpoint(tmp_path)
    assert ck.trainer_state["step"] == 1
    assert np.array_equal(logits(ck.model, ids), before)
    assert ck.optimizer_state is not None


def test_resolve_checkpoint_accepts_a_run_dir_or_a_checkpoint_dir(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    path = save_checkpoint(tmp_path / "run", 7, make_model(tok.n_vocab), tok)
    assert resolve_checkpoint(tmp_path / "run") == path
    assert resolve_checkpoint(path) == path
    assert resolve_checkpoint(str(path)) == path
    assert load_checkpoint(path).path == path
    empty = tmp_path / "empty"
    empty.mkdir()
    for missing in (empty, tmp_path / "does-not-exist"):
        with pytest.raises(FileNotFoundError, match=str(missing)):
            resolve_checkpoint(missing)
        with pytest.raises(FileNotFoundError, match=str(missing)):
            load_checkpoint(missing)


def test_a_cpu_checkpoint_loads_onto_the_strict_device(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    model = make_model(tok.n_vocab)
    optimizer = trained_optimizer(model)
    save_checkpoint(tmp_path, 3, model, tok, optimizer)
    ids = np.array([tok.encode("the lazy dog")])
    expected = logits(model, ids)

    ck = load_checkpoint(tmp_path, device="strict")
    assert tg.default_device() == "cpu"  # loading does not change the default
    assert {p.device for p in ck.model.parameters()} == {"strict"}
    np.testing.assert_allclose(logits(ck.model, tg.tensor(ids, device="strict")), expected, rtol=1e-6, atol=1e-7)
    optimizer = AdamW(ck.model.parameters())
    optimizer.load_state_dict(ck.optimizer_state)
    ck.model.train()
    optimizer.zero_grad()
    ck.model(tg.tensor(ids, device="strict")).mean().backward()
    optimizer.step()  # the restored m and v live on the strict device too
    assert sorted({s["step"] for s in optimizer.state.values()}) == [3, 4]  # final_norm.shift was one behind
    assert {backend.device_of(s["m"]) for s in optimizer.state.values()} == {"strict"}


# ------------------------------------------------------------------ integrity (issue 13)

def test_the_manifest_lists_every_file_with_its_size_and_sha256(tmp_path):
    import hashlib
    import json

    tok = CharTokenizer.from_text(TEXT)
    model = make_model(tok.n_vocab)
    path = save_checkpoint(tmp_path, 3, model, tok, trained_optimizer(model), {"step": 3})
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "config.json", "tokenizer.json", "optimizer.safetensors",
                                      "trainer_state.json"}
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert checkpoint_module.verify_checkpoint(path) is None


def test_a_flipped_byte_is_refused_naming_the_file_and_the_previous_checkpoint(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    model = make_model(tok.n_vocab)
    first = save_checkpoint(tmp_path, 1, model, tok)
    second = save_checkpoint(tmp_path, 2, model, tok)
    weights = second / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # one bit of one float: safetensors itself would load it without a word
    weights.write_bytes(bytes(data))
    with pytest.raises(checkpoint_module.CheckpointError) as error:
        load_checkpoint(tmp_path)
    assert f"{weights} does not match its sha256" in str(error.value)
    assert f"the newest intact checkpoint of this run is {first}" in str(error.value)
    assert load_checkpoint(first).path == first


def test_non_finite_weights_or_optimizer_state_are_never_written(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    model = make_model(tok.n_vocab)
    optimizer = trained_optimizer(model)
    model.final_norm.scale.data[0] = np.nan
    with pytest.raises(checkpoint_module.NonFiniteError, match="weight final_norm.scale"):
        save_checkpoint(tmp_path, 1, model, tok, optimizer)
    model.final_norm.scale.data[0] = 1.0
    next(iter(optimizer.state.values()))["v"][...] = np.inf
    with pytest.raises(checkpoint_module.NonFiniteError, match="optimizer state"):
        save_checkpoint(tmp_path, 1, model, tok, optimizer)
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())


def test_an_existing_checkpoint_is_never_replaced(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    model = make_model(tok.n_vocab)
    path = save_checkpoint(tmp_path, 5, model, tok)
    before = (path / "model.safetensors").read_bytes()
    model.tok_emb.weight.data *= 2
    with pytest.raises(FileExistsError, match="step_000005 already exists"):
        save_checkpoint(tmp_path, 5, model, tok)
    assert (path / "model.safetensors").read_bytes() == before
