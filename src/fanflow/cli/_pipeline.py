"""``fanflow run PIPELINE.yaml``: a declarative multi-step job, checked before it runs.

A pipeline names its input, its steps (each a prompt over an item's fields and earlier
steps' outputs), the models and limits, and where results go::

    input: reviews.jsonl          # JSONL, CSV or text (the command's INPUT overrides it)
    output: results.jsonl         # JSONL or .parquet (-o overrides it)
    kind: chain                   # chain (steps in order) or flow (a DAG: independent
                                  # steps run at once)
    max_flows: 8                  # items in progress at once
    settings:                     # as the command's flags: provider, model, concurrency,
      provider: sim               # rpm, tpm, timeout, retries, budget, base-url
      concurrency: 16
    models:                       # optional named models, each with its own settings
      judge: {model: bigger-model}
    steps:
      - name: summary             # the context key of its output (default: output=name)
        prompt: "Summarize: {text}"
      - name: sentiment
        prompt: "Sentiment of: {summary}"
        model: judge
        temperature: 0
        max_tokens: 5

Every error names the file, the line and the field, and says what to write instead. The
validated pipeline maps onto ``fanflow.patterns`` ``Skill``/``Step``/``Chain``/``Flow``
run over the items by ``Pool`` (see ``_runpipe``).
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._exceptions import ConfigError, TemplateError
from ..patterns._prompt import parse_template
from ._settings import OPTIONS

__all__ = [
    "Pipeline",
    "StepSpec",
    "check_fields",
    "did_you_mean",
    "load_pipeline",
    "parse_pipeline",
]

_TOP = {"input", "output", "kind", "max_flows", "settings", "models", "steps", "description"}
_STEP = {
    "name", "prompt", "output", "inputs", "model", "system", "temperature", "max_tokens",
    "seed", "after",
}  # fmt: skip
_SETTING_KEYS = {o.name for o in OPTIONS}

Path_ = tuple[str | int, ...]


@dataclass(frozen=True)
class StepSpec:
    """One step as written in the pipeline file."""

    name: str
    prompt: str
    output: str
    line: int
    inputs: Mapping[str, str] | None = None
    model: str | None = None
    system: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    after: tuple[str, ...] = ()

    @property
    def fields(self) -> list[str]:
        """The template's field names, in order of first use."""
        return list(parse_template(self.prompt).fields)


@dataclass(frozen=True)
class Pipeline:
    """A validated pipeline."""

    path: str
    steps: tuple[StepSpec, ...]
    kind: str = "chain"
    input: str | None = None
    output: str | None = None
    max_flows: int = 10
    settings: Mapping[str, Any] = field(default_factory=dict)
    models: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


# A pipeline is a page of settings and prompts: these bounds are far above any real one
# and stop an alias bomb ("billion laughs": a few lines of anchors that expand to 10^9
# values) or a nesting bomb before it costs time or memory.
MAX_VALUES = 10_000
MAX_DEPTH = 50


@functools.cache
def _loader_class() -> Any:
    """PyYAML's safe loader, stopping at :data:`MAX_DEPTH` levels while it composes.

    Its composer recurses once per level and its scanner does work per open level for
    each token, so deep nesting would end in a RecursionError; here it stops at once,
    naming the line (docs/decisions/0099).
    """
    import yaml

    class Loader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            self.depth += 1
            try:
                if self.depth > MAX_DEPTH:
                    raise RecursionError
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return Loader


class _Doc:
    """The YAML document as plain values, plus the line of every key.

    PyYAML's safe loader builds plain values only: a tag such as
    ``!!python/object/apply:os.system`` is never run, it is an error naming its line.
    Aliases are allowed (``<<: *defaults`` is handy) but a recursive alias, or aliases
    that expand to more than :data:`MAX_VALUES` values, are errors naming the line too.
    """

    def __init__(self, path: str, text: str) -> None:
        import yaml

        self.path = path
        self.lines: dict[Path_, int] = {}
        loader = _loader_class()(text)
        try:
            node = loader.get_single_node()
            if node is None:
                raise ConfigError(f"{path}: the file is empty; a pipeline needs at least 'steps:'")
            self._measure(node)
            self._walk(node, ())
            self.data = loader.construct_document(node)
        except yaml.MarkedYAMLError as exc:
            raise ConfigError(self._yaml_error(exc)) from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        except RecursionError:
            line = loader.get_mark().line + 1  # where the reader had got to
            raise ConfigError(
                f"{path}:{line}: nested too deeply; a pipeline is a few levels of mappings "
                "and lists"
            ) from None
        finally:
            loader.dispose()

    def _yaml_error(self, exc: Any) -> str:
        """One line: the file, the line where the problem starts, what is wrong."""
        problem = exc.problem or "not valid YAML"
        mark = exc.problem_mark
        context = exc.context_mark
        opened = ("a quoted scalar", "a flow sequence", "a flow mapping")
        if (
            exc.context
            and context is not None
            and exc.context.endswith(opened)
            and ("end of stream" in problem or "<stream end>" in problem)
        ):
            # An unclosed quote or bracket is found only at the end of the file: point
            # at where it was opened instead.
            line = context.line + 1
            end = mark.line + 1 if mark is not None else line
            return (
                f"{self.path}:{line}: not valid YAML: {exc.context} that is never closed "
                f"(the file ends at line {end}); close it on line {line}"
            )
        if type(exc).__name__ == "ConstructorError":
            line = (mark or context).line + 1 if (mark or context) is not None else 0
            return (
                f"{self.path}:{line}: not allowed in a pipeline: {problem}; write plain "
                "strings, numbers, lists and mappings (tags are never run)"
            )
        line = mark.line + 1 if mark is not None else 0
        where = f" ({exc.context} on line {context.line + 1})" if exc.context and context else ""
        return f"{self.path}:{line}: not valid YAML: {problem}{where}; fix the syntax"

    def _measure(self, root: Any) -> None:
        """Reject recursive aliases, deep nesting and alias bombs before anything walks
        the document value by value.

        The expanded size of each node is computed once per node (aliases share nodes),
        so a bomb of 10**9 values costs as many steps as it has lines.
        """
        import yaml

        sizes: dict[int, int] = {}
        open_nodes: set[int] = set()

        def size(node: Any, depth: int) -> int:
            key = id(node)
            if key in sizes:
                return sizes[key]
            line = node.start_mark.line + 1
            if key in open_nodes:
                raise ConfigError(
                    f"{self.path}:{line}: a recursive alias (the value contains itself); "
                    "write the value out instead"
                )
            if depth > MAX_DEPTH:
                raise ConfigError(
                    f"{self.path}:{line}: nested more than {MAX_DEPTH} levels deep; a "
                    "pipeline is a few levels of mappings and lists"
                )
            open_nodes.add(key)
            total = 1
            if isinstance(node, yaml.MappingNode):
                for k, v in node.value:
                    total += size(k, depth + 1) + size(v, depth + 1)
            elif isinstance(node, yaml.SequenceNode):
                for v in node.value:
                    total += size(v, depth + 1)
            open_nodes.discard(key)
            sizes[key] = total
            return total

        # Top-level entries one by one, so a bomb is named by the key it is under.
        entries = root.value if isinstance(root, yaml.MappingNode) else [(None, root)]
        total = 1
        for k, v in entries:
            total += (size(k, 1) if k is not None else 0) + size(v, 1)
            if total > MAX_VALUES:
                line = (k if k is not None else v).start_mark.line + 1
                raise ConfigError(
                    f"{self.path}:{line}: the aliases here expand to more than "
                    f"{MAX_VALUES:,} values; a pipeline needs a few dozen (remove the "
                    "nested aliases)"
                )

    def _walk(self, node: Any, path: Path_) -> None:
        import yaml

        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else "<key>"
                self.lines[(*path, name)] = key.start_mark.line + 1
                self._walk(value, (*path, name))
        elif isinstance(node, yaml.SequenceNode):
            for i, value in enumerate(node.value):
                self._walk(value, (*path, i))

    def error(self, path: Path_, message: str) -> ConfigError:
        line = None
        probe = path
        while line is None and probe:
            line = self.lines.get(probe)
            probe = probe[:-1]
        where = f"{self.path}:{line or 1}"
        name = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
        return ConfigError(f"{where}: {name}: {message}" if name else f"{where}: {message}")


def _typed(doc: _Doc, path: Path_, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise doc.error(path, f"must be {what}, got {value!r}")
    if not isinstance(value, kind):
        raise doc.error(path, f"must be {what}, got {type(value).__name__} {value!r}")
    return value


def _unknown(doc: _Doc, path: Path_, keys: Sequence[str], allowed: set[str], what: str) -> None:
    for key in keys:
        if key not in allowed:
            raise doc.error(
                (*path, key),
                f"unknown {what}{did_you_mean(key, allowed)} (use one of "
                f"{', '.join(sorted(allowed))})",
            )


def _settings(doc: _Doc, path: Path_, value: Any) -> dict[str, Any]:
    from ._settings import _convert

    _typed(doc, path, value, dict, "a mapping of settings")
    out: dict[str, Any] = {}
    for key, raw in value.items():
        name = str(key).replace("-", "_")
        if name not in _SETTING_KEYS:
            raise doc.error(
                (*path, key),
                f"unknown setting; use one of {', '.join(sorted(_SETTING_KEYS))}",
            )
        option = next(o for o in OPTIONS if o.name == name)
        try:
            out[name] = _convert(option, raw, "value")
        except ConfigError as exc:
            message = str(exc).removeprefix("value: ").split("; set --")[0]
            raise doc.error((*path, key), message) from None
    return out


def _step(doc: _Doc, i: int, raw: Any, models: Mapping[str, Any]) -> StepSpec:
    path: Path_ = ("steps", i)
    _typed(doc, path, raw, dict, "a mapping with at least 'prompt:'")
    _unknown(doc, path, list(raw), _STEP, "step field")
    if "prompt" not in raw:
        raise doc.error(path, "missing 'prompt:'; every step needs a prompt template")
    prompt = _typed(doc, (*path, "prompt"), raw["prompt"], str, "a template string")
    try:
        parse_template(prompt, "prompt")
    except TemplateError as exc:
        raise doc.error((*path, "prompt"), str(exc).removeprefix("prompt is ")) from None
    name = raw.get("name", raw.get("output", f"step{i + 1}"))
    name = _typed(doc, (*path, "name"), name, str, "a string")
    output = _typed(doc, (*path, "output"), raw.get("output", name), str, "a string")
    inputs = raw.get("inputs")
    if inputs is not None:
        _typed(doc, (*path, "inputs"), inputs, dict, "a mapping {template field: context key}")
        for k, v in inputs.items():
            _typed(doc, (*path, "inputs", k), v, str, "a context key (a string)")
    model = raw.get("model")
    if model is not None:
        _typed(doc, (*path, "model"), model, str, "a model name from 'models:'")
        if model not in models:
            known = ", ".join(sorted(models)) or "none are defined"
            raise doc.error(
                (*path, "model"), f"unknown model {model!r}; define it under 'models:' ({known})"
            )
    after = raw.get("after", [])
    if isinstance(after, str):
        after = [after]
    _typed(doc, (*path, "after"), after, list, "a list of step outputs")
    temperature = raw.get("temperature")
    if temperature is not None:
        _typed(doc, (*path, "temperature"), temperature, (int, float), "a number")
    for key in ("max_tokens", "seed"):
        if raw.get(key) is not None:
            _typed(doc, (*path, key), raw[key], int, "an integer")
    system = raw.get("system")
    if system is not None:
        _typed(doc, (*path, "system"), system, str, "a string")
    return StepSpec(
        name=name,
        prompt=prompt,
        output=output,
        line=doc.lines.get(path, 1),
        inputs=dict(inputs) if inputs is not None else None,
        model=model,
        system=system,
        temperature=float(temperature) if temperature is not None else None,
        max_tokens=raw.get("max_tokens"),
        seed=raw.get("seed"),
        after=tuple(str(a) for a in after),
    )


def parse_pipeline(text: str, path: str = "<pipeline>") -> Pipeline:
    """Parse and validate a pipeline.

    Raises:
        ConfigError: the text is not a valid pipeline; the message names the line and field.
    """
    doc = _Doc(path, text)
    data = doc.data
    _typed(doc, (), data, dict, "a mapping with 'steps:'")
    _unknown(doc, (), [str(k) for k in data], _TOP, "top-level field")
    kind = data.get("kind", "chain")
    if kind not in ("chain", "flow"):
        raise doc.error(("kind",), f"must be chain or flow, got {kind!r}")
    settings = _settings(doc, ("settings",), data["settings"]) if "settings" in data else {}
    models: dict[str, dict[str, Any]] = {}
    if "models" in data:
        _typed(doc, ("models",), data["models"], dict, "a mapping {name: settings}")
        for name, spec in data["models"].items():
            models[str(name)] = _settings(doc, ("models", name), spec or {})
    if "steps" not in data:
        raise doc.error((), "missing 'steps:'; list at least one step with a prompt")
    raw_steps = _typed(doc, ("steps",), data["steps"], list, "a list of steps")
    if not raw_steps:
        raise doc.error(("steps",), "is empty; list at least one step with a prompt")
    steps = tuple(_step(doc, i, s, models) for i, s in enumerate(raw_steps))
    seen: dict[str, int] = {}
    for i, step in enumerate(steps):
        if step.output in seen:
            raise doc.error(
                ("steps", i),
                f"output {step.output!r} is already written by step {seen[step.output] + 1}; "
                "give each step its own output (or name)",
            )
        seen[step.output] = i
        if kind == "chain" and step.after:
            raise doc.error(("steps", i, "after"), "only a flow has 'after:'; set kind: flow")
        for a in step.after:
            if a not in seen and a not in {s.output for s in steps}:
                raise doc.error(("steps", i, "after"), f"no step writes {a!r}")
    max_flows = data.get("max_flows", 10)
    _typed(doc, ("max_flows",), max_flows, int, "an integer >= 1")
    if max_flows < 1:
        raise doc.error(("max_flows",), f"must be >= 1, got {max_flows}")
    for key in ("input", "output"):
        if data.get(key) is not None:
            _typed(doc, (key,), data[key], str, "a file path")
    return Pipeline(
        path=path,
        steps=steps,
        kind=kind,
        input=data.get("input"),
        output=data.get("output"),
        max_flows=max_flows,
        settings=settings,
        models=models,
    )


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``known`` to a mistyped ``name``, or ``""``."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_fields(pipe: Pipeline, input_keys: Collection[str]) -> None:
    """Check that every template field of every step is given: by the input (its keys are
    ``input_keys``), or by a step that runs before it (in a chain, an earlier step; in a
    flow, any other step, which then runs first).

    Raises:
        ConfigError: a field nothing provides, with the file, line and step, what is
            available, and the closest name when it looks like a typo.
    """
    outputs = [s.output for s in pipe.steps]
    for i, step in enumerate(pipe.steps):
        earlier = outputs[:i] if pipe.kind == "chain" else outputs[:i] + outputs[i + 1 :]
        available = [*input_keys, *(o for o in earlier if o not in input_keys)]
        for name in step.fields:
            key = step.inputs.get(name, name) if step.inputs is not None else name
            if key in available:
                continue
            steps = "an earlier step" if pipe.kind == "chain" else "another step"
            given = ", ".join(available) or "nothing"
            raise ConfigError(
                f"{pipe.path}:{step.line}: steps[{i}] ({step.name}): the prompt's {{{name}}} "
                f"is not a field of the input nor the output of {steps} (available: "
                f"{given}){did_you_mean(key, available)}"
            )


def load_pipeline(path: str) -> Pipeline:
    """Read and validate the pipeline file at ``path``."""
    try:
        import yaml  # noqa: F401
    except ImportError:
        raise ConfigError("fanflow run needs PyYAML: pip install 'fanflow[cli]'") from None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"pipeline file {path} cannot be read: {exc.strerror}") from None
    return parse_pipeline(text, path)
