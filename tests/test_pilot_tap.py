"""PilotTap against independent recomputation: ordinary forwards with ``output_hidden_states=True``."""

import functools

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from hf_copilot.errors import IGNORE_INDEX, CompactErrors
from hf_copilot.pilot import PilotTap

VOCAB = 96
TOP_K = 40  # of 96: labels fall both inside and outside the top-k


def tiny_pilot(name):
    torch.manual_seed(0)
    if name == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=128, vocab_size=VOCAB, pad_token_id=0))
    elif name == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=128, vocab_size=VOCAB,
                                             pad_token_id=0))
    elif name == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=VOCAB, n_positions=32,
                                           bos_token_id=1, eos_token_id=1, pad_token_id=0,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    else:
        model = T5ForConditionalGeneration(T5Config(d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2,
                                                    num_heads=4, d_kv=16, vocab_size=VOCAB, dropout_rate=0.0,
                                                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    return model.train()


def training_batch(name):
    """Two sequences, the second right-padded, with padding labelled IGNORE_INDEX."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, VOCAB, (2, 7), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    if name == "t5":
        labels = torch.randint(2, VOCAB, (2, 5), generator=generator)
        labels[1, 3:] = IGNORE_INDEX
        return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    return dict(input_ids=input_ids, attention_mask=attention_mask,
                labels=input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX))


def final_norm_path(name):
    return {"llama": ("model", "norm"), "qwen2": ("model", "norm"), "gpt2": ("transformer", "ln_f"),
            "t5": ("decoder", "final_layer_norm")}[name]


def reference_forward(model, batch, **kwargs):
    """An ordinary forward, in eval mode and without the labels, that no train-mode tap records."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(batch["labels"])
    model.eval()
    with torch.no_grad():
        out = model(**inputs, **kwargs)
    model.train()
    return out


def record_one(model, batch, **kwargs):
    with PilotTap(model, **kwargs) as tap:
        out = model(**batch)
        records = tap.pop_records()
    assert len(records) == 1
    return out, records[0]


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2", "t5"])
def test_errors_equal_onehot_minus_softmax(name):
    model, batch = tiny_pilot(name), training_batch(name)
    out, record = record_one(model, batch)
    # The labels are aligned with the logits exactly as the Pilot's own loss aligns them.
    aligned_loss = nn.functional.cross_entropy(record.logits.flatten(0, 1).float(),
                                               record.next_token_labels().flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(aligned_loss, out.loss)

    logits = reference_forward(model, batch).logits
    labels = batch["labels"]
    if name != "t5":  # a causal LM's logits at t predict the label at t + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    probs = logits.softmax(-1)
    valid = labels != IGNORE_INDEX
    expected = (nn.functional.one_hot(labels.clamp(min=0), VOCAB) - probs) * valid[..., None]

    errors = record.errors(TOP_K)
    if name != "t5":
        assert (errors.labels[:, -1] == IGNORE_INDEX).all()
        errors = errors.map(lambda t: t[:, :-1])
    dense = errors.to_dense(VOCAB)
    top_probs, top_ids = probs.topk(TOP_K, dim=-1)
    top = torch.zeros_like(dense, dtype=torch.bool).scatter_(-1, top_ids, True)
    label = nn.functional.one_hot(labels.clamp(min=0), VOCAB).bool() & valid[..., None]
    # Compact form: exact on the top-k entries and at the label (its own probability is kept where the top-k does
    # not hold it); zero elsewhere.
    torch.testing.assert_close(dense[top | label], expected[top | label], atol=1e-6, rtol=1e-5)
    assert (dense[~top & ~label] == 0).all()
    label_probs = probs.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    outside = (label & ~top).any(-1)
    torch.testing.assert_close(errors.dropped_mass(), (1 - top_probs.sum(-1) - label_probs * outside) * valid,
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(errors.squared_norm(), dense.pow(2).sum(-1), atol=1e-5, rtol=1e-5)
    assert (label & ~top).any() and (label & top).any()  # both cases occur in this batch
    assert (errors.probs[~valid] == 0).all()


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_errors_top_k_keeps_compact_errors_and_frees_the_logits(name):
    model, batch = tiny_pilot(name), training_batch(name)
    _, kept = record_one(model, batch)
    logits_storage = []  # each forward's logits, by the address of their memory, seen by a hook after the tap's
    handle = model.register_forward_hook(
        lambda module, args, output: logits_storage.append(output.logits.untyped_storage().data_ptr()))
    try:
        with PilotTap(model, errors_top_k=TOP_K) as tap:
            model(**batch).loss.backward()
            (record,) = tap.pop_records()
        with PilotTap(model) as plain:
            model(**batch).loss.backward()
            (plain_record,) = plain.pop_records()
    finally:
        handle.remove()

    def storages(record):
        tensors = [*vars(record).values(), *vars(record.compact_errors or record).values()]
        return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}

    assert logits_storage[0] not in storages(record), "errors_top_k must not keep the logits through the backward"
    assert logits_storage[1] in storages(plain_record)  # an ordinary tap does keep them
    assert tap.seconds > 0 and plain.seconds == 0  # the compaction's time is counted (CopilotCallback reports it)
    assert record.logits is None and record.vocab_size == VOCAB
    expected = CompactErrors.from_logits(kept.logits, kept.next_token_labels(), TOP_K)
    for name_, tensor in vars(record.errors(TOP_K)).items():
        torch.testing.assert_close(tensor, getattr(expected, name_))
    torch.testing.assert_close(record.hidden_states, kept.hidden_states)
    with pytest.raises(ValueError, match="errors_top_k=8"):
        record.errors(8)
    with pytest.raises(ValueError, match="errors_top_k must be a positive"):
        PilotTap(model, errors_top_k=0)


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_decoder_only_states_equal_hidden_states(name):
    model, batch = tiny_pilot(name), training_batch(name)
    # output_hidden_states' last entry has the final norm applied; without it, it is the last layer's output.
    parent, attribute = final_norm_path(name)
    setattr(getattr(model, parent), attribute, nn.Identity())
    _, record = record_one(model, batch)
    hidden = reference_forward(model, batch, output_hidden_states=True).hidden_states
    torch.testing.assert_close(record.input_states, hidden[0])
    torch.testing.assert_close(record.hidden_states, torch.stack(hidden[1:]).mean(0))
    assert record.input_mask is None
    assert torch.equal(record.token_mask(), batch["attention_mask"].bool())


def test_encoder_decoder_states_equal_hidden_states():
    model, batch = tiny_pilot("t5"), training_batch("t5")
    model.decoder.final_layer_norm = nn.Identity()
    decoder_mask = (batch["labels"] != IGNORE_INDEX).long()
    batch["decoder_attention_mask"] = decoder_mask
    _, record = record_one(model, batch)
    reference = reference_forward(model, batch, output_hidden_states=True)
    encoder = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(record.input_states, encoder.last_hidden_state)
    torch.testing.assert_close(record.hidden_states, torch.stack(reference.decoder_hidden_states[1:]).mean(0))
    assert torch.equal(record.input_mask, batch["attention_mask"])
    assert torch.equal(record.token_mask(), decoder_mask.bool())
    assert torch.equal(record.next_token_labels(), batch["labels"])


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_records_only_training_forwards(name):
    model, batch = tiny_pilot(name), training_batch(name)
    with PilotTap(model) as tap:
        with torch.no_grad():
            model(**batch)
        model.eval()
        model(**batch)
        model.train()
        model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=3,
                       do_sample=False)
        assert not tap.records
        model(**batch)
        assert len(tap.pop_records()) == 1
    model(**batch)
    assert not tap.records  # detached


def test_attach_twice_registers_hooks_once():
    model, batch = tiny_pilot("llama"), training_batch("llama")
    tap = PilotTap(model).attach().attach()
    model(**batch)
    assert len(tap.pop_records()) == 1
    tap.detach()


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_records_once(use_reentrant):
    model, batch = tiny_pilot("llama"), training_batch("llama")
    _, plain = record_one(model, batch)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    with PilotTap(model) as tap:
        model(**batch).loss.backward()
        (record,) = tap.pop_records()
    torch.testing.assert_close(record.hidden_states, plain.hidden_states)
    torch.testing.assert_close(record.input_states, plain.input_states)


class CheckpointedCall(nn.Module):
    """Checkpoints a layer's whole ``__call__`` (as FSDP/accelerate wrappers do): its hooks fire again in backward."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states, **kwargs):
        return checkpoint(functools.partial(self.layer, **kwargs), hidden_states, use_reentrant=True)


class RunTwice(CheckpointedCall):
    """Runs a layer twice within one forward: its hooks fire twice before the Pilot's forward ends."""

    def forward(self, hidden_states, **kwargs):
        self.layer(hidden_states, **kwargs)
        return self.layer(hidden_states, **kwargs)


@pytest.mark.parametrize("wrapper, grad_enabled_in_calls", [(CheckpointedCall, [False, True]),
                                                            (RunTwice, [True, True])])
def test_layer_rerun_counts_once(wrapper, grad_enabled_in_calls):
    model, batch = tiny_pilot("llama"), training_batch("llama")
    _, plain = record_one(model, batch)
    tap = PilotTap(model).attach()
    calls = []
    tap.layers[0].register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    model.model.layers = nn.ModuleList([wrapper(tap.layers[0]), tap.layers[1]])  # uneven: a double count shows
    model(**batch, use_cache=False).loss.backward()  # a cache would be written twice, as in any recompute
    tap.detach()
    assert calls == grad_enabled_in_calls  # the hooked layer really ran twice
    (record,) = tap.pop_records()
    torch.testing.assert_close(record.hidden_states, plain.hidden_states)


def test_unwraps_module_wrapper():
    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **kwargs):
            return self.module(**kwargs)

    model, batch = tiny_pilot("gpt2"), training_batch("gpt2")
    wrapped = Wrapper(model)
    with PilotTap(wrapped) as tap:
        assert tap.model is model
        wrapped(**batch)
        assert len(tap.pop_records()) == 1


def test_positional_inputs_are_read():
    model, batch = tiny_pilot("llama"), training_batch("llama")
    with PilotTap(model) as tap:
        model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
        (record,) = tap.pop_records()
    assert torch.equal(record.attention_mask, batch["attention_mask"])


def test_training_forward_without_labels_raises():
    model, batch = tiny_pilot("llama"), training_batch("llama")
    del batch["labels"]
    with PilotTap(model) as tap:
        with pytest.raises(RuntimeError, match="label_smoothing_factor"):
            model(**batch)
        assert not tap.records
        with torch.no_grad():
            model(**batch)  # not a training forward: nothing to record, nothing to complain about


def test_shift_labels_are_already_aligned():
    model, batch = tiny_pilot("llama"), training_batch("llama")
    shift_labels = torch.randint(0, VOCAB, batch["labels"].shape)
    shift_labels[:, -2:] = IGNORE_INDEX
    out, record = record_one(model, dict(batch, shift_labels=shift_labels))
    assert torch.equal(record.next_token_labels(), shift_labels)
    loss = nn.functional.cross_entropy(record.logits.flatten(0, 1), shift_labels.flatten())
    torch.testing.assert_close(loss, out.loss)


def test_generate_mode_captures_each_step():
    model = tiny_pilot("llama").eval()
    prompt = torch.randint(2, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[1, :2] = 0  # left padding
    with PilotTap(model, mode="generate") as tap:
        sequences = model.generate(input_ids=prompt, attention_mask=prompt_mask, max_new_tokens=4, do_sample=False,
                                   pad_token_id=0)
        steps = tap.pop_records()
        assert [r.hidden_states.shape[1] for r in steps] == [5, 1, 1, 1]
        assert all(r.labels is None for r in steps)
        assert torch.equal(steps[0].token_mask(), prompt_mask.bool())
        assert all(r.token_mask().all() for r in steps[1:])
        # The steps' new positions together equal one forward over everything generated but the last token.
        model(input_ids=sequences[:, :-1], attention_mask=torch.cat([prompt_mask, torch.ones(2, 3)], 1).long())
        (full,) = tap.pop_records()
    torch.testing.assert_close(torch.cat([r.hidden_states for r in steps], 1), full.hidden_states,
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat([r.input_states for r in steps], 1), full.input_states)


def test_generate_mode_encoder_decoder_beams():
    model = tiny_pilot("t5").eval()
    batch = training_batch("t5")
    with PilotTap(model, mode="generate") as tap:
        model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=3,
                       num_beams=2, do_sample=False)
        steps = tap.pop_records()
    encoder = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert len(steps) == 3
    for record in steps:
        torch.testing.assert_close(record.input_states, encoder.last_hidden_state.repeat_interleave(2, 0))
        assert torch.equal(record.input_mask, batch["attention_mask"].repeat_interleave(2, 0))
        assert record.hidden_states.shape == (4, 1, 64)


def test_mode_is_validated_and_switchable():
    model, batch = tiny_pilot("llama"), training_batch("llama")
    with pytest.raises(ValueError, match="mode"):
        PilotTap(model, mode="eval")
    with PilotTap(model) as tap, torch.no_grad():
        model(**batch)
        assert not tap.records
        tap.mode = "generate"
        model(**batch)
        assert len(tap.records) == 1
    with PilotTap(model, mode="generate") as tap:  # a processor left open while the Pilot trains keeps nothing
        model.train()(**batch).loss.backward()
        assert not tap.records
