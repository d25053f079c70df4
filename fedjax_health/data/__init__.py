"""Federated datasets: flat arrays + client offsets, partitioners, and loaders."""

from fedjax_health.data.federated import (BatchPlanSpec, FederatedData, FederatedDataset, from_client_arrays,
                                          make_batch_plan, sample_cohort)
