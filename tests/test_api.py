"""apply / merge / parameter counts: selection rules, supported families and every error path."""

import pytest
import torch
import torch.nn as nn
import transformers
from bitfit_reference import (
    DEVICE,
    TINY,
    assert_gradients_match,
    padded_batch,
    reference_bitfit,
    tiny_bert,
    tiny_roberta,
    trainable,
    with_random_biases,
)

import bitfit_fast
from bitfit_fast import BitFitLayerNorm, BitFitLinear


def meta_model(config_cls, model_cls, **config):
    with torch.device("meta"):
        return model_cls(config_cls(**config))


def test_print_trainable_parameters_on_bert_base(capsys):
    model = meta_model(transformers.BertConfig, transformers.BertForSequenceClassification, num_labels=2)
    bitfit_fast.apply(model)
    bitfit_fast.print_trainable_parameters(model)
    # The paper's 102,912 BERT-base biases plus the 768 x 2 + 2 classifier.
    assert capsys.readouterr().out == "trainable params: 104,450 || all params: 109,483,778 || trainable%: 0.0954\n"
    with pytest.raises(TypeError, match="counting parameters takes a torch.nn.Module, got str"):
        bitfit_fast.print_trainable_parameters("bert-base-uncased")


def test_a_tied_weight_counts_once():
    model = meta_model(transformers.BertConfig, transformers.BertForMaskedLM)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    bitfit_fast.apply(model, train_head=False)
    # bert-base-uncased's masked-LM count; the biases: BERT-base's 102,912 less the pooler's 768, plus the MLM
    # transform's dense and LayerNorm biases (768 each) and the decoder's 30,522.
    assert bitfit_fast.get_nb_trainable_parameters(model) == (102_912 - 768 + 2 * 768 + 30_522, 109_514_298)


@pytest.mark.parametrize(
    "size,biases,expected",
    [
        (dict(), "subset", 12 * (768 + 3072)),  # b_q and b_m2 of BERT-base
        (dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096), "all", 272_384),
    ],
)
def test_bias_counts_match_the_paper(size, biases, expected):
    model = meta_model(transformers.BertConfig, transformers.BertForSequenceClassification, num_labels=2, **size)
    bitfit_fast.apply(model, biases=biases, train_head=False)
    head_biases = 2  # train_head=False: the classifier's bias follows `biases` ("all" includes it)
    trained, _ = bitfit_fast.get_nb_trainable_parameters(model)
    assert trained == expected + (head_biases if biases == "all" else 0)


def test_modules_are_replaced_in_place_and_keep_their_parameters():
    model = tiny_bert()
    query = model.bert.encoder.layer[0].attention.self.query
    keys = list(model.state_dict())
    assert bitfit_fast.apply(model, fuse_layers=False) is model
    new_query = model.bert.encoder.layer[0].attention.self.query
    assert type(new_query) is BitFitLinear and isinstance(new_query, nn.Linear)
    assert new_query.weight is query.weight and new_query.bias is query.bias
    assert type(query) is nn.Linear, "the original instance and class are untouched"
    assert type(model.classifier) is nn.Linear, "the trained head keeps its module"
    assert isinstance(model.bert.embeddings.LayerNorm, BitFitLayerNorm)
    assert list(model.state_dict()) == keys
    assert "BitFitLinear(in_features=36, out_features=36, bias=True, backend=auto)" in repr(model)


@pytest.mark.parametrize("patterns", [["attention.self.value", "encoder.layer.1.*.LayerNorm"],
                                      ["bert.encoder.layer.0.attention.self.value.bias", "1.attention.self.value.bias",
                                       "encoder.layer.1.*.LayerNorm.bias"]], ids=["modules", "bias-parameters"])
def test_patterns_select_by_suffix_and_glob(patterns):
    """Module names, or their bias parameters' (the names a state_dict shows), whole or a dotted suffix."""
    model = tiny_bert()
    bitfit_fast.apply(model, biases=patterns, train_head=False)
    assert sorted(trainable(model)) == [
        "bert.encoder.layer.0.attention.self.value.bias",
        "bert.encoder.layer.1.attention.output.LayerNorm.bias",
        "bert.encoder.layer.1.attention.self.value.bias",
        "bert.encoder.layer.1.output.LayerNorm.bias",
    ]


def test_frozen_head_is_treated_like_the_body():
    model = tiny_bert()
    bitfit_fast.apply(model, train_head=False)
    assert not model.classifier.weight.requires_grad and model.classifier.bias.requires_grad
    assert isinstance(model.classifier, BitFitLinear)


def test_tied_head_needs_train_head_false():
    model = transformers.BertForMaskedLM(transformers.BertConfig(**TINY, max_position_embeddings=64))
    with pytest.raises(ValueError, match="tied to bert.embeddings.word_embeddings.weight"):
        bitfit_fast.apply(model)
    bitfit_fast.apply(model, train_head=False)
    assert "cls.predictions.bias" in trainable(model) and not model.cls.predictions.decoder.weight.requires_grad


def test_dtype_keeps_every_tie_and_merge_gives_them_back():
    """dtype= stores the frozen linear weights once in bf16: a decoder tied to its word embeddings stays tied (and in
    the embeddings' dtype), two linear layers sharing a weight share one bf16 copy; merge restores both ties."""
    model = transformers.BertForMaskedLM(transformers.BertConfig(**TINY, max_position_embeddings=64))
    encoder = model.bert.encoder.layer
    encoder[1].output.dense.weight = encoder[0].output.dense.weight  # two layers sharing one weight (ALBERT-like)
    bitfit_fast.apply(model, train_head=False, dtype=torch.bfloat16, announce=False)
    decoder, embeddings = model.cls.predictions.decoder.weight, model.bert.embeddings.word_embeddings.weight
    assert decoder is embeddings and decoder.dtype == torch.float32
    shared = encoder[0].output.dense.weight
    assert encoder[1].output.dense.weight is shared and shared.dtype == torch.bfloat16
    assert encoder[0].intermediate.dense.weight.dtype == torch.bfloat16
    with pytest.warns(UserWarning, match="rounded to it"):
        bitfit_fast.merge(model)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    shared = encoder[0].output.dense.weight
    assert encoder[1].output.dense.weight is shared and shared.dtype == torch.float32


def test_add_missing_biases_keeps_the_function_and_trains_them():
    model = nn.Sequential(nn.Linear(8, 12, bias=False), nn.LayerNorm(12, bias=False), nn.Linear(12, 4)).to(DEVICE)
    x = torch.randn(5, 8, device=DEVICE)
    before = model(x).detach()
    bitfit_fast.apply(model, add_missing_biases=True)
    assert model.bitfit_fast_state.added_biases == ["0", "1"]
    torch.testing.assert_close(model(x), before, atol=0, rtol=0)
    model(x).square().sum().backward()
    assert model[0].bias.grad is not None and model[1].bias.grad.abs().sum() > 0
    bitfit_fast.merge(model)
    assert type(model[0]) is nn.Linear and model[0].bias is not None


FAMILIES = {
    "distilbert": (transformers.DistilBertConfig, transformers.DistilBertForSequenceClassification,
                   dict(vocab_size=97, dim=36, n_layers=2, n_heads=3, hidden_dim=52, dropout=0.0,
                        attention_dropout=0.0, seq_classif_dropout=0.0, max_position_embeddings=64)),
    "albert": (transformers.AlbertConfig, transformers.AlbertForSequenceClassification,
               dict(TINY, embedding_size=20, max_position_embeddings=64, classifier_dropout_prob=0.0)),
    "electra": (transformers.ElectraConfig, transformers.ElectraForSequenceClassification,
                dict(TINY, embedding_size=20, max_position_embeddings=64)),
    "xlm-roberta": (transformers.XLMRobertaConfig, transformers.XLMRobertaForSequenceClassification,
                    dict(TINY, max_position_embeddings=72, pad_token_id=1)),
    # DeBERTa's attention adds biases of its own (q_bias, v_bias) to a bias-free packed projection. Both with
    # their pretrained models' relative attention (deberta-base; DeBERTa-v3, whose classes are v2's).
    "deberta": (transformers.DebertaConfig, transformers.DebertaForSequenceClassification,
                dict(TINY, max_position_embeddings=64, relative_attention=True, pos_att_type=["c2p", "p2c"])),
    "deberta-v2": (transformers.DebertaV2Config, transformers.DebertaV2ForSequenceClassification,
                   dict(TINY, max_position_embeddings=64, relative_attention=True, pos_att_type=["p2c", "c2p"],
                        position_biased_input=False, position_buckets=16, norm_rel_ebd="layer_norm",
                        share_att_key=True)),
    "mpnet": (transformers.MPNetConfig, transformers.MPNetForSequenceClassification,
              dict(TINY, max_position_embeddings=64, pad_token_id=1)),
    **{name: (config_cls, model_cls, dict(vocab_size=97, emb_dim=36, n_layers=2, n_heads=3, dropout=0.0,
                                          attention_dropout=0.0, summary_first_dropout=0.0,
                                          max_position_embeddings=64))
       for name, config_cls, model_cls in (
           ("xlm", transformers.XLMConfig, transformers.XLMForSequenceClassification),
           ("flaubert", transformers.FlaubertConfig, transformers.FlaubertForSequenceClassification))},
    # X-MOD routes each example to its language's adapter: those of languages not in the batch get no rows.
    "xmod": (transformers.XmodConfig, transformers.XmodForSequenceClassification,
             dict(TINY, max_position_embeddings=72, pad_token_id=1, languages=["en_XX", "de_DE"],
                  default_language="en_XX")),
    "funnel": (transformers.FunnelConfig, transformers.FunnelForSequenceClassification,
               dict(vocab_size=97, block_sizes=[1, 1], d_model=36, n_head=3, d_head=12, d_inner=52,
                    hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0)),
}


# The fused layer and encoder classes of each family; ALBERT's layers keep the module path.
FUSED_CLASSES = {
    "distilbert": {"FusedTransformerBlock", "FusedTransformer"},
    "electra": {"FusedElectraLayer", "FusedElectraEncoder"},
    "xlm-roberta": {"FusedXLMRobertaLayer", "FusedXLMRobertaEncoder"},
}
# The paper's subset (b_q, b_m2) by each family's module names.
SUBSET_NAMES = {
    "distilbert": ("attention.q_lin.bias", "ffn.lin1.bias"),
    "albert": ("attention.query.bias", "albert_layers.0.ffn.bias"),
    "electra": ("attention.self.query.bias", "intermediate.dense.bias"),
    "xlm-roberta": ("attention.self.query.bias", "intermediate.dense.bias"),
    "deberta": ("attention.self.q_bias", "intermediate.dense.bias"),
    "deberta-v2": ("attention.self.query_proj.bias", "intermediate.dense.bias"),
    "mpnet": ("attention.attn.q.bias", "intermediate.dense.bias"),
    "xlm": ("q_lin.bias", "lin1.bias"),
    "flaubert": ("q_lin.bias", "lin1.bias"),
    "xmod": ("attention.self.query.bias", "intermediate.dense.bias"),
}

# Funnel's head reads the first token only, whose scores in the last block leave out the relative positions and
# token types (its cls_mask): their biases there get a zero gradient. So do the adapters X-MOD routes no row to.
UNUSED = {"funnel": tuple(f"funnel.encoder.blocks.1.0.attention.{name}" for name in ("r_r_bias", "r_s_bias")),
          # X-MOD's German adapters, in a batch of the default language (English) only
          "xmod": tuple(f"roberta.encoder.layer.{layer}.output.adapter_modules.de_DE.dense{part}.bias"
                        for layer in range(2) for part in (1, 2))}


@pytest.mark.parametrize("family,biases", [(family, biases) for family in FAMILIES for biases in ("all", "subset")
                                           if biases == "all" or family in SUBSET_NAMES])
def test_other_encoder_families_match_the_reference(family, biases):
    config_cls, model_cls, config = FAMILIES[family]
    model = model_cls(config_cls(**config, num_labels=3)).to(DEVICE)
    head = tuple(name for name, _ in model.named_children() if name != model.base_model_prefix)
    reference = reference_bitfit(model, head=head)
    bitfit_fast.apply(model, biases=biases, backend="torch")
    fused = {type(m).__name__ for m in model.modules() if type(m).__name__.startswith("Fused")}
    assert fused == FUSED_CLASSES.get(family, set())
    selected = trainable(model).keys()
    if biases == "all":
        assert selected == trainable(reference).keys()
    else:
        body = [n for n in selected if n.split(".")[0] not in head]
        assert body and all(n.endswith(SUBSET_NAMES[family]) for n in body), body
        for name, param in reference.named_parameters():
            param.requires_grad_(name in selected)
    batch = padded_batch(model)
    out, ref_out = model(**batch), reference(**batch)
    torch.testing.assert_close(out.logits, ref_out.logits, atol=2e-5, rtol=1e-4)
    out.loss.backward()
    ref_out.loss.backward()
    assert_gradients_match(model, reference, unused=UNUSED.get(family, ()))


# Encoders outside the fused families whose self-attention has BERT's module names: BERT's math (Megatron-BERT,
# XLM-RoBERTa-XL, ConvBERT's attention beside its convolution), or keys rotated by their position (RoFormer).
KEY_BIAS_FAMILIES = {
    "megatron-bert": (transformers.MegatronBertConfig, transformers.MegatronBertForSequenceClassification,
                      dict(TINY, max_position_embeddings=64)),
    "xlm-roberta-xl": (transformers.XLMRobertaXLConfig, transformers.XLMRobertaXLForSequenceClassification,
                       dict(TINY, max_position_embeddings=72, pad_token_id=1)),
    "convbert": (transformers.ConvBertConfig, transformers.ConvBertForSequenceClassification,
                 dict(TINY, embedding_size=36, head_ratio=1, max_position_embeddings=64)),
    "roformer": (transformers.RoFormerConfig, transformers.RoFormerForSequenceClassification,
                 dict(TINY, embedding_size=36, max_position_embeddings=64)),
    **{name: (getattr(transformers, f"{model}Config"), getattr(transformers, f"{model}ForSequenceClassification"),
              dict(TINY, max_position_embeddings=72, pad_token_id=1, **options))
       for name, model, options in (
           ("roberta-prelayernorm", "RobertaPreLayerNorm", {}),
           ("roc-bert", "RoCBert", {}),
           ("rembert", "RemBert", dict(input_embedding_size=20, output_embedding_size=20)),
           ("tapas", "Tapas", {}),
           ("markuplm", "MarkupLM", {}),
           ("mobilebert", "MobileBert", dict(embedding_size=36, true_hidden_size=36, intra_bottleneck_size=36,
                                             num_feedforward_networks=2)),
           ("esm", "Esm", dict(position_embedding_type="absolute")),
           ("esm-rotary", "Esm", dict(position_embedding_type="rotary")),
           # a softmax over the keys of a few blocks: long enough not to fall back to full attention
           ("big-bird", "BigBird", dict(attention_type="block_sparse", block_size=2, num_random_blocks=1)),
           # the Nystrom approximation (three softmaxes over keys or their landmarks) for inputs of 8 tokens
           ("nystromformer", "Nystromformer", dict(num_landmarks=4, segment_means_seq_len=8)),
           ("longformer", "Longformer", dict(attention_window=4)))},
}
# Lengths of the test's batch where the default's would not reach the attention under test: Big Bird's block-sparse
# one needs long inputs; Nystromformer's landmarks run on inputs of segment_means_seq_len tokens, unpadded
# (transformers 5's [B, 1, L, L] mask does not fit their [B, H, landmarks, L] scores).
KEY_BIAS_LENGTHS = {"big-bird": (19, 3, 5), "nystromformer": (8, 8, 8)}


@pytest.mark.parametrize("family", ["bert", *FAMILIES, *KEY_BIAS_FAMILIES])
def test_a_key_bias_gets_exactly_zero_where_its_true_gradient_is_zero_and_trains_where_not(family):
    """apply gives the key biases of the attention classes it knows exactly zero gradients, and every other key
    bias the reference's. The truth comes from the reference in float64: a true zero is rounding noise there."""
    if family == "bert":
        model = tiny_bert()
    else:
        config_cls, model_cls, config = {**FAMILIES, **KEY_BIAS_FAMILIES}[family]
        model = model_cls(config_cls(**config, num_labels=3))
    model = with_random_biases(model.double())
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, backend="torch", announce=False)
    batch = padded_batch(model, KEY_BIAS_LENGTHS.get(family, (7, 3, 5)))
    model(**batch).loss.backward()
    reference(**batch).loss.backward()
    gradients = {name: param.grad for name, param in reference.named_parameters() if param.grad is not None}
    scale = max(grad.abs().max().item() for name, grad in gradients.items() if name.endswith(".bias"))
    keys = [name for name in gradients if name.endswith((".key.bias", ".k_lin.bias", ".attn.k.bias", "key_proj.bias",
                                                              ".k_head.bias"))]
    # XLM, FlauBERT, Funnel and MarkupLM take their softmax in float32 even in a float64 model: their true zero is
    # float32 noise.
    noise = 1e-8 if family in ("xlm", "flaubert", "funnel", "markuplm") else 1e-12
    if family == "deberta":  # its packed projection has no bias: nothing to test
        assert not keys
        return
    assert len(keys) == (1 if family == "albert" else 2), keys  # one per layer (ALBERT's two share one)
    ours = dict(model.named_parameters())
    for name in keys:
        truly_zero = gradients[name].abs().max().item() < noise * scale
        # RoFormer and ESM rotate their keys by position; DeBERTa-v2's scores read them against relative positions.
        assert truly_zero == (family not in ("roformer", "deberta-v2", "esm-rotary")), f"{name}: the test's premise"
        if truly_zero:
            assert not ours[name].grad.any(), f"{name}: its true gradient is zero, and so is ours"
        else:
            torch.testing.assert_close(ours[name].grad, gradients[name], rtol=1e-9, atol=1e-9 * scale, msg=name)


@pytest.mark.parametrize("model_name,model_class", [("Bert", "BertLMHeadModel"), ("Roberta", "RobertaForCausalLM"),
                                                    ("Ernie", "ErnieForCausalLM")])
def test_a_decoders_self_and_cross_attention_key_biases_get_exactly_zero(model_name, model_class):
    """A decoder with cross-attention (add_cross_attention): each query's scores over its own causal prefix and over
    the encoder's states ignore q·b_k. Its other biases match the reference's gradients."""
    config = getattr(transformers, f"{model_name}Config")(
        **TINY, max_position_embeddings=72, pad_token_id=1, is_decoder=True, add_cross_attention=True)
    model = with_random_biases(getattr(transformers, model_class)(config).double())
    reference = reference_bitfit(model, head=[])
    bitfit_fast.apply(model, backend="torch", train_head=False, announce=False)
    batch = padded_batch(model)
    encoder_states = torch.randn(3, 4, 36, dtype=torch.float64, device=DEVICE)
    for each in (model, reference):
        each(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["input_ids"],
             encoder_hidden_states=encoder_states).loss.backward()
    keys = [name for name, _ in model.named_parameters() if name.endswith("key.bias")]
    assert sum(".crossattention." in name for name in keys) == 2 and len(keys) == 4, keys
    assert_gradients_match(model, reference)


def test_a_key_bias_of_an_attention_with_relative_positions_keeps_its_real_gradient():
    """transformers 4's BERT-style attention may add relative positions to the keys (position_embedding_type
    "relative_key"), where the key bias has a real gradient: it is not zeroed there."""
    config_cls, model_cls, config = KEY_BIAS_FAMILIES["megatron-bert"]
    model = model_cls(config_cls(**config, num_labels=3))
    model.bert.encoder.layer[0].attention.self.position_embedding_type = "relative_key"
    bitfit_fast.apply(model, backend="torch", announce=False)
    assert [layer.attention.self.key.zero_bias_grad for layer in model.bert.encoder.layer] == [False, True]


def test_a_torch_transformer_encoder_trains_its_attentions_in_projection_bias_as_the_reference():
    """nn.MultiheadAttention holds its q/k/v bias as in_proj_bias, added in its own forward: it trains, as every
    parameter named *bias does in reference BitFit (it was frozen), and the gradients are the reference's."""

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
            self.encoder, self.head = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(16, 3)

        def forward(self, x):
            return self.head(self.encoder(x)[:, 0])

    model = with_random_biases(Classifier())
    reference = reference_bitfit(model, head=["head"])
    bitfit_fast.apply(model, head=["head"], backend="torch", announce=False)
    assert trainable(model).keys() == trainable(reference).keys()
    assert "encoder.layers.0.self_attn.in_proj_bias" in trainable(model)
    x = torch.randn(3, 5, 16, device=DEVICE)
    out, ref_out = model(x), reference(x)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-5)
    out.square().sum().backward()
    ref_out.square().sum().backward()
    assert_gradients_match(model, reference)


def test_subset_is_refused_where_only_half_of_it_is_found():
    """The paper's subset is the query and the intermediate biases: a model where only one of them is found by name
    (Funnel-like names: the intermediate layer's only) is refused, not trained on half of it."""
    model = transformers.NystromformerForSequenceClassification(transformers.NystromformerConfig(
        **TINY, max_position_embeddings=64, num_landmarks=4, segment_means_seq_len=16))
    for layer in model.nystromformer.encoder.layer:  # the query under a name of no family
        layer.attention.self.q_proj = layer.attention.self.query
        del layer.attention.self.query
    with pytest.raises(ValueError, match=r"found NystromformerForSequenceClassification's intermediate layers \("
                                         r"nystromformer.encoder.layer.0.intermediate.dense, ...\) but no query layer"):
        bitfit_fast.apply(model, biases="subset")
    assert not any(isinstance(m, BitFitLinear) for m in model.modules()), "refused before anything changed"


def test_a_model_whose_biases_are_in_modules_of_other_kinds_is_refused_with_what_would_work():
    """I-BERT's quantized layers (QuantLinear, IntLayerNorm) hold its biases: no fused op applies, and adding zero
    biases (the bias-free hint) would change nothing; the refusal names those kinds and plain PyTorch instead."""
    model = transformers.IBertForSequenceClassification(transformers.IBertConfig(
        **TINY, max_position_embeddings=64, pad_token_id=1, num_labels=3))
    for add_missing_biases in (None, True):
        with pytest.raises(ValueError, match=r"its biases are in modules of other kinds \(IntLayerNorm, QuantLinear\), "
                                             r"which it has no fused op for: train them with plain PyTorch"):
            bitfit_fast.apply(model, add_missing_biases=add_missing_biases)


def test_albert_shared_layers_stay_shared():
    config_cls, model_cls, config = FAMILIES["albert"]
    model = model_cls(config_cls(**{**config, "num_hidden_layers": 3}))
    bitfit_fast.apply(model)
    group = model.albert.encoder.albert_layer_groups[0].albert_layers[0]
    assert isinstance(group.attention.query, BitFitLinear)
    assert len({id(m) for m in model.modules() if isinstance(m, BitFitLinear)}) == 8  # 6 layer + mapping + pooler


@pytest.mark.parametrize(
    "make,kwargs,error,message",
    [
        (tiny_bert, dict(biases="some"), ValueError, "biases must be 'all', 'subset' or a list"),
        (tiny_bert, dict(biases=[]), ValueError, "non-empty list"),
        (tiny_bert, dict(biases=["attention.self.qurey"]), ValueError, "'attention.self.qurey' matches no module"),
        (tiny_bert, dict(backend="cuda"), ValueError, "backend must be one of"),
        (tiny_bert, dict(memory="low"), ValueError, "memory must be one of"),
        (tiny_bert, dict(dtype=torch.int8), ValueError, "dtype must be a floating torch.dtype"),
        (tiny_bert, dict(train_head="yes"), ValueError, "train_head must be True or False"),
        (tiny_bert, dict(fuse_layers="no"), ValueError, "fuse_layers must be True or False, got 'no'"),
        (tiny_bert, dict(add_missing_biases="false"), ValueError, "add_missing_biases must be None, True or False"),
        (tiny_bert, dict(head="classifier"), ValueError, r"head must be a list of module names such as \['classif"),
        (tiny_bert, dict(head=5), ValueError, r"head must be a list of module names such as \['classif"),
        (tiny_bert, dict(lr=1e-3), TypeError, r"unknown options \['lr'\]"),
        (tiny_bert, dict(config="subset"), TypeError, "config must be a bitfit_fast.BitFitConfig"),
        (tiny_bert, dict(head=["classifer"]), ValueError, r"head modules \['classifer'\] not found"),
        (lambda: nn.Sequential(nn.Embedding(5, 4), nn.ReLU()), {}, ValueError, "no torch.nn.Linear"),
        (lambda: nn.Sequential(nn.Conv1d(3, 3, 1)), {}, ValueError, "supports encoders built from those modules"),
        (lambda: nn.Sequential(nn.Linear(4, 4)), dict(biases="subset"), ValueError, "found no query/intermediate"),
        (lambda: "bert-base-uncased", {}, TypeError, "takes a torch.nn.Module"),
        # Its head cannot be found: guessed, the head's weight would stay frozen.
        (lambda: nn.ModuleDict(dict(encoder=tiny_bert().bert, head=nn.Linear(36, 2))), {}, ValueError,
         r"ModuleDict holds a BertModel but is not a Hugging Face model, so its head cannot be found: name the "
         r"modules that train fully with head=\[...\]"),
        (lambda: torch.nn.DataParallel(tiny_bert()), {}, ValueError,
         "apply to the model before wrapping it"),
    ],
)
def test_bad_arguments_get_a_clear_error_and_leave_the_model_untouched(make, kwargs, error, message):
    model = make()
    state = {n: p.requires_grad for n, p in model.named_parameters()} if isinstance(model, nn.Module) else None
    with pytest.raises(error, match=message):
        bitfit_fast.apply(model, **kwargs)
    if state is not None:
        assert {n: p.requires_grad for n, p in model.named_parameters()} == state
        assert not any(isinstance(m, (BitFitLinear, BitFitLayerNorm)) for m in model.modules())


def test_names_match_at_dots_only():
    """Layer 0's pattern is not layer 10's, layer 1's head module not layer 10's or 11's: a pattern matches a dotted
    suffix, a head module what is inside it, both at a dot."""
    model = bitfit_fast.apply(tiny_bert(num_hidden_layers=12), biases=["0.attention.self.value"],
                              head=["bert.encoder.layer.1", "classifier"], announce=False)
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    layer_1 = {name for name, _ in model.named_parameters() if name.startswith("bert.encoder.layer.1.")}
    assert {name for name in trained if name.startswith("bert.encoder.")} == {
        "bert.encoder.layer.0.attention.self.value.bias", *layer_1}
    model = bitfit_fast.apply(tiny_bert(num_hidden_layers=12), head=["bert.encoder.layer.1", "classifier"],
                              announce=False)
    for name, param in model.named_parameters():
        if name.startswith(("bert.encoder.layer.10.", "bert.encoder.layer.11.")):
            assert param.requires_grad == name.endswith(".bias"), f"{name}: a body parameter, not the head's"


def test_a_config_and_keywords_set_a_model_up_alike():
    config = bitfit_fast.BitFitConfig(biases=("attention.self.value",), memory="lean", fuse_layers=False)
    from_config = bitfit_fast.apply(tiny_bert(), config, train_head=False)
    from_keywords = bitfit_fast.apply(tiny_bert(), biases=["attention.self.value"], memory="lean",
                                      fuse_layers=False, train_head=False)
    assert from_config.bitfit_fast_config == from_keywords.bitfit_fast_config
    assert from_config.bitfit_fast_config.biases == ["attention.self.value"]
    assert config.train_head, "overrides replace fields of a copy; the caller's config is unchanged"
    assert trainable(from_config).keys() == trainable(from_keywords).keys()
    assert from_config.bitfit_fast_state == bitfit_fast.AppliedState(head=["dropout", "classifier"])


def test_every_config_option_has_help_text():
    import dataclasses

    for field in dataclasses.fields(bitfit_fast.BitFitConfig):
        assert len(field.metadata.get("help", "")) > 20, field.name


def test_applying_twice_or_merging_a_plain_model_is_an_error():
    model = bitfit_fast.apply(tiny_roberta())
    with pytest.raises(ValueError, match="already applied.*merge"):
        bitfit_fast.apply(model)
    bitfit_fast.merge(model)
    with pytest.raises(ValueError, match="not a bitfit_fast model"):
        bitfit_fast.merge(model)
    bitfit_fast.apply(model, biases="subset")  # merged models can be applied again


def test_triton_backend_without_gpu_or_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr("bitfit_fast_kernels.INTERPRETER", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU, or TRITON_INTERPRET=1"):
        bitfit_fast.apply(tiny_bert(), backend="triton")


def test_recognised_layers_are_fused_and_keep_parameter_names_and_values():
    model = tiny_bert()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bitfit_fast.apply(model)
    layer = model.bert.encoder.layer[0]
    assert type(layer).__name__ == "FusedBertLayer"
    assert isinstance(layer, transformers.models.bert.modeling_bert.BertLayer)
    assert "FusedBertLayer(\n" in repr(model) and "memory=default" in repr(model)
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    sa = layer.attention.self
    packed = layer.packed_qkv_weight()
    assert sa.key.weight.data_ptr() == packed[36].data_ptr(), "q/k/v weights are views of the packed weight"


@pytest.mark.parametrize("family", ["bert", "roberta", "modernbert", *FAMILIES])
@pytest.mark.parametrize("options", [dict(), dict(biases="subset"), dict(train_head=False)],
                         ids=["all", "subset", "frozen-head"])
def test_planned_parameters_are_what_apply_leaves(family, options):
    """load_biases checks a checkpoint against the plan before apply() changes the model: they must agree."""
    from test_bias_free import tiny_modernbert

    from bitfit_fast.model import planned_parameters

    if family in FAMILIES:
        config_cls, model_cls, config = FAMILIES[family]
        model = model_cls(config_cls(**config, num_labels=3))
    else:
        model = {"bert": tiny_bert, "roberta": tiny_roberta, "modernbert": tiny_modernbert}[family]()
    before = {name: p.clone() for name, p in model.state_dict().items()}
    if options.get("biases") == "subset" and family in FAMILIES and family not in SUBSET_NAMES:  # no subset
        with pytest.raises(ValueError, match="biases='subset' found") as planned:
            planned_parameters(model, bitfit_fast.BitFitConfig(**options))
        with pytest.raises(ValueError) as applied:
            bitfit_fast.apply(model, **options, announce=False)
        assert str(planned.value) == str(applied.value)
        return
    shapes, trained = planned_parameters(model, bitfit_fast.BitFitConfig(**options))
    assert model.state_dict().keys() == before.keys(), "planning changes nothing"
    bitfit_fast.apply(model, **options, announce=False)
    assert shapes == {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert trained == trainable(model).keys()
