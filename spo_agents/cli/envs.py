"""`spo-agent envs` and `spo-agent check-env`: list the environments, check one against the contract."""

from __future__ import annotations

import argparse
import json

ENVS_DESCRIPTION = (
    "List every registered environment id (built-ins and entry-point plugins) with its one-line description; "
    "`--json` prints the same as JSON for scripts."
)


def _run_envs(args: argparse.Namespace) -> int:
    from spo_agents.registry import ENVS, describe

    specs = ENVS.list()
    rows = [{"id": s.id, "description": describe(s), "source": s.source} for s in specs]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no environments registered")
        return 0
    width = max(len(r["id"]) for r in rows)
    for r in rows:
        source = "" if r["source"] == "built-in" else f"  [{r['source']}]"
        print(f"{r['id']:<{width}}  {r['description']}{source}")
    print("\nAn id without its version (`math-python`) means the latest version.")
    return 0


def _add_envs_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("envs", help="list the registered environments", description=ENVS_DESCRIPTION)
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(func=_run_envs)


def _run_check_env(args: argparse.Namespace) -> int:

    from spo_agents import envs
    from spo_agents.cli.env_args import parse_env_args
    from spo_agents.envs.checker import check_env, format_results, load_tokenizer

    # Only what the user asked for: plugin envs need not take `split` or `sandbox`.
    kwargs = {k: v for k, v in (("split", args.split), ("sandbox", args.sandbox)) if v is not None}
    kwargs.update(parse_env_args(args.env_arg))
    from spo_agents.registry import ENVS

    env_id = envs.spec(args.env_id).id  # fails early, with "Did you mean", on unknown ids
    _, entry = ENVS.load(env_id)
    tokenizer = load_tokenizer(args.model, args.chat_template)
    results = check_env(
        lambda: envs.make(env_id, **kwargs),
        tokenizer=tokenizer,
        episodes=args.episodes,
        seed=args.seed,
        env_id=env_id,
        entry=entry,
    )
    print(format_results(env_id, results))
    return 0 if all(r.passed for r in results) else 1


def _add_check_env_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check-env",
        help="check that an environment keeps the contract training relies on",
        description=(
            "Check the id's version, the constructor (`split`, `**kwargs`), the members rollouts read, Gymnasium's "
            "env checker, a same-seed determinism check, garbage actions, the stop-sequence contract and the "
            "token-prefix contract with a real chat template. Exit status 1 if any check fails."
        ),
    )
    p.add_argument(
        "env_id", metavar="ID", help="a registered environment id (see `spo-agent envs`), or `package.module:EnvClass`"
    )
    p.add_argument(
        "--model",
        default=None,
        help="model directory or name whose tokenizer and chat template to use "
        "(default: the tiny test model, SmolLM2 tokenizer with ChatML)",
    )
    p.add_argument(
        "--chat-template", default=None, metavar="FILE", help="a Jinja chat template file to use instead of the model's"
    )
    p.add_argument(
        "--episodes", type=int, default=2, metavar="N", help="episodes per determinism and token check (default 2)"
    )
    p.add_argument("--seed", type=int, default=0, metavar="S", help="first seed (default 0)")
    p.add_argument(
        "--split", default=None, help="problem split to build the env with (default: the env's, normally train)"
    )
    p.add_argument(
        "--sandbox", default=None, help="sandbox backend for tool environments (default: the env's, normally local)"
    )
    p.add_argument(
        "--env-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra env keyword argument (repeatable), e.g. `--env-arg task=prime_factorization`",
    )
    p.set_defaults(func=_run_check_env)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _add_envs_parser(sub)
    _add_check_env_parser(sub)
