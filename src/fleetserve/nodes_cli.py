"""`fleetserve nodes list|join|drain|stop|scale --url URL`: the admin API from the command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import urllib.error
import urllib.request
from typing import Any

from fleetserve.errors import InvalidRequestError
from fleetserve.gateway.launcher import ROLES

COLUMNS = (
    ("NAME", "name"),
    ("STATE", "state"),
    ("MODEL", "model"),
    ("ROLE", "role"),
    ("LAYERS", "layers"),
    ("ADDRESS", "address"),
    ("DEVICE", "device"),
    ("MEM MiB", "memory"),
    ("RUN", "running"),
    ("WAIT", "waiting"),
    ("KV", "kv"),
    ("TTFT ms", "ttft"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        choices=("list", "join", "drain", "stop", "scale"),
        help="list the workers (and deployments, node agents, pipelines); join a local worker; drain or stop one; "
        "scale a deployment run by node agents",
    )
    parser.add_argument("worker", nargs="?", help="drain/stop: the worker's name or id")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway (default: http://127.0.0.1:8000)")
    parser.add_argument("--admin-key", default=None, help="the gateway's admin key, if it has one")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="join: the model (default: the default)")
    parser.add_argument("--device", default="cpu", help="join: cpu or cuda[:N] (default: cpu)")
    parser.add_argument(
        "--max-memory-mb", type=int, default=None, help="join: memory cap; a stage's weights plus KV (default: enough)"
    )
    parser.add_argument(
        "--role",
        default="replica",
        choices=ROLES,
        help="join: a replica (the whole model, whole requests), a prefill worker (computes prompts and hands their "
        "KV to a decode worker), a decode worker (goes on from a prefill worker's KV) or a pipeline stage node "
        "(default: replica)",
    )
    parser.add_argument(
        "--replicas", type=int, default=None, help="scale: how many workers of --model in --role node agents run"
    )
    parser.add_argument("--json", action="store_true", help="print the gateway's JSON answer")


def call(url: str, method: str, path: str, admin_key: str | None, body: dict | None = None) -> Any:
    headers = {"Content-Type": "application/json"}
    if admin_key:
        headers["Authorization"] = f"Bearer {admin_key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url.rstrip("/") + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        with contextlib.suppress(ValueError, KeyError, TypeError):
            detail = json.loads(detail)["error"]["message"]
        raise InvalidRequestError(f"the gateway answered {exc.code}: {detail}") from None
    except urllib.error.URLError as exc:
        raise InvalidRequestError(f"cannot reach {url}: {exc.reason}") from None


def _cells(w: dict) -> dict[str, str]:
    mem = w.get("memory_cap_bytes") or 0
    kv = w.get("kv_usage")
    ttft = w.get("recent_ttft_s") or 0
    return {
        "name": w.get("name", ""),
        "state": w.get("state", ""),
        "model": w.get("model", ""),
        "role": w.get("role", "") or "",
        "layers": f"{w.get('layer_start', 0)}-{w['layer_end']}" if w.get("layer_end") else "-",
        "address": w.get("address", "") or "-",
        "device": w.get("device", "") or "-",
        "memory": f"{mem / 2**20:.0f}" if mem else "-",
        "running": str(w.get("running", "-")),
        "waiting": str(w.get("waiting", "-")),
        "kv": f"{100 * kv:.0f}%" if kv is not None else "-",
        "ttft": f"{1000 * ttft:.0f}" if ttft else "-",
    }


def format_table(workers: list[dict]) -> str:
    rows = [_cells(w) for w in workers]
    widths = {key: max([len(title)] + [len(r[key]) for r in rows]) for title, key in COLUMNS}
    lines = ["  ".join(title.ljust(widths[key]) for title, key in COLUMNS).rstrip()]
    lines += ["  ".join(r[key].ljust(widths[key]) for _, key in COLUMNS).rstrip() for r in rows]
    return "\n".join(lines) if rows else lines[0] + "\n(no workers)"


def format_pipelines(pipelines: list[dict]) -> str:
    """One line per pipeline: its status (a serving one's shows its stages' layer ranges)."""
    lines = []
    for p in pipelines:
        line = f"pipeline {p.get('model', '')}: {p.get('status', '')}"
        if p.get("serving"):
            line += f" (re-partitions: {p.get('repartitions', 0)}, bubble {100 * (p.get('bubble') or 0):.0f}%)"
        lines.append(line)
    return "\n".join(lines)


def format_deployment(d: dict) -> str:
    """One line per deployment, desired against actual; a second per crash-looping worker."""
    s = d.get("status", {})
    line = (
        f"deployment {d.get('model', '')}/{d.get('role', '')}: {s.get('desired', 0)} desired "
        f"({d.get('min_replicas', 0)}..{d.get('max_replicas', 0)}), {s.get('planned', 0)} placed, "
        f"{s.get('running', 0)} running, {s.get('serving', 0)} serving"
    )
    if s.get("waiting"):
        line += f"; waiting: {s['waiting']}"
    for looping in s.get("crash_looping", []):
        last = (looping.get("last_lines") or [""])[-1]
        line += f"\n  {looping.get('worker')} on {looping.get('node')} is crash-looping (exit {looping.get('exit_code')}): {last}"
    return line


def format_node(n: dict) -> str:
    free = n.get("free", {})
    return (
        f"node {n.get('name', '')}: {n.get('state', '')}, {len(n.get('workers', []))} of {n.get('max_workers', 0)} "
        f"worker(s), {free.get('memory_mb', 0)} of {n.get('memory_mb', 0)} MiB and {free.get('cpus', 0)} of "
        f"{n.get('cpus', 0)} core(s) free"
    )


def _list(args: argparse.Namespace) -> None:
    answer = call(args.url, "GET", "/admin/workers", args.admin_key)
    answer["pipelines"] = call(args.url, "GET", "/admin/pipelines", args.admin_key)["pipelines"]
    answer["deployments"] = call(args.url, "GET", "/admin/deployments", args.admin_key)["deployments"]
    answer["nodes"] = call(args.url, "GET", "/admin/nodes", args.admin_key)["nodes"]
    if args.json:
        print(json.dumps(answer, indent=2))
        return
    print(format_table(answer["workers"]))
    for line in [format_pipelines(answer["pipelines"])] if answer["pipelines"] else []:
        print(line)
    for d in answer["deployments"]:
        print(format_deployment(d))
    for n in answer["nodes"]:
        print(format_node(n))


def run(args: argparse.Namespace) -> int:
    if args.action in ("drain", "stop") and not args.worker:
        raise InvalidRequestError(f"nodes {args.action} needs the worker's name or id", "worker")
    if args.action == "list":
        _list(args)
        return 0
    if args.action == "scale":
        if args.replicas is None or args.replicas < 0:
            raise InvalidRequestError("nodes scale needs --replicas N (0 or more) and --model", "replicas")
        body = {"replicas": args.replicas, "role": args.role}
        answer = call(args.url, "PUT", f"/admin/deployments/{args.model}", args.admin_key, body)
        print(json.dumps(answer, indent=2) if args.json else format_deployment(answer))
        return 0
    if args.action == "join":
        body = {"model": args.model, "device": args.device, "role": args.role}
        if args.max_memory_mb is not None:
            body["max_memory_mb"] = args.max_memory_mb
        answer = call(args.url, "POST", "/admin/workers", args.admin_key, body)
        start = f"started {answer['name']} (pid {answer['pid']}): {answer['model']} on {answer['device']}"
        if answer.get("role") == "stage":
            message = f"{start}, a stage node with a {answer['max_memory_mb']} MiB cap; the gateway assigns its layers"
        else:
            role = f", a {answer['role']} worker" if answer.get("role") in ("prefill", "decode") else ""
            message = f"{start}{role}, {answer['max_memory_mb']} MiB cap, {answer['kv_cache_mb']} MiB KV"
        message += "; it registers when loaded"
    else:
        answer = call(args.url, "POST", f"/admin/workers/{args.worker}/{args.action}", args.admin_key)
        message = f"{args.worker}: " + ("draining" if args.action == "drain" else "draining, then stopping")
    print(json.dumps(answer, indent=2) if args.json else message)
    return 0
