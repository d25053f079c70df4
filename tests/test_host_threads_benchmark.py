"""The host-threads benchmark's split of a population (benchmarks/host_threads.py)."""

import numpy as np
import pytest

from benchmarks import host_threads


def test_split_by_size_rank_partitions_clients_and_deals_every_size():
  sizes = np.array([5, 100, 1, 7, 7, 50, 3])
  parts = host_threads.split_by_size_rank(sizes)
  np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(7))
  # ranks by size: 2(1) 6(3) 0(5) 3(7) 4(7) 5(50) 1(100) -> dealt alternately
  np.testing.assert_array_equal(parts[0], [0, 1, 2, 4])
  np.testing.assert_array_equal(parts[1], [3, 5, 6])


def test_split_refuses_more_parts_than_clients():
  with pytest.raises(ValueError, match="parts must be in"):
    host_threads.split_by_size_rank(np.array([3, 4]), parts=3)
