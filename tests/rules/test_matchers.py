"""Field conditions: every modifier, wildcards, value shapes, error codes, and linear time."""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.events import FIELDS, Event
from agent.rules.matchers import MODIFIERS, FieldMatcher, MatcherError, compile_field


def ev(path: str = "/rnd/project/Report.DOCX", **fields: Any) -> Event:
    return Event(timestamp_us=1_700_000_000_000_000, action="created", path=path, **fields)


def matches(key: str, value: object, event: Event, **kwargs: Any) -> bool:
    return compile_field(key, value, **kwargs)(event)


def error(key: str, value: object, **kwargs: Any) -> MatcherError:
    with pytest.raises(MatcherError) as info:
        compile_field(key, value, **kwargs)
    return info.value


# --- plain values and wildcards -------------------------------------------------------------


def test_a_plain_value_is_case_insensitive_equality_and_is_indexable() -> None:
    m = compile_field("process.name", ["RClone", "curl"])
    assert m(ev(process_name="rclone"))
    assert m(ev(process_name="CURL"))
    assert not m(ev(process_name="rclone2"))
    assert not m(ev())  # absent field
    assert m.equals == frozenset({"rclone", "curl"})
    assert m.field == "process.name"
    assert m.modifiers == ()


def test_cased_makes_equality_case_sensitive_and_not_indexable() -> None:
    m = compile_field("process.name|cased", "rclone")
    assert m(ev(process_name="rclone"))
    assert not m(ev(process_name="RClone"))
    assert m.equals is None


def test_wildcards_match_any_run_and_one_character() -> None:
    assert matches("file.path", "/RND/*", ev())
    assert matches("file.path", "*.docx", ev())
    assert matches("file.path", "*/project/*", ev())
    assert matches("file.path", "/rnd/?roject/*.docx", ev())
    assert not matches("file.path", "/rnd/?project/*.docx", ev())
    assert matches("file.path", "*", ev())
    assert compile_field("file.path", "*.docx").equals is None


def test_escaped_wildcards_and_backslashes_are_literal() -> None:
    assert matches("file.name", r"a\*b", ev("/x/a*b"))
    assert not matches("file.name", r"a\*b", ev("/x/axxb"))
    assert matches("file.name", r"what\?", ev("/x/what?"))
    assert not matches("file.name", r"what\?", ev("/x/whats"))
    assert matches("file.name", r"back\\*", ev("/x/back\\slash"))  # \\ then a real star
    assert matches("file.name", r"c:\temp", ev("/x/c:\\temp"))  # other backslashes: literal
    assert compile_field("file.name", r"a\*b").equals == frozenset({"a*b"})


def test_wildcards_match_newlines_in_names() -> None:
    assert matches("file.name", "a*b", ev("/x/a\nb"))
    assert matches("file.name", "a?b", ev("/x/a\nb"))


def test_non_utf8_paths_still_match_wildcards_with_one_character_per_byte() -> None:
    path = b"/rnd/x\xff.docx".decode("utf-8", "surrogateescape")
    assert matches("file.path", "/rnd/x?.docx", ev(path))
    assert matches("file.path", "/rnd/*x*.docx", ev(path))
    assert matches("file.path|re", r"^/rnd/x.\.docx$", ev(path))
    assert matches("file.path|glob", "/rnd/*.docx", ev(path))


def test_null_means_the_field_is_absent() -> None:
    m = compile_field("user.name", None)
    assert m(ev())
    assert not m(ev(user_name="alice"))
    assert matches("exfilwatch.tags", None, ev())  # an empty tuple is absent
    assert compile_field("user.name", [None, "bob"])(ev(user_name="BOB"))


@given(
    pattern=st.text(alphabet="aAb/.*?", max_size=8),
    text=st.text(alphabet="aAb/.", max_size=10),
)
@settings(max_examples=400, deadline=None)
def test_wildcards_agree_with_fnmatchcase_on_lower_cased_inputs(pattern: str, text: str) -> None:
    got = matches("file.path", pattern, ev(text))
    assert got == fnmatch.fnmatchcase(text.lower(), pattern.lower())


# --- contains / startswith / endswith -------------------------------------------------------


def test_contains_startswith_and_endswith_are_case_insensitive_substring_tests() -> None:
    e = ev(process_command_line="rclone COPY /rnd remote:")
    assert matches("process.command_line|contains", "copy", e)
    assert matches("process.command_line|startswith", "RCLONE", e)
    assert matches("process.command_line|endswith", "REMOTE:", e)
    assert not matches("process.command_line|startswith", "copy", e)
    assert not matches("process.command_line|endswith", "rclone", e)
    assert compile_field("process.command_line|contains", "x").equals is None


def test_lists_under_contains_startswith_endswith_are_any_of() -> None:
    e = ev(process_command_line="scp file host:")
    assert matches("process.command_line|contains", ["rsync", "host:"], e)
    assert matches("process.command_line|startswith", ["rsync", "SCP "], e)
    assert matches("process.command_line|endswith", ["x", "HOST:"], e)
    assert not matches("process.command_line|contains", ["rsync", "ftp"], e)


def test_wildcards_inside_contains_still_work_and_escapes_survive_the_wrapping() -> None:
    e = ev(process_command_line="curl -T secret.zip https://x")
    assert matches("process.command_line|contains", "-T *.zip", e)
    assert matches("process.command_line|startswith", "curl -? ", e)
    assert not matches("process.command_line|contains", r"-T \*.zip", e)
    assert matches("file.name|endswith", "\\", ev("/x/dir\\"))  # a lone trailing backslash


def test_cased_applies_to_contains_startswith_and_endswith() -> None:
    e = ev(process_command_line="Rclone copy")
    assert matches("process.command_line|contains|cased", "Rclone", e)
    assert not matches("process.command_line|contains|cased", "rclone", e)
    assert not matches("process.command_line|startswith|cased", "rclone", e)
    assert matches("process.command_line|endswith|cased", "copy", e)


# --- re ---------------------------------------------------------------------------------------


def test_re_is_searched_unanchored_and_case_sensitive() -> None:
    e = ev(process_command_line="rclone copy /rnd s3:bucket")
    assert matches("process.command_line|re", r"copy\s+/rnd", e)
    assert not matches("process.command_line|re", r"COPY", e)
    assert not matches("process.command_line|re", r"^copy", e)


def test_re_i_is_case_insensitive_and_re_m_re_s_set_their_flags() -> None:
    e = ev(process_command_line="line one\nRCLONE two")
    assert matches("process.command_line|re|i", "rclone", e)
    assert not matches("process.command_line|re", "^RCLONE", e)
    assert matches("process.command_line|re|m", "^RCLONE", e)
    assert not matches("process.command_line|re", "one.RCLONE", e)
    assert matches("process.command_line|re|s", "one.RCLONE", e)


def test_a_list_of_regexes_is_any_of_and_each_keeps_its_own_anchors() -> None:
    m = compile_field("file.name|re", ["^a$", "b$", r"\Qc.d"])
    assert m(ev("/x/a"))
    assert m(ev("/x/xb"))
    assert m(ev("/x/c.d"))
    assert not m(ev("/x/ba"))
    assert not m(ev("/x/cxd"))


def test_re_on_an_int_field_searches_its_decimal_text() -> None:
    assert matches("file.size|re", "^10+$", ev(size=1000))
    assert not matches("file.size|re", "^10+$", ev())


def test_a_pathological_regex_runs_in_linear_time() -> None:
    m = compile_field("process.command_line|re", "(a+)+$")
    hostile = ev(process_command_line="a" * 5000 + "b")
    start = time.perf_counter()
    for _ in range(10):
        assert not m(hostile)  # a backtracking engine takes ~2**5000 steps here
    assert time.perf_counter() - start < 0.5
    assert m(ev(process_command_line="a" * 5000))


def test_a_pathological_wildcard_runs_in_linear_time() -> None:
    m = compile_field("process.command_line", "*a*a*a*a*a*a*a*a*a*a*b?")
    start = time.perf_counter()
    assert not m(ev(process_command_line="a" * 20_000))
    assert time.perf_counter() - start < 0.5


# --- all, exists, numbers, tuple fields -------------------------------------------------------


def test_all_requires_every_value_to_match() -> None:
    e = ev(process_command_line="tar czf - /rnd | nc host 9")
    assert matches("process.command_line|contains|all", ["tar", "| nc"], e)
    assert not matches("process.command_line|contains|all", ["tar", "curl"], e)
    assert matches("process.command_line|contains|all", "tar", e)  # a scalar is a list of one


def test_all_over_a_tuple_field_needs_each_value_in_some_element() -> None:
    e = ev(tags=("Secret", "rnd"))
    assert matches("exfilwatch.tags|all", ["secret", "RND"], e)
    assert not matches("exfilwatch.tags|all", ["secret", "finance"], e)
    assert not matches("exfilwatch.tags|all", ["secret"], ev())


def test_tuple_fields_match_when_any_element_matches() -> None:
    e = ev(tags=("public", "Secret"), disguise=("extension_mismatch",))
    assert matches("exfilwatch.tags", "secret", e)
    assert matches("exfilwatch.tags|startswith", "sec", e)
    assert matches("exfilwatch.disguise|contains", "mismatch", e)
    assert matches("event.type", "creation", e)  # a computed tuple field
    assert not matches("exfilwatch.tags", "finance", e)
    assert not matches("exfilwatch.tags", "secret", ev())


def test_exists_tells_present_from_absent_including_empty_tuples() -> None:
    assert matches("user.name|exists", True, ev(user_name="alice"))
    assert not matches("user.name|exists", True, ev())
    assert matches("user.name|exists", False, ev())
    assert matches("user.name|exists", True, ev(user_name=""))  # empty text is still present
    assert not matches("exfilwatch.tags|exists", True, ev())
    assert matches("exfilwatch.tags|exists", True, ev(tags=("rnd",)))
    assert matches("file.size|exists", True, ev(size=0))


def test_numeric_comparisons_hold_for_ints_and_never_for_absent_values() -> None:
    e = ev(size=1_048_576)
    assert matches("file.size|gt", 1_000_000, e)
    assert not matches("file.size|gt", 1_048_576, e)
    assert matches("file.size|gte", 1_048_576, e)
    assert matches("file.size|lt", 2_000_000.5, e)
    assert matches("file.size|lte", 1_048_576, e)
    assert not matches("file.size|lt", 10**9, ev())
    assert not matches("file.size|gte", 0, ev())


def test_numeric_comparisons_read_decimal_string_fields_and_skip_other_text() -> None:
    assert matches("file.uid|lt", 1000, ev(uid="0"))
    assert not matches("file.uid|lt", 1000, ev(uid="1000"))
    assert not matches("user.name|lt", 1000, ev(user_name="12abc"))
    assert matches("exfilwatch.archive.tagged_members|gte", 1, ev(archive_tagged=3))


def test_int_fields_equal_strings_by_decimal_text_and_numbers_numerically() -> None:
    assert matches("file.size", 0, ev(size=0))
    assert matches("file.size", "0", ev(size=0))
    assert matches("file.size", 0.0, ev(size=0))
    assert matches("file.size", "1*", ev(size=1024))
    assert not matches("file.size", 0, ev(size=10))
    assert not matches("file.size", 0, ev())
    assert matches("file.uid", "0", ev(uid="0"))
    assert matches("file.uid", 0, ev(uid="0"))  # an unquoted YAML number on a string field
    assert compile_field("file.size", 0).equals is None


# --- path and glob ----------------------------------------------------------------------------


def test_path_matches_the_directory_and_below_but_not_a_sibling_with_the_same_prefix() -> None:
    m = compile_field("file.path|path", "/rnd")
    assert m(ev("/rnd"))
    assert m(ev("/rnd/x/y.docx"))
    assert not m(ev("/rnd_old"))
    assert not m(ev("/rnd_old/x"))
    assert not m(ev("/RND/x"))  # paths are case-sensitive
    assert compile_field("file.path|path", "/rnd/")(ev("/rnd/x"))  # trailing slash ignored
    assert compile_field("file.path|path", "/")(ev("/anything"))


def test_path_lists_are_any_of_and_all_is_every_prefix() -> None:
    m = compile_field("file.path|path", ["/finance", "/rnd/secret"])
    assert m(ev("/rnd/secret/a"))
    assert m(ev("/finance"))
    assert not m(ev("/rnd/secrets"))
    assert matches("file.path|path|all", ["/rnd", "/rnd/secret"], ev("/rnd/secret/a"))
    assert not matches("file.path|path|all", ["/rnd", "/finance"], ev("/rnd/secret/a"))


def test_glob_star_stays_in_one_component_and_double_star_spans_any_number() -> None:
    assert matches("file.path|glob", "/rnd/*/Report.DOCX", ev())
    assert not matches("file.path|glob", "/rnd/*", ev())
    assert matches("file.path|glob", "/rnd/**", ev())
    assert matches("file.path|glob", "/rnd/**", ev("/rnd"))
    assert matches("file.path|glob", "/rnd/**/Report.DOCX", ev())
    assert matches("file.path|glob", "/rnd/**/project/Report.DOCX", ev())  # zero components
    assert matches("file.path|glob", "**/*.DOCX", ev())
    assert matches("file.path|glob", "/**/**/*.DOCX", ev())
    assert not matches("file.path|glob", "/rnd/**", ev("/rnd_old/x"))
    assert not matches("file.path|glob", "/rnd/**/*.docx", ev())  # case-sensitive


def test_glob_question_marks_classes_and_escapes() -> None:
    assert matches("file.path|glob", "/rnd/pro?ect/*.DOC[XM]", ev())
    assert matches("file.path|glob", "/rnd/*/[!a-q]eport.*", ev())
    assert not matches("file.path|glob", "/rnd/*/[!R]eport.*", ev())
    assert not matches("file.path|glob", "/rnd?project/*", ev())  # ? never matches /
    assert matches("file.path|glob", "/x/[[]old]", ev("/x/[old]"))
    assert matches("file.path|glob", r"/x/\*", ev("/x/*"))
    assert not matches("file.path|glob", r"/x/\*", ev("/x/a"))
    assert matches("file.path|glob", "/x/[]a]", ev("/x/]"))


# --- expand -----------------------------------------------------------------------------------

LISTS = {"upload_tools": ["rclone", "curl*"], "shares": ["/mnt/nas", "/media"]}


def test_expand_replaces_a_placeholder_with_the_named_list() -> None:
    m = compile_field("process.name|expand", "%upload_tools%", lists=LISTS)
    assert m(ev(process_name="RCLONE"))
    assert m(ev(process_name="curl7"))  # list items are wildcard values too
    assert not m(ev(process_name="scp"))


def test_expand_combines_with_other_modifiers_and_embedded_placeholders() -> None:
    m = compile_field("file.path|expand|path", "%shares%", lists=LISTS)
    assert m(ev("/mnt/nas/x"))
    assert not m(ev("/mnt/nas2/x"))
    m = compile_field("file.path|expand", ["%shares%/*.zip", "/tmp/x"], lists=LISTS)
    assert m(ev("/media/a.zip"))
    assert m(ev("/tmp/x"))
    assert not m(ev("/media/a.tar"))
    m = compile_field("process.name|expand", ["%upload_tools%", "100%", "%x y%"], lists=LISTS)
    assert m(ev(process_name="100%"))  # a % that opens no placeholder is literal
    assert m(ev(process_name="%x y%"))


def test_expand_of_an_empty_list_matches_nothing_even_with_all() -> None:
    lists: dict[str, list[str]] = {"none": []}
    assert not matches("process.name|expand", "%none%", ev(process_name="x"), lists=lists)
    assert not matches("process.name|expand|all", "%none%", ev(process_name="x"), lists=lists)
    assert compile_field("process.name|expand", "%none%", lists=lists).equals == frozenset()


# --- the matcher object -----------------------------------------------------------------------


def test_a_matcher_uses_the_given_field_table() -> None:
    fields = {"custom.upper": lambda e: e.path.upper()}
    m = compile_field("custom.upper", "/RND/*", known_fields=fields)
    assert isinstance(m, FieldMatcher)
    assert m(ev())
    assert m.test("/RND/X")


def test_every_known_field_compiles_and_reads_its_value() -> None:
    e = ev(process_name="x")
    for name in FIELDS:
        m = compile_field(f"{name}|exists", True)
        assert m(e) is (e.get(name) not in (None, ()))


def test_a_plain_equality_costs_a_few_python_calls() -> None:
    # Against a baseline timed in the same run, alternating (a loaded machine slows both):
    # the bare set lookup a hand-written check would do. Measured ~5x it (230 vs 46 ns); a
    # slow path (a regex, folding every value per call) would be far past 15x. An absolute
    # bound (it was "under 1 us") failed under noise and 4 CPU hogs.
    m = compile_field("process.name", ["rclone", "curl", "scp", "rsync"])
    e = ev(process_name="Firefox")
    names = frozenset(["rclone", "curl", "scp", "rsync"])

    def baseline(e: Event) -> bool:
        return e.process_name in names

    m(e)
    # Short rounds, alternating, until one of each ran undisturbed: on a loaded machine a
    # 20,000-call round rarely does (under noise + 4 CPU hogs 7 such rounds gave 15.4x).
    n = 2_000
    best_m = best_base = float("inf")
    for _ in range(100):
        best_m = min(best_m, _time(m, e, n))
        best_base = min(best_base, _time(baseline, e, n))
        if best_m < 15 * best_base:
            break
    assert best_m < 15 * best_base, (best_m / n, best_base / n)


def _time(m: Callable[[Event], object], e: Event, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        m(e)
    return time.perf_counter() - start


# --- errors -----------------------------------------------------------------------------------


def test_an_unknown_field_suggests_the_nearest_known_one() -> None:
    err = error("file.pth", "x")
    assert err.code == "RULE_UNKNOWN_FIELD"
    assert "file.pth" in err.message
    assert "'file.path'" in err.hint
    assert "RULE_UNKNOWN_FIELD" in str(err)
    assert "file.path" in error("TargetFilenameXYZ", "x").hint  # no close match: lists fields


def test_an_unknown_modifier_suggests_the_nearest_one() -> None:
    err = error("file.path|contain", "x")
    assert err.code == "RULE_UNKNOWN_MODIFIER"
    assert "'contains'" in err.hint
    assert "file.path|contain" in err.message
    assert "lower case" in error("file.path|Contains", "x").hint
    assert "supported modifiers" in error("file.path|", "x").hint


@pytest.mark.parametrize("name", ["windash", "base64", "base64offset", "utf16le", "wide", "cidr"])
def test_unsupported_sigma_modifiers_are_unknown_with_a_reason(name: str) -> None:
    err = error(f"process.command_line|{name}", "x")
    assert err.code == "RULE_UNKNOWN_MODIFIER"
    assert "not supported" in err.hint


def test_a_bad_regex_reports_re2s_message() -> None:
    err = error("file.path|re", "(unclosed")
    assert err.code == "RULE_BAD_REGEX"
    assert "missing )" in err.message
    assert "RE2" in err.hint
    assert error("file.path|re", r"(a)\1").code == "RULE_BAD_REGEX"  # no backreferences
    assert error("file.path|re", "(?=a)").code == "RULE_BAD_REGEX"  # no lookaround


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("file.size|gt", "5"),
        ("file.size|gt", True),
        ("file.size|lte", [1, 2]),
        ("file.size|gte", float("nan")),
        ("user.name|exists", "yes"),
        ("user.name", True),
        ("user.name|contains", None),
        ("user.name", {"a": 1}),
        ("user.name", []),
        ("file.path|re", 5),
        ("file.path|path", "rnd"),
        ("file.path|glob", "/x/[ab"),
        ("file.path|glob", "/x/[z-a]"),
        ("process.name|expand", "no placeholder"),
    ],
)
def test_a_value_of_the_wrong_type_for_its_modifier_is_a_bad_value(key: str, value: object) -> None:
    err = error(key, value)
    assert err.code == "RULE_BAD_VALUE"
    assert err.message.startswith(key)
    assert err.hint


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("file.path|startswith|endswith", "pre*suf"),
        ("file.path|contains|re", "use one"),
        ("file.size|gt|lt", "use one"),
        ("file.path|path|glob", "use one"),
        ("file.path|re|cased", "re|i"),
        ("file.size|gt|cased", "cased applies"),
        ("file.size|exists|all", "single value"),
        ("process.name|i", "re|i"),
        ("file.path|contains|contains", "once"),
    ],
)
def test_modifiers_that_do_not_go_together_conflict(key: str, hint: str) -> None:
    err = error(key, "x")
    assert err.code == "RULE_MODIFIER_CONFLICT"
    assert hint in err.hint


def test_an_unknown_list_suggests_the_nearest_list_name() -> None:
    err = error("process.name|expand", "%upload_tool%", lists=LISTS)
    assert err.code == "RULE_UNKNOWN_LIST"
    assert "'upload_tools'" in err.hint
    assert "no lists are defined" in error("process.name|expand", "%x%").hint
    assert "upload_tools" in error("process.name|expand", "%zzz%", lists=LISTS).hint


def test_the_registry_describes_every_supported_modifier() -> None:
    assert {"contains", "re", "path", "glob", "expand", "cased", "all", "i"} <= set(MODIFIERS)
    assert all(m.summary for m in MODIFIERS.values())
    assert all((m.build is not None) == (m.role == "match") for m in MODIFIERS.values())
