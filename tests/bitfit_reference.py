"""The reference every test compares with: plain PyTorch BitFit on the same Hugging Face model."""

import copy

import torch
from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton on CPU runs under the interpreter; "auto" would pick torch there, so the Triton backend is named.
BACKENDS = ["torch", "triton"]

# Hidden 36 over 3 heads (head dim 12) and intermediate 52: nothing is a power of two.
TINY = dict(vocab_size=97, hidden_size=36, num_hidden_layers=2, num_attention_heads=3, intermediate_size=52,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)


def tiny_bert(num_labels: int = 3, **overrides) -> BertForSequenceClassification:
    config = BertConfig(**{**TINY, "max_position_embeddings": 64, **overrides}, num_labels=num_labels)
    return BertForSequenceClassification(config).to(DEVICE)


def tiny_roberta(num_labels: int = 3, **overrides) -> RobertaForSequenceClassification:
    config = RobertaConfig(**{**TINY, "max_position_embeddings": 72, "pad_token_id": 1, **overrides},
                           num_labels=num_labels)
    return RobertaForSequenceClassification(config).to(DEVICE)


MODELS = {"bert": tiny_bert, "roberta": tiny_roberta}


def padded_batch(model, lengths=(7, 3, 5), num_labels: int = 3) -> dict:
    """Fresh random token ids, right-padded to the longest length, with the attention mask and labels."""
    config = model.config
    seq = max(lengths)
    input_ids = torch.randint(3, config.vocab_size, (len(lengths), seq), device=DEVICE)
    mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    input_ids = input_ids.masked_fill(mask == 0, config.pad_token_id)
    labels = torch.randint(0, num_labels, (len(lengths),), device=DEVICE)
    return dict(input_ids=input_ids, attention_mask=mask, labels=labels)


def reference_bitfit(model, head=("classifier",)):
    """A deep copy with every parameter frozen except the biases and the head: BitFit in plain PyTorch."""
    ref = copy.deepcopy(model)
    for name, param in ref.named_parameters():
        param.requires_grad_(name.endswith("bias") or name.split(".")[0] in head)
    return ref


def trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def adamw_steps(model, batches, lr=1e-3):
    """Train with the paper's optimizer (AdamW, clipping 1.0); returns the losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for batch in batches:
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], 1.0)
        opt.step()
        losses.append(loss.item())
    return losses
