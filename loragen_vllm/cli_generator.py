"""``loragen-vllm generator start | status | stop``: the Ray generator actor from the command line.

`add_generator_commands` adds the three subcommands under the ``generator`` command of
``cli.py``; `run_generator_command` connects to the cluster and runs the chosen one. Failures
are raised as `UsageError` (exit code 2) or `CommandFailed` (exit code 1), which ``cli.main``
reports. Ray is imported only when a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys

from generator.arg_types import count, number
from loragen_vllm.defaults import MISSING_GENERATOR, default_generator_checkpoint
from loragen_vllm.envs import MAX_NUMBER
from loragen_vllm.errors import CommandFailed, UsageError
from loragen_vllm.ray_actor import ACTOR_NAME, NAMESPACE, ActorConfig, connect, find_actor, start_actor, stop_actor

SECONDS = number(maximum=MAX_NUMBER, above=True)  # a wait: finite and positive


def add_generator_commands(parser: argparse.ArgumentParser) -> None:
    """Add ``start``, ``status``, ``stop`` under `parser` (the ``generator`` command)."""
    sub = parser.add_subparsers(dest="generator_command", required=True, metavar="{start,status,stop}")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--ray-address", required=True, metavar="ADDR", help="Ray cluster address, e.g. 10.0.0.1:6379")
        p.add_argument("--name", default=ACTOR_NAME, help=f"actor name (default {ACTOR_NAME})")
        p.add_argument("--namespace", default=NAMESPACE, help=f"Ray namespace (default {NAMESPACE})")

    p = sub.add_parser("start", help="start the generator actor on the Ray cluster (idempotent)")
    common(p)
    p.add_argument(
        "--checkpoint",
        "--generator",
        dest="checkpoint",
        metavar="CKPT",
        default=None,
        help="generator checkpoint folder; must be readable at this path on the actor's node "
        "(default: $LORAGEN_GENERATOR, else the shipped checkpoint)",
    )
    p.add_argument("--num-gpus", type=number(), default=None, metavar="N",
                   help="GPUs for the actor (default: 1 if the cluster has one, else 0)")
    p.add_argument("--num-cpus", type=number(), default=1, metavar="N", help="CPUs for the actor (default 1)")
    p.add_argument(
        "--resources",
        type=json.loads,
        default=None,
        metavar="JSON",
        help='custom Ray resources, to pin the actor to a node, e.g. \'{"generator_node": 1}\'',
    )
    p.add_argument("--batch-window-ms", type=number(maximum=MAX_NUMBER), default=ActorConfig.batch_window_s * 1000, metavar="MS",
                   help="calls arriving this soon after the first share one generator pass "
                   f"(default {ActorConfig.batch_window_s * 1000:g})")
    p.add_argument("--encode-early", action=argparse.BooleanOptionalAction, default=ActorConfig.encode_early,
                   help="encode a window's first description while the window waits (default: "
                   f"{'on' if ActorConfig.encode_early else 'off'})")
    p.add_argument("--max-batch-size", type=count(1), default=ActorConfig.max_batch_size, metavar="N",
                   help=f"descriptions per generator pass at most (default {ActorConfig.max_batch_size})")
    p.add_argument("--cache-mib", type=number(maximum=2.0**30), default=ActorConfig.cache_bytes / 2**20, metavar="MIB",
                   help="memory for recent results, so that a description several servers ask for "
                   f"is generated once (default {ActorConfig.cache_bytes / 2**20:g})")
    p.add_argument("--max-restarts", type=count(-1), default=-1, metavar="N", help="-1: restart forever (default)")
    p.add_argument("--max-task-retries", type=count(-1), default=3, metavar="N",
                   help="times a call in flight when the actor died is re-sent to the restarted one "
                   "(default 3; -1: always)")
    p.add_argument("--timeout", type=SECONDS, default=300.0, help="seconds to wait for the actor to be ready")
    p.set_defaults(generator_func=_cmd_start)

    p = sub.add_parser("status", help="print the actor's health and statistics as JSON")
    common(p)
    p.add_argument("--timeout", type=SECONDS, default=30.0)
    p.set_defaults(generator_func=_cmd_status)

    p = sub.add_parser("stop", help="kill the actor for good")
    common(p)
    p.set_defaults(generator_func=_cmd_stop)


def run_generator_command(args: argparse.Namespace) -> int:
    """Connect to the cluster, then run the parsed ``generator`` subcommand; returns 0."""
    try:
        connect(args.ray_address, args.namespace)
    except Exception as e:  # ConnectionError and friends: say which address failed
        raise UsageError(f"cannot connect to the Ray cluster at {args.ray_address}: {e}") from e
    args.generator_func(args)
    return 0


def _cmd_start(args: argparse.Namespace) -> None:
    checkpoint = args.checkpoint or default_generator_checkpoint()
    if checkpoint is None:
        raise UsageError(MISSING_GENERATOR.replace("--generator", "--checkpoint"))
    config = ActorConfig(
        batch_window_s=args.batch_window_ms / 1000,
        encode_early=args.encode_early,
        max_batch_size=args.max_batch_size,
        cache_bytes=int(args.cache_mib * 2**20),
    )
    try:
        _, health, created = start_actor(
            checkpoint,
            name=args.name,
            namespace=args.namespace,
            num_gpus=args.num_gpus,
            num_cpus=args.num_cpus,
            resources=args.resources,
            config=config,
            max_restarts=args.max_restarts,
            max_task_retries=args.max_task_retries,
            ready_timeout_s=args.timeout,
        )
    except RuntimeError as e:
        raise CommandFailed(str(e)) from e
    verb = "started" if created else "already running"
    print(
        f"{args.namespace}/{args.name} {verb}: {health['kind']} generator "
        f"{health['fingerprint'][:12]} on {health['device']} (node {health['node_id'][:12]}, pid {health['pid']})",
        file=sys.stderr,
    )
    print(json.dumps(health, indent=2))


def _cmd_status(args: argparse.Namespace) -> None:
    import ray

    handle = find_actor(args.name, args.namespace)
    if handle is None:
        raise CommandFailed(f"{args.namespace}/{args.name}: not running")
    try:
        health = ray.get(handle.health.remote(), timeout=args.timeout)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as e:
        raise CommandFailed(f"{args.namespace}/{args.name}: not answering ({type(e).__name__}: {e})") from e
    print(json.dumps(health, indent=2))


def _cmd_stop(args: argparse.Namespace) -> None:
    if not stop_actor(args.name, args.namespace):
        raise CommandFailed(f"{args.namespace}/{args.name}: not running")
    print(f"{args.namespace}/{args.name} stopped", file=sys.stderr)
