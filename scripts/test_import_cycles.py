"""Tests of import_cycles.py on small synthetic workspaces (run: pytest scripts/)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import import_cycles as ic  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "import_cycles.py")


def make_ws(root, crates: dict[str, dict[str, str]], deps: dict[str, list[str]] | None = None) -> str:
    """crates: directory -> {path under the crate: source}; package names are `t-<dir>`."""
    deps = deps or {}
    members = ", ".join(f'"{d}"' for d in crates)
    (root / "Cargo.toml").write_text(f'[workspace]\nmembers = [{members}]\n')
    for d, files in crates.items():
        dep_lines = "".join(f't-{x} = {{ path = "../{x}" }}\n' for x in deps.get(d, []))
        (root / d).mkdir(parents=True, exist_ok=True)
        (root / d / "Cargo.toml").write_text(f'[package]\nname = "t-{d}"\nversion = "0.1.0"\n\n[dependencies]\n{dep_lines}')
        for path, src in files.items():
            p = root / d / path
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(textwrap.dedent(src).lstrip("\n"))
    return str(root)


def edges(ws: str, crate: str = "t-a") -> set[tuple[str, str]]:
    g = ic.build_graph(ws)
    return {(os.path.relpath(a, crate[2:]), os.path.relpath(b, crate[2:])) for a, b in g.edges[crate]}


def run(ws: str, *args: str) -> tuple[int, str]:
    p = subprocess.run([sys.executable, SCRIPT, ws, *args], capture_output=True, text=True)
    return p.returncode, p.stdout + p.stderr


def test_simple_cycle_is_reported_with_its_lines(tmp_path):
    ws = make_ws(tmp_path, {"a": {
        "src/lib.rs": "mod a;\nmod b;\n",
        "src/a.rs": """
            //! module a
            use crate::b::Bee;
            pub struct Ay;
        """,
        "src/b.rs": """
            pub struct Bee;

            pub fn make() -> crate::a::Ay {
                crate::a::Ay
            }
        """,
    }})
    assert edges(ws) == {("src/a.rs", "src/b.rs"), ("src/b.rs", "src/a.rs")}
    rc, out = run(ws)
    assert rc == 1
    assert "t-a: 1 import circle" in out
    assert "src/a.rs -> src/b.rs -> src/a.rs" in out
    assert "a/src/a.rs:2: use crate::b::Bee;" in out
    assert "a/src/b.rs:3: pub fn make() -> crate::a::Ay {" in out
    assert "1 import circle between the files of 1 crates" in out


def test_no_cycle_success_line_and_exit_0(tmp_path):
    ws = make_ws(tmp_path, {"a": {
        "src/lib.rs": "mod a;\nmod b;\n",
        "src/a.rs": "use crate::b::Bee;\n",
        "src/b.rs": "pub struct Bee;\n",
    }})
    rc, out = run(ws)
    assert rc == 0, out
    assert out.strip().endswith("no import circle between the files of 1 crates (3 files, 1 edges)")


def test_cfg_test_module_and_items_are_not_counted(tmp_path):
    ws = make_ws(tmp_path, {"a": {
        "src/lib.rs": "mod a;\nmod b;\n",
        "src/a.rs": """
            use crate::b::Bee;
            pub struct Ay;
        """,
        "src/b.rs": """
            pub struct Bee {
                #[cfg(test)]
                seen: crate::a::Ay,
                real: u8,
            }

            #[cfg(test)]
            fn helper() -> crate::a::Ay { crate::a::Ay }

            #[cfg(test)]
            use crate::a::Ay;

            pub fn f(x: bool) {
                #[cfg(test)]
                if x {
                    let _ = crate::a::Ay;
                }
                let _ = 1;
            }

            #[cfg(all(test, unix))]
            const C: crate::a::Ay = crate::a::Ay;

            #[cfg(test)]
            #[allow(dead_code)]
            mod tests {
                use super::*;
                use crate::a::Ay;
            }
        """,
    }})
    assert edges(ws) == {("src/a.rs", "src/b.rs")}
    rc, _ = run(ws)
    assert rc == 0


def test_code_after_a_cfg_test_statement_still_counts(tmp_path):
    ws = make_ws(tmp_path, {"a": {
        "src/lib.rs": "mod a;\nmod b;\n",
        "src/a.rs": "pub struct Ay;\n",
        "src/b.rs": """
            pub fn f(x: bool) {
                #[cfg(test)]
                if x {
                    return;
                } else {
                    return;
                }
                let _ = crate::a::Ay;
            }
            #[cfg(not(test))]
            fn g() -> crate::a::Ay { crate::a::Ay }
        """,
    }})
    assert edges(ws) == {("src/b.rs", "src/a.rs")}


def test_cfg_test_file_is_not_a_node(tmp_path):
    ws = make_ws(tmp_path, {"a": {
        "src/lib.rs": "mod a;\n#[cfg(test)]\nmod tests;\n",
        "src/a.rs": "pub struct Ay;\n",
        "src/tests.rs": "use crate::a::Ay;\n",
    }})
    g = ic.build_graph(ws)
    c = g.crates[0]
    assert sorted(c.files) == ["a/src/a.rs", "a/src/lib.rs"]
    assert c.test_files == {"a/src/tests.rs"}
    rc, out = run(ws)
    assert rc == 0 and "note:" not in out


def test_super_and_self_resolution(tmp_path):
    ws = make_ws(tmp_path, {"a": {
        "src/lib.rs": "pub mod net;\npub mod top;\n",
        "src/top.rs": "pub struct Top;\n",
        "src/net.rs": """
            mod x;
            mod y;
            pub use self::x::Ex;
        """,
        "src/net/x.rs": """
            pub struct Ex;
            pub fn f() -> super::y::Why { super::y::Why }
            pub fn g() -> super::super::top::Top { todo!() }
        """,
        "src/net/y.rs": """
            pub struct Why;
            fn h(_: super::x::Ex) {}
        """,
    }})
    assert edges(ws) == {
        ("src/net.rs", "src/net/x.rs"),
        ("src/net/x.rs", "src/net/y.rs"),
        ("src/net/x.rs", "src/top.rs"),
        ("src/net/y.rs", "src/net/x.rs"),
    }
    rc, out = run(ws)
    assert rc == 1
    assert "src/net/x.rs -> src/net/y.rs -> src/net/x.rs" in out
    assert "a/src/net/x.rs:2: pub fn f() -> super::y::Why { super::y::Why }" in out
    assert "a/src/net/y.rs:2: fn h(_: super::x::Ex) {}" in out


def test_use_group(tmp_path):
    ws = make_ws(tmp_path, {"a": {
        "src/lib.rs": "mod a;\nmod b;\nmod m;\n",
        "src/a.rs": "pub struct Ay;\n",
        "src/b.rs": "pub mod c;\n",
        "src/b/c.rs": "pub struct Cee;\n",
        "src/m.rs": """
            use crate::{
                a,
                b::c,
            };
            use crate::{b::{self as bee}};
        """,
    }})
    assert edges(ws) == {("src/m.rs", "src/a.rs"), ("src/m.rs", "src/b/c.rs"), ("src/m.rs", "src/b.rs")}
    g = ic.build_graph(ws)
    e = g.edges["t-a"][("a/src/m.rs", "a/src/b/c.rs")]
    assert e.line == 3 and e.note == "use crate::b::c"


def test_pub_use_reexport_at_root_is_followed(tmp_path):
    ws = make_ws(tmp_path, {"a": {
        "src/lib.rs": """
            mod settings;
            mod broker;
            mod packet;
            pub use settings::Settings;
            pub use packet::*;
            pub struct Root;
        """,
        "src/settings.rs": "pub struct Settings;\n",
        "src/packet.rs": "pub enum QoS { Zero }\n",
        "src/broker.rs": """
            use crate::Settings;
            fn f(_: crate::QoS) {}
            fn g(_: crate::Root) {}
        """,
    }})
    assert edges(ws) == {
        ("src/lib.rs", "src/settings.rs"),
        ("src/lib.rs", "src/packet.rs"),
        ("src/broker.rs", "src/settings.rs"),
        ("src/broker.rs", "src/packet.rs"),
        ("src/broker.rs", "src/lib.rs"),  # Root is defined in lib.rs
    }


def test_mod_rs_layout(tmp_path):
    ws = make_ws(tmp_path, {"a": {
        "src/lib.rs": "mod a;\n",
        "src/a/mod.rs": """
            mod x;
            pub struct Ay;
            pub fn f() { x::g() }
        """,
        "src/a/x.rs": """
            pub fn g() {}
            fn h(_: super::Ay) {}
        """,
    }})
    assert edges(ws) == {("src/a/mod.rs", "src/a/x.rs"), ("src/a/x.rs", "src/a/mod.rs")}
    rc, out = run(ws)
    assert rc == 1
    assert "a/src/a/mod.rs:3: pub fn f() { x::g() }" in out


def test_non_mod_rs_child_and_path_attribute(tmp_path):
    ws = make_ws(tmp_path, {"a": {
        "src/lib.rs": '#[path = "weird/place.rs"]\nmod p;\nmod a;\n',
        "src/weird/place.rs": "pub struct P;\n",
        "src/a.rs": "mod x;\n",
        "src/a/x.rs": "fn f(_: crate::p::P) {}\n",
    }})
    g = ic.build_graph(ws)
    assert sorted(g.crates[0].files) == ["a/src/a.rs", "a/src/a/x.rs", "a/src/lib.rs", "a/src/weird/place.rs"]
    assert edges(ws) == {("src/a/x.rs", "src/weird/place.rs")}


def test_comments_and_strings_are_ignored(tmp_path):
    ws = make_ws(tmp_path, {"a": {
        "src/lib.rs": "mod a;\nmod b;\n",
        "src/a.rs": "pub fn f() {}\n",
        "src/b.rs": r'''
            // crate::a::f();
            /// [`crate::a::f`]
            /* outer /* nested crate::a::f() */ still comment crate::a::f() */
            //! crate::a
            pub fn g() -> &'static str {
                let _c = '"';
                let _s = "crate::a::f() \" crate::a::f()";
                let _r = r#"crate::a::f() "# ;
                let _b = b"crate::a::f";
                println!("{}", "use crate::a;");
                "crate::a::f"
            }
        ''',
    }})
    assert edges(ws) == set()


def test_parent_declaring_a_child_is_no_edge(tmp_path):
    ws = make_ws(tmp_path, {"a": {
        "src/lib.rs": "mod a;\npub mod b;\n",
        "src/a.rs": "mod x;\n",
        "src/a/x.rs": "pub fn f() {}\n",
        "src/b.rs": "pub fn g() {}\n",
    }})
    assert edges(ws) == set()
    rc, out = run(ws)
    assert rc == 0
    assert "(4 files, 0 edges)" in out


def test_inline_module_and_macro_export(tmp_path):
    ws = make_ws(tmp_path, {"a": {
        "src/lib.rs": "mod defs;\nmod user;\n",
        "src/defs.rs": """
            #[macro_export]
            macro_rules! each { ($cb:ident) => { $cb!() }; }
            pub mod inner {
                pub fn f() { super::super::user::u() }
            }
        """,
        "src/user.rs": """
            pub fn u() {}
            crate::each!(x);
        """,
    }})
    assert edges(ws) == {("src/defs.rs", "src/user.rs"), ("src/user.rs", "src/defs.rs")}


def test_cross_crate_references_and_crate_order(tmp_path):
    ws = make_ws(
        tmp_path,
        {
            "base": {"src/lib.rs": "pub mod m;\n", "src/m.rs": "pub struct M;\n"},
            "a": {
                "src/lib.rs": "mod a;\n",
                "src/a.rs": "use t_base::m::M;\nfn f() -> ::t_base::m::M { M }\n",
            },
        },
        deps={"a": ["base"]},
    )
    g = ic.build_graph(ws)
    assert g.edges["t-a"] == {}
    assert g.crate_uses["t-a"] == {"t-base": ("a/src/a.rs", 1)}
    rc, out = run(ws)
    assert rc == 0
    assert "crate order (each depends only on crates before it): t-base -> t-a" in out


def test_options_crate_and_dot(tmp_path):
    ws = make_ws(tmp_path, {
        "a": {"src/lib.rs": "mod a;\nmod b;\n", "src/a.rs": "use crate::b::B;\npub struct A;\n", "src/b.rs": "use crate::a::A;\npub struct B;\n"},
        "c": {"src/lib.rs": "mod x;\n", "src/x.rs": "\n"},
    })
    rc, out = run(ws, "--crate", "c")
    assert rc == 0 and "no import circle between the files of 1 crates (2 files, 0 edges)" in out
    rc, out = run(ws, "--crate", "t_a")
    assert rc == 1 and "t-a: 1 import circle" in out
    rc, out = run(ws, "--dot")
    assert rc == 1
    assert out.startswith("digraph imports {")
    assert '"a/src/a.rs" -> "a/src/b.rs" [tooltip="a/src/a.rs:1", color=red];' in out
    rc, out = run(ws, "--crate", "nope")
    assert rc == 2


def test_binary_and_library_of_one_package_are_separate_crates(tmp_path):
    ws = make_ws(tmp_path, {"a": {
        "src/lib.rs": "pub mod m;\n",
        "src/m.rs": "pub fn f() {}\n",
        "src/main.rs": "mod cli;\nfn main() { t_a::m::f(); cli::g() }\n",
        "src/cli.rs": "pub fn g() { crate::helper() }\n",
    }})
    g = ic.build_graph(ws)
    assert sorted(c.display for c in g.crates) == ["t-a", "t-a (bin t-a)"]
    bin_edges = g.edges["t-a (bin t-a)"]
    assert set(bin_edges) == {("a/src/main.rs", "a/src/cli.rs"), ("a/src/cli.rs", "a/src/main.rs")}


@pytest.mark.parametrize(
    "src,expected",
    [
        ("'a' 'b", ["lit", "life"]),
        ("r#type::x", ["id", "p", "id"]),
        ('br##"a"#b"## c', ["str", "id"]),
        ("x.0.1", ["id", "p", "lit"]),
    ],
)
def test_tokenizer_corners(src, expected):
    assert [t.kind for t in ic.tokenize(src)] == expected
