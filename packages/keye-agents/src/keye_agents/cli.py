"""The ``keye-agents`` command: ``run`` a task, ``serve`` a backend over HTTP, list ``tools``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any

from keye_agents.agent import DEFAULT_TOOLS, Agent
from keye_agents.backends import BackendError
from keye_agents.plugins import load_plugins
from keye_agents.sandbox import SandboxLimits


def _backend_options(args: argparse.Namespace) -> dict[str, Any]:
    """Only the backend flags the user gave, so each backend factory sees options it understands."""
    options = {
        "base_url": args.base_url,
        "model": args.model,
        "model_path": args.model_path,
        "preset": args.preset,
        "path": args.script,
    }
    if args.api_key_env:
        options["api_key"] = os.environ.get(args.api_key_env) or sys.exit(f"${args.api_key_env} is not set")
    if args.text_tools:
        options["native_tools"] = False
    return {k: v for k, v in options.items() if v is not None}


def make_backend(args: argparse.Namespace, plugins) -> Any:
    backends = plugins.backends()
    if args.backend not in backends:
        sys.exit(f"no backend {args.backend!r}; available: {', '.join(sorted(backends))}")
    options = _backend_options(args)
    try:
        return backends[args.backend](**options)
    except TypeError as exc:
        sys.exit(f"backend {args.backend!r} does not take these options {sorted(options)}: {exc}")
    except (ValueError, OSError, BackendError) as exc:
        sys.exit(f"backend {args.backend!r}: {exc}")


def _add_backend_flags(p: argparse.ArgumentParser, default: str) -> None:
    g = p.add_argument_group("model backend")
    g.add_argument("--backend", default=default, help=f"backend name from the plugins (default {default})")
    g.add_argument("--base-url", help="openai: server URL, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--model", help="openai: model name sent to the server")
    g.add_argument("--api-key-env", help="openai: environment variable holding the API key")
    g.add_argument("--text-tools", action="store_true", help="openai: Hermes text tool calls, not native")
    g.add_argument("--model-path", help="local: a Keye checkpoint folder")
    g.add_argument("--preset", help="local: a fresh model of this preset (e.g. tiny) when no --model-path")
    g.add_argument("--script", help="scripted: a JSON list of reply strings to replay")


def _print_event(event: dict[str, Any], streamed: bool) -> None:
    kind = event["event"]
    if kind == "start":
        print(f"## tools: {', '.join(event['tools']) or 'none'}; workspace {event['workspace']}\n")
    elif kind == "task":
        print(f"## task (turn {event['turn']})\n{event['content']}\n")
    elif kind == "model":
        if event.get("content") and not streamed:
            print(f"## model (step {event['step']})\n{event['content']}")
        for call in event.get("tool_calls", []):
            print(f"-> {call['name']}({json.dumps(call['arguments'], ensure_ascii=False)})")
        print()
    elif kind == "tool":
        status = "ok" if event["ok"] else "error"
        print(f"<- {event['name']} [{status}, {event['seconds']} s]\n{event['result']}\n")
    elif kind == "parse_error":
        for err in event["errors"]:
            print(f"!! unparsed tool call: {err['message']}\n")
    elif kind == "backend_error":
        print(f"!! backend error: {event['error']}\n")
    elif kind == "stop":
        print(f"## stopped: {event['reason']} after {event['steps']} steps\n{event.get('answer', '')}")


def cmd_run(args: argparse.Namespace) -> int:
    plugins = load_plugins()
    backend = make_backend(args, plugins)
    options: dict[str, Any] = {"timeout_s": args.timeout, "network": args.sandbox_network}
    options["limits"] = SandboxLimits(cpu_s=args.cpu, memory_mb=args.memory_mb)
    if args.docs:
        options["docs"] = args.docs
    if args.search_backend:
        options["search_backend"] = args.search_backend
    streamed = args.stream and not args.json

    def on_event(event: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps(event, ensure_ascii=False, default=str), flush=True)
        else:
            _print_event(event, streamed)

    def on_text(text: str) -> None:
        print(text, end="", flush=True)

    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    workspace = args.workspace or tempfile.mkdtemp(prefix="keye-agents-run-")  # kept: the run's files
    prompt = {} if args.system_prompt is None else {"system_prompt": args.system_prompt or None}
    with Agent(
        backend,
        tools,
        **prompt,
        workspace=workspace,
        max_steps=args.max_steps,
        time_budget_s=args.time_budget,
        transcript=args.transcript,
        on_event=on_event,
        on_text=on_text if streamed else None,
        tool_options=options,
        plugins=plugins,
    ) as agent:
        result = agent.run(sys.stdin.read() if args.task == "-" else args.task)
    print(f"workspace: {workspace}", file=sys.stderr)
    return 0 if result.stop_reason == "answer" else 1


def cmd_serve(args: argparse.Namespace) -> int:
    from keye_agents.server import make_server

    backend = make_backend(args, load_plugins())
    key = None
    if args.require_key_env:
        key = os.environ.get(args.require_key_env) or sys.exit(f"${args.require_key_env} is not set")
    server = make_server(backend, args.host, args.port, args.served_model_name, key)
    print(f"serving {args.backend} as {args.served_model_name!r} at {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def cmd_tools(args: argparse.Namespace) -> int:
    plugins = load_plugins()
    owners = {}
    for impl in plugins.manager.hook.keye_agent_tools.get_hookimpls():
        owners.update(dict.fromkeys(impl.function(), impl.plugin_name))
    for name in sorted(plugins.tools()):
        print(f"{name}\t{owners[name]} ({plugins.origins.get(owners[name], '?')})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keye-agents", description="Keye agent runtime")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one task and print the transcript")
    run.add_argument("task", help="the task; '-' reads it from standard input")
    run.add_argument("--system-prompt", help="replace the default system prompt ('' for none)")
    _add_backend_flags(run, "openai")
    run.add_argument("--tools", default=",".join(DEFAULT_TOOLS), help="comma list of tool names")
    run.add_argument("--workspace", help="folder the tools work in (default: a new temporary folder, kept)")
    run.add_argument("--docs", help="folder of documents for the search tool (default: the workspace)")
    run.add_argument("--search-backend", help="search backend name (default local)")
    run.add_argument("--max-steps", type=int, default=10)
    run.add_argument("--time-budget", type=float, default=300.0, help="seconds for the whole task")
    run.add_argument("--timeout", type=float, default=30.0, help="seconds per python call")
    run.add_argument("--cpu", type=int, default=10, help="CPU seconds per python call")
    run.add_argument("--memory-mb", type=int, default=1024, help="address-space limit of the sandbox")
    run.add_argument("--sandbox-network", action="store_true", help="opt out of network isolation")
    run.add_argument("--transcript", help="append every step as JSON lines to this file")
    run.add_argument("--stream", action="store_true", help="print model text as it arrives")
    run.add_argument("--json", action="store_true", help="print the transcript as JSON lines")
    run.set_defaults(func=cmd_run)

    serve = sub.add_parser("serve", help="serve a backend as an OpenAI-compatible endpoint")
    _add_backend_flags(serve, "local")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", default="keye")
    serve.add_argument("--require-key-env", help="environment variable holding the API key clients must send")
    serve.set_defaults(func=cmd_serve)

    tools = sub.add_parser("tools", help="list the tools the installed plugins provide")
    tools.set_defaults(func=cmd_tools)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
