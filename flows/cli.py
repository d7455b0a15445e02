"""The `tvmflow` command: compile, workers."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from tasks.errors import EXIT_UNREACHABLE, TvmflowError, exit_code


def _store(uri: str) -> str:
    """Keys embedded in an s3:// URI move to AWS_* for this process: no Prefect parameter, log,
    report or block ever holds them."""
    from tasks.storage.store import split_credentials

    clean, creds = split_credentials(uri)
    if creds:
        os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = creds["key"], creds["secret"]
    return clean


def _precision_options(args) -> dict | None:
    """--calibration & co. for tasks.precision.stage.PrecisionOptions; warns (stderr) when the
    precision is slower than fp32 on the device (fleet file's `precisions`)."""
    from tasks.devices.profiles import get_device
    from tasks.precision.policy import check_precision, parse_ops, precision_warning

    check_precision(args.precision)
    warning = precision_warning(get_device(args.device), args.precision)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    if args.precision == "fp32":
        return None
    return {
        "calibration": args.calibration,
        "method": args.calib_method,
        "keep_float": args.keep_float,
        "allow": parse_ops(args.precision_allow),
        "deny": parse_ops(args.precision_deny),
        "reduce_range": args.reduce_range,
    }


GATE_HELP = "validation gate overrides, e.g. top1_agreement=0.95,max_rel_err=0.01"


def parse_gate(text: str) -> dict[str, float]:
    """--gate top1_agreement=0.95,max_rel_err=0.01 -> {key: float}; keys: tasks.devices.validate.GATE_KEYS."""
    from tasks.devices.validate import GATE_KEYS

    gate: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in GATE_KEYS or not sep:
            raise TvmflowError(
                f"--gate: unknown threshold {key!r}; use KEY=VALUE with KEY one of {', '.join(GATE_KEYS)}"
            )
        try:
            gate[key] = float(value)
        except ValueError:
            raise TvmflowError(f"--gate: {key}={value!r} is not a number; e.g. {key}=0.95") from None
    return gate


def _compile(args) -> int:
    from flows.compile import compile_flow
    from tasks.records import BuildReport
    from tasks.storage.results import with_store_results

    args.store = _store(args.store)
    report = BuildReport.from_json(
        with_store_results(compile_flow, args.store)(  # flow result persisted in the store
            model=args.model,
            device=args.device,
            trials=args.trials,
            store=args.store,
            inputs=args.input,
            data=args.data,
            tracker=args.tracker,
            precision=args.precision,
            measure_untuned=not args.no_untuned,
            precision_options=_precision_options(args),
            worker_timeout=args.worker_timeout,
            dask_address=args.dask,
            refresh=args.refresh,
            gate=parse_gate(args.gate) if args.gate else None,
            batch=args.batch,
            build_only=args.build_only,
        )
    )
    val = report.validation
    summary = {
        "build_uri": report.build_uri,
        "manifest_uri": report.manifest_uri,
        "precision": report.precision,
        "latency_ms": report.latency_ms,
        "latency_p90_ms": report.latency_p90_ms,
        "untuned_latency_ms": report.untuned_latency_ms,
        "reference": report.reference,
        "baselines": report.baselines,
        "validation": val.to_json(),
        "tasks": report.tasks,
        "trials": report.trials,
        "untuned_tasks": report.untuned_tasks,
        "cache_hits": report.cache_hits,
        "tuning_reuse": report.tuning_reuse,
        "tuning_seconds": report.tuning_seconds,
        "wall_seconds": report.wall_seconds,
    }
    lines = [
        "",
        f"Build:      {report.build_uri}",
        (
            f"Latency:    tuned {report.latency_ms:.3f} ms (p90 {report.latency_p90_ms or 0:.3f})"
            + (f", untuned {report.untuned_latency_ms:.3f} ms" if report.untuned_latency_ms else "")
            if report.latency_ms is not None
            else "Latency:    not measured (build-only)"
        ),
        "Baselines:  " + ", ".join(f"{k} {v:.3f} ms" for k, v in report.baselines.items()),
        (
            f"Validation: {'passed' if val.passed else 'FAILED'} on {val.samples} samples ({report.precision}), "
            f"max rel err {val.max_rel_err:.2e}, top-1 agreement {val.top1_agreement}"
            if val.passed is not None
            else f"Validation: not run ({val.reason}); never LATEST, fetch with --allow-unvalidated"
        ),
        f"Tuning:     {report.tasks} tasks, {report.trials} new trials, "
        f"{len(report.untuned_tasks)} untuned; cache hits: {', '.join(report.cache_hits) or 'none'}",
    ]
    reuse = report.tuning_reuse
    if reuse:
        lines.append(
            f"Shared db:  {reuse['reused']} tasks reused, {reuse['warm_started']} warm-started, "
            f"{reuse['fresh']} tuned fresh ({reuse['shards']} shards in {reuse['store']})"
        )
    print("\n".join(lines), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(summary, default=str))
    return 0


def _retune(args) -> int:
    """One retune now, with the deployment's parameters; a failed model exits 3 (gate), 4 (unreachable) or 2."""
    from flows.retune import retune_flow
    from tasks.retune import Outcome, summary_rows
    from tasks.storage.results import with_store_results

    args.store = _store(args.store)
    models = (
        [
            {"model": m, "data": args.data, "inputs": args.input or [], "calibration": args.calibration}
            for m in args.model
        ]
        if args.model
        else None
    )  # None: the device's models in the fleet file
    options = {"method": args.calib_method, "keep_float": args.keep_float} if args.precision == "int8" else None
    try:
        outcomes = with_store_results(retune_flow, args.store)(
            device=args.device,
            models=models,
            budget=args.budget,
            store=args.store,
            tracker=args.tracker,
            dask_address=args.dask,
            precision=args.precision,
            worker_timeout=args.worker_timeout,
            precision_options=options,
            refresh=args.refresh,
            gate=parse_gate(args.gate) if args.gate else None,
            batch=args.batch,
        )
        code = 0
    except TvmflowError as err:
        if "models failed" not in str(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        return exit_code(err)
    rows = summary_rows([Outcome(**o) for o in outcomes])
    for r in rows:
        print(
            f"{r['model']} on {r['device']}: {r['status']} ({r['reason']}); new {r['new_ms']} ms, "
            f"LATEST {r['latest_ms']} ms, {r['trials']} trials",
            file=sys.stderr if args.json else sys.stdout,
        )
    if args.json:
        print(json.dumps(outcomes, default=str))
    return code


def _workers(args) -> int:
    from tasks.devices import workers
    from tasks.devices.profiles import get_device

    if args.action == "start":
        if workers.load_state():
            raise TvmflowError("workers are already running (see `tvmflow workers status`); stop them first")
        profile = get_device(args.device)
        if workers.is_cuda(profile) and args.servers is not None:
            raise TvmflowError(f"{profile.name!r} is a CUDA device: give --gpus N|all (one rpc server per GPU)")
        started = workers.start_device_workers(profile, args.servers, args.gpus)
        workers.save_state(started)
        pinned = f" (one per GPU: {','.join(started.gpus)})" if started.gpus else ""
        print(
            f"tracker {started.tracker} with {len(started.server_pids)} rpc server(s){pinned}, "
            f"key {profile.rpc_key!r}; use --tracker {started.tracker}"
        )
    elif args.action == "status":
        state = workers.load_state()
        if not state:
            print("no local workers running")
            return 1
        summary = workers.tracker_summary(state.host, state.tracker_port)
        print(json.dumps({"tracker": state.tracker, "gpus": state.gpus, **summary}, indent=2))
    else:
        state = workers.load_state()
        if state:
            state.stop()
        workers.clear_state()
        print("stopped" if state else "no local workers running")
    return 0


def _serve(args) -> int:
    from flows.serve import serve

    store = _store(args.store) if args.store else None
    return serve(args.port, args.device, args.servers, not args.no_deploy, store=store)


def _fetch(args) -> int:
    from tasks.storage.retrieve import fetch_build

    got = fetch_build(
        _store(args.store), args.model, args.device, args.build, args.out, allow_unvalidated=args.allow_unvalidated
    )
    note = "" if got.validated else ", UNVALIDATED: build-only, never run on the device"
    print(f"{args.model}/{args.device}/{got.build_id} -> {got.path} ({len(got.files)} files, sha256 verified{note})")
    return 0


def _builds(args) -> int:
    from tasks.storage.retrieve import list_builds

    if args.model and args.model_opt and args.model != args.model_opt:
        raise TvmflowError(f"two models given ({args.model!r} and --model {args.model_opt!r}); give one")
    rows = list_builds(_store(args.store), args.model or args.model_opt, args.device)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'model':<20} {'device':<14} {'build':<24} {'published':<21} {'prec':<5} {'ms':>9}  validation")
    for r in rows:
        ms = f"{r['latency_ms']:.3f}" if isinstance(r["latency_ms"], (int, float)) else "-"
        ok = "unvalidated" if not r.get("validated", True) else "passed" if r["validation"].get("passed") else "FAILED"
        print(
            f"{r['model']:<20} {r['device']:<14} {r['build_id'] + (' *' if r['latest'] else ''):<24} "
            f"{r['published_at'] or '-':<21} {r['precision'] or '-':<5} {ms:>9}  {ok}"
        )
    print(f"{len(rows)} build(s); * = LATEST" if rows else "no builds")
    return 0


def _devices(args) -> int:
    from tasks.devices.fleet_status import fleet_status

    rows = fleet_status(args.tracker)
    if args.json:
        print(json.dumps([r.as_dict() for r in rows]))
        return 0

    def num(v):
        return "-" if v is None else str(v)

    print(f"{'device':<16} {'precisions':<16} {'tracker':<34} {'workers':>7} {'busy':>4}  target")
    for r in rows:
        where = r.tracker or ("build-only" if r.build_only else "no tracker")
        if r.reachable is False:
            where += " (unreachable)"
        print(
            f"{r.name:<16} {','.join(r.precisions):<16} {where:<34} {num(r.registered):>7} {num(r.busy):>4}  {r.target}"
        )
    return 0


def _alerts(args) -> int:
    from flows.alerts import install

    done = install(args.notify)
    if args.json:
        print(json.dumps([d.__dict__ for d in done]))
        return 0
    for d in done:
        print(f"{d.name}: on {d.trigger} (automation {d.id})")
    print(
        "notifications through block " + args.notify
        if args.notify
        else "no --notify block: the automations only record that they fired (event feed in the UI)"
    )
    return 0


class _Version(argparse.Action):
    """--version: tvmflow's and TVM's versions (TVM imported only when asked)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="show versions and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import PackageNotFoundError, version

        import tvm

        try:
            own = version("tvmflow")
        except PackageNotFoundError:
            own = "unknown (not installed)"
        print(f"tvmflow {own}\nTVM {tvm.__version__}\nPrefect {version('prefect')}")
        parser.exit()


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="tvmflow", description=__doc__)
    root.add_argument("--debug", action="store_true", help="show tracebacks and Prefect's own log lines")
    root.add_argument("--version", action=_Version)
    root.add_argument("--quiet", action="store_true", help="no progress display or summary table")
    sub = root.add_subparsers(dest="command", required=True)
    comp = sub.add_parser("compile", help="compile, tune, validate and publish a model")
    from tasks.importers.bundled import DEFAULT_MODEL

    comp.add_argument(
        "--model", default=DEFAULT_MODEL, help="path, file://, s3://, http(s):// URI, or package.module:callable"
    )
    comp.add_argument("--device", default="local")
    comp.add_argument("--trials", type=int, default=None, help="total trial budget (default: the device's)")
    comp.add_argument("--store", default="./artifacts", help="fsspec URI of the object store")
    comp.add_argument("--input", action="append", help="name:shape:dtype, e.g. input:1x3x224x224:float32")
    comp.add_argument(
        "--data", default=None, help="validation data: npz URI, bundled:mnist[:N], bundled:imagenet-photos"
    )
    comp.add_argument("--tracker", default=None, help="host:port of an RPC tracker (default: start local workers)")
    comp.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16", "int8"])
    comp.add_argument(
        "--calibration",
        default=None,
        help="int8 calibration samples: npz URI, image folder (#mean=..&std=..), bundled:mnist:500",
    )
    comp.add_argument("--calib-method", default="percentile", choices=["max", "percentile", "kl"])
    comp.add_argument(
        "--keep-float",
        default=None,
        help="int8: layers kept in float, e.g. conv2d_0,matmul_1 "
        "(default: first conv and last dense; 'none' quantizes all)",
    )
    comp.add_argument("--precision-allow", default=None, help="fp16/bf16: op kinds or layer names to convert")
    comp.add_argument("--precision-deny", default=None, help="fp16/bf16: op kinds or layer names kept in fp32")
    comp.add_argument(
        "--reduce-range",
        action="store_true",
        default=None,
        help="int8: 7-bit weights (no vpmaddubsw saturation; default: on where the device has AVX2 but no VNNI)",
    )
    comp.add_argument("--no-untuned", action="store_true", help="skip measuring the untuned build")
    comp.add_argument("--worker-timeout", type=float, default=60.0, help="seconds to wait for a free device worker")
    comp.add_argument("--dask", default=None, metavar="HOST:PORT", help="run the tuning fan-out on this Dask scheduler")
    comp.add_argument("--json", action="store_true", help="print one JSON summary as the last stdout line")
    comp.add_argument("--refresh", action="store_true", help="ignore cached stage outputs: import, tune, build again")
    comp.add_argument(
        "--build-only",
        action="store_true",
        help="no device: build untuned, publish unvalidated (never LATEST; fetch --allow-unvalidated)",
    )
    comp.add_argument("--gate", default=None, metavar="KEY=VALUE,...", help=GATE_HELP)
    comp.add_argument(
        "--batch", type=int, default=None, metavar="N", help="fix the model's dynamic batch dimension (default 1)"
    )
    comp.set_defaults(func=_compile)
    ret = sub.add_parser(
        "retune", help="retune now: more trials on top of LATEST, publish only if validated and no slower"
    )
    ret.add_argument("--device", default="local")
    ret.add_argument("--store", default="./artifacts", help="fsspec URI of the object store")
    ret.add_argument(
        "--model",
        action="append",
        help="model URI or package.module:callable (repeatable; default: the device's models in the fleet file)",
    )
    ret.add_argument("--data", default=None, help="validation data of --model (default: the bundled model's)")
    ret.add_argument("--input", action="append", help="name:shape:dtype of --model's inputs")
    ret.add_argument(
        "--precision",
        default=None,
        choices=["fp32", "fp16", "bf16", "int8"],
        help="default: each model's LATEST precision, else fp32",
    )
    ret.add_argument("--calibration", default=None, help="int8 calibration samples (default: --data)")
    ret.add_argument("--calib-method", default="percentile", choices=["max", "percentile", "kl"])
    ret.add_argument("--keep-float", default=None, help="int8: layers kept in float")
    ret.add_argument("--budget", type=int, default=64, help="extra trials per model on top of LATEST's")
    ret.add_argument("--tracker", default=None, help="host:port of an RPC tracker (default: start local workers)")
    ret.add_argument("--worker-timeout", type=float, default=60.0, help="seconds to wait for a free device worker")
    ret.add_argument("--dask", default=None, metavar="HOST:PORT", help="run the tuning fan-out on this Dask scheduler")
    ret.add_argument("--refresh", action="store_true", help="ignore cached stage outputs")
    ret.add_argument("--gate", default=None, metavar="KEY=VALUE,...", help=GATE_HELP)
    ret.add_argument(
        "--batch", type=int, default=None, metavar="N", help="fix the models' dynamic batch dimension (default 1)"
    )
    ret.add_argument("--json", action="store_true", help="print the outcomes as JSON on the last stdout line")
    ret.set_defaults(func=_retune)
    fetch = sub.add_parser("fetch", help="download a build, every file verified against its manifest")
    fetch.add_argument("model")
    fetch.add_argument("--device", required=True)
    fetch.add_argument("--build", default="latest", help="build id, or latest")
    fetch.add_argument("--store", default="./artifacts", help="fsspec URI of the object store")
    fetch.add_argument("--out", required=True, help="new or empty folder to put the build in")
    fetch.add_argument(
        "--allow-unvalidated",
        action="store_true",
        help="also fetch build-only builds never run on the device (newest one if there is no LATEST)",
    )
    fetch.set_defaults(func=_fetch)
    builds = sub.add_parser("builds", help="list published builds: date, precision, latency, validation")
    builds.add_argument("model", nargs="?")
    builds.add_argument("--model", dest="model_opt", metavar="MODEL", default=None, help="only builds of this model")
    builds.add_argument("--device", default=None, help="only builds for this device")
    builds.add_argument("--store", default="./artifacts", help="fsspec URI of the object store")
    builds.add_argument("--json", action="store_true", help="print the list as JSON")
    builds.set_defaults(func=_builds)
    devs = sub.add_parser("devices", help="the fleet: target, precisions, tracker, workers registered now, busy")
    devs.add_argument("--tracker", default=None, help="host:port for devices whose fleet entry names none")
    devs.add_argument("--json", action="store_true", help="print the list as JSON")
    devs.set_defaults(func=_devices)
    alerts = sub.add_parser("alerts", help="Prefect automations from the fleet file: failed nightly runs, regressions")
    alerts.add_argument("action", choices=["install"])
    alerts.add_argument(
        "--notify",
        default=None,
        metavar="BLOCK",
        help="notification block (type/name, e.g. slack-webhook/ops) the automations send to",
    )
    alerts.add_argument("--json", action="store_true", help="print what was installed as JSON")
    alerts.set_defaults(func=_alerts)
    work = sub.add_parser("workers", help="start/stop local device workers (tracker + rpc servers)")
    work.add_argument("action", choices=["start", "status", "stop"])
    work.add_argument("--device", default="local")
    work.add_argument("--servers", type=int, default=None, help="CPU devices: rpc servers to start (default 2)")
    work.add_argument(
        "--gpus",
        default=None,
        metavar="N|all",
        help="CUDA devices: one rpc server per GPU, pinned with CUDA_VISIBLE_DEVICES (default all visible)",
    )
    work.set_defaults(func=_workers)
    srv = sub.add_parser("serve", help="one machine: Prefect server + deployments + worker + local device workers")
    srv.add_argument("--port", type=int, default=4200, help="Prefect server/UI port")
    srv.add_argument("--device", default="local", help="device profile of the local device workers")
    srv.add_argument("--servers", type=int, default=2, help="local rpc servers to start")
    srv.add_argument("--no-deploy", action="store_true", help="do not (re)deploy deployments/prefect.yaml")
    srv.add_argument(
        "--store",
        default=None,
        help="the deployments' default store (Prefect Variable "
        "tvmflow_store; default: keep it, or ~/.tvmflow/artifacts)",
    )
    srv.set_defaults(func=_serve)
    _common_flags(sub)
    return root


def _common_flags(sub) -> None:
    """--debug/--quiet after the command too (`tvmflow compile --quiet`); compile and retune get
    the live progress display (flows/progress.py)."""
    for name, command in sub.choices.items():
        command.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show tracebacks and Prefect's own log lines",
        )
        command.add_argument(
            "--quiet",
            action="store_true",
            default=argparse.SUPPRESS,
            help="no progress display or summary table: only results and errors",
        )
        if name in ("compile", "retune"):
            command.set_defaults(progress=True)


class _HideUserErrorTracebacks(logging.Filter):
    """Prefect logs task failures with a traceback; a user error is one line unless --debug."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], TvmflowError):
            record.exc_info, record.exc_text = None, None
        return True


def main(argv: list[str] | None = None) -> int:
    """Exit codes (README "Exit codes"): 0 ok, 1 internal error, 2 usage or bad input,
    3 a validation/precision gate failed, 4 a device, tracker or store was unreachable."""
    # the ephemeral API's telemetry write races its own SQLite start-up ("database is locked")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the ephemeral API's default 20 s start-up limit is missed on a busy 2-core machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    try:
        args = parser().parse_args(argv)
    except SystemExit as done:  # argparse: --help/--version exit 0, a bad flag exits 2
        return int(done.code or 0)
    if not args.debug:
        for name in ("prefect.task_runs", "prefect.flow_runs"):
            logging.getLogger(name).addFilter(_HideUserErrorTracebacks())
    try:
        if getattr(args, "progress", False):
            from flows.progress import terminal

            with terminal(debug=args.debug, quiet=args.quiet):
                return args.func(args)
        return args.func(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # every failure becomes one line and an exit code
        if args.debug:
            raise
        code = exit_code(err)
        if isinstance(err, TimeoutError):  # a Prefect timeout on a device/store step (tasks.retry_policy)
            code = EXIT_UNREACHABLE
        text = (
            str(err)
            if isinstance(err, TvmflowError)
            else f"internal error ({err.__class__.__name__}: {' '.join(str(err).split())[:300]}); rerun with --debug"
        )
        print(f"error: {text}", file=sys.stderr, flush=True)
        return code


if __name__ == "__main__":
    sys.exit(main())
