"""The one check of a matrix against a dataset, for `bench run` and `bench eval` alike:
every cell concrete and valid under the dataset's threat model, subsets no larger than
its test set, and the [transfer] table's surrogates and cells valid, before anything is
trained or written."""

from __future__ import annotations

from bench.core.data import DatasetSpec, load_dataset
from bench.core.matrix import Cell, Matrix
from bench.run.recipe import TrainRequest, resolve


def checked_cells(matrix: Matrix, dataset: DatasetSpec, data_root: str | None) -> list[Cell]:
    """The matrix's cells on `dataset`, everything the matrix says checked."""
    test_size = len(load_dataset(dataset.name, "test", data_root)[1])
    cells = matrix.cells(dataset.threat, test_size=test_size)
    for name in matrix.transfer.surrogates:
        resolve(TrainRequest(name, dataset.name))
    matrix.transfer_cells(dataset.threat)
    return cells
