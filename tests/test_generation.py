"""CopilotLogitsProcessor against slow references that recompute the Pilot and the Copilot over full sequences,
with no cache, at every step."""

import copy

import pytest
import torch
from transformers import LogitsProcessor

from conftest import DEVICES, VOCAB, tiny_pilot, word_tokenizer
from hf_copilot.generation import CopilotLogitsProcessor
from hf_copilot.modeling_copilot import CopilotModel

NEW_TOKENS = 8
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17]]  # left-padded with 0 into one batch


def left_padded(prompts):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    return ids, (ids != 0).long()


def noisy_copilot(pilot, std=0.5, seed=1, **config):
    """A Copilot whose corrections are large enough to change what the Pilot generates."""
    copilot = CopilotModel.from_pilot(pilot, num_hidden_layers=2, **config).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        copilot.correction_head.weight.normal_(std=std)
    return copilot


@pytest.fixture(scope="module")
def llama():
    pilot = tiny_pilot("llama")
    return pilot, noisy_copilot(pilot)


@pytest.fixture(scope="module")
def t5():
    pilot = tiny_pilot("t5")
    return pilot, noisy_copilot(pilot)


# ---- the slow reference -------------------------------------------------------------------------------------------

@torch.no_grad()
def pilot_states(pilot, decoder_ids, decoder_mask, source=None, source_mask=None):
    """One full forward without cache: last-position logits, X̃ and h̄ = mean of the decoder blocks' outputs
    (taken by hooks, before the final norm)."""
    layers = pilot.decoder.block if source is not None else pilot.model.layers
    outputs = []
    handles = [layer.register_forward_hook(lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
               for layer in layers]
    try:
        if source is None:
            positions = (decoder_mask.cumsum(-1) - 1).clamp(min=0)
            out = pilot(input_ids=decoder_ids, attention_mask=decoder_mask, position_ids=positions,
                        output_hidden_states=True)
            inputs = out.hidden_states[0]
        else:
            out = pilot(input_ids=source, attention_mask=source_mask, decoder_input_ids=decoder_ids)
            inputs = out.encoder_last_hidden_state
    finally:
        for handle in handles:
            handle.remove()
    return out.logits.float(), inputs, torch.stack(outputs).float().mean(0)


@torch.no_grad()
def reference_correction(copilot, pilot, decoder_ids, decoder_mask, prompt_length, source=None, source_mask=None):
    """The Copilot's correction at the last position: full-sequence forwards over growing prefixes, with zero input
    over the prompt and, at each generated position, the Copilot's own output at the position before."""
    logits, inputs, hidden = pilot_states(pilot, decoder_ids, decoder_mask, source, source_mask)
    rows = decoder_ids.shape[0]
    errors = torch.zeros(rows, prompt_length, VOCAB, device=decoder_ids.device)
    for length in range(prompt_length, decoder_ids.shape[1] + 1):
        if source is None:
            kwargs = dict(pilot_input_states=inputs[:, :length])
        else:
            kwargs = dict(pilot_input_states=inputs, pilot_input_mask=source_mask)
        out = copilot(pilot_hidden_states=hidden[:, :length], input_errors=errors[:, :length],
                      attention_mask=decoder_mask[:, :length], pilot_logits=logits[:, :length], **kwargs)
        errors = torch.cat([errors, out.corrections[:, -1:]], dim=1)
    return errors[:, -1]


def fuse(scores, correction, lam, space):
    """Paper Eq. 8 (or the logits-space sum); tokens banned before fusion (score -inf) stay banned."""
    banned = scores.isneginf()
    if space == "logits":
        return scores + lam * correction
    probs = (scores.softmax(-1) + lam * correction).clamp(min=torch.finfo(torch.float32).tiny)
    probs = probs.masked_fill(banned, 0.0)
    return (probs / probs.sum(-1, keepdim=True)).log()


def reference_greedy(pilot, copilot, ids, mask, lam, space, source=None, source_mask=None):
    prompt_length = ids.shape[1]
    for _ in range(NEW_TOKENS):
        logits, _, _ = pilot_states(pilot, ids, mask, source, source_mask)
        scores = logits[:, -1]
        scores[:, pilot.config.eos_token_id] = float("-inf")  # what min_new_tokens does in generate()
        correction = reference_correction(copilot, pilot, ids, mask, prompt_length, source, source_mask)
        fused = fuse(scores, correction, lam, space)
        next_token = fused.argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, next_token], 1), torch.cat([mask, torch.ones_like(next_token)], 1)
    return ids


def generate(pilot, processor=None, **kwargs):
    kwargs.setdefault("max_new_tokens", NEW_TOKENS)
    kwargs.setdefault("min_new_tokens", kwargs["max_new_tokens"])
    kwargs.setdefault("do_sample", False)
    processors = [processor] if processor is not None else []
    return pilot.generate(logits_processor=processors, **kwargs)


def prompt_inputs(device="cpu"):
    """PROMPTS as a left-padded batch: the decoder-only prompt, or the encoder input of T5."""
    ids, mask = left_padded(PROMPTS)
    return dict(input_ids=ids.to(device), attention_mask=mask.to(device))


def moved(models, device, dtype=torch.float32):
    """Copies of the (module-scoped, shared) models on ``device`` in ``dtype``."""
    if device == "cpu" and dtype == torch.float32:
        return models
    return tuple(copy.deepcopy(model).to(device, dtype) for model in models)


# ---- 1. decoder-only greedy ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "t5"])
@pytest.mark.parametrize("space", ["probs", "logits"])
def test_lam_zero_greedy_matches_plain_generate(llama, t5, kind, space):
    pilot, copilot = llama if kind == "llama" else t5
    inputs = prompt_inputs()
    plain = generate(pilot, **inputs)
    with CopilotLogitsProcessor(copilot, pilot, lam=0.0, space=space) as processor:
        assert torch.equal(generate(pilot, processor, **inputs), plain)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("space", ["probs", "logits"])
def test_greedy_matches_full_recompute_reference(llama, space, device):
    pilot, copilot = moved(llama, device)
    inputs = prompt_inputs(device)
    with CopilotLogitsProcessor(copilot, pilot, lam=1.0, space=space) as processor:
        fused = generate(pilot, processor, **inputs)
    assert torch.equal(reference_greedy(pilot, copilot, inputs["input_ids"], inputs["attention_mask"], 0.0, space),
                       generate(pilot, **inputs)), "the reference Pilot must reproduce plain generate()"
    assert torch.equal(fused, reference_greedy(pilot, copilot, inputs["input_ids"], inputs["attention_mask"], 1.0,
                                               space))
    assert not torch.equal(fused, generate(pilot, **inputs)), "the Copilot should change the output"


@pytest.mark.parametrize("space", ["probs", "logits"])
def test_logit_residual_greedy_matches_full_recompute_reference(llama, space):
    pilot, _ = llama
    copilot = noisy_copilot(pilot, std=3.0, correction="logit_residual")
    inputs = prompt_inputs()
    with CopilotLogitsProcessor(copilot, pilot, lam=1.0, space=space) as processor:
        fused = generate(pilot, processor, **inputs)
    assert torch.equal(fused, reference_greedy(pilot, copilot, inputs["input_ids"], inputs["attention_mask"], 1.0,
                                               space))
    assert not torch.equal(fused, generate(pilot, **inputs)), "the Copilot should change the output"


def test_static_cache_four_dimensional_mask_gives_the_same_output(llama):
    """A static cache hands the Pilot a 4D mask; the processor derives its own 2D padding mask from it."""
    pilot, copilot = llama
    outputs = []
    for cache in (None, "static"):
        with CopilotLogitsProcessor(copilot, pilot, lam=1.0) as processor:
            outputs.append(generate(pilot, processor, cache_implementation=cache, **prompt_inputs()))
    assert torch.equal(*outputs)


# ---- 2. beam search -----------------------------------------------------------------------------------------------

class StepRecorder(LogitsProcessor):
    """Placed after the Copilot processor: keeps the input_ids of each step."""

    def __init__(self):
        self.input_ids = []

    def __call__(self, input_ids, scores):
        self.input_ids.append(input_ids.clone())
        return scores


def record_corrections(copilot):
    corrections = []
    handle = copilot.register_forward_hook(lambda m, a, out: corrections.append(out.corrections[:, -1].clone()))
    return corrections, handle


BEAMS = dict(num_beams=4, num_return_sequences=2, length_penalty=0.7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_lam_zero_beam_search_matches_plain_generate(llama, t5, kind, dtype, device):
    pilot, copilot = moved(llama if kind == "llama" else t5, device, dtype)
    inputs = prompt_inputs(device)
    plain = generate(pilot, return_dict_in_generate=True, output_scores=True, **BEAMS, **inputs)
    with CopilotLogitsProcessor(copilot, pilot, lam=0.0) as processor:
        out = generate(pilot, processor, return_dict_in_generate=True, output_scores=True, **BEAMS, **inputs)
    assert torch.equal(out.sequences, plain.sequences)
    assert torch.equal(out.sequences_scores, plain.sequences_scores)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind, correction", [("llama", "vocabulary"), ("t5", "vocabulary"),
                                              ("llama", "logit_residual"), ("t5", "logit_residual")])
def test_beam_search_corrections_follow_the_beams(llama, t5, kind, correction, device):
    pilot, copilot = llama if kind == "llama" else t5
    if correction != "vocabulary":
        copilot = noisy_copilot(pilot, std=3.0, correction=correction)
    pilot, copilot = moved((pilot, copilot), device)
    inputs = prompt_inputs(device)
    beams = BEAMS["num_beams"]
    recorder = StepRecorder()
    corrections, handle = record_corrections(copilot)
    try:
        with CopilotLogitsProcessor(copilot, pilot, lam=1.0) as processor:
            fused = pilot.generate(logits_processor=[processor, recorder], max_new_tokens=NEW_TOKENS,
                                   min_new_tokens=NEW_TOKENS, **BEAMS, **inputs)
    finally:
        handle.remove()
    assert not torch.equal(fused, generate(pilot, **BEAMS, **inputs)), "the Copilot should change the output"
    assert len(corrections) == len(recorder.input_ids) == NEW_TOKENS
    reordered = any(not torch.equal(now[:, :-1], before)
                    for before, now in zip(recorder.input_ids, recorder.input_ids[1:]))
    assert reordered, "the test needs beams that swap parents"

    if kind == "llama":
        source = source_mask = None
        prompt_mask = inputs["attention_mask"].repeat_interleave(beams, 0)
    else:
        source = inputs["input_ids"].repeat_interleave(beams, 0)
        source_mask = inputs["attention_mask"].repeat_interleave(beams, 0)
        prompt_mask = torch.ones(source.shape[0], 1, dtype=torch.long, device=device)
    prompt_length = recorder.input_ids[0].shape[1]
    beam_gaps = []
    for ids, correction in zip(recorder.input_ids, corrections):
        generated = torch.ones(ids.shape[0], ids.shape[1] - prompt_length, dtype=torch.long, device=device)
        mask = torch.cat([prompt_mask, generated], 1)
        expected = reference_correction(copilot, pilot, ids, mask, prompt_length, source, source_mask)
        # Cached decoding and the full recompute round differently in float32; a softmax over a large residual
        # (logit_residual, weights of std 3) turns that into up to ~1e-4 in probability, depending on the CPU's
        # kernels. Corrections of beams that were mixed up differ by far more (asserted below).
        torch.testing.assert_close(correction, expected, atol=1e-3, rtol=1e-3)
        beam_gaps.append((expected - expected.roll(1, 0)).abs().max().item())
    assert max(beam_gaps) > 0.05, "a beam mix-up must be larger than the tolerance for this test to catch it"


# ---- 3. a known correction ----------------------------------------------------------------------------------------

FAVOURED = 42


def favouring_copilot(pilot):
    """A Copilot whose correction is large and positive for FAVOURED only, whatever it reads: a huge constant MLP
    bias dominates the last hidden state, which the head reads into one vocabulary entry."""
    copilot = CopilotModel.from_pilot(pilot, num_hidden_layers=2, mlp_bias=True).eval()
    with torch.no_grad():
        copilot.layers[-1].mlp.down_proj.bias.zero_()[0] = 1e4
        copilot.correction_head.weight.zero_()[FAVOURED, 0] = 10.0
    return copilot


@pytest.mark.parametrize("space", ["probs", "logits"])
def test_known_correction_changes_greedy_output_as_predicted(llama, space):
    pilot, _ = llama
    inputs = prompt_inputs()
    with CopilotLogitsProcessor(favouring_copilot(pilot), pilot, lam=1.0, space=space, top_analysis=3) as processor:
        out = generate(pilot, processor, **inputs)
    prompt_length = inputs["input_ids"].shape[1]
    assert (out[:, prompt_length:] == FAVOURED).all()
    assert (generate(pilot, **inputs)[:, prompt_length:] != FAVOURED).any()
    assert len(processor.analysis) == NEW_TOKENS
    step = processor.analysis[0]
    assert (step["token_ids"][:, 0] == FAVOURED).all()
    assert set(step) == {"token_ids", "pilot_scores", "corrections", "fused_scores"}
    assert step["corrections"].shape == (len(PROMPTS), 3)
    # the final RMSNorm turns the dominant constant into sqrt(width) along its axis: correction = 10 * sqrt(64)
    torch.testing.assert_close(step["corrections"][:, 0], torch.full((len(PROMPTS),), 80.0), rtol=1e-3, atol=0)


# ---- 4. sampling, reuse -------------------------------------------------------------------------------------------

def test_lam_zero_sampling_matches_plain_generate(llama):
    pilot, copilot = llama
    inputs = prompt_inputs()
    sampling = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    torch.manual_seed(3)
    plain = generate(pilot, **sampling, **inputs)
    with CopilotLogitsProcessor(copilot, pilot, lam=0.0) as processor:
        torch.manual_seed(3)
        assert torch.equal(generate(pilot, processor, **sampling, **inputs), plain)


def test_temperature_applies_after_the_fusion(llama):
    """generate() runs user processors before its sampling warpers: the scores it samples from are fused / T."""
    pilot, copilot = llama
    with CopilotLogitsProcessor(copilot, pilot, lam=1.0, space="logits", top_analysis=5) as processor:
        out = generate(pilot, processor, do_sample=True, temperature=0.5, top_k=0, return_dict_in_generate=True,
                       output_scores=True, **prompt_inputs())
    for step, sampled_from in zip(processor.analysis, out.scores):
        torch.testing.assert_close(sampled_from.gather(-1, step["token_ids"]), step["fused_scores"] / 0.5)
        torch.testing.assert_close(step["fused_scores"], step["pilot_scores"] + step["corrections"])


def test_one_processor_serves_many_calls(llama):
    pilot, copilot = llama
    calls = [
        dict(**prompt_inputs()),
        dict(input_ids=torch.tensor([[20, 21]]), **BEAMS),
        dict(input_ids=torch.tensor([[30, 31, 32, 33, 34], [35, 36, 37, 38, 39]])),
        dict(**prompt_inputs(), max_new_tokens=3),
    ]
    expected = []
    for kwargs in calls:
        with CopilotLogitsProcessor(copilot, pilot, lam=1.0) as fresh:
            expected.append(generate(pilot, fresh, **kwargs))
    with CopilotLogitsProcessor(copilot, pilot, lam=1.0, top_analysis=2) as reused:
        for kwargs, want in zip(calls, expected):
            assert torch.equal(generate(pilot, reused, **kwargs), want)
            generate(pilot, **kwargs)  # a plain generate() in between: its forwards are captured and dropped
        assert len(reused.analysis) == 3  # reset at each call


def test_an_open_processor_keeps_no_training_forwards(llama):
    """Training steps run while a processor is open leave no records (their logits are not held past the backward),
    and the next generate() is unaffected."""
    pilot, copilot = llama
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with CopilotLogitsProcessor(copilot, pilot, lam=1.0) as fresh:
        expected = generate(pilot, fresh, input_ids=ids)
    training = copy.deepcopy(pilot).train()
    with CopilotLogitsProcessor(copilot, training, lam=1.0) as processor:
        for _ in range(5):
            training(input_ids=ids, labels=ids).loss.backward()
        assert not processor.tap.records
        training.eval()
        assert torch.equal(generate(training, processor, input_ids=ids), expected)


# ---- 5. encoder-decoder -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("space", ["probs", "logits"])
def test_t5_greedy_matches_full_recompute_reference(t5, space):
    pilot, copilot = t5
    inputs = prompt_inputs()
    plain = generate(pilot, **inputs)
    with CopilotLogitsProcessor(copilot, pilot, lam=1.0, space=space) as processor:
        fused = generate(pilot, processor, **inputs)
    start = torch.zeros(len(PROMPTS), 1, dtype=torch.long)
    reference = reference_greedy(pilot, copilot, start, torch.ones_like(start), 1.0, space,
                                 source=inputs["input_ids"], source_mask=inputs["attention_mask"])
    assert torch.equal(fused, reference)
    assert not torch.equal(fused, plain)


# ---- 6. bad inputs ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lam", [-0.5, float("nan"), float("inf"), "1"])
def test_bad_lam_is_refused(llama, lam):
    pilot, copilot = llama
    with pytest.raises(ValueError, match="lam"):
        CopilotLogitsProcessor(copilot, pilot, lam=lam)


def test_bad_space_is_refused(llama):
    pilot, copilot = llama
    with pytest.raises(ValueError, match="space must be one of"):
        CopilotLogitsProcessor(copilot, pilot, space="log-probs")


def test_copilot_for_another_pilot_is_refused(llama):
    pilot, _ = llama
    other = CopilotModel.from_pilot(tiny_pilot("llama", vocab_size=VOCAB + 4), num_hidden_layers=2)
    with pytest.raises(ValueError, match="does not fit the Pilot"):
        CopilotLogitsProcessor(other, pilot)


@pytest.mark.parametrize("mode", ["assistant_model", "prompt_lookup_num_tokens"])
def test_assisted_and_prompt_lookup_decoding_are_refused(llama, mode):
    pilot, copilot = llama
    option = {"assistant_model": tiny_pilot("llama", seed=1), "prompt_lookup_num_tokens": 2}[mode]
    repetitive = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6, 7, 5, 6]])
    with CopilotLogitsProcessor(copilot, pilot, lam=1.0) as processor:
        with pytest.raises(RuntimeError, match="not supported by CopilotLogitsProcessor"):
            generate(pilot, processor, input_ids=repetitive, **{mode: option})


def hooks(model):
    """Every forward (pre-)hook on the model's modules; transformers installs some of its own, so compare sets."""
    return {(name, kind, key) for name, module in model.named_modules()
            for kind in ("_forward_hooks", "_forward_pre_hooks") for key in getattr(module, kind)}


def test_close_removes_every_hook(llama):
    pilot, copilot = llama
    before = hooks(pilot)
    processor = CopilotLogitsProcessor(copilot, pilot)
    assert hooks(pilot) > before
    processor.close()
    assert hooks(pilot) == before
    with pytest.raises(RuntimeError, match="closed"):
        generate(pilot, processor, **prompt_inputs())


def test_generate_without_cache_is_refused(llama):
    pilot, copilot = llama
    with CopilotLogitsProcessor(copilot, pilot) as processor:
        with pytest.raises(RuntimeError, match="use_cache=False"):
            generate(pilot, processor, **prompt_inputs(), max_new_tokens=3, use_cache=False)


def test_pipeline_and_streamer_see_the_rectified_tokens(llama):
    from transformers import pipeline
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.tokens = []

        def put(self, value):
            self.tokens.append(value.reshape(-1))

        def end(self):
            pass

    pilot, copilot = llama
    tokenizer = word_tokenizer()
    ids = tokenizer("w5 w6 w7", return_tensors="pt")
    settings = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    streamer = Collect()
    with CopilotLogitsProcessor(copilot, pilot) as processor:
        direct = pilot.generate(**ids, logits_processor=[processor], streamer=streamer, **settings)[0, 3:]
    plain = pilot.generate(**ids, **settings)[0, 3:]
    assert not torch.equal(direct, plain)
    assert torch.equal(torch.cat(streamer.tokens[1:]), direct)  # the first put() is the prompt
    text_generation = pipeline("text-generation", model=pilot, tokenizer=tokenizer)
    with CopilotLogitsProcessor(copilot, pilot) as processor:
        out = text_generation("w5 w6 w7", logits_processor=[processor], return_full_text=False, **settings)
    assert out[0]["generated_text"] == tokenizer.decode(direct, skip_special_tokens=True)


@pytest.mark.parametrize("space", ["probs", "logits"])
def test_fused_choice_is_the_first_token_of_fuse_scores(space):
    """The cheap argmax CopilotMetrics uses picks what the processor's fusion ranks first, banned tokens included."""
    from hf_copilot.generation import fuse_scores, fused_choice

    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(64, VOCAB, generator=generator) * 3
    scores[:, :5] = float("-inf")  # banned, e.g. by a min-length processor
    corrections = torch.randn(64, VOCAB, generator=generator)
    corrections[:, :5] = 5.0  # a correction pushing banned tokens up must not unban them
    for lam in (0.0, 0.3, 1.0, 4.0):
        expected = fuse_scores(scores.clone(), corrections, lam, space).argmax(-1)
        assert torch.equal(fused_choice(scores.clone(), corrections, lam, space), expected), lam
        assert (expected >= 5).all()


def test_continuous_batching_is_refused_while_a_processor_is_open():
    """generate_batch never runs user processors: its requests fail saying why instead of coming back unrectified,
    and run normally once the processor is closed."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    pilot = tiny_pilot("llama")
    copilot = CopilotModel.from_pilot(pilot, num_hidden_layers=2)
    config = GenerationConfig(max_new_tokens=2, do_sample=False, eos_token_id=2, pad_token_id=0)
    small = dict(continuous_batching_config=ContinuousBatchingConfig(page_size=16, num_blocks=8, max_batch_tokens=64),
                 warmup=False)  # a cache sized from the machine's memory takes seconds to set up
    assert CopilotLogitsProcessor.supports_continuous_batching is False
    with CopilotLogitsProcessor(copilot, pilot):
        (refused,) = pilot.generate_batch([[5, 6, 7]], generation_config=config, **small).values()
    assert not refused.generated_tokens and "continuous batching" in refused.error
    (served,) = pilot.generate_batch([[5, 6, 7]], generation_config=config, **small).values()
    assert len(served.generated_tokens) == 2 and not served.error
