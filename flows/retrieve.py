"""Retrieval flows for Prefect users: list builds, fetch one verified. Thin: tasks/storage/retrieve.py.

`tvmflow fetch` / `tvmflow builds` call the same functions without Prefect (a device fetching
its library needs no API server); these flows give the same thing as Prefect runs, with the
result persisted to the store when run through `with_store_results`.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from tasks.storage import retrieve
from tasks.storage.results import with_store_results
from tasks.storage.store import clean_uri

list_task = task(retrieve.list_builds, name="list-builds", cache_policy=NO_CACHE)
fetch_task = task(retrieve.fetch_build, name="fetch-build", cache_policy=NO_CACHE)


@flow(name="tvmflow-builds", log_prints=True)
def builds_flow(model: str | None = None, device: str | None = None, store: str = "./artifacts") -> list[dict]:
    """Every complete build in the store (newest first), optionally of one model / device."""
    rows = list_task(store, model, device)
    for row in rows:
        print(
            f"{row['model']}/{row['device']}/{row['build_id']}{' (LATEST)' if row['latest'] else ''}: "
            f"{row['precision']}, {row['latency_ms']} ms, validation "
            f"{'unvalidated (build-only)' if not row.get('validated', True) else 'passed'}"
        )
    print(
        f"{len(rows)} build(s) in {clean_uri(store)}"
        + (f" of {model}" if model else "")
        + (f" for {device}" if device else "")
    )
    return rows


@flow(name="tvmflow-fetch", log_prints=True)
def fetch_flow(
    model: str,
    device: str,
    out: str,
    build: str = "latest",
    store: str = "./artifacts",
    allow_unvalidated: bool = False,
) -> dict:
    """Download one build into `out`, every file verified against its manifest; raises on a mismatch.
    A build-only (unvalidated) build only with `allow_unvalidated`."""
    fetched = fetch_task(store, model, device, build, out, allow_unvalidated)
    print(f"fetched {model}/{device}/{fetched.build_id} into {fetched.path}: {', '.join(fetched.files)} verified")
    return {
        "path": str(fetched.path),
        "build_id": fetched.build_id,
        "files": fetched.files,
        "latency_ms": fetched.manifest.get("latency_ms"),
        "precision": fetched.manifest.get("precision"),
    }


def run_builds(store: str, model: str | None = None, device: str | None = None) -> list[dict]:
    return with_store_results(builds_flow, store)(model=model, device=device, store=store)


def run_fetch(store: str, model: str, device: str, out: str, build: str = "latest") -> dict:
    return with_store_results(fetch_flow, store)(model=model, device=device, out=out, build=build, store=store)
