"""MistakeLog: bounds, exact byte accounting, sampling, persistence and statistics, checked by recomputation."""

import dataclasses
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from hf_copilot import CopilotConfig, CopilotModel
from hf_copilot.errors import IGNORE_INDEX, CompactErrors
from hf_copilot.mistake_log import MistakeLog
from hf_copilot.safe_io import sha256_of
from hf_copilot.pilot import PilotTap
from hf_copilot.pilot_record import PilotRecord
from hf_copilot.pilot_shape import PilotSignature

WIDTH, VOCAB, TOP_K = 16, 50, 4
BF16 = 2  # bytes


def synthetic_record(lengths, seed=0, kind="decoder_only", source_lengths=None, length=8):
    """A record whose sequences have the given real lengths (right padding, every real token labelled). Each
    sequence is marked in ``hidden_states[..., 0]`` by ``seed * 10 + its row`` so samples can be traced back."""
    generator = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    mask = (torch.arange(length) < torch.tensor(lengths)[:, None]).long()
    labels = torch.randint(VOCAB, (batch, length), generator=generator).masked_fill(mask == 0, IGNORE_INDEX)
    hidden = torch.randn(batch, length, WIDTH, generator=generator)
    hidden[..., 0] = (seed * 10 + torch.arange(batch)[:, None]).float()
    input_mask = None
    if kind == "encoder_decoder":
        input_mask = (torch.arange(6) < torch.tensor(source_lengths)[:, None]).long()
        input_states = torch.randn(batch, 6, WIDTH, generator=generator)
    else:
        input_states = torch.randn(batch, length, WIDTH, generator=generator)
    return PilotRecord(
        kind=kind,
        input_states=input_states,
        hidden_states=hidden,
        logits=torch.randn(batch, length, VOCAB, generator=generator) * 3,
        labels=labels,
        labels_aligned=kind == "encoder_decoder",
        attention_mask=mask,
        input_mask=input_mask,
    )


def stored_tokens(record):
    """Independent count of the positions a record leaves in the log: real tokens up to the last labelled one."""
    targets = record.labels if record.labels_aligned else record.labels[:, 1:]
    return [int((row != IGNORE_INDEX).nonzero().max()) + 1 if (row != IGNORE_INDEX).any() else 0 for row in targets]


def documented_bytes(record, top_k=TOP_K, d=WIDTH, s=BF16):
    """The MistakeLog docstring's formula."""
    tokens = stored_tokens(record)
    sequences = sum(n > 0 for n in tokens)
    if record.kind == "decoder_only":
        return sum(tokens) * (2 * d * s + 4 + s + top_k * (4 + s)) + 8 * sequences
    sources = sum(int(mask.sum()) for mask, n in zip(record.input_mask, tokens) if n)
    return sum(tokens) * (d * s + 4 + s + top_k * (4 + s)) + sources * d * s + 16 * sequences


def test_bytes_follow_documented_formula():
    log = MistakeLog(top_k=TOP_K)
    record = synthetic_record([8, 5, 1])  # the 1-token sequence has no next-token label: not stored
    log.add(record, step=0)
    assert stored_tokens(record) == [7, 4, 0]
    assert log.bytes == documented_bytes(record) == 11 * (2 * WIDTH * BF16 + 4 + BF16 + TOP_K * 6) + 2 * 8
    assert log.stats()["sequences"] == 2 and log.stats()["tokens"] == 11

    log = MistakeLog(top_k=TOP_K)
    record = synthetic_record([8, 3, 0], kind="encoder_decoder", source_lengths=[6, 2, 4])
    log.add(record, step=0)
    assert log.bytes == documented_bytes(record) == (11 * (WIDTH * BF16 + 4 + BF16 + TOP_K * 6) + 8 * WIDTH * BF16
                                                     + 2 * 16)


def test_trailing_unlabelled_positions_are_not_stored():
    record = synthetic_record([8, 8])
    record.labels[0, 5:] = IGNORE_INDEX  # e.g. a completion that ends early without padding the mask
    record.labels[1, :3] = IGNORE_INDEX  # a prompt: kept, it is context for later positions
    log = MistakeLog(top_k=TOP_K)
    log.add(record, step=0)
    batch = log.sample(2, generator=torch.Generator().manual_seed(0))
    assert sorted(batch.attention_mask.sum(1).tolist()) == [4, 7]
    assert log.bytes == documented_bytes(record)


def test_evicts_whole_rounds_beyond_max_rounds():
    log = MistakeLog(max_rounds=3, top_k=TOP_K)
    for seed, step in enumerate([0, 1, 1, 2, 3]):  # step 1 is one round of two entries (gradient accumulation)
        log.add(synthetic_record([4, 3], seed=seed), step=step)
    assert log.steps == [1, 1, 2, 3]
    assert log.rounds == 3
    log.add(synthetic_record([4], seed=9), step=4)
    assert log.steps == [2, 3, 4]


def test_bytes_stay_within_budget_over_a_long_run():
    records = [synthetic_record([8 - seed % 5, 2 + seed % 6, 8], seed=seed) for seed in range(60)]
    budget = int(2.5 * documented_bytes(records[0]))
    log = MistakeLog(max_bytes=budget, top_k=TOP_K)
    for step, record in enumerate(records):
        log.add(record, step)
        # The longest run of newest rounds that fits the budget, and nothing else.
        sizes = [documented_bytes(r) for r in records[: step + 1]]
        kept = next(n for n in range(len(sizes), 0, -1) if sum(sizes[-n:]) <= budget)
        assert log.steps == list(range(step + 1 - kept, step + 1))
        assert log.bytes == sum(sizes[-kept:]) <= budget
        assert log.stats()["bytes"] == log.bytes
    assert 2 <= len(log) < 60


def test_round_larger_than_budget_is_skipped_and_counted():
    log = MistakeLog(max_bytes=1000, top_k=TOP_K)
    with pytest.warns(RuntimeWarning, match="max_bytes=1000"):
        log.add(synthetic_record([8, 8]), step=0)
    assert len(log) == 0 and log.bytes == 0 and log.stats()["skipped_oversized_records"] == 1


@pytest.mark.parametrize("kind, field", [("decoder_only", "hidden_states"), ("decoder_only", "input_states"),
                                         ("decoder_only", "logits"), ("encoder_decoder", "input_states")])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_sequence_with_a_non_finite_value_is_left_out_alone(kind, field, value):
    """Whatever the log would store of a sequence (its states, the Pilot's input to the first layer, its errors):
    one NaN/inf anywhere leaves out that sequence only, counted, so no sampled batch ever holds one."""
    record = synthetic_record([8, 6, 8], seed=1, kind=kind, source_lengths=[6, 4, 6])
    poisoned = getattr(record, field).clone()
    poisoned[1, 2, 1] = value  # the second sequence, inside its real tokens
    log = MistakeLog(top_k=TOP_K)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        log.add(dataclasses.replace(record, **{field: poisoned}), step=0)
    assert log.stats()["skipped_non_finite_sequences"] == 1 and log.stats()["sequences"] == 2
    batch = log.sample(64, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    assert sorted(set(batch.pilot_hidden_states[:, 0, 0].tolist())) == [10.0, 12.0]  # the 1st and 3rd sequences
    for stored in (batch.pilot_hidden_states, batch.pilot_input_states, batch.errors.probs):
        assert torch.isfinite(stored).all()


def test_records_of_another_pilot_are_refused():
    log = MistakeLog(top_k=TOP_K)
    log.add(synthetic_record([4]), step=0)
    other = synthetic_record([4])
    other = dataclasses.replace(other, logits=other.logits[..., :-1])
    with pytest.raises(ValueError, match="one log per Pilot"):
        log.add(other, step=1)


def expected_sequence(record, row, top_k=TOP_K):
    """What the log must return for one sequence of a record, computed from the record directly."""
    n = stored_tokens(record)[row]
    targets = record.next_token_labels()[row, :n]
    probs, ids = record.logits[row, :n].float().softmax(-1).topk(top_k, dim=-1)
    if record.kind == "decoder_only":
        inputs = record.input_states[row, :n]
    else:
        inputs = record.input_states[row][record.input_mask[row].bool()]
    return dict(hidden=record.hidden_states[row, :n].bfloat16().float(), inputs=inputs.bfloat16().float(),
                labels=targets, ids=ids, probs=probs.bfloat16().float())


@pytest.mark.parametrize("kind", ["decoder_only", "encoder_decoder"])
def test_sample_returns_the_stored_sequences(kind):
    records = {seed: synthetic_record([8, 6, 3], seed=seed, kind=kind, source_lengths=[6, 4, 5])
               for seed in range(1, 6)}
    log = MistakeLog(top_k=TOP_K)
    for seed, record in records.items():
        log.add(record, step=seed)
    batch = log.sample(6, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    assert batch.pilot_hidden_states.dtype == torch.float32 and batch.errors.labels.dtype == torch.long
    assert (kind == "encoder_decoder") == (batch.pilot_input_mask is not None)
    for row in range(6):
        marker = int(batch.pilot_hidden_states[row, 0, 0])
        seed, sequence = divmod(marker, 10)
        expected = expected_sequence(records[seed], sequence)
        n = len(expected["labels"])
        assert batch.attention_mask[row].tolist() == [1] * n + [0] * (batch.attention_mask.shape[1] - n)
        assert int(batch.steps[row]) == seed
        assert torch.equal(batch.pilot_hidden_states[row, :n], expected["hidden"])
        assert torch.equal(batch.errors.labels[row, :n], expected["labels"])
        assert torch.equal(batch.errors.ids[row, :n], expected["ids"])
        assert torch.equal(batch.errors.probs[row, :n], expected["probs"])
        assert (batch.errors.labels[row, n:] == IGNORE_INDEX).all() and (batch.errors.probs[row, n:] == 0).all()
        m = len(expected["inputs"])
        assert torch.equal(batch.pilot_input_states[row, :m], expected["inputs"])
        if kind == "encoder_decoder":
            assert batch.pilot_input_mask[row].sum() == m
        assert (batch.pilot_input_states[row, m:] == 0).all()


def test_sample_always_includes_the_newest_round_and_is_uniform():
    log = MistakeLog(top_k=TOP_K)
    for step in range(10):
        log.add(synthetic_record([4, 4], seed=step), step=step)
    seen = set()
    for seed in range(200):
        batch = log.sample(3, generator=torch.Generator().manual_seed(seed))
        markers = batch.pilot_hidden_states[:, 0, 0].long().tolist()
        assert 9 in batch.steps.tolist()
        assert len(set(markers)) == 3  # distinct sequences
        seen.update(markers)
    assert seen == {step * 10 + row for step in range(10) for row in range(2)}
    assert log.sample(100).pilot_hidden_states.shape[0] == 20  # more than the log holds: all of it


def test_empty_log_cannot_be_sampled():
    with pytest.raises(ValueError, match="empty"):
        MistakeLog().sample(4)


def test_stats_match_direct_recomputation():
    records = [synthetic_record([8, 5, 2], seed=seed) for seed in range(4)]
    for record in records:
        record.labels[0, 1:3] = IGNORE_INDEX  # unlabelled positions inside a sequence are stored, not counted
    log = MistakeLog(top_k=TOP_K)
    for step, record in enumerate(records):
        log.add(record, step)
    stats = log.stats()
    everything = log.sample(100)
    dense = everything.errors.to_dense(VOCAB)
    labelled = everything.errors.labels != IGNORE_INDEX
    assert stats["labelled_tokens"] == int(labelled.sum()) == sum(
        int((r.next_token_labels() != IGNORE_INDEX).sum()) for r in records)
    assert stats["tokens"] == sum(sum(stored_tokens(r)) for r in records) == int(everything.attention_mask.sum())
    assert stats["entries"] == stats["rounds"] == 4 and stats["sequences"] == 12
    # The all-zero predictor's RMSE loss: the root mean square of the dense errors' norms.
    assert math.isclose(stats["error_rms"], float(dense.pow(2).sum(-1)[labelled].mean().sqrt()), rel_tol=1e-5)
    # A compact error sums to the probability mass it dropped (an exact one sums to 0).
    assert math.isclose(stats["mean_dropped_mass"], float(dense.sum(-1)[labelled].mean()), rel_tol=1e-5)


def test_full_width_log_matches_exact_errors_up_to_bf16():
    records = [synthetic_record([8, 5], seed=seed) for seed in range(3)]
    log = MistakeLog(top_k=VOCAB)
    for step, record in enumerate(records):
        log.add(record, step)
    exact = torch.cat([
        (nn.functional.one_hot(r.next_token_labels().clamp(min=0), VOCAB) - r.logits.softmax(-1))[
            r.next_token_labels() != IGNORE_INDEX] for r in records])
    stats = log.stats()
    assert stats["mean_dropped_mass"] < 1e-2  # only bf16 rounding of the probabilities
    assert math.isclose(stats["error_rms"], float(exact.pow(2).sum(-1).mean().sqrt()), rel_tol=1e-2)


def test_empty_log_stats():
    stats = MistakeLog().stats()
    assert stats["entries"] == stats["tokens"] == stats["bytes"] == 0
    assert math.isnan(stats["error_rms"])


@pytest.mark.parametrize("kind", ["decoder_only", "encoder_decoder"])
def test_save_load_round_trip(tmp_path, kind):
    log = MistakeLog(max_rounds=7, max_bytes=10**6, top_k=TOP_K)
    for step in range(3):
        log.add(synthetic_record([8, 4], seed=step, kind=kind, source_lengths=[3, 6]), step=10 + step)
    target = tmp_path / "log"
    log.save(target)
    log.save(target)  # overwriting an existing log
    assert sorted(os.listdir(tmp_path)) == ["log"]  # no staging or retired folders left behind
    loaded = MistakeLog.load(target)
    assert (loaded.max_rounds, loaded.max_bytes, loaded.top_k, loaded.storage_dtype) == (7, 10**6, TOP_K,
                                                                                        torch.bfloat16)
    assert loaded.signature == PilotSignature(kind, VOCAB, WIDTH)
    assert loaded.steps == [10, 11, 12] and loaded.bytes == log.bytes
    for saved, restored in zip(log._entries, loaded._entries):
        assert saved.tensors().keys() == restored.tensors().keys()
        for name, tensor in saved.tensors().items():
            assert torch.equal(tensor, restored.tensors()[name]) and tensor.dtype == restored.tensors()[name].dtype
    assert loaded.stats() == log.stats()


def test_a_log_of_format_1_still_loads_and_represents_what_it_did(tmp_path):
    """Format 1 kept no label probabilities: such a log loads, and its errors are what format 1 represented (the
    label's probability taken as 0 where the top-k does not hold it); new records added to it keep theirs."""
    log = MistakeLog(top_k=4)
    log.add(synthetic_record([8, 4]), step=0)
    log.save(tmp_path / "log")
    tensors = load_file(tmp_path / "log" / "mistake_log.safetensors")
    save_file({name: t for name, t in tensors.items() if not name.endswith(".label_probs")},
              tmp_path / "log" / "mistake_log.safetensors")
    metadata = json.loads((tmp_path / "log" / "mistake_log.json").read_text())
    metadata.update(format_version=1, tensors_sha256=sha256_of(tmp_path / "log" / "mistake_log.safetensors"))
    (tmp_path / "log" / "mistake_log.json").write_text(json.dumps(metadata))

    old = MistakeLog.load(tmp_path / "log")
    assert old._entries[0].label_probs is None
    now, before = log.sample(2, torch.Generator().manual_seed(0)), old.sample(2, torch.Generator().manual_seed(0))
    outside = now.errors.valid & ~now.errors.label_in_top_k()
    assert outside.any()
    assert (before.errors.label_probs == 0).all()
    format_1 = CompactErrors(now.errors.labels, now.errors.ids, now.errors.probs)  # no label probabilities
    torch.testing.assert_close(before.errors.to_dense(VOCAB), format_1.to_dense(VOCAB))
    assert (before.errors.to_dense(VOCAB) != now.errors.to_dense(VOCAB)).any(-1).eq(outside).all()
    old.add(synthetic_record([5], seed=1), step=1)
    assert old._entries[-1].label_probs is not None


def test_load_refuses_a_log_of_another_pilot(tmp_path):
    log = MistakeLog(top_k=TOP_K)
    log.add(synthetic_record([5]), step=0)
    log.save(tmp_path / "log")
    fits = CopilotConfig(vocab_size=VOCAB, hidden_size=32, pilot_hidden_size=WIDTH, num_attention_heads=4)
    assert MistakeLog.load(tmp_path / "log", copilot=fits).signature.vocab_size == VOCAB
    wrong_vocab = CopilotConfig(vocab_size=VOCAB + 4, hidden_size=32, pilot_hidden_size=WIDTH, num_attention_heads=4)
    with pytest.raises(ValueError, match=rf"log's Pilot emits {VOCAB} logits per token where the Copilot expects "
                                         rf"{VOCAB + 4}.*record a new log"):
        MistakeLog.load(tmp_path / "log", copilot=wrong_vocab)
    wrong_width = CopilotConfig(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4)
    with pytest.raises(ValueError, match=f"has width {WIDTH} where the Copilot expects 32"):
        MistakeLog.load(tmp_path / "log", copilot=wrong_width)
    with pytest.raises(FileNotFoundError, match="MistakeLog.save"):
        MistakeLog.load(tmp_path / "nothing")


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=128, vocab_size=96)).train()


def tiny_t5():
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                                               d_kv=16, vocab_size=96, dropout_rate=0.0,
                                               decoder_start_token_id=0)).train()


@pytest.mark.parametrize("make_pilot", [tiny_llama, tiny_t5])
def test_tap_to_log_to_copilot(make_pilot):
    pilot = make_pilot()
    copilot = CopilotModel.from_pilot(pilot, num_hidden_layers=2)
    log = MistakeLog(top_k=16)
    generator = torch.Generator().manual_seed(0)
    with PilotTap(pilot) as tap:
        for step in range(3):
            input_ids = torch.randint(2, 96, (2, 9), generator=generator)
            attention_mask = torch.ones_like(input_ids)
            attention_mask[0, 6:] = 0
            labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
            if pilot.config.is_encoder_decoder:
                labels = labels[:, :7].contiguous()
            pilot(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
            (record,) = tap.pop_records()
            log.add(record, step)
    log.check_compatible(copilot)
    batch = log.sample(4, generator=generator)
    out = copilot(**batch.copilot_inputs())
    # The zero-initialised head predicts nothing, so the loss is the RMS norm of the sampled errors.
    labelled = batch.errors.valid & batch.attention_mask.bool()
    expected = batch.errors.to_dense(96).pow(2).sum(-1)[labelled].mean().sqrt()
    torch.testing.assert_close(out.loss, expected)


def test_a_record_of_another_pilot_is_refused_with_what_differs():
    log = MistakeLog(top_k=TOP_K)
    log.add(synthetic_record([5]), step=0)
    with pytest.raises(ValueError, match="the new record's Pilot is encoder_decoder where the log expects "
                                         "decoder_only.*Use one log per Pilot"):
        log.add(synthetic_record([3], kind="encoder_decoder", source_lengths=[4]), step=1)
    assert len(log) == 1
