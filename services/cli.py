"""The ``surge`` command: ``run`` (embedded default), ``serve`` (gateway only), ``train``, ``validate``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from services import auth
from services.config import DEFAULT_CONFIG, ConfigError, StudyConfig, load_config


def _fmt(v: float | None, spec: str = ".4f") -> str:
    return "—" if v is None else format(v, spec)


def render_progress(snap: dict[str, Any]) -> Any:
    """A rich table of one study snapshot (simulations, throughput, buffer, training)."""
    from rich.table import Table

    s, sm, b, tr = snap["simulations"], snap["samples"], snap["buffer"], snap["training"]
    table = Table(title=f"study {snap['id']} — {snap['state']} — {snap['elapsed_s']:.0f} s", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("simulations", f"{s['done']} done / {s['dispatched']} assigned / {s['budget']} budget")
    table.add_row("samples/s", f"produced {sm['produced_per_s']:,.0f}   consumed {sm['consumed_per_s']:,.0f}")
    if ing := snap.get("ingest"):
        table.add_row(
            "external",
            f"{s.get('external_done', 0)} sims, {sm.get('produced_external', 0):,} samples, "
            f"{ing['streams']} streams, staged {ing['staged_bytes'] / 2**20:.0f}"
            f"/{ing['max_staged_bytes'] / 2**20:.0f} MiB",
        )
    fill = b["held"] / max(1, b["capacity"])
    table.add_row("buffer", f"{b['held']:,} / {b['capacity']:,} ({fill:.0%}, {b['policy']})")
    table.add_row("training", f"step {tr['step']:,} / {tr['steps']:,}   loss {_fmt(tr['loss'])}")
    version = tr["version"] if tr["version"] is not None else "—"
    table.add_row("validation", f"rel. L2 {_fmt(tr['validation_error'])}   model version {version}")
    if snap.get("error"):
        table.add_row("error", f"[red]{snap['error']}[/red]")
    return table


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def init_ray(cpus: int | None, address: str | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        # Logical CPUs, not cores: solver actors and trainer workers each reserve one.
        ray.init(num_cpus=cpus or max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)


def _grpc_port(args: argparse.Namespace) -> int | None:
    """``--grpc-port``, else ``$SURGE_GRPC_PORT``, else None (no gRPC predictions)."""
    if args.grpc_port is not None:
        return int(args.grpc_port)
    v = os.environ.get("SURGE_GRPC_PORT")
    return int(v) if v else None


def _serve_grpc(args: argparse.Namespace, settings: Any, hub: Any, queries: Any = None) -> Any:
    """The gRPC server (Predict, plus Ingest/Study for the studies of this process) on --grpc-port, or None."""
    port = _grpc_port(args)
    if port is None:
        return None
    from services.ingest.server import TLSError, serve

    try:
        pair = settings.grpc_tls()  # checked with the settings already; read again as the port opens
    except TLSError as e:
        raise SystemExit(f"surge: {e}") from None
    srv = serve(args.host, port, token=settings.ingest_token, max_message_bytes=settings.max_body_bytes, tls=pair)
    srv.serve_predictions(
        hub, settings.max_predict_rows, settings.max_predict_values, settings.predict_token, queries=queries
    )
    return srv


def _gateway_settings(**overrides: Any) -> Any:
    """The gateway's settings from ``SURGE_*``, or exit 2 with what is wrong (not a traceback)."""
    from pydantic import ValidationError

    from services.gateway.settings import GatewaySettings

    try:
        return GatewaySettings.from_env(**overrides)
    except auth.SecretError as e:
        raise SystemExit(f"surge: {e}") from None
    except ValidationError as e:
        err = e.errors()[0]
        where = "SURGE_" + ".".join(str(p) for p in err["loc"]).upper()
        raise SystemExit(f"surge: {where}: {err['msg']}") from None


def _load(path: str | None) -> StudyConfig:
    try:
        return load_config(path or DEFAULT_CONFIG)
    except ConfigError as e:
        print(f"surge: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_run(args: argparse.Namespace) -> int:
    import uvicorn
    from rich.console import Console
    from rich.live import Live

    from services.gateway.app import create_app
    from services.study import StudyManager

    cfg = _load(args.config)
    console = Console()
    if not _port_free(args.host, args.port):
        console.print(f"[red]surge: port {args.port} on {args.host} is in use; pass --port[/red]")
        return 2
    # Tokens not given are made up for this run and printed: a laptop user needs no setup.
    settings = _gateway_settings(store=Path(args.store))
    token = settings.api_token or secrets.token_urlsafe(24)
    ingest_token = settings.ingest_token or secrets.token_urlsafe(24)
    settings = settings.model_copy(update={"api_token": token, "ingest_token": ingest_token})
    init_ray(args.cpus, args.address)
    manager = StudyManager(settings.store, settings.max_running_studies, ingest_token=ingest_token)
    app = create_app(settings, manager)
    try:
        grpc_server = _serve_grpc(args, settings, app.state.hub, app.state.queries)
    except OSError as e:
        console.print(f"[red]surge: {e}; pass --grpc-port[/red]")
        return 2
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))
    threading.Thread(target=server.run, name="gateway", daemon=True).start()
    study = manager.start(cfg)

    def terminate(*_: Any) -> None:  # `docker stop`, a pod's end: as Ctrl-C, the study publishes a last version
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    console.print(f"gateway on http://{args.host}:{args.port}  (API token for /v1/studies: {token})")
    if grpc_server is not None:
        console.print(f"gRPC predictions on {grpc_server.address}")
    if cfg.ingest.enabled:
        console.print(
            f"external solvers: study [bold]{study.id}[/bold] takes them over gRPC on port {cfg.ingest.port}"
            f" (ingest token: {ingest_token})"
        )
    console.print(f"model [bold]{cfg.served_name}[/bold] is served from {settings.store.resolve()} as it trains")
    try:
        with Live(render_progress(study.snapshot()), console=console, refresh_per_second=2) as live:
            while study.running:
                time.sleep(0.5)
                live.update(render_progress(study.snapshot()))
            live.update(render_progress(study.snapshot()))
        if study.state == "failed":
            console.print(f"[red]study failed: {study.error}[/red]")
        console.print(f"study {study.state}; still serving on http://{args.host}:{args.port} — Ctrl-C to stop")
        if args.exit_when_done:
            return 0 if study.state == "finished" else 1
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.print("stopping…")
        return 0
    finally:
        manager.stop_all(timeout=cfg.training.stop_grace_s + 30)
        server.should_exit = True
        if grpc_server is not None:
            from services.ingest.server import release

            release(grpc_server)
        import ray

        ray.shutdown()


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from services.gateway.app import create_app

    settings = _gateway_settings(store=Path(args.store) if args.store else None, ray_jobs_address=args.jobs_address)
    manager: Any = None
    if settings.ray_jobs_address:
        from services.jobs import RayJobStudies

        manager = RayJobStudies(settings.ray_jobs_address, settings.store, settings.max_running_studies)
    elif args.address:
        from services.study import StudyManager

        init_ray(None, args.address)
        manager = StudyManager(settings.store, settings.max_running_studies, ingest_token=settings.ingest_token)
    app = create_app(settings, manager)
    try:
        _serve_grpc(args, settings, app.state.hub, app.state.queries)
    except OSError as e:
        print(f"surge: {e}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from services.study import Study, StudyExists, StudyRunning

    if args.config_env:
        from services.config import parse_config

        try:
            cfg = parse_config(json.loads(os.environ[args.config_env]), f"${args.config_env}")
        except (KeyError, ValueError) as e:
            print(f"surge: cannot read the study config from ${args.config_env}: {e}", file=sys.stderr)
            return 2
    else:
        cfg = _load(args.config)
    init_ray(args.cpus, args.address)
    try:
        study = Study(cfg, Path(args.store), study_id=args.study_id).start()
    except (StudyExists, StudyRunning) as e:
        print(f"surge: {e}", file=sys.stderr)
        return 2
    return _follow(study)


def cmd_resume(args: argparse.Namespace) -> int:
    """Go on with a study of the store whose driver died (or was stopped), in this process."""
    from services.study import StudyNotResumable, StudyRunning, resumable

    try:
        study = resumable(Path(args.store), args.study_id)
    except (StudyNotResumable, StudyRunning) as e:
        print(f"surge: {e}", file=sys.stderr)
        return 2
    if study is None:
        print(f"surge: no study {args.study_id!r} in {Path(args.store).resolve()}", file=sys.stderr)
        return 2
    init_ray(args.cpus, args.address)
    return _follow(study.start())


def _follow(study: Any) -> int:
    from rich.console import Console

    # A Ray job being stopped gets SIGTERM: stop the study so that it publishes a last checkpoint.
    signal.signal(signal.SIGTERM, lambda *_: study.stop())
    console = Console()
    try:
        while study.running:
            time.sleep(2)
            console.print(render_progress(study.snapshot()))
    except KeyboardInterrupt:
        study.stop()
    study.join()
    console.print(render_progress(study.snapshot()))
    if study.error:
        console.print(f"[red]study {study.id} {study.state}: {study.error}[/red]")
    return 0 if study.state in ("finished", "stopped") else 1


def cmd_submit(args: argparse.Namespace) -> int:
    """Send a study to a running gateway (which runs it in its process or as a Ray job)."""
    import httpx

    cfg = _load(args.config)
    token = args.token or auth.secret(auth.ADMIN)
    if not token:
        print("surge: submit needs the gateway's API token (--token or SURGE_API_TOKEN)", file=sys.stderr)
        return 2
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    try:
        r = httpx.post(f"{args.gateway.rstrip('/')}/v1/studies", content=cfg.model_dump_json(), headers=headers)
    except httpx.HTTPError as e:
        print(f"surge: cannot reach the gateway at {args.gateway}: {e}", file=sys.stderr)
        return 1
    if r.status_code != 201:
        print(f"surge: the gateway answered {r.status_code}: {r.text}", file=sys.stderr)
        return 1
    snap = r.json()
    print(f"study {snap['id']} {snap['state']}; follow it with: curl {args.gateway}/v1/studies/{snap['id']}")
    if args.wait:
        while snap["state"] in ("starting", "running"):
            time.sleep(5)
            snap = httpx.get(f"{args.gateway.rstrip('/')}/v1/studies/{snap['id']}").json()
            tr = snap["training"]
            print(f"  {snap['state']}: step {tr['step']}/{tr['steps']}, validation {tr['validation_error']}")
    return 0 if snap["state"] in ("starting", "running", "finished") else 1


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    print(f"{args.config}: ok (study {cfg.name!r}, solver {cfg.problem.solver}, model {cfg.training.model})")
    return 0


def cmd_dataset(args: argparse.Namespace) -> int:
    """``surge dataset build``: the study's solvers, run once, into a zarr store."""
    from rich.progress import Progress

    from services.datasets import build_dataset
    from trainer.dataset import DatasetError

    cfg = _load(args.config)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        print(f"surge: {out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    try:
        with Progress(transient=True) as bar:
            task = bar.add_task(f"solving {args.simulations} simulations", total=args.simulations)
            build_dataset(
                cfg, args.simulations, out, seed=args.seed, progress=lambda done, _: bar.update(task, completed=done)
            )
    except (DatasetError, ValueError) as e:
        print(f"surge: {e}", file=sys.stderr)
        return 2
    print(f"{out}: {args.simulations} simulations of {cfg.problem.solver} ({cfg.problem.kind})")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="surge", description="Online training of PDE surrogates on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, config: bool = True) -> None:
        if config:
            sp.add_argument("config", nargs="?", default=None, help=f"study YAML (default {DEFAULT_CONFIG.name})")
        sp.add_argument("--store", default=os.environ.get("SURGE_STORE", "models"), help="model store directory")
        sp.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="Ray cluster (default: local)")
        sp.add_argument("--cpus", type=int, default=None, help="logical CPUs of the local Ray")

    r = sub.add_parser("run", help="embedded default: local Ray, a study, the gateway")
    common(r)
    r.add_argument("--host", default="127.0.0.1")
    r.add_argument("--port", type=int, default=8000)
    r.add_argument("--exit-when-done", action="store_true", help="exit when the study ends")
    r.add_argument("--grpc-port", type=int, default=None, help="serve predictions over gRPC too ($SURGE_GRPC_PORT)")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("serve", help="the gateway alone (studies need --jobs-address or --address)")
    s.add_argument("--store", default=None)
    s.add_argument(
        "--jobs-address",
        default=None,
        help="Ray job API, e.g. http://ray-head:8265: studies run there as Ray jobs ($SURGE_RAY_JOBS_ADDRESS)",
    )
    s.add_argument("--address", default=None, help="Ray cluster for studies run inside the gateway's process")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--grpc-port", type=int, default=None, help="serve predictions over gRPC too ($SURGE_GRPC_PORT)")
    s.set_defaults(func=cmd_serve)

    t = sub.add_parser("train", help="run a study without the gateway (what a study's Ray job runs)")
    common(t)
    t.add_argument("--config-env", default=None, help="read the study config (JSON) from this variable")
    t.add_argument("--study-id", default=None)
    t.set_defaults(func=cmd_train)

    rs = sub.add_parser("resume", help="go on with a study whose driver died or was stopped")
    rs.add_argument("study_id")
    common(rs, config=False)
    rs.set_defaults(func=cmd_resume)

    sb = sub.add_parser("submit", help="send a study to a running gateway")
    sb.add_argument("config", nargs="?", default=None, help=f"study YAML (default {DEFAULT_CONFIG.name})")
    sb.add_argument("--gateway", default=os.environ.get("SURGE_GATEWAY", "http://localhost:8000"))
    sb.add_argument("--token", default=None, help="API token (default $SURGE_API_TOKEN)")
    sb.add_argument("--wait", action="store_true", help="follow the study until it ends")
    sb.set_defaults(func=cmd_submit)

    d = sub.add_parser("dataset", help="offline datasets (zarr)")
    dsub = d.add_subparsers(dest="dataset_command", required=True)
    db = dsub.add_parser("build", help="run a study's solvers once and write the samples to a zarr store")
    db.add_argument("config", help="study YAML: its problem, sampler and solver settings are used")
    db.add_argument("--simulations", type=int, required=True)
    db.add_argument("--out", required=True, help="the .zarr directory to write")
    db.add_argument(
        "--seed", type=int, default=None, help="sampler seed (default: the study's; use another for test sets)"
    )
    db.add_argument("--overwrite", action="store_true")
    db.set_defaults(func=cmd_dataset)

    v = sub.add_parser("validate", help="check a study config")
    v.add_argument("config")
    v.set_defaults(func=cmd_validate)

    args = p.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
