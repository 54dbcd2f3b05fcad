"""What bitfit_fast knows about each model family, in one place.

A family entry says which modules are the paper's bias subset, which key projections have a bias whose true
gradient is zero, where the parts of a fusable encoder layer live, which task heads read only the first token,
and how the family numbers positions. ``apply``, the fused encoder and the classification shortcut all read
this registry; supporting a family is one entry here plus a test.
"""

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class EncoderLayerSpec:
    """Attribute paths, from a layer, of a post-LayerNorm encoder layer's parts:

        a  = attention(query(x), key(x), value(x))            dropout on the probabilities: attention_dropout
        y1 = attention_norm(dropout(attention_output(a)) + x)  dropout: attention_output_dropout
        y2 = output_norm(dropout(output(gelu(intermediate(y1)))) + y1)

    attention_output_dropout is None where the layer has no dropout there (DistilBERT). ``heads`` names the
    attention module's head-count attribute; its ``scaling`` attribute, where present, is the score scale, else
    1/sqrt(hidden / heads).
    """

    attention: str  # the self-attention module: head count, scaling, position embedding type
    query: str
    key: str
    value: str
    attention_dropout: str
    attention_output: str
    attention_output_dropout: str | None
    attention_norm: str
    intermediate: str
    activation: str
    output: str
    output_dropout: str
    output_norm: str
    heads: str = "num_attention_heads"  # attribute of the attention module

    def linears(self) -> tuple[str, ...]:
        """Paths of the six linears: query, key, value, attention output, intermediate, output."""
        return self.query, self.key, self.value, self.attention_output, self.intermediate, self.output

    def norms(self) -> tuple[str, ...]:
        """Paths of the two LayerNorms: after the attention block and after the feed-forward block."""
        return self.attention_norm, self.output_norm

    def weighted(self) -> tuple[str, ...]:
        """Paths of the parts with a frozen weight or gain: the linears and the LayerNorms."""
        return self.linears() + self.norms()

    def dropouts(self) -> tuple[str, ...]:
        """Paths of the dropouts: attention probabilities, attention output (where there is one), feed-forward
        output."""
        paths = self.attention_dropout, self.attention_output_dropout, self.output_dropout
        return tuple(path for path in paths if path is not None)


BERT_LAYER = EncoderLayerSpec(
    attention="attention.self",
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
    attention_dropout="attention.self.dropout",
    attention_output="attention.output.dense",
    attention_output_dropout="attention.output.dropout",
    attention_norm="attention.output.LayerNorm",
    intermediate="intermediate.dense",
    activation="intermediate.intermediate_act_fn",
    output="output.dense",
    output_dropout="output.dropout",
    output_norm="output.LayerNorm",
)

# DistilBERT's TransformerBlock: no dropout between out_lin and the residual; the FFN's dropout follows lin2.
DISTILBERT_LAYER = EncoderLayerSpec(
    attention="attention",
    query="attention.q_lin",
    key="attention.k_lin",
    value="attention.v_lin",
    attention_dropout="attention.dropout",
    attention_output="attention.out_lin",
    attention_output_dropout=None,
    attention_norm="sa_layer_norm",
    intermediate="ffn.lin1",
    activation="ffn.activation",
    output="ffn.lin2",
    output_dropout="ffn.dropout",
    output_norm="output_layer_norm",
    heads="n_heads",
)


@dataclasses.dataclass(frozen=True)
class PreNormGluLayerSpec:
    """Attribute paths, from a layer, of a pre-LayerNorm encoder layer with rotary positions and a GLU MLP
    (ModernBERT):

        a  = attention(rope(q), rope(k), v), q|k|v = qkv(attention_norm(x))   dropout on the probabilities
        x1 = x + dropout(attention_output(a))          the attention's dropout probability, again
        y  = x1 + mlp_output(dropout(act(u) * gate)),  u|gate = glu_input(mlp_norm(x1))

    attention_norm may be an Identity (ModernBERT's layer 0); dropouts may be Identity (probability 0).
    """

    attention: str  # the self-attention module: head_dim, attention_dropout
    qkv: str  # q, k and v packed along the output rows
    attention_output: str
    attention_output_dropout: str
    attention_norm: str
    mlp_norm: str
    glu_input: str  # [input | gate] halves along the output rows
    activation: str
    mlp_dropout: str
    mlp_output: str

    def weighted(self) -> tuple[str, ...]:
        """Paths of the parts with a frozen weight or gain (attention_norm may be an Identity, without one)."""
        return self.qkv, self.attention_output, self.glu_input, self.mlp_output, self.attention_norm, self.mlp_norm


MODERNBERT_LAYER = PreNormGluLayerSpec(
    attention="attn",
    qkv="attn.Wqkv",
    attention_output="attn.Wo",
    attention_output_dropout="attn.out_drop",
    attention_norm="attn_norm",
    mlp_norm="mlp_norm",
    glu_input="mlp.Wi",
    activation="mlp.act",
    mlp_dropout="mlp.drop",
    mlp_output="mlp.Wo",
)


@dataclasses.dataclass(frozen=True)
class Family:
    """One registry entry: what ``apply``, the fused encoder and the classification shortcut know of a family."""
    name: str
    # biases="subset": the paper's b_q and b_m2, as (query, intermediate) module-name patterns (or a bias
    # parameter's full name: DeBERTa's q_bias); None where the family has no such pair (subset is refused).
    subset: tuple[str, str] | None
    # Projections that stack q, k and v (in that order) along their output rows: under biases="subset" only the
    # query third of their bias trains.
    packed_qkv: tuple[str, ...] = ()
    # Self-attention modules (class name, or module and class name: their key projection's attribute) whose key
    # bias has an identically zero gradient: softmax(q·k) ignores the per-query constant q·b_k as long as positions
    # do not enter through the keys (absolute positions). By class, as the fused layers: an attention of the same
    # attribute names may rotate the keys (RoFormer's rotary positions, where that bias trains). The Sdpa classes
    # are transformers 4's.
    zero_gradient_keys: dict[str, str] = dataclasses.field(default_factory=dict)
    # Fusable layers: their class names, and where their parts live (the spec's type picks the fused layer).
    layer_classes: tuple[str, ...] = ()
    layer: EncoderLayerSpec | PreNormGluLayerSpec | None = None
    # Modules holding the fusable layers (a ModuleList ``layer``; ModernBERT's model: ``layers``); they run the
    # stack unpadded.
    encoder_classes: tuple[str, ...] = ()
    # Task models whose head reads only the first token of the last layer (the classification shortcut).
    first_token_heads: tuple[str, ...] = ()
    # Whether, given a task model's config, its first_token_heads read only the first token (checked at every
    # forward); None: always. ModernBERT's head pools the first token only with classifier_pooling="cls".
    first_token_condition: Callable[[Any], bool] | None = None
    # Embedding modules that number positions from padding_idx + 1 (RoBERTa); position ids that start at 0, as
    # Hugging Face's DataCollatorWithFlattening writes them, are shifted by that much.
    offset_position_embeddings: tuple[str, ...] = ()


def _pools_cls_token(config: Any) -> bool:
    """ModernBERT's sequence classifier reads only the first token with ``classifier_pooling="cls"``; with
    "mean" it averages every token."""
    return getattr(config, "classifier_pooling", None) == "cls"


FAMILIES = (
    Family(
        name="bert",  # post-LayerNorm BERT and the encoders built on its code
        subset=("attention.self.query", "intermediate.dense"),
        # Cross-attention too (decoders, add_cross_attention): each query's scores over the encoder's keys.
        zero_gradient_keys={f"{model}{kind}Attention": "key" for kind in ("Self", "SdpaSelf", "Cross") for model in (
            "Bert", "Roberta", "XLMRoberta", "Camembert", "Electra", "Data2VecText", "LayoutLM", "Ernie",
            # BERT's attention, not its layers (Big Bird: also its block-sparse attention, a softmax over a subset
            # of the keys; ESM: only with absolute positions, not its pretrained models' rotary ones)
            "MegatronBert", "XLMRobertaXL", "ConvBert", "Xmod", "RobertaPreLayerNorm", "RoCBert", "BertGeneration",
            "RemBert", "Tapas", "MarkupLM", "MobileBert", "BigBird", "Esm", "Nystromformer")}
        | {"BigBirdBlockSparseAttention": "key", "LongformerSelfAttention": "key"},
        layer_classes=(
            "BertLayer", "RobertaLayer", "XLMRobertaLayer", "CamembertLayer", "ElectraLayer", "Data2VecTextLayer",
            "LayoutLMLayer", "ErnieLayer",
        ),
        layer=BERT_LAYER,
        encoder_classes=(
            "BertEncoder", "RobertaEncoder", "XLMRobertaEncoder", "CamembertEncoder", "ElectraEncoder",
            "Data2VecTextEncoder", "LayoutLMEncoder", "ErnieEncoder",
        ),
        first_token_heads=(
            "BertForSequenceClassification", "RobertaForSequenceClassification",
            "XLMRobertaForSequenceClassification", "CamembertForSequenceClassification",
            "ElectraForSequenceClassification", "Data2VecTextForSequenceClassification",
            "ErnieForSequenceClassification",
        ),
        offset_position_embeddings=(
            "RobertaEmbeddings", "XLMRobertaEmbeddings", "CamembertEmbeddings", "Data2VecTextEmbeddings",
        ),
    ),
    Family(name="distilbert", subset=("attention.q_lin", "ffn.lin1"),
           zero_gradient_keys=dict.fromkeys(("DistilBertSelfAttention", "MultiHeadSelfAttention",
                                             "DistilBertSdpaAttention", "DistilBertFlashAttention2"), "k_lin"),
           layer_classes=("TransformerBlock",), layer=DISTILBERT_LAYER, encoder_classes=("Transformer",),
           first_token_heads=("DistilBertForSequenceClassification",)),
    Family(name="albert", subset=("attention.query", "ffn"),
           zero_gradient_keys=dict.fromkeys(("AlbertAttention", "AlbertSdpaAttention"), "key")),
    # Relative positions enter DeBERTa's scores through the keys (position-to-content): no zero-gradient key bias.
    Family(name="deberta", subset=("attention.self.q_bias", "intermediate.dense")),
    Family(name="deberta-v2", subset=("attention.self.query_proj", "intermediate.dense")),  # and DeBERTa-v3
    # MPNet adds its relative position bias to the scores, outside the keys.
    Family(name="mpnet", subset=("attention.attn.q", "intermediate.dense"),
           zero_gradient_keys={"MPNetSelfAttention": "k"}),
    # XLM and FlauBERT (XLM's attention, copied); their attention's class name is too common to go bare (CTRL's).
    Family(name="xlm", subset=("attentions.*.q_lin", "ffns.*.lin1"),
           zero_gradient_keys=dict.fromkeys((f"transformers.models.{model}.modeling_{model}.MultiHeadAttention"
                                             for model in ("xlm", "flaubert")), "k_lin")),
    # Funnel's relative positions and token types enter its scores beside the queries, never the keys. Its query
    # projection has no bias (three of its own, r_w/r_r/r_s_bias, go beside q into each kind of score): no subset.
    Family(name="funnel", subset=None, zero_gradient_keys={"FunnelRelMultiheadAttention": "k_head"}),
    # T5's encoders (bias-free: apply() adds their biases) add relative positions to the scores, never to the keys.
    Family(name="t5", subset=None, zero_gradient_keys=dict.fromkeys(("T5Attention", "MT5Attention", "UMT5Attention"),
                                                                    "k")),
    # q, k and v packed in Wqkv (only the query rows train, see model.QueryRowsBitFitLinear) and the GLU
    # up-projection Wi (input and gate halves). Rotary positions enter through the keys: no zero-gradient key bias.
    Family(name="modernbert", subset=("attn.Wqkv", "mlp.Wi"), packed_qkv=("attn.Wqkv",),
           layer_classes=("ModernBertEncoderLayer",), layer=MODERNBERT_LAYER, encoder_classes=("ModernBertModel",),
           first_token_heads=("ModernBertForSequenceClassification",), first_token_condition=_pools_cls_token),
)


def _union(field: str) -> tuple[str, ...]:
    return tuple(value for family in FAMILIES for value in getattr(family, field))


SUBSET_QUERY_PATTERNS = tuple(dict.fromkeys(family.subset[0] for family in FAMILIES if family.subset))
SUBSET_INTERMEDIATE_PATTERNS = tuple(dict.fromkeys(family.subset[1] for family in FAMILIES if family.subset))
SUBSET_PATTERNS = SUBSET_QUERY_PATTERNS + SUBSET_INTERMEDIATE_PATTERNS
PACKED_QKV_PATTERNS = _union("packed_qkv")
ZERO_GRADIENT_KEYS = {name: key for family in FAMILIES for name, key in family.zero_gradient_keys.items()}
FIRST_TOKEN_HEADS = frozenset(_union("first_token_heads"))
OFFSET_POSITION_EMBEDDINGS = frozenset(_union("offset_position_embeddings"))


def layer_spec(layer_class: str) -> EncoderLayerSpec | PreNormGluLayerSpec | None:
    """The fusable-layer spec of a layer class name, or None."""
    return next((f.layer for f in FAMILIES if layer_class in f.layer_classes), None)


def reads_first_token_only(model_class: str, config: Any) -> bool:
    """Whether a task model of class ``model_class`` with ``config`` has a head that reads only each sequence's
    first token of the last layer: a family's ``first_token_heads``, under its ``first_token_condition``."""
    family = next((f for f in FAMILIES if model_class in f.first_token_heads), None)
    return family is not None and (family.first_token_condition is None or family.first_token_condition(config))


def reads_padding(model_class: str) -> bool:
    """Whether a task model's loss reads the padding positions of the last layer: question answering, whose
    start and end losses are a softmax over every position (Hugging Face's heads; its values there count)."""
    return model_class.endswith("ForQuestionAnswering")


def is_fusable_encoder_class(encoder_class: str) -> bool:
    """Whether a class name is a registered family's encoder, whose fused layers can run as one unpadded stack."""
    return encoder_class in _union("encoder_classes")
