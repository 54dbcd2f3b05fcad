"""`bitfit-fast` as a user runs it, each command in its own process (`python -m bitfit_fast.cli`): the documented
commands work, and every mistake ends with one line on stderr that says what to do, exit status 2, no traceback.

A tiny BERT saved to disk stands in for a real encoder; the subprocesses of a stage run two at a time."""

import concurrent.futures
import dataclasses
import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import datasets
import pytest
import safetensors.torch
import torch
import transformers
from safetensors import SafetensorError
from test_trainer import WORDS, save_tiny_bert, topic_texts, write_csv

from bitfit_fast import BitFitConfig, cli, server

UNREACHABLE_HUB = "http://127.0.0.1:9"  # the discard port: connections are refused at once, network or not


def write_table(path, columns: dict) -> str:
    """A CSV, JSON Lines or Parquet file of ``columns``, by the file's suffix."""
    table = datasets.Dataset.from_dict(columns)
    {".csv": lambda: table.to_csv(path, index=False), ".jsonl": lambda: table.to_json(path),
     ".parquet": lambda: table.to_parquet(path)}[path.suffix]()
    return str(path)


def pair_columns(n: int, seed: int) -> dict:
    """Two-text examples: the premise holds the topic's words, the hypothesis other text of the same topic."""
    first, second = list(topic_texts(n, seed)), list(topic_texts(n, seed + 100))
    return dict(premise=[t for t, _ in first], hypothesis=[t for t, _ in second], label=[label for _, label in first])


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """The user's directory: a tiny model, one-text and two-text data in CSV, JSON Lines and Parquet."""
    root = tmp_path_factory.mktemp("user")
    (root / "model").mkdir()
    save_tiny_bert(root / "model", dropout=0.1)
    (root / "data").mkdir()
    write_csv(root / "data" / "train.csv", 48, 1)
    write_csv(root / "data" / "val.csv", 24, 2)
    write_table(root / "data" / "texts.csv", dict(text=["goal match team coach", "bank market price profit"]))
    write_table(root / "data" / "pairs-train.csv", pair_columns(48, 1))
    write_table(root / "data" / "pairs-val.jsonl", pair_columns(24, 2))
    pairs = pair_columns(3, 3)
    write_table(root / "data" / "pairs.parquet", dict(premise=pairs["premise"], hypothesis=pairs["hypothesis"]))
    (root / "data" / "texts.txt").write_text("goal\n")
    (root / "data" / "not.parquet").write_text("text,label\ngoal,sport\n")  # a CSV misnamed
    (root / "data" / "binary.csv").write_bytes(bytes(range(256)) * 4)
    # Saved as Latin-1 (a spreadsheet's export): "é" is one byte, 0xe9, that UTF-8 does not read.
    (root / "data" / "latin-1.jsonl").write_bytes('{"text": "goal", "label": "sport"}\n'
                                                  '{"text": "café prices", "label": "business"}\n'.encode("latin-1"))
    (root / "data" / "latin-1.csv").write_bytes("text\ngoal match\ncafé prices\n".encode("latin-1"))
    # pandas' df.to_json() by default: one object of columns, each mapping row numbers to values.
    (root / "data" / "columns.json").write_text(json.dumps({"text": {"0": "goal match", "1": "bank market"},
                                                            "label": {"0": "sport", "1": "business"}}))
    (root / "data" / "list-texts.jsonl").write_text(json.dumps({"text": list(range(5000))}) + "\n")
    (root / "data" / "ragged.csv").write_text("text,label\ngoal match,sport\nbank, market,business\n")
    # Every row a field too many: pandas reads it without an error, each row's first field as its index.
    (root / "data" / "ragged-every-row.csv").write_text("text\nThe striker scored, and the team won\n"
                                                        "Shares rose, then fell\n")
    long_cell = '"' + "goal " * 30_000 + '"'  # past the csv module's default field limit (128 KiB)
    (root / "data" / "unclosed.csv").write_text(f'text,label\n{long_cell},sport\n"bank market,business\na,b\n')
    write_table(root / "data" / "unknown-labels.csv", dict(premise=["a"], hypothesis=["b"], label=["weather"]))
    (root / "elsewhere").mkdir()  # eval and predict run from here: runs must not depend on the directory
    (root / "not-a-run").mkdir()
    (root / "without-tokenizer").mkdir()  # a Trainer checkpoint saved without its tokenizer
    for name in ("config.json", "model.safetensors"):
        shutil.copy(root / "model" / name, root / "without-tokenizer")
    shutil.copytree(root / "model", root / "misconfigured")  # a config.json edited by hand, its weights not
    for damaged in ("damaged-safetensors", "damaged-bin"):  # weights cut short (a copy that stopped)
        shutil.copytree(root / "model", root / damaged)
    shutil.copytree(root / "model", root / "damaged-pickle")  # the legacy .bin format: a bare pickle, cut short
    (root / "damaged-pickle" / "model.safetensors").unlink()
    weights = (root / "model" / "model.safetensors").read_bytes()
    torch.save(safetensors.torch.load(weights), root / "damaged-pickle" / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    legacy = (root / "damaged-pickle" / "pytorch_model.bin").read_bytes()
    (root / "damaged-pickle" / "pytorch_model.bin").write_bytes(legacy[:600])
    (root / "damaged-safetensors" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (root / "damaged-bin" / "model.safetensors").unlink()
    torch.save(safetensors.torch.load(weights), root / "damaged-bin" / "pytorch_model.bin")
    pickled = (root / "damaged-bin" / "pytorch_model.bin").read_bytes()
    (root / "damaged-bin" / "pytorch_model.bin").write_bytes(pickled[: len(pickled) * 9 // 10])  # no zip directory
    config = json.loads((root / "model" / "config.json").read_text())
    (root / "misconfigured" / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=256)))
    return root


def run_all(commands: dict, home) -> dict:
    """{name: (args, extra env)} run as `python -m bitfit_fast.cli *args` from ``home``, two at a time:
    {name: (CompletedProcess, seconds)}."""

    def one(args, extra_env):
        env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
        env.update(HF_HOME=str(home / "hf-home"), **extra_env)  # an empty cache: offline means offline
        start = time.perf_counter()
        process = subprocess.run([sys.executable, "-m", "bitfit_fast.cli", *args], cwd=home, env=env,
                                 capture_output=True, text=True, timeout=300)
        return process, time.perf_counter() - start

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(one, args, env) for name, (args, env) in commands.items()}
        return {name: future.result() for name, future in futures.items()}


TRAIN = ["train", "--model", "model", "--epochs", "2", "--backend", "torch", "--no-progress"]
TRAIN_TWO = [*TRAIN, "--train-file", "data/pairs-train.csv", "--validation-file", "data/pairs-val.jsonl",
             "--text-columns", "premise", "hypothesis", "--output-dir", "runs/two", "--method", "subset", "--memory",
             "lean"]

# Mistakes that need no trained run: (arguments, extra environment, what the last line of stderr says). Each
# into a directory of its own: two run at a time, and a run that starts holds its directory (run.claimed).
MISTAKES = {
    "batch size 0": (["train", "--batch-size", "0"], {}, "train: error: argument --batch-size: must be at least 1"),
    "model path that does not exist": (["train", "--model", "/nonexistent", "--output-dir", "runs/failed-1"], {},
                                       "train: error: --model /nonexistent does not exist: pass a directory"),
    "misspelled hub name": (["train", "--model", "bert-base-uncassed", "--output-dir", "runs/failed-2"],
                            {"HF_ENDPOINT": UNREACHABLE_HUB},
                            "train: error: --model bert-base-uncassed needs the Hugging Face hub, and 127.0.0.1:9 "
                            "cannot be reached"),
    "misspelled hub name, offline": (["train", "--model", "bert-base-uncassed", "--output-dir", "runs/failed-3"],
                                     {"HF_HUB_OFFLINE": "1"},
                                     "train: error: --model bert-base-uncassed could not be loaded"),
    "GLUE task without the network": (["train", "--task", "sst2", "--output-dir", "runs/failed-4"],
                                      {"HF_ENDPOINT": UNREACHABLE_HUB},
                                      "train: error: GLUE sst2 needs the Hugging Face hub, and 127.0.0.1:9 cannot be "
                                      "reached"),
    "GLUE task offline": (["train", "--task", "sst2", "--output-dir", "runs/failed-5"], {"HF_HUB_OFFLINE": "1"},
                          "train: error: GLUE sst2 could not be loaded"),
    "predict on a directory that is not a run": (["predict", "not-a-run", "--text", "hello"], {},
                                                 "predict: error: not-a-run is not a `bitfit-fast train` run (it has "
                                                 "no run_config.json): pass the --output-dir"),
}


@pytest.fixture(scope="module")
def first_stage(home):
    """The two-text training and the mistakes that need no run, side by side."""
    commands = {"train two texts": (TRAIN_TWO, {}), "debug": (["train", "--model", "/nonexistent", "--debug"], {})}
    commands.update({name: (args, env) for name, (args, env, _) in MISTAKES.items()})
    return run_all(commands, home)


@pytest.fixture(scope="module")
def runs(home, first_stage):
    """Two runs: on two text columns (trained in its own process, from relative paths) and on one (in this one)."""
    process, _ = first_stage["train two texts"]
    assert process.returncode == 0, process.stderr[-3000:]
    data = home / "data"
    assert cli.main(["train", "--model", str(home / "model"), "--epochs", "2", "--backend", "torch", "--no-progress",
                     "--train-file", str(data / "train.csv"), "--validation-file", str(data / "val.csv"),
                     "--output-dir", str(home / "runs" / "one")]) == 0
    return {name: json.loads((home / "runs" / name / "run_summary.json").read_text()) for name in ("one", "two")}


@pytest.fixture(scope="module")
def second_stage(home, runs):
    """eval and predict, as documented, from another directory, and the mistakes made with the runs."""
    elsewhere = home / "elsewhere"
    commands = {
        "eval two runs": (["eval", "../runs/one", "../runs/two"], {}),
        "predict a file": (["predict", "../runs/one", "--input-file", "../data/texts.csv"], {}),
        "predict text pairs": (["predict", "../runs/two", "--text", "goal match", "bank price", "--text-pair",
                                "team coach", "market profit"], {}),
    }
    return run_all(commands, elsewhere)


def test_training_writes_absolute_paths_and_the_best_and_last_biases(home, first_stage, runs):
    out = home / "runs" / "two"
    recorded = json.loads((out / "run_config.json").read_text())
    for key in ("model", "train_file", "validation_file"):
        assert os.path.isabs(recorded["config"][key]) and os.path.exists(recorded["config"][key]), key
    assert recorded["text_columns"] == ["premise", "hypothesis"] and recorded["label_column"] == "label"
    options = BitFitConfig(biases="subset", backend="torch", memory="lean")
    assert recorded["config"]["method"] == "subset" and recorded["config"]["bitfit"] == options.to_dict()
    applied = json.loads((out / "biases" / "bitfit_config.json").read_text())["config"]
    assert BitFitConfig.from_dict(applied) == dataclasses.replace(options, head=applied["head"]), "the run's options"
    summary = runs["two"]
    assert summary["saved_biases"] == {"biases": summary["best"]["epoch"], "biases-last": 2}
    assert (out / "biases").is_dir() and (out / "biases-last").is_dir()
    printed = first_stage["train two texts"][0].stdout
    assert f"biases/ holds epoch {summary['best']['epoch']}, biases-last/ epoch 2" in printed


def test_version_names_what_a_bug_report_needs(capsys):
    import torch
    import transformers

    import bitfit_fast

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"bitfit-fast {bitfit_fast.__version__} (torch {torch.__version__}")
    assert f"transformers {transformers.__version__})" in out and "triton " in out


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 3)", "(default: 8)", "(default: runs/bitfit)", "(default: bitfit)"):
        assert default in help_text
    assert "(default: None)" not in help_text and "(default: False)" not in help_text


def test_eval_scores_the_best_biases_from_any_directory(second_stage, runs):
    process, _ = second_stage["eval two runs"]
    assert process.returncode == 0, process.stderr
    assert process.stdout.splitlines() == [
        f"../runs/{name}: validation accuracy {runs[name]['best']['value']:.4f} (24 examples)"
        for name in ("one", "two")]


def test_eval_takes_any_validation_file(home, runs, capsys):
    file = home / "data" / "pairs-val.jsonl"
    assert cli.main(["eval", str(home / "runs" / "two"), "--validation-file", str(file)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"{file} accuracy {runs['two']['best']['value']:.4f} (24 "
                                                    "examples)")


def check_predictions(printed: str, columns: list[str], count: int):
    rows = [json.loads(line) for line in printed.splitlines()]
    assert len(rows) == count
    for row in rows:
        assert list(row) == [*columns, "label", "probabilities"]
        probabilities = row["probabilities"]
        # printed to 6 decimals: each value is off by at most 5e-7, so their sum by at most that times their count
        assert set(probabilities) == set(WORDS)
        assert sum(probabilities.values()) == pytest.approx(1, rel=0, abs=5e-7 * len(probabilities) + 1e-12)
        assert row["label"] == max(probabilities, key=probabilities.get)


@pytest.mark.parametrize("name,columns", [("predict a file", ["text"]),
                                          ("predict text pairs", ["premise", "hypothesis"])])
def test_predict_prints_json_lines_with_label_and_probabilities(second_stage, name, columns):
    process, _ = second_stage[name]
    assert process.returncode == 0, process.stderr
    check_predictions(process.stdout, columns, 2)


def test_predict_reads_a_file_whose_extension_is_upper_case(home, runs, tmp_path, capsys):
    shutil.copy(home / "data" / "texts.csv", tmp_path / "TEXTS.CSV")
    assert cli.main(["predict", str(home / "runs" / "one"), "--input-file", str(tmp_path / "TEXTS.CSV")]) == 0
    check_predictions(capsys.readouterr().out, ["text"], 2)


def test_predict_reads_parquet(home, runs, capsys):
    assert cli.main(["predict", str(home / "runs" / "two"), "--input-file", str(home / "data" / "pairs.parquet")]) == 0
    check_predictions(capsys.readouterr().out, ["premise", "hypothesis"], 3)


def test_predict_finds_texts_whose_letters_the_tokenizer_normalises_away():
    """U+FE70 is a letter that NFKD turns into a space and an accent, which accent stripping (ALBERT's normaliser)
    drops: no token. Only texts without a letter or digit were tokenised, and it was answered from [CLS] [SEP]."""
    import tokenizers

    from bitfit_fast.serve import _first_without_tokens

    model = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "goal": 1}, unk_token="[UNK]"))
    model.normalizer = tokenizers.normalizers.Sequence([tokenizers.normalizers.NFKD(),
                                                        tokenizers.normalizers.StripAccents()])
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]")
    assert "\ufe70".isalnum() and tokenizer("\ufe70 x")["input_ids"] == [0]
    assert _first_without_tokens(tokenizer, [("goal", "goal"), ("goal x", "\ufe70"), ("\ufe70", "goal")], 8) == 1
    assert _first_without_tokens(tokenizer, [("goal",), ("\ufe70 x",)], 8) is None


def test_predict_into_a_reader_that_stops_ends_quietly(home, runs):
    """`bitfit-fast predict ... | head -1`: the pipe closes before predict writes; no traceback, the status of a
    command ended by SIGPIPE."""
    process = subprocess.Popen([sys.executable, "-m", "bitfit_fast.cli", "predict", str(home / "runs" / "one"),
                                "--text", "goal match", "bank price"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # long before the model has loaded
    assert process.wait(timeout=300) == 141
    assert process.stderr.read() == b""


@pytest.mark.parametrize("name", ["eval two runs", "predict text pairs", "predict a file"])
def test_eval_and_predict_do_not_report_the_restored_head_as_new(second_stage, name):
    process, _ = second_stage[name]
    for noise in ("LOAD REPORT", "MISSING", "newly initialized", "Loading weights"):
        assert noise not in process.stdout + process.stderr


# Run in a process that never imports bitfit_fast: what a user of the exported model has.
LOAD_EXPORTED = """
import json, sys, torch, transformers
out, texts = sys.argv[1], json.loads(sys.argv[2])
model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
tokenizer = transformers.AutoTokenizer.from_pretrained(out)
batch = tokenizer(*map(list, zip(*texts)), padding=True, truncation=True, return_tensors="pt")  # at its own limit
with torch.no_grad():
    rows = model(**batch).logits.float().softmax(-1).tolist()
assert not any(name.startswith("bitfit_fast") for name in sys.modules)
print(json.dumps([{model.config.id2label[i]: p for i, p in enumerate(row)} for row in rows]))
"""


def exported_probabilities(out, texts) -> list[dict]:
    process = subprocess.run([sys.executable, "-c", LOAD_EXPORTED, str(out), json.dumps(texts)], capture_output=True,
                             text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    return json.loads(process.stdout)


LONG = " ".join(["goal match team coach"] * 20 + ["bank market price profit"] * 20)  # past the runs' 128 tokens


@pytest.mark.parametrize("name,texts", [("one", [["goal match team"], ["bank price"], [LONG]]),
                                        ("two", [["goal match", "team coach"], ["bank price", "market profit"],
                                                 [LONG, "bank price"]])])
def test_export_writes_a_plain_hugging_face_model_that_predicts_what_the_run_does(home, runs, name, texts, capsys):
    """The run's best biases merged into its base model: transformers alone loads the directory (weights, class
    names, tokenizer) and answers what `bitfit-fast predict` answers, a text longer than the run's --max-length
    too (its tokenizer cuts where the run cuts); the run of biases="subset" (two) too."""
    run, out = home / "runs" / name, home / "exported" / name
    assert cli.main(["export", str(run), str(out)]) == 0
    printed, err = capsys.readouterr()
    assert printed.startswith(f"wrote {out}: a BertForSequenceClassification with {run}'s best biases merged in")
    assert err == "", "no progress bar or load report"
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 128
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "no temporary directory is left"
    assert not [key for key in json.loads((out / "config.json").read_text()) if "bitfit" in key]
    args = ["--text", *(t[0] for t in texts)] + (["--text-pair", *(t[1] for t in texts)] if len(texts[0]) == 2 else [])
    assert cli.main(["predict", str(run), *args]) == 0
    predicted = [json.loads(line)["probabilities"] for line in capsys.readouterr().out.splitlines()]
    for exported, expected in zip(exported_probabilities(out, texts), predicted, strict=True):
        assert set(exported) == set(WORDS)
        assert exported == pytest.approx(expected, abs=1e-6), "predict prints probabilities to 6 decimals"


def test_export_never_writes_over_a_directory_and_names_a_run_it_cannot_merge(home, runs, capsys, monkeypatch):
    run, taken = str(home / "runs" / "one"), home / "exported-taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert cli.main(["export", run, str(taken)]) == 2
    assert capsys.readouterr().err == (f"bitfit-fast export: error: {taken} already exists and is not empty: export "
                                       "into a new or empty directory (it never writes over files)\n")
    assert [p.name for p in taken.iterdir()] == ["notes.txt"] and (taken / "notes.txt").read_text() == "mine"
    assert cli.main(["export", run, str(taken / "notes.txt")]) == 2
    assert capsys.readouterr().err == (f"bitfit-fast export: error: {taken / 'notes.txt'} is a file: export into a "
                                       "new or empty directory (it never writes over files)\n")
    assert (taken / "notes.txt").read_text() == "mine"

    def refuse(model):  # what merge() says of biases its config cannot declare (ModernBERT subset, T5)
        raise ValueError("merge() refuses: a save_pretrained checkpoint would not reload the biases apply() added.")

    monkeypatch.setattr("bitfit_fast.serve.merge", refuse)
    out = home / "exported-refused"
    assert cli.main(["export", run, str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bitfit-fast export: error: {run} cannot be exported as a plain Hugging Face model: "
                          "merge() refuses") and err.endswith("Its biases load with bitfit-fast (predict, serve, "
                                                              "bitfit_fast.load_biases).\n")
    assert not out.exists()


def test_export_below_a_run_config_json_that_no_run_wrote_is_written(home, runs, tmp_path):
    """Only a run's own record makes a directory a run's: a project of one's own may name a file run_config.json."""
    (tmp_path / "run_config.json").write_text('{"lr": 0.1}')
    assert cli.main(["export", str(home / "runs" / "one"), str(tmp_path / "models" / "exported")]) == 0
    assert (tmp_path / "models" / "exported" / "config.json").is_file()


def test_export_into_an_empty_directory_and_a_failed_write_leaves_nothing(home, runs, capsys, monkeypatch):
    run, empty = str(home / "runs" / "one"), home / "exported-empty"
    empty.mkdir()
    killed = home / ".exported-empty.tmp-999999"  # what an export killed before its rename leaves
    (killed / "model.safetensors").parent.mkdir()
    (killed / "model.safetensors").write_text("a whole model")
    assert cli.main(["export", run, str(empty)]) == 0
    assert (empty / "config.json").is_file() and (empty / "tokenizer_config.json").is_file()
    assert capsys.readouterr().err == (f"note: {killed} is what an export into exported-empty left "
                                       "unfinished (killed?); delete it unless an export is still running\n")
    assert (killed / "model.safetensors").read_text() == "a whole model", "named, not removed"
    shutil.rmtree(killed)

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("transformers.PreTrainedTokenizerBase.save_pretrained", full_disk)
    out = home / "exported-full-disk"
    assert cli.main(["export", run, str(out)]) == 2
    assert capsys.readouterr().err == (f"bitfit-fast export: error: {out} could not be written ([Errno 28] No space "
                                       "left on device); nothing was written there\n")
    assert not out.exists() and not [p for p in home.iterdir() if p.name.startswith(".exported")], "no temporary left"

    def full_disk_in_the_weights(self, *args, **kwargs):  # safetensors' own error, not an OSError
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", full_disk_in_the_weights)
    assert cli.main(["export", run, str(out)]) == 2
    assert capsys.readouterr().err == (f"bitfit-fast export: error: {out} could not be written (Error while "
                                       "serializing: I/O error: No space left on device (os error 28)); nothing was "
                                       "written there\n")
    assert not out.exists() and not [p for p in home.iterdir() if p.name.startswith(".exported")], "no temporary left"


def test_export_into_the_current_directory_or_an_empty_name_is_refused_in_one_line(home, runs, capsys, monkeypatch):
    here = home / "exported-here"
    here.mkdir()
    monkeypatch.chdir(here)  # the rename would take the directory from under the shell that is in it
    for output_dir in (".", "./", str(here), ".."):
        assert cli.main(["export", str(home / "runs" / "one"), output_dir]) == 2
        assert capsys.readouterr().err == (f"bitfit-fast export: error: {output_dir} is the current directory (or "
                                           "holds it), which the export's rename would take from under you: export "
                                           "into a new directory, e.g. a subdirectory\n")
    assert cli.main(["export", str(home / "runs" / "one"), " "]) == 2
    assert capsys.readouterr().err == ("bitfit-fast export: error: the output directory is an empty name: name a new "
                                       "directory to export into\n")
    assert not any(here.iterdir())


def test_serve_options_reach_the_server(home, runs, monkeypatch):
    from bitfit_fast import server

    served = {}
    monkeypatch.setattr(server, "build_app", lambda predictor, config: served.update(
        config=config, truncate=predictor.truncate) or "app")
    monkeypatch.setattr("uvicorn.run", lambda app, host, port, **kwargs: served.update(app=app, host=host, port=port))
    # Checked, not listened on: a port found free here could be taken by another test process before the check.
    monkeypatch.setattr(cli, "_check_listenable", lambda host, port: served.update(checked=(host, port)))
    port = 8765
    assert cli.main(["serve", str(home / "runs" / "one"), "--port", str(port), "--max-batch-size", "3",
                     "--max-wait-ms", "0", "--max-queue", "7", "--max-request-bytes", "1000", "--truncate"]) == 0
    assert served == dict(config=server.BatchingConfig(3, 0.0, 7, 1000), truncate=True, app="app", host="127.0.0.1",
                          port=port, checked=("127.0.0.1", port))
    assert cli.main(["serve", str(home / "runs" / "one"), "--port", str(port)]) == 0
    assert served["config"] == server.BatchingConfig() and served["truncate"] is False


def test_runs_of_two_base_models_are_not_served_together(home, runs, capsys, monkeypatch, tmp_path):
    """Runs share a base model by its weights, not by the path it was read from: runs on a copy of it are served
    together, runs on a model of other weights are refused."""
    import transformers

    served = []
    monkeypatch.setattr("uvicorn.run", lambda *args, **kwargs: served.append(args))  # one started would never end
    shutil.copytree(home / "model", tmp_path / "model-copy")
    shutil.copytree(home / "runs" / "one", tmp_path / "on-copy")
    record = json.loads((tmp_path / "on-copy" / "run_config.json").read_text())
    record["model_path"] = record["config"]["model"] = str(tmp_path / "model-copy")
    (tmp_path / "on-copy" / "run_config.json").write_text(json.dumps(record))
    shutil.copytree(home / "model", tmp_path / "model-other")
    bert = transformers.BertModel.from_pretrained(tmp_path / "model-other", add_pooling_layer=False)
    with torch.no_grad():
        bert.encoder.layer[1].output.dense.weight.mul_(1.5)
    bert.save_pretrained(tmp_path / "model-other")
    data = home / "data"
    assert cli.main(["train", "--model", str(tmp_path / "model-other"), "--epochs", "1", "--backend", "torch",
                     "--no-progress", "--train-file", str(data / "train.csv"), "--validation-file",
                     str(data / "val.csv"), "--max-train-examples", "8",
                     "--output-dir", str(tmp_path / "on-other")]) == 0
    assert cli.main(["serve", str(home / "runs" / "one"), str(tmp_path / "on-copy")]) == 0 and len(served) == 1
    capsys.readouterr()
    assert cli.main(["serve", str(home / "runs" / "one"), str(tmp_path / "on-other")]) == 2
    assert (f"{tmp_path / 'on-other'} was trained on {tmp_path / 'model-other'} and {home / 'runs' / 'one'} on "
            f"{home / 'model'}, whose weights differ (bert.encoder.layer.1.output.dense.weight): the runs a server "
            "holds share one base model") in capsys.readouterr().err
    shutil.copytree(home / "runs" / "one", tmp_path / "elsewhere" / "one")
    assert cli.main(["serve", str(home / "runs" / "one"), str(tmp_path / "elsewhere" / "one")]) == 2
    assert (f"two runs are named 'one' ({home / 'runs' / 'one'} and {tmp_path / 'elsewhere' / 'one'}): tasks are "
            "named by their run directories, so rename one") in capsys.readouterr().err


def test_a_runs_biases_are_written_by_its_training_only(home, runs, tmp_path):
    """save_biases or a bank's save_task into a run's biases/ (or a link to it) would leave the run with another
    model's head under its own labels: refused, the run's files as they were."""
    import bitfit_fast
    from bitfit_fast.task_bank import TaskBank

    biases = home / "runs" / "one" / "biases"
    before = {path.name: path.read_bytes() for path in biases.iterdir()}
    model = transformers.AutoModelForSequenceClassification.from_pretrained(home / "model", num_labels=3)
    single = bitfit_fast.load_biases(
        transformers.AutoModelForSequenceClassification.from_pretrained(home / "model", num_labels=3), biases,
        backend="torch")
    bank = TaskBank.load(model, {"one": home / "runs" / "one"}, backend="torch")
    link = tmp_path / "link"
    link.symlink_to(biases)
    for target in (biases, link):
        for save in (lambda: bitfit_fast.save_biases(single, target),  # noqa: B023 (called in this loop)
                     lambda: bank.save_task("one", target)):  # noqa: B023
            with pytest.raises(ValueError, match=f"{target} is inside the `bitfit-fast train` run "
                                                 f"{biases.resolve().parent}, whose files only its training writes"):
                save()
    assert {path.name: path.read_bytes() for path in biases.iterdir()} == before
    bank.save_task("one", tmp_path / "saved")  # outside a run: written


def test_a_run_whose_biases_hold_another_head_is_not_served(home, runs, capsys, monkeypatch):
    """A run's record and its biases disagree on the number of labels (biases copied in from another run): the
    task would answer with another head's outputs under the run's label names. Refused, as predict refuses it."""
    monkeypatch.setattr("uvicorn.run", lambda *args, **kwargs: None)
    other = home / "runs" / "relabelled"
    shutil.copytree(home / "runs" / "one", other)
    record = json.loads((other / "run_config.json").read_text())
    record["num_labels"], record["label_names"] = 2, ["money", "sport"]  # the run's biases hold 3 labels' head
    (other / "run_config.json").write_text(json.dumps(record))
    assert cli.main(["serve", str(other)]) == 2
    message = (f"task 'relabelled': its run was trained with 2 labels, but {other / 'biases'} holds a head of 3: "
               "those biases are not the run's (replaced since?); train the run again")
    assert message in capsys.readouterr().err
    # The Python API refuses it before the model changes: it stays a plain model, and a bank can load onto it.
    import transformers

    import bitfit_fast
    from bitfit_fast.task_bank import TaskBank

    base = transformers.AutoModelForSequenceClassification.from_pretrained(home / "model", num_labels=2)
    with pytest.raises(ValueError, match=re.escape(message)):
        TaskBank.load(base, [other])
    assert not bitfit_fast.model.is_applied(base)
    TaskBank.load(base, [home / "runs" / "one"])
    with pytest.raises(ValueError, match="this BertForSequenceClassification is applied already .bitfit_fast.apply, "
                                         "or a TaskBank's model.: a TaskBank applies its base model itself; pass a "
                                         "fresh one"):
        TaskBank.load(base, [home / "runs" / "one"])


def test_a_run_whose_base_model_moved_says_how_to_give_it_back(home, runs, capsys):
    """eval, predict and serve have no --model: the run's recorded base model is what they load."""
    other = home / "runs" / "moved-base"
    shutil.copytree(home / "runs" / "one", other)
    record = json.loads((other / "run_config.json").read_text())
    record["model_path"] = record["config"]["model"] = str(home / "moved-model")
    (other / "run_config.json").write_text(json.dumps(record))
    for command in (["eval", str(other)], ["predict", str(other), "--text", "goal"], ["serve", str(other)]):
        assert cli.main(command) == 2
        assert (f"{other}'s base model {home / 'moved-model'} does not exist: put that model back there, or set "
                f'"model_path" in {other / "run_config.json"} to a local copy of it') in capsys.readouterr().err


def test_a_run_whose_base_model_now_holds_other_weights_says_so(home, runs, capsys, monkeypatch):
    """A model directory overwritten with another model of the same shapes (trained further, say): the run's biases
    would load and answer wrongly; eval, predict and serve refuse, naming a weight that differs."""
    monkeypatch.setattr(server, "serve", lambda *args: pytest.fail("serve started a server on the other weights"))
    other, model = home / "runs" / "retrained-base", home / "retrained-model"
    shutil.copytree(home / "runs" / "one", other)
    shutil.copytree(home / "model", model)
    weights = safetensors.torch.load_file(model / "model.safetensors")
    changed = next(name for name in sorted(weights) if name.endswith("output.dense.weight"))
    weights[changed] = weights[changed] * 1.5
    safetensors.torch.save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    record = json.loads((other / "run_config.json").read_text())
    record["model_path"] = record["config"]["model"] = str(model)
    (other / "run_config.json").write_text(json.dumps(record))
    for command in (["eval", str(other)], ["predict", str(other), "--text", "goal"], ["serve", str(other)]):
        assert cli.main(command) == 2
        assert (f"{other}'s base model {model} holds other weights than the run was trained on (bert.{changed} "
                f'differs), or its biases/ is another run\'s: give the run its model back (set "model_path" in '
                f'{other / "run_config.json"} to a local copy of the one it was trained on) or its own biases, or '
                "train it again") in capsys.readouterr().err


def check_one_line_error(process, expected: str):
    assert process.returncode == 2, process.stderr[-3000:]
    assert "Traceback" not in process.stderr
    last = process.stderr.strip().splitlines()[-1]
    assert last.startswith(f"bitfit-fast {expected}"), last
    assert process.stderr.strip().count("\n") == 0, process.stderr


@pytest.mark.parametrize("name", MISTAKES)
def test_mistakes_end_with_one_line_and_status_2(first_stage, home, name):
    process, seconds = first_stage[name]
    check_one_line_error(process, MISTAKES[name][2])
    assert seconds < 60, "a missing network is found in seconds, not after minutes of retries"
    assert not list(home.glob("runs/failed*")), "a run that failed to start leaves no directory"


def test_an_unreadable_file_ends_with_our_line_alone_not_the_readers_log_too(home):
    args = [*TRAIN, "--train-file", "data/not.parquet", "--validation-file", "data/val.csv", "--output-dir",
            "runs/failed"]
    process, _ = run_all({"not parquet": (args, {})}, home)["not parquet"]
    check_one_line_error(process, f"train: error: {home / 'data' / 'not.parquet'} could not be read as parquet "
                                  "(Parquet magic bytes not found in footer")


@pytest.mark.parametrize("args,message", [
    (["predict", "{runs}/two", "--text", "goal match"],
     "{runs}/two was trained on two texts per example (premise, hypothesis): give each --text its second text with "
     "--text-pair"),
    (["predict", "{runs}/one", "--text", "goal", "--text-pair", "match"],
     "{runs}/one was trained on one text per example (text): leave out --text-pair"),
    (["predict", "{runs}/one", "--text", "goal match", ""],  # as the server refuses it
     "example 2 has an empty text: there is nothing to classify; give it a text"),
    (["predict", "{runs}/one", "--text", "goal match", " \n"],
     "example 2 has an empty text: there is nothing to classify; give it a text"),
    (["predict", "{runs}/one", "--text", "goal match", "\u200b\x00"],  # as the server refuses it
     "example 2 has no tokens (only spaces or characters the tokenizer drops): there is nothing to classify; give it "
     "a text"),
    (["predict", "{runs}/two", "--text", "goal", "--text-pair", "\u200b"],
     "example 1 has no tokens (only spaces or characters the tokenizer drops)"),
    (["predict", "{runs}/two", "--input-file", "{data}/texts.csv"], "{data}/texts.csv has no column 'premise'"),
    (["predict", "{runs}/one", "--input-file", "texts.csv"], "texts.csv does not exist; check the path"),
    (["predict", "{runs}/one", "--input-file", "{data}/texts.txt"], "unsupported format '.txt'"),
    (["predict", "{runs}/one", "--input-file", "{data}"],
     "{data} is a directory: give a data file, one ending in one of ['.csv', '.json', '.jsonl', '.parquet']"),
    (["predict", "{runs}/one", "--input-file", "{data}/binary.csv"],
     "{data}/binary.csv is not a text file (it holds NUL bytes: binary data, or UTF-16 text); save it as UTF-8 CSV"),
    (["eval", "{runs}/one", "--validation-file", "{data}/pairs-val.jsonl"],
     "pairs-val.jsonl has no column 'text'; its columns are ['premise', 'hypothesis', 'label']: a file for this run "
     "needs the columns it was trained on, ['text', 'label']"),
    (["eval", "{runs}/two", "--validation-file", "{data}/unknown-labels.csv"],
     "has labels ['weather'] that the training data does not have"),
    (["eval", "{runs}/none"], "{runs}/none is not a directory: pass the --output-dir of a `bitfit-fast train` run"),
    (["eval", "{home}/not-a-run"], "not-a-run is not a `bitfit-fast train` run (it has no run_config.json)"),
    (["train", "--model", "{home}/model", "--output-dir", "{runs}/one"],
     "{runs}/one already holds a run (checkpoint.pt): continue it with --resume"),
    (["train", "--model", "{home}/model", "--output-dir", "{runs}/one/biases"],  # a run there would hide them
     "--output-dir {runs}/one/biases is inside the run {runs}/one, whose files only its training writes"),
    (["train", "--model", "{home}/without-tokenizer", "--output-dir", "{runs}/failed"],  # every word would be [UNK]
     "--model {home}/without-tokenizer has a tokenizer of 5 tokens for its 25 token embeddings: its tokenizer files "
     "are missing"),
    (["train", "--model", "{home}/misconfigured", "--output-dir", "{runs}/failed"],  # not drawn anew
     "--model {home}/misconfigured: its weights do not fit its config.json (bert.embeddings.position_embeddings."
     "weight is (128, 32) in the weights, (256, 32) by the config); fix config.json or the weights"),
    (["train", "--model", "{home}/model", "--max-length", "2", "--train-file", "{data}/train.csv",
      "--validation-file", "{data}/val.csv", "--output-dir", "{runs}/failed"],  # the tokenizer could not truncate
     "--max-length 2 leaves no room for the text: the tokenizer adds 2 special tokens to a text, and each text needs a "
     "token; use --max-length 3 or more"),
    (["train", "--model", "{home}/model", "--max-length", "4", "--train-file", "{data}/pairs-train.csv",
      "--validation-file", "{data}/pairs-val.jsonl", "--text-columns", "premise", "hypothesis", "--output-dir",
      "{runs}/failed"],
     "--max-length 4 leaves no room for the text: the tokenizer adds 3 special tokens to a pair of texts, and each "
     "text needs a token; use --max-length 5 or more"),
    (["train", "--model", "{home}/model", "--output-dir", "{data}"],  # a run would overwrite files of its names
     "--output-dir {data} is not empty (binary.csv, columns.json, latin-1.csv, ...): a run starts in a new "
     "or empty directory"),
    (["train", "--model", "{home}/model", "--output-dir", "{home}/not-a-run", "--resume"],
     "--resume: no checkpoint at {home}/not-a-run/checkpoint.pt; leave out --resume"),
    (["train", "--model", "{home}/model", "--max-length", "1000", "--output-dir", "{runs}/failed"],
     "--max-length 1000 is more than the 128 positions of --model {home}/model: use --max-length 128 or less"),
    (["train", "--model", "{data}", "--output-dir", "{runs}/failed"],
     "--model {data} has no config.json, so it is not a Hugging Face model"),
    (["train", "--model", "{home}/model", "--train-file", "{data}/latin-1.jsonl", "--validation-file",
      "{data}/val.csv", "--output-dir", "{runs}/failed"],
     "{data}/latin-1.jsonl is not UTF-8 text (byte 0xe9 on line 2: a Latin-1 or Windows-1252 export?); save it as "
     "UTF-8"),
    (["train", "--model", "{home}/model", "--train-file", "{data}/columns.json", "--validation-file",
      "{data}/val.csv", "--output-dir", "{runs}/failed"],
     "{data}/columns.json holds one JSON object of objects (pandas' to_json writes its columns so by default), not "
     "one record per row: write df.to_json(path, orient=\"records\", lines=True)"),
    (["predict", "{runs}/one", "--input-file", "{data}/list-texts.jsonl"],  # a cell's value is quoted cut short
     "{data}/list-texts.jsonl column 'text' holds [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, "
     "19, 20, 21, 2... (28,890 characters) (list) in example 1, not a text"),
    (["predict", "{runs}/one", "--input-file", "{data}/ragged.csv"],
     "{data}/ragged.csv could not be read as CSV: line 3 has 3 fields where the header has 2 (a comma in a text "
     "needs the text in double quotes); fix it"),
    (["predict", "{runs}/one", "--input-file", "{data}/ragged-every-row.csv"],
     "{data}/ragged-every-row.csv could not be read as CSV: line 2 has 2 fields where the header has 1 (a comma in "
     "a text needs the text in double quotes); fix it"),
    (["train", "--model", "{home}/model", "--train-file", "{data}/ragged-every-row.csv", "--validation-file",
      "{data}/val.csv", "--output-dir", "{runs}/failed"],
     "{data}/ragged-every-row.csv could not be read as CSV: line 2 has 2 fields"),
    (["predict", "{runs}/one", "--input-file", "{data}/unclosed.csv"],
     "{data}/unclosed.csv could not be read as CSV: a double quote opened on line 3 never closes; fix it"),
    (["predict", "{runs}/one", "--input-file", "{data}/latin-1.csv"],
     "{data}/latin-1.csv is not UTF-8 text (byte 0xe9 on line 3"),
    (["train", "--model", "{home}/damaged-safetensors", "--output-dir", "{runs}/failed"],
     "--model {home}/damaged-safetensors could not be loaded (Error while deserializing header"),
    (["train", "--model", "{home}/damaged-pickle", "--output-dir", "{runs}/failed"],
     "--model {home}/damaged-pickle could not be loaded ("),
    (["train", "--model", "{home}/damaged-bin", "--output-dir", "{runs}/failed"],
     "--model {home}/damaged-bin could not be loaded (PytorchStreamReader failed reading zip archive"),
    (["serve", "{runs}/one", "{runs}/two"],
     "cannot serve these runs: task 'two' ({runs}/two/biases) was trained with other BitFit options"),
    (["serve", "{runs}/one", "{runs}/two"], "(bitfit-fast serve: separate servers)"),
    (["serve", "{runs}/one", "{runs}/one"], "the run {runs}/one is given twice: give it once"),
    (["serve", "{home}/not-a-run"], "not-a-run is not a `bitfit-fast train` run (it has no run_config.json)"),
    (["train", "--model", "{home}/model", "--output-dir", "{home}/model/config.json/failed"],
     "--output-dir {home}/model/config.json/failed cannot be created: {home}/model/config.json is a file; choose "
     "another directory"),
    (["train", "--model", "{home}/model", "--output-dir", "{data}/train.csv"],
     "--output-dir {data}/train.csv cannot be created: {data}/train.csv is a file; choose another directory"),
    (["export", "{runs}/one", "{runs}/one/exported"],
     "{runs}/one/exported is inside the `bitfit-fast train` run {runs}/one, whose files only its training writes: "
     "export into a directory outside it"),
    (["export", "{runs}/one", "{runs}/two/biases/exported"],
     "{runs}/two/biases/exported is inside the `bitfit-fast train` run {runs}/two"),
    (["export", "{runs}/one", "{home}/model/config.json/exported"],
     "{home}/model/config.json/exported cannot be created: {home}/model/config.json is a file; choose another "
     "directory"),
])
def test_mistakes_with_runs_and_files_end_with_one_line(home, runs, args, message, capsys):
    places = dict(home=home, runs=home / "runs", data=home / "data")
    assert cli.main([arg.format(**places) for arg in args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"bitfit-fast {args[0]}: error: ")
    assert message.format(**places) in err
    assert not (home / "runs" / "failed").exists()


def test_a_model_fine_tuned_on_other_classes_trains_with_a_new_classifier(home, tmp_path, capsys):
    """A model exported with a classifier of 5 classes trains on the data's 3: that classifier is drawn anew (and
    named as new), where loading it stopped with transformers' size mismatch."""
    transformers.BertForSequenceClassification.from_pretrained(home / "model", num_labels=5).save_pretrained(
        tmp_path / "five-classes")
    transformers.AutoTokenizer.from_pretrained(home / "model").save_pretrained(tmp_path / "five-classes")
    data = home / "data"
    assert cli.main(["train", "--model", str(tmp_path / "five-classes"), "--epochs", "1", "--backend", "torch",
                     "--no-progress", "--train-file", str(data / "train.csv"), "--validation-file",
                     str(data / "val.csv"), "--output-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "3 classes" in out and "newly initialised, trained with the head: classifier" in out, out


def test_a_classifier_that_names_its_classes_answers_in_the_datas_class_order(home, tmp_path):
    """A checkpoint whose classifier names its classes (an exported run, a model fine-tuned elsewhere) trained in
    another order than the data's sorted one: its rows are reordered, so that each class keeps its logit. Other
    classes of the same number are drawn anew and named as new (reused by index, each would answer for another)."""
    from bitfit_fast.model import weights_drawn_at_random
    from bitfit_fast.train.models import load_pretrained

    classes = sorted(WORDS)
    saved_order = [classes[i] for i in (2, 0, 1)]
    named = transformers.BertForSequenceClassification.from_pretrained(
        home / "model", num_labels=3, id2label=dict(enumerate(saved_order)),
        label2id={name: i for i, name in enumerate(saved_order)}).eval()
    named.save_pretrained(tmp_path / "named")
    tokenizer = transformers.AutoTokenizer.from_pretrained(home / "model")
    tokenizer.save_pretrained(tmp_path / "named")
    inputs = tokenizer(["goal match team coach", "bank market price profit"], return_tensors="pt", padding=True)
    with torch.no_grad():
        by_saved_class = dict(zip(saved_order, named(**inputs).logits.unbind(-1)))

    model, _, info = load_pretrained(str(tmp_path / "named"), 3, classes, "the model")
    with torch.no_grad():
        logits = model.eval()(**inputs).logits
    for index, name in enumerate(classes):
        torch.testing.assert_close(logits[:, index], by_saved_class[name], msg=name)
    assert not any(key.startswith("classifier.") for key in info["missing_keys"])
    assert model.config.id2label == dict(enumerate(classes))

    # The same classes in other case: reordered as well.
    model, _, _ = load_pretrained(str(tmp_path / "named"), 3, [name.upper() for name in classes], "the model")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**inputs).logits, logits)
    # Classes the data only numbers ("0", "1", ...: it names none) keep the checkpoint's order.
    model, _, info = load_pretrained(str(tmp_path / "named"), 3, ["0", "1", "2"], "the model")
    assert torch.equal(model.classifier.weight, named.classifier.weight) and not info["missing_keys"]

    other, _, info = load_pretrained(str(tmp_path / "named"), 3, ["x", "y", "z"], "the model")
    assert {"classifier.weight", "classifier.bias"} <= set(info["missing_keys"])
    assert not torch.equal(other.classifier.weight, named.classifier.weight)
    # Drawn here as transformers marks what it draws: a frozen head of it would be warned of.
    assert {"classifier.weight", "classifier.bias"} <= weights_drawn_at_random(other)


def test_a_checkpoint_that_numbers_its_classes_keeps_its_classifier(home, tmp_path):
    """id2label of bare indices, as ints (a config written from dict(enumerate(...))) or strings: no names, so the
    classifier is kept by index whatever the data's class names."""
    from bitfit_fast.train.models import load_pretrained

    named = transformers.BertForSequenceClassification.from_pretrained(home / "model", num_labels=2)
    named.save_pretrained(tmp_path / "numbered")
    config = json.loads((tmp_path / "numbered" / "config.json").read_text())
    config.update(id2label={"0": 0, "1": 1}, label2id={"0": 0, "1": 1})
    (tmp_path / "numbered" / "config.json").write_text(json.dumps(config))
    transformers.AutoTokenizer.from_pretrained(home / "model").save_pretrained(tmp_path / "numbered")
    model, _, info = load_pretrained(str(tmp_path / "numbered"), 2, ["negative", "positive"], "the model")
    assert torch.equal(model.classifier.weight, named.classifier.weight) and not info["missing_keys"]


def test_a_runs_damaged_biases_are_named_with_the_one_fix_there_is(home, runs, tmp_path, capsys):
    """Only its training writes a run's biases: "save the biases again" (a checkpoint's own advice) is no fix."""
    run = tmp_path / "one"
    shutil.copytree(home / "runs" / "one", run)
    (run / "biases" / "bitfit_biases.safetensors").write_bytes(b"not safetensors")
    assert cli.main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bitfit-fast eval: error: {run / 'biases'} is damaged (SafetensorError: ")
    assert err.endswith("): train the run again\n") and "save the biases" not in err
    from bitfit_fast.task_bank import TaskBank

    model = transformers.AutoModelForSequenceClassification.from_pretrained(home / "model", num_labels=3)
    with pytest.raises(ValueError, match=rf"task 'one': {re.escape(str(run / 'biases'))} is damaged "
                                         r"\(SafetensorError: .*\): train the run again$"):
        TaskBank.load(model, {"one": run}, backend="torch")


def test_a_port_in_use_is_named_before_the_model_loads(home, capsys):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert cli.main(["serve", str(home / "not-a-run"), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port} (" in err and "choose another --port" in err


def test_a_backend_that_cannot_run_here_is_named_before_the_model_loads(home, runs, capsys, monkeypatch):
    monkeypatch.setattr("bitfit_fast_kernels.INTERPRETER", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["serve", str(home / "runs" / "one"), "--backend", "triton"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("bitfit-fast serve: error: --backend triton: backend='triton' needs a CUDA GPU")


def test_a_directory_this_user_may_not_write_in_is_named(home, runs, capsys, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != home)  # as for a user other than root
    out = home / "exported-unwritable"
    assert cli.main(["export", str(home / "runs" / "one"), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out} cannot be written: this user may not write in {home}; choose" in err
    assert not out.exists()


def test_network_errors_name_the_offline_alternative(first_stage):
    for name in ("misspelled hub name", "GLUE task without the network"):
        assert "set HF_HUB_OFFLINE=1" in first_stage[name][0].stderr
    assert "--train-file" in first_stage["GLUE task without the network"][0].stderr
    assert "leave --model out for the embedded all-MiniLM-L6-v2" in first_stage["misspelled hub name"][0].stderr


def test_debug_shows_the_traceback(first_stage):
    process, _ = first_stage["debug"]
    assert process.returncode != 0 and "Traceback" in process.stderr and "UserError" in process.stderr


# In-process: the same `main`, for mistakes that need no separate process to be believed.


@pytest.mark.parametrize("args,message", [
    (["train", "--text-columns", "a", "b", "c"], "--text-columns takes one or two columns, got 3"),
    (["train", "--text-columns", "text", "--label-column", "text"], "--label-column 'text' is also a text column"),
    (["train", "--text-columns", "text", "text"], "--text-columns names 'text' twice: a text pair is two columns"),
    (["train", "--model", ""], "--model is an empty name: give a hub name or a local directory"),
    (["predict", "runs/a", "runs/b", "--text", "hi"],
     "unrecognized arguments: runs/b (options: bitfit-fast predict --help)"),
    (["train", "--train-file", "t.csv"], "--train-file and --validation-file go together: give both"),
    (["train", "--task", "rte", "--train-file", "t.csv", "--validation-file", "v.csv"], "two data sources"),
    (["train", "--lr-sweep", "--lr", "1e-3"], "--lr-sweep tries the paper's learning rates itself: leave out --lr"),
    # AdamW scales each bias by 1 - lr * decay a step: the method's default rate, the given one, the sweep's largest.
    (["train", "--weight-decay", "1000"], "--weight-decay 1000 at learning rate 0.001 would zero or flip"),
    (["train", "--weight-decay", "200", "--lr", "0.01"], "--weight-decay 200 at learning rate 0.01"),
    (["train", "--weight-decay", "2e5", "--method", "full"], "--weight-decay 200000 at learning rate 1e-05"),
    (["train", "--weight-decay", "1000", "--lr-sweep"], "--weight-decay 1000 at learning rate 0.001"),
    (["predict", "run", "--input-file", "f.csv", "--text-pair", "b"], "--text-pair gives the second text"),
    (["predict", "run", "--text", "a", "--text-pair", "b", "c"], "got 1 --text and 2 --text-pair"),
])
def test_conflicting_arguments_end_with_one_line(args, message, capsys):
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"bitfit-fast {args[0]}: error: ") and message in err


@pytest.mark.parametrize("args,message", [
    (["train", "--lr", "-1"], "argument --lr: must be more than 0, got -1"),
    (["train", "--lr", "1e38"], "argument --lr: must be at most 1.0, got 1e38"),
    (["train", "--epochs", "0"], "argument --epochs: must be at least 1, got 0"),
    (["train", "--max-length", "0"], "argument --max-length: must be at least 1, got 0"),
    (["train", "--micro-batch-size", "0"], "argument --micro-batch-size: must be at least 1"),
    (["train", "--max-grad-norm", "0"], "argument --max-grad-norm: must be more than 0"),
    (["train", "--weight-decay", "-0.1"], "argument --weight-decay: must be at least 0"),
    (["train", "--lr", "nan"], "argument --lr: must be a finite number, got nan"),
    (["train", "--lr", "inf"], "argument --lr: must be a finite number, got inf"),  # not "more than 0"
    (["train", "--weight-decay", "nan"], "argument --weight-decay: must be a finite number, got nan"),
    (["train", "--epochs", "two"], "argument --epochs: 'two' is not an integer"),
    (["serve", "run", "--max-wait-ms", "1e308"], "argument --max-wait-ms: must be at most 60000.0, got 1e308"),
    (["train", "--seed", str(2**64)], f"argument --seed: must be at most {2**63 - 1}, got {2**64}"),  # a traceback
    (["train", "--split-seed", str(-2**63 - 1)], f"argument --split-seed: must be at least {-2**63}"),
    (["train", "--seed", "9" * 400], "argument --seed: must be at most"),  # too large for a float: OverflowError
    (["train", "--save-every", "-1"], "argument --save-every: must be at least 0"),
    (["train", "--method", "lora"], "argument --method: invalid choice: 'lora'"),
    (["train", "--task", "sst3"], "argument --task: invalid choice: 'sst3'"),
    (["train", "--bf16", "--fp16"], "argument --fp16: not allowed with argument --bf16"),
    (["train", "--fp32", "--bf16"], "argument --bf16: not allowed with argument --fp32"),
    (["predict", "runs/a"], "one of the arguments --text --input-file is required"),
    (["eval"], "the following arguments are required: RUN"),
    (["serve", "runs/a", "--port", "70000"], "argument --port: must be at most 65535, got 70000"),
])
def test_argument_ranges_are_checked_before_anything_loads(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"bitfit-fast {args[0]}: error: {message}")
    assert "Traceback" not in err


def test_choices_and_help_come_from_the_library():
    from bitfit_fast.backend import BACKENDS
    from bitfit_fast.config import MEMORY_MODES
    from bitfit_fast.train import METHODS

    train = cli.build_parser()._subparsers._group_actions[0].choices["train"]
    actions = {action.dest: action for action in train._actions}
    assert tuple(actions["method"].choices) == METHODS
    fields = {field.name: field for field in dataclasses.fields(BitFitConfig)}
    for name, constant in (("backend", BACKENDS), ("memory", MEMORY_MODES)):
        action, field = actions[name], fields[name]
        assert tuple(action.choices) == constant == field.metadata["choices"], name
        assert (action.help, action.default) == (field.metadata["help"], field.default), name
    args = cli.build_parser().parse_args(["train", "--method", "subset", "--backend", "torch", "--memory", "minimal"])
    assert cli.train_config(args).bitfit == BitFitConfig(biases="subset", backend="torch", memory="minimal")


def test_the_package_loads_torch_on_first_use_so_ctrl_c_while_it_loads_is_one_line(monkeypatch, capsys):
    """`bitfit-fast` imports bitfit_fast before main() runs: were torch loaded there, a Ctrl-C in its first seconds
    would print a traceback; main() loads it, and says one line."""
    probe = "import sys, bitfit_fast, bitfit_fast.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout == "False\n"

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["train"]) == 130
    assert capsys.readouterr().err == "bitfit-fast: interrupted\n"


def test_bench_writes_under_runs_by_default_and_documents_its_presets(capsys):
    from bitfit_fast_benches.presets import PRESETS

    args = cli.build_parser().parse_args(["bench"])
    assert args.out == "runs/bench"
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: runs/bench)" in help_text
    for name in PRESETS:
        assert f"{name}: " in help_text
    assert "tiny is a smoke test" in help_text


def test_the_hub_probe_goes_through_the_proxy(monkeypatch):
    """Behind a proxy the hub is reached through it: the proxy is what must answer."""
    import huggingface_hub.constants

    from bitfit_fast.errors import UserError
    from bitfit_fast.train.hub import require_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://huggingface.co")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(UserError, match=r"--model x needs the Hugging Face hub, and 127.0.0.1:9 cannot be reached"):
        require_hub("--model x", "pass a local directory")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    require_hub("--model x", "pass a local directory")  # offline: the local cache only, nothing to probe


@pytest.mark.parametrize("checkpoint", [True, False])
def test_a_run_without_finished_epochs_says_how_to_go_on(home, runs, tmp_path, checkpoint, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(home / "runs" / "one" / "run_config.json", unfinished)
    if checkpoint:
        shutil.copy(home / "runs" / "one" / "checkpoint.pt", unfinished)
    assert cli.main(["predict", str(unfinished), "--text", "goal"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert ("continue the run with the options it started with (its run_config.json) and `--resume`" if checkpoint
            else "no epoch has finished and no checkpoint was saved: train it again") in err


def test_a_full_disk_or_a_file_it_may_not_read_ends_train_with_one_line(home, tmp_path, monkeypatch, capsys):
    """The machine's errors are no bugs: a disk that fills while a run saves (torch's own file writer said
    "unexpected pos ..." in a traceback) and a file this user may not read end with one line naming the file and
    what continues the run. A run's biases are saved after its checkpoint: where their save fails, --resume saves
    them; where the first checkpoint's fails, no biases/ is left (an empty one passed for a finished run's) and the
    same command trains again."""
    import torch

    from bitfit_fast import checkpoint
    from bitfit_fast.train import run as run_module

    data = home / "data"
    out = tmp_path / "run"
    train = ["train", "--model", str(home / "model"), "--epochs", "1", "--backend", "torch", "--no-progress",
             "--train-file", str(data / "train.csv"), "--validation-file", str(data / "val.csv"),
             "--output-dir", str(out)]

    def disk_full(contents):
        raise OSError(errno.ENOSPC, "No space left on device", str(next(iter(contents))))

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "atomic_write_together", disk_full)
        assert cli.main(train) == 2
    err = capsys.readouterr().err
    assert err == (f"bitfit-fast train: error: no space left on the device ({out / 'biases'}/bitfit_biases.safetensors)"
                   ": free some space (files written before are whole); the same command with --resume continues "
                   f"from its last checkpoint, {out / 'checkpoint.pt'}\n")
    assert sorted(path.name for path in out.iterdir()) == ["checkpoint.pt", "run_config.json"]
    assert cli.main([*train, "--resume"]) == 0
    capsys.readouterr()
    assert (out / "biases" / "bitfit_biases.safetensors").is_file()
    shutil.rmtree(out)

    real_save = torch.save

    def checkpoint_disk_full(obj, file, *args, **kwargs):  # as a write to a Python file fails: no file named
        real_save(obj, file, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(run_module.torch, "save", checkpoint_disk_full)
        assert cli.main(train) == 2
    err = capsys.readouterr().err
    assert err == (f"bitfit-fast train: error: no space left on the device (writing in {out}): free some space (files "
                   "written before are whole); it stopped before its first checkpoint: the same command starts it "
                   "again\n")
    assert sorted(path.name for path in out.iterdir()) == ["run_config.json"]
    assert cli.main(train) == 0
    capsys.readouterr()

    def not_readable(args):
        raise PermissionError(errno.EACCES, "Permission denied", str(data / "train.csv"))

    monkeypatch.setattr(cli, "_train", not_readable)
    assert cli.main(train) == 2
    assert capsys.readouterr().err.startswith(f"bitfit-fast train: error: permission denied ({data / 'train.csv'}): "
                                              "give this user access to it, or use another path; ")


def test_under_torchrun_each_error_is_one_write_and_results_are_printed_once(monkeypatch, capsys):
    """Every process says a mistake: print's two writes (the text, then the newline) ran the processes' lines
    together. Each process evaluates, the main one prints; a command that ends ends its process group."""
    import torch.distributed as dist

    from bitfit_fast import serve

    writes = []
    monkeypatch.setattr(sys, "stderr", types.SimpleNamespace(write=writes.append, flush=lambda: None))
    assert cli.main(["predict", "/nonexistent/run", "--text", "goal"]) == 2
    assert cli.main(["predict", "run", "--text", "goal", "--unknown"]) == 2
    assert len(writes) == 2 and all(w.startswith("bitfit-fast ") and w.count("\n") == 1 and w.endswith("\n")
                                    for w in writes), writes
    monkeypatch.setattr(serve, "evaluate_checkpoints",
                        lambda runs, file: {"run": {"validation": {"accuracy": 0.5, "examples": 2}}})
    ended = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: ended.append(True))
    for rank, printed in (("1", ""), ("0", "run: validation accuracy 0.5000 (2 examples)\n")):
        monkeypatch.setenv("RANK", rank)
        assert cli.main(["eval", "run"]) == 0
        assert capsys.readouterr().out == printed
    assert ended == [True, True]


@pytest.mark.parametrize("checkpoint", [True, False])
def test_ctrl_c_ends_train_with_one_line_naming_the_checkpoint(monkeypatch, tmp_path, checkpoint, capsys):
    out = tmp_path / "run"
    out.mkdir()
    if checkpoint:
        (out / "checkpoint.pt").write_bytes(b"")

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_train", interrupted)
    assert cli.main(["train", "--output-dir", str(out)]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bitfit-fast train: interrupted")
    assert ("the same command with --resume continues from its last checkpoint" in err) == checkpoint
    assert ("it stopped before its first checkpoint: the same command starts it again" in err) != checkpoint
    assert cli.main(["train", "--lr-sweep", "--output-dir", str(out)]) == 130  # its checkpoints: OUTPUT_DIR/lr-*/
    assert capsys.readouterr().err == ("bitfit-fast train: interrupted; the same command with --resume continues the "
                                       "sweep: the learning rates that finished are kept, the one interrupted "
                                       f"continues from its last checkpoint ({out}/lr-<rate>/checkpoint.pt), if it "
                                       "wrote one\n")
    joint = ["train", "--output-dir", str(out), "--task-files", "a", "t.csv", "v.csv", "--task-files", "b", "t.csv",
             "v.csv"]
    assert cli.main(joint) == 130
    assert capsys.readouterr().err == ("bitfit-fast train: interrupted; no epoch had finished: the same command starts "
                                       "it again\n")
    (out / "b" / "biases").mkdir(parents=True)  # an epoch finished
    assert cli.main(joint) == 130
    assert capsys.readouterr().err == (f"bitfit-fast train: interrupted; a joint run has no --resume: the task runs in "
                                       f"{out} keep the biases of the epochs that finished; to train again, remove "
                                       f"{out} or choose another --output-dir\n")
