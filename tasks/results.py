"""Prefect result persistence in the store itself, through a saved storage block.

`<store>/prefect-results/` holds the persisted flow results, so a retry or a later run on
another machine with the same store finds them (and the shared tuning database next to them
makes its tuning free). The block is saved under a name derived from the store URI *without*
credentials: keys stay in the environment (AWS_*), never in a Prefect block or parameter.

Only the flows' own results are persisted: the compile flow's steps cache by content under
TVMFLOW_CACHE (tasks.cache) and some of their values (TVM IR modules) do not pickle.
"""
from __future__ import annotations

import functools
import hashlib

from tasks.publish import join
from tasks.store import clean_uri, is_local, open_store

RESULTS_DIR = "prefect-results"


def results_block_name(store: str) -> str:
    return "tvmflow-results-" + hashlib.sha256(clean_uri(store).encode()).hexdigest()[:12]


def results_block(store: str):
    """The saved LocalFileSystem / RemoteFileSystem block for `<store>/prefect-results`."""
    from prefect.filesystems import LocalFileSystem, RemoteFileSystem

    fs, root = open_store(store)
    path = join(root, RESULTS_DIR)
    if is_local(fs):
        block = LocalFileSystem(basepath=path)
    else:
        block = RemoteFileSystem(basepath=fs.unstrip_protocol(path))  # credentials come from AWS_*
    block.save(results_block_name(store), overwrite=True)
    return block


def with_store_results(flow_, store: str):
    """`flow_` with its result persisted to the store's block; call it like the flow."""
    configured = flow_.with_options(result_storage=results_block(store), persist_result=True)

    @functools.wraps(flow_.fn)
    def run(*args, **kwargs):
        from prefect.settings import PREFECT_TASKS_DEFAULT_PERSIST_RESULT, temporary_settings

        with temporary_settings(updates={PREFECT_TASKS_DEFAULT_PERSIST_RESULT: False}):
            return configured(*args, **kwargs)

    return run

