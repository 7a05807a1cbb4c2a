"""Source files to the symbols they define, with line ranges, via tree-sitter grammars.

``parse_symbols(source, language)`` is the reusable part: given a file's bytes it returns every
class, function, method, type, interface, enum, module-level variable and member (class fields,
``self.x`` attributes, interface properties, struct fields) with its qualified name within the
file (``Console.print``, ``RouterCore.matchRoutes``, ``Client.Do``) and its 1-based inclusive
line range. The code index (``ops.codeindex``) and in-flight change reports both build on it.

Languages: Python, TypeScript (and TSX), JavaScript, Go, Rust. Grammars are the PyPI wheels
``tree-sitter-*``, loaded once per process. Parsing is error-tolerant: a file with syntax errors
still yields the symbols tree-sitter could place.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache

import tree_sitter
import tree_sitter_go
import tree_sitter_javascript
import tree_sitter_python
import tree_sitter_rust
import tree_sitter_typescript

from tetherlab.cluster.core.engine.codeindex import NAME_MAX_CHARS, SYMBOLS_PER_FILE_MAX, Symbol

# File suffix -> language name.
LANGUAGES: dict[str, str] = {
    ".py": "python", ".pyi": "python",
    ".ts": "typescript", ".mts": "typescript", ".cts": "typescript",
    ".tsx": "tsx",
    ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript", ".jsx": "javascript",
    ".go": "go",
    ".rs": "rust",
}
_GRAMMARS: dict[str, Callable[[], object]] = {
    "python": tree_sitter_python.language,
    "typescript": tree_sitter_typescript.language_typescript,
    "tsx": tree_sitter_typescript.language_tsx,
    "javascript": tree_sitter_javascript.language,
    "go": tree_sitter_go.language,
    "rust": tree_sitter_rust.language,
}
_IDENT = re.compile(r"^[A-Za-z_$#][A-Za-z0-9_$]*$")
# Nesting deeper than this is generated code or pathological input; its symbols are skipped.
DEPTH_MAX = 64


def language_for(path: str) -> str | None:
    """The language of a file by its suffix, or None when no grammar reads it."""
    dot = path.rfind(".")
    return LANGUAGES.get(path[dot:].lower()) if dot >= 0 else None


@cache
def _parser(language: str) -> tree_sitter.Parser:
    return tree_sitter.Parser(tree_sitter.Language(_GRAMMARS[language]()))


@dataclass
class _Out:
    # Qualified name -> [kind, start, end]; one entry per name (overloads and re-declarations
    # widen the range), in first-seen order.
    syms: dict[str, list[object]]

    def add(self, name: str, kind: str, node: tree_sitter.Node) -> None:
        if not name or len(name) > NAME_MAX_CHARS or len(self.syms) >= SYMBOLS_PER_FILE_MAX:
            return
        start, end = node.start_point[0] + 1, node.end_point[0] + 1
        cur = self.syms.get(name)
        if cur is None:
            self.syms[name] = [kind, start, end]
        else:
            cur[1], cur[2] = min(int(cur[1]), start), max(int(cur[2]), end)  # type: ignore[call-overload]


def parse_symbols(source: bytes, language: str) -> list[Symbol]:
    """The symbols a source file defines, in source order. Raises KeyError for an unknown
    language."""
    tree = _parser(language).parse(source)
    out = _Out({})
    _WALKERS[language](tree.root_node, "", out, 0)
    return [Symbol(name, str(v[0]), int(v[1]), int(v[2])) for name, v in out.syms.items()]  # type: ignore[call-overload]


def _text(node: tree_sitter.Node | None) -> str:
    if node is None or node.text is None:
        return ""
    t = node.text.decode("utf-8", errors="replace").strip("'\"`")
    return t if _IDENT.match(t) else ""


def _q(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _named(node: tree_sitter.Node) -> Iterator[tree_sitter.Node]:
    yield from (c for c in node.children if c.is_named)


# --- Python -----------------------------------------------------------------------------------


def _py(node: tree_sitter.Node, prefix: str, out: _Out, depth: int, in_class: bool = False) -> None:
    if depth > DEPTH_MAX:
        return
    for c in _named(node):
        t = c.type
        if t == "decorated_definition":
            d = c.child_by_field_name("definition")
            if d is not None:
                _py_def(d, c, prefix, out, depth, in_class)
        elif t in ("class_definition", "function_definition"):
            _py_def(c, c, prefix, out, depth, in_class)
        elif t == "expression_statement":
            for a in _named(c):
                if a.type == "assignment":
                    for name in _py_targets(a.child_by_field_name("left")):
                        out.add(_q(prefix, name), "attribute" if in_class else "variable", a)
        elif t in ("if_statement", "try_statement", "with_statement", "block", "else_clause", "elif_clause",
                   "except_clause", "finally_clause"):
            _py(c, prefix, out, depth + 1, in_class)


def _py_def(d: tree_sitter.Node, span: tree_sitter.Node, prefix: str, out: _Out, depth: int, in_class: bool) -> None:
    name = _text(d.child_by_field_name("name"))
    if not name:
        return
    q = _q(prefix, name)
    body = d.child_by_field_name("body")
    if d.type == "class_definition":
        out.add(q, "class", span)
        if body is not None:
            _py(body, q, out, depth + 1, in_class=True)
        return
    out.add(q, "method" if in_class else "function", span)
    if in_class and body is not None:
        _py_self_attrs(body, prefix, out, depth + 1)


def _py_self_attrs(node: tree_sitter.Node, cls: str, out: _Out, depth: int) -> None:
    """``self.x = ...`` inside a method: the instance attribute ``Class.x``."""
    if depth > DEPTH_MAX:
        return
    for c in _named(node):
        if c.type in ("function_definition", "class_definition", "lambda"):
            continue
        if c.type == "assignment":
            left = c.child_by_field_name("left")
            targets = [left] if left is not None and left.type == "attribute" else (
                [t for t in _named(left) if t.type == "attribute"] if left is not None else [])
            for target in targets:
                obj, attr = target.child_by_field_name("object"), target.child_by_field_name("attribute")
                if obj is not None and obj.text == b"self":
                    out.add(_q(cls, _text(attr)), "attribute", c)
        _py_self_attrs(c, cls, out, depth + 1)


def _py_targets(left: tree_sitter.Node | None) -> list[str]:
    if left is None:
        return []
    if left.type == "identifier":
        return [_text(left)]
    if left.type in ("pattern_list", "tuple_pattern", "list_pattern"):
        return [_text(c) for c in _named(left) if c.type == "identifier"]
    return []


# --- TypeScript / JavaScript --------------------------------------------------------------------

_TS_FUNCS = ("function_declaration", "generator_function_declaration", "function_signature")
_TS_CLASSES = ("class_declaration", "abstract_class_declaration", "class")
_TS_MEMBERS = ("method_definition", "public_field_definition", "abstract_method_signature", "method_signature",
               "property_signature", "field_definition")


def _ts(node: tree_sitter.Node, prefix: str, out: _Out, depth: int) -> None:
    if depth > DEPTH_MAX:
        return
    for c in _named(node):
        _ts_statement(c, prefix, out, depth)


def _ts_statement(c: tree_sitter.Node, prefix: str, out: _Out, depth: int) -> None:
    t = c.type
    if t in ("export_statement", "ambient_declaration", "statement_block", "expression_statement"):
        decl = c.child_by_field_name("declaration")
        if decl is not None:
            _ts_statement(decl, prefix, out, depth + 1)
        else:
            _ts(c, prefix, out, depth + 1)
    elif t in _TS_FUNCS:
        out.add(_q(prefix, _text(c.child_by_field_name("name"))), "function", c)
    elif t in _TS_CLASSES or t in ("interface_declaration", "type_alias_declaration"):
        name = _text(c.child_by_field_name("name"))
        if not name:
            return
        q = _q(prefix, name)
        kind = "class" if t in _TS_CLASSES else "interface" if t == "interface_declaration" else "type"
        out.add(q, kind, c)
        body = c.child_by_field_name("value" if kind == "type" else "body")
        if body is not None and (kind != "type" or body.type == "object_type"):
            _ts_members(body, q, out)
    elif t == "enum_declaration":
        out.add(_q(prefix, _text(c.child_by_field_name("name"))), "enum", c)
    elif t in ("lexical_declaration", "variable_declaration"):
        for d in _named(c):
            if d.type == "variable_declarator":
                value = d.child_by_field_name("value")
                is_fn = value is not None and value.type in ("arrow_function", "function_expression", "function")
                out.add(_q(prefix, _text(d.child_by_field_name("name"))), "function" if is_fn else "variable", c)
    elif t in ("internal_module", "module"):
        name = _text(c.child_by_field_name("name"))
        body = c.child_by_field_name("body")
        if body is not None:
            _ts(body, _q(prefix, name) if name else prefix, out, depth + 1)


def _ts_members(body: tree_sitter.Node, cls: str, out: _Out) -> None:
    for m in _named(body):
        if m.type in _TS_MEMBERS:
            name_node = m.child_by_field_name("name") or m.child_by_field_name("property")
            name = _text(name_node)
            if name and name != "constructor":
                kind = "method" if "method" in m.type else "field"
                out.add(_q(cls, name), kind, m)


# --- Go ---------------------------------------------------------------------------------------


def _go(node: tree_sitter.Node, prefix: str, out: _Out, depth: int) -> None:
    for c in _named(node):
        t = c.type
        if t == "function_declaration":
            out.add(_text(c.child_by_field_name("name")), "function", c)
        elif t == "method_declaration":
            recv = _go_receiver(c.child_by_field_name("receiver"))
            name = _text(c.child_by_field_name("name"))
            if name:
                out.add(_q(recv, name), "method", c)
        elif t == "type_declaration":
            for spec in _named(c):
                if spec.type not in ("type_spec", "type_alias"):
                    continue
                name = _text(spec.child_by_field_name("name"))
                if not name:
                    continue
                out.add(name, "type", spec)
                typ = spec.child_by_field_name("type")
                if typ is not None:
                    _go_members(typ, name, out)
        elif t in ("const_declaration", "var_declaration"):
            for spec in _go_specs(c):
                for n in spec.children_by_field_name("name"):
                    out.add(_text(n), "variable", spec)


def _go_specs(node: tree_sitter.Node) -> Iterator[tree_sitter.Node]:
    for c in _named(node):
        if c.type in ("const_spec", "var_spec"):
            yield c
        elif c.type == "var_spec_list":
            yield from _go_specs(c)


def _go_receiver(params: tree_sitter.Node | None) -> str:
    if params is None:
        return ""
    for p in _named(params):
        typ = p.child_by_field_name("type")
        while typ is not None and typ.type in ("pointer_type", "generic_type"):
            inner = typ.child_by_field_name("type")
            typ = inner if inner is not None else next((x for x in _named(typ)), None)
        if typ is not None:
            return _text(typ)
    return ""


def _go_members(typ: tree_sitter.Node, name: str, out: _Out) -> None:
    for c in _named(typ):
        if c.type in ("field_declaration_list", "method_spec_list"):
            _go_members(c, name, out)
        elif c.type == "field_declaration":
            for n in c.children_by_field_name("name"):
                out.add(_q(name, _text(n)), "field", c)
        elif c.type in ("method_elem", "method_spec"):
            out.add(_q(name, _text(c.child_by_field_name("name"))), "method", c)


# --- Rust -------------------------------------------------------------------------------------

_RS_ITEMS = {"function_item": "function", "function_signature_item": "function", "struct_item": "struct",
             "enum_item": "enum", "union_item": "union", "trait_item": "trait", "type_item": "type",
             "const_item": "variable", "static_item": "variable", "macro_definition": "macro"}


def _rs(node: tree_sitter.Node, prefix: str, out: _Out, depth: int) -> None:
    if depth > DEPTH_MAX:
        return
    for c in _named(node):
        t = c.type
        if t in _RS_ITEMS:
            name = _text(c.child_by_field_name("name"))
            if not name:
                continue
            q = _q(prefix, name)
            out.add(q, "method" if prefix and t.startswith("function") else _RS_ITEMS[t], c)
            body = c.child_by_field_name("body")
            if t == "trait_item" and body is not None:
                _rs(body, q, out, depth + 1)
            elif t == "struct_item" and body is not None:
                for f in _named(body):
                    if f.type == "field_declaration":
                        out.add(_q(q, _text(f.child_by_field_name("name"))), "field", f)
        elif t == "impl_item":
            typ = c.child_by_field_name("type")
            while typ is not None and typ.type in ("generic_type", "reference_type", "scoped_type_identifier"):
                inner = typ.child_by_field_name("type") or typ.child_by_field_name("name")
                if inner is None:
                    break
                typ = inner
            body = c.child_by_field_name("body")
            name = _text(typ)
            if name and body is not None:
                _rs(body, _q(prefix, name), out, depth + 1)
        elif t == "mod_item":
            name = _text(c.child_by_field_name("name"))
            body = c.child_by_field_name("body")
            if name:
                out.add(_q(prefix, name), "module", c)
                if body is not None:
                    _rs(body, _q(prefix, name), out, depth + 1)


_WALKERS: dict[str, Callable[[tree_sitter.Node, str, _Out, int], None]] = {
    "python": _py,
    "typescript": _ts,
    "tsx": _ts,
    "javascript": _ts,
    "go": _go,
    "rust": _rs,
}
