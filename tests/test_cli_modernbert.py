"""`bitfit-fast train --model DIR` on a bias-free ModernBERT checkpoint, with the commands a BERT user runs: the
trainer adds zero biases, trains them through the fused ModernBERT layers, `eval` / `predict` put them back on the
bias-free base exactly, and `export` writes a model whose config declares them, so transformers alone reloads it."""

import json

import pytest
import torch
import transformers
from test_cli import exported_probabilities
from test_trainer import WORDS, save_tiny_bert, write_csv

import bitfit_fast
from bitfit_fast import cli


def save_tiny_modernbert(root) -> str:
    """A bias-free ModernBERT saved like a hub checkpoint, with the tiny BERT's WordPiece tokenizer."""
    save_tiny_bert(root, dropout=0.0)  # for its tokenizer files; the model and config are replaced below
    tokenizer = transformers.AutoTokenizer.from_pretrained(root)
    config = transformers.ModernBertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=128, local_attention=8, pad_token_id=tokenizer.pad_token_id,
        cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id, bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id, initializer_range=0.5)  # frozen random weights that carry the words
    assert not (config.attention_bias or config.mlp_bias or config.norm_bias), "a bias-free encoder"
    torch.manual_seed(0)
    transformers.ModernBertModel(config).save_pretrained(root)
    return str(root)


def test_train_eval_and_predict_a_bias_free_modernbert_checkpoint(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    model_dir = save_tiny_modernbert(tmp_path / "model")
    train_file, validation_file = write_csv(tmp_path / "train.csv", 48, 1), write_csv(tmp_path / "val.csv", 24, 2)
    out = tmp_path / "run"
    assert cli.main(["train", "--model", model_dir, "--train-file", train_file, "--validation-file", validation_file,
                     "--epochs", "6", "--batch-size", "8", "--lr", "1e-2", "--no-progress",
                     "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "bitfit_fast: added zero biases to" in printed and "ModernBertForSequenceClassification" in printed
    summary = json.loads((out / "run_summary.json").read_text())
    # It learns: from ln 3 (1.10) the training loss falls near 0; 48 examples of random frozen features generalise
    # less, but above chance (1/3).
    assert summary["final_train_loss"] < 0.5 and summary["best"]["value"] > 0.4, summary

    # The saved bias set holds the added encoder biases, trained.
    base = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(WORDS))
    capsys.readouterr()
    bitfit_fast.load_biases(base, out / "biases")
    assert capsys.readouterr().out == "", "restored biases are not announced as new zero ones"
    added = base.bitfit_fast_state.added_biases
    assert "model.layers.1.attn.Wqkv" in added and "model.layers.0.mlp.Wi" in added
    assert all(base.get_submodule(name).bias.abs().max() > 0 for name in added if name.startswith("model.layers"))
    assert type(base.model.layers[0]).__name__ == "FusedModernBertEncoderLayer"

    assert cli.main(["eval", str(out)]) == 0
    assert f"validation accuracy {summary['best']['value']:.4f}" in capsys.readouterr().out, "biases/: the best epoch"
    assert cli.main(["predict", str(out), "--text", "goal match team coach"]) == 0
    answer = json.loads(capsys.readouterr().out)  # stdout holds the JSON line only: it pipes into other tools
    assert answer["label"] in WORDS and abs(sum(answer["probabilities"].values()) - 1) < 1e-5

    exported = tmp_path / "exported"
    assert cli.main(["export", str(out), str(exported)]) == 0
    config = json.loads((exported / "config.json").read_text())
    assert config["attention_bias"] and config["mlp_bias"] and config["norm_bias"], "the added biases, declared"
    [probabilities] = exported_probabilities(exported, [["goal match team coach"]])
    assert probabilities == pytest.approx(answer["probabilities"], abs=1e-6)
