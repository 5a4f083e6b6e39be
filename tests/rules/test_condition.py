"""Rule conditions: parsing, pattern expansion, compiled predicates, index values and errors."""

from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.rules.condition import (
    MAX_DEPTH,
    MAX_LENGTH,
    PATTERN_MATCHES_NOTHING,
    SYNTAX,
    UNKNOWN_SELECTION,
    AllOf,
    And,
    ConditionError,
    Node,
    Not,
    OneOf,
    Or,
    Ref,
    compile_condition,
    describe,
    expand,
    parse_condition,
    referenced,
    required_values,
)


def shape(node: Node) -> Node:
    """The node with every offset zeroed, to compare structure only."""
    match node:
        case Ref(name=name):
            return Ref(name, 0)
        case Not(operand=operand):
            return Not(shape(operand))
        case And(operands=operands):
            return And(tuple(shape(o) for o in operands))
        case Or(operands=operands):
            return Or(tuple(shape(o) for o in operands))
        case OneOf(pattern=pattern):
            return OneOf(pattern, 0)
        case AllOf(pattern=pattern):
            return AllOf(pattern, 0)
    raise AssertionError(node)


def matching(pattern: str, names: Sequence[str]) -> list[str]:
    if pattern == "them":
        return [n for n in names if not n.startswith("_")]
    if pattern.endswith("*"):
        return [n for n in names if n.startswith(pattern[:-1])]
    return [n for n in names if n == pattern]


def evaluate(node: Node, truth: Mapping[str, bool]) -> bool:
    """Direct recursive evaluation, patterns included, as the reference semantics."""
    match node:
        case Ref(name=name):
            return truth[name]
        case Not(operand=operand):
            return not evaluate(operand, truth)
        case And(operands=operands):
            return all(evaluate(o, truth) for o in operands)
        case Or(operands=operands):
            return any(evaluate(o, truth) for o in operands)
        case OneOf(pattern=pattern):
            return any(truth[n] for n in matching(pattern, list(truth)))
        case AllOf(pattern=pattern):
            return all(truth[n] for n in matching(pattern, list(truth)))
    raise AssertionError(node)


def refs(*names: str) -> tuple[Node, ...]:
    return tuple(Ref(n, 0) for n in names)


def error(text: str) -> ConditionError:
    with pytest.raises(ConditionError) as caught:
        parse_condition(text)
    return caught.value


def test_not_binds_tighter_than_and_which_binds_tighter_than_or() -> None:
    assert parse_condition("a or b and not c") == Or(
        (Ref("a", 0), And((Ref("b", 5), Not(Ref("c", 15)))))
    )


def test_parentheses_override_precedence() -> None:
    assert shape(parse_condition("(a or b) and not (c or d)")) == And(
        (Or(refs("a", "b")), Not(Or(refs("c", "d"))))
    )


def test_a_chain_of_one_operator_becomes_one_node() -> None:
    assert shape(parse_condition("a and b and c or d or e")) == Or(
        (And(refs("a", "b", "c")), *refs("d", "e"))
    )


def test_keywords_are_case_insensitive_and_names_keep_their_case() -> None:
    node = parse_condition("Sel AND NOT b Or ALL OF Them or Any Of x_*")
    assert shape(node) == Or(
        (And((Ref("Sel", 0), Not(Ref("b", 0)))), AllOf("them", 0), OneOf("x_*", 0))
    )


def test_names_may_hold_digits_dots_and_dashes() -> None:
    assert parse_condition("_sel-1.a") == Ref("_sel-1.a", 0)


def test_one_of_a_glob_expands_to_or_of_matching_selections_in_definition_order() -> None:
    node = expand(parse_condition("1 of sel_*"), ["sel_b", "other", "sel_a"])
    assert node == Or((Ref("sel_b", 5), Ref("sel_a", 5)))


def test_all_of_them_expands_to_and_of_every_selection_not_starting_with_underscore() -> None:
    node = expand(parse_condition("all of them"), ["a", "_helper", "b"])
    assert shape(node) == And(refs("a", "b"))


def test_any_of_is_an_alias_of_one_of() -> None:
    assert shape(parse_condition("any of sel*")) == OneOf("sel*", 0)


def test_a_pattern_matching_one_selection_expands_to_a_plain_reference() -> None:
    assert expand(parse_condition("all of filter_*"), ["sel", "filter_x"]) == Ref("filter_x", 7)


def test_a_glob_matches_the_whole_name_with_stars_anywhere() -> None:
    node = expand(parse_condition("1 of *_usb*"), ["sel_usb", "usb", "a_usb_x", "x.usb"])
    assert shape(node) == Or(refs("sel_usb", "a_usb_x"))


def test_an_unknown_selection_is_reported_at_its_offset_with_a_did_you_mean_hint() -> None:
    with pytest.raises(ConditionError) as caught:
        expand(parse_condition("selection and not filtr"), ["selection", "filter"])
    assert caught.value.code == UNKNOWN_SELECTION
    assert caught.value.offset == 18
    assert "did you mean 'filter'" in caught.value.hint


def test_an_unknown_selection_with_nothing_close_lists_the_defined_selections() -> None:
    with pytest.raises(ConditionError) as caught:
        expand(parse_condition("zzz"), ["selection", "filter"])
    assert caught.value.hint == "selections defined: selection, filter"


def test_a_pattern_matching_nothing_is_reported_at_the_pattern() -> None:
    with pytest.raises(ConditionError) as caught:
        expand(parse_condition("selection and not 1 of filter_*"), ["selection", "sel_usb"])
    assert caught.value.code == PATTERN_MATCHES_NOTHING
    assert caught.value.offset == 23


def test_them_matches_nothing_when_every_selection_starts_with_underscore() -> None:
    with pytest.raises(ConditionError) as caught:
        expand(parse_condition("1 of them"), ["_a", "_b"])
    assert caught.value.code == PATTERN_MATCHES_NOTHING
    assert "'_'" in caught.value.hint


def test_referenced_gives_the_selection_names_of_an_expanded_condition() -> None:
    node = expand(parse_condition("a and not 1 of f_*"), ["a", "f_1", "f_2", "unused"])
    assert referenced(node) == {"a", "f_1", "f_2"}


def test_referenced_refuses_an_unexpanded_pattern() -> None:
    with pytest.raises(ValueError, match="expand"):
        referenced(parse_condition("a or 1 of them"))


@pytest.mark.parametrize(
    ("text", "offset"),
    [
        ("selection and or filter", 14),  # the operator with no left operand
        ("(a and b", 0),  # the unclosed paren
        ("a and (b or (c)", 6),
        ("(a b)", 3),
        ("a b", 2),  # trailing garbage
        ("a )", 2),
        ("", 0),
        ("   ", 0),
        ("a and", 5),  # the end of the text
        ("not", 3),
        ("()", 1),
        ("a $ b", 2),
        ("a and b &", 8),
        ("1 of", 4),
        ("1 of (a)", 5),
        ("1 and a", 2),
        ("all a", 4),
        ("2 of sel_*", 0),
        ("sel_* or a", 0),
        ("a and them", 6),
        ("9lives", 0),
        ("a and 1 of -x", 11),
        ("a\u00a0and b", 1),
    ],
)
def test_a_syntax_error_points_at_the_offending_token(text: str, offset: int) -> None:
    caught = error(text)
    assert (caught.code, caught.offset) == (SYNTAX, offset)


def test_the_first_syntax_error_in_the_text_is_the_one_reported() -> None:
    assert error("a and or b $").offset == 6


def test_a_pipe_aggregation_is_rejected_with_a_hint_to_use_a_correlation() -> None:
    caught = error("selection | count(user.name) by host.name > 5")
    assert (caught.code, caught.offset) == (SYNTAX, 10)
    assert "correlation:" in caught.hint


def test_nesting_up_to_the_limit_parses() -> None:
    depth = MAX_DEPTH
    assert parse_condition("(" * depth + "a" + ")" * depth) == Ref("a", depth)


def test_nesting_beyond_the_limit_is_a_syntax_error_at_the_innermost_paren() -> None:
    depth = MAX_DEPTH + 1
    caught = error("(" * depth + "a" + ")" * depth)
    assert (caught.code, caught.offset) == (SYNTAX, MAX_DEPTH)
    assert "nesting too deep" in caught.message


def test_a_long_run_of_not_counts_as_nesting_instead_of_growing_the_stack() -> None:
    caught = error("not " * 1000 + "a")
    assert (caught.code, caught.offset) == (SYNTAX, 4 * MAX_DEPTH)


def test_a_condition_longer_than_the_limit_is_rejected_before_parsing() -> None:
    caught = error(" or ".join(["a"] * MAX_LENGTH))
    assert (caught.code, caught.offset) == (SYNTAX, MAX_LENGTH)


def test_a_condition_error_keeps_its_fields_through_pickling_and_shows_them() -> None:
    caught = pickle.loads(pickle.dumps(error("a and")))  # noqa: S301 (our own bytes)
    assert (caught.code, caught.offset, caught.hint) == (SYNTAX, 5, "")
    assert str(caught).startswith("RULE_CONDITION_SYNTAX at offset 5: ")


def boom(_: object) -> bool:
    raise AssertionError("evaluated although the result was already known")


def const(value: bool) -> Callable[[object], bool]:
    return lambda _: value


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("t or boom", True),
        ("f and boom", False),
        ("f and (boom or boom) and boom", False),
        ("t or f or boom or boom", True),
        ("not t and boom", False),
        ("not (f and boom)", True),
    ],
)
def test_a_compiled_condition_skips_operands_once_the_result_is_known(
    text: str, expected: bool
) -> None:
    predicates = {"t": const(True), "f": const(False), "boom": boom}
    node = expand(parse_condition(text), list(predicates))
    assert compile_condition(node, predicates)(None) is expected


def test_a_double_negation_compiles_to_the_operand_itself() -> None:
    predicate = const(True)
    assert compile_condition(Not(Not(Ref("a", 0))), {"a": predicate}) is predicate


def test_compiling_an_unexpanded_pattern_is_refused() -> None:
    with pytest.raises(ValueError, match="expand"):
        compile_condition(OneOf("them", 0), {"a": const(True)})


def test_compiling_a_reference_without_a_predicate_is_an_unknown_selection() -> None:
    with pytest.raises(ConditionError) as caught:
        compile_condition(And((Ref("a", 0), Ref("b", 6))), {"a": const(True)})
    assert (caught.value.code, caught.value.offset) == (UNKNOWN_SELECTION, 6)


def test_describe_renders_canonical_text_that_parses_back_to_the_same_tree() -> None:
    node = parse_condition("A OR (b AND c) AND NOT (d or e) or (f or g) or ANY OF x*")
    text = describe(node)
    assert text == "A or (b and c) and not (d or e) or (f or g) or 1 of x*"
    assert shape(parse_condition(text)) == shape(node)


WRITE = frozenset({"write"})
COPY = frozenset({"copy", "write"})
CONSTRAINTS: dict[str, frozenset[str] | None] = {
    "w": WRITE,
    "c": COPY,
    "u": frozenset({"upload"}),
    "free": None,
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("w", WRITE),
        ("free", None),
        ("missing", None),  # a selection without an entry is unconstrained
        ("c and w", WRITE),
        ("c and free", COPY),
        ("free and free", None),
        ("w and u", frozenset()),  # can never match
        ("w or u", frozenset({"write", "upload"})),
        ("w or free", None),
        ("not w", None),
        ("c and not w", COPY),
        ("not not w", WRITE),
        ("(w or u) and (c or free)", frozenset({"write", "upload"})),
    ],
)
def test_required_values_bound_the_indexed_field_for_and_or_and_not(
    text: str, expected: frozenset[str] | None
) -> None:
    assert required_values(parse_condition(text), CONSTRAINTS) == expected


def test_required_values_refuse_an_unexpanded_pattern() -> None:
    with pytest.raises(ValueError, match="expand"):
        required_values(AllOf("them", 0), CONSTRAINTS)


SOUP = st.sampled_from(
    [
        "a", "b", "sel_1", "_x", "(", ")", "and", "OR", "not", "Not", "1", "2", "of", "all",
        "any", "them", "sel_*", "*", "|", "count()", ">", "5", "$", "-x", "9a", "\t", "\n", "é",
    ]
)  # fmt: skip


@given(st.lists(SOUP, max_size=30), st.sampled_from([" ", ""]))
def test_token_soups_raise_nothing_but_condition_errors(tokens: list[str], sep: str) -> None:
    text = sep.join(tokens)
    try:
        node = parse_condition(text)
    except ConditionError as caught:
        assert caught.code == SYNTAX
        assert 0 <= caught.offset <= len(text)
        return
    assert shape(parse_condition(describe(node))) == shape(node)
    try:
        expanded = expand(node, ["a", "b", "sel_1", "_x"])
    except ConditionError as caught:
        assert caught.code in (UNKNOWN_SELECTION, PATTERN_MATCHES_NOTHING)
        return
    assert shape(parse_condition(describe(expanded))) == shape(expanded)


@given(st.text(max_size=60))
def test_arbitrary_text_raises_nothing_but_condition_errors(text: str) -> None:
    try:
        parse_condition(text)
    except ConditionError as caught:
        assert 0 <= caught.offset <= len(text)


NAMES = ("a", "b", "sel_x", "sel_y", "_hidden")
LEAVES = st.one_of(
    st.sampled_from(NAMES).map(lambda n: Ref(n, 0)),
    st.sampled_from(["them", "sel_*", "*", "a"]).map(lambda p: OneOf(p, 0)),
    st.sampled_from(["them", "sel_*", "_*"]).map(lambda p: AllOf(p, 0)),
)
TREES: st.SearchStrategy[Node] = st.recursive(
    LEAVES,
    lambda kids: st.one_of(
        kids.map(Not),
        st.lists(kids, min_size=2, max_size=4).map(lambda ops: And(tuple(ops))),
        st.lists(kids, min_size=2, max_size=4).map(lambda ops: Or(tuple(ops))),
    ),
    max_leaves=16,
)


def render(node: Node, draw: Callable[[st.SearchStrategy[bool]], bool]) -> str:
    """Text for a tree with only the parentheses precedence needs, plus random extra ones."""

    def keyword(word: str) -> str:
        return word.upper() if draw(st.booleans()) else word

    def part(child: Node, needs_parens: bool) -> str:
        text = render(child, draw)
        return f"({text})" if needs_parens or draw(st.booleans()) else text

    match node:
        case Ref(name=name):
            return name
        case OneOf(pattern=pattern):
            quantifier = "any" if draw(st.booleans()) else "1"
            return f"{keyword(quantifier)} {keyword('of')} {pattern}"
        case AllOf(pattern=pattern):
            return f"{keyword('all')} {keyword('of')} {pattern}"
        case Not(operand=operand):
            return f"{keyword('not')} {part(operand, isinstance(operand, And | Or))}"
        case And(operands=operands):
            joined = f" {keyword('and')} "
            return joined.join(part(o, isinstance(o, Or)) for o in operands)
        case Or(operands=operands):
            return f" {keyword('or')} ".join(part(o, False) for o in operands)
    raise AssertionError(node)


@given(TREES, st.fixed_dictionaries({n: st.booleans() for n in NAMES}), st.data())
def test_well_formed_conditions_compile_to_the_semantics_of_their_tree(
    model: Node, truth: dict[str, bool], data: st.DataObject
) -> None:
    text = render(model, data.draw)
    parsed = parse_condition(text)
    expanded = expand(parsed, NAMES)
    predicates = {n: const(v) for n, v in truth.items()}
    expected = evaluate(model, truth)
    assert evaluate(parsed, truth) is expected
    assert evaluate(expanded, truth) is expected
    assert compile_condition(expanded, predicates)(None) is expected


ACTIONS = ("read", "write", "copy")


@given(
    TREES,
    st.fixed_dictionaries(
        {n: st.none() | st.frozensets(st.sampled_from(ACTIONS), min_size=1) for n in NAMES}
    ),
    st.fixed_dictionaries({n: st.booleans() for n in NAMES}),
    st.sampled_from(ACTIONS),
)
def test_required_values_never_exclude_an_action_the_condition_matches(
    model: Node,
    constraints: dict[str, frozenset[str] | None],
    flags: dict[str, bool],
    action: str,
) -> None:
    def selection(name: str) -> Callable[[str], bool]:
        allowed = constraints[name]
        return lambda act: flags[name] and (allowed is None or act in allowed)

    expanded = expand(model, NAMES)
    matches = compile_condition(expanded, {n: selection(n) for n in NAMES})
    bound = required_values(expanded, constraints)
    if matches(action):
        assert bound is None or action in bound
