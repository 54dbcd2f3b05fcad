"""`bitfit-fast train` on a tiny local model and CSV data: outputs, exact resume, NaN stop, bad data, DDP."""

import csv
import errno
import functools
import io
import json
import os
import random
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers

from bitfit_fast import BitFitConfig, cli, serve
from bitfit_fast.checkpoint import RUN_CONFIG_NAME
from bitfit_fast.errors import UserError
from bitfit_fast.train import (
    CHECKPOINT_NAME,
    Dist,
    TrainConfig,
    TrainingDiverged,
    data,
    evaluation,
    loop,
    lr_sweep,
    plots,
    run,
    sweep,
    train,
)

WORDS = {"sport": ["goal", "match", "team", "coach"], "money": ["bank", "market", "price", "profit"],
         "tech": ["phone", "chip", "software", "robot"]}
FILLER = ["the", "a", "today", "new", "big", "said", "and", "with"]


def save_tiny_bert(root, dropout: float) -> str:
    """A tiny BERT with a WordPiece tokenizer over the words of the data, saved like a hub checkpoint."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + FILLER + [w for ws in WORDS.values() for w in ws]
    # transformers 5 ignores vocab_file= (the tokenizer would know its special tokens only, every word [UNK]).
    transformers.BertTokenizer(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(root)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=128, hidden_dropout_prob=dropout,
                                     attention_probs_dropout_prob=0.0)
    transformers.BertModel(config, add_pooling_layer=False).save_pretrained(root)  # no pooler: new, like MiniLM's
    return str(root)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), dropout=0.1)


@pytest.fixture(scope="module")
def model_dir_no_dropout(tmp_path_factory):
    """For comparisons across batch layouts and processes, where dropout draws necessarily differ."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert-no-dropout"), dropout=0.0)


def topic_texts(n, seed, labels=tuple(WORDS)):
    """(text, topic) pairs: filler words with two words of the topic, cycling through the topics."""
    rng = random.Random(seed)
    for i in range(n):
        label = labels[i % len(labels)]
        words = rng.choices(FILLER, k=rng.randint(2, 9)) + rng.choices(WORDS[label], k=2)
        rng.shuffle(words)
        yield " ".join(words), label


def write_csv(path, n, seed, labels=tuple(WORDS), score=False):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i, (text, label) in enumerate(topic_texts(n, seed, labels)):
            writer.writerow([text, float(i % 3) if score else label])
    return str(path)


@pytest.fixture()
def files(tmp_path):
    return dict(train_file=write_csv(tmp_path / "train.csv", 48, 1),
                validation_file=write_csv(tmp_path / "val.csv", 24, 2))


def config(model_dir, files, tmp_path, **overrides):
    base = dict(model=model_dir, epochs=2, batch_size=8, output_dir=str(tmp_path / "run"), progress=False,
                bitfit=BitFitConfig(backend="torch"), **files)
    return TrainConfig(**{**base, **overrides})


def trained_params(out_dir):
    return torch.load(os.path.join(out_dir, CHECKPOINT_NAME), weights_only=False)["trainable"]


def test_training_reports_metrics_and_writes_every_output(model_dir, files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the precision auto resolves to on a CPU
    summary = train(config(model_dir, files, tmp_path, epochs=3))
    out = tmp_path / "run"
    for name in ["biases/bitfit_biases.safetensors", "run_summary.json", "learning_curves.png", "checkpoint.pt",
                 "run_config.json"]:
        assert (out / name).is_file(), name
    assert [e["epoch"] for e in summary["epochs"]] == [1, 2, 3]
    assert json.loads((out / "run_config.json").read_text())["config"]["precision"] == "fp32", "auto, resolved"
    assert summary["best"]["metric"] == "accuracy" and 0 <= summary["best"]["value"] <= 1
    assert summary["learning_rate"] == 1e-3 and summary["padding_waste"] > 0
    assert (summary["micro_batch_size"], summary["backend"]) == (8, "torch"), "what ran, not the options' defaults"
    assert "bert.pooler.dense.weight" in trained_params(out), "the new pooler trains with the head"
    printed = capsys.readouterr().out
    assert "train / 24 validation examples" in printed and "epoch 3: validation accuracy" in printed

    scores = serve.evaluate_checkpoints([str(out)])[str(out)]
    assert scores["validation"]["accuracy"] == pytest.approx(summary["best"]["value"]), "biases/: the best epoch"
    rows = serve.predict(str(out), texts=[("goal match team",), ("bank price profit market",)])
    assert [list(r) for r in rows] == [["text", "label", "probabilities"]] * 2 and rows[0]["label"] in WORDS

    capsys.readouterr()
    assert cli.main(["eval", str(out)]) == 0
    assert f"{out}: validation accuracy {scores['validation']['accuracy']:.4f} (24 examples)" in capsys.readouterr().out
    assert cli.main(["predict", str(out), "--text", "goal match team"]) == 0
    assert json.loads(capsys.readouterr().out.strip())["label"] == rows[0]["label"]


def test_biases_hold_the_best_epoch_and_biases_last_the_last(model_dir, files, tmp_path, monkeypatch):
    """Scripted validation scores (epoch 2 best): biases/ must equal the parameters at the end of epoch 2."""
    scores = iter([0.5, 0.9, 0.7])
    monkeypatch.setattr(loop, "evaluate", lambda *args, **kwargs: {"accuracy": next(scores)})
    at_epoch_end = {}
    save_checkpoint = loop.save_checkpoint

    def remember(path, model, optimizer, scaler, position, history, d, progress):
        save_checkpoint(path, model, optimizer, scaler, position, history, d, progress)
        at_epoch_end[position["epoch"]] = {n: p.detach().clone() for n, p in model.named_parameters()
                                           if p.requires_grad}

    monkeypatch.setattr(loop, "save_checkpoint", remember)
    summary = train(config(model_dir, files, tmp_path, epochs=3), log=lambda *_: None)
    assert summary["best"]["epoch"] == 2 and summary["saved_biases"] == {"biases": 2, "biases-last": 3}
    out = tmp_path / "run"
    for directory, epoch in (("biases", 2), ("biases-last", 3)):
        saved = safetensors.torch.load_file(out / directory / "bitfit_biases.safetensors")
        assert saved.keys() == at_epoch_end[epoch].keys()
        for name, tensor in saved.items():
            assert torch.equal(tensor, at_epoch_end[epoch][name]), (directory, name)
    assert not torch.equal(at_epoch_end[2]["classifier.bias"], at_epoch_end[3]["classifier.bias"])


def test_the_best_epoch_is_the_first_of_equal_scores_on_the_first_split():
    history = [dict(epoch=1, validation={"matched": {"accuracy": 0.9}, "mismatched": {"accuracy": 0.5}}),
               dict(epoch=2, validation={"matched": {"accuracy": 0.9}, "mismatched": {"accuracy": 0.8}}),
               dict(epoch=3, validation={"matched": {"accuracy": float("nan")}, "mismatched": {"accuracy": 0.9}})]
    assert evaluation.best_evaluation(history, "matched", "accuracy")["epoch"] == 1
    assert evaluation.best_evaluation(history, "mismatched", "accuracy")["epoch"] == 3


def test_every_step_clips_at_max_grad_norm_and_the_summary_ends_on_the_last_loss(model_dir, files, tmp_path,
                                                                                monkeypatch):
    clipped, ends = [], []
    clip = torch.nn.utils.clip_grad_norm_

    def recording(params, max_norm, *args, **kwargs):
        clipped.append(max_norm)
        return clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    summary = train(config(model_dir, files, tmp_path, epochs=1, max_grad_norm=0.25), log=lambda *_: None,
                    on_step_end=[ends.append])
    assert clipped == [0.25] * len(ends) == [0.25] * 6  # 48 examples in batches of 8
    assert summary["final_train_loss"] == ends[-1].loss


@pytest.mark.parametrize("examples", [1, 7, 8, 50, 801])
def test_an_epochs_batches_hold_every_example_once(examples):
    """A seeded shuffle, length-sorted windows of 50 batches (801 examples in batches of 8: three windows, the last
    one short), the last batch short: every example once, batches of similar lengths."""
    lengths = [(i * 37) % 23 + 1 for i in range(examples)]
    for epoch in (0, 1):
        batches = data.length_grouped_batches(lengths, 8, seed=3, epoch=epoch)
        assert sorted(i for batch in batches for i in batch) == list(range(examples))
        assert all(0 < len(batch) <= 8 for batch in batches) and len(batches) == -(-examples // 8)
        assert batches == data.length_grouped_batches(lengths, 8, seed=3, epoch=epoch)
    if examples >= 50:
        spread = [max(lengths[i] for i in batch) - min(lengths[i] for i in batch) for batch in batches]
        assert sorted(spread)[len(spread) // 2] <= (max(lengths) - min(lengths)) / 4, "a batch holds similar lengths"


def test_encode_truncates_the_end_and_collate_pads_and_masks(model_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    texts = data.Split([("goal match team bank price chip robot phone",), ("goal",)], [0.0, 1.0])
    encoded = data.encode(texts, tokenizer, max_length=5)
    full = tokenizer(texts.texts[0][0])["input_ids"]
    assert encoded.input_ids[0] == full[:4] + [tokenizer.sep_token_id]  # [CLS] and the first words kept
    batch = data.collate(encoded, [1, 0], pad_id=7, regression=False)
    assert batch["attention_mask"].sum(1).tolist() == [len(encoded.input_ids[1]), 5]
    assert batch["input_ids"][0, len(encoded.input_ids[1]):].eq(7).all()
    assert batch["input_ids"][1].tolist() == encoded.input_ids[0] and batch["labels"].tolist() == [1, 0]


def test_labels_of_a_file_map_to_the_trained_class_ids(tmp_path):
    """Class names sorted as numbers where they are numbers (2 before 10), and another file's labels mapped by name
    to the ids the run trained with."""
    train_file, other = tmp_path / "t.csv", tmp_path / "v.csv"
    train_file.write_text("text,label\na,10\nb,2\nc,10\n")
    other.write_text("text,label\nd,2\ne,10\n")
    task = data.load_local(str(train_file), str(other), ("text",), "label")
    assert task.label_names == ["2", "10"] and task.train.labels == [1, 0, 1]
    assert data.load_labeled(str(other), ("text",), "label", task.label_names).labels == [0, 1]
    # Names that look like integers to str.isdigit but are none ("²", "--1") sort as text, after the numbers.
    train_file.write_text("text,label\na,²\nb,--1\nc,-3\n")
    other.write_text("text,label\nd,²\n")
    assert data.load_local(str(train_file), str(other), ("text",), "label").label_names == ["-3", "--1", "²"]


def test_a_sweep_reports_the_run_with_the_best_score(model_dir, files, tmp_path, monkeypatch):
    scores = {1e-4: 0.4, 4e-4: 0.9, 7e-4: 0.6}
    monkeypatch.setattr(lr_sweep, "train", lambda run, log: dict(best=dict(value=scores[run.learning_rate],
                                                                           metric="accuracy")))
    record = sweep(config(model_dir, files, tmp_path, epochs=1), grid=tuple(scores), log=lambda *_: None)
    assert record["best"]["learning_rate"] == 4e-4
    # Under torchrun every process sweeps; the main one alone says what it found and writes the summary.
    (tmp_path / "run" / "sweep_summary.json").unlink()
    said = []
    monkeypatch.setattr(lr_sweep, "setup_distributed", lambda: Dist(rank=1, world=2))
    monkeypatch.setattr(lr_sweep, "barrier", lambda d: None)
    assert sweep(config(model_dir, files, tmp_path, epochs=1), grid=tuple(scores), log=said.append) == record
    assert said == [] and not (tmp_path / "run" / "sweep_summary.json").exists()


def test_a_regression_run_predicts_scores(model_dir, tmp_path):
    files = dict(train_file=write_csv(tmp_path / "t.csv", 16, 1, score=True),
                 validation_file=write_csv(tmp_path / "v.csv", 8, 2, score=True))
    steps = []
    train(config(model_dir, files, tmp_path, epochs=1, regression=True), log=lambda *_: None,
          on_step_end=[steps.append])
    assert [(s.step, s.epoch, s.batch, s.checkpointed) for s in steps] == [(1, 1, 1, False), (2, 1, 2, False)]
    assert all(isinstance(s.loss, float) for s in steps)
    texts = tmp_path / "texts.csv"
    texts.write_text("text\ngoal match\nbank price\n")
    rows = serve.predict(str(tmp_path / "run"), input_file=str(texts))
    assert [r["text"] for r in rows] == ["goal match", "bank price"]
    assert all(list(r) == ["text", "score"] and isinstance(r["score"], float) for r in rows)


def test_a_checkpoint_that_fails_to_write_keeps_the_last_one(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    optimizer, scaler = torch.optim.AdamW(model.parameters()), torch.amp.GradScaler("cpu", enabled=False)
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint = functools.partial(run.save_checkpoint, path, model, optimizer, scaler, history=[], d=Dist(),
                                        progress=run.Progress({}, 1, {}, 0.0))
    save_checkpoint(position=dict(epoch=0, batch=2, step=2))
    saved = path.read_bytes()

    def torn(obj, file):  # torch.save writes through the open temporary file
        file.write(b"torn")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(position=dict(epoch=0, batch=4, step=4))
    assert path.read_bytes() == saved and [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]


def test_smoothing_averages_exactly_window_values():
    assert plots.moving_average([1.0, 2.0, 3.0, 4.0, 5.0], 2) == [1.0, 1.5, 2.5, 3.5, 4.5]
    assert plots.moving_average([3.0, 6.0, 9.0], 1) == [3.0, 6.0, 9.0]
    assert plots.moving_average([0.0, 3.0, 6.0, 9.0], 3) == [0.0, 1.5, 3.0, 6.0]


def test_micro_batches_give_the_big_batch_result(model_dir_no_dropout, files, tmp_path):
    runs = {}
    for micro in (8, 3):
        out = tmp_path / f"micro{micro}"
        train(config(model_dir_no_dropout, files, tmp_path, epochs=1, micro_batch_size=micro,
                             output_dir=str(out), seed=3), log=lambda *_: None)
        runs[micro] = trained_params(out)
    for name, tensor in runs[8].items():
        torch.testing.assert_close(runs[3][name], tensor, atol=2e-6, rtol=1e-5, msg=name)


# `bitfit-fast train ARGS` in a process that SIGKILLs itself after step 5: killed mid-epoch, as by the OOM killer.
KILLED_AFTER_STEP_5 = """
import os, signal, sys
from bitfit_fast import cli, train

def kill_after_step_5(end):
    if end.step == 5:
        os.kill(os.getpid(), signal.SIGKILL)

train.train(cli.train_config(cli.build_parser().parse_args(sys.argv[1:])), on_step_end=[kill_after_step_5])
"""


def _cli_train(model_dir, files, out, *extra, killed_after_step_5=False):
    program = ["-c", KILLED_AFTER_STEP_5] if killed_after_step_5 else ["-m", "bitfit_fast.cli"]
    args = [sys.executable, *program, "train", "--model", model_dir, "--train-file", files["train_file"],
            "--validation-file", files["validation_file"], "--epochs", "2", "--batch-size", "8", "--output-dir",
            str(out), "--backend", "torch", "--no-progress", *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


def test_a_run_killed_mid_epoch_resumes_to_the_same_parameters(model_dir, files, tmp_path):
    straight = _cli_train(model_dir, files, tmp_path / "straight", "--save-every", "2")
    assert straight.returncode == 0, straight.stderr
    killed = _cli_train(model_dir, files, tmp_path / "killed", "--save-every", "2", killed_after_step_5=True)
    assert killed.returncode == -9, "the process was SIGKILLed after step 5 (checkpoint of step 4 on disk)"
    assert torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)["position"]["step"] == 4
    assert (tmp_path / "killed" / run.LOCK_NAME).exists(), "SIGKILL left the lock file, its lock dropped"
    (tmp_path / "killed" / ".checkpoint.tmp-99999.pt").write_bytes(b"cut")  # as a kill mid-save leaves
    resumed = _cli_train(model_dir, files, tmp_path / "killed", "--save-every", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert (f"note: .checkpoint.tmp-99999.pt in {tmp_path / 'killed'} is what a save killed before its rename left; "
            "delete it") in resumed.stdout
    assert not (tmp_path / "killed" / run.LOCK_NAME).exists()
    expected, got = trained_params(tmp_path / "straight"), trained_params(tmp_path / "killed")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


class Stopped(Exception):
    """Ends a run from an on_step_end callback, as a kill would (its checkpoint stays as written)."""


def stop_after(step: int):
    def stop(end):
        if end.step == step:
            raise Stopped
    return stop


def test_a_resume_keeps_the_runs_micro_batches_and_counts_and_ends_as_the_run_straight(model_dir, files, tmp_path):
    """Dropout's masks follow the micro-batches' shapes: a resume that names no --micro-batch-size splits as the
    run did (on a GPU the search could find another size) and ends bit-identical. Its summary counts the tokens
    of the whole run, not only of the process that resumed it."""
    straight = train(config(model_dir, files, tmp_path, micro_batch_size=3, save_every=2, output_dir=str(
        tmp_path / "straight")), log=lambda *_: None)
    with pytest.raises(Stopped):
        train(config(model_dir, files, tmp_path, micro_batch_size=3, save_every=2), on_step_end=[stop_after(5)])
    resumed = train(config(model_dir, files, tmp_path, save_every=2, resume=True), log=lambda *_: None)
    expected, got = trained_params(tmp_path / "straight"), trained_params(tmp_path / "run")
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    for count in ("real_tokens", "padded_tokens", "padded_tokens_per_batch", "padding_waste"):
        assert resumed[count] == straight[count], count


def interrupt_summaries(monkeypatch):
    """From now on a run stops with KeyboardInterrupt where it would write its summary; returns the real summarize,
    to put back."""
    summarize = loop.summarize

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "summarize", interrupted)
    return summarize


def test_a_run_stopped_after_its_last_checkpoint_finishes_with_resume(model_dir, files, tmp_path, monkeypatch):
    """Stopped (Ctrl-C, a full disk) between its last epoch's checkpoint and its summary: --resume trains nothing
    and writes what the run had left, from the checkpoint's parameters."""
    summarize = interrupt_summaries(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(config(model_dir, files, tmp_path, epochs=1))
    out = tmp_path / "run"
    assert sorted(path.name for path in out.iterdir()) == ["biases", "checkpoint.pt", "run_config.json"]
    monkeypatch.setattr(loop, "summarize", summarize)
    said = []
    summary = train(config(model_dir, files, tmp_path, epochs=1, resume=True), log=said.append)
    assert "its 1 epochs are trained; writing what it has left" in said[-2]
    assert [e["epoch"] for e in summary["epochs"]] == [1] and (out / "run_summary.json").is_file()
    last = safetensors.torch.load_file(out / "biases-last" / "bitfit_biases.safetensors")
    checkpoint = trained_params(out)
    assert last and all(torch.equal(tensor, checkpoint[name]) for name, tensor in last.items())
    with pytest.raises(UserError, match="has finished its 1 epochs"):  # now finished: nothing to continue
        train(config(model_dir, files, tmp_path, epochs=1, resume=True))


def test_a_run_trained_further_and_stopped_before_its_new_summary_finishes(model_dir, files, tmp_path, monkeypatch):
    """Its summary is of fewer epochs than its checkpoint: the run is not finished, --resume writes the new one."""
    train(config(model_dir, files, tmp_path, epochs=1), log=lambda *_: None)
    summarize = interrupt_summaries(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(config(model_dir, files, tmp_path, epochs=2, resume=True), log=lambda *_: None)
    monkeypatch.setattr(loop, "summarize", summarize)
    summary = train(config(model_dir, files, tmp_path, epochs=2, resume=True), log=lambda *_: None)
    assert [e["epoch"] for e in summary["epochs"]] == [1, 2] and summary["saved_biases"]["biases-last"] == 2


def test_a_resume_with_fewer_epochs_than_the_run_is_into_is_refused(model_dir, files, tmp_path):
    """Checkpointed 2 batches into its third epoch: --epochs 2 would call a run half into epoch 3 finished."""
    with pytest.raises(Stopped):  # 6 batches an epoch: step 14 is epoch 3's second
        train(config(model_dir, files, tmp_path, epochs=3, save_every=2), on_step_end=[stop_after(14)])
    held = {path: path.read_bytes() for path in (tmp_path / "run").iterdir() if path.is_file()}
    with pytest.raises(UserError, match=r"is into epoch 3 already \(its checkpoint's\): pass --epochs 3 or more"):
        train(config(model_dir, files, tmp_path, epochs=2, save_every=2, resume=True))
    assert {path: path.read_bytes() for path in (tmp_path / "run").iterdir() if path.is_file()} == held


def test_a_resume_on_other_data_is_refused(model_dir, files, tmp_path):
    """Other examples of the same classes: the data position and the best epoch would mean nothing on them."""
    with pytest.raises(Stopped):
        train(config(model_dir, files, tmp_path, save_every=2), on_step_end=[stop_after(3)])
    run_files = {path: path.read_bytes() for path in (tmp_path / "run").iterdir()}
    originals = {name: open(file).read() for name, file in files.items()}
    for name, rows, seed, message in [
        ("train_file", 48, 7, r"the training data is not what .* \(the same 48 examples, but other texts, labels, "
                              r"order or tokenization\)"),
        ("train_file", 50, 1, r"the training data is not what .* \(50 examples now, 48 then\): give the run's data "
                              r"as it was"),
        ("validation_file", 24, 5, r"the validation data is not what"),
    ]:
        write_csv(files[name], rows, seed)
        with pytest.raises(UserError, match=message):
            train(config(model_dir, files, tmp_path, save_every=2, resume=True))
        assert {path: path.read_bytes() for path in (tmp_path / "run").iterdir()} == run_files
        with open(files[name], "w") as file:
            file.write(originals[name])
    assert train(config(model_dir, files, tmp_path, save_every=2, resume=True), log=lambda *_: None)["epochs"]


def test_the_micro_batch_search_leaves_the_generators_as_they_were(model_dir, files, tmp_path):
    """A run whose micro-batch size was found draws the dropout masks it would with that size given."""
    train_config = config(model_dir, files, tmp_path)
    model, tokenizer = loop.build_model(train_config, 3, list(WORDS), model_dir)
    encoded = data.encode(data.load_local(files["train_file"], files["validation_file"], ("text",), "label",
                                          False).train, tokenizer, 32)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    assert loop.find_micro_batch(model.train(), encoded, train_config, Dist(), 0, 8) == 8
    assert torch.equal(torch.get_rng_state(), before)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a GPU's micro-batch search collates a batch
    files = dict(train_file=write_csv(tmp_path / "t.csv", 48, 1, score=True),
                 validation_file=write_csv(tmp_path / "v.csv", 12, 2, score=True))
    calls = {"n": 0}
    collate = data.collate

    def poisoned(encoded, indices, pad_id, regression):
        batch = collate(encoded, indices, pad_id, regression)
        calls["n"] += 1
        if calls["n"] == 4:  # the fourth training batch
            batch["labels"][0] = float("inf")
        return batch

    monkeypatch.setattr(data, "collate", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf) at step 4 .*checkpoint.pt, is kept"):
        train(config(model_dir, files, tmp_path, regression=True, save_every=1))
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["position"]["step"] == 3
    assert all(torch.isfinite(t).all() for t in state["trainable"].values())

    # In micro-batches, the poisoned first piece of the batch counts too, not only the last piece's loss.
    calls["n"] = 3  # poisoned's next call, the first piece (3 of 8 examples) of the first batch, gets the inf
    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf) at step 1 "):
        train(config(model_dir, files, tmp_path / "micro", regression=True, micro_batch_size=3))


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: (p / "t.csv").write_text("body,label\nhello,a\n"), "has no column 'text'"),
        (lambda p: (p / "t.csv").write_text(""), "t.csv is empty"),
        (lambda p: (p / "t.csv").write_text("text,label\n"), "t.csv is empty: it needs a header and at least one row"),
        (lambda p: (p / "t.txt").write_text("x"), "unsupported format '.txt'"),
        (lambda p: (p / "t.csv").write_text("text,label\ngoal,sport\nmatch,sport\n"),
         "t.csv column 'label' has one class, 'sport': classification needs at least two"),
        (lambda p: (p / "t.csv").write_text("text,label\ngoal,sport\nprice,\nbank,money\n"),
         "t.csv example 2 has no label in column 'label': fill it in"),
        (lambda p: (p / "t.csv").write_text("text,label\ngoal,1\nprice,\nbank,0\n"),  # a blank in a number column
         "t.csv example 2 has no label in column 'label'"),
        (lambda p: (p / "t.jsonl").write_text('{"text": "goal", "label": "a"}\n{"text": "", "label": "b"}\n'),
         r"t.jsonl example 2 has an empty text in \['text'\]: fill it in, or remove it"),
        (lambda p: (p / "t.jsonl").write_text('{"text": "goal", "label": "a"}\n{"text": 5, "label": "b"}\n'),
         r"t.jsonl column 'text' holds 5 \(int\) in example 2, not a text: name the text columns with --text-columns; "
         r"texts that are numbers are written as strings \(JSON: \"12\"\)"),
        (lambda p: (p / "t.csv").write_text("text,label\ngoal,sport\nprice,money\nbank,mon"),  # a copy cut short
         r"t.csv ends mid-line, in a label no other row has \('mon' in column 'label'\): the file looks cut short"),
        (lambda p: (p / "t.csv").write_text("text,label\ngoal,sport\n  ,money\n"),
         r"t.csv example 2 has an empty text in \['text'\]"),
        (lambda p: (p / "t.jsonl").write_text('{"text": "goal", "label": "a"}\n{"text": "b, "label": "b"}\n'),
         r"t.jsonl could not be read as JSON: line 2 is not JSON \(Expecting ',' delimiter\); fix it"),
        (lambda p: (p / "t.json").write_text('[{"text": "goal", "label": "a"},\n {"text": "b", "label": }]\n'),
         r"t.json could not be read as JSON: line 2, column 25 is not JSON \(Expecting value\); fix it"),
    ],
)
def test_bad_data_fails_early_with_a_message_that_names_it(model_dir, tmp_path, make, message):
    make(tmp_path)
    train_file = str(next(p for p in tmp_path.iterdir() if p.name.startswith("t.")))
    valid = write_csv(tmp_path / "v.csv", 6, 0)
    with pytest.raises(data.DataError, match=message):
        train(config(model_dir, dict(train_file=train_file, validation_file=valid), tmp_path))
    assert not (tmp_path / "run").exists(), "a run that fails to start leaves no directory"


def test_a_disk_filling_up_while_a_checkpoint_is_written_is_the_oserror_it_is(monkeypatch):
    """torch's zip writer, whose buffered writes to a full disk fail as it closes, raises a RuntimeError ("unexpected
    pos ...") that hides the OSError: the CLI then printed a traceback for a full disk, not its one line."""

    class FillingUp(io.RawIOBase):  # a disk with room for 60 kB
        written = 0

        def writable(self):
            return True

        def write(self, data):
            if self.written + len(data) > 60_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(data)
            return len(data)

    monkeypatch.setattr(run, "open", lambda path, mode: io.BufferedWriter(FillingUp()), raising=False)
    with pytest.raises(OSError) as full:
        run._save({"t": torch.zeros(100_000)}, Path("checkpoint.pt"))
    assert full.value.errno == errno.ENOSPC


def test_a_run_resumed_on_a_base_model_of_other_weights_is_refused(model_dir, files, tmp_path):
    """The model at the run's --model path changed (a file replaced, a hub revision): the biases trained on the old
    weights would have trained on through the new ones, silently."""
    base = tmp_path / "base"
    shutil.copytree(model_dir, base)
    train(config(str(base), files, tmp_path, epochs=1))
    weights = base / "model.safetensors"
    tensors = safetensors.torch.load_file(weights)
    tensors["encoder.layer.1.attention.self.value.weight"] += 0.05
    safetensors.torch.save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(UserError, match=f"--resume: {tmp_path / 'run'} trained on another base model than this "
                                        "--model: its bert.encoder.layer.1.attention.self.value.weight holds other "
                                        "values; resume with the run's own base model"):
        train(config(str(base), files, tmp_path, epochs=2, resume=True))


def test_a_checkpoint_with_a_changed_byte_is_refused_not_resumed_from(tmp_path):
    """torch.load reads a flipped bit of a tensor as it is (a resume trained on from damaged values); the archive's
    checksums find it."""
    path = tmp_path / CHECKPOINT_NAME
    run._save({"trainable": {"bias": torch.arange(1000.0)}, "position": dict(epoch=1)}, path)
    assert torch.equal(run._read_state(path)["trainable"]["bias"], torch.arange(1000.0))
    with zipfile.ZipFile(path) as archive:
        part = next(info for info in archive.infolist() if info.filename.endswith("/data/0"))
    data = bytearray(path.read_bytes())
    header = 30 + int.from_bytes(data[part.header_offset + 26:part.header_offset + 28], "little") + \
        int.from_bytes(data[part.header_offset + 28:part.header_offset + 30], "little")
    data[part.header_offset + header + 401] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"{path} could not be read \\(its part {part.filename} fails its checksum\\): "
                                        "it is damaged"):
        run._read_state(path)


def test_a_run_in_progress_keeps_another_from_starting_or_continuing_there(model_dir, files, tmp_path, monkeypatch):
    """A command launched twice, or a job retried while it still runs: two runs in one directory once both trained,
    each overwriting the other's files. The run holds its directory locked from its checks to its end."""
    out = tmp_path / "run"
    with run.claimed(out):  # as a run in progress holds it
        for resume in (False, True):
            with pytest.raises(UserError, match=f"--output-dir {out} is in use: another bitfit-fast train is running "
                                                "there; wait for it to end, or choose another --output-dir"):
                train(config(model_dir, files, tmp_path, resume=resume))
        # A run that passed its checks just before the other took the directory: refused as it takes it.
        monkeypatch.setattr(run, "check_not_in_use", lambda out: None)
        with pytest.raises(UserError, match="is in use"):
            train(config(model_dir, files, tmp_path))
        monkeypatch.undo()
    assert not out.exists(), "the lock file is removed, and the directory it was made for"
    train(config(model_dir, files, tmp_path, epochs=1))
    assert (out / RUN_CONFIG_NAME).is_file() and not (out / run.LOCK_NAME).exists()


def test_a_lock_taken_on_the_file_its_last_holder_removed_as_it_ended_is_taken_again(tmp_path, monkeypatch):
    """A run removes its lock file (and the directory it made) as it ends: another that opened the file just before
    locked a removed file, and went on beside a third, or into a directory no longer there."""
    out = tmp_path / "run"
    lock, locked = run._lock, []

    def as_the_holder_ends(descriptor, where):
        if not locked:
            (out / run.LOCK_NAME).unlink()
            out.rmdir()
        locked.append(descriptor)
        lock(descriptor, where)

    monkeypatch.setattr(run, "_lock", as_the_holder_ends)
    with run.claimed(out):
        assert len(locked) == 2 and (out / run.LOCK_NAME).is_file(), "the file there now is locked"
        monkeypatch.undo()
        with pytest.raises(UserError, match="is in use"):
            run.check_not_in_use(out)
    assert not out.exists()


def test_the_lock_file_is_open_for_writing_as_nfs_locks_ask(tmp_path, monkeypatch):
    """NFS takes flock as a lock of the whole file, which it grants on a file open for writing only (EBADF, which
    was taken for a file system without locks: two runs trained on in one directory)."""
    real, modes = run.fcntl, []

    def flock(descriptor, operation):
        modes.append(real.fcntl(descriptor, real.F_GETFL) & os.O_ACCMODE)
        real.flock(descriptor, operation)

    monkeypatch.setattr(run, "fcntl", types.SimpleNamespace(flock=flock, LOCK_EX=real.LOCK_EX, LOCK_NB=real.LOCK_NB))
    with run.claimed(tmp_path / "run"):
        assert modes == [os.O_RDWR]


def test_an_output_dir_through_a_link_to_nowhere_is_refused_in_one_line(model_dir, files, tmp_path):
    """A symbolic link whose target was removed (scratch space cleaned): the claim's loop took it for a directory
    removed as soon as made, and tried again for ever."""
    link, loop = tmp_path / "scratch", tmp_path / "loop"
    link.symlink_to("removed")  # relative: named from the link's directory
    loop.symlink_to("loop")
    for out, named, target in ((link, link, tmp_path / "removed"), (link / "run", link, tmp_path / "removed"),
                               (loop, loop, loop)):
        with pytest.raises(UserError, match=f"--output-dir {out} cannot be created: {named} is a symbolic link to "
                                            f"{target}, which leads to no file or directory; point it at a directory, "
                                            "or choose another"):
            train(config(model_dir, files, tmp_path, epochs=1, output_dir=str(out)))
        with pytest.raises(OSError), run.claimed(out):
            pass
    assert not (tmp_path / "removed").exists()


def test_a_file_system_without_locks_trains_unlocked(model_dir, files, tmp_path, monkeypatch):
    def no_locks(descriptor, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run, "fcntl", types.SimpleNamespace(flock=no_locks, LOCK_EX=2, LOCK_NB=4))
    train(config(model_dir, files, tmp_path, epochs=1))
    assert (tmp_path / "run" / RUN_CONFIG_NAME).is_file() and not (tmp_path / "run" / run.LOCK_NAME).exists()


def test_a_csv_ending_mid_line_loads_where_its_last_label_is_one_another_row_has(tmp_path):
    """Only a last line without a newline ending in a label no other row has looks cut short: a whole file may end
    so, a file may end with a unique label and a newline, and a cut with the label before the text cuts a text."""
    valid = tmp_path / "v.csv"
    valid.write_text("text,label\ngoal,sport\n")
    for text in ("text,label\ngoal,sport\nprice,money\nbank,money", "text,label\ngoal,sport\nbank,mon\n",
                 'label,text\nsport,goal\nweather,"sunny, warm"'):
        (tmp_path / "t.csv").write_text(text)
        loaded = data.load_local(str(tmp_path / "t.csv"), str(valid), ("text",), "label")
        assert len(loaded.train.labels) == len(text.splitlines()) - 1


def test_regression_scores_all_one_value_are_refused_where_a_run_is_scored_on_them(tmp_path):
    # A regression run is scored by correlation, undefined against one value: every epoch would score 0 and tie.
    scores, same = tmp_path / "s.csv", tmp_path / "same.csv"
    scores.write_text("text,label\ngoal,0.25\nmatch,-1\n")
    same.write_text("text,label\ngoal,2\nmatch,2.0\n")
    refused = r"same.csv column 'label' holds one score, 2, in every row: .*; give rows whose scores differ"
    with pytest.raises(data.DataError, match=refused):
        data.load_local(str(scores), str(same), ("text",), "label", regression=True)
    with pytest.raises(data.DataError, match=refused):  # `eval --validation-file` of a regression run
        data.load_labeled(str(same), ("text",), "label", None)
    assert data.load_local(str(same), str(scores), ("text",), "label", regression=True).train.labels == [2.0, 2.0]
    assert data.load_labeled(str(scores), ("text",), "label", None).labels == [0.25, -1.0]


def test_a_csv_is_read_as_the_strings_it_holds(tmp_path):
    """Class labels as written (pandas would merge 1 and 1.0, turn 007 into 7 and NA or None into a missing
    label), texts that look like numbers as texts; a regression column's strings parse as scores."""
    rows = [("12", "1"), ("goal", "1.0"), ("0.5", "007"), ("match", "NA"), ("bank", "None"), ("price", "1")]
    train_file = tmp_path / "t.csv"
    train_file.write_text("text,label\n" + "".join(f"{text},{label}\n" for text, label in rows))
    task = data.load_local(str(train_file), str(train_file), ("text",), "label")
    assert sorted(task.label_names) == ["007", "1", "1.0", "NA", "None"]
    assert task.train.texts == [(text,) for text, _ in rows]
    assert [task.label_names[i] for i in task.train.labels] == [label for _, label in rows]
    scores = tmp_path / "s.csv"
    scores.write_text("text,label\ngoal,0.25\nmatch,-1\n")
    assert data.load_local(str(scores), str(scores), ("text",), "label", regression=True).train.labels == [0.25, -1.0]
    for mark in ("NaN", "NA", "inf", "None"):  # no score: refused, not fitted (NaN stopped training as a divergence)
        scores.write_text(f"text,label\ngoal,0.25\nmatch,{mark}\n")
        with pytest.raises(data.DataError, match=f"s.csv example 2 has no score in column 'label' \\('{mark}'\\)"):
            data.load_local(str(scores), str(scores), ("text",), "label", regression=True)
    # The header as pandas names its columns: a written index (empty name), a repeated name, a blank first line.
    for header, columns in ((",text,label", ["Unnamed: 0", "text", "label"]),
                            ("text,text,label", ["text", "text.1", "label"]),
                            ("\ntext,x,label", ["text", "x", "label"]),
                            (" \t\ntext,x,label", ["text", "x", "label"])):
        train_file.write_text(f"{header}\n" + "".join(f"{i},a b,{label}\n" for i, label in enumerate("xyx")))
        assert data.read_table(str(train_file)).column_names == columns
    # Labels are compared as written: 1.0 is another class than 1, and the message says so.
    train_file.write_text("text,label\na,0\nb,1\n")
    scores.write_text("text,label\na,1.0\n")
    with pytest.raises(data.DataError, match=r"labels are compared as written, and '1.0' is not '1': write them alike"):
        data.load_local(str(train_file), str(scores), ("text",), "label")


def test_unknown_validation_label_is_named_and_the_cli_exits_2(model_dir, tmp_path, capsys):
    train_file = write_csv(tmp_path / "t.csv", 12, 0, labels=("sport", "money"))
    valid = write_csv(tmp_path / "v.csv", 6, 0, labels=("sport", "tech"))
    code = cli.main(["train", "--model", model_dir, "--train-file", train_file, "--validation-file", valid,
                     "--output-dir", str(tmp_path / "o"), "--no-progress"])
    assert code == 2
    assert "has labels ['tech'] that the training data does not have" in capsys.readouterr().err


class _ScoreByLength(torch.nn.Module):
    """A model whose score is a function of each example's length: scores differ across a split sorted by length."""

    def forward(self, input_ids, attention_mask, labels=None, **batch):
        lengths = attention_mask.sum(1, keepdim=True).double()
        return types.SimpleNamespace(logits=torch.cat([lengths.sin(), lengths.cos()], 1))


@pytest.mark.parametrize("world", [2, 3])
def test_evaluation_shards_score_every_example_once_and_agree_with_one_process(world, monkeypatch):
    """Each rank's shard as torchrun's ranks score them (gather replaced by each rank's own shard): every example
    once, in the split's order, so the metrics equal one process's to the last bit; a shard scored twice fails."""
    lengths = [7, 3, 9, 3, 5, 12, 1, 8, 6, 2, 4, 11, 10]  # 13 examples: shards of batch 2 are uneven
    encoded = data.Encoded([list(range(1, n + 1)) for n in lengths], None, [float(i % 3) for i in range(13)])
    config = TrainConfig(regression=True)

    def shards(duplicate=False):
        recorded = {}

        def record(part, d):  # what the rank would send, before it waits for the others'
            recorded[d.rank] = part
            raise InterruptedError

        monkeypatch.setattr(evaluation, "gather", record)
        for rank in range(world):
            with pytest.raises(InterruptedError):
                evaluation.evaluate(_ScoreByLength(), encoded, config, ["pearson"], Dist(rank, world), 0, 2)
        parts = [recorded[rank] for rank in range(world)]
        return parts + parts[:1] if duplicate else parts

    one = evaluation.evaluate(_ScoreByLength(), encoded, config, ["pearson", "spearman"], Dist(), 0, 2)
    for duplicate in (False, True):
        gathered = shards(duplicate)
        monkeypatch.setattr(evaluation, "gather", lambda part, d, parts=gathered: parts)
        if duplicate:
            with pytest.raises(RuntimeError, match=r"evaluation scored \d+ examples of 13, not each once"):
                evaluation.evaluate(_ScoreByLength(), encoded, config, ["pearson"], Dist(0, world), 0, 2)
        else:
            assert evaluation.evaluate(_ScoreByLength(), encoded, config, ["pearson", "spearman"], Dist(0, world), 0,
                                       2) == one


@pytest.mark.parametrize("examples", [48, 49])
def test_two_processes_match_one_process(model_dir_no_dropout, examples, tmp_path):
    """torchrun with 2 CPU processes (gloo): ranks stay in sync and the result equals one process's, while each
    draws its own dropout masks (they drew the same). With 49 examples the last batch holds one, and rank 1 none: it
    adds zeros to the gradients' sum (under DistributedDataParallel it hung until it joined with a backward)."""
    model_dir = model_dir_no_dropout
    files = dict(train_file=write_csv(tmp_path / "train.csv", examples, 1),
                 validation_file=write_csv(tmp_path / "val.csv", 24, 2))
    common = ["--seed", "5", "--epochs", "1", "--lr", "1e-3"]
    single = _cli_train(model_dir, files, tmp_path / "one", *common)
    assert single.returncode == 0, single.stderr
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
            "bitfit_fast.cli", "train", "--model", model_dir, "--train-file", files["train_file"], "--validation-file",
            files["validation_file"], "--batch-size", "8", "--output-dir", str(tmp_path / "two"), "--backend", "torch",
            "--no-progress", *common]
    double = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"]
    one = json.loads((tmp_path / "one" / "run_summary.json").read_text())
    assert summary["epochs"][0]["validation"]["accuracy"] == pytest.approx(one["epochs"][0]["validation"]["accuracy"])
    assert summary["real_tokens"] == one["real_tokens"], "every process's tokens, counted once"
    expected, got = trained_params(tmp_path / "one"), trained_params(tmp_path / "two")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)
    ranks = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)["rng"]
    assert not torch.equal(ranks[0]["torch"], ranks[1]["torch"]), "the ranks draw the same dropout masks"


def test_a_process_without_examples_trains_in_fp16(model_dir, files, tmp_path):
    """Batches of one on 2 processes: rank 1 never has an example, so it scales no loss, and its loss scaler had
    no scale to unscale the summed gradients by (fp16 failed; fp32 has no scaler)."""
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
            "bitfit_fast.cli", "train", "--model", model_dir, "--train-file", files["train_file"], "--validation-file",
            files["validation_file"], "--batch-size", "1", "--max-train-examples", "3", "--epochs", "1", "--fp16",
            "--output-dir", str(tmp_path / "run"), "--backend", "torch", "--no-progress"]
    trained = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["ranks_in_sync"] and summary["epochs"][0]["step"] == 3


def test_three_processes_split_batches_unevenly_and_resume_a_kill_to_the_same_parameters(model_dir_no_dropout, files,
                                                                                          tmp_path):
    """torchrun with 3 CPU processes and batches of 8 (shares of 3, 3 and 2): the result equals one process's, and a
    run whose every process is SIGKILLed after step 5 resumes to the uninterrupted run's parameters, to the bit.
    --batch-size had to be a multiple of the processes; and DistributedDataParallel's buckets, rebuilt in the
    backward's order after a run's first step, rounded a resumed run's first step otherwise (3+ processes)."""
    model_dir = model_dir_no_dropout  # the ranks draw their own dropout masks: one process would draw others
    (tmp_path / "killed.py").write_text(KILLED_AFTER_STEP_5)
    common = ["train", "--model", model_dir, "--train-file", files["train_file"], "--validation-file",
              files["validation_file"], "--epochs", "2", "--batch-size", "8", "--backend", "torch", "--no-progress",
              "--save-every", "2", "--lr", "1e-2"]

    def torchrun(program, out, *extra):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3",
                               *program, *common, "--output-dir", str(out), *extra],
                              capture_output=True, text=True, timeout=600)

    single = _cli_train(model_dir, files, tmp_path / "one", "--save-every", "2", "--lr", "1e-2")
    assert single.returncode == 0, single.stderr
    straight = torchrun(["-m", "bitfit_fast.cli"], tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert json.loads((tmp_path / "straight" / "run_summary.json").read_text())["ranks_in_sync"]
    killed = torchrun([str(tmp_path / "killed.py")], tmp_path / "killed")
    assert killed.returncode != 0
    assert torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)["position"]["step"] == 4
    resumed = torchrun(["-m", "bitfit_fast.cli"], tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    one, expected, got = (trained_params(tmp_path / name) for name in ("one", "straight", "killed"))
    assert expected.keys() == got.keys() == one.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
        torch.testing.assert_close(expected[name], one[name], atol=1e-5, rtol=1e-4, msg=name)


def test_learning_rate_sweep_reports_the_best(model_dir, files, tmp_path):
    said = []
    record = sweep(config(model_dir, files, tmp_path, epochs=1), grid=(1e-4, 1e-2), log=said.append)
    assert [r["learning_rate"] for r in record["runs"]] == [1e-4, 1e-2]
    assert record["best"]["best"]["value"] == max(r["best"]["value"] for r in record["runs"])
    assert (tmp_path / "run" / "lr-0.01" / "run_summary.json").is_file()
    best_run = tmp_path / "run" / f"lr-{record['best']['learning_rate']:g}"
    assert said[-1].endswith(f", the run {best_run} (eval, predict, serve and export take it)")
    with pytest.raises(UserError, match=r"pass one of them \(an --lr-sweep has one run per learning rate\)"):
        run.load_run(str(tmp_path / "run"))


def test_a_directory_holding_what_a_killed_save_left_names_it(model_dir, files, tmp_path):
    """A run killed while writing its first checkpoint (SIGKILL, out of memory) leaves the checkpoint's temporary:
    the same command said only "not empty", and --resume that there is no checkpoint."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".checkpoint.tmp-99999.pt").write_bytes(b"cut")
    with pytest.raises(UserError, match=r"holds what a run killed while saving left \(.checkpoint.tmp-99999.pt\): "
                                        "delete it, unless a run is still writing there, and run the command again"):
        train(config(model_dir, files, tmp_path, epochs=1))
    (out / ".checkpoint.tmp-99999.pt").unlink()
    (out / "biases").mkdir()  # killed during its first save of the biases
    (out / "biases" / ".bitfit_biases.tmp-99999.safetensors").write_bytes(b"cut")
    with pytest.raises(UserError, match=r"killed while saving left \(biases/.bitfit_biases.tmp-99999.safetensors\)"):
        train(config(model_dir, files, tmp_path, epochs=1))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"is not empty \(biases, notes.txt\)"):
        train(config(model_dir, files, tmp_path, epochs=1))


def test_a_kill_between_an_epochs_checkpoint_and_its_biases_is_resumed_to_the_biases_of_an_uninterrupted_run(
        model_dir, files, tmp_path, monkeypatch):
    """An epoch's best biases are saved after its checkpoint, and a resume from an epoch's end saves them: saved
    before it, a kill in between left biases/ holding an epoch the checkpoint did not, which a resume with other
    options could redo and score lower (biases/ then held an epoch no summary names)."""
    from bitfit_fast.train import loop

    train(config(model_dir, files, tmp_path, epochs=2, output_dir=str(tmp_path / "whole")))

    class Killed(Exception):
        pass

    def killed(*args, **kwargs):
        raise Killed

    out = tmp_path / "killed"
    with monkeypatch.context() as patch:
        patch.setattr(loop, "save_biases", killed)
        with pytest.raises(Killed):
            train(config(model_dir, files, tmp_path, epochs=2, output_dir=str(out)))
    assert torch.load(out / "checkpoint.pt", weights_only=False)["position"] == dict(epoch=1, batch=0, step=6)
    assert not (out / "biases").exists()
    train(config(model_dir, files, tmp_path, epochs=2, output_dir=str(out), resume=True))
    for directory in ("biases", "biases-last"):
        whole, resumed = (safetensors.torch.load_file(run / directory / "bitfit_biases.safetensors")
                          for run in (tmp_path / "whole", out))
        assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole), directory


def test_a_run_is_not_trained_inside_another_nor_over_saved_biases(model_dir, files, tmp_path):
    """As save_biases and export refuse to write inside a run: a new run in a run's subdirectory was trained. Nor
    where save_biases files are, which the run's would hide."""
    train(config(model_dir, files, tmp_path, epochs=1))
    inside = tmp_path / "run" / "sub"
    with pytest.raises(UserError, match=rf"--output-dir {inside} is inside the run {tmp_path / 'run'}, whose files"):
        train(config(model_dir, files, tmp_path, epochs=1, output_dir=str(inside)))
    assert not inside.exists()
    beside = tmp_path / "run" / ".." / "beside"  # not inside, though its path goes through the run
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "run_config.json").write_text("{}")  # a file of that name that is no run's
    for out in (beside, tmp_path / "elsewhere" / "sub"):
        run.check_output_dir(out, resume=False)  # what train() checks first: no error
    saved = shutil.copytree(tmp_path / "run" / "biases", tmp_path / "saved")  # save_biases files outside a run
    with pytest.raises(UserError, match=rf"{saved} holds biases saved by save_biases \(bitfit_biases.safetensors\)"):
        train(config(model_dir, files, tmp_path, epochs=1, output_dir=str(saved)))


def test_a_finished_run_whose_biases_were_removed_says_so(model_dir, files, tmp_path):
    """eval, predict, serve and export read a run's biases/: gone from a run that trained, the message said that no
    epoch had finished and to --resume, which then refused."""
    train(config(model_dir, files, tmp_path, epochs=1))
    shutil.rmtree(tmp_path / "run" / "biases")
    with pytest.raises(UserError, match=r"has no biases/: the run trained \(it has run_summary.json\), but its "
                                        r"biases/ was deleted or moved since: put it back"):
        run.load_run(str(tmp_path / "run"))


def test_a_sweep_writes_into_no_run_and_over_no_file_of_the_users(model_dir, files, tmp_path, monkeypatch):
    """--lr-sweep checked its lr-* directories only: into a finished run's directory or a user's, it wrote its runs
    and replaced a sweep_summary.json of the user's. Refused before anything trains, the files left as they were."""
    monkeypatch.setattr(lr_sweep, "train", lambda run, log: pytest.fail("a refused sweep trained"))
    grid = (1e-4, 1e-2)
    finished = tmp_path / "finished"
    (finished / "biases").mkdir(parents=True)
    (finished / "run_summary.json").write_text("{}")
    users = tmp_path / "mine"
    users.mkdir()
    (users / "sweep_summary.json").write_text("precious")
    for out, message in ((finished, "already holds a run"), (users, r"is not empty \(sweep_summary.json\): a sweep")):
        with pytest.raises(UserError, match=message):
            sweep(config(model_dir, files, tmp_path, epochs=1, output_dir=str(out)), grid=grid)
        assert not any(path.name.startswith("lr-") for path in out.iterdir())
    assert (users / "sweep_summary.json").read_text() == "precious"


def test_a_stopped_sweep_goes_on_with_resume(model_dir, files, tmp_path):
    stopped = sweep(config(model_dir, files, tmp_path, epochs=1), grid=(1e-4,), log=lambda *_: None)
    with pytest.raises(UserError, match="lr-0.0001 already holds a run"):
        sweep(config(model_dir, files, tmp_path, epochs=1), grid=(1e-4, 1e-2), log=lambda *_: None)
    assert not (tmp_path / "run" / "lr-0.01").exists(), "every run directory is checked before the first trains"
    with pytest.raises(UserError, match=r"lr-0.0001 as it started, but these options differ from the run's: "
                                        r"batch_size 16 \(the run: 8\): give"):
        sweep(config(model_dir, files, tmp_path, epochs=1, resume=True, batch_size=16), grid=(1e-4, 1e-2),
              log=lambda *_: None)  # the runs of one sweep share a protocol
    assert not (tmp_path / "run" / "lr-0.01").exists()
    said = []
    record = sweep(config(model_dir, files, tmp_path, epochs=1, resume=True), grid=(1e-4, 1e-2), log=said.append)
    assert said[0].startswith("lr-0.0001 finished before")
    assert record["runs"][0] == stopped["runs"][0] and (tmp_path / "run" / "lr-0.01" / "run_summary.json").is_file()


def test_resume_continues_a_run_as_it_started_or_refuses(model_dir, files, tmp_path):
    train(config(model_dir, files, tmp_path, epochs=1))
    summary = (tmp_path / "run" / "run_summary.json").read_bytes()
    for overrides, message in [
        (dict(learning_rate=0.05), r"learning_rate 0.05 \(the run: unset\)"),
        (dict(method="full"), r"method full \(the run: bitfit\)"),
        (dict(batch_size=16, seed=3), r"differ from the run's: batch_size 16 \(the run: 8\), seed 3 \(the run: 0\): "
                                      r"give the run's"),
        (dict(epochs=1), r"has finished its 1 epochs, so there is nothing to continue: pass --epochs more than 1"),
    ]:
        with pytest.raises(UserError, match=message):
            train(config(model_dir, files, tmp_path, **{"epochs": 2, "resume": True, **overrides}))
        assert (tmp_path / "run" / "run_summary.json").read_bytes() == summary
    with pytest.raises(UserError, match=r"checkpoint.pt was written by 1 process\(es\), not 2: resume it with 1"):
        run.check_unfinished(tmp_path / "run" / "checkpoint.pt", 2, world=2)  # torchrun of 2 resuming 1 process's
    write_csv(files["train_file"], 48, 1, labels=("sport", "money"))  # the same files, now of two classes
    write_csv(files["validation_file"], 24, 2, labels=("sport", "money"))
    with pytest.raises(UserError, match=r"the training data's classes \['money', 'sport'\] are not those"):
        train(config(model_dir, files, tmp_path, epochs=2, resume=True))
    write_csv(files["train_file"], 48, 1)
    write_csv(files["validation_file"], 24, 2)
    # More epochs, another memory mode and progress bars: the run goes on.
    resumed = train(config(model_dir, files, tmp_path, epochs=2, resume=True,
                           bitfit=BitFitConfig(backend="torch", memory="lean")))
    assert [e["epoch"] for e in resumed["epochs"]] == [1, 2]


def test_a_run_stopped_before_its_first_checkpoint_starts_again_in_its_directory(model_dir, files, tmp_path):
    """It left only its run_config.json (a NaN loss at step 1, Ctrl-C): the same command starts it again there; a
    directory with any other file, or a run_config.json of another program, is not written into."""
    train(config(model_dir, files, tmp_path, epochs=1))
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copy(tmp_path / "run" / RUN_CONFIG_NAME, stopped)
    train(config(model_dir, files, tmp_path, epochs=1, output_dir=str(stopped)))
    assert (stopped / "biases").is_dir()
    for other in ("{}", None):
        mine = tmp_path / f"mine-{other is None}"
        mine.mkdir()
        (mine / (RUN_CONFIG_NAME if other else "notes.txt")).write_text(other or "mine")
        with pytest.raises(UserError, match=f"--output-dir {mine} is not empty"):
            train(config(model_dir, files, tmp_path, epochs=1, output_dir=str(mine)))


def test_eval_scores_the_validation_examples_its_training_scored(model_dir, files, tmp_path, capsys):
    """`eval RUN` reports what training reported: the same examples (--max-eval-examples), and says how many."""
    summary = train(config(model_dir, files, tmp_path, epochs=1, max_eval_examples=10))
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert out == f"{tmp_path / 'run'}: validation accuracy {summary['best']['value']:.4f} (10 examples)\n"


@pytest.mark.parametrize("terminal", [False, True])
def test_the_progress_bar_shows_in_a_terminal_only(model_dir, files, tmp_path, capsys, monkeypatch, terminal):
    """Written to a log, a bar is a line of carriage returns per refresh: there it is left out."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    train(config(model_dir, files, tmp_path, epochs=1, progress=True))
    assert ("epoch 1/1" in capsys.readouterr().err) == terminal


def fake_glue(task):
    """GLUE-shaped tables in memory: the hub is out of reach here, the column mapping is what is tested."""
    import datasets

    spec = data.GLUE[task]
    rows = {c: [f"{c} {i}" for i in range(6)] for c in spec.text_columns}
    rows["label"] = [float(i) / 2 if spec.num_labels == 1 else i % spec.num_labels for i in range(6)]
    return datasets.DatasetDict({s: datasets.Dataset.from_dict(rows) for s in ("train", *spec.validation_splits)})


@pytest.mark.parametrize("task,texts,splits,metrics", [  # GLUE's own columns and splits, the paper's metrics
    ("mnli", 2, ("validation_matched", "validation_mismatched"), ("accuracy",)),
    ("stsb", 2, ("validation",), ("pearson", "spearman")),
    ("mrpc", 2, ("validation",), ("f1", "accuracy")),
    ("cola", 1, ("validation",), ("matthews", "accuracy")),
])
def test_glue_tasks_map_columns_labels_and_metrics(task, texts, splits, metrics, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda path, name: fake_glue(name))
    monkeypatch.setattr(data, "require_hub", lambda what, offline_alternative: None)
    loaded = data.load_glue(task)
    assert tuple(loaded.validation) == splits and tuple(loaded.metrics) == metrics
    assert len(loaded.train.texts[0]) == texts and len(loaded.train.texts) == 6
    assert loaded.train.labels[1] == (0.5 if task == "stsb" else 1)


def test_the_method_and_the_bitfit_options_agree():
    assert TrainConfig(method="subset").bitfit.biases == "subset"
    assert TrainConfig(bitfit=BitFitConfig(biases="subset")).method == "subset", "the same run, recorded one way"
    assert TrainConfig().bitfit == BitFitConfig()
    with pytest.raises(ValueError, match="method must be one of"):
        TrainConfig(method="lora")


def test_precision_auto_is_bf16_on_a_gpu_that_has_it_and_fp32_elsewhere(monkeypatch):
    config = TrainConfig()
    assert config.precision == "auto"
    assert config.resolved_precision(torch.device("cpu")) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert config.resolved_precision(torch.device("cuda")) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert config.resolved_precision(torch.device("cuda")) == "fp32"
    assert TrainConfig(precision="fp16").resolved_precision(torch.device("cpu")) == "fp16", "given: kept"
    with pytest.raises(ValueError, match="precision must be auto or one of"):
        TrainConfig(precision="fp8")


@pytest.mark.parametrize("lr", [0.0, -1e-3, 1e38, float("nan"), float("inf")])
def test_a_learning_rate_that_cannot_train_is_refused(lr):
    """1e38 overflowed inside AdamW's first step (a traceback); NaN and 0 would train nothing."""
    with pytest.raises(ValueError, match="learning_rate must be more than 0 and at most 1.0"):
        TrainConfig(learning_rate=lr)
    assert TrainConfig(learning_rate=1.0).resolved_learning_rate() == 1.0


@pytest.mark.parametrize("decay,message", [(-0.1, "must be a number, 0 or more"), (float("nan"), "must be a number"),
                                           (True, "must be a number"), ("0.01", "must be a number"),
                                           (1000.0, "1000 at learning rate 0.001 would zero or flip")])
def test_a_weight_decay_that_would_zero_the_biases_each_step_is_refused(decay, message, tmp_path):
    """AdamW scales each trained value by 1 - lr * weight_decay a step: at a product of 1 or more every bias is
    zeroed or flips its sign each step, and nothing trains. Checked at the learning rate the run resolves to, when
    training starts (train, a sweep, a joint run), before anything is written; a saved run's config so still
    loads."""
    from bitfit_fast.train.multitask import TaskFiles, train_tasks

    with pytest.raises(ValueError, match=f"weight_decay {message}"):
        TrainConfig(weight_decay=decay).check_trains()
    TrainConfig(weight_decay=999.0).check_trains()
    with pytest.raises(ValueError, match="at learning rate 1e-05"):
        TrainConfig(method="full", weight_decay=1e5).check_trains()
    if isinstance(decay, float) and decay > 1:
        config = TrainConfig(weight_decay=decay, output_dir=str(tmp_path / "run"))
        assert TrainConfig.from_dict(config.to_dict()) == config
        for start in (train, sweep, lambda c: train_tasks(c, [TaskFiles("a", "a.csv", "a.csv")] * 2)):
            with pytest.raises(ValueError, match="would zero or flip"):
                start(config)
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("norm", [0, -1.0, float("nan"), None])
def test_a_gradient_norm_bound_that_would_not_clip_as_asked_is_refused(norm):
    """0 zeroes every gradient (torch's clip_grad_norm_) and a negative bound flips them; the CLI took only positive
    numbers, TrainConfig any."""
    with pytest.raises(ValueError, match="max_grad_norm bounds the gradients' norm: a positive number; got"):
        TrainConfig(max_grad_norm=norm)


def test_a_run_config_records_its_bitfit_config_and_earlier_records_still_load():
    config = TrainConfig(method="subset", bitfit=BitFitConfig(backend="torch", memory="lean", dtype=torch.bfloat16))
    record = json.loads(json.dumps(config.to_dict()))
    assert record["bitfit"]["memory"] == "lean" and record["bitfit"]["dtype"] == "bfloat16"
    assert TrainConfig.from_dict(record) == config
    earlier = {k: v for k, v in record.items() if k != "bitfit"}  # run_config.json before BitFitConfig
    restored = TrainConfig.from_dict(dict(earlier, backend="torch", memory="lean"))
    assert restored.bitfit == BitFitConfig(biases="subset", backend="torch", memory="lean")


def test_unknown_glue_task_is_named():
    with pytest.raises(data.DataError, match="unknown GLUE task 'sst3'"):
        data.load_task(TrainConfig(task="sst3"))


def test_the_embedded_bbc_news_split_scores_no_training_article():
    """The corpus holds 98 articles twice: each is kept once, so validation never scores a training article; the
    split is stratified (each class 20% in validation) and the same on every call."""
    task = data.load_bbc_news()
    train_texts = [text for text, in task.train.texts]
    validation = task.validation["validation"]
    assert len(set(train_texts)) == len(train_texts) == 1701 and len(validation.texts) == 426
    assert not {text for text, in validation.texts} & set(train_texts)
    for label in range(5):
        in_train, in_validation = task.train.labels.count(label), validation.labels.count(label)
        assert abs(in_validation - 0.2 * (in_train + in_validation)) <= 0.5
    assert data.load_bbc_news().train.texts == task.train.texts


def test_the_seed_leaves_the_embedded_split_alone_and_the_split_seed_draws_another():
    """Runs of other seeds (a seed study) are scored on one validation set: --seed orders the data, --split-seed
    alone draws the split. A run recorded before --split-seed existed drew its split with its seed: eval and
    --resume read it back as drawn."""
    def validation(**options) -> set[str]:
        return {text for text, in data.load_task(TrainConfig(**options)).validation["validation"].texts}

    default = validation()
    assert validation(seed=7) == default
    assert len(validation(split_seed=1) & default) < 0.5 * len(default)
    earlier = {k: v for k, v in TrainConfig(seed=3).to_dict().items() if k != "split_seed"}
    assert TrainConfig.from_dict(earlier).split_seed == 3
    assert TrainConfig.from_dict(TrainConfig(seed=3).to_dict()).split_seed == 0
