"""save_biases / load_biases / merge round trips and their error paths."""

import copy
import json
import os
import pathlib
import re
import warnings

import pytest
import torch
import transformers
from bitfit_reference import TINY, adamw_steps, padded_batch, tiny_bert, tiny_roberta, trainable
from test_bias_free import tiny_modernbert

import bitfit_fast
import bitfit_fast.checkpoint
import bitfit_fast.model
from bitfit_fast.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from bitfit_fast.files import atomic_write, write_json


def trained(make=tiny_bert, biases="all"):
    model = make()
    base = copy.deepcopy(model)
    bitfit_fast.apply(model, biases=biases)
    adamw_steps(model, [padded_batch(model) for _ in range(3)])
    model.eval()
    return model, base


def same_base(base, model):
    """``model`` (a fresh model, its config of its own) with ``base``'s weights: biases trained on ``base`` load onto
    it, not onto a model of other (random) weights."""
    model.load_state_dict(base.state_dict())
    return model


def test_save_writes_only_the_small_files_and_load_reproduces_logits(tmp_path):
    model, base = trained()
    bitfit_fast.save_biases(model, tmp_path / "sst2")
    assert sorted(p.name for p in (tmp_path / "sst2").iterdir()) == [WEIGHTS_NAME, CONFIG_NAME]
    n_trained = sum(p.numel() for p in trainable(model).values())
    assert (tmp_path / "sst2" / WEIGHTS_NAME).stat().st_size < 4 * n_trained + 4096

    bitfit_fast.load_biases(base, tmp_path / "sst2")  # a plain base model is set up from the saved options
    base.eval()
    batch = padded_batch(model)
    torch.testing.assert_close(base(**batch).logits, model(**batch).logits, atol=0, rtol=0)
    assert trainable(base).keys() == trainable(model).keys()


def test_bias_sets_swap_on_one_base_model(tmp_path):
    first, base = trained(tiny_roberta)
    second = copy.deepcopy(base)
    bitfit_fast.apply(second)
    adamw_steps(second, [padded_batch(second) for _ in range(2)])
    bitfit_fast.save_biases(first, tmp_path / "a")
    bitfit_fast.save_biases(second, tmp_path / "b")
    bitfit_fast.apply(base)
    batch = padded_batch(base)
    for path, model in [(tmp_path / "a", first), (tmp_path / "b", second.eval()), (tmp_path / "a", first)]:
        bitfit_fast.load_biases(base, path)
        torch.testing.assert_close(base.eval()(**batch).logits, model(**batch).logits, atol=0, rtol=0)


def test_merge_gives_a_vanilla_hugging_face_model(tmp_path):
    model, base = trained()
    batch = padded_batch(model)
    logits = model(**batch).logits
    trained_values = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    merged = bitfit_fast.merge(model)
    assert not any(type(m).__module__.startswith("bitfit_fast") for m in merged.modules())
    assert list(merged.state_dict()) == list(base.state_dict())
    state = merged.state_dict()
    assert all(torch.equal(state[name], value) for name, value in trained_values.items())
    # Same values; the fused path runs real tokens only, so its sums round in another order than the padded ones.
    torch.testing.assert_close(merged(**batch).logits, logits, atol=1e-6, rtol=0)
    merged.save_pretrained(tmp_path / "hf")
    reloaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(reloaded(**batch).logits, logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["distilbert", "modernbert"])
def test_merge_converts_the_layer_norms_a_fused_layer_holds_itself(family):
    """DistilBERT's and ModernBERT's fused layers hold their LayerNorms as their own children: merge gives them back
    as torch modules too (they stayed BitFit modules in the layers' old module dicts once), so the merged model is
    vanilla and can be applied again."""
    from test_fused_distilbert import tiny_distilbert

    model = {"distilbert": tiny_distilbert, "modernbert": tiny_modernbert}[family]()
    bitfit_fast.apply(model, backend="torch", announce=False)
    merged = bitfit_fast.merge(model)
    assert not any(type(m).__module__.startswith("bitfit_fast") for m in merged.modules())
    bitfit_fast.apply(merged, backend="torch", announce=False)


def test_class_names_travel_with_the_biases_to_a_merged_model(tmp_path):
    """save_biases keeps the head's class names (not placeholders); load_biases puts them on the model it loads
    into, so a merged save_pretrained model answers "sport", not LABEL_2; a TaskBank's tasks keep them too."""
    names = ["business", "sport", "tech"]
    model, base = trained(lambda: tiny_bert(id2label=dict(enumerate(names)),
                                            label2id={n: i for i, n in enumerate(names)}))
    bitfit_fast.save_biases(model, tmp_path / "named")
    assert json.loads((tmp_path / "named" / CONFIG_NAME).read_text())["label_names"] == names
    unnamed = bitfit_fast.apply(same_base(base, tiny_bert()), announce=False)
    bitfit_fast.save_biases(unnamed, tmp_path / "placeholders")  # LABEL_0, LABEL_1, ...: nothing to keep
    assert "label_names" not in json.loads((tmp_path / "placeholders" / CONFIG_NAME).read_text())

    plain = tiny_bert()
    plain.load_state_dict(base.state_dict())
    merged = bitfit_fast.merge(bitfit_fast.load_biases(plain, tmp_path / "named"))
    merged.save_pretrained(tmp_path / "hf")
    reloaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert reloaded.config.id2label == dict(enumerate(names))
    assert reloaded.config.label2id == {n: i for i, n in enumerate(names)}

    # Swapping to a head saved without names drops the names; a model built from the same config keeps its own.
    config = transformers.BertConfig(**{**TINY, "max_position_embeddings": 64}, num_labels=3)  # tiny_bert's
    swapped, sibling = (same_base(base, transformers.BertForSequenceClassification(config)) for _ in range(2))
    bitfit_fast.load_biases(swapped, tmp_path / "named")
    assert swapped.config.id2label == dict(enumerate(names)) and sibling.config.id2label[0] == "LABEL_0"
    bitfit_fast.load_biases(swapped, tmp_path / "placeholders")
    assert swapped.config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}

    bank = bitfit_fast.TaskBank.load(copy.deepcopy(plain), {"topics": tmp_path / "named"})
    assert bank.tasks["topics"].label_names == names
    bank.save_task("topics", tmp_path / "again")
    assert bitfit_fast.load_biases(same_base(base, tiny_bert()), tmp_path / "again").config.id2label == dict(
        enumerate(names))

    # Classes that the data names 0, 1, 2 are names too (not LABEL_i): what predict answers, the merged model does.
    numbered = ["0", "1", "2"]
    model.config.id2label, model.config.label2id = dict(enumerate(numbered)), {n: i for i, n in enumerate(numbered)}
    bitfit_fast.save_biases(model, tmp_path / "numbered")
    assert bitfit_fast.load_biases(same_base(base, tiny_bert()), tmp_path / "numbered").config.id2label == dict(
        enumerate(numbered))


def test_a_checkpoint_without_the_head_leaves_the_class_names_alone(tmp_path):
    """Biases saved with train_head=False hold no head: loading them says nothing of the classes, so the model keeps
    its own names (it would answer LABEL_i after a merge)."""
    base = tiny_bert()
    model = bitfit_fast.apply(copy.deepcopy(base), biases=["attention.self.value"], train_head=False, announce=False)
    bitfit_fast.save_biases(model, tmp_path)
    names = ["sport", "tech", "money"]
    named = same_base(base, tiny_bert(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}))
    assert bitfit_fast.load_biases(named, tmp_path).config.id2label == dict(enumerate(names))


def test_an_applied_model_whose_head_was_frozen_loads_the_head_it_trained(tmp_path):
    """An applied model still trains (and saves) a head frozen since apply(): strict loading takes a checkpoint
    that holds the head and refuses one without it, whose missing head the next save would write stale."""
    model, base = trained()
    bitfit_fast.save_biases(model, tmp_path / "with-head")
    without = bitfit_fast.apply(copy.deepcopy(base), train_head=False, announce=False)
    bitfit_fast.save_biases(without, tmp_path / "without-head")
    target = bitfit_fast.apply(copy.deepcopy(base), announce=False)
    target.classifier.requires_grad_(False)
    bitfit_fast.load_biases(target, tmp_path / "with-head")
    torch.testing.assert_close(target.classifier.bias, model.classifier.bias, atol=0, rtol=0)
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"classifier\.(weight|bias)"):
        bitfit_fast.load_biases(target, tmp_path / "without-head")
    assert_unchanged(target, before)


def test_load_biases_runs_on_the_backend_asked_for(tmp_path):
    """The backend belongs to the machine, not to the checkpoint: torch where the kernels would run by default."""
    model, base = trained()
    bitfit_fast.save_biases(model, tmp_path)
    assert bitfit_fast.model.config_of(model).backend == "auto"
    loaded = bitfit_fast.load_biases(base, tmp_path, backend="torch")
    assert bitfit_fast.model.config_of(loaded).backend == "torch"
    backends = {m.backend for m in loaded.modules() if isinstance(m, (bitfit_fast.BitFitLinear,
                                                                      bitfit_fast.BitFitLayerNorm))}
    assert backends == {"torch"}


def test_options_of_a_newer_version_are_refused_not_dropped(tmp_path):
    model, base = trained()
    bitfit_fast.save_biases(model, tmp_path)
    record = json.loads((tmp_path / CONFIG_NAME).read_text())
    record["config"]["future_option"] = True
    (tmp_path / CONFIG_NAME).write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"unknown BitFitConfig options \['future_option'\]: saved by a newer "
                                         r"bitfit_fast\? Upgrade it"):
        bitfit_fast.load_biases(base, tmp_path)


def test_merge_gives_the_weights_their_own_dtype_back(tmp_path):
    """An fp16 model applied with dtype=bfloat16 merges back to fp16 weights, not fp32."""
    model = bitfit_fast.apply(tiny_bert().half(), dtype=torch.bfloat16, announce=False)
    assert model.bert.encoder.layer[0].intermediate.dense.weight.dtype == torch.bfloat16
    with pytest.warns(UserWarning, match="are back in their original dtype"):
        merged = bitfit_fast.merge(model)
    assert {p.dtype for p in merged.parameters()} == {torch.float16}


def test_load_errors_leave_the_model_untouched(tmp_path):
    model, _ = trained(biases="subset")
    bitfit_fast.save_biases(model, tmp_path / "subset")

    with pytest.raises(FileNotFoundError, match="no bitfit_fast checkpoint"):
        bitfit_fast.load_biases(model, tmp_path / "missing")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"a `bitfit-fast train` run, whose best biases are in .*run/biases"):
        bitfit_fast.load_biases(model, tmp_path / "run")

    other = bitfit_fast.apply(tiny_bert())  # trains every bias: the subset checkpoint lacks most
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    with pytest.raises(ValueError, match="the model trains parameters that the checkpoint lacks"):
        bitfit_fast.load_biases(other, tmp_path / "subset")
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters())
    deeper = tiny_bert(num_hidden_layers=3)  # not applied: the checkpoint's options, but one layer more
    with pytest.raises(ValueError, match=r"checkpoint lacks: \['bert.encoder.layer.2.*; it was saved from another "
                                         r"base model: load it onto the one it was trained from \(strict=False"):
        bitfit_fast.load_biases(deeper, tmp_path / "subset")
    with pytest.warns(UserWarning, match="were trained on another base model"):  # other's weights are random too
        bitfit_fast.load_biases(other, tmp_path / "subset", strict=False)
    assert not all(torch.equal(p, before[n]) for n, p in other.named_parameters())

    wrong_labels = bitfit_fast.apply(tiny_bert(num_labels=5), biases="subset")
    with pytest.raises(ValueError, match=r"shape mismatch.*classifier"):
        bitfit_fast.load_biases(wrong_labels, tmp_path / "subset")

    wider = bitfit_fast.apply(tiny_bert(intermediate_size=TINY["intermediate_size"] + 8), biases="subset")
    before = {n: p.detach().clone() for n, p in wider.named_parameters()}  # the head matches, the body does not
    with pytest.raises(ValueError, match=r"shape mismatch.*intermediate.*load it onto the base model it was trained"):
        bitfit_fast.load_biases(wider, tmp_path / "subset")
    assert all(torch.equal(p, before[n]) for n, p in wider.named_parameters())

    wrong_model = tiny_roberta()
    message = "saved from a BertForSequenceClassification, not a RobertaForSequenceClassification"
    with pytest.raises(ValueError, match=message):
        bitfit_fast.load_biases(wrong_model, tmp_path / "subset")


def test_strict_false_loads_into_another_class_of_the_same_names(tmp_path):
    """A subclass (a user's own wrapper of the same modules) is another class: refused by default, loaded with
    strict=False, every trained value in place."""
    model, base = trained()
    bitfit_fast.save_biases(model, tmp_path)

    class Renamed(transformers.BertForSequenceClassification):
        pass

    renamed = same_base(base, Renamed(base.config))
    with pytest.raises(ValueError, match="saved from a BertForSequenceClassification, not a Renamed"):
        bitfit_fast.load_biases(renamed, tmp_path)
    bitfit_fast.load_biases(renamed, tmp_path, strict=False)
    loaded = trainable(renamed)
    assert loaded.keys() == trainable(model).keys()
    assert all(torch.equal(loaded[name], param) for name, param in trainable(model).items())


def test_loading_onto_a_model_without_storage_is_refused_not_silently_empty(tmp_path):
    model, _ = trained()
    bitfit_fast.save_biases(model, tmp_path)
    with torch.device("meta"):  # what init_empty_weights-style loading leaves before the weights arrive
        empty = type(model)(model.config)
    with pytest.raises(ValueError, match="on the meta device, with no values to load into"):
        bitfit_fast.load_biases(empty, tmp_path)
    assert not bitfit_fast.model.is_applied(empty)


def test_biases_are_not_saved_into_a_training_run(tmp_path):
    """A run's directory means its biases/ to TaskBank, eval and serve: biases saved beside them would be ignored
    by those and read by load_biases, two meanings for one path."""
    model, _ = trained()
    (tmp_path / "run_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"is a `bitfit-fast train` run \(run_config.json\); save the biases into "
                                         "another directory"):
        bitfit_fast.save_biases(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_config.json"]


def snapshot(model) -> tuple[dict, dict, list, object]:
    """Everything a load could change: the state_dict, the requires_grad flags, the module classes and the
    applied config."""
    return ({name: value.clone() for name, value in model.state_dict().items()},
            {name: p.requires_grad for name, p in model.named_parameters()},
            [type(m).__name__ for m in model.modules()], getattr(model, "bitfit_fast_config", None))


def assert_unchanged(model, before) -> None:
    state, flags, classes, config = snapshot(model)
    assert state.keys() == before[0].keys() and all(torch.equal(v, before[0][k]) for k, v in state.items())
    assert (flags, classes, config) == before[1:]


@pytest.mark.parametrize("make", [tiny_bert, tiny_modernbert], ids=["bert", "modernbert-bias-free"])
def test_a_failed_load_onto_a_plain_model_leaves_it_plain(tmp_path, make):
    model, _ = trained(make)
    bitfit_fast.save_biases(model, tmp_path)
    other_labels = make(num_labels=2)
    before = snapshot(other_labels)
    with pytest.raises(ValueError, match=r"shape mismatch .*classifier.*; the head differs: build the base model with "
                                         r"the checkpoint's number of labels, 3"):
        bitfit_fast.load_biases(other_labels, tmp_path)
    assert_unchanged(other_labels, before)  # not applied: no fused layer, no added bias, no flag changed
    bitfit_fast.apply(other_labels)  # and so it can still be applied


def test_a_model_whose_weight_passes_2_24_elements_saves_and_loads(tmp_path):
    """BERT-base's word embeddings hold 23.4M values, past fp32's exact integers: the sampled places, taken in fp32
    as every earlier checkpoint took them, rounded one past the last element (an IndexError; a device-side assert
    on a GPU). Here 470,000 x 36 = 16.92M values, whose last place rounded so."""
    base = tiny_bert(vocab_size=470_000)
    model = bitfit_fast.apply(copy.deepcopy(base), announce=False)
    bitfit_fast.save_biases(model, tmp_path / "biases")
    record = json.loads((tmp_path / "biases" / CONFIG_NAME).read_text())
    embeddings = base.bert.embeddings.word_embeddings.weight.detach().reshape(-1)
    assert record["base_sample"]["bert.embeddings.word_embeddings.weight"]["values"][-1] == embeddings[-1].item()
    bitfit_fast.load_biases(bitfit_fast.apply(copy.deepcopy(base), announce=False), tmp_path / "biases")


def test_biases_are_refused_on_another_base_model_of_the_same_shapes(tmp_path):
    """Biases trained on one base model are meaningless on another of the same shapes, and a path does not tell
    them apart: the checkpoint keeps a few values of every frozen weight (not the head's, new for each task) and
    loading compares them. A base loaded in bf16 still matches; a checkpoint of an earlier version, which kept no
    values, loads anywhere."""
    model, base = trained()
    bitfit_fast.save_biases(model, tmp_path / "biases")
    record = json.loads((tmp_path / "biases" / CONFIG_NAME).read_text())
    assert set(record["base_sample"]) == {n for n, p in model.named_parameters() if not p.requires_grad}
    assert all(len(entry["values"]) == 4 and entry["dtype"] == "float32" for entry in record["base_sample"].values())

    other = tiny_bert()  # the same config, other (random) weights
    nudged = copy.deepcopy(base)  # one frozen weight deep inside moved by what an optimizer step would move it
    with torch.no_grad():
        nudged.bert.encoder.layer[1].output.dense.weight.add_(1e-5)
    for target, differs in ((other, "bert.embeddings.word_embeddings.weight"),
                            (nudged, "bert.encoder.layer.1.output.dense.weight")):
        before = snapshot(target)
        refused = (rf"the biases in .*biases were trained on another base model: this model's {differs} holds "
                   r"other values; load them onto the base model they were trained on \(strict=False loads them")
        with pytest.raises(bitfit_fast.OtherBaseModelError, match=refused):
            bitfit_fast.load_biases(target, tmp_path / "biases")
        assert_unchanged(target, before)
    with pytest.warns(UserWarning, match="were trained on another base model"):
        bitfit_fast.load_biases(other, tmp_path / "biases", strict=False)
    torch.testing.assert_close(other.classifier.bias, model.classifier.bias, atol=0, rtol=0)

    with pytest.warns(UserWarning, match=r"bfloat16 parameters round the saved values of .* float32 biases"):
        in_bf16 = bitfit_fast.load_biases(copy.deepcopy(base).to(torch.bfloat16), tmp_path / "biases")
    torch.testing.assert_close(in_bf16.classifier.bias.float(), model.classifier.bias.bfloat16().float())
    with warnings.catch_warnings():  # the values bf16 holds exactly (saved from it) load without a word
        warnings.simplefilter("error")
        bitfit_fast.save_biases(in_bf16, tmp_path / "saved-in-bf16")
        bitfit_fast.load_biases(copy.deepcopy(base).to(torch.bfloat16), tmp_path / "saved-in-bf16")
    bank = bitfit_fast.TaskBank.load(copy.deepcopy(base), {"task": tmp_path / "biases"})
    bank.save_task("task", tmp_path / "from-bank")
    assert json.loads((tmp_path / "from-bank" / CONFIG_NAME).read_text())["base_sample"] == record["base_sample"]

    del record["base_sample"]  # as an earlier version saved it
    (tmp_path / "biases" / CONFIG_NAME).write_text(json.dumps(record))
    bitfit_fast.load_biases(tiny_bert(), tmp_path / "biases")


def test_diverged_biases_are_saved_and_loaded_as_they_are_and_said_to_be_nan(tmp_path):
    """A bias holding NaN was saved without a word and, loaded in the same dtype, said to be rounded."""
    base = tiny_bert()
    model = bitfit_fast.apply(copy.deepcopy(base), announce=False)
    with torch.no_grad():
        model.classifier.bias[1] = float("nan")
    with pytest.warns(UserWarning, match=r"save_biases: classifier.bias holds NaN or infinite values \(training "
                                         r"diverged\?\)"):
        bitfit_fast.save_biases(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing rounds: no warning
        loaded = bitfit_fast.load_biases(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(loaded.classifier.bias, model.classifier.bias, atol=0, rtol=0, equal_nan=True)


def test_a_base_in_half_precision_matches_down_to_weights_below_its_range(tmp_path):
    base = tiny_bert()
    with torch.no_grad():  # as MiniLM's last LayerNorm, whose γ goes down to 1e-33: 0 in fp16
        base.bert.encoder.layer[-1].output.LayerNorm.weight.fill_(1e-33)
    bitfit_fast.save_biases(bitfit_fast.apply(copy.deepcopy(base), announce=False), tmp_path)
    for dtype in (torch.float16, torch.bfloat16):
        with pytest.warns(UserWarning, match="parameters round the saved values of classifier.weight;"):
            bitfit_fast.load_biases(copy.deepcopy(base).to(dtype), tmp_path)


def test_biases_trained_through_a_frozen_head_are_refused_where_that_head_differs(tmp_path):
    """With train_head=False the biases answer through the base model's own frozen head, which is not saved: it is
    part of the base they were trained on (a pretrained MLM head; a classifier from a fine-tuned checkpoint, or one
    newly initialised, a different one at every from_pretrained), so it must be compared like any frozen weight."""
    base = tiny_bert()
    model = bitfit_fast.apply(copy.deepcopy(base), train_head=False, announce=False)
    bitfit_fast.save_biases(model, tmp_path)
    other_head = copy.deepcopy(base)
    with torch.no_grad():
        other_head.classifier.weight.normal_(0.0, 0.02)
    with pytest.raises(bitfit_fast.OtherBaseModelError, match=r"classifier\.weight holds other values"):
        bitfit_fast.load_biases(other_head, tmp_path)
    bitfit_fast.load_biases(copy.deepcopy(base), tmp_path)  # its own head: loads
    bank = bitfit_fast.TaskBank.new(copy.deepcopy(base), {"a": 3, "b": 3}, train_head=False)
    bank.save_task("a", tmp_path / "from-bank")
    with pytest.raises(bitfit_fast.OtherBaseModelError, match=r"classifier\.weight"):
        bitfit_fast.TaskBank.load(copy.deepcopy(other_head), {"a": tmp_path / "from-bank"})


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_biases_of_weights_stored_in_float8_load_onto_the_exact_base(tmp_path, dtype):
    """apply(dtype=...) accepts any floating dtype; merge()'s docstring sends a user to a fresh base applied with
    dtype=None for the exact weights. The base sample must not be taken of the rounded copies (or must allow for
    their rounding): biases of a float8 run load onto the very base they were trained from."""
    base = tiny_bert()
    model = bitfit_fast.apply(copy.deepcopy(base), dtype=dtype, announce=False)
    bitfit_fast.save_biases(model, tmp_path)
    bitfit_fast.load_biases(copy.deepcopy(base), tmp_path)


def test_only_one_differing_weight_deep_in_the_model_is_refused_in_a_bank_too(tmp_path):
    """Each sampled weight is compared, in TaskBank.load as in load_biases (not only the first, the embeddings)."""
    base = tiny_bert()
    bitfit_fast.save_biases(bitfit_fast.apply(copy.deepcopy(base), announce=False), tmp_path / "task")
    nudged = copy.deepcopy(base)
    with torch.no_grad():
        nudged.bert.encoder.layer[1].attention.self.value.weight.mul_(1.1)
    with pytest.raises(bitfit_fast.OtherBaseModelError, match=r"layer\.1\.attention\.self\.value\.weight"):
        bitfit_fast.TaskBank.load(nudged, {"task": tmp_path / "task"})


def test_a_head_frozen_after_training_is_still_saved(tmp_path):
    model, base = trained()
    model.classifier.requires_grad_(False)  # e.g. a second stage that trains the biases only
    bitfit_fast.save_biases(model, tmp_path)
    bitfit_fast.load_biases(base, tmp_path)
    batch = padded_batch(model)
    torch.testing.assert_close(base.eval()(**batch).logits, model(**batch).logits, atol=0, rtol=0)


def test_a_checkpoint_of_more_biases_than_the_model_trains_is_refused(tmp_path):
    """Loaded into frozen parameters, those values would silently be missing from the model's next save."""
    model, base = trained(biases="all")
    bitfit_fast.save_biases(model, tmp_path)
    subset = bitfit_fast.apply(base, biases="subset")
    before = snapshot(subset)
    with pytest.raises(ValueError, match=r"trained values of parameters the model does not train: .*saved with "
                                         r"BitFitConfig\(biases='all'.*applied with BitFitConfig\(biases='subset'"):
        bitfit_fast.load_biases(subset, tmp_path)
    assert_unchanged(subset, before)


def _truncate(path):
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize("damage", [
    lambda d: _truncate(d / WEIGHTS_NAME),
    lambda d: _truncate(d / CONFIG_NAME),
    lambda d: (d / CONFIG_NAME).write_text(json.dumps({k: v for k, v in json.loads((d / CONFIG_NAME).read_text())
                                                       .items() if k != "config"})),
    lambda d: (d / CONFIG_NAME).write_text("{}"),
    lambda d: (d / CONFIG_NAME).write_bytes(b'{"config": "\xff\xfe"}'),
    lambda d: (d / CONFIG_NAME).write_text((d / CONFIG_NAME).read_text().replace('"values": [', '"values": ["x", ')),
], ids=["safetensors-truncated", "json-truncated", "json-without-config", "json-empty", "json-not-utf8",
        "base-sample-not-numbers"])
def test_a_damaged_checkpoint_is_named_and_the_model_left_as_it_was(tmp_path, damage):
    model, base = trained()
    bitfit_fast.save_biases(model, tmp_path)
    damage(tmp_path)
    before = snapshot(base)
    with pytest.raises(ValueError, match=f"the checkpoint in {tmp_path} is damaged .*: save the biases again"):
        bitfit_fast.load_biases(base, tmp_path)
    assert_unchanged(base, before)


def test_saving_again_replaces_the_files_atomically(tmp_path):
    model, base = trained()
    bitfit_fast.save_biases(model, tmp_path)
    with torch.no_grad():
        model.classifier.bias.add_(1)
    bitfit_fast.save_biases(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIGHTS_NAME, CONFIG_NAME], "no temporary files remain"
    fresh = bitfit_fast.apply(base)
    bitfit_fast.load_biases(fresh, tmp_path)
    torch.testing.assert_close(fresh.classifier.bias, model.classifier.bias, atol=0, rtol=0)


def test_a_failing_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    target = write_json(tmp_path / "run_summary.json", {"epochs": 1})

    def torn(tmp):
        tmp.write_text('{"epochs": ')  # half written, then the disk fills up
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, torn)
    assert json.loads(target.read_text()) == {"epochs": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["run_summary.json"], "the temporary file is removed"


@pytest.mark.parametrize("failing", [WEIGHTS_NAME, CONFIG_NAME])
def test_a_save_that_fails_midway_keeps_the_saved_biases(tmp_path, monkeypatch, failing):
    """The disk fills up while the weights, or the config after them, are written: both old files stay, with no
    temporary file beside them (the config used to be written after the new weights had replaced the old)."""
    model, _ = trained()
    bitfit_fast.save_biases(model, tmp_path)
    saved = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    write_bytes = pathlib.Path.write_bytes

    def filling_the_disk(path, data):
        if path.name.startswith(f".{pathlib.Path(failing).stem}.tmp"):
            write_bytes(path, data[: len(data) // 2])
            raise OSError("No space left on device")
        return write_bytes(path, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", filling_the_disk)
    with torch.no_grad():
        model.classifier.bias.add_(1)
    with pytest.raises(OSError, match="No space left"):
        bitfit_fast.save_biases(model, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == saved


@pytest.mark.parametrize("first_save", [False, True])
def test_an_error_renaming_the_config_puts_the_old_weights_back(tmp_path, monkeypatch, first_save):
    """The config's rename fails after the weights' (a lost mount, a permission changed): the previous pair is
    back in place, loadable, with no file of the failed save left; a first save leaves nothing."""
    model, base = trained()
    if not first_save:
        bitfit_fast.save_biases(model, tmp_path)
    saved = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    saved_bias, replace = model.classifier.bias.detach().clone(), os.replace

    def failing_for_the_config(source, target):
        if pathlib.Path(target).name == CONFIG_NAME:
            raise OSError("Permission denied")
        return replace(source, target)

    monkeypatch.setattr(os, "replace", failing_for_the_config)
    with torch.no_grad():
        model.classifier.bias.add_(1)
    with pytest.raises(OSError, match="Permission denied"):
        bitfit_fast.save_biases(model, tmp_path)
    monkeypatch.setattr(os, "replace", replace)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == saved
    if not first_save:
        bitfit_fast.load_biases(base, tmp_path)
        torch.testing.assert_close(base.classifier.bias, saved_bias, atol=0, rtol=0)


def test_a_save_that_fails_to_keep_a_second_name_leaves_no_file_behind(tmp_path, monkeypatch):
    """The config's second name cannot be made (the disk fills up): the weights' one is removed as well, and the
    previous pair is as it was."""
    import bitfit_fast.files

    model, _ = trained()
    bitfit_fast.save_biases(model, tmp_path)
    saved = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    second_name = bitfit_fast.files._second_name

    def failing_for_the_config(path):
        if path.name == CONFIG_NAME:
            raise OSError("No space left on device")
        return second_name(path)

    monkeypatch.setattr(bitfit_fast.files, "_second_name", failing_for_the_config)
    with pytest.raises(OSError, match="No space left"):
        bitfit_fast.save_biases(model, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == saved


def test_files_of_two_saves_are_not_taken_for_one_checkpoint(tmp_path, monkeypatch):
    """A save stopped between its two renames, unable to put the first back (as a crash would leave it), leaves the
    new weights beside the old config: loading them says so, where it used to load them under the old save's
    options."""
    model, base = trained()
    bitfit_fast.save_biases(model, tmp_path)
    old_weights = (tmp_path / WEIGHTS_NAME).read_bytes()
    replace, renamed = os.replace, []

    def stopping_after_the_first(source, target):
        if renamed:
            raise OSError("interrupted")
        renamed.append(target)
        return replace(source, target)

    monkeypatch.setattr(os, "replace", stopping_after_the_first)
    with torch.no_grad():
        model.classifier.bias.add_(1)
    with pytest.raises(OSError, match=r"interrupted; and what was renamed could not be put back: .*"
                                      rf"{WEIGHTS_NAME} \(its previous file is (.*)\)") as stranded:
        bitfit_fast.save_biases(model, tmp_path)
    monkeypatch.setattr(os, "replace", replace)
    assert [p.name for p in renamed] == [WEIGHTS_NAME]
    kept = pathlib.Path(re.search(r"its previous file is (.*)\)", str(stranded.value)).group(1))
    assert kept.parent == tmp_path and kept.read_bytes() == old_weights, "the old weights' last copy is kept"
    before = snapshot(base)
    with pytest.raises(ValueError, match=f"the checkpoint in {tmp_path} is damaged: its {WEIGHTS_NAME} is not the one "
                                         f"its {CONFIG_NAME} was saved with \\(a save interrupted between the two\\?; "
                                         f"{kept.name}, left by that save, hold the other file of each pair\\)"):
        bitfit_fast.load_biases(base, tmp_path)
    assert_unchanged(base, before)


def test_save_needs_an_applied_model(tmp_path):
    with pytest.raises(ValueError, match="call bitfit_fast.apply"):
        bitfit_fast.save_biases(tiny_bert(), tmp_path)


def test_save_needs_a_directory_name_not_a_file(tmp_path, monkeypatch):
    """An empty name (the current directory, as a Path) or a file: one line each, nothing written."""
    model = bitfit_fast.apply(tiny_bert(), announce=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="the directory to save into is an empty name: name one"):
        bitfit_fast.save_biases(model, "")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt is a file: save the biases into a directory"):
        bitfit_fast.save_biases(model, tmp_path / "notes.txt")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"


def test_the_saved_config_sets_a_base_model_up_unchanged(tmp_path):
    model = tiny_bert()
    base = copy.deepcopy(model)
    bitfit_fast.apply(model, biases="subset", memory="lean", dtype=torch.float64)
    bitfit_fast.save_biases(model, tmp_path)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["config"]["dtype"] == "float64" and saved["config"]["head"] is None
    assert saved["applied"]["head"] == ["dropout", "classifier"] and saved["applied"]["weight_dtypes"]
    bitfit_fast.load_biases(base, tmp_path)
    assert base.bitfit_fast_config == model.bitfit_fast_config
    assert base.bitfit_fast_state == model.bitfit_fast_state


def test_a_format_1_checkpoint_still_loads(tmp_path):
    """Format 1 kept the options and what apply() found in one "apply" dict, as written here."""
    model, base = trained(biases="subset")
    bitfit_fast.save_biases(model, tmp_path)
    record = json.loads((tmp_path / CONFIG_NAME).read_text())
    del record["config"], record["applied"]
    record["format_version"] = 1
    record["apply"] = dict(biases="subset", train_head=True, add_missing_biases=False, head=["dropout", "classifier"],
                           added_biases=[], backend="auto", fuse_layers=True, memory="default", dtype=None,
                           weight_dtypes={})
    (tmp_path / CONFIG_NAME).write_text(json.dumps(record))
    bitfit_fast.load_biases(base, tmp_path)
    batch = padded_batch(model)
    torch.testing.assert_close(base.eval()(**batch).logits, model(**batch).logits, atol=0, rtol=0)
    assert trainable(base).keys() == trainable(model).keys()
    assert base.bitfit_fast_config.head == ["dropout", "classifier"]

    record["format_version"] = 7
    (tmp_path / CONFIG_NAME).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="has format version 7; this bitfit_fast reads versions 1 and 2"):
        bitfit_fast.load_biases(tiny_bert(), tmp_path)


def test_frozen_weights_from_pretrained_drew_at_random_are_named_and_trained_with_the_head_round_trip(tmp_path):
    """A checkpoint without a pooler (a sentence-embedding encoder's): from_pretrained draws it at random, frozen it
    could not be restored from the saved biases; apply names it, and with it in head=[...] the round trip is exact.
    The real MiniLM, which has its pooler, gets no warning, even applied again after a merge."""
    import warnings

    from bitfit_reference import MINILM_DIR

    transformers.BertModel(tiny_bert().config, add_pooling_layer=False).save_pretrained(tmp_path / "encoder")

    def loaded(seed):
        torch.manual_seed(seed)
        return transformers.BertForSequenceClassification.from_pretrained(tmp_path / "encoder", num_labels=3)

    with pytest.warns(bitfit_fast.FrozenNewWeightsWarning, match=r"\['bert.pooler.dense'\] of this "
                                                                  r"BertForSequenceClassification were not in"):
        frozen = bitfit_fast.apply(loaded(0))
    bitfit_fast.save_biases(frozen, tmp_path / "unrestorable")
    with pytest.raises(bitfit_fast.OtherBaseModelError, match="bert.pooler.dense.weight holds other values; it is not "
                                                              "in the checkpoint this model was loaded from"):
        bitfit_fast.load_biases(loaded(1), tmp_path / "unrestorable")
    model = bitfit_fast.apply(loaded(0), head=["classifier", "bert.pooler.dense"], announce=False)
    adamw_steps(model, [padded_batch(model)])
    bitfit_fast.save_biases(model, tmp_path / "biases")
    base = bitfit_fast.load_biases(loaded(1), tmp_path / "biases")
    batch = padded_batch(model)
    torch.testing.assert_close(base.eval()(**batch).logits, model.eval()(**batch).logits, atol=0, rtol=0)
    with warnings.catch_warnings():  # nor after apply (fused, bf16 weights) and merge made new Parameters
        warnings.simplefilter("error", bitfit_fast.FrozenNewWeightsWarning)
        minilm = transformers.BertForSequenceClassification.from_pretrained(MINILM_DIR, num_labels=3)
        bitfit_fast.apply(minilm, dtype=torch.bfloat16)
        with pytest.warns(UserWarning, match="rounded to it"):
            bitfit_fast.merge(minilm)
        bitfit_fast.apply(minilm)


def test_a_masked_lm_whose_bias_is_tied_round_trips(tmp_path):
    """BertForMaskedLM's decoder bias is its prediction bias: one parameter under two names."""
    from bitfit_fast.model import planned_parameters

    model = transformers.BertForMaskedLM(tiny_bert().config)
    base = copy.deepcopy(model)
    shapes, trained = planned_parameters(model, bitfit_fast.BitFitConfig(train_head=False))
    bitfit_fast.apply(model, train_head=False)
    assert (shapes, trained) == ({n: tuple(p.shape) for n, p in model.named_parameters()}, trainable(model).keys())
    batch = padded_batch(model)
    batch["labels"] = batch["input_ids"]
    adamw_steps(model, [batch])
    bitfit_fast.save_biases(model, tmp_path)
    bitfit_fast.load_biases(base, tmp_path)
    torch.testing.assert_close(base.eval()(**batch).logits, model.eval()(**batch).logits, atol=0, rtol=0)


def test_a_weight_unfrozen_after_apply_is_saved_and_trains_again_after_loading(tmp_path):
    model, base = trained()
    name = "bert.encoder.layer.1.output.dense.weight"
    model.get_parameter(name).requires_grad_(True)
    with torch.no_grad():
        model.get_parameter(name).mul_(1.5)  # as if it had trained
    bitfit_fast.save_biases(model, tmp_path)
    bitfit_fast.load_biases(base, tmp_path)
    assert base.get_parameter(name).requires_grad
    assert trainable(base).keys() == trainable(model).keys()
    batch = padded_batch(model)
    torch.testing.assert_close(base.eval()(**batch).logits, model(**batch).logits, atol=0, rtol=0)


def test_bias_parameters_a_module_adds_itself_round_trip_to_a_vanilla_model(tmp_path):
    """DeBERTa's attention adds q_bias and v_bias itself (its packed projection has no bias): they train, are saved
    and loaded with the others, and a merged model's save_pretrained keeps their trained values."""
    from test_api import FAMILIES

    config_cls, model_cls, config = FAMILIES["deberta"]
    model, base = trained(lambda: model_cls(config_cls(**config, num_labels=3)))
    loose = {name: param.detach().clone() for name, param in model.named_parameters()
             if name.endswith(("q_bias", "v_bias"))}
    assert len(loose) == 4 and all(param.requires_grad for name, param in model.named_parameters() if name in loose)
    assert not any(torch.equal(value, base.get_parameter(name)) for name, value in loose.items()), "they trained"
    bitfit_fast.save_biases(model, tmp_path / "biases")
    fresh = same_base(base, model_cls(config_cls(**config, num_labels=3)))
    loaded = bitfit_fast.load_biases(fresh, tmp_path / "biases")
    batch = padded_batch(model)
    torch.testing.assert_close(loaded.eval()(**batch).logits, model(**batch).logits, atol=0, rtol=0)
    bitfit_fast.merge(loaded).save_pretrained(tmp_path / "hf")
    reloaded = model_cls.from_pretrained(tmp_path / "hf").eval()
    assert all(torch.equal(reloaded.get_parameter(name), value) for name, value in loose.items())
    torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, atol=1e-6, rtol=0)


def test_leftover_temporaries_are_those_of_this_outputs_name_only(tmp_path):
    """What an export into OUT killed before its rename left: .OUT.tmp-PID, not this process's own temporary, not
    another output's (.m.tmp-1.v2 is m.v2's), and a name with glob characters is taken as it is."""
    from bitfit_fast.files import temporaries_of_others, temporary_beside

    temporary_beside(tmp_path / "out").mkdir()
    for name in (".out.tmp-1", ".m.tmp-123.v2", ".run[1].tmp-9", ".out.tmp-x"):
        (tmp_path / name).mkdir()
    assert temporaries_of_others(tmp_path / "out") == [tmp_path / ".out.tmp-1"]
    assert temporaries_of_others(tmp_path / "m") == []
    assert temporaries_of_others(tmp_path / "m.v2") == [tmp_path / ".m.tmp-123.v2"]
    assert temporaries_of_others(tmp_path / "run[1]") == [tmp_path / ".run[1].tmp-9"]
