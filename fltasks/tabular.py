"""``--task csv:PATH --label COLUMN``: a member's own table of records.

A column is numeric when most of its cells are numbers, and categorical
otherwise (or when the shared task spec lists its categories); a categorical
column becomes one 0/1 feature per category. Majority rather than the first
cell decides, so that one stray cell is reported where it is instead of
turning a whole numeric column into thousands of categories. The classes are the label
column's distinct values, sorted (numerically when they are all numbers), or
the spec's list. Rows are split into this node's training and validation sets
(stratified, seeded), and every feature is standardised with the statistics
of this node's training split only, so nothing about the validation rows, or
any other member's data, leaks into training.

Python's ``csv`` module reads the file: pandas is not installed, and a
column-typing rule this small does not need it. Every problem with the file is
one ``TaskError`` line naming the file, the column and the row (rows are the
file's line numbers; the header is row 1).

A ``.parquet`` file is read with pyarrow when it is importable (it is not a
dependency: about 40 MB for one optional format); its cells are typed by the
same rules as CSV text, and record k is called row k + 1, as in a CSV export.
Without pyarrow, the error says which package to install.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from fltasks.datasets import split_and_standardize, stratified_split
from fltasks.inputs import csv_input_spec
from fltasks.models import ModelSpec, build_model, check_fits, parse_model
from fltasks.task import Task, TaskError

logger = logging.getLogger(__name__)

DEFAULT_TABULAR_MODEL = "mlp:64"
# More distinct values than this in a categorical column is almost surely an ID
# or free text, whose one-hot features would only let the model memorise rows.
MAX_CATEGORIES = 256
TABULAR_LR = 0.1
TABULAR_BATCH_SIZE = 32


@dataclass(frozen=True)
class Table:
    """A CSV file as features and class indices, before any split or scaling."""

    x: np.ndarray  # float64 [rows, features]
    y: np.ndarray  # int64 [rows]
    classes: tuple[str, ...]
    features: tuple[str, ...]  # "column" or "column=category" for one-hot features
    columns: tuple[str, ...]  # the feature columns of the file, in input order
    categories: dict[str, tuple[str, ...]]  # per categorical column, in encoding order
    # Cells outside a declared list, per column, encoded all-zero (unseen_as_zero only).
    unseen: dict[str, int] = field(default_factory=dict)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _sorted_values(values: set[str]) -> tuple[str, ...]:
    """Numerically when every value is a number (so "10" follows "9"), else as text."""
    if all(_number(v) is not None for v in values):
        return tuple(sorted(values, key=lambda v: (_number(v), v)))
    return tuple(sorted(values))


PARQUET_SUFFIXES = (".parquet", ".pq")


def _read_parquet_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The records of a Parquet file as CSV-like text cells (null: an empty cell)."""
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise TaskError(f"{path}: reading Parquet needs pyarrow, which is not installed; "
                        f"run `pip install pyarrow`, or export the table as CSV") from None
    try:
        table = parquet.read_table(path)
    except FileNotFoundError:
        raise TaskError(f"{path}: no such file") from None
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise TaskError(f"{path}: not a readable Parquet file ({error})") from None
    header = [str(name) for name in table.column_names]
    if not header:
        raise TaskError(f"{path}: empty file; expected named columns")
    columns = [["" if value is None else str(value) for value in column.to_pylist()]
               for column in table.columns]
    rows = [(index + 2, list(cells)) for index, cells in enumerate(zip(*columns, strict=True))]
    if not rows:
        raise TaskError(f"{path}: no data rows")
    return header, rows


def _read_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    if path.suffix.lower() in PARQUET_SUFFIXES:
        return _read_parquet_rows(path)
    try:
        # utf-8-sig: spreadsheet programs start their CSV exports with a byte-order mark.
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            rows = [(reader.line_num, row) for row in reader if row]
    except FileNotFoundError:
        raise TaskError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise TaskError(f"{path}: is a directory, expected a CSV file") from None
    except UnicodeDecodeError as error:
        raise TaskError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except csv.Error as error:
        raise TaskError(f"{path}: not valid CSV ({error})") from None
    if header is None or not any(cell.strip() for cell in header):
        raise TaskError(f"{path}: empty file; expected a header row naming the columns")
    if not rows:
        raise TaskError(f"{path}: no data rows after the header")
    return [cell.strip() for cell in header], rows


def read_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the (line number, cells) rows of a CSV or Parquet file; TaskError lines."""
    return _read_rows(Path(path))


def read_table(
    path: str | Path,
    label: str,
    classes: Sequence[str] | None = None,
    categories: Mapping[str, Sequence[str]] | None = None,
    columns: Sequence[str] | None = None,
    *,
    unseen_as_zero: bool = False,
) -> Table:
    """Parse and type the CSV at ``path``; classes, categories and columns from a shared spec.

    ``columns`` fixes which feature columns are used and in what order, so that
    members whose files order their columns differently still agree.
    ``unseen_as_zero``: a cell outside its column's declared categories is encoded
    all-zero and counted in ``Table.unseen`` instead of refused (an agreed
    vocabulary frozen before this member saw the category, docs/DATA.md).
    """
    path = Path(path)
    header, rows = _read_rows(path)
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise TaskError(f"{path}: column {duplicates[0]!r} appears more than once in the header")
    if label not in header:
        raise TaskError(f"{path}: no label column {label!r}; the columns are {', '.join(header)}")
    declared = dict(categories or {})
    unknown = sorted(set(declared) - set(header))
    if unknown:
        raise TaskError(f"{path}: the task spec lists categories for column {unknown[0]!r}, "
                        f"which the file does not have")
    order = [name for name in header if name != label]
    if columns is not None:
        for name in columns:
            if name not in header or name == label:
                raise TaskError(f"{path}: no column {name!r}, which the task spec lists in "
                                f"columns")
        extra = [name for name in order if name not in columns]
        if extra:
            raise TaskError(f"{path}: column {extra[0]!r} is not in the task spec's columns; "
                            f"remove it from the file or add it to every member's spec")
        order = list(columns)
    for line, row in rows:
        if len(row) != len(header):
            raise TaskError(f"{path}: row {line} has {len(row)} cells; the header has "
                            f"{len(header)}")
    encoded: list[tuple[str, np.ndarray]] = []
    found: dict[str, tuple[str, ...]] = {}
    unseen: dict[str, int] = {}
    for name in order:
        index = header.index(name)
        cells = [(line, row[index].strip()) for line, row in rows]
        numbers = sum(_number(cell) is not None for _, cell in cells)
        if name not in declared and _is_numeric(cells, numbers):
            encoded.append((name, _numeric_column(path, name, cells, numbers)))
            continue
        values = tuple(declared[name]) if name in declared else _category_values(
            path, name, cells)
        found[name] = values
        if unseen_as_zero:
            known = set(values)
            outside = sum(cell not in known for _, cell in cells)
            if outside:
                unseen[name] = outside
        else:
            _check_known(path, name, cells, values)
        for value in values:
            encoded.append((f"{name}={value}",
                            np.array([cell == value for _, cell in cells], dtype=np.float64)))
    if not encoded:
        raise TaskError(f"{path}: no feature columns besides the label column {label!r}")
    # Under an agreed vocabulary a class outside it was first seen after the freeze.
    whose = "the network's agreed classes, frozen before this member" if unseen_as_zero \
        else "the task spec's classes"
    y, class_names = _labels(path, label, [(line, row[header.index(label)].strip())
                                          for line, row in rows], classes, whose)
    x = np.stack([values for _, values in encoded], axis=1)
    return Table(x, y, class_names, tuple(name for name, _ in encoded), tuple(order), found,
                 unseen)


def _is_numeric(cells: list[tuple[int, str]], numbers: int) -> bool:
    """The majority rule of the module docstring."""
    return 2 * numbers > len(cells)


def _category_values(path: Path, name: str, cells: list[tuple[int, str]]) -> tuple[str, ...]:
    values = _sorted_values({cell for _, cell in cells})
    if len(values) > MAX_CATEGORIES:
        raise TaskError(f"{path}: column {name!r} has {len(values)} distinct non-numeric "
                        f"values (at most {MAX_CATEGORIES} categories); drop the column "
                        f"or fix its cells")
    return values


@dataclass(frozen=True)
class TableVocabulary:
    """What a file holds before any encoding: its feature columns in order, each
    categorical column's values, and the label's classes (for gossip/vocabulary.py)."""

    columns: tuple[str, ...]
    categories: dict[str, tuple[str, ...]]
    classes: tuple[str, ...]


def read_vocabulary(path: str | Path, label: str) -> TableVocabulary:
    """The kinds and values of the columns of the file at ``path``.

    It is read_table itself, whose features are then dropped: a second copy of the
    typing rules could drift from the first, and one float matrix of a member's own
    table is cheap next to the model that follows."""
    table = read_table(path, label)
    return TableVocabulary(table.columns, table.categories, table.classes)


def agreed_order(values: Iterable[str]) -> tuple[str, ...]:
    """An agreed set of categories or classes in encoding order: the same on every member."""
    return _sorted_values(set(values))


def _numeric_column(path: Path, name: str, cells: list[tuple[int, str]],
                    numbers: int) -> np.ndarray:
    values = np.empty(len(cells), dtype=np.float64)
    for i, (line, cell) in enumerate(cells):
        number = _number(cell)
        if number is None:
            what = "an empty cell" if not cell else f"the non-numeric value {cell!r}"
            raise TaskError(f"{path}: row {line}, column {name!r}: {what} in a numeric column "
                            f"({numbers} of its {len(cells)} cells are numbers); fix the cell "
                            f"or list the column's categories in the task spec")
        values[i] = number
    return values


def _check_known(path: Path, name: str, cells: list[tuple[int, str]],
                 values: tuple[str, ...]) -> None:
    known = set(values)
    for line, cell in cells:
        if cell not in known:
            raise TaskError(f"{path}: row {line}, column {name!r}: category {cell!r} is not "
                            f"in the task spec's list ({', '.join(values)})")


def _labels(path: Path, label: str, cells: list[tuple[int, str]],
            classes: Sequence[str] | None, whose: str) -> tuple[np.ndarray, tuple[str, ...]]:
    for line, cell in cells:
        if not cell:
            raise TaskError(f"{path}: row {line}, label column {label!r}: empty label")
    if classes is None:
        names = _sorted_values({cell for _, cell in cells})
        if len(names) < 2:
            raise TaskError(f"{path}: label column {label!r} holds one class only "
                            f"({names[0]!r}); a classifier needs at least two")
    else:
        names = tuple(classes)
    index = {name: i for i, name in enumerate(names)}
    y = np.empty(len(cells), dtype=np.int64)
    for i, (line, cell) in enumerate(cells):
        if cell not in index:
            raise TaskError(f"{path}: row {line}, label column {label!r}: class {cell!r} is "
                            f"not in {whose} ({', '.join(names)}); see docs/DATA.md")
        y[i] = index[cell]
    return y, names


def csv_task(
    path: str | Path,
    label: str,
    seed: int = 0,
    model: str | ModelSpec | None = None,
    *,
    classes: Sequence[str] | None = None,
    categories: Mapping[str, Sequence[str]] | None = None,
    columns: Sequence[str] | None = None,
    device: str = "cpu",
    spec_hash: bytes = b"",
    unseen_as_zero: bool = False,
) -> Task:
    """A task on the CSV at ``path``, predicting column ``label``; model default mlp:64."""
    table = read_table(path, label, classes, categories, columns, unseen_as_zero=unseen_as_zero)
    for name, count in table.unseen.items():
        logger.warning("%s: %d rows of column %r hold a category outside the agreed "
                       "vocabulary; encoded all-zero (docs/DATA.md)", path, count, name)
    spec = model if isinstance(model, ModelSpec) else parse_model(model or DEFAULT_TABULAR_MODEL)
    check_fits(spec, (table.x.shape[1],))
    x_train, y_train, x_test, y_test = split_and_standardize(table.x, table.y, seed)
    if len(x_test) == 0:
        raise TaskError(f"{path}: {len(table.y)} rows leave none for validation; "
                        f"give at least 4 rows per class")
    num_classes = len(table.classes)
    train_rows, _ = stratified_split(table.y, seed)  # the rows split_and_standardize scaled by
    inputs = csv_input_spec(table.columns, label, table.classes, table.categories,
                            table.x[train_rows])
    return Task(
        name=f"csv:{Path(path).name}",
        make_model=partial(build_model, spec, (x_train.shape[1],), num_classes, seed),
        x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
        num_classes=num_classes, lr=TABULAR_LR, batch_size=TABULAR_BATCH_SIZE,
        device=device, spec_hash=spec_hash, inputs=inputs,
    )
