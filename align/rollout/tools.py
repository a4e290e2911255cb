"""The tools a multi-turn rollout may call (`tools:` in a GRPO config; the loop is align/rollout/multiturn.py).

    python       built in: runs the model's code in the code reward's OS sandbox (rewards/sandbox.py: unprivileged
                 user, own namespaces, CPU / memory / file / process limits) and answers with its stdout, or with
                 the error's last lines; with `python_state` a sample's earlier cells run again, silently, before
                 the new one (each call is a fresh sandbox: state is replayed, never kept in a live process)
    functions    user functions by `module:function`: type hints and the docstring give the schema the chat
                 template shows the model; called in the trainer's process (trusted code) with the call's
                 arguments, the result's str() is the answer
    environment  a user class by `module:Class`, one instance per sample: `reset(**row)` with the prompt row's
                 columns, its public methods are tools, and an optional `reward(completion) -> float` is the
                 reward named `environment` in the reward list

A tool that raises (or a program that fails or times out) answers with its error text and is counted as a failure
(tools/failures); it never stops the run. Answers longer than `max_output_tokens` are cut, with a marker saying so.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import typing
from collections.abc import Callable
from typing import Any

from ..config import ConfigError, option, require

PROTOCOLS = ("none", "fence", "chat")
RESERVED = ("reset", "reward", "close")  # environment methods that are not tools


@dataclasses.dataclass
class ToolsConfig:
    """Multi-turn rollouts with tools: the model calls a tool, reads its answer, and goes on (align/rollout/multiturn.py)."""

    protocol: str = option("none", "How the model calls a tool. none: single-turn rollouts; fence: a fenced block "
                                   "named after the tool (```python ... ``` runs code; ```name {json args} ``` calls "
                                   "a function), answered by an ```output``` block: needs no template support; chat: "
                                   "the chat template's own tool-call format (<tool_call>{json}</tool_call>), refused "
                                   "for templates without one.")
    python: bool = option(True, "Offer the built-in `python` tool (the code reward's OS sandbox).")
    python_state: bool = option(False, "python: a sample's earlier cells run again (silently) before each new one, so "
                                       "its variables carry over between turns.")
    timeout_s: float = option(10.0, "python: wall-clock limit of one call.")
    memory_mb: int = option(512, "python: address-space limit of one call.")
    isolation: str = option("os", "python: os (the OS sandbox) | none (a plain subprocess with rlimits: trusted "
                                  "code only).")
    functions: list[str] = option(factory=list, help="More tools: `module:function` (type hints + docstring give the "
                                                     "schema).")
    environment: str = option("", "`module:Class`: one instance per sample, reset(**row), its public methods are "
                                  "tools, its optional reward(completion) is the reward `environment`.")
    max_turns: int = option(4, "Model turns per sample (a call in the last turn is not run).")
    max_output_tokens: int = option(128, "A tool answer's length limit in tokens (longer ones are cut, with a "
                                         "marker).")
    workers: int = option(8, "Tool calls run at once.")

    @property
    def enabled(self) -> bool:
        return self.protocol != "none"

    def validate(self) -> None:
        require(self.protocol in PROTOCOLS, "tools.protocol", f"one of {', '.join(PROTOCOLS)}", self.protocol)
        require(self.max_turns >= 1, "tools.max_turns", ">= 1", self.max_turns)
        require(self.max_output_tokens >= 8, "tools.max_output_tokens", ">= 8", self.max_output_tokens)
        require(self.workers >= 1, "tools.workers", ">= 1", self.workers)
        require(self.timeout_s > 0, "tools.timeout_s", "> 0", self.timeout_s)
        require(self.memory_mb >= 64, "tools.memory_mb", ">= 64", self.memory_mb)
        require(self.isolation in ("os", "none"), "tools.isolation", "os or none", self.isolation)
        if self.enabled:
            toolbox(self)  # imports, names and schemas are checked before any work


@dataclasses.dataclass
class Tool:
    name: str
    description: str
    parameters: dict                   # JSON schema of the arguments
    call: Callable[..., str] | None    # None: a method of the sample's environment instance (bound per sample)


def _load(spec: str, key: str):
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ConfigError(f"key '{key}' must be 'module:name', got {spec!r}")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"key '{key}': cannot load {spec!r}: {e}") from None
    except (Exception, SystemExit) as e:  # the module's own code failed while it was imported
        raise ConfigError(f"key '{key}': importing module {module!r} raised {type(e).__name__}: {e}") from None


_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


def schema(fn: Callable, name: str | None = None, skip_self: bool = False) -> tuple[str, dict]:
    """(description, JSON schema of the parameters) of `fn` from its type hints and docstring: the docstring's first
    paragraph describes the tool; a line `arg: text` in it describes that argument."""
    doc = inspect.getdoc(fn) or ""
    description = doc.split("\n\n")[0].replace("\n", " ").strip() or (name or fn.__name__)
    arg_help = {}
    for line in doc.splitlines():
        head, sep, text = line.strip().partition(":")
        if sep and head.isidentifier():
            arg_help[head] = text.strip()
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 (unresolvable annotations: untyped arguments)
        hints = {}
    props, required = {}, []
    params = list(inspect.signature(fn).parameters.values())
    for p in params[1:] if skip_self else params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        hint = typing.get_origin(hints.get(p.name)) or hints.get(p.name)
        props[p.name] = {"type": _JSON_TYPES.get(hint, "string")}
        if p.name in arg_help:
            props[p.name]["description"] = arg_help[p.name]
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
    return description, {"type": "object", "properties": props, "required": required}


def python_tool(cfg: ToolsConfig) -> Tool:
    from rewards.sandbox import SandboxLimits, run_python

    limits = SandboxLimits(wall_s=cfg.timeout_s, cpu_s=max(1, int(cfg.timeout_s)), memory_mb=cfg.memory_mb,
                           output_kb=64)

    def python(code: str, earlier: tuple[str, ...] = ()) -> str:
        """Run Python code and read what it prints.

        code: the program (print what you need)"""
        program = code if not earlier else _replay(earlier, code)
        r = run_python(program, limits=limits, isolation=cfg.isolation)
        if r.timed_out:
            raise ToolFailure(f"timed out after {cfg.timeout_s:g} s\n{r.stdout}")
        if r.returncode != 0:
            tail = "\n".join(r.stderr.strip().splitlines()[-4:])
            raise ToolFailure(f"{r.stdout}{tail}" if r.stdout else tail or f"exit status {r.returncode}")
        return r.stdout

    description, params = schema(python)
    params["properties"].pop("earlier")
    return Tool("python", description, params, python)


def _replay(earlier: tuple[str, ...], code: str) -> str:
    """One program: the earlier cells, output discarded and errors ignored (as they happened before), then `code`."""
    cells = json.dumps(list(earlier))
    return ("import contextlib as _c, io as _io\n_g = {'__name__': '__main__'}\n"
            f"for _cell in {cells}:\n"
            "    try:\n"
            "        with _c.redirect_stdout(_io.StringIO()), _c.redirect_stderr(_io.StringIO()):\n"
            "            exec(compile(_cell, '<earlier cell>', 'exec'), _g)\n"
            "    except BaseException:\n"
            "        pass\n"
            f"exec(compile({code!r}, '<cell>', 'exec'), _g)\n")


class ToolFailure(Exception):
    """A tool's answer that is an error (counted in tools/failures); its text goes to the model."""


@dataclasses.dataclass
class Toolbox:
    tools: dict[str, Tool]
    environment: type | None = None
    python_state: bool = False

    @property
    def env_reward(self) -> bool:
        return self.environment is not None and callable(getattr(self.environment, "reward", None))

    def schemas(self) -> list[dict]:
        """The tools as the chat template's `tools=` takes them (OpenAI function format)."""
        return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                  "parameters": t.parameters}} for t in self.tools.values()]

    def new_environment(self, row: dict) -> Any:
        """One sample's environment instance, reset with the row's columns it accepts (None without one)."""
        if self.environment is None:
            return None
        env = self.environment()
        if hasattr(env, "reset"):
            params = inspect.signature(env.reset).parameters
            takes_all = any(p.kind == p.VAR_KEYWORD for p in params.values())
            env.reset(**{k: v for k, v in row.items() if takes_all or k in params})
        return env


def toolbox(cfg: ToolsConfig) -> Toolbox:
    """The configured tools by name; ConfigError naming the key on a bad spec or a clash of names."""
    tools: dict[str, Tool] = {}

    def add(tool: Tool, key: str) -> None:
        if not tool.name.isidentifier() or tool.name == "output":
            raise ConfigError(f"key '{key}': tool name {tool.name!r} must be an identifier other than 'output'")
        if tool.name in tools:
            raise ConfigError(f"key '{key}': a tool named {tool.name!r} is already defined")
        tools[tool.name] = tool

    if cfg.python:
        add(python_tool(cfg), "tools.python")
    for i, spec in enumerate(cfg.functions):
        fn = _load(spec, f"tools.functions[{i}]")
        if not callable(fn):
            raise ConfigError(f"key 'tools.functions[{i}]': {spec!r} is not callable")
        description, params = schema(fn)
        add(Tool(fn.__name__, description, params, fn), f"tools.functions[{i}]")
    environment = None
    if cfg.environment:
        environment = _load(cfg.environment, "tools.environment")
        if not inspect.isclass(environment):
            raise ConfigError(f"key 'tools.environment': {cfg.environment!r} is not a class")
        for name, method in inspect.getmembers(environment, inspect.isfunction):
            if not name.startswith("_") and name not in RESERVED:
                description, params = schema(method, skip_self=True)
                add(Tool(name, description, params, None), "tools.environment")
    if not tools:
        raise ConfigError("key 'tools.protocol': tools are on but none is defined (tools.python, tools.functions, "
                          "tools.environment)")
    return Toolbox(tools, environment, cfg.python_state)


def call_tool(box: Toolbox, name: str, args: Any, env: Any, earlier: tuple[str, ...]) -> tuple[str, bool]:
    """(answer text, failed) of one call; never raises."""
    tool = box.tools.get(name)
    if tool is None:
        return f"error: no tool named {name!r} (tools: {', '.join(box.tools)})", True
    try:
        if not isinstance(args, dict):
            raise ToolFailure(f"the arguments must be a JSON object, got {type(args).__name__}")
        if name == "python":
            out = tool.call(args.get("code", ""), earlier if box.python_state else ())
        else:
            fn = tool.call if tool.call is not None else getattr(env, name)
            out = fn(**args)
        return ("" if out is None else str(out)), False
    except ToolFailure as e:
        return f"error: {e}", True
    except Exception as e:  # noqa: BLE001 (a tool's error goes back to the model)
        return f"error: {type(e).__name__}: {e}", True
