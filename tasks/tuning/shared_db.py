"""One tuning database per device in the store, shared by every model and every run.

Layout: `<store>/tuning/<tvm-version>/<device>/shards/<run-id>/` holds one run's records
(database_workload.json, database_tuning_record.json) and, written last, meta.json: the target
they were measured on and, per workload, how many trials were paid for it. Shards are never
overwritten, so concurrent runs cannot lose each other's records; readers merge every complete
shard (best record per workload) and take the largest trial count per workload. Once there are
many shards, `compact` folds them into one (new shard first, then the old ones go).

Before tuning, `plan_reuse` splits a model's tasks: a workload with records for at least the
requested trials is reused (zero new trials); one with fewer is warm-started from its records;
the rest are tuned fresh. Matching is MetaSchedule's structural hash, so another model with the
same layers (ResNet-34 after ResNet-18) finds them. Records from another target are ignored.
A retune (or a --refresh run) asks for trials on top of what was paid: `reuse_paid=False` then
warm-starts every task that has trials instead of reusing its records as they are.

Results cross this module as JSON dicts (tasks.records.TaskResult.to_json()): it stores them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tasks.devices.profiles import DeviceProfile
from tasks.runlog import run_logger
from tasks.storage import cache
from tasks.storage.publish import join, safe_segment, store_fs, uri_of
from tasks.storage.store import is_local, store_error, write_atomic
from tasks.tuning.extract import TuningTask
from tasks.tuning.pick_best import DB_FILES, has_db, merge_databases, open_db

log = logging.getLogger("tvmflow.tuning_store")
META = "meta.json"
COMPACT_AFTER = 32  # shards; reading costs one listing plus one small download per shard


def tvm_version() -> str:
    import tvm

    return tvm.__version__


def tuning_prefix(store: str, device: str) -> str:
    _, root = store_fs(store)
    return join(root, "tuning", safe_segment(tvm_version(), "TVM version"), safe_segment(device, "device"))


def workload_key(mod_json: str) -> str:
    """MetaSchedule's own structural hash of a task module: what its database matches on."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    return str(ms.database.Workload(tvm.ir.load_json(mod_json)).as_json()[0])


@dataclass
class SharedTuning:
    db_dir: Path | None  # a local merged copy of every shard, None when the store has none
    trials: dict[str, int] = field(default_factory=dict)  # workload key -> trials paid for
    shards: int = 0
    skipped: int = 0  # shards measured on another target
    uri: str = ""


def _list_shards(fs, prefix: str, store: str) -> dict[str, bytes]:
    """{meta path: meta bytes} of every complete shard."""
    try:
        metas = fs.glob(join(prefix, "shards", "*", META))
        return fs.cat(metas) if metas else {}
    except FileNotFoundError as err:
        if "bucket" in str(err).lower():
            raise store_error(err, store, "reading tuning records from") from None
        return {}
    except Exception as err:  # noqa: BLE001 - credentials, endpoint
        raise store_error(err, store, "reading tuning records from") from None


def _download_shard(fs, shard: str, meta_bytes: bytes) -> Path | None:
    """A shard is immutable: download it once into the local cache (None if it vanished)."""
    key = hashlib.sha256(shard.encode() + b"\0" + meta_bytes).hexdigest()[:24]
    folder = cache.cache_root() / "tuning-shards" / key
    if has_db(folder):
        return folder
    tmp = folder.with_name(folder.name + f".{uuid.uuid4().hex[:6]}.tmp")
    tmp.mkdir(parents=True)
    try:
        for name in DB_FILES:
            fs.get_file(join(shard, name), str(tmp / name))
        tmp.replace(folder)
    except FileNotFoundError:  # compacted away between listing and reading: its records live on
        return None
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_shared(store: str, device: DeviceProfile, dest: str | Path) -> SharedTuning:
    """Merge every complete shard measured on this device's target into `dest`."""
    fs, _ = store_fs(store)
    prefix = tuning_prefix(store, device.name)
    shared = SharedTuning(None, uri=uri_of(store, prefix))
    folders = []
    for meta_path, raw in sorted(_list_shards(fs, prefix, store).items()):
        try:
            meta = json.loads(raw)
        except ValueError:
            continue
        if meta.get("target") != device.target_key():
            shared.skipped += 1
            continue
        folder = _download_shard(fs, meta_path.rsplit("/", 1)[0], raw)
        if folder is None:
            continue
        folders.append(folder)
        shared.shards += 1
        for key, info in (meta.get("workloads") or {}).items():
            shared.trials[key] = max(shared.trials.get(key, 0), int(info.get("trials", 0)))
    if folders:
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        merge_databases(folders, dest)
        shared.db_dir = dest
    return shared


@dataclass
class ReusePlan:
    """What to do with each task of a model, given the shared database."""

    to_tune: list[TuningTask]
    reused: dict[str, dict]  # task name -> a finished result (shared records, or untuned: 0 trials)
    decisions: dict[str, str]  # task name -> reused | warm | fresh | untuned
    keys: dict[str, str]  # task name -> workload key
    prior: dict[str, int]  # task name -> trials already paid for its workload
    seed_db_dir: str | None
    shared: SharedTuning

    def summary(self) -> dict:
        counts = {k: sum(1 for d in self.decisions.values() if d == k) for k in ("reused", "warm", "fresh")}
        return {
            "reused": counts["reused"],
            "warm_started": counts["warm"],
            "fresh": counts["fresh"],
            "shards": self.shared.shards,
            "store": self.shared.uri,
        }

    def results(self, tuned: list[dict], plan: list[TuningTask]) -> list[dict]:
        """Tuned and reused results, in the plan's order."""
        by_name = {r["name"]: r for r in tuned}
        by_name.update(self.reused)
        return [by_name[t.name] for t in plan if t.name in by_name]


def _records_for(db, mod_json: str):
    import tvm

    mod = tvm.ir.load_json(mod_json)
    if not db.has_workload(mod):
        return []
    return list(db.get_top_k(db.commit_workload(mod), 8))


def _write_records(records, folder: Path) -> Path:
    from tvm.s_tir import meta_schedule as ms

    out = open_db(folder)
    for record in records:
        workload = out.commit_workload(record.workload.mod)
        out.commit_tuning_record(
            ms.database.TuningRecord(record.trace, workload, record.run_secs, record.target, record.args_info)
        )
    return folder


def plan_reuse(
    plan: list[TuningTask], shared: SharedTuning, work_dir: str | Path, reuse_paid: bool = True
) -> ReusePlan:
    """Split `plan` into reused / warm-started / fresh tasks (see the module docstring)."""
    work_dir = Path(work_dir)
    db = open_db(shared.db_dir) if shared.db_dir else None
    keys = {t.name: workload_key(t.mod_json) for t in plan}
    reuse = ReusePlan([], {}, {}, keys, {}, None, shared)
    seeds: list = []
    for task in plan:
        records = _records_for(db, task.mod_json) if db is not None else []
        paid = shared.trials.get(keys[task.name], 0) if records else 0
        reuse.prior[task.name] = paid
        if records and (paid >= task.trials if reuse_paid else task.trials <= 0):
            secs = [float(s) for s in records[0].run_secs or []]
            folder = _write_records(records, work_dir / "reused" / keys[task.name])
            reuse.reused[task.name] = {
                "name": task.name,
                "trials_planned": task.trials,
                "trials_run": 0,
                "valid": len(records),
                "best_ms": 1000 * sum(secs) / len(secs) if secs else None,
                "seconds": 0.0,
                "db_dir": str(folder),
                "error": None,
                "cached": False,
                "curve": [],
                "reused": True,
                "trials_prior": paid,
            }
            reuse.decisions[task.name] = "reused"
            continue
        if task.trials <= 0:  # nothing to search: settled here, not shipped to the tuning fan-out
            from tasks.tuning.tune import TuneResult

            reuse.reused[task.name] = TuneResult(
                task.name, 0, error="not tuned: no trials allotted (too few FLOPs to matter)", curve=[]
            ).to_json()
            reuse.decisions[task.name] = "untuned"
            continue
        reuse.to_tune.append(task)
        if records:
            reuse.decisions[task.name] = "warm"
            seeds.extend(records)
        else:
            reuse.decisions[task.name] = "fresh"
    if seeds:
        reuse.seed_db_dir = str(_write_records(seeds, work_dir / "seed"))
    return reuse


def run_index(reuse: ReusePlan, results: list[dict]) -> dict[str, dict]:
    """Per workload tuned in this run: trials paid for its records (earlier ones included)."""
    index = {}
    for result in results:
        name = result["name"]
        if result.get("reused") or not result.get("db_dir") or not has_db(result["db_dir"]) or not result["valid"]:
            continue
        effective = result["trials_planned"] if not result.get("error") else result["trials_run"]
        prior = reuse.prior.get(name, 0) if reuse.decisions.get(name) == "warm" else 0
        index[reuse.keys[name]] = {"trials": prior + effective, "task": name}
    return index


def push_shard(
    store: str,
    device: DeviceProfile,
    db_dirs: Sequence[str | Path],
    workloads: dict[str, dict],
    work_dir: str | Path,
    run_id: str | None = None,
    extra: dict | None = None,
) -> str | None:
    """Upload records as a new shard (db files, then meta.json). Returns its URI, None if empty."""
    if not workloads:
        return None
    fs, _ = store_fs(store)
    run_id = safe_segment(
        run_id or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8], "run id"
    )
    local = Path(work_dir) / f"shard-{run_id}"
    local.mkdir(parents=True, exist_ok=True)
    if not merge_databases(list(db_dirs), local):
        return None
    shard = join(tuning_prefix(store, device.name), "shards", run_id)
    meta = {
        "run_id": run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tvm_version": tvm_version(),
        "device": device.name,
        "target": device.target_key(),
        "workloads": workloads,
        **(extra or {}),
    }
    try:
        if is_local(fs):
            fs.makedirs(shard, exist_ok=True)  # a local store has no folders yet (s3fs's would create a bucket)
        for name in DB_FILES:
            fs.put_file(str(local / name), join(shard, name))
        write_atomic(fs, join(shard, META), json.dumps(meta, indent=1, sort_keys=True).encode())
    except Exception as err:  # noqa: BLE001
        raise store_error(err, store, "saving tuning records to") from None
    return uri_of(store, shard)


def push_run(
    store: str, device: DeviceProfile, reuse: ReusePlan, results: list[dict], work_dir: str | Path, model: str = ""
) -> str | None:
    """Add this run's newly tuned records to the shared database; compact when it has many shards."""
    index = run_index(reuse, results)
    dirs = [r["db_dir"] for r in results if reuse.keys.get(r["name"]) in index]
    uri = push_shard(store, device, dirs, index, work_dir, extra={"model": model})
    if uri and reuse.shared.shards + 1 >= COMPACT_AFTER:
        try:
            compact(store, device, work_dir)
        except Exception as err:  # noqa: BLE001 - compaction is housekeeping; the shard is in
            log.warning(f"compacting the tuning database failed: {err}")
    return uri


def compact(store: str, device: DeviceProfile, work_dir: str | Path) -> int:
    """Fold every complete shard of this target into one new shard, then delete the folded ones.

    The new shard is complete (meta.json written) before anything is deleted, and shards that
    appear meanwhile are left alone, so no record is lost. Returns how many shards were folded.
    """
    fs, _ = store_fs(store)
    prefix = tuning_prefix(store, device.name)
    metas = _list_shards(fs, prefix, store)
    folders: list[Path] = []
    index: dict = {}
    folded: list = []
    for meta_path, raw in metas.items():
        meta = json.loads(raw)
        if meta.get("target") != device.target_key():
            continue
        folder = _download_shard(fs, meta_path.rsplit("/", 1)[0], raw)
        if folder is None:
            continue
        folders.append(folder)
        folded.append(meta_path.rsplit("/", 1)[0])
        for key, info in (meta.get("workloads") or {}).items():
            if int(info.get("trials", 0)) >= index.get(key, {}).get("trials", -1):
                index[key] = info
    if len(folded) < 2:
        return 0
    run_id = "compact-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
    push_shard(store, device, folders, index, work_dir, run_id, {"compacted": len(folded)})
    for shard in folded:
        try:
            fs.rm_file(join(shard, META))  # first: a half-deleted shard is then simply incomplete
            fs.rm(shard, recursive=True)
        except FileNotFoundError:
            pass
    return len(folded)


def prepare(
    store: str, device: DeviceProfile, plan: list[TuningTask], work_dir: str | Path, reuse_paid: bool = True
) -> ReusePlan:
    """load_shared + plan_reuse, logged: the pipeline's step before tuning (compile and retune)."""
    reuse = plan_reuse(plan, load_shared(store, device, Path(work_dir) / "shared-tuning"), work_dir, reuse_paid)
    s = reuse.summary()
    run_logger().info(
        f"shared tuning database ({s['shards']} shards): {s['reused']} tasks reused, "
        f"{s['warm_started']} warm-started, {s['fresh']} tuned fresh"
    )
    return reuse
