"""Splitting a dataset's indices among clients, for federated and split-learning methods.

Pass a client's indices to ``make_train_iterator(..., indices=...)`` to train on its partition.
"""

import numpy as np

SCHEMES = ("iid", "by_class", "dirichlet")
_MAX_DIRICHLET_TRIES = 1000


def _check_labels(labels: np.ndarray) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be a 1-D int array, got {labels.dtype} {labels.shape}")
  return labels


def class_assignment(num_classes: int, num_clients: int, classes_per_client: int) -> list:
  """Classes held by each client under the 'by_class' scheme.

  Client ``i`` holds classes ``(i * classes_per_client + j) % num_classes`` for
  ``j < classes_per_client``: consecutive clients walk round the classes, so when
  ``num_clients * classes_per_client >= num_classes`` every class is held and the numbers of
  holders of any two classes differ by at most one.

  Returns:
    A list of ``num_clients`` sorted lists of class positions in ``0..num_classes-1``.
  """
  return [
    sorted({(i * classes_per_client + j) % num_classes for j in range(classes_per_client)})
    for i in range(num_clients)
  ]


def partition_indices(
  labels: np.ndarray,
  num_clients: int,
  scheme: str,
  seed: int,
  *,
  classes_per_client: int = 2,
  alpha: float = 0.5,
  min_size: int = 1,
) -> list[np.ndarray]:
  """Partitions ``range(len(labels))`` among ``num_clients`` clients.

  Schemes:
    * 'iid': a permutation drawn from ``seed``, cut into ``num_clients`` near-equal parts.
    * 'by_class': client ``i`` holds the classes of ``class_assignment`` (classes = the sorted
      distinct label values); each class's examples are shuffled and cut into near-equal parts,
      one per client holding it. If ``num_clients * classes_per_client`` is below the number of
      classes, the classes nobody holds are left out of every partition.
    * 'dirichlet': Hsu et al. 2019: for each class, client proportions ~ Dir(alpha * 1); the
      class's shuffled examples are cut at those proportions. Small ``alpha`` = more skew. The
      whole draw is repeated (up to 1000 times, as in the NIID-Bench reference code) until every
      client has at least ``min_size`` examples, else ValueError.

  Args:
    labels: int [N] class labels.
    num_clients: number of clients, >= 1.
    scheme: one of ``SCHEMES``.
    seed: every random choice derives from it; same inputs + seed = same output.
    classes_per_client: 'by_class' only.
    alpha: 'dirichlet' only, concentration > 0.
    min_size: 'dirichlet' only, the minimum examples per client.

  Returns:
    ``num_clients`` disjoint, sorted int64 index arrays into ``labels``.
  """
  labels = _check_labels(labels)
  n = len(labels)
  if num_clients < 1:
    raise ValueError(f"num_clients must be >= 1, got {num_clients}")
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)
  if scheme == "iid":
    if num_clients > n:
      raise ValueError(f"iid: num_clients={num_clients} > {n} examples")
    parts = np.array_split(rng.permutation(n), num_clients)
  elif scheme == "by_class":
    if not 1 <= classes_per_client <= len(classes):
      raise ValueError(
        f"by_class: classes_per_client={classes_per_client} must be in [1, {len(classes)}] "
        f"(the number of classes)"
      )
    held = class_assignment(len(classes), num_clients, classes_per_client)
    parts = [[] for _ in range(num_clients)]
    for c_pos, c in enumerate(classes):
      holders = [i for i in range(num_clients) if c_pos in held[i]]
      if not holders:
        continue
      members = rng.permutation(np.flatnonzero(labels == c))
      for i, chunk in zip(holders, np.array_split(members, len(holders)), strict=True):
        parts[i].append(chunk)
    parts = [np.concatenate(p) if p else np.zeros((0,), np.int64) for p in parts]
  elif scheme == "dirichlet":
    if alpha <= 0:
      raise ValueError(f"dirichlet: alpha must be > 0, got {alpha}")
    if num_clients * min_size > n:
      raise ValueError(f"dirichlet: {num_clients} clients x min_size {min_size} > {n} examples")
    by_class = [np.flatnonzero(labels == c) for c in classes]
    for _ in range(_MAX_DIRICHLET_TRIES):
      parts = [[] for _ in range(num_clients)]
      for members in by_class:
        members = rng.permutation(members)
        p = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(p)[:-1] * len(members)).astype(np.int64)
        for i, chunk in enumerate(np.split(members, cuts)):
          parts[i].append(chunk)
      parts = [np.concatenate(p) for p in parts]
      if min(len(p) for p in parts) >= min_size:
        break
    else:
      raise ValueError(
        f"dirichlet: no draw in {_MAX_DIRICHLET_TRIES} gave every one of {num_clients} clients "
        f">= {min_size} examples with alpha={alpha}; raise alpha or use fewer clients"
      )
  else:
    raise ValueError(f"unknown partition scheme {scheme!r}; allowed: {', '.join(SCHEMES)}")
  return [np.sort(np.asarray(p, np.int64)) for p in parts]
