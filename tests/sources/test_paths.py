"""Exclude globs: components anywhere, anchored patterns with **, no regex backtracking."""

from __future__ import annotations

from agent.sources.paths import compile_excludes


def test_a_pattern_without_a_slash_matches_a_component_anywhere() -> None:
    ex = compile_excludes(["node_modules", "*.o"])
    assert ex.excluded("web/node_modules/react/index.js")
    assert ex.excluded("build/main.o")
    assert not ex.excluded("src/main.c")
    assert not ex.excluded("node_modules_old/x")


def test_anchored_patterns_match_from_the_root_and_star_star_spans_directories() -> None:
    ex = compile_excludes(["build/**", "docs/*/drafts", "**/secret-cache"])
    assert ex.excluded("build")
    assert ex.excluded("build/x/y.o")
    assert not ex.excluded("src/build/x")
    assert ex.excluded("docs/v1/drafts/a.md")
    assert not ex.excluded("docs/v1/v2/drafts/a.md")
    assert ex.excluded("a/b/secret-cache/x")
    assert ex.excluded("secret-cache")


def test_bad_patterns_are_reported() -> None:
    ex = compile_excludes(["/", "a/../b", "ok"])
    assert len(ex.problems) == 2
    assert ex.names == ("ok",)


def test_pathological_patterns_stay_fast() -> None:
    import time

    ex = compile_excludes(["**/" + "*a" * 20 + "/**"])
    began = time.perf_counter()
    for _ in range(100):
        ex.excluded("/".join(["a" * 50] * 40))
    assert time.perf_counter() - began < 5
