#!/usr/bin/env python3
"""Import circles between the source files of the roost workspace.

For every crate of the workspace (the `members` of the root Cargo.toml), each `.rs`
file under `<crate>/src` that the crate compiles outside tests is a node. A file A
depends on a file B of the same crate when A's code names a path that resolves into
B's module:

* `use crate::b::...`, `crate::b::thing` in an expression, a type or a pattern,
  `super::...` and `self::...`, paths that start with a child module or with a name a
  `use` brought in, and every leaf of a `use` group (`use crate::{a, b::c};`);
* a path resolves to the deepest module that is a file (an inline `mod m { }` is part
  of the file it is written in); names brought in by `use`/`pub use` are followed, so
  `crate::Settings` with `pub use settings::Settings;` in lib.rs resolves to
  settings.rs, and `#[macro_export]` macros resolve to the file that defines them;
* `mod x;` is not an edge in either direction (only paths are);
* comments, string and char literals, and everything under `#[cfg(test)]` (modules,
  items, statements, fields) do not count; a file declared `#[cfg(test)] mod x;` is
  not a node at all.

Paths into another workspace crate (`roost_engine::broker::Broker`) are edges between
crates. Cargo forbids cycles between crates, so only the crate order is printed; the
circles reported are the strongly connected components (Tarjan) of more than one file
inside one crate, each as a closed path through all its files with one example line
(`file:line: text`) per edge.

Exit status: 1 if there is a circle (also with --dot), 0 if there is none, 2 on a
usage or workspace error.

Usage:
    python3 scripts/import_cycles.py [WORKSPACE] [--crate NAME] [--dot] [--edges]

WORKSPACE defaults to the repository this script is in. --crate restricts the report
to one crate (package name `roost-broker`, its Rust name `roost_broker`, or its
directory `broker`); --dot prints the file graph in Graphviz format instead of the
report (edges on a circle in red); --edges also lists every edge with its example.

Known limits (it reads tokens, it does not expand macros or infer types): paths made by
macros are not seen (paths written inside a `macro_rules!` body are, as if written where
the macro is defined); a local `use` inside a function is treated as if it were
written at the top of its module; `cfg` other than `test` is ignored (both sides of a
`#[cfg(feature = ..)]` count).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tomllib
from dataclasses import dataclass, field

# --------------------------------------------------------------------------- tokens


@dataclass(slots=True)
class Tok:
    kind: str  # 'id' identifier/keyword, 'p' punctuation, 'str' string, 'lit' other literal, 'life'
    text: str
    line: int


_IDENT_START = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_IDENT_CHARS = _IDENT_START | set("0123456789")


def _is_ident_start(c: str) -> bool:
    return c in _IDENT_START or (c > "\x7f" and c.isidentifier())


def _is_ident_char(c: str) -> bool:
    return c in _IDENT_CHARS or (c > "\x7f" and ("a" + c).isidentifier())


def tokenize(src: str) -> list[Tok]:
    """Rust tokens with their line; comments dropped, string contents kept as one token."""
    toks: list[Tok] = []
    i, n, line = 0, len(src), 1
    while i < n:
        c = src[i]
        if c == "\n":
            line += 1
            i += 1
            continue
        if c in " \t\r\f\v":
            i += 1
            continue
        if c == "/" and i + 1 < n and src[i + 1] == "/":
            j = src.find("\n", i)
            i = n if j < 0 else j
            continue
        if c == "/" and i + 1 < n and src[i + 1] == "*":
            depth, i = 1, i + 2
            while i < n and depth:
                if src.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif src.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    if src[i] == "\n":
                        line += 1
                    i += 1
            continue
        # raw strings r"..", r#".."#, br#".."#, cr".."; raw identifiers r#name
        if c in "rbc":
            j = i
            if src.startswith(("br", "cr"), i):
                j = i + 2
            elif c == "r":
                j = i + 1
            if j > i and j < n and src[j] in "#\"":
                k = j
                while k < n and src[k] == "#":
                    k += 1
                if k < n and src[k] == '"':
                    hashes = k - j
                    end = src.find('"' + "#" * hashes, k + 1)
                    end = n if end < 0 else end
                    body = src[k + 1 : end]
                    toks.append(Tok("str", body, line))
                    line += body.count("\n")
                    i = end + 1 + hashes
                    continue
                if c == "r" and j == i + 1 and k == j + 1 and k < n and _is_ident_start(src[k]):
                    m = k
                    while m < n and _is_ident_char(src[m]):
                        m += 1
                    toks.append(Tok("id", src[k:m], line))
                    i = m
                    continue
            if c in "bc" and i + 1 < n and src[i + 1] == '"':
                i += 1
                c = '"'  # fall through to the plain string below, prefix dropped
            elif c == "b" and i + 1 < n and src[i + 1] == "'":
                i += 1
                c = "'"
        if c == '"':
            j, start_line = i + 1, line
            while j < n and src[j] != '"':
                if src[j] == "\\":
                    if j + 1 < n and src[j + 1] == "\n":
                        line += 1
                    j += 2
                    continue
                if src[j] == "\n":
                    line += 1
                j += 1
            toks.append(Tok("str", _unescape(src[i + 1 : j]), start_line))
            i = j + 1
            continue
        if c == "'":
            # char literal or lifetime/label
            if i + 1 < n and src[i + 1] == "\\":
                j = i + 2
                while j < n and src[j] != "'":
                    j += 2 if src[j] == "\\" else 1
                toks.append(Tok("lit", src[i : j + 1], line))
                i = j + 1
                continue
            if i + 2 < n and src[i + 2] == "'" and src[i + 1] != "\n":
                toks.append(Tok("lit", src[i : i + 3], line))
                i += 3
                continue
            j = i + 1
            while j < n and _is_ident_char(src[j]):
                j += 1
            if j < n and src[j] == "'" and j > i + 1:  # multi-char char such as 'é' oddities
                toks.append(Tok("lit", src[i : j + 1], line))
                i = j + 1
                continue
            toks.append(Tok("life", src[i:j], line))
            i = j
            continue
        if _is_ident_start(c):
            j = i + 1
            while j < n and _is_ident_char(src[j]):
                j += 1
            toks.append(Tok("id", src[i:j], line))
            i = j
            continue
        if c.isdigit():
            j = i + 1
            while j < n and (_is_ident_char(src[j]) or (src[j] == "." and j + 1 < n and src[j + 1].isdigit())):
                j += 1
            toks.append(Tok("lit", src[i:j], line))
            i = j
            continue
        if c == ":" and i + 1 < n and src[i + 1] == ":":
            toks.append(Tok("p", "::", line))
            i += 2
            continue
        toks.append(Tok("p", c, line))
        i += 1
    return toks


def _unescape(s: str) -> str:
    if "\\" not in s:
        return s
    out, i = [], 0
    simple = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", '"': '"', "'": "'"}
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s):
            out.append(simple.get(s[i + 1], s[i + 1]))
            i += 2
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


_OPEN = {"(": ")", "[": "]", "{": "}"}
_CLOSE = set(_OPEN.values())


def _match(toks: list[Tok], i: int) -> int:
    """Index of the bracket closing the one opened at toks[i]."""
    depth = 0
    for j in range(i, len(toks)):
        t = toks[j]
        if t.kind == "p":
            if t.text in _OPEN:
                depth += 1
            elif t.text in _CLOSE:
                depth -= 1
                if depth == 0:
                    return j
    return len(toks) - 1


# ------------------------------------------------------------------- #[cfg(test)]


def _cfg_test_only(toks: list[Tok]) -> bool:
    """Whether the tokens of a cfg predicate hold only under `test`."""

    def parse(i: int) -> tuple[bool | None, int]:
        # returns (test_only, next index); None = not about test at all
        t = toks[i]
        if t.kind == "id" and i + 1 < len(toks) and toks[i + 1].text == "(":
            end = _match(toks, i + 1)
            args, j = [], i + 2
            while j < end:
                v, j = parse(j)
                args.append(v)
                if j < end and toks[j].text == ",":
                    j += 1
            if t.text == "all":
                return any(a for a in args), end + 1
            if t.text == "any":
                return (bool(args) and all(a for a in args)), end + 1
            return False, end + 1  # not(..) and anything else
        if t.kind == "id" and i + 2 < len(toks) and toks[i + 1].text == "=":
            return False, i + 3
        return t.kind == "id" and t.text == "test", i + 1

    if not toks:
        return False
    v, _ = parse(0)
    return bool(v)


def _attr_is_cfg_test(toks: list[Tok], lb: int, rb: int) -> bool:
    inner = toks[lb + 1 : rb]
    return (
        len(inner) >= 3
        and inner[0].kind == "id"
        and inner[0].text == "cfg"
        and inner[1].text == "("
        and _cfg_test_only(inner[2:-1])
    )


_ITEM_PREFIX = {"pub", "unsafe", "async", "extern", "default", "safe"}
_ITEM_BLOCK = {"fn", "struct", "enum", "union", "impl", "trait", "mod", "macro_rules"}
_ITEM_SEMI = {"use", "const", "static", "let", "type"}


def _item_end(toks: list[Tok], j: int) -> int:
    """Index of the last token of the item/statement/field starting at toks[j]."""
    n = len(toks)
    k = j
    while k < n:
        t = toks[k]
        if t.kind == "id" and t.text in _ITEM_PREFIX:
            k += 1
            if t.text == "pub" and k < n and toks[k].text == "(":
                k = _match(toks, k) + 1
            continue
        if t.kind == "str":  # extern "C"
            k += 1
            continue
        break
    head = toks[k].text if k < n else ""
    if head == "const" and k + 1 < n and toks[k + 1].text in ("fn", "unsafe", "async", "extern"):
        head = "fn"
    if head in _ITEM_SEMI:
        mode = "semi"
    elif head in _ITEM_BLOCK:
        mode = "block"
    elif head in ("if", "match", "loop", "while", "for", "{") or (head == "unsafe"):
        mode = "expr-block"
    else:
        mode = "element"  # a field, a match arm, an expression statement
    depth = 0
    i = j
    while i < n:
        t = toks[i]
        if t.kind == "p":
            if t.text in _OPEN:
                if depth == 0 and t.text == "{" and mode in ("block", "expr-block"):
                    end = _match(toks, i)
                    if mode == "expr-block" and end + 1 < n and toks[end + 1].text == "else":
                        i = end + 1
                        continue
                    return end
                depth += 1
            elif t.text in _CLOSE:
                if depth == 0:
                    return i - 1  # the closer of the enclosing block
                depth -= 1
            elif depth == 0 and t.text == ";":
                return i
            elif depth == 0 and t.text == "," and mode == "element":
                return i
        i += 1
    return n - 1


def strip_test_code(toks: list[Tok]) -> tuple[list[Tok], bool]:
    """Tokens without what `#[cfg(test)]` guards; True if the whole file is test-only."""
    n = len(toks)
    drop = [False] * n
    markers: dict[int, Tok] = {}
    file_test_only = False
    i = 0
    while i < n:
        t = toks[i]
        if t.kind == "p" and t.text == "#" and i + 1 < n:
            inner = toks[i + 1].text == "!"
            lb = i + 2 if inner else i + 1
            if lb < n and toks[lb].text == "[":
                rb = _match(toks, lb)
                if _attr_is_cfg_test(toks, lb, rb):
                    if inner:
                        if all(not toks[k].text == "{" for k in range(0, i)):
                            file_test_only = True
                        i = rb + 1
                        continue
                    j = rb + 1
                    while j + 1 < n and toks[j].text == "#" and toks[j + 1].text == "[":
                        j = _match(toks, j + 1) + 1
                    end = _item_end(toks, j) if j < n else n - 1
                    for k in range(i, end + 1):
                        drop[k] = True
                    # `mod x;`: keep a marker, so that x's file is known to be test-only
                    k = j
                    while k < end and toks[k].text != "mod":
                        k += 1
                    if k + 2 <= end and toks[k + 1].kind == "id" and toks[k + 2].text == ";":
                        markers[k] = Tok("testmod", toks[k + 1].text, toks[k].line)
                    i = end + 1
                    continue
                i = rb + 1
                continue
        i += 1
    out = []
    for k, (t, d) in enumerate(zip(toks, drop)):
        if not d:
            out.append(t)
        elif k in markers:
            out.append(markers[k])
    return out, file_test_only


# ------------------------------------------------------------------------- modules


@dataclass(eq=False)
class Module:
    name: str
    path: tuple[str, ...]
    file: str  # workspace-relative path of the file the module is written in
    parent: Module | None
    mod_dir: str  # where `mod x;` inside it looks (absolute)
    children: dict[str, Module] = field(default_factory=dict)
    items: set[str] = field(default_factory=set)
    # name -> (segments, line) of `use` imports (aliases included)
    imports: dict[str, tuple[tuple[str, ...], int]] = field(default_factory=dict)
    globs: list[tuple[tuple[str, ...], int]] = field(default_factory=list)
    # names resolved up front (#[macro_export] macros at the crate root)
    fixed: dict[str, Module] = field(default_factory=dict)


@dataclass
class PathRef:
    module: Module  # the module the path is written in
    segs: tuple[str, ...]
    line: int
    file: str
    note: str = ""  # for leaves of `use` trees: the whole leaf path


@dataclass
class Crate:
    package: str  # package name, e.g. roost-broker
    rust_name: str  # the name paths use, e.g. roost_broker
    target: str  # 'lib' or 'bin NAME'
    root_file: str
    member_dir: str
    deps: dict[str, str] = field(default_factory=dict)  # extern name -> package
    root: Module | None = None
    files: dict[str, Module] = field(default_factory=dict)  # file -> its file module
    test_files: set[str] = field(default_factory=set)
    refs: list[PathRef] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    only_target: bool = True  # the package has no other target under src/

    @property
    def display(self) -> str:
        return self.package if self.target == "lib" or self.only_target else f"{self.package} ({self.target})"


class Analyzer:
    def __init__(self, ws: str):
        self.ws = ws
        self.lines: dict[str, list[str]] = {}

    def rel(self, p: str) -> str:
        return os.path.relpath(p, self.ws)

    def source_lines(self, rel: str) -> list[str]:
        if rel not in self.lines:
            with open(os.path.join(self.ws, rel), encoding="utf-8") as f:
                self.lines[rel] = f.read().split("\n")
        return self.lines[rel]

    # -- loading --------------------------------------------------------------

    def load_crate(self, crate: Crate) -> None:
        root_abs = os.path.join(self.ws, crate.root_file)
        d = os.path.dirname(root_abs)
        crate.root = Module("crate", (), crate.root_file, None, d)
        self._load_file(crate, crate.root, root_abs)

    def _load_file(self, crate: Crate, mod: Module, abs_path: str) -> None:
        rel = self.rel(abs_path)
        if rel in crate.files:
            crate.errors.append(f"{rel} is declared as a module twice; read once, as {'::'.join(crate.files[rel].path) or 'the root'}")
            return
        with open(abs_path, encoding="utf-8") as f:
            src = f.read()
        self.lines[rel] = src.split("\n")
        toks, test_only = strip_test_code(tokenize(src))
        if test_only:
            crate.test_files.add(rel)
            return
        crate.files[rel] = mod
        self._walk(crate, mod, toks, rel, os.path.dirname(abs_path))

    def _walk(self, crate: Crate, filemod: Module, toks: list[Tok], rel: str, file_dir: str) -> None:
        # stack of (module, brace depth at which its items sit, path-attribute base)
        stack: list[tuple[Module, int, str]] = [(filemod, 0, file_dir)]
        depth = 0
        attrs: list[tuple[int, int]] = []  # pending outer attributes (lb, rb)
        n = len(toks)
        i = 0
        while i < n:
            t = toks[i]
            mod, mdepth, path_base = stack[-1]
            at_item_level = depth == mdepth
            if t.kind == "p":
                if t.text == "#" and i + 1 < n and toks[i + 1].text in ("[", "!"):
                    lb = i + 1 if toks[i + 1].text == "[" else i + 2
                    if lb < n and toks[lb].text == "[":
                        rb = _match(toks, lb)
                        if lb == i + 1:
                            attrs.append((lb, rb))
                        i = rb + 1
                        continue
                if t.text == "{":
                    depth += 1
                elif t.text == "}":
                    if len(stack) > 1 and depth == stack[-1][1]:
                        stack.pop()
                    depth -= 1
                if t.text in ("{", "}", ";"):
                    attrs = []
                i += 1
                continue
            if t.kind == "testmod":
                if at_item_level:
                    self._declare_test_module(crate, mod, t.text, self._path_attr(toks, attrs), path_base)
                attrs = []
                i += 1
                continue
            if t.kind != "id":
                i += 1
                continue
            word = t.text
            prev = toks[i - 1] if i else None
            if word == "use" and (prev is None or prev.text not in ("::", ".")):
                end = i + 1
                while end < n and toks[end].text != ";":
                    if toks[end].text in _OPEN:
                        end = _match(toks, end)
                    end += 1
                self._parse_use(crate, mod, toks, i + 1, end, rel, t.line)
                attrs = []
                i = end + 1
                continue
            if at_item_level and word == "mod" and i + 2 < n and toks[i + 1].kind == "id":
                name = toks[i + 1].text
                nxt = toks[i + 2].text
                path_attr = self._path_attr(toks, attrs)
                attrs = []
                if nxt == ";":
                    self._declare_file_module(crate, mod, name, path_attr, path_base, toks[i].line, rel)
                    i += 3
                    continue
                if nxt == "{":
                    if path_attr is not None:
                        child_dir = os.path.join(path_base, path_attr)
                    else:
                        child_dir = os.path.join(mod.mod_dir, name)
                    child = Module(name, mod.path + (name,), rel, mod, child_dir)
                    mod.children[name] = child
                    mod.items.add(name)
                    depth += 1
                    stack.append((child, depth, child_dir))
                    i += 3
                    continue
            if at_item_level and word == "macro_rules" and i + 2 < n and toks[i + 1].text == "!":
                name = toks[i + 2].text
                exported = any(toks[lb + 1].text == "macro_export" for lb, _ in attrs)
                attrs = []
                mod.items.add(name)
                if exported:
                    crate.root.fixed[name] = mod
                # the body: paths in it count as written here, but no items are declared in it
                if i + 3 < n and toks[i + 3].text in _OPEN:
                    end = _match(toks, i + 3)
                    self._collect_paths(crate, mod, toks, i + 3, end + 1, rel)
                    i = end + 1
                    continue
                i += 3
                continue
            if at_item_level and word in ("fn", "struct", "enum", "union", "trait", "type", "const", "static") and i + 1 < n and toks[i + 1].kind == "id" and toks[i + 1].text != "_":
                if not (prev is not None and prev.text in ("::", ".", "&", "*")):
                    if not (word == "const" and toks[i + 1].text in ("fn", "unsafe", "async", "extern")):
                        mod.items.add(toks[i + 1].text)
            # a path starting here?
            i = self._read_path(crate, mod, toks, i, n, rel)

    def _collect_paths(self, crate: Crate, mod: Module, toks: list[Tok], start: int, end: int, rel: str) -> None:
        i = start
        while i < end:
            i = self._read_path(crate, mod, toks, i, end, rel) if toks[i].kind == "id" else i + 1

    @staticmethod
    def _path_start(toks: list[Tok], i: int) -> str | None:
        """'rel' if a path of 2+ segments starts at toks[i], 'global' for `::a::b`, else None."""
        if i + 1 >= len(toks) or toks[i + 1].text != "::":
            return None
        prev = toks[i - 1] if i else None
        if prev is None:
            return "rel"
        if prev.text == ".":
            return None  # a method call with turbofish
        if prev.text == "$":
            return "rel" if toks[i].text == "crate" else None  # `$crate`, or a metavariable
        if prev.text == "::":
            before = toks[i - 2] if i >= 2 else None
            if before is not None and (before.kind == "id" or before.text in (">", ")", "]")):
                return None  # the middle of a path
            return "global"
        return "rel"

    def _read_path(self, crate: Crate, mod: Module, toks: list[Tok], i: int, end: int, rel: str) -> int:
        """Records the path starting at toks[i] (if it is one); returns the next index."""
        kind = self._path_start(toks, i)
        if kind is None:
            return i + 1
        j = i
        segs = ["::"] if kind == "global" else []
        while True:
            segs.append(toks[j].text)
            if j + 2 < end and toks[j + 1].text == "::" and toks[j + 2].kind == "id":
                j += 2
            else:
                break
        crate.refs.append(PathRef(mod, tuple(segs), toks[i].line, rel))
        return j + 1

    def _path_attr(self, toks: list[Tok], attrs: list[tuple[int, int]]) -> str | None:
        for lb, rb in attrs:
            inner = toks[lb + 1 : rb]
            if len(inner) == 3 and inner[0].text == "path" and inner[1].text == "=" and inner[2].kind == "str":
                return inner[2].text
        return None

    def _declare_file_module(self, crate: Crate, parent: Module, name: str, path_attr: str | None, path_base: str, line: int, rel: str) -> None:
        if path_attr is not None:
            cand = [os.path.normpath(os.path.join(path_base, path_attr))]
        else:
            cand = [os.path.join(parent.mod_dir, name + ".rs"), os.path.join(parent.mod_dir, name, "mod.rs")]
        found = [c for c in cand if os.path.isfile(c)]
        if not found:
            crate.errors.append(f"{rel}:{line}: mod {name}; has no file (looked for {', '.join(self.rel(c) for c in cand)})")
            return
        f = found[0]
        base = os.path.basename(f)
        if path_attr is not None or base == "mod.rs":
            mod_dir = os.path.dirname(f)  # a mod-rs file (or one named by #[path])
        else:
            mod_dir = os.path.join(os.path.dirname(f), name)
        child = Module(name, parent.path + (name,), self.rel(f), parent, mod_dir)
        parent.children[name] = child
        parent.items.add(name)
        self._load_file(crate, child, f)
        if self.rel(f) in crate.test_files:
            del parent.children[name]

    def _declare_test_module(self, crate: Crate, parent: Module, name: str, path_attr: str | None, path_base: str) -> None:
        """`#[cfg(test)] mod name;`: its file, and everything under its directory, is test code."""
        if path_attr is not None:
            cand = [os.path.normpath(os.path.join(path_base, path_attr))]
        else:
            cand = [os.path.join(parent.mod_dir, name + ".rs"), os.path.join(parent.mod_dir, name, "mod.rs")]
        for c in cand:
            if os.path.isfile(c):
                crate.test_files.add(self.rel(c))
                d = os.path.dirname(c) if (path_attr is not None or c.endswith("mod.rs")) else c[:-3]
                if os.path.isdir(d) and (path_attr is None or c.endswith("mod.rs")):
                    for dirpath, _, files in os.walk(d):
                        crate.test_files.update(self.rel(os.path.join(dirpath, f)) for f in files if f.endswith(".rs"))
                return

    def _parse_use(self, crate: Crate, mod: Module, toks: list[Tok], start: int, end: int, rel: str, use_line: int) -> None:
        """Records the leaves of the use tree toks[start:end] as imports and path refs."""

        def tree(i: int, prefix: tuple[str, ...]) -> int:
            segs = list(prefix)
            last_line = toks[i].line if i < end else use_line
            if i < end and toks[i].text == "::":
                if not segs:
                    segs.append("::")
                i += 1
            while i < end:
                t = toks[i]
                if t.kind == "id":
                    segs.append(t.text)
                    last_line = t.line
                    i += 1
                    if i < end and toks[i].text == "::":
                        i += 1
                        continue
                    alias = segs[-1]
                    if i + 1 < end and toks[i].text == "as":
                        alias = toks[i + 1].text
                        i += 2
                    full = tuple(segs)
                    if full[-1] == "self":
                        full = full[:-1]
                        alias = full[-1] if alias == "self" and full else alias
                    if full:
                        leaf(full, alias, last_line)
                    return i
                if t.text == "*":
                    if segs:
                        leaf(tuple(segs), "*", t.line)
                    return i + 1
                if t.text == "{":
                    close = _match(toks, i)
                    j = i + 1
                    while j < close:
                        j = tree(j, tuple(segs))
                        while j < close and toks[j].text != ",":
                            j += 1  # anything unexpected: skip to the next leaf
                        j += 1
                    return close + 1
                return i + 1
            return i

        def leaf(full: tuple[str, ...], alias: str, line: int) -> None:
            note = ""
            if line != use_line:
                note = "use " + "::".join(s for s in full if s != "::") + ("::*" if alias == "*" else "")
            if alias == "*":
                mod.globs.append((full, line))
            elif alias != "_":
                mod.imports.setdefault(alias, (full, line))
            if len(full) >= 2 or full[0] not in ("::", "crate", "self", "super"):
                crate.refs.append(PathRef(mod, full, line, rel, note))

        tree(start, ())

    # -- resolution -----------------------------------------------------------

    def resolve(self, crate: Crate, ctx: Module, segs: tuple[str, ...], seen: frozenset = frozenset()):
        """('mod', Module, exact) | ('crate', package) | None."""
        first = segs[0]
        rest = segs[1:]
        if first == "crate":
            cur = crate.root
        elif first == "self":
            cur = ctx
        elif first == "super":
            cur = ctx.parent or ctx
            while rest and rest[0] == "super":
                cur = cur.parent or cur
                rest = rest[1:]
        elif first == "::":
            return ("crate", crate.deps[segs[1]]) if len(segs) > 1 and segs[1] in crate.deps else None
        else:
            r = self.lookup(crate, ctx, first, seen)
            if r is None:
                if first in crate.deps:
                    return ("crate", crate.deps[first])
                return None
            if r[0] != "mod" or not r[2]:
                return r
            cur = r[1]
        for k, seg in enumerate(rest):
            if seg == "self":
                continue
            if seg == "super":
                cur = cur.parent or cur
                continue
            r = self.lookup(crate, cur, seg, seen)
            if r is None:
                return ("mod", cur, False)
            if r[0] != "mod" or not r[2]:
                return r
            cur = r[1]
        return ("mod", cur, True)

    def lookup(self, crate: Crate, mod: Module, name: str, seen: frozenset):
        """What `name` means inside module `mod`."""
        if name in mod.children:
            return ("mod", mod.children[name], True)
        if name in mod.fixed:
            return ("mod", mod.fixed[name], False)
        if name in mod.items:
            return ("mod", mod, False)
        key = (id(mod), name)
        if key in seen:
            return None
        seen = seen | {key}
        if name in mod.imports:
            segs, _ = mod.imports[name]
            return self.resolve(crate, mod, segs, seen)
        for segs, _ in mod.globs:
            gkey = (id(mod), "*", segs)
            if gkey in seen:
                continue
            src = self.resolve(crate, mod, segs, seen | {gkey})
            if src is None or src[0] != "mod" or not src[2]:
                continue
            r = self.lookup(crate, src[1], name, seen | {gkey})
            if r is not None:
                return r
        return None


# ------------------------------------------------------------------------ workspace


def read_workspace(ws: str) -> list[Crate]:
    with open(os.path.join(ws, "Cargo.toml"), "rb") as f:
        root = tomllib.load(f)
    wsp = root.get("workspace", {})
    members = wsp.get("members", [])
    exclude = set(wsp.get("exclude", []))
    ws_deps = wsp.get("dependencies", {})
    packages: dict[str, tuple[str, dict]] = {}  # member dir -> (package name, manifest)
    for m in members:
        if m in exclude or m.rstrip("/") == "core/fuzz":
            continue
        mf = os.path.join(ws, m, "Cargo.toml")
        with open(mf, "rb") as f:
            man = tomllib.load(f)
        packages[m] = (man["package"]["name"], man)
    names = {name for name, _ in packages.values()}
    crates: list[Crate] = []
    for m, (pkg, man) in packages.items():
        deps: dict[str, str] = {}
        for key, spec in man.get("dependencies", {}).items():
            real = key
            if isinstance(spec, dict):
                if spec.get("workspace") and isinstance(ws_deps.get(key), dict):
                    real = ws_deps[key].get("package", key)
                real = spec.get("package", real)
            if real in names:
                deps[key.replace("-", "_")] = real
        src = os.path.join(ws, m, "src")
        lib = man.get("lib", {})
        lib_path = lib.get("path", "src/lib.rs")
        roots: list[tuple[str, str, str]] = []  # (target, rust name, root file)
        if os.path.isfile(os.path.join(ws, m, lib_path)):
            roots.append(("lib", lib.get("name", pkg).replace("-", "_"), lib_path))
        bins = {}
        for b in man.get("bin", []):
            bins[b.get("path", "src/main.rs" if b["name"] == pkg else f"src/bin/{b['name']}.rs")] = b["name"]
        if os.path.isfile(os.path.join(src, "main.rs")):
            bins.setdefault("src/main.rs", pkg)
        bindir = os.path.join(src, "bin")
        if os.path.isdir(bindir):
            for e in sorted(os.listdir(bindir)):
                if e.endswith(".rs"):
                    bins.setdefault(f"src/bin/{e}", e[:-3])
                elif os.path.isfile(os.path.join(bindir, e, "main.rs")):
                    bins.setdefault(f"src/bin/{e}/main.rs", e)
        for path, bname in bins.items():
            roots.append((f"bin {bname}", bname.replace("-", "_"), path))
        lib_name = next((r for t, r, _ in roots if t == "lib"), None)
        for target, rust, path in roots:
            norm = os.path.normpath(path)
            if not norm.startswith("src" + os.sep):
                continue  # only files under <crate>/src
            d = dict(deps)
            if target != "lib" and lib_name:
                d[lib_name] = pkg + " (lib)"  # a binary reaches its own package's library
            crates.append(Crate(pkg, rust, target, os.path.join(m, norm), m, d, only_target=len(roots) == 1))
    return crates


def all_rs_files(ws: str, member: str) -> list[str]:
    out = []
    for dirpath, _, files in os.walk(os.path.join(ws, member, "src")):
        for f in files:
            if f.endswith(".rs"):
                out.append(os.path.relpath(os.path.join(dirpath, f), ws))
    return sorted(out)


# --------------------------------------------------------------------------- graphs


def tarjan(nodes: list[str], succ: dict[str, list[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for s in nodes:
        if s in index:
            continue
        work = [(s, 0)]
        while work:
            v, pi = work.pop()
            if pi == 0:
                index[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on.add(v)
            recurse = False
            ws = succ.get(v, [])
            for k in range(pi, len(ws)):
                w = ws[k]
                if w not in index:
                    work.append((v, k + 1))
                    work.append((w, 0))
                    recurse = True
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            if recurse:
                continue
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                out.append(comp)
            if work:
                u = work[-1][0]
                low[u] = min(low[u], low[v])
    return out


def shortest_cycle(v: str, inside: set[str], succ: dict[str, list[str]]) -> list[str]:
    """The shortest cycle through v inside a component: [v, ..., v]."""
    prev: dict[str, str | None] = {v: None}
    q = [v]
    for a in q:
        for b in succ.get(a, []):
            if b not in inside:
                continue
            if b == v:
                path = [a]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return path[::-1] + [v]
            if b not in prev:
                prev[b] = a
                q.append(b)
    return [v]


def cycles_covering(comp: list[str], succ: dict[str, list[str]]) -> list[list[str]]:
    """Every pair of files that name each other, then shortest cycles until every file
    of the component is on one."""
    inside = set(comp)
    out: list[list[str]] = []
    covered: set[str] = set()
    for a in sorted(comp):
        for b in sorted(succ.get(a, [])):
            if a < b and b in inside and a in succ.get(b, []):
                out.append([a, b, a])
                covered.update((a, b))
    for v in sorted(comp):
        if v in covered:
            continue
        c = shortest_cycle(v, inside, succ)
        covered.update(c)
        out.append(c)
    return out


def crate_order(pkgs: list[str], uses: dict[str, set[str]]) -> list[str]:
    order, done = [], set()
    remaining = list(pkgs)
    while remaining:
        ready = [p for p in remaining if uses.get(p, set()) - {p} <= done]
        if not ready:  # cannot happen with Cargo; keep going anyway
            ready = remaining[:1]
        for p in ready:
            order.append(p)
            done.add(p)
            remaining.remove(p)
    return order


# ----------------------------------------------------------------------------- main


@dataclass
class Edge:
    line: int  # the first line of the source file that makes the edge
    note: str  # the whole `use` leaf, when that line shows only part of it
    count: int  # how many paths make it


@dataclass
class Graph:
    analyzer: Analyzer
    crates: list[Crate]
    edges: dict[str, dict[tuple[str, str], Edge]]  # crate display -> (from, to) -> Edge
    crate_uses: dict[str, dict[str, tuple[str, int]]]  # crate display -> package -> example


def build_graph(ws: str) -> Graph:
    crates = read_workspace(ws)
    an = Analyzer(ws)
    for c in crates:
        an.load_crate(c)
    file_edges: dict[str, dict[tuple[str, str], Edge]] = {}
    crate_uses: dict[str, dict[str, tuple[str, int]]] = {}
    for c in crates:
        edges: dict[tuple[str, str], Edge] = {}
        for ref in c.refs:
            r = an.resolve(c, ref.module, ref.segs)
            if r is None:
                continue
            if r[0] == "crate":
                if r[1] != c.package:
                    crate_uses.setdefault(c.display, {}).setdefault(r[1], (ref.file, ref.line))
                continue
            dst = r[1].file
            if dst == ref.file or dst not in c.files:
                continue
            e = edges.get((ref.file, dst))
            if e is None:
                edges[(ref.file, dst)] = Edge(ref.line, ref.note, 1)
            else:
                e.count += 1
                if ref.line < e.line:
                    e.line, e.note = ref.line, ref.note
        file_edges[c.display] = edges
    return Graph(an, crates, file_edges, crate_uses)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workspace", nargs="?", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap.add_argument("--crate", help="report only this crate (package name, Rust name or directory)")
    ap.add_argument("--dot", action="store_true", help="print the file graph in Graphviz format")
    ap.add_argument("--edges", action="store_true", help="also list every edge with its example line")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    ws = os.path.abspath(args.workspace)
    try:
        g = build_graph(ws)
    except (OSError, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        print(f"import_cycles: cannot read the workspace at {ws}: {e}", file=sys.stderr)
        return 2
    an, crates, file_edges, crate_uses = g.analyzer, g.crates, g.edges, g.crate_uses

    selected = crates
    if args.crate:
        want = args.crate.replace("_", "-")
        selected = [
            c for c in crates
            if want in (c.package, c.member_dir.rstrip("/"), c.display) or args.crate in (c.rust_name, c.display)
        ]
        if not selected:
            print(f"import_cycles: no crate named {args.crate!r}; crates: {', '.join(c.display for c in crates)}", file=sys.stderr)
            return 2

    def example(src: str, line: int, note: str) -> str:
        text = an.source_lines(src)[line - 1].strip()
        return f"{src}:{line}: {text}" + (f"    [{note}]" if note else "")

    results = []  # (crate, comps, succ)
    for c in selected:
        edges = file_edges[c.display]
        nodes = sorted(c.files)
        succ: dict[str, list[str]] = {v: [] for v in nodes}
        for (a, b) in sorted(edges):
            succ[a].append(b)
        comps = [sorted(comp) for comp in tarjan(nodes, succ) if len(comp) > 1]
        comps.sort()
        results.append((c, comps, succ))

    n_cycles = sum(len(r[1]) for r in results)
    if args.dot:
        print("digraph imports {")
        print("  rankdir=LR; node [shape=box, fontname=monospace, fontsize=10];")
        for k, (c, comps, succ) in enumerate(results):
            on_cycle = {v: i for i, comp in enumerate(comps) for v in comp}
            print(f'  subgraph "cluster_{k}" {{ label="{c.display}";')
            for v in sorted(c.files):
                lab = os.path.relpath(v, c.member_dir)
                style = ', color=red' if v in on_cycle else ""
                print(f'    "{v}" [label="{lab}"{style}];')
            print("  }")
            for (a, b), e in sorted(file_edges[c.display].items()):
                red = a in on_cycle and on_cycle.get(a) == on_cycle.get(b)
                print(f'  "{a}" -> "{b}" [tooltip="{a}:{e.line}"{", color=red" if red else ""}];')
        print("}")
        return 1 if n_cycles else 0

    out = []
    for c in selected:
        for e in c.errors:
            out.append(f"warning: {e}")
    members = sorted({c.member_dir for c in selected})
    for m in members:
        compiled = set()
        tests = set()
        for c in crates:
            if c.member_dir == m:
                compiled |= set(c.files)
                tests |= c.test_files
        stray = [f for f in all_rs_files(ws, m) if f not in compiled and f not in tests]
        for f in stray:
            out.append(f"note: {f} is not a module of any crate target (not compiled); left out")

    # The order of all the packages by their [dependencies] (which Cargo keeps acyclic)
    # and the references seen in the code (a binary reaching its own library is left out).
    pkgs = list(dict.fromkeys(c.package for c in crates))
    deps_of = {p: set() for p in pkgs}
    for c in crates:
        deps_of[c.package] |= {d for d in c.deps.values() if not d.endswith(" (lib)")}
        deps_of[c.package] |= {t for t in crate_uses.get(c.display, {}) if not t.endswith(" (lib)")}
    order = crate_order(pkgs, deps_of)
    out.append("crate order (each depends only on crates before it): " + " -> ".join(order))
    if args.edges or args.crate:
        for c in selected:
            for tgt, (f, line) in sorted(crate_uses.get(c.display, {}).items()):
                out.append(f"  {c.display} uses {tgt.replace(' (lib)', '')}: {example(f, line, '')}")

    total_files = sum(len(c.files) for c, _, _ in results)
    total_edges = sum(len(file_edges[c.display]) for c, _, _ in results)
    for c, comps, succ in results:
        edges = file_edges[c.display]
        if args.edges:
            out.append(f"{c.display}: {len(c.files)} files, {len(edges)} edges")
            for (a, b), e in sorted(edges.items()):
                out.append(f"  {a} -> {b}  ({e.count} path{'s' if e.count != 1 else ''})")
                out.append(f"      {example(a, e.line, e.note)}")
        if not comps:
            continue
        out.append(f"{c.display}: {len(comps)} import circle{'s' if len(comps) != 1 else ''}")
        for i, comp in enumerate(comps, 1):
            short = lambda v: os.path.relpath(v, c.member_dir)  # noqa: E731
            out.append(f"  circle {i}: {len(comp)} files ({', '.join(short(v) for v in comp)})")
            used = set()
            for cyc in cycles_covering(comp, succ):
                out.append("    " + " -> ".join(short(v) for v in cyc))
                for a, b in zip(cyc, cyc[1:]):
                    e = edges[(a, b)]
                    used.add((a, b))
                    out.append(f"      {example(a, e.line, e.note)}")
            rest = [(a, b) for (a, b) in sorted(edges) if a in comp and b in comp and (a, b) not in used]
            if rest:
                out.append("    other edges inside this circle:")
                for a, b in rest:
                    e = edges[(a, b)]
                    out.append(f"      {short(a)} -> {short(b)}: {example(a, e.line, e.note)}")
    n_members = len(members)
    elapsed = time.monotonic() - t0
    if n_cycles:
        out.append(
            f"{n_cycles} import circle{'s' if n_cycles != 1 else ''} between the files of {n_members} crates "
            f"({total_files} files, {total_edges} edges; {elapsed:.2f}s)"
        )
    else:
        out.append(f"no import circle between the files of {n_members} crates ({total_files} files, {total_edges} edges)")
    print("\n".join(out))
    return 1 if n_cycles else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `| head`
        sys.stderr.close()
        sys.exit(1)
