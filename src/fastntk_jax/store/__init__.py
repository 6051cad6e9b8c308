"""Deletion stores: a prepared model on disk that answers requests for months.

* :mod:`~fastntk_jax.store.store` — :class:`DeletionStore` (init, open,
  forget, status, log, verify), atomic and idempotent requests;
* :mod:`~fastntk_jax.store.log` — the SQLite request log and generations;
* :mod:`~fastntk_jax.store.objects` — immutable, checksummed array files.

docs/deletion_store.md describes the format and the crash-safety argument.
"""

from fastntk_jax.store.objects import CorruptObjectError
from fastntk_jax.store.store import CorruptStoreError
from fastntk_jax.store.store import DeletionStore
from fastntk_jax.store.store import RequestResult
from fastntk_jax.store.store import StoreError
from fastntk_jax.store.store import StoreLockedError
from fastntk_jax.store.store import params_sha256
from fastntk_jax.store.store import sample_digests
from fastntk_jax.store.store import take

__all__ = ["CorruptObjectError", "CorruptStoreError", "DeletionStore",
           "RequestResult", "StoreError", "StoreLockedError", "params_sha256",
           "sample_digests", "take"]
