"""``.. libertem-config-reference::``: every option of ``LiberTEMProxy``, read from the code.

At build time this imports :class:`libertem_jupyter_proxy.extension.LiberTEMProxy` and renders
each of its own traits tagged ``config=True`` (in the order they are defined in the class) as a
section with its type, default, an example line for ``jupyter_server_config.py`` and for the
command line, and its help text. The reference therefore cannot drift from the code: a new
option appears by itself, a changed default or help text changes the page.

The help text is inserted as plain text (never parsed as reStructuredText), with text between
single backticks shown as code.
"""

from __future__ import annotations

import json
import re
import textwrap
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

CLASS_NAME = "LiberTEMProxy"


def configurable_traits() -> list[tuple[str, Any]]:
    """``(name, trait)`` of every config trait LiberTEMProxy itself defines, in class order."""
    from libertem_jupyter_proxy.extension import LiberTEMProxy

    own = LiberTEMProxy.class_own_traits(config=True)
    return [(name, own[name]) for name in LiberTEMProxy.__dict__ if name in own]


def type_name(trait: Any) -> str:
    """Words for a trait's type: ``float``, ``list of str``, ``dict of str to str``..."""
    from traitlets import Bool, Dict, Float, Int, List, Unicode, Union

    if isinstance(trait, Union):
        return " or ".join(type_name(t) for t in trait.trait_types)
    simple = {Bool: "bool", Float: "float", Int: "int", Unicode: "str"}
    for cls, word in simple.items():
        if isinstance(trait, cls):
            return word
    if isinstance(trait, List):
        inner = trait._trait
        return f"list of {type_name(inner)}" if inner is not None else "list"
    if isinstance(trait, Dict):
        value = trait._value_trait
        return f"dict of str to {type_name(value)}" if value is not None else "dict"
    return type(trait).__name__  # pragma: no cover - a new trait type shows up by class name


def default_repr(trait: Any) -> str:
    """The default as a Python literal (what an admin would write in the config file)."""
    value = trait.default()
    if isinstance(value, bool):
        return repr(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return repr(value)


def cli_example(name: str, trait: Any) -> str:
    """The command-line form of the option, with its default as the value."""
    value = trait.default()
    if isinstance(value, list):
        return f"--{CLASS_NAME}.{name}=<item> (repeat the flag for each item)"
    if isinstance(value, dict):
        return f"--{CLASS_NAME}.{name}=KEY=VALUE (repeat the flag for each variable)"
    if isinstance(value, str):
        return f"--{CLASS_NAME}.{name}=<{'path' if 'path' in name or name == 'cwd' else 'text'}>"
    return f"--{CLASS_NAME}.{name}={value}"


def help_paragraphs(text: str) -> list[nodes.paragraph]:
    """Help text -> paragraphs; `quoted` parts become inline code, the rest stays plain text."""
    text = textwrap.dedent(text or "").strip()
    paras = []
    for block in re.split(r"\n\s*\n", text):
        flat = " ".join(block.split())
        para = nodes.paragraph()
        for i, part in enumerate(flat.split("`")):
            if not part:
                continue
            para += nodes.literal(part, part) if i % 2 else nodes.Text(part)
        paras.append(para)
    return paras


def _field(name: str, body: nodes.Node) -> nodes.field:
    field = nodes.field()
    field += nodes.field_name(name, name)
    fbody = nodes.field_body()
    para = nodes.paragraph()
    para += body
    fbody += para
    field += fbody
    return field


class ConfigReference(SphinxDirective):
    has_content = False

    def run(self) -> list[nodes.Node]:
        from libertem_jupyter_proxy import extension

        self.env.note_dependency(extension.__file__)
        result: list[nodes.Node] = []

        # summary table: name, type, default
        table = nodes.table(classes=["ljp-config-summary"])
        tgroup = nodes.tgroup(cols=3)
        table += tgroup
        for width in (30, 25, 45):
            tgroup += nodes.colspec(colwidth=width)
        thead = nodes.thead()
        row = nodes.row()
        for head in ("Option", "Type", "Default"):
            entry = nodes.entry()
            entry += nodes.paragraph(text=head)
            row += entry
        thead += row
        tgroup += thead
        tbody = nodes.tbody()
        tgroup += tbody
        traits = configurable_traits()
        for name, trait in traits:
            row = nodes.row()
            link = nodes.reference("", "", refid=f"config-{name}".replace("_", "-"))
            link += nodes.literal(name, name)
            for content in (
                link,
                nodes.Text(type_name(trait)),
                nodes.literal(default_repr(trait), default_repr(trait)),
            ):
                entry = nodes.entry()
                para = nodes.paragraph()
                para += content
                entry += para
                row += entry
            tbody += row
        result.append(table)

        for name, trait in traits:
            anchor = f"config-{name}".replace("_", "-")
            section = nodes.section(ids=[anchor], names=[f"libertemproxy.{name}"])
            title = f"{CLASS_NAME}.{name}"
            section += nodes.title(name, title)
            # so that :ref:`config-<name>` works from every page (names with - for _)
            self.env.get_domain("std").note_hyperlink_target(
                anchor, self.env.docname, anchor, title
            )
            fields = nodes.field_list()
            fields += _field("Type", nodes.Text(type_name(trait)))
            fields += _field("Default", nodes.literal(default_repr(trait), default_repr(trait)))
            example = f"c.{CLASS_NAME}.{name} = {default_repr(trait)}"
            fields += _field("Config file", nodes.literal(example, example))
            cli = cli_example(name, trait)
            fields += _field("Command line", nodes.literal(cli, cli))
            section += fields
            for para in help_paragraphs(trait.help):
                section += para
            result.append(section)
        return result


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("libertem-config-reference", ConfigReference)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
