"""Prefect result persistence in the store itself, through a saved storage block.

`<store>/prefect-results/` holds the persisted flow results, so a retry or a later run on
another machine with the same store finds them (and the shared tuning database next to them
makes its tuning free). The block is saved under a name derived from the store URI *without*
credentials: keys stay in the environment (AWS_*), never in a Prefect block or parameter.

Only the flows' own results are persisted: the compile flow's steps cache by content under
TVMFLOW_CACHE (tasks.storage.cache) and some of their values (TVM IR modules) do not pickle.

Two ways in: `with_store_results` for flows called from Python (the CLI, flows/retrieve.py), and
`for_deployment_run` for flows a worker loads from a deployment entrypoint, where the store is
the run's `store` parameter (changeable per run in the UI) and tasks' persistence is switched
off through the deployment's environment (TASK_RESULTS_ENV, set by deployments/generate.py).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os

from tasks.errors import TvmflowError
from tasks.storage.publish import join
from tasks.storage.store import clean_uri, is_local, open_store

RESULTS_DIR = "prefect-results"
# Prefect settings are read once at import: a deployment run gets this through its job env
TASK_RESULTS_ENV = {"PREFECT_TASKS_DEFAULT_PERSIST_RESULT": "false"}


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


def persisted_in(flow_, store: str):
    """`flow_` whose own result is persisted through the store's block."""
    return flow_.with_options(result_storage=results_block(store), persist_result=True)


def with_store_results(flow_, store: str):
    """`flow_` with its result persisted to the store's block; call it like the flow."""
    configured = persisted_in(flow_, store)

    @functools.wraps(flow_.fn)
    def run(*args, **kwargs):
        from prefect.settings import PREFECT_TASKS_DEFAULT_PERSIST_RESULT, temporary_settings

        with temporary_settings(updates={PREFECT_TASKS_DEFAULT_PERSIST_RESULT: False}):
            return configured(*args, **kwargs)

    return run


def for_deployment_run(flow_):
    """The flow a worker runs for a deployment entrypoint, persisting into the run's own store.

    Called where the entrypoint module is loaded, before Prefect's engine reads the flow's result
    storage: the flow run (PREFECT__FLOW_RUN_ID, set by the worker) names the store in its
    parameters, so the block follows a store changed in the UI. Anywhere else (`prefect deploy`
    reading the flow, a plain import) `flow_` comes back unchanged, and so it does for a store
    that cannot be opened: the flow's own store check then fails the run with its one-line error."""
    if not os.environ.get("PREFECT__FLOW_RUN_ID"):
        return flow_
    from prefect.runtime import flow_run

    store = flow_run.parameters.get("store") or inspect.signature(flow_.fn).parameters["store"].default
    try:
        return persisted_in(flow_, store)
    except TvmflowError:
        return flow_
