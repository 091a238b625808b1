import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import DEVICES, VOCAB, WIDTH, tiny_pilot
from transformers import AutoModel, BertConfig, BertForMaskedLM

from hf_copilot import CompactErrors, CopilotConfig, CopilotModel, OwnCorrections, dense_errors, shift_right
from hf_copilot import errors as errors_module

B, T, S = 3, 7, 5


def small_config(kind="decoder_only", **overrides):
    fields = dict(vocab_size=VOCAB, hidden_size=WIDTH, pilot_hidden_size=WIDTH, pilot_kind=kind, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
    fields.update(overrides)
    return CopilotConfig(**fields)


def trained_looking(copilot, seed=0):
    """Gives the zero-initialised head random weights so outputs are non-trivial."""
    torch.manual_seed(seed)
    with torch.no_grad():
        copilot.correction_head.weight.normal_(std=0.5)
    return copilot.eval()


def random_errors(seed=0, batch=B, length=T, top_k=8):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, VOCAB, generator=gen) * 2
    labels = torch.randint(0, VOCAB, (batch, length), generator=gen)
    labels[0, :2] = -100
    return logits, labels, CompactErrors.from_logits(logits, labels, top_k)


def inputs(kind, seed=0, batch=B, length=T):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, WIDTH, generator=gen)
    if kind == "decoder_only":
        return dict(pilot_hidden_states=hidden, pilot_input_states=torch.randn(batch, length, WIDTH, generator=gen))
    source_mask = torch.ones(batch, S, dtype=torch.long)
    source_mask[0, -2:] = 0
    return dict(pilot_hidden_states=hidden, pilot_input_states=torch.randn(batch, S, WIDTH, generator=gen),
                pilot_input_mask=source_mask)


def left_padded_mask(batch=B, length=T):
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :1] = 0
    return mask


@pytest.mark.parametrize("kind", ["decoder_only", "encoder_decoder"])
def test_untrained_copilot_outputs_exactly_zero(kind):
    copilot = CopilotModel(small_config(kind)).eval()
    _, _, errors = random_errors()
    out = copilot(**inputs(kind), input_errors=shift_right(errors))
    assert out.corrections.shape == (B, T, VOCAB)
    assert torch.equal(out.corrections, torch.zeros_like(out.corrections))


@pytest.mark.parametrize("kind", ["decoder_only", "encoder_decoder"])
def test_incremental_equals_full_forward_with_left_padding(kind):
    copilot = trained_looking(CopilotModel(small_config(kind)))
    _, _, errors = random_errors()
    pilot = inputs(kind)
    mask = left_padded_mask()
    previous = shift_right(errors)
    full = copilot(**pilot, input_errors=previous, attention_mask=mask).corrections

    cache, steps = None, []
    for chunk in [(0, 3), (3, 4), (4, 5), (5, 7)]:  # a prompt-sized first chunk, then single tokens and a pair
        part = slice(*chunk)
        step_inputs = dict(pilot_hidden_states=pilot["pilot_hidden_states"][:, part],
                           pilot_input_states=pilot["pilot_input_states"][:, part] if kind == "decoder_only"
                           else (pilot["pilot_input_states"] if cache is None else None),
                           pilot_input_mask=pilot.get("pilot_input_mask"))
        out = copilot(**step_inputs, input_errors=previous.map(lambda t: t[:, part]),
                      attention_mask=mask[:, : chunk[1]], cache=cache, use_cache=True)
        cache = out.cache
        steps.append(out.corrections)
    incremental = torch.cat(steps, dim=1)
    real = mask.bool()
    assert (incremental - full)[real].abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["decoder_only", "encoder_decoder"])
def test_no_leak_from_future_positions(kind):
    copilot = trained_looking(CopilotModel(small_config(kind)))
    _, _, errors = random_errors()
    pilot = inputs(kind)
    previous = shift_right(errors)
    before = copilot(**pilot, input_errors=previous).corrections
    cut = 4
    changed = dict(pilot)
    changed["pilot_hidden_states"] = pilot["pilot_hidden_states"].clone()
    changed["pilot_hidden_states"][:, cut + 1:] += 5.0
    if kind == "decoder_only":
        changed["pilot_input_states"] = pilot["pilot_input_states"].clone()
        changed["pilot_input_states"][:, cut + 1:] -= 3.0
    other_errors = random_errors(seed=1)[2]
    later_inputs = CompactErrors(*(torch.cat([old[:, : cut + 1], new[:, cut + 1:]], dim=1)
                                   for old, new in zip((previous.labels, previous.ids, previous.probs,
                                                        previous.label_probs),
                                                       (other_errors.labels, other_errors.ids, other_errors.probs,
                                                        other_errors.label_probs))))
    after = copilot(**changed, input_errors=later_inputs).corrections
    assert torch.equal(after[:, : cut + 1], before[:, : cut + 1])
    assert not torch.allclose(after[:, cut + 1:], before[:, cut + 1:])


def test_retired_options_are_refused_but_old_configs_with_their_defaults_load():
    """The experimental options that measured no gain are gone: asking for one names the last commit that had it;
    a config saved before (it carries their default values) still loads."""
    for options, named in ((dict(correction="rerank"), "correction='rerank'"), (dict(read_errors=False),
                           "read_errors=False"), (dict(loss="cross_entropy"), "loss='cross_entropy'")):
        with pytest.raises(ValueError, match=f"{named} was an experimental option.*f854242"):
            small_config(**options)
    old = small_config(read_errors=True, loss="rmse", rerank_top_k=32)
    assert not any(hasattr(old, field) for field in ("read_errors", "loss", "rerank_top_k"))
    with pytest.raises(ValueError, match="correction must be one of"):
        small_config(correction="topk")


@pytest.mark.parametrize("correction", ["vocabulary", "logit_residual"])
def test_corrections_to_keep_gives_the_last_positions_of_a_full_forward(correction):
    copilot = trained_looking(CopilotModel(small_config(correction=correction)))
    logits, _, errors = random_errors(top_k=8)
    common = dict(**inputs("decoder_only"), input_errors=errors.shift_right(), attention_mask=left_padded_mask(),
                  pilot_logits=logits)
    with torch.no_grad():
        full = copilot(**common).corrections
        last_two = copilot(**common, corrections_to_keep=2).corrections
    assert last_two.shape == (B, 2, VOCAB)
    torch.testing.assert_close(last_two, full[:, -2:], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="cannot be combined with target_errors"):
        copilot(**common, target_errors=errors, corrections_to_keep=1)


def test_encoder_padding_is_invisible():
    copilot = trained_looking(CopilotModel(small_config("encoder_decoder")))
    pilot = inputs("encoder_decoder")
    before = copilot(**pilot).corrections
    pilot["pilot_input_states"] = pilot["pilot_input_states"].clone()
    pilot["pilot_input_states"][0, -2:] = 100.0  # row 0's last two source tokens are padding
    after = copilot(**pilot).corrections
    assert torch.equal(after[0], before[0])
    pilot["pilot_input_states"][1, 0] = 100.0  # a real source token of row 1: every position sees it
    assert not torch.allclose(copilot(**pilot).corrections[1, 0], before[1, 0])


def test_compact_and_dense_errors_agree():
    copilot = trained_looking(CopilotModel(small_config()))
    _, _, errors = random_errors()
    dense = errors.to_dense(VOCAB)
    pilot = dict(**inputs("decoder_only"), attention_mask=left_padded_mask())
    compact_out = copilot(**pilot, input_errors=shift_right(errors), target_errors=errors)
    dense_out = copilot(**pilot, input_errors=shift_right(dense), target_errors=dense)
    torch.testing.assert_close(compact_out.corrections, dense_out.corrections, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compact_out.loss, dense_out.loss, atol=1e-4, rtol=1e-5)


def test_own_corrections_equal_the_dense_corrections_they_stand_for():
    copilot = trained_looking(CopilotModel(small_config()))
    with torch.no_grad():
        copilot.error_projection.weight.normal_()
    first = copilot(**inputs("decoder_only"), attention_mask=left_padded_mask())
    assert first.last_hidden_state.shape == (B, T, WIDTH)
    torch.testing.assert_close(copilot.correction_head(first.last_hidden_state), first.corrections)
    pilot = dict(**inputs("decoder_only", seed=1), attention_mask=left_padded_mask())

    def fed_back(copilot, own):
        with torch.no_grad():
            return copilot(**pilot, input_errors=own).corrections

    dense = fed_back(copilot, shift_right(first.corrections))
    own = OwnCorrections(shift_right(first.last_hidden_state))
    torch.testing.assert_close(fed_back(copilot, own), dense, atol=1e-5, rtol=1e-5)
    # The d×d map is kept between calls, and rebuilt when a weight changes in place (an optimizer step).
    with torch.no_grad():
        copilot.error_projection.weight.mul_(-2.0)
    changed = fed_back(copilot, shift_right(first.corrections))
    assert not torch.allclose(changed, dense, atol=1e-3)
    torch.testing.assert_close(fed_back(copilot, own), changed, atol=1e-5, rtol=1e-5)
    # With autograd on, gradients reach both |V|×d matrices through the map.
    copilot(**pilot, input_errors=own).corrections.square().sum().backward()
    assert copilot.error_projection.weight.grad.abs().sum() > 0


def test_own_corrections_are_refused_by_a_logit_residual_copilot_and_checked_for_width():
    with pytest.raises(ValueError, match=f"OwnCorrections input_errors must have {WIDTH} entries per position"):
        CopilotModel(small_config())(**inputs("decoder_only"), input_errors=OwnCorrections(torch.zeros(B, T, 5)))
    copilot = CopilotModel(small_config(correction="logit_residual"))
    with pytest.raises(ValueError, match="OwnCorrections need correction='vocabulary'"):
        copilot(**inputs("decoder_only"), input_errors=OwnCorrections(torch.zeros(B, T, WIDTH)))


def test_compact_form_reconstructs_dense_errors():
    logits, labels, _ = random_errors()
    exact = dense_errors(logits, labels)
    full_k = CompactErrors.from_logits(logits, labels, top_k=VOCAB)
    torch.testing.assert_close(full_k.to_dense(VOCAB), exact, atol=1e-6, rtol=0)
    torch.testing.assert_close(full_k.squared_norm(), exact.pow(2).sum(-1), atol=1e-5, rtol=1e-5)
    top8 = CompactErrors.from_logits(logits, labels, top_k=8)
    gap = (top8.to_dense(VOCAB) - exact).abs().sum(-1)  # L1 gap equals the dropped probability mass
    torch.testing.assert_close(gap, top8.dropped_mass(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_errors_read_in_small_chunks_match_dense_errors(monkeypatch, device, dtype):
    """Chunked, on any device and from bf16 logits: the same errors as a float64 recomputation of those logits."""
    logits, labels, _ = random_errors(batch=4, length=9)
    logits = logits.to(device, dtype)
    labels[1] = -100  # an unlabelled sequence: its chunks are skipped
    three_positions = 3 * VOCAB * 4 + 1
    monkeypatch.setattr(errors_module, "CPU_CHUNK_BYTES", three_positions)
    monkeypatch.setattr(errors_module, "ACCELERATOR_CHUNK_BYTES", three_positions)
    compact = CompactErrors.from_logits(logits, labels.to(device), top_k=VOCAB)
    probs = logits.cpu().double().softmax(-1)
    onehot = torch.nn.functional.one_hot(labels.clamp(min=0), VOCAB).double()
    reference = ((onehot - probs) * (labels != -100).unsqueeze(-1)).float()
    torch.testing.assert_close(compact.to_dense(VOCAB).cpu(), reference, atol=1e-6, rtol=0)


def test_loss_is_rmse_over_labelled_positions():
    """The training loss, computed without the |V|-wide corrections, equals a slow per-token RMSE of the dense
    corrections against the dense errors, in value and in gradient."""
    copilot = trained_looking(CopilotModel(small_config()))
    _, labels, errors = random_errors()
    mask = left_padded_mask()
    common = dict(**inputs("decoder_only"), input_errors=shift_right(errors), attention_mask=mask)
    out = copilot(**common, target_errors=errors, return_corrections=False)
    assert out.corrections is None
    corrections = copilot(**common).corrections
    exact = errors.to_dense(VOCAB)
    per_token = []
    for b in range(B):
        for t in range(T):
            if mask[b, t] and labels[b, t] != -100:
                per_token.append(((corrections[b, t] - exact[b, t]) ** 2).sum())
    reference = torch.stack(per_token).mean().sqrt()
    torch.testing.assert_close(out.loss, reference, atol=1e-5, rtol=1e-5)
    weights = [copilot.correction_head.weight, copilot.layers[0].mlp.down_proj.weight]
    for grad, reference_grad in zip(torch.autograd.grad(out.loss, weights), torch.autograd.grad(reference, weights)):
        torch.testing.assert_close(grad, reference_grad, atol=1e-6, rtol=1e-4)


def test_logit_residual_starts_at_zero_and_its_loss_at_the_all_zero_loss():
    copilot = CopilotModel(small_config(correction="logit_residual")).eval()
    logits, _, errors = random_errors(top_k=8)
    out = copilot(**inputs("decoder_only"), input_errors=errors.shift_right(), target_errors=errors,
                  pilot_logits=logits)
    assert torch.equal(out.corrections, torch.zeros_like(out.corrections))
    valid = errors.valid
    torch.testing.assert_close(out.loss, errors.squared_norm()[valid].mean().sqrt(), atol=1e-6, rtol=1e-6)


def brier_reference(copilot, hidden, logits, labels):
    """‖softmax(z + W h) − one_hot(y)‖² per labelled token, one token at a time over the whole vocabulary."""
    terms = []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            if labels[b, t] != -100:
                q = torch.softmax(logits[b, t] + copilot.correction_head.weight @ hidden[b, t], -1)
                terms.append((q - torch.nn.functional.one_hot(labels[b, t], VOCAB)).pow(2).sum())
    return torch.stack(terms)


def test_logit_residual_loss_is_the_brier_score_of_the_rectified_distribution():
    """With the whole vocabulary kept, the loss from compact errors equals ‖f − ℓ‖² of the dense corrections,
    which equals the Brier score of softmax(z + g), in value and gradient; its corrections are
    softmax(z + g) − softmax(z) and keep p̂ + λ f a distribution for λ ≤ 1."""
    copilot = trained_looking(CopilotModel(small_config(correction="logit_residual")))
    logits, labels, errors = random_errors(top_k=VOCAB)
    common = dict(**inputs("decoder_only"), input_errors=errors.shift_right())
    out = copilot(**common, target_errors=errors, pilot_logits=logits)
    reference = brier_reference(copilot, out.last_hidden_state, logits, labels)
    torch.testing.assert_close(out.loss, reference.mean().sqrt(), atol=1e-5, rtol=1e-5)
    dense = ((out.corrections - errors.to_dense(VOCAB)).pow(2).sum(-1))[labels != -100]
    torch.testing.assert_close(dense, reference, atol=1e-5, rtol=1e-5)
    fused = logits.softmax(-1) + 0.7 * out.corrections
    assert fused.min() >= 0
    torch.testing.assert_close(fused.sum(-1), torch.ones(B, T), atol=1e-5, rtol=0)
    weights = [copilot.correction_head.weight, copilot.layers[0].mlp.down_proj.weight]
    for grad, reference_grad in zip(torch.autograd.grad(out.loss, weights, retain_graph=True),
                                    torch.autograd.grad(reference.mean().sqrt(), weights)):
        torch.testing.assert_close(grad, reference_grad, atol=1e-6, rtol=1e-4)


def test_logit_residual_with_a_top_k_log_counts_the_label_outside_the_top_k():
    """From a top-8 log the loss can still raise the label: its probability is kept beside the top-k, so a
    residual that boosts only the label lowers the loss even where the label is far down the Pilot's list."""
    copilot = CopilotModel(small_config(correction="logit_residual")).eval()
    logits, labels, errors = random_errors(top_k=8)
    outside = errors.valid & ~errors.label_in_top_k()
    assert outside.any()
    common = dict(**inputs("decoder_only"), input_errors=errors.shift_right(), target_errors=errors)
    hidden = copilot(**common, return_corrections=False).last_hidden_state
    before = copilot.squared_errors(hidden, errors)
    b, t = outside.nonzero()[0].tolist()
    with torch.no_grad():  # g = 8 at this position's label only
        copilot.correction_head.weight[labels[b, t]] = 8 * hidden[b, t] / hidden[b, t].pow(2).sum()
    after = copilot.squared_errors(hidden, errors)[b, t]
    exact = brier_reference(copilot, hidden[b:b + 1, t:t + 1], logits[b:b + 1, t:t + 1], labels[b:b + 1, t:t + 1])
    assert after < before[b, t] - 0.3
    torch.testing.assert_close(after, exact[0], atol=0.02, rtol=0)  # the tail's own Σq² is all it leaves out


@pytest.mark.parametrize("kind", ["decoder_only", "encoder_decoder"])
def test_eager_and_sdpa_agree(kind):
    sdpa = trained_looking(CopilotModel(small_config(kind)))
    eager_config = small_config(kind)
    eager_config._attn_implementation = "eager"
    eager = CopilotModel(eager_config).eval()
    eager.load_state_dict(sdpa.state_dict())
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    pilot = inputs(kind)
    mask = left_padded_mask()
    real = mask.bool()
    torch.testing.assert_close(eager(**pilot, attention_mask=mask).corrections[real],
                               sdpa(**pilot, attention_mask=mask).corrections[real], atol=1e-5, rtol=1e-4)


def test_bf16_forward_and_backward_match_fp32():
    copilot = trained_looking(CopilotModel(small_config()))
    _, _, errors = random_errors()
    pilot = inputs("decoder_only")
    fp32 = copilot(**pilot, input_errors=shift_right(errors), target_errors=errors)
    half = copilot.to(torch.bfloat16)
    out = half(**{k: v.bfloat16() for k, v in pilot.items()}, input_errors=shift_right(errors), target_errors=errors)
    assert out.corrections.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    torch.testing.assert_close(out.corrections.float(), fp32.corrections, atol=0.15, rtol=0.05)
    out.loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in half.parameters())


@pytest.mark.slow
def test_save_and_load_give_identical_outputs(tmp_path):
    copilot = trained_looking(CopilotModel(small_config()))
    copilot.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = CopilotModel.from_pretrained(tmp_path).eval()
    pilot = inputs("decoder_only")
    assert torch.equal(loaded(**pilot).corrections, copilot(**pilot).corrections)
    torch.save(pilot, tmp_path / "inputs.pt")
    torch.save(copilot(**pilot).corrections, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import torch, hf_copilot
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path)!r}).eval()
        assert type(model).__name__ == "CopilotModel", type(model)
        inputs = torch.load({str(tmp_path / 'inputs.pt')!r})
        expected = torch.load({str(tmp_path / 'expected.pt')!r})
        assert torch.equal(model(**inputs).corrections, expected)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_auto_classes_are_registered():
    assert type(AutoModel.from_config(small_config())).__name__ == "CopilotModel"


COPIES_WHOLE_BLOCKS = {"llama", "qwen2", "mistral"}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gpt2", "t5"])
def test_from_pilot_derives_shape_and_copies_what_fits(kind):
    pilot = tiny_pilot(kind)
    copilot = CopilotModel.from_pilot(pilot, num_hidden_layers=2)
    config = copilot.config
    assert config.vocab_size == VOCAB and config.pilot_hidden_size == WIDTH and config.hidden_size == WIDTH
    assert config.pilot_kind == ("encoder_decoder" if kind == "t5" else "decoder_only")
    assert config.attention_kinds() == (["self+cross"] * 2 if kind == "t5" else ["self", "cross"])
    copilot.check_pilot(pilot)
    assert torch.equal(copilot.error_projection.weight, pilot.get_input_embeddings().weight)
    assert torch.equal(copilot.correction_head.weight, torch.zeros_like(copilot.correction_head.weight))
    if kind in COPIES_WHOLE_BLOCKS:
        layers = pilot.model.layers
        assert config.rope_parameters == pilot.config.rope_parameters
        for name in ["q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"]:
            assert torch.equal(copilot.layers[0].self_attn.get_parameter(name), layers[0].self_attn.get_parameter(name))
            assert torch.equal(copilot.layers[1].cross_attn.get_parameter(name),
                               layers[1].self_attn.get_parameter(name))
        if kind == "qwen2":
            assert torch.equal(copilot.layers[0].self_attn.q_proj.bias, layers[0].self_attn.q_proj.bias)
        assert torch.equal(copilot.layers[1].mlp.down_proj.weight, layers[1].mlp.down_proj.weight)
        assert torch.equal(copilot.layers[0].input_layernorm.weight, layers[0].input_layernorm.weight)
    else:
        fresh = CopilotModel(config)
        assert copilot.layers[0].mlp.down_proj.weight.shape == fresh.layers[0].mlp.down_proj.weight.shape
        pilot_tensors = [p for p in pilot.parameters() if p.dim() == 2]
        assert not any(p.shape == q.shape and torch.equal(p, q) for p in copilot.layers.parameters() if p.dim() == 2
                       for q in pilot_tensors)


def test_from_pilot_with_a_narrower_copilot_aligns_widths():
    pilot = tiny_pilot("llama")
    copilot = CopilotModel.from_pilot(pilot, num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                      num_key_value_heads=1)
    assert copilot.config.hidden_size == 32 and copilot.config.pilot_hidden_size == WIDTH
    assert copilot.pilot_alignment.weight.shape == (32, WIDTH)
    _, _, errors = random_errors()
    out = copilot(**inputs("decoder_only"), input_errors=shift_right(errors))
    assert out.corrections.shape == (B, T, VOCAB)


def test_from_pilot_rejects_unknown_fields_and_unsupported_pilots():
    with pytest.raises(TypeError, match="Unknown CopilotConfig field"):
        CopilotModel.from_pilot(tiny_pilot("llama"), hidden_sise=32)
    bert = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=64))
    with pytest.raises(ValueError, match="cannot be a Pilot.*generative"):
        CopilotModel.from_pilot(bert)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        CopilotModel.from_pilot(torch.nn.Linear(3, 3))


def test_check_pilot_names_every_mismatch():
    copilot = CopilotModel.from_pilot(tiny_pilot("llama"), num_hidden_layers=2)
    with pytest.raises(ValueError, match="encoder_decoder.*decoder_only.*from_pilot"):
        copilot.check_pilot(tiny_pilot("t5"))
    other = tiny_pilot("llama", vocab_size=VOCAB + 4)
    with pytest.raises(ValueError, match=f"emits {VOCAB + 4} logits per token where the Copilot expects {VOCAB}"):
        copilot.check_pilot(other)
    wider = CopilotModel(small_config(pilot_hidden_size=2 * WIDTH))
    with pytest.raises(ValueError, match=f"has width {WIDTH} where the Copilot expects {2 * WIDTH}"):
        wider.check_pilot(tiny_pilot("llama"))
    # Same widths, same vocabulary, another architecture: its states mean something else.
    with pytest.raises(ValueError, match="'qwen2' model but the Copilot was built for a 'llama' one"):
        copilot.check_pilot(tiny_pilot("qwen2"))


def test_wrong_input_shapes_fail_clearly():
    copilot = CopilotModel(small_config())
    pilot = inputs("decoder_only")
    with pytest.raises(ValueError, match=r"pilot_hidden_states must be \(batch, positions, 64\)"):
        copilot(pilot_hidden_states=torch.randn(B, T, WIDTH + 1), pilot_input_states=pilot["pilot_input_states"])
    with pytest.raises(ValueError, match="same shape as pilot_hidden_states"):
        copilot(pilot_hidden_states=pilot["pilot_hidden_states"], pilot_input_states=None)
    with pytest.raises(ValueError, match="entries per position"):
        copilot(**pilot, input_errors=torch.zeros(B, T, VOCAB + 1))
    with pytest.raises(ValueError, match="same \\(batch, positions\\)"):
        copilot(**pilot, input_errors=torch.zeros(B, T + 1, VOCAB))
    with pytest.raises(ValueError, match="attention_mask must cover past and new positions"):
        copilot(**pilot, attention_mask=torch.ones(B, T + 2))
    enc_dec = CopilotModel(small_config("encoder_decoder"))
    with pytest.raises(ValueError, match="encoder output .* is required on the first call"):
        enc_dec(pilot_hidden_states=pilot["pilot_hidden_states"])
    with pytest.raises(ValueError, match="num_hidden_layers >= 2"):
        small_config(num_hidden_layers=1)
    for layers in (0, 1):  # 0 is a depth too, not "the default"
        with pytest.raises(ValueError, match="num_hidden_layers >= 2"):
            CopilotModel.from_pilot(tiny_pilot("llama"), num_hidden_layers=layers)
    for layers in (0, -1):  # an encoder-decoder Copilot may have one layer, but not none
        with pytest.raises(ValueError, match="num_hidden_layers >= 1"):
            CopilotModel.from_pilot(tiny_pilot("t5"), num_hidden_layers=layers)


def test_a_misspelt_forward_argument_is_refused_not_dropped():
    copilot = CopilotModel.from_pilot(tiny_pilot("llama"), num_hidden_layers=2)
    with pytest.raises(TypeError, match="pilot_hiden_states"):
        copilot(pilot_hidden_states=torch.randn(1, 3, WIDTH), pilot_input_states=torch.randn(1, 3, WIDTH),
                pilot_hiden_states=torch.randn(1, 3, WIDTH))


def test_the_copilot_cache_speaks_dynamic_caches_language():
    from transformers import DynamicCache

    from hf_copilot import CopilotCache

    for method in ("update", "get_seq_length", "reorder_cache"):
        assert callable(getattr(DynamicCache, method)) and callable(getattr(CopilotCache, method))
    cache = CopilotCache()
    first, second = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 2, 4)
    key, value = cache.update(first, -first, layer_idx=1)
    key, value = cache.update(second, -second, layer_idx=1)
    torch.testing.assert_close(key, torch.cat([first, second], dim=2))
    torch.testing.assert_close(value, -key)
    cache.update(first, first, layer_idx=1, kind="cross")  # a layer's cross-attention stream is kept apart
    assert cache.stream[1, "cross"][0].shape[2] == 3
    cache.reorder_cache(torch.tensor([1, 1]))
    torch.testing.assert_close(cache.stream[1, "self"][0], torch.cat([first, second], dim=2)[[1, 1]])
