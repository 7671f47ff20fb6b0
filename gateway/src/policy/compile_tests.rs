use globset::GlobBuilder;

use super::Glob;

/// The direct matcher answers as `globset` does (with `*` not matching `/`) on globs of literals
/// and `*`, over names that straddle every literal, separator and empty piece.
#[test]
fn simple_globs_match_as_globset_does() {
    let globs = [
        "",
        "*",
        "a",
        "ab",
        "a*",
        "*a",
        "*a*",
        "a*b",
        "a*b*c",
        "ab*ba",
        "a*a*a",
        "*/*",
        "up/*",
        "up/tool_1_*",
        "*/read_*",
        "up*/x",
        "a/b/c",
        "a*/b*",
        "tool_é*",
        "**",
        "a**b",
        "x*y*",
        "*.*",
        "a.b",
        "a+b*(c)",
        "^a$*",
        "up/",
        "/a",
        "a//b",
        "*x/*",
        "s*s*s*s",
    ];
    let names = [
        "",
        "a",
        "b",
        "ab",
        "ba",
        "aa",
        "aaa",
        "aba",
        "abba",
        "abab",
        "abc",
        "axbyc",
        "acb",
        "a/b",
        "a/b/c",
        "ab/ba",
        "up/x",
        "upx/x",
        "up/tool_1_",
        "up/tool_1_x",
        "up/tool_10_x",
        "tool_1_x",
        "other/read_file",
        "read_file",
        "up/read_/x",
        "a.b",
        "axb",
        "a+b(c)",
        "a+bx(c)",
        "^a$",
        "^a$z",
        "tool_é",
        "tool_éa",
        "tool_e",
        "/a",
        "a//b",
        "a/",
        "/",
        "//",
        "xy",
        "xay",
        "x/y",
        "sss",
        "ssss",
        "s/s",
        "sxsxsxs",
        "up/",
        "xx/",
        "x/a",
    ];
    let mut simple = 0;
    for g in globs {
        let ours = Glob::new(g).expect("a valid glob");
        if matches!(ours, Glob::Simple(_)) {
            simple += 1;
        }
        let theirs = GlobBuilder::new(g)
            .literal_separator(true)
            .build()
            .expect("a valid glob")
            .compile_matcher();
        for n in names {
            assert_eq!(ours.is_match(n), theirs.is_match(n), "glob `{g}` on `{n}`");
        }
    }
    // All but `**` and `a**b` take the direct path.
    assert_eq!(simple, globs.len() - 2);
}

/// Globs with classes, alternatives, `?` and escapes still compile (and bad ones are refused).
#[test]
fn other_globs_go_to_globset() {
    for g in ["tool_?", "t[ab]*", "{a,b}/*", "a\\*", "**/x"] {
        assert!(matches!(Glob::new(g), Ok(Glob::Compiled(_))), "{g}");
    }
    assert!(Glob::new("{a,b").is_err());
    let g = Glob::new("{read,list}_*").expect("a valid glob");
    assert!(g.is_match("read_x") && g.is_match("list_") && !g.is_match("write_x"));
}
