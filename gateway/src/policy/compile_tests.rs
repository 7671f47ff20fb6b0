use globset::GlobBuilder;

use super::{Glob, compile_pattern};

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
    // Where `*` stops at `/` (methods, an upstream's name) and where it does not (a tool's).
    for separator in [true, false] {
        let mut simple = 0;
        for g in globs {
            let ours = Glob::new(g, separator).expect("a valid glob");
            if matches!(ours, Glob::Simple(_) | Glob::Text(_)) {
                simple += 1;
            }
            let theirs = GlobBuilder::new(g)
                .literal_separator(separator)
                .build()
                .expect("a valid glob")
                .compile_matcher();
            for n in names {
                assert_eq!(
                    ours.is_match(n),
                    theirs.is_match(n),
                    "glob `{g}` on `{n}` (separator: {separator})"
                );
            }
        }
        // All but `**` and `a**b` take the direct path.
        assert_eq!(simple, globs.len() - 2);
    }
}

/// Globs with classes, alternatives, `?` and escapes still compile (and bad ones are refused).
#[test]
fn other_globs_go_to_globset() {
    for g in ["tool_?", "t[ab]*", "{a,b}/*", "a\\*", "**/x"] {
        assert!(matches!(Glob::new(g, true), Ok(Glob::Compiled(_))), "{g}");
    }
    assert!(Glob::new("{a,b", true).is_err());
    let g = Glob::new("{read,list}_*", true).expect("a valid glob");
    assert!(g.is_match("read_x") && g.is_match("list_") && !g.is_match("write_x"));
}

/// Argument patterns compiled without the full DFA match as `regex::Regex` does, and a bad one
/// is refused with the same words.
#[test]
fn patterns_answer_as_the_regex_crate_does() {
    let patterns = [
        "^/srv/data1/[a-z0-9_/]+$",
        "^[a-z]{2,4}$",
        "\\d+",
        "(?i)select",
        "^é.$",
        "a|b|",
        "^$",
        "",
        "\\bword\\b",
        "[^/]*\\.txt$",
    ];
    let texts = [
        "",
        "/srv/data1/a_b/c",
        "/srv/data1/A",
        "/srv/data10/a",
        "ab",
        "abcde",
        "x12",
        "SeLeCt *",
        "éa",
        "éab",
        "a",
        "c",
        "a word here",
        "words",
        "x/y.txt",
        "y.txt",
        "\u{0660}",
    ];
    for p in patterns {
        let ours = compile_pattern(p).expect("a valid pattern");
        let theirs = regex::Regex::new(p).expect("a valid pattern");
        for t in texts {
            assert_eq!(ours.is_match(t), theirs.is_match(t), "`{p}` on `{t}`");
        }
    }
    for bad in ["(", "[z-a]", "a{2,1}", "\\p{Nope}", "(?<n>a)(?<n>b)"] {
        let ours = compile_pattern(bad).expect_err("refused");
        let theirs = regex::Regex::new(bad).expect_err("refused").to_string();
        assert_eq!(ours, theirs, "`{bad}`");
    }
    let huge = "\\w{1000}{1000}";
    assert_eq!(
        compile_pattern(huge).expect_err("too big"),
        regex::Regex::new(huge).expect_err("too big").to_string()
    );
}
