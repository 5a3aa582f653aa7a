"""DPO: preference data, the loss against hand-computed values and TRL's formulas, the reference model
without a copy, sequence log-probs against transformers, training through the one loop, exact resume."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from minilm.config import DPOConfig, ModelConfig, TokenizerConfig, build
from minilm.dpo import (DPOObjective, PreferenceBatches, encode_preferences, eval_pair_batches, pair_logps,
                        preference_accuracy, preference_loss, sequence_logps)
from minilm.errors import ConfigError, DataError
from minilm.lora import adapters_disabled, inject_lora, lora_state, mark_only_lora_trainable, merged_model
from minilm.model import GPT
from minilm.pairs import read_preferences, split_preferences
from minilm.sft import DEFAULT_TEMPLATE, IGNORE
from minilm.tokenizer import build_char_tokenizer
from minilm.train import train

PAIRS = [
    {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "I like trains a lot."},
    {"prompt": "Name a primary colour.", "chosen": "Red.", "rejected": "Tuesday, probably."},
    {"prompt": "How many days are in a week?", "chosen": "Seven days.", "rejected": "Blue."},
    {"prompt": "Say hello.", "chosen": "Hello! How can I help?", "rejected": "No."},
    {"prompt": "What do bees make?", "chosen": "Honey and wax.", "rejected": "Cars and roads."},
    {"prompt": "What is two plus three?", "chosen": "Five.", "rejected": "Twenty-two, I think."},
    {"prompt": "Who wrote Hamlet?", "chosen": "William Shakespeare.", "rejected": "A dog."},
    {"prompt": "What is water made of?", "chosen": "Hydrogen and oxygen.", "rejected": "Sand."},
]
CTX = 96


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("chartok")
    text = DEFAULT_TEMPLATE + "\n".join(" ".join(p.values()) for p in PAIRS)
    (d / "text.txt").write_text(text, encoding="utf-8")
    return build_char_tokenizer(d / "text.txt", d / "char.json", TokenizerConfig(kind="char"))


def policy(vocab: int, seed: int = 0, dropout: float = 0.0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=vocab, context_length=CTX, n_layer=2, n_head=4, n_kv_head=2, d_model=32))
    inject_lora(model, DPOConfig(lora_rank=4, lora_alpha=8, lora_dropout=dropout).lora())
    mark_only_lora_trainable(model)
    return model


def examples(tok, pairs=PAIRS):
    return encode_preferences(pd.DataFrame(pairs), tok, DEFAULT_TEMPLATE, CTX)


# ------------------------------------------------------------------------------------------- the loss


def test_preference_loss_matches_a_hand_computed_example():
    pc, pr, rc, rr = (torch.tensor([-4.0, -3.0]), torch.tensor([-6.0, -2.0]), torch.tensor([-5.0, -3.5]),
                      torch.tensor([-5.5, -2.5]))
    # pair 0: logits = (-4 + 6) - (-5 + 5.5) = 1.5; pair 1: (-3 + 2) - (-3.5 + 2.5) = 0
    losses, chosen, rejected = preference_loss(pc, pr, rc, rr, beta=0.5)
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-0.75)), math.log(2)], abs=1e-6)
    assert chosen.tolist() == pytest.approx([0.5, 0.25]) and rejected.tolist() == pytest.approx([-0.25, 0.25])
    smoothed, _, _ = preference_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.2)
    expect = 0.8 * math.log1p(math.exp(-0.75)) + 0.2 * math.log1p(math.exp(0.75))
    assert smoothed[0].item() == pytest.approx(expect, abs=1e-6)
    ipo, _, _ = preference_loss(pc, pr, rc, rr, beta=0.5, loss="ipo")
    assert ipo.tolist() == pytest.approx([(1.5 - 1.0) ** 2, 1.0], abs=1e-6)     # (logits - 1/(2 beta))^2


def _trl_dpo_loss(pc, pr, rc, rr, beta, loss_type, label_smoothing):
    """TRL's DPOTrainer.dpo_loss for loss_type "sigmoid" and "ipo", written out from its source (TRL
    itself is not a dependency): on the log-probs it is handed (IPO's are per-token means)."""
    logratios = pc - pr
    ref_logratios = rc - rr
    logits = logratios - ref_logratios
    if loss_type == "sigmoid":
        losses = (-torch.nn.functional.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - torch.nn.functional.logsigmoid(-beta * logits) * label_smoothing)
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


@pytest.mark.parametrize("loss,ls", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0)])
def test_preference_loss_equals_trls_formula_on_the_same_logps(loss, ls):
    g = torch.Generator().manual_seed(3)
    logps = [-20 * torch.rand(16, generator=g) for _ in range(4)]
    ours = preference_loss(*logps, beta=0.3, loss=loss, label_smoothing=ls)
    theirs = _trl_dpo_loss(*logps, 0.3, loss, ls)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ipo_averages_token_logps_and_sigmoid_sums_them(tok):
    ex = examples(tok)
    x, y = eval_pair_batches(ex, 8)[0]
    model = policy(tok.vocab_size)
    with torch.no_grad():
        logits = model(x)
        summed, n = sequence_logps(logits, y)
        with adapters_disabled(model):
            ref, _ = sequence_logps(model(x), y)
    ipo = DPOObjective(DPOConfig(loss="ipo", beta=0.5))
    with torch.no_grad():
        loss = ipo(model, x, y, {})
    B = x.shape[0] // 2
    pol, r = summed / n, ref / n
    expect, _, _ = preference_loss(pol[:B], pol[B:], r[:B], r[B:], beta=0.5, loss="ipo")
    assert loss.item() == pytest.approx(expect.sum().item(), rel=1e-6)


def test_step_zero_loss_is_ln2_and_every_reward_zero(tok):
    """A fresh adapter is a no-op (B = 0): policy = reference, so the loss is exactly ln 2 per pair."""
    ex = examples(tok)
    model = policy(tok.vocab_size)
    obj = DPOObjective(DPOConfig(beta=0.1, label_smoothing=0.2))
    for autocast in (False, True):
        x, y = eval_pair_batches(ex, 8)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = obj(model.train(), x, y, {})
        assert loss.item() / obj.count(y) == pytest.approx(math.log(2), abs=1e-7)
        m = obj.metrics(True)
        assert m["rewards/chosen"] == 0 and m["rewards/rejected"] == 0 and m["rewards/margins"] == 0
        assert m["rewards/accuracies"] == 0            # ties are not wins, as in TRL
        assert m["logps/chosen"] < 0 and m["logps/rejected"] < 0


def test_the_reference_is_the_model_with_its_adapter_off_and_no_copy(tok):
    ex = examples(tok)
    x, y = eval_pair_batches(ex, 8)[0]
    model = policy(tok.vocab_size)
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    with torch.no_grad():
        for layer in model.modules():
            if hasattr(layer, "lora_B"):
                layer.lora_B.weight.normal_(0, 0.2)
        tuned = model(x)
        with adapters_disabled(model):
            off = model(x)
        plain = GPT(model.config)
        plain.load_state_dict(base, strict=False)
        torch.testing.assert_close(off, plain(x), rtol=0, atol=0)
    assert (tuned - off).abs().max() > 1e-3
    assert not any(getattr(m, "disabled", False) for m in model.modules())   # switched back on
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 1.2 * sum(v.numel() for v in base.values())           # one copy of the base


def test_sequence_logps_equal_the_exported_transformers_models(tok):
    pytest.importorskip("transformers")
    from minilm.hf import to_transformers

    ex = examples(tok)
    x, y = eval_pair_batches(ex, 8)[0]
    model = policy(tok.vocab_size, seed=1)
    with torch.no_grad():
        for layer in model.modules():
            if hasattr(layer, "lora_B"):
                layer.lora_B.weight.normal_(0, 0.1)
        plain = merged_model(model).eval()
        ours, n = sequence_logps(plain(x), y)
        hf = to_transformers(plain).eval()
        theirs = torch.log_softmax(hf(input_ids=x).logits.float(), -1)
        mask = y != IGNORE
        picked = theirs.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    torch.testing.assert_close(ours, picked.sum(-1), rtol=0, atol=1e-4)
    assert (n == mask.sum(-1)).all()


# ------------------------------------------------------------------------------------------- the data


def test_pairs_encode_with_targets_on_each_response_only(tok):
    ex = examples(tok)
    assert len(ex) == len(PAIRS) and ex.counts()["dropped"] == 0
    for i, p in enumerate(PAIRS):
        for side, name in ((ex.chosen, "chosen"), (ex.rejected, "rejected")):
            ids, lab = side.input_ids[i], side.labels[i]
            kept = [t for t in lab.tolist() if t != IGNORE]
            assert tok.decode(kept[:-1]) == p[name] and kept[-1] == tok.eos_id
            assert tok.decode(ids[1:side.prompt_lengths[i]].tolist()) == DEFAULT_TEMPLATE.format(
                instruction=p["prompt"])
    x, y = PreferenceBatches(ex, 3, seed=0).batch(5)
    assert x.shape == y.shape and x.shape[0] == 6


def test_a_pair_equal_after_cutting_or_with_a_prompt_filling_the_context_is_left_out(tok):
    long_prompt = {"prompt": "a" * 200, "chosen": "x", "rejected": "y"}
    same_after_cut = {"prompt": "Say hello.", "chosen": "b" * 300 + "1", "rejected": "b" * 300 + "2"}
    ex = encode_preferences(pd.DataFrame(PAIRS[:2] + [long_prompt, same_after_cut]), tok, DEFAULT_TEMPLATE, CTX)
    assert ex.counts() == {"pairs": 4, "examples": 2, "truncated": 1, "dropped": 2}
    with pytest.raises(DataError, match="all 1 preference pairs were left out"):
        encode_preferences(pd.DataFrame([long_prompt]), tok, DEFAULT_TEMPLATE, CTX)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_preference_files_in_every_format_with_configurable_fields(tmp_path, fmt):
    df = pd.DataFrame(PAIRS).rename(columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    path = tmp_path / f"prefs.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in df.to_dict("records")))
    elif fmt == "json":
        path.write_text(json.dumps(df.to_dict("records")))
    elif fmt == "csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path)
    got = read_preferences(path, "question", "good", "bad")
    assert got.to_dict("records") == PAIRS


@pytest.mark.parametrize("record,needle", [
    ({"prompt": "q", "chosen": "a"}, "record 1 has no 'rejected' field (fields: prompt, chosen); set "
                                     "preferences.prompt_field / chosen_field / rejected_field"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "record 1 has an empty or non-text 'chosen'"),
    ({"prompt": "q", "chosen": "same", "rejected": " same "}, "record 1 has the same text as chosen and as "
                                                              "rejected (nothing to prefer)"),
])
def test_a_malformed_pair_is_one_line_naming_it_or_skipped(tmp_path, record, needle):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([record, PAIRS[0]]))
    with pytest.raises(DataError) as err:
        read_preferences(path)
    assert needle in str(err.value) and "\n" not in str(err.value)
    got = read_preferences(path, bad_records="skip")
    assert len(got) == 1 and got.attrs["skipped"] == 1


def test_the_split_keeps_a_prompts_pairs_together(tmp_path):
    df = pd.DataFrame(PAIRS + [dict(PAIRS[0], rejected="Lyon.")])
    train_df, val_df = split_preferences(df, 0.3, seed=1)
    assert len(train_df) + len(val_df) == len(df) and len(val_df) >= 1
    assert not set(train_df["prompt"]) & set(val_df["prompt"])


def test_dpo_params_are_validated_with_one_line_each():
    with pytest.raises(ConfigError, match=r"dpo.beta must be > 0, got 0.0"):
        build(DPOConfig, {"beta": 0.0}, "dpo")
    with pytest.raises(ConfigError, match=r"dpo.label_smoothing applies to loss 'sigmoid' only"):
        build(DPOConfig, {"loss": "ipo", "label_smoothing": 0.1}, "dpo")
    with pytest.raises(ConfigError, match=r"dpo.lora_rank must be > 0"):
        build(DPOConfig, {"lora_rank": 0}, "dpo")
    with pytest.raises(ConfigError, match=r"dpo.loss must be 'sigmoid' \| 'ipo', got 'kto'"):
        build(DPOConfig, {"loss": "kto"}, "dpo")


# ------------------------------------------------------------------------------------------- training


def _train(tok, out_dir, max_steps, **cfg_kw):
    ex = examples(tok)
    cfg_kw = {"log_every": 2, **cfg_kw}
    cfg = DPOConfig(max_steps=max_steps, batch_size=2, lr=2e-2, min_lr=2e-3, warmup_steps=2, eval_every=4,
                    eval_batches=2, beta=0.5, **cfg_kw)
    model = policy(tok.vocab_size, seed=0, dropout=cfg.lora_dropout)
    obj = DPOObjective(cfg)
    result = train(model, PreferenceBatches(ex, cfg.batch_size, seed=7), cfg, out_dir=out_dir,
                   eval_batches=eval_pair_batches(ex, 4), run_config={"dpo": "test"}, progress=False,
                   save_state=lora_state, objective=obj)
    return model, result


def test_training_prefers_the_chosen_answers_and_logs_trls_figures(tok, tmp_path):
    model, result = _train(tok, tmp_path / "run", 24)
    last = result.history[-1]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected", "val_rewards/accuracies", "val_rewards/margins"):
        assert name in last, name
    first_val = next(r for r in result.history if "val_loss" in r)
    assert result.best_val_loss < first_val["val_loss"] < math.log(2) + 1e-6
    assert last["val_rewards/accuracies"] > 0.9 and last["val_rewards/margins"] > 0
    batches = eval_pair_batches(examples(tok), 4)
    acc = preference_accuracy(pair_logps(model, batches), pair_logps(model, batches, reference=True), 0.5)
    assert acc["accuracy"] > 0.9 and acc["margin"] > 0 and acc["pairs"] == len(PAIRS)


def test_a_crashed_dpo_run_resumed_from_last_equals_an_uninterrupted_run(tok, tmp_path):
    """The loop's exact resume holds for DPO: a run that dies at step 9 (``last`` saved at 8, holding the
    RNG and the objective's figures not yet logged) and is rerun ends bit-identical to a run that never
    stopped: adapter weights and every logged row (with dropout, so the RNG matters)."""
    kw = dict(lora_dropout=0.1, log_every=3)          # 3: figures of steps 7-8 are pending at the save
    whole, r_whole = _train(tok, tmp_path / "whole", 16, **kw)

    class Crash(Exception):
        pass

    class Crashing(PreferenceBatches):
        def batch(self, step, micro=0):
            if step == 8:
                raise Crash
            return super().batch(step, micro)

    cfg = DPOConfig(max_steps=16, batch_size=2, lr=2e-2, min_lr=2e-3, warmup_steps=2, eval_every=4,
                    eval_batches=2, beta=0.5, **kw)
    ex = examples(tok)
    with pytest.raises(Crash):
        train(policy(tok.vocab_size, dropout=0.1), Crashing(ex, 2, seed=7), cfg, out_dir=tmp_path / "split",
              eval_batches=eval_pair_batches(ex, 4), run_config={"dpo": "test"}, progress=False,
              save_state=lora_state, objective=DPOObjective(cfg))
    resumed, r_resumed = _train(tok, tmp_path / "split", 16, **kw)
    assert r_resumed.resumed_from == 8
    for k, v in lora_state(whole).items():
        assert torch.equal(v, lora_state(resumed)[k]), k
    assert r_resumed.history == r_whole.history
    assert any("rewards/margins" in r and r["step"] == 9 for r in r_resumed.history)
