"""The `deepseek-jax` command (pyproject `[project.scripts]`): one entry point, four tools.

    deepseek-jax train [--config FILE] [section.field=value ...]  # = python train_main.py
    deepseek-jax convert hf-to-orbax|orbax-to-hf ...     # = python -m deepseek_jax.convert
    deepseek-jax plan --config PRESET --mesh AXES ...    # = python -m deepseek_jax.plan
    deepseek-jax generate ...                            # deepseek_jax.generate's CLI

Each subcommand imports its module only when chosen, so `deepseek-jax plan` does not pay for the
data pipeline and a missing optional tool fails alone, with a message.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

# subcommand -> (module, what it does); each module has `main(argv) -> int | object`.
COMMANDS = {
    "train": ("deepseek_jax.train.loop", "train a model (python train_main.py)"),
    "convert": ("deepseek_jax.convert", "convert HF safetensors <-> Orbax checkpoints"),
    "plan": ("deepseek_jax.plan", "memory / communication plan of a mesh, without devices"),
    "generate": ("deepseek_jax.generate", "generate text with a trained or converted model"),
}


def _usage() -> str:
    lines = ["usage: deepseek-jax {" + ",".join(COMMANDS) + "} [args ...]", "", "commands:"]
    lines += [f"  {name:<9} {doc}" for name, (_, doc) in COMMANDS.items()]
    lines.append("\n`deepseek-jax COMMAND --help` describes a command's arguments.")
    return "\n".join(lines)


def _command_main(name: str) -> Callable[[list[str]], object]:
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:  # the module exists but one of its imports is missing
            raise
        raise SystemExit(
            f"deepseek-jax {name}: this installation has no {module_name} module "
            f"(the `{name}` command needs {module_name}.main)"
        ) from None
    main = getattr(module, "main", None)
    if not callable(main):
        raise SystemExit(
            f"deepseek-jax {name}: {module_name} has no main(argv) function to run as a command"
        )
    return main


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatches `argv[0]` to its tool's `main(argv[1:])`; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"deepseek-jax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    status = _command_main(name)(rest)
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
