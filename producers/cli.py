"""The ``pipefleet`` command: client verbs here, server verbs loaded on demand.

Client verbs: ``submit``, ``status``, ``result``, ``cancel``, ``deployments`` (``remove``), ``fleet``,
``backlog``, ``run-dataset``. Server verbs: ``worker``, ``flower``, ``demo``, ``gateway``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from producers.codec import encode_output
from producers.errors import PipefleetError

_SERVER_VERBS = {
    "worker": ("worker.cli", "build_parser", "run"),
    "flower": ("worker.flower", "build_parser", "run"),
    "demo": ("benchmarks.demo", "build_parser", "run"),
    "gateway": ("gateway.cli", "build_parser", "run"),
}


def _client(args: argparse.Namespace):
    from producers.client import FleetClient

    overrides = {k: v for k, v in (("broker_url", args.broker_url), ("result_backend", args.result_backend)) if v}
    return FleetClient.from_env(**overrides)


def _print_json(value: Any) -> None:
    print(json.dumps(encode_output(value), indent=2, ensure_ascii=False))


def _cmd_submit(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        inputs = json.loads(args.input)
    except json.JSONDecodeError:
        inputs = args.input  # plain text is one text input
    job = client.submit(task=args.task, model=args.model, deployment=args.deployment, inputs=inputs,
                        params=json.loads(args.params) if args.params else None, priority=args.priority,
                        chunk_size=args.chunk_size)
    if not args.wait:
        print(job.id)
        return 0
    _print_json(job.result(timeout=args.timeout))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    print(_client(args).job(args.job_id).status().model_dump_json(indent=2))
    return 0


def _cmd_result(args: argparse.Namespace) -> int:
    job = _client(args).job(args.job_id)
    if not args.wait:
        status = job.status()
        if status.state.value not in ("SUCCESS", "FAILURE", "CANCELLED"):
            print(status.model_dump_json(indent=2))
            return 3
    _print_json(job.result(timeout=args.timeout))
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    _client(args).job(args.job_id).cancel()
    print(f"cancelled {args.job_id}")
    return 0


def _cmd_deployments(args: argparse.Namespace) -> int:
    if getattr(args, "action", None) == "remove":
        from producers.registrations import remove_deployment

        removal = remove_deployment(_client(args), args.name, force=args.force)
        print(f"removed {removal.name}; {len(removal.failed_jobs)} queued job(s) failed with UnknownDeployment")
        return 0
    infos = _client(args).deployments()
    print(json.dumps([i.model_dump() for i in infos], indent=2))
    return 0


def _cmd_fleet(args: argparse.Namespace) -> int:
    from producers.fleet import fleet_snapshot, format_fleet

    snapshot = fleet_snapshot(_client(args))
    print(snapshot.model_dump_json(indent=2) if args.json else format_fleet(snapshot))
    return 0


def _cmd_backlog(args: argparse.Namespace) -> int:
    from producers.backlog import backlogs
    from producers.errors import UnknownDeployment

    client = _client(args)
    if args.deployment not in {info.name for info in client.deployments()}:
        raise UnknownDeployment(f"no deployment {args.deployment!r} is registered or live")
    print(client.access.call(backlogs, client.redis, [args.deployment])[0].total)
    return 0


def _cmd_run_dataset(args: argparse.Namespace) -> int:
    from producers.datasets import run_dataset

    return run_dataset(_client(args), args)


def build_parser() -> argparse.ArgumentParser:
    """The ``pipefleet`` argument parser (server verbs get their own parsers)."""
    parser = argparse.ArgumentParser(prog="pipefleet", description="Run transformers pipelines on a Celery fleet")
    parser.add_argument("--broker-url", help="default: $PIPEFLEET_BROKER_URL or redis://127.0.0.1:6379/0")
    parser.add_argument("--result-backend", help="default: $PIPEFLEET_RESULT_BACKEND or redis://127.0.0.1:6379/1")
    verbs = parser.add_subparsers(dest="verb", required=True)

    submit = verbs.add_parser("submit", help="submit a job")
    submit.add_argument("--task")
    submit.add_argument("--model")
    submit.add_argument("--deployment")
    submit.add_argument("--input", required=True, help="JSON input (a list for several), or plain text")
    submit.add_argument("--params", help="JSON object of call params")
    submit.add_argument("--priority", type=int)
    submit.add_argument("--chunk-size", type=int)
    submit.add_argument("--wait", action="store_true", help="wait and print the result")
    submit.add_argument("--timeout", type=float, default=600.0)
    submit.set_defaults(handler=_cmd_submit)

    for name, handler, help_text in (("status", _cmd_status, "show a job's status"),
                                     ("result", _cmd_result, "print a job's result"),
                                     ("cancel", _cmd_cancel, "cancel a job")):
        verb = verbs.add_parser(name, help=help_text)
        verb.add_argument("job_id")
        if name == "result":
            verb.add_argument("--wait", action="store_true")
            verb.add_argument("--timeout", type=float, default=600.0)
        verb.set_defaults(handler=handler)

    deployments = verbs.add_parser("deployments", help="list known deployments (and their live workers)")
    deployments.set_defaults(handler=_cmd_deployments)
    actions = deployments.add_subparsers(dest="action")
    remove = actions.add_parser("remove", help="forget a deployment; its queued jobs fail with UnknownDeployment")
    remove.add_argument("name")
    remove.add_argument("--force", action="store_true", help="even while live workers serve it")
    fleet = verbs.add_parser("fleet", help="show workers, deployments and queue depths")
    fleet.add_argument("--json", action="store_true")
    fleet.set_defaults(handler=_cmd_fleet)

    backlog = verbs.add_parser("backlog", help="print one deployment's backlog: queued (every priority) + claimed")
    backlog.add_argument("deployment")
    backlog.set_defaults(handler=_cmd_backlog)

    dataset = verbs.add_parser("run-dataset", help="run a jsonl/csv/parquet file through a deployment")
    dataset.add_argument("--task")
    dataset.add_argument("--model")
    dataset.add_argument("--deployment")
    dataset.add_argument("--input", required=True)
    dataset.add_argument("--column", required=True)
    dataset.add_argument("--id-column")
    dataset.add_argument("--output", required=True)
    dataset.add_argument("--params")
    dataset.add_argument("--chunk-size", type=int, default=64)
    dataset.add_argument("--max-in-flight", type=int, default=8)
    dataset.set_defaults(handler=_cmd_run_dataset)

    for verb in _SERVER_VERBS:
        verbs.add_parser(verb, add_help=False, help=f"run the {verb} (see pipefleet {verb} --help)")
    return parser


def server_parser(verb: str) -> argparse.ArgumentParser | None:
    """The argument parser of a server verb (its module is imported only now), or None for a client verb."""
    if verb not in _SERVER_VERBS:
        return None
    import importlib

    module_name, parser_name, _ = _SERVER_VERBS[verb]
    return getattr(importlib.import_module(module_name), parser_name)()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pipefleet`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    server_verb = next((a for a in argv if not a.startswith("-")), None)
    if server_verb in _SERVER_VERBS:
        import importlib

        module_name, parser_name, run_name = _SERVER_VERBS[server_verb]
        module = importlib.import_module(module_name)
        rest = argv[argv.index(server_verb) + 1:]
        return getattr(module, run_name)(getattr(module, parser_name)().parse_args(rest))
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except PipefleetError as error:
        print(f"pipefleet: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
