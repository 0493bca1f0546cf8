"""The one check of a matrix against a dataset, for `bench run` and `bench eval` alike:
every cell concrete and valid under the dataset's threat model, subsets no larger than
its test set, and the [transfer] table's surrogates and cells valid, before anything is
trained or written."""

from __future__ import annotations

from bench.core.cells import Cell
from bench.core.data import DatasetSpec, test_size
from bench.core.matrix import Matrix
from bench.run.recipe import TrainRequest, resolve


def checked_cells(matrix: Matrix, dataset: DatasetSpec, data_root: str | None) -> list[Cell]:
    """The matrix's cells on `dataset`, everything the matrix says checked."""
    cells = matrix.cells(dataset.threat, test_size=test_size(dataset, data_root))
    for name in matrix.transfer.surrogates:
        resolve(TrainRequest(name, dataset.name))
    matrix.transfer_cells(dataset.threat)
    return cells
