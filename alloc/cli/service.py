"""The service commands: serve (HTTP API + web page + an embedded worker), worker (a job runner on any machine),
and allocate --server (the plan from a running service)."""
from __future__ import annotations

import sys
from pathlib import Path

from ..errors import BitallocError

DEFAULT_PORT = 8321


def add_store_arg(p) -> None:
    p.add_argument("--store", default=None, help="store URL: sqlite:///PATH (default: store.db in the data folder "
                   "$BITALLOC_HOME, else ~/.local/share/bitalloc) or postgresql://USER@HOST/DB for a team")
    p.add_argument("--models-root", default=".", help="models are registered and loaded only from under this folder "
                   "(default: the current folder)")


def add_service_commands(sub) -> None:
    p = sub.add_parser("serve", help="the plan service: HTTP API (/v1, docs at /docs), web page, embedded worker")
    add_store_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--no-auth", action="store_true", help="write endpoints without a token (only with --host 127.0.0.1)")
    p.add_argument("--no-worker", action="store_true", help="run no jobs here: `bitalloc worker` processes take them")
    p.add_argument("--import-cache", action="store_true",
                   help="first import the tables of the local cache (bitalloc's file cache) measured on registered models")
    p.add_argument("--dashboard", default=None, metavar="URL", help="link the pages to an Optuna dashboard at URL")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run the service's jobs (probe tables) from its store, on this machine")
    add_store_arg(p)
    p.add_argument("--threads", type=int, default=1, help="jobs at a time (default 1)")
    p.add_argument("--stale-after", type=float, default=20.0,
                   help="seconds without a heartbeat after which another worker's job is taken over (default 20)")
    p.set_defaults(func=cmd_worker)


def _open(args):
    from ..service.queue import Queue
    from ..service.store import Store
    store = Store(args.store)
    root = Path(args.models_root).resolve()
    if not root.is_dir():
        raise BitallocError(f"--models-root {args.models_root!r} is not a folder")
    return store, root, Queue(store, root)


def cmd_serve(args) -> None:
    import uvicorn

    from ..service import catalog
    from ..service.app import Service, create_app
    from ..service.queue import Worker
    from ..service.security import check_no_auth, load_or_create_token, token_path
    from ..service.store import data_dir
    check_no_auth(args.host, args.no_auth)
    _check_port(args.host, args.port)                 # before the banner and the store: a port in use is one line
    store, root, queue = _open(args)
    token = None if args.no_auth else load_or_create_token(data_dir())
    catalog.register_embedded(store)
    if args.import_cache:
        from ..service.imports import import_cache
        n, skipped = import_cache(store)
        print(f"imported {n} cached table(s) ({skipped} measured on models not registered here were left)")
    from ..service.security import LOOPBACK
    app = create_app(Service(store, queue, root, token, dashboard=args.dashboard, loopback_only=args.host in LOOPBACK))
    worker = None if args.no_worker else Worker(queue)
    print(f"bitalloc serve: http://{args.host}:{args.port} (API docs /docs) · store {store.shown} · models root {root}")
    print("writes need no token (--no-auth)" if token is None else
          f"write token in {token_path(data_dir())} (mode 0600): curl -H \"Authorization: Bearer $(cat "
          f"{token_path(data_dir())})\" …")
    print("jobs run here (one embedded worker)" if worker else "jobs run on `bitalloc worker` processes")
    sys.stdout.flush()
    if worker:
        worker.start()
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        if worker:
            worker.stop()


def _check_port(host: str, port: int) -> None:
    """Refuse, in one line, an address this process cannot listen on (a port in use, a host not of this machine)."""
    import socket
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)          # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError as e:
            raise BitallocError(f"cannot listen on {host}:{port} ({e.strerror or e}): another program uses the port, "
                                "or the address is not this machine's; give another --port or --host") from None


def cmd_worker(args) -> None:
    import threading

    from ..service.queue import Worker
    if args.threads < 1:
        raise BitallocError("--threads must be at least 1")
    store, root, queue = _open(args)
    worker = Worker(queue, threads=args.threads, stale_after=args.stale_after)
    worker.start()
    print(f"bitalloc worker: {args.threads} thread(s) on store {store.shown} · models root {root}", flush=True)
    try:
        threading.Event().wait()
    finally:
        worker.stop()


# what allocate --server cannot send: the service serves plans from stored tables, with its own calibration
LOCAL_ONLY = {"calib": None, "include": "", "exclude": "", "eval": None,
              "baselines": None, "nominal": False, "no_cache": False, "device": None, "stream": "auto"}


def allocate_on_server(args) -> None:
    from ..service.catalog import FIELD_NAMES
    from ..service.client import Client
    from .common import allocate_config
    for key, default in LOCAL_ONLY.items():
        if getattr(args, key, default) != default:
            raise BitallocError(f"--{key.replace('_', '-')} is not served by --server (plans come from the "
                                "server's stored tables): drop it, or run allocate locally")
    resolved = allocate_config(args)
    # the server resolves the same config from these fields (what effort set, it sets again and records)
    config = {k: v for k, v in resolved.to_json().items() if k not in resolved.by_effort}
    client = Client(args.server, getattr(args, "token", None))
    plan = client.allocate(args.model or "refllama-s", args.budget,
                           **{k: config[k] for k in FIELD_NAMES if k != "budget_bits" and k in config})
    from .common import print_plan
    print_plan(plan)
    print(f"\ntrue {plan.true_bpw:.4f} · nominal {plan.nominal_bpw:.4f} · probe {plan.probe} · solver {plan.solver} "
          f"· from {args.server} (plan {client.last_plan_id})")
    plan.save(args.out)
    print(f"plan written to {args.out}")
