"""Generated pages of the docs site: the configuration reference and the API index.

Both are written from the code at build time, so they cannot drift from it: the types and
defaults come from the imported dataclasses, the descriptions from the ``#`` comments
written above each field (read from the source text with ``tokenize``, since comments
never reach the imported objects), the method sections from the method registry.

mkdocs loads this file as a hook (``hooks:`` in mkdocs.yml); a page asks for a generated
block with a placeholder comment, replaced in :func:`on_page_markdown`::

    <!-- generated: config-reference -->
    <!-- generated: api-index mixmask.ops.grid_masks mixmask.ops.mixing mixmask.ops.erasing -->

The generators are pure functions (:func:`config_reference_markdown`,
:func:`api_index_markdown`) that tests call directly.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import io
import re
import tokenize
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

PLACEHOLDER = re.compile(r"<!--\s*generated:\s*([\w-]+)\s*([^>]*?)\s*-->")


# --------------------------------------------------------------------------- mkdocs hook


def on_page_markdown(markdown: str, page: Any = None, config: Any = None, files: Any = None,
                     **kwargs: Any) -> str:
    """Replace each ``<!-- generated: NAME ARGS -->`` with its generated markdown."""

    def generate(match: re.Match[str]) -> str:
        name, args = match.group(1), match.group(2).split()
        if name == "config-reference":
            return config_reference_markdown()
        if name == "api-index":
            return "\n".join(api_index_markdown(module) for module in args)
        # A misspelt placeholder would otherwise vanish silently from the built page.
        raise ValueError(f"unknown generated block {name!r} in {getattr(page, 'file', page)}; "
                         "use config-reference or api-index.")

    return PLACEHOLDER.sub(generate, markdown)


# --------------------------------------------------------------------------- config reference


def config_reference_markdown() -> str:
    """Markdown tables of every config key: ``section.key``, type, default, allowed values
    and the comment above the field in the source, section by section as
    :class:`mixmask.config.Config` nests them, then the ``method`` section: ``method.name``,
    the masking axis of the methods that have one, and ``method.<name>.*`` of every
    registered method."""
    from mixmask.config import Config, MethodConfig
    from mixmask.methods.registry import method_class, method_names

    hints = typing.get_type_hints(Config)
    comments = field_comments(Config)
    top_level = [item for item in dataclasses.fields(Config)
                 if not _is_section(hints[item.name])]
    parts = ["## Top-level keys", "",
             _table([_row(item.name, hints[item.name], _default(item), comments.get(item.name))
                     for item in top_level])]
    for item in dataclasses.fields(Config):
        kind = hints[item.name]
        if kind is MethodConfig:
            parts.append(_method_section(MethodConfig, method_names(), method_class))
        elif dataclasses.is_dataclass(kind):
            parts.append(_dataclass_section(kind, f"{item.name}.", level=2,
                                            comment=comments.get(item.name)))
    return "\n".join(parts)


def field_comments(cls: type) -> dict[str, str]:
    """The comment of each field of dataclass ``cls``: the ``#`` lines directly above it
    (no blank line between) and any comment on the field's own lines, joined. Fields a
    dataclass inherits (``PixelTargetConfig``'s) carry their base class's comments."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            comments.update(_own_field_comments(klass))
    return comments


def _own_field_comments(cls: type) -> dict[str, str]:
    text = Path(inspect.getsourcefile(cls)).read_text()
    lines = text.splitlines()
    comment_at = {token.start[0]: token.string.lstrip("#").strip()
                  for token in tokenize.generate_tokens(io.StringIO(text).readline)
                  if token.type == tokenize.COMMENT}

    def comment_only(line_number: int) -> bool:
        return line_number in comment_at and lines[line_number - 1].lstrip().startswith("#")

    classdef = next(node for node in ast.walk(ast.parse(text))
                    if isinstance(node, ast.ClassDef) and node.name == cls.__name__)
    comments = {}
    for node in classdef.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above = node.lineno - 1
        while above >= 1 and comment_only(above):
            above -= 1
        block = [comment_at[number] for number in range(above + 1, node.lineno)]
        inline = [comment_at[number] for number in range(node.lineno, node.end_lineno + 1)
                  if number in comment_at and not comment_only(number)]
        text_parts = [part for part in block + inline if part and not part.startswith("noqa")]
        if text_parts:
            comments[node.target.id] = " ".join(text_parts)
    return comments


def _method_section(method_config: type, names: tuple[str, ...], method_class: Any) -> str:
    default_name = inspect.signature(method_config.__init__).parameters["name"].default
    parts = ["## `method`", "", _docstring(method_config), "",
             _table([_row("method.name", str, default_name, "The method: a name of the "
                          "method registry (`mixmask.methods.registry`); its own keys are "
                          "`method.<name>.*` below.", choices=names)])]
    axes: dict[type, list[str]] = {}
    for name in names:
        axis = getattr(method_class(name), "axis_config_class", None)
        if axis is not None:
            axes.setdefault(axis, []).append(name)
    for axis, owners in axes.items():
        owner_list = ", ".join(f"`{owner}`" for owner in owners)
        # A fixed anchor: the slug of the title would change with every new Siamese method.
        title = f"The masking axis ({owner_list}) {{ #masking-axis-keys }}"
        parts.append(_dataclass_section(
            axis, "method.", level=3, title=title,
            comment="Other methods refuse these keys (`method.masking: none` holds for "
                    "every method)."))
    for name in names:
        parts.append(_dataclass_section(method_class(name).config_class, f"method.{name}.",
                                        level=3, intro=_summary(method_class(name))))
    return "\n".join(parts)


def _dataclass_section(cls: type, prefix: str, *, level: int, title: str | None = None,
                       comment: str | None = None, intro: str | None = None) -> str:
    """A heading, the class's docstring, a table of its plain fields, then one subsection
    per nested dataclass field (``method.mask.*`` inside the masking axis)."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    fields = dataclasses.fields(cls)
    if title is None:  # `data` for a top-level section, `method.mae.*` below it
        title = f"`{prefix.rstrip('.')}`" if prefix.count(".") == 1 else f"`{prefix}*`"
    text = [part for part in (comment, intro or _docstring(cls)) if part]
    rows = [_row(prefix + item.name, hints[item.name], _default(item), comments.get(item.name))
            for item in fields if not dataclasses.is_dataclass(hints[item.name])]
    parts = ["#" * level + " " + title, ""]
    for paragraph in dict.fromkeys(text):  # the same text given twice is shown once
        parts += [_markdown_text(paragraph), ""]
    if rows:
        parts.append(_table(rows))
    for item in fields:
        if dataclasses.is_dataclass(hints[item.name]):
            nested_prefix = f"{prefix}{item.name}."
            parts.append(_dataclass_section(hints[item.name], nested_prefix, level=level + 1,
                                            title=f"`{nested_prefix}*`",
                                            comment=comments.get(item.name)))
    return "\n".join(parts)


def _is_section(kind: Any) -> bool:
    from mixmask.config import MethodConfig

    return kind is MethodConfig or dataclasses.is_dataclass(kind)


def _default(item: dataclasses.Field) -> Any:
    if item.default is not dataclasses.MISSING:
        return item.default
    return item.default_factory()


def _row(key: str, kind: Any, default: Any, comment: str | None,
         choices: tuple[Any, ...] | None = None) -> list[str]:
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        kind = type(choices[0])
    allowed = ", ".join(f"`{_yaml(choice)}`" for choice in choices) if choices else ""
    return [f"`{key}`", _type_name(kind), f"`{_yaml(default)}`", allowed,
            _markdown_text(comment) if comment else ""]


def _type_name(kind: Any) -> str:
    """Types as a YAML file writes them: tuples are lists."""
    if typing.get_origin(kind) is tuple:
        items = typing.get_args(kind)
        if len(items) == 2 and items[1] is Ellipsis:
            return f"list[{_type_name(items[0])}]"
        return "[" + ", ".join(_type_name(item) for item in items) + "]"
    return getattr(kind, "__name__", str(kind))


def _yaml(value: Any) -> str:
    """``value`` as it is written in a YAML config (quotes where YAML needs them)."""
    if isinstance(value, tuple):
        value = list(value)
    dumped = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return dumped.removesuffix("...").strip()


def _table(rows: list[list[str]]) -> str:
    header = ["key", "type", "default", "allowed values", "description"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _summary(method: type) -> str:
    """The method's one-paragraph summary: its config class's docstring, else the first
    paragraph of its module's docstring."""
    summary = _docstring(method.config_class)
    if not summary:
        module_doc = inspect.cleandoc(inspect.getmodule(method).__doc__ or "")
        summary = _rst_to_markdown(module_doc.split("\n\n")[0]).replace("\n", " ")
    return summary


def _docstring(cls: type) -> str:
    """The class's own docstring, one line per paragraph ("" when it has none)."""
    doc = cls.__dict__.get("__doc__")
    # dataclasses invent a signature docstring for classes without one.
    if not doc or doc.startswith(f"{cls.__name__}("):
        return ""
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(_rst_to_markdown(paragraph).replace("\n", " ")
                        for paragraph in paragraphs)


def _rst_to_markdown(text: str) -> str:
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)  # :func:`name` -> `name`
    return text.replace("``", "`")


def _markdown_text(text: str) -> str:
    """Source comments as table-safe markdown: outside code spans, ``|`` would end the cell
    and ``*``, ``<`` would start emphasis or HTML."""
    pieces = re.split(r"(`[^`]*`)", _rst_to_markdown(text))
    for index in range(0, len(pieces), 2):
        pieces[index] = (pieces[index].replace("\\", "\\\\").replace("|", "\\|")
                         .replace("*", "\\*").replace("<", "&lt;"))
    return "".join(pieces)


# --------------------------------------------------------------------------- API index


def api_index_markdown(module_name: str) -> str:
    """A table of the public functions and classes of ``module_name`` (its ``__all__``, or
    every public name defined there): the call signature and the first paragraph of each
    docstring."""
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None) or [
        name for name, value in vars(module).items()
        if not name.startswith("_") and (inspect.isfunction(value) or inspect.isclass(value))
        and getattr(value, "__module__", None) == module_name]
    rows = []
    for name in names:
        value = getattr(module, name)
        what = _markdown_text(_first_paragraph(value))
        rows.append(f"| `{_call_signature(name, value)}` | {what} |")
    lines = [f"### `{module_name}`", "", _markdown_text(_module_summary(module)), "",
             "| name | what |", "| --- | --- |", *rows, ""]
    return "\n".join(lines)


def _call_signature(name: str, value: Any) -> str:
    """``name(a, *, b=0.5)``: parameters and defaults; the annotations (strings under
    ``from __future__ import annotations``) would fill a table cell with quotes."""
    try:
        signature = inspect.signature(value)
    except (TypeError, ValueError):  # builtins and C types without a signature
        return name
    bare = signature.replace(
        parameters=[parameter.replace(annotation=inspect.Parameter.empty)
                    for parameter in signature.parameters.values()],
        return_annotation=inspect.Signature.empty)
    return f"{name}{bare}"


def _first_paragraph(value: Any) -> str:
    paragraph = _rst_to_markdown(inspect.getdoc(value) or "").split("\n\n")[0]
    # A paragraph that introduces a formula block ends in "::" (reST).
    return re.sub(r"::$", ":", paragraph.replace("\n", " "))


def _module_summary(module: Any) -> str:
    doc = inspect.getdoc(module) or ""
    return _rst_to_markdown(doc.split("\n\n")[0]).replace("\n", " ")
