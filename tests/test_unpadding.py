"""The unpadded fused encoder and the classification shortcut, against reference BitFit on padded batches."""

import copy
import functools

import pytest
import torch
import transformers
from bitfit_reference import (
    BACKENDS,
    DEVICE,
    MODELS,
    TINY,
    adamw_steps,
    assert_gradients_match,
    bbc_titles,
    enable_hf_checkpointing,
    padded_batch,
    real_batch,
    real_minilm,
    reference_bitfit,
    returned_states,
    tiny_bert,
    trainable,
    with_random_biases,
    without_zero_gradients,
)
from kernel_checks import assert_autocast_as_accurate_as_torch, assert_gemms_ran_in
from test_bias_free import BIAS_FLAGS
from test_fused_distilbert import TINY_DISTILBERT
from test_fused_modernbert import TINY_MODERNBERT

import bitfit_fast
from bitfit_fast.fused_layer import FusedEncoder

TOL = dict(atol=2e-5, rtol=1e-4)
# Very uneven lengths: a one-token sequence beside a full one, all equal (no padding at all), one sequence.
LENGTHS = [(1, 13, 7, 2), (11, 11, 11), (1,), (5, 1, 1)]
# Attention in one call over the padded layout, or by length groups (the CPU's path on larger batches).
ATTENTION = ["one call", "length groups"]


def attend_by(attention: str, request, batch: dict | None = None) -> None:
    """Attention as ``attention`` says for the rest of the test; with ``batch``, it checks that the batch's
    lengths do split into groups."""
    if attention == "length groups":
        request.getfixturevalue("grouped_attention")
        if batch is not None:
            from bitfit_fast.unpadding import Tokens

            mask = batch["attention_mask"].bool()
            assert Tokens.of_batch(mask[..., None], mask[:, None, None, :]).groups is not None


def encoder_rows(model, batch) -> int:
    """How many positions per sequence the fused encoder returned (1 when the shortcut ran)."""
    encoder = next(m for m in model.modules() if isinstance(m, FusedEncoder))
    return returned_states(encoder, model, batch)[1][1]


def assert_same_training(model, reference, batches, tol=TOL):
    """Losses, every trainable parameter's gradient at each step (to tol's rtol of its own largest value: an
    absolute tolerance would pass a query bias's whole gradient), and the parameters after the steps. Where every
    sequence is one token long its query cannot move its attention: the query biases' true gradient is zero, and
    both are rounding noise."""
    grads, ref_grads = [], []
    losses = adamw_steps(model, batches, grads=grads)
    ref_losses = adamw_steps(reference, batches, grads=ref_grads)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), **tol)
    one_token = all(batch["attention_mask"].sum(1).max() == 1 for batch in batches)
    for step, ref_step in zip(grads, ref_grads, strict=True):
        for name, grad in step.items():
            if one_token and name.endswith("query.bias"):
                assert max(grad.abs().max(), ref_step[name].abs().max()) < 1e-6, name
                continue
            atol = tol["rtol"] * ref_step[name].abs().max().item()  # zero for a bias whose true gradient is zero
            torch.testing.assert_close(grad, ref_step[name], atol=atol, rtol=tol["rtol"],
                                       msg=lambda m, n=name: f"{n}: {m}")
    ref_params = trainable(reference)
    for name, param in trainable(model).items():
        torch.testing.assert_close(param, ref_params[name], **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths,attention", [(lengths, "one call") for lengths in LENGTHS] + [
    (lengths, "length groups") for lengths in LENGTHS if len(set(lengths)) > 1], ids=str)
def test_uneven_padding_trains_like_the_reference(arch, backend, lengths, attention, request):
    model = MODELS[arch]()
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, backend=backend)
    batches = [padded_batch(model, lengths) for _ in range(3)]
    attend_by(attention, request, batches[0])
    assert encoder_rows(model, batches[0]) == 1, "a sequence-classification head reads the first token only"
    assert_same_training(model, reference, batches)


def test_length_groups_sort_longest_first_and_split_where_it_saves_enough(monkeypatch):
    from bitfit_fast import unpadding
    from bitfit_fast.unpadding import LengthGroup, length_groups

    # One group where cutting saves fewer scores than a group's calls cost (MIN_GROUP_SAVING = 128²).
    assert length_groups([7, 1, 5, 7, 3]) == ([0, 3, 2, 4, 1], (LengthGroup(0, 5, 7, True),))
    # 8 sequences of 128 and 8 of 40: cutting at the first 40 saves 8 · (128² - 40²) scores.
    order, groups = length_groups([40, 128] * 8)
    assert order == [1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14], "longest first, a stable sort"
    assert groups == (LengthGroup(0, 8, 128, False), LengthGroup(8, 8, 40, False))
    # 110 is more than 0.8 of 128: it stays in the first group, which then holds padding.
    assert length_groups([128, 110, 40, 40])[1] == (LengthGroup(0, 2, 128, True), LengthGroup(2, 2, 40, False))
    monkeypatch.setattr(unpadding, "MIN_GROUP_SAVING", 0)
    assert length_groups([7, 1, 5, 7, 3])[1] == (LengthGroup(0, 2, 7, False), LengthGroup(2, 1, 5, False),
                                                  LengthGroup(3, 1, 3, False), LengthGroup(4, 1, 1, False))
    assert length_groups([6, 5, 4])[1] == (LengthGroup(0, 2, 6, True), LengthGroup(2, 1, 4, False))
    assert length_groups([1])[1] == (LengthGroup(0, 1, 1, False),)


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("first_only", [False, True])
@pytest.mark.parametrize("window", [None, 2])
def test_attention_by_length_groups_equals_one_call_over_the_padded_layout(layout, first_only, window, request):
    """Outputs and q/k/v row gradients in fp64, for a padding mask and for packed sequences, each sequence's first
    query only (the classification shortcut's last layer) and a sliding window."""
    from bitfit_fast.unpadding import Tokens

    lengths, heads, dim = (3, 9, 1, 9, 6, 2, 8, 5), 2, 4  # two padded groups: (9, 9, 8) and (6, 5)
    width = heads * dim

    def tokens() -> Tokens:
        if layout == "packed":
            starts = torch.tensor([0, *lengths[:-1]], device=DEVICE).cumsum(0)
            return Tokens.packed(sum(lengths), starts)
        mask = torch.zeros(len(lengths), max(lengths), dtype=torch.bool, device=DEVICE)
        for row, length in enumerate(lengths):
            mask[row, :length] = True
        return Tokens.of_batch(mask[..., None], mask[:, None, None, :])

    rows = sum(lengths)
    q_rows, kv = (torch.randn(n, w, dtype=torch.float64, device=DEVICE) for n, w in ((rows, width), (rows, 2 * width)))
    cotangent = torch.randn(len(lengths) if first_only else rows, width, dtype=torch.float64, device=DEVICE)

    def run(tokens: Tokens):
        q, k_v = q_rows.clone().requires_grad_(), kv.clone().requires_grad_()
        queries = q.index_select(0, tokens.starts) if first_only else q
        out = tokens.attention(queries, k_v, heads, 0.0, None, dim**-0.5, True, first_only, window)
        return out.detach(), *torch.autograd.grad((out * cotangent).sum(), (q, k_v))

    one_call = run(tokens())
    attended = request.getfixturevalue("grouped_attention")
    grouped = tokens()
    assert grouped.order.tolist() == [1, 3, 6, 4, 7, 0, 5, 2]
    for name, ours, theirs in zip(("output", "dq", "dkv"), run(grouped), one_call):
        torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12, msg=name)
    assert [(group.count, group.length, group.padded) for group in attended[0]] == [
        (3, 9, True), (2, 6, True), (1, 3, False), (1, 2, False), (1, 1, False)]


def test_each_length_group_draws_its_attention_dropout_mask_from_a_seed_of_its_own(grouped_attention, monkeypatch):
    """One seed per group (the call's seed plus the group's index): with one seed, a group's mask would be a
    reshaped prefix of the first group's random stream, the same drops again."""
    from bitfit_fast import unpadding
    from bitfit_fast.unpadding import Tokens

    lengths, heads, dim = (9, 3, 9, 6), 2, 4
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.bool, device=DEVICE)
    for row, length in enumerate(lengths):
        mask[row, :length] = True
    seeds, attention = [], unpadding._attention

    def recorded(q, k, v, mask, dropout_p, seed, *args):
        seeds.append(seed)
        return attention(q, k, v, mask, dropout_p, seed, *args)

    monkeypatch.setattr(unpadding, "_attention", recorded)
    rows = sum(lengths)
    tokens = Tokens.of_batch(mask[..., None], mask[:, None, None, :])
    tokens.attention(torch.randn(rows, heads * dim, device=DEVICE), torch.randn(rows, 2 * heads * dim, device=DEVICE),
                     heads, 0.3, 11, dim**-0.5, True, False, None)
    assert len(grouped_attention[0]) == 3 and seeds == [11, 12, 13]


@pytest.mark.parametrize("position_ids,starts", [
    ([0, 1, 2, 0, 1, 0], [0, 3, 5]),  # DataCollatorWithFlattening's default
    ([2, 3, 4, 2, 3, 2], [0, 3, 5]),  # its position_ids_start=2, RoBERTa's padding_idx + 1
    ([5, 6, 7, 5, 6, 7], [0, 3]),  # any first value that the ids return to
    ([3, 4, 0, 1, 2, 3], [0]),  # the least value not first: one sequence, its ids the caller's
    ([0, 1, 2, 3, 4, 5], [0]),
])
def test_a_packed_row_splits_where_its_position_ids_return_to_their_least_value(position_ids, starts):
    from bitfit_fast.unpadding import Tokens

    positions = torch.tensor([position_ids], device=DEVICE)
    tokens = Tokens.of_batch(torch.zeros(1, len(position_ids), 4, device=DEVICE), None, positions)
    assert tokens.starts.tolist() == starts


def test_rows_are_bucketed_with_zero_rows_after_the_real_ones(bucketed_rows):
    from bitfit_fast.unpadding import Tokens, bucketed

    assert [bucketed(n) for n in (1, 64, 65, 1000, 1025, 20000, 32768)] == [64, 64, 128, 1024, 1088, 20480, 32768]
    model = tiny_bert()
    batch = padded_batch(model, (1, 13, 7, 2))
    hidden = torch.randn(4, 13, 5, device=DEVICE)
    tokens = Tokens.of_batch(hidden, batch["attention_mask"][:, None, None, :].bool())
    assert (tokens.real_rows, tokens.num_rows) == (23, 64)
    packed = tokens.pack(hidden)
    assert packed.shape == (64, 5) and not packed[23:].any()
    torch.testing.assert_close(tokens.unpack(packed), hidden * batch["attention_mask"][..., None])


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory", ["default", "minimal"])
@pytest.mark.parametrize("attention", ATTENTION)
def test_bucketed_rows_train_like_the_reference(arch, backend, memory, attention, bucketed_rows, request):
    """The bucket's zero rows run through every GEMM, LayerNorm and gradient pass: their gradients must be exactly
    zero, or every bias's gradient would move."""
    model = MODELS[arch]()
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, backend=backend, memory=memory)
    batches = [padded_batch(model, (1, 13, 7, 2)) for _ in range(3)]
    attend_by(attention, request, batches[0])
    assert_same_training(model, reference, batches)


@pytest.mark.parametrize("memory", ["default", "lean", "minimal"])
@pytest.mark.parametrize("attention", ATTENTION)
def test_real_minilm_uneven_real_text_trains_like_the_reference(memory, attention, request):
    model = real_minilm(layers=[0, 5])
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, backend="torch", memory=memory)
    texts = ["Rates rise.", "The central bank raised interest rates for the third time this year, citing prices.",
             "Shares", "Champions League final tickets sold out within minutes of going on sale online"]
    batches = [real_batch(texts[i:] + texts[:i], [i, 1, 2, 3]) for i in range(3)]
    attend_by(attention, request, batches[0])
    assert_same_training(model, reference, batches)


@pytest.mark.parametrize("where", ["bert.encoder", "bert"])
def test_a_hook_reading_the_encoders_output_turns_the_shortcut_off(where):
    """A forward hook on the encoder, or on the base model returning its states, sees every token's state as in
    Hugging Face ([B, T, d]), not the shortcut's [B, 1, d]: a probe pooling them would read the first token alone.
    Real MiniLM, real text: the same logits and gradients as the reference's, hooked alike."""
    model = real_minilm(layers=[0, 5], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, backend="torch")
    batch = real_batch(bbc_titles("tech", 2) + bbc_titles("business", 1), [4, 4, 0])
    seen = {}

    def probe(name, module, args, out) -> None:
        seen[name] = out[0]

    for name, m in (("ours", model), ("reference", reference)):
        m.get_submodule(where).register_forward_hook(functools.partial(probe, name))
    out, ref = model(**batch), reference(**batch)
    assert seen["ours"].shape == seen["reference"].shape == (*batch["input_ids"].shape, 384)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(seen["ours"][valid], seen["reference"][valid], **TOL)
    torch.testing.assert_close(out.logits, ref.logits, **TOL)
    out.loss.backward()
    ref.loss.backward()
    assert_gradients_match(model, reference)


@pytest.mark.parametrize("rows", ["exact", "bucketed"])
def test_hidden_states_and_attentions_turn_the_shortcut_off_and_stay_exact(rows, request):
    if rows == "bucketed":
        request.getfixturevalue("bucketed_rows")
    model = tiny_bert(num_hidden_layers=3)
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, backend="torch")
    batch = padded_batch(model, (9, 2, 5))
    valid = batch["attention_mask"].bool()
    out = model(**batch, output_hidden_states=True)
    ref = reference(**batch, output_hidden_states=True)
    torch.testing.assert_close(out.logits, ref.logits, **TOL)
    assert len(out.hidden_states) == len(ref.hidden_states) == 4
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours[valid], theirs[valid], **TOL)  # padding positions are zeros here
    model.set_attn_implementation("eager")
    reference.set_attn_implementation("eager")
    out, ref = model(**batch, output_attentions=True), reference(**batch, output_attentions=True)
    assert len(out.attentions) == 3
    for ours, theirs in zip(out.attentions, ref.attentions):
        torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(out.logits, ref.logits, **TOL)
    model.config.output_hidden_states = True
    assert encoder_rows(model, batch) == 9
    model.config.output_hidden_states = False
    assert encoder_rows(model, batch) == 1


@pytest.mark.parametrize("head", ["token", "question-answering", "base", "custom"])
def test_heads_reading_every_token_get_every_token(head):
    config = transformers.BertConfig(**TINY, max_position_embeddings=64)
    torch.manual_seed(0)
    model = {
        "token": lambda: transformers.BertForTokenClassification(config),
        "question-answering": lambda: transformers.BertForQuestionAnswering(config),
        "base": lambda: transformers.BertModel(config),
        "custom": lambda: torch.nn.Sequential(transformers.BertModel(config)),
    }[head]().to(DEVICE)
    batch = {k: v for k, v in padded_batch(tiny_bert(), (6, 2, 4)).items() if k != "labels"}
    valid = batch["attention_mask"].bool()
    reference = copy.deepcopy(model)
    bitfit_fast.apply(model, backend="torch", head=[] if head in ("base", "custom") else None)
    call = (lambda m: m[0](**batch)) if head == "custom" else (lambda m: m(**batch))
    out, ref = call(model), call(reference)
    assert encoder_rows(model[0] if head == "custom" else model, batch) == 6
    if head == "question-answering":  # its loss reads the padding positions too (see the next test)
        valid = torch.ones_like(valid)
    for key in ref.keys():
        ours, theirs = (out[key], ref[key]) if key == "pooler_output" else (out[key][valid], ref[key][valid])
        torch.testing.assert_close(ours, theirs, **TOL)


def _minilm_question_answering() -> transformers.BertForQuestionAnswering:
    """Pretrained MiniLM's encoder (its first and last layers) under a new question-answering head."""
    encoder = real_minilm(num_labels=2, layers=[0, 5], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForQuestionAnswering(encoder.config)
    model.bert.load_state_dict(encoder.bert.state_dict(), strict=False)  # the classifier's pooler is not used
    return model


QUESTION_ANSWERING = {
    "bert": lambda: transformers.BertForQuestionAnswering(transformers.BertConfig(**TINY,
                                                                                  max_position_embeddings=64)),
    "roberta": lambda: transformers.RobertaForQuestionAnswering(
        transformers.RobertaConfig(**TINY, max_position_embeddings=72, pad_token_id=1)),
    "distilbert": lambda: transformers.DistilBertForQuestionAnswering(
        transformers.DistilBertConfig(**TINY_DISTILBERT, qa_dropout=0.0)),
    "modernbert": lambda: transformers.ModernBertForQuestionAnswering(
        transformers.ModernBertConfig(**{**TINY_MODERNBERT, "num_labels": 2}, **dict.fromkeys(BIAS_FLAGS, True))),
    "real-minilm": _minilm_question_answering,
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", QUESTION_ANSWERING)
def test_question_answering_reads_the_padding_positions_as_hugging_face_computes_them(arch, backend):
    """Its start and end losses are a softmax over every position, padding included (Hugging Face's heads), so a
    padded batch keeps its layout: the logits at every position, the loss and the bias gradients are the
    reference's. With zeros at the padding, the loss of this batch differed by ~1e-2. A bias added alike to every
    position (the last LayerNorm's, the head's) shifts all logits of a softmax alike: its true gradient is zero,
    and both gradients must be rounding noise."""
    model = with_random_biases(QUESTION_ANSWERING[arch]()).train()
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, backend=backend)
    batch = padded_batch(model, (9, 2, 6))
    del batch["labels"]
    batch.update(start_positions=torch.tensor([1, 0, 3], device=DEVICE),
                 end_positions=torch.tensor([4, 1, 5], device=DEVICE))
    out, ref = model(**batch), reference(**batch)
    for key in ("start_logits", "end_logits"):
        torch.testing.assert_close(out[key], ref[key], **TOL)
    out.loss.backward()
    ref.loss.backward()
    expected = {name: p.grad for name, p in reference.named_parameters() if p.requires_grad}
    largest = max(g.abs().max().item() for g in expected.values())
    for name, param in trainable(model).items():
        scale = expected[name].abs().max().item()
        if scale < 1e-6 * largest:  # zero up to rounding: shift-invariant, or a key bias
            assert param.grad.abs().max() < 1e-6 * largest, name
        else:
            torch.testing.assert_close(param.grad, expected[name], atol=1e-4 * scale, rtol=0, msg=name)


def test_base_model_of_a_classifier_called_directly_returns_every_token():
    model = bitfit_fast.apply(tiny_bert(), backend="torch")
    batch = padded_batch(model, (6, 2, 4))
    hidden = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert hidden.shape[:2] == (3, 6)


def test_left_padding_and_custom_masks_keep_the_padded_layout():
    model = tiny_bert()
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, backend="torch")
    batch = padded_batch(model, (6, 2, 4))
    batch["attention_mask"] = batch["attention_mask"].flip(1)  # left padding: the head reads a padding token
    batch["input_ids"] = batch["input_ids"].flip(1)
    torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, **TOL)
    assert encoder_rows(model, batch) == 6
    # A 4-D mask in which one query may not see every real key is not a padding mask.
    batch = padded_batch(model, (6, 2, 4))
    custom = batch["attention_mask"].bool()[:, None, None, :].expand(-1, 1, 6, -1).clone()
    custom[:, :, -1, 3:] = False
    batch["attention_mask"] = custom
    torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, **TOL)
    assert encoder_rows(model, batch) == 6


def assert_logits_and_gradients_match(model, reference, batch) -> None:
    """The loss over every example, its logits and every trainable gradient, ours against the reference's."""
    out, ref_out = model(**batch), reference(**batch)
    torch.testing.assert_close(out.logits, ref_out.logits, **TOL)
    out.loss.backward()
    ref_out.loss.backward()
    assert_gradients_match(model, reference)


@pytest.mark.parametrize("make", ["bert", "minilm"])
def test_an_empty_example_is_attended_as_hugging_face_attends_it(make):
    """An all-zero attention mask: Hugging Face's SDPA gives its queries zeros, and so do we (the additive mask
    would average every value, and torch's SDPA backward of such a row was off by a factor of its length)."""
    model = with_random_biases(real_minilm() if make == "minilm" else tiny_bert()).eval()
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, backend="torch")
    batch = padded_batch(model, (6, 1, 4), num_labels=model.config.num_labels)
    batch["attention_mask"][1] = 0
    assert_logits_and_gradients_match(model, reference, batch)


@pytest.mark.parametrize("padding", ["left", "inside"])
def test_modernbert_padding_outside_or_inside_a_row_keeps_the_sliding_window_of_its_positions(padding):
    """The window counts a row's positions: a left-padded row's first query may see no key in it, and padding
    between tokens must not pull farther tokens into the window."""
    from test_bias_free import tiny_modernbert

    model = with_random_biases(tiny_modernbert(**dict.fromkeys(BIAS_FLAGS, True))).eval()  # a window of 4 tokens
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, backend="torch")
    batch = padded_batch(model, (7, 7, 4))
    mask = batch["attention_mask"]
    if padding == "left":
        mask[1, :3] = 0
    else:
        mask[0, 2:5] = 0
    batch["input_ids"] = batch["input_ids"].masked_fill(mask == 0, model.config.pad_token_id)
    assert_logits_and_gradients_match(model, reference, batch)


def test_a_soft_additive_mask_is_added_not_taken_for_padding():
    model = with_random_biases(tiny_bert()).eval()
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, backend="torch")
    batch = padded_batch(model, (5, 5, 5))
    soft = torch.zeros(3, 1, 1, 5, device=DEVICE)
    soft[..., 3] = -0.7  # a bias on one key, which softmax weighs
    batch["attention_mask"] = soft
    assert_logits_and_gradients_match(model, reference, batch)


@pytest.mark.parametrize("flip", [False, True], ids=["right-padding", "left-padding"])
def test_a_two_dimensional_padding_mask_means_what_the_four_dimensional_one_does(flip):
    """Hugging Face hands a flash-attention model's encoder the [B, T] 0/1 padding mask itself, not an additive
    [B, 1, T, T] one: it must mask the same keys, never be added to the scores as it is."""
    model = bitfit_fast.apply(tiny_bert(), backend="torch").eval()
    batch = padded_batch(model, (6, 2, 4))
    mask = batch["attention_mask"].flip(1) if flip else batch["attention_mask"]
    hidden = model.bert.embeddings(input_ids=batch["input_ids"])
    with torch.no_grad():
        as_2d = model.bert.encoder(hidden, attention_mask=mask).last_hidden_state
        as_4d = model.bert.encoder(hidden, attention_mask=mask.bool()[:, None, None, :]).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(as_2d[real], as_4d[real], atol=0, rtol=0)


def flattened(model, lengths, labels=True, start=0):
    """Sequences as a padded batch and as DataCollatorWithFlattening packs them (one row, positions from ``start``,
    the collator's ``position_ids_start``)."""
    padded = padded_batch(model, lengths)
    features = []
    for row, length in enumerate(lengths):
        ids = padded["input_ids"][row, :length].tolist()
        features.append(dict(input_ids=ids, labels=[row % 3] * length) if labels else dict(input_ids=ids))
    packed = transformers.DataCollatorWithFlattening(return_tensors="pt")(features)
    packed["position_ids"] += start  # as position_ids_start=start does (transformers 4.57 and later)
    return padded, {k: v.to(DEVICE) for k, v in packed.items()}


@pytest.mark.parametrize("rows", ["exact", "bucketed"])
@pytest.mark.parametrize("arch,start", [("bert", 0), ("roberta", 0), ("roberta", "padding_idx + 1")])
@pytest.mark.parametrize("attention", ATTENTION)
def test_flattened_batches_equal_the_padded_ones(arch, start, rows, attention, request):
    """Position ids restart at 0, or, as Hugging Face's collator docs advise RoBERTa's users, at padding_idx + 1
    (which a restart at 0 alone took for one sequence: each attended to the others)."""
    if rows == "bucketed":
        request.getfixturevalue("bucketed_rows")
    make = {"bert": transformers.BertForTokenClassification, "roberta": transformers.RobertaForTokenClassification}
    base = MODELS[arch]()
    torch.manual_seed(0)
    model = make[arch](base.config).to(DEVICE)
    bitfit_fast.apply(model, backend="torch")
    lengths = (5, 1, 8, 3)
    padded, packed = flattened(model, lengths, start=0 if start == 0 else model.config.pad_token_id + 1)
    attend_by(attention, request, padded)
    assert packed["input_ids"].shape == (1, sum(lengths)) and "position_ids" in packed
    valid = padded["attention_mask"].bool()
    # Each position labelled by its sequence (as flattened() does); the collator masks each first label (-100).
    labels = (torch.arange(len(lengths), device=DEVICE)[:, None] % 3).expand_as(valid).clone()
    labels[~valid] = -100
    labels[:, 0] = -100
    ours = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], labels=labels)
    flat = model(**packed)
    torch.testing.assert_close(flat.logits[0], ours.logits[valid], **TOL)
    torch.testing.assert_close(flat.loss, ours.loss, **TOL)
    params = list(trainable(model).values())
    grads = torch.autograd.grad(ours.loss, params)
    flat_grads = torch.autograd.grad(flat.loss, params)
    for name, grad, flat_grad in zip(trainable(model), grads, flat_grads):
        torch.testing.assert_close(flat_grad, grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_padded_row_with_position_ids_from_zero_is_not_a_packed_row(backend):
    """RoBERTa shifts a packed row's position ids from 0 to padding_idx + 1; a row whose attention mask masks
    padding is never a packed row (the collator packs without a mask): its ids are taken as given, as Hugging Face
    takes them. A packed row holding the padding token's id (a text's literal "<pad>") is still a packed row."""
    reference = MODELS["roberta"]().eval()
    model = bitfit_fast.apply(copy.deepcopy(reference), backend=backend, announce=False).eval()
    pad = reference.config.pad_token_id
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]], device=DEVICE)
    ids = torch.randint(3, reference.config.vocab_size, (1, 6), device=DEVICE).masked_fill(mask == 0, pad)
    positions = torch.arange(6, device=DEVICE)[None]
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, position_ids=positions).logits,
                                   expected, **TOL)
        # Without padding, the row may be the collator's: shifted, it is read as the padded batch reads it.
        full = ids[:, :4].clone()
        full[0, 2] = pad
        shifted = reference(input_ids=full, position_ids=positions[:, :4] + pad + 1).logits
        torch.testing.assert_close(model(input_ids=full, position_ids=positions[:, :4]).logits, shifted, **TOL)
        # The base model called with its arguments in order, and a [B, 1, Tq, Tk] mask, boolean or additive.
        expected = reference.roberta(ids, mask, None, positions).last_hidden_state[mask.bool()]
        got = model.roberta(ids, mask, None, positions).last_hidden_state[mask.bool()]
        torch.testing.assert_close(got, expected, **TOL)
        keys = mask[:, None, None, :].expand(1, 1, 6, 6)
        for mask_4d in (keys.bool(), (1.0 - keys.float()) * torch.finfo(torch.float32).min):
            expected = reference.roberta(ids, mask_4d, position_ids=positions).last_hidden_state[mask.bool()]
            got = model.roberta(ids, mask_4d, position_ids=positions).last_hidden_state[mask.bool()]
            torch.testing.assert_close(got, expected, **TOL)


# fp32, then flash-attention's rule under autocast; bf16 on the kernels is GPU-only (no bf16 tl.dot interpreted).
# The lean and minimal modes (which recompute from the packed rows) in fp32 and fp16 on either backend.
@pytest.mark.parametrize("backend,precision,memory", [
    *[(backend, precision, "default") for backend in BACKENDS for precision in (None, torch.float16)],
    ("torch", torch.bfloat16, "default"), pytest.param("triton", torch.bfloat16, "default", marks=pytest.mark.gpu),
    *[(backend, precision, memory) for backend in BACKENDS for precision, memory in ((None, "lean"),
                                                                                     (torch.float16, "minimal"))],
    ("torch", None, "minimal"), ("torch", torch.float16, "lean")], ids=str)
def test_real_text_packed_on_real_minilm_equals_the_reference_on_the_padded_batch(backend, precision, memory,
                                                                                   gemm_dtypes):
    """Real BBC titles as DataCollatorWithFlattening packs them into one row, through real MiniLM layers (the last
    two, whose LayerNorm gammas reach 1e-33) with a token classifier: the logits of every token and each trainable
    gradient equal stock Hugging Face BitFit's on the padded batch (whose attention keeps the sequences apart), in
    fp32 and by flash-attention's rule under fp16 and bf16 autocast."""
    encoder = real_minilm(layers=[4, 5], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.BertForTokenClassification(copy.deepcopy(encoder.config)).to(DEVICE)
    model.bert.load_state_dict(encoder.bert.state_dict(), strict=False)  # no pooler in a token classifier
    with torch.no_grad():
        model.classifier.bias.normal_()
    reference = reference_bitfit(copy.deepcopy(model))
    bitfit_fast.apply(model, backend=backend, memory=memory)
    texts = bbc_titles("tech", 3) + bbc_titles("sports", 2) + bbc_titles("politics", 1, skip=4)
    padded = real_batch(texts, [0] * len(texts))
    valid = padded.pop("attention_mask").bool()
    features = [dict(input_ids=ids[row_valid].tolist(), labels=[row % 3] * int(row_valid.sum()))
                for row, (ids, row_valid) in enumerate(zip(padded["input_ids"], valid))]
    packed = transformers.DataCollatorWithFlattening(return_tensors="pt")(features)
    packed = {k: v.to(DEVICE) for k, v in packed.items()}
    labels = (torch.arange(len(texts), device=DEVICE)[:, None] % 3).expand_as(valid).clone()
    labels[~valid] = -100
    labels[:, 0] = -100  # the collator masks each sequence's first label
    padded.update(attention_mask=valid.long(), labels=labels)

    def run(m, batch, dtype):
        m.zero_grad()
        with torch.autocast(DEVICE, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = m(**batch)
        out.loss.backward()
        logits = out.logits[0] if batch is packed else out.logits[valid]
        return {"logits": logits.detach().float(), **{n: p.grad for n, p in trainable(m).items()}}

    gemm_dtypes.clear()
    ours = run(model, packed, precision)
    assert_gemms_ran_in(precision or torch.float32, gemm_dtypes)
    exact = run(reference, padded, None)
    if precision is None:
        without_zero_gradients(ours, dict(exact), exact)
        for name, value in exact.items():
            torch.testing.assert_close(ours[name], value, atol=1e-4 * value.abs().max().item(), rtol=1e-4, msg=name)
    else:
        same = run(reference, padded, precision)
        without_zero_gradients(ours, same, exact)
        assert_autocast_as_accurate_as_torch(ours, same, exact, precision, f"packed real text, {memory} on {backend}")


def test_roberta_positions_of_flattened_batches_count_from_its_offset():
    base = MODELS["roberta"]()
    torch.manual_seed(0)
    model = transformers.RobertaModel(base.config).to(DEVICE)
    reference = copy.deepcopy(model)
    bitfit_fast.apply(model, backend="torch", head=[])
    padded, packed = flattened(model, (4, 6), labels=False)
    valid = padded["attention_mask"].bool()
    # The reference sees each sequence alone, with RoBERTa's own position numbering.
    expected = reference(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).last_hidden_state
    out = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).last_hidden_state
    torch.testing.assert_close(out[0], expected[valid], **TOL)
    alone = model(input_ids=packed["input_ids"][:, :4], position_ids=packed["position_ids"][:, :4])
    torch.testing.assert_close(alone.last_hidden_state[0], expected[0, :4], **TOL)  # a packed row of one sequence
    # Position ids of a padded batch are the caller's, taken as given, 0 included (as Hugging Face takes them).
    given = torch.arange(padded["input_ids"].shape[1], device=DEVICE).expand_as(padded["input_ids"])
    ours = model(**padded, position_ids=given).last_hidden_state
    theirs = reference(**padded, position_ids=given).last_hidden_state
    torch.testing.assert_close(ours[valid], theirs[valid], **TOL)


def test_merge_removes_the_hooks_and_a_deep_copy_keeps_its_own():
    model = bitfit_fast.apply(tiny_bert(), backend="torch")
    copied = copy.deepcopy(model)
    batch = padded_batch(model, (6, 2, 4))
    merged = bitfit_fast.merge(model)
    assert not merged._forward_pre_hooks and not merged._forward_hooks
    assert encoder_rows(copied, batch) == 1


def test_hugging_face_gradient_checkpointing_runs_through_the_unpadded_encoder():
    model = tiny_bert(num_hidden_layers=3)
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, backend="torch")
    enable_hf_checkpointing(model)
    assert all(layer.gradient_checkpointing for layer in model.bert.encoder.layer)
    assert_same_training(model.train(), reference.train(), [padded_batch(model, (9, 2, 5)) for _ in range(2)])
